"""CLOCS CMSMLC (halves x leads are all positives) contrastive pretraining.

Kiyasseh et al., ICML 2021. See ecgcl_jax/pretrain.py for the views.

Any encoder: --config.model.encoder=cnn|cnn_lstm|cnn_attn_lstm|cnn_transformer.
Patient-level positives on top: --config.patient_positives=True.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.mode = "cmsmlc"
    c.model.encoder = "cnn"
    c.lock()
    return c
