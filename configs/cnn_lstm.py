"""Pretraining with the cnn_lstm encoder (SimCLR-style NT-Xent). See configs/base.py for every field."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.encoder = "cnn_lstm"
    c.lock()
    return c
