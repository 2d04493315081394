"""Quick throughput of the project's jitted pretraining step (resident int16 data) on the default device.

  python bench/quick_gpu_step.py --encoder cnn --batch 512,2048 --dtype bfloat16 --json out.jsonl
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from ecgcl_jax import models, parallel, pretrain


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--encoder", default="cnn")
  ap.add_argument("--batch", default="128,512,2048")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--aug1", default="gaussian_noise:0.05")
  ap.add_argument("--aug2", default="gaussian_noise:0.25")
  ap.add_argument("--seconds", type=float, default=6.0)
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  for b in [int(x) for x in a.batch.split(",")]:
    c = base.get_config()
    c.model.encoder, c.dtype, c.batch_size = a.encoder, a.dtype, b
    c.augment.view1, c.augment.view2 = a.aug1, a.aug2
    mesh = parallel.make_mesh()
    model = models.build_encoder(c.model, dtype=pretrain.DTYPES[c.dtype])
    tx = pretrain.make_optimizer(c.optim)
    repl = parallel.replicated(mesh)
    state = jax.jit(lambda k: pretrain.init_state(c, model, tx, k), out_shardings=repl)(jax.random.PRNGKey(0))
    step = jax.jit(pretrain.make_pretrain_step(c, model, tx), donate_argnums=(0,), out_shardings=(repl, repl))
    rng = np.random.default_rng(0)
    n = max(4 * b, 4096)
    pool = parallel.replicate_from_host(mesh, rng.integers(-1500, 1500, size=(n, 5000, 12), dtype=np.int16))
    scale = jnp.full((b,), 1e-3, jnp.float32)
    ids = jnp.arange(b, dtype=jnp.int32)
    max_amp = parallel.replicate_from_host(mesh, np.asarray(3.0, np.float32))
    key = jax.random.PRNGKey(1)
    rows = [jax.device_put(rng.integers(0, n, size=b).astype(np.int32), parallel.batch_sharding(mesh)) for _ in range(8)]
    t0 = time.perf_counter()
    state, m = step(state, {"rows": rows[0], "pool": pool, "scale": scale, "ids": ids, "max_amp": max_amp}, key)
    m["loss"].block_until_ready()
    compile_s = time.perf_counter() - t0
    for i in range(3):
      state, m = step(state, {"rows": rows[i % 8], "pool": pool, "scale": scale, "ids": ids, "max_amp": max_amp}, key)
    m["loss"].block_until_ready()
    rates = []
    for w in range(5):
      t0, k = time.perf_counter(), 0
      while time.perf_counter() - t0 < a.seconds / 5:
        for _ in range(5):
          state, m = step(state, {"rows": rows[k % 8], "pool": pool, "scale": scale, "ids": ids, "max_amp": max_amp}, key)
          k += 1
        m["loss"].block_until_ready()
      rates.append(k * b / (time.perf_counter() - t0))
    mem = {}
    try:
      mem = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
      pass
    rec = {"bench": "quick_gpu_step", "encoder": a.encoder, "batch": b, "dtype": a.dtype, "aug1": a.aug1,
           "aug2": a.aug2, "ecg_per_s": float(np.median(rates)), "min": float(min(rates)), "max": float(max(rates)),
           "compile_s": compile_s, "peak_bytes": mem.get("peak_bytes_in_use"), "device": str(jax.devices()[0]),
           "jax": jax.__version__, "loss": float(m["loss"])}
    print(json.dumps(rec), flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(rec) + "\n")
    del state, pool


if __name__ == "__main__":
  main()
