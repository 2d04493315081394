"""Test setup: 8 fake CPU devices (set before jax is imported anywhere), the repo root on sys.path, and a
persistent XLA compilation cache shared by the test processes (the suite compiles similar steps many times)."""

import dataclasses
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ecgcl_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import base  # noqa: E402  (the worktree's configs/, importable once ROOT is on sys.path)
from ecgcl_jax import views  # noqa: E402


def override(config, **fields):
    """Set dotted fields on a ConfigDict: override(c, **{"model.encoder": "cnn"}); returns it."""
    for key, value in fields.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def model_fields(**fields) -> dict:
    """The model.* fields of configs/base.py (the library declares no model defaults), `fields` overriding."""
    return {**base.get_config().model.to_dict(), **fields}


def view_spec(**fields) -> views.ViewSpec:
    """The classifier-input views of configs/base.py's pretraining config, `fields` overriding."""
    return dataclasses.replace(views.ViewSpec.from_pretrain_config(base.get_config()), **fields)


# a tiny CNN encoder config for fine-tuning and evaluation tests (model.* fields)
TINY = dict(
    encoder="cnn",
    emb_dim=8,
    proj_dim=4,
    kernel_size=15,
    dropout=0.1,
    channels=(4, 4, 4, 4, 4),
    lstm_layers=1,
    attention_dim=0,
    transformer_layers=1,
    transformer_heads=2,
    transformer_d_model=8,
)
