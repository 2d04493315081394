"""CLOCS CMSC (temporal: the two 5 s halves of an ECG are positives) contrastive pretraining.

Kiyasseh et al., ICML 2021. See ecgcl_jax/pretrain.py for the views.

Any encoder: --config.model.encoder=cnn|cnn_lstm|cnn_attn_lstm|cnn_transformer.
Patient-level positives on top: --config.patient_positives=True.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.mode = "cmsc"
    c.model.encoder = "cnn"
    c.lock()
    return c
