"""The evaluation protocol: K repeats of patient-level split, pretrain-or-load, fine-tune, best-epoch, test.

  python run_eval.py --config configs/eval.py --workdir runs/eval \
      [--config.repeats=5 --config.finetune.num_epochs=40 ...]
  python run_eval.py --config configs/sweep_label_fraction.py --workdir runs/sweep_lf
  python run_eval.py --config configs/eval_ptbxl.py --workdir runs/ptbxl --shard=0/4   # one of 4 shards

Writes WORKDIR/results.json, splits.json, results.md, results.csv, plots/; re-running continues an
interrupted evaluation. See the README, "How to evaluate".
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
    "config", None, "Evaluation config file (configs/eval.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Evaluation directory (results, splits, per-repeat runs)."
)
_SHARD = flags.DEFINE_string(
    "shard",
    "",
    "i/n (0 <= i < n): run only this process's share of the units (repeats, or variant x repeat of a sweep) "
    "in a --workdir shared with the other shards, e.g. --shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT "
    "in a job array --array=0-(n-1). The last shard to finish, or a run without --shard, writes the reports.",
)
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic",
    True,
    "Ask XLA for run-to-run deterministic GPU kernels (--xla_gpu_deterministic_ops), so a "
    "resumed or repeated evaluation gives the same numbers on GPUs too; no effect on CPU.",
)


def main(argv):
    del argv
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if _DETERMINISTIC.value and "xla_gpu_deterministic_ops" not in xla_flags:
        # before JAX starts a backend
        os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_gpu_deterministic_ops=true".strip()

    def run():
        from configs import eval as eval_config  # noqa: PLC0415 - every evaluation field, to check the config file
        from ecgcl_jax import evaluate  # noqa: PLC0415

        return evaluate.run(
            cli.config_value(_CONFIG, eval_config.get_config),
            os.path.expanduser(_WORKDIR.value),
            shard=_SHARD.value or None,
        )

    return cli.run_entry("run_eval.py", run)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    flags.register_validator(
        "workdir", lambda v: bool(v and v.strip()), message="must not be empty"
    )

    sys.exit(app.run(main, flags_parser=cli.flags_parser("run_eval.py")))
