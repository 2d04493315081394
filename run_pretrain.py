"""Contrastive pretraining of an ECG encoder.

  python run_pretrain.py --config configs/cnn_attn_lstm.py --workdir runs/demo [--config.batch_size=64 ...]

Multi-host: add --distributed (TPU pods / SLURM auto-detect) or
--coordinator=HOST:PORT --num_processes=N --process_id=I on every process.
"""

import os
import sys

from ecgcl_jax import cli  # light (standard library only)

# a SIGTERM while JAX loads stops the run at its first step instead of killing it
if __name__ == "__main__":
    cli.hold_early_stop_signals()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pretraining config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: metrics.jsonl, checkpoints/, encoder/."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detect)."
)
_COORD = flags.DEFINE_string("coordinator", "", "Coordinator HOST:PORT for multi-process runs.")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
_PID = flags.DEFINE_integer("process_id", -1, "This process's id (multi-process runs).")


def main(argv):
    del argv

    def run():
        from configs import base  # noqa: PLC0415 - every pretraining field, to check the config file has them all
        from ecgcl_jax import pretrain  # noqa: PLC0415

        return pretrain.run(
            cli.config_value(_CONFIG, base.get_config), os.path.expanduser(_WORKDIR.value)
        )

    return cli.run_entry(
        "run_pretrain.py", run, _DISTRIBUTED.value, _COORD.value, _NPROC.value, _PID.value
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    flags.register_validator(
        "workdir", lambda v: bool(v and v.strip()), message="must not be empty"
    )

    sys.exit(app.run(main, flags_parser=cli.flags_parser("run_pretrain.py")))
