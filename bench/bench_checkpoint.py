"""Does checkpointing slow the step? Pretraining throughput with a checkpoint every N steps vs only at the end.

  python bench/bench_checkpoint.py [--encoder cnn --batch 16 --steps 60 --rounds 2 \
      --json bench/results_checkpoint.jsonl]

Runs the real loop (`pretrain.run`) on the embedded data, alternating the two settings (A B A B ...), and
reports the median ECG/s of the logged intervals after the first (which includes compilation).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchutil  # bench/, beside this script
import jax
import numpy as np

from configs import base
from ecgcl_jax import pretrain


def one(encoder, batch, steps, every, workdir):
    c = base.get_config()
    c.model.encoder, c.batch_size, c.num_steps = encoder, batch, steps
    c.log_every, c.checkpoint_every, c.keep_checkpoints = 10, every, 3
    shutil.rmtree(workdir, ignore_errors=True)
    pretrain.run(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [json.loads(l)["ecg_per_s"] for l in f if l.strip()][1:]
    return float(np.median(rates))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="cnn")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--every", type=int, default=10, help="checkpoint every N steps in the A setting"
    )
    ap.add_argument(
        "--json",
        default=None,
        help="append the JSON line here (default $OUT/bench_checkpoint.jsonl if "
        "$OUT is set, else bench/results_checkpoint.jsonl)",
    )
    a = ap.parse_args()
    if a.steps < 20:  # ECG/s are logged every 10 steps and the first interval holds the compile
        ap.error(
            f"--steps {a.steps}: at least 20 (rates are logged every 10 steps; the first 10 hold the compile)"
        )
    tmp = tempfile.mkdtemp()
    res = {"with_checkpoints": [], "final_only": []}
    for _ in range(a.rounds):
        res["with_checkpoints"].append(
            one(a.encoder, a.batch, a.steps, a.every, os.path.join(tmp, "a"))
        )
        res["final_only"].append(one(a.encoder, a.batch, a.steps, 10**9, os.path.join(tmp, "b")))
    ratio = float(np.median(res["with_checkpoints"]) / np.median(res["final_only"]))
    rec = {
        "bench": "checkpoint_overhead",
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "encoder": a.encoder,
        "batch": a.batch,
        "steps": a.steps,
        "every": a.every,
        **res,
        "ratio_with_checkpoints_vs_final_only": ratio,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{'checkpoints':24} {'ECG/s by round':>24} {'median':>9}")
    for name, label in (
        ("with_checkpoints", f"every {a.every} steps"),
        ("final_only", "only at the end"),
    ):
        print(
            f"{label:24} {', '.join(f'{v:.1f}' for v in res[name]):>24} {np.median(res[name]):9.1f}"
        )
    print(f"ratio (every {a.every} steps / only at the end): {ratio:.3f}")
    path = benchutil.json_path(a.json, "checkpoint")
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"appended to {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
