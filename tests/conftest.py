"""Test setup: 8 fake CPU devices (set before jax is imported anywhere), the repo root on sys.path, and a
persistent XLA compilation cache shared by the test processes (the suite compiles similar steps many times);
and the helpers several test files share (a small pretraining config, its metrics, the pretraining CLI)."""

import dataclasses
import json
import os
import subprocess
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


# run_eval.py's flags for a tiny pretraining per repeat (a 16-wide CNN, 2 steps of 8 ECGs)
TINY_PRETRAIN_FLAGS = [
    "--config.pretrain.num_steps=2",
    "--config.pretrain.batch_size=8",
    "--config.pretrain.model.encoder=cnn",
    "--config.pretrain.model.emb_dim=16",
    "--config.pretrain.model.channels=(4,4,4,4,4)",
]

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


# the interpreter running the tests, for the command-line tests' subprocesses
PY = sys.executable


def small_config(encoder="cnn", **over):
    """A pretraining config small enough for a test (emb 32, batch 8, 6 steps) with dotted overrides."""
    c = base.get_config()
    c.model.encoder = encoder
    c.model.emb_dim = 32
    c.model.proj_dim = 16
    c.batch_size = 8
    c.num_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.optim.learning_rate = 1e-3
    return override(c, **over)


def read_metrics(workdir):
    """The records of workdir/metrics.jsonl, one dict a line."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def run_cli(args, timeout=600, **kw):
    """run_pretrain.py with args in a subprocess from the repository root; the CompletedProcess."""
    return subprocess.run(
        [PY, os.path.join(ROOT, "run_pretrain.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def run_eval_cli(workdir, *flags, timeout=600):
    """run_eval.py --config configs/eval.py --workdir=WORKDIR FLAGS in a subprocess on one CPU device, from the
    repository root; the CompletedProcess."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"
    )
    cmd = [
        PY,
        os.path.join(ROOT, "run_eval.py"),
        "--config",
        os.path.join(ROOT, "configs", "eval.py"),
    ]
    return subprocess.run(
        [*cmd, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
