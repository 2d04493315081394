"""The evaluation protocol: K repeats of patient-level split, pretrain-or-load, fine-tune, best-epoch, test
(the same command as the installed `ecgcl-eval`).

  python run_eval.py --config configs/eval.py --workdir runs/eval \
      [--config.repeats=5 --config.finetune.num_epochs=40 ...]
  python run_eval.py --config eval:clocs_cmsc --workdir runs/eval_cmsc   # shipped configs by name
  python run_eval.py --config configs/sweep_label_fraction.py --workdir runs/sweep_lf

Writes WORKDIR/results.json, splits.json, results.md, results.csv, plots/, log.txt; re-running continues an
interrupted evaluation. See the README, "How to evaluate".
"""

import sys

from ecgcl_jax import commands  # light (standard library only): holds a SIGTERM while JAX loads

if __name__ == "__main__":
    sys.exit(commands.eval_main(prog="run_eval.py"))
