"""Contrastive pretraining of an ECG encoder (the same command as the installed `ecgcl-pretrain`).

  python run_pretrain.py --config configs/cnn_attn_lstm.py --workdir runs/demo [--config.batch_size=64 ...]
  python run_pretrain.py --config cnn --workdir runs/demo          # a shipped config by name

Multi-host: add --distributed (TPU pods / SLURM auto-detect) or
--coordinator=HOST:PORT --num_processes=N --process_id=I on every process.
"""

import sys

from ecgcl_jax import commands  # light (standard library only): holds a SIGTERM while JAX loads

if __name__ == "__main__":
    sys.exit(commands.pretrain_main(prog="run_pretrain.py"))
