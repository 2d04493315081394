"""Two processes through jax.distributed on 127.0.0.1 equal one process (issue 5)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT

ARGS = ["--config", "configs/cnn.py", "--config.model.emb_dim=32", "--config.model.proj_dim=16",
        "--config.batch_size=8", "--config.num_steps=3", "--config.log_every=1", "--config.checkpoint_every=2",
        "--config.optim.learning_rate=1e-5"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return e


def _losses(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(l)["loss"] for l in f if l.strip()]


def test_two_processes_equal_one(tmp_path):
  mh, sp = str(tmp_path / "mh"), str(tmp_path / "sp")
  port = _free_port()
  cmd = [sys.executable, os.path.join(ROOT, "run_pretrain.py"), *ARGS, "--workdir", mh,
         f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  assert "step 3/3" in outs[0][0] and "step" not in outs[1][0]  # logs from process 0 only
  single = subprocess.run([sys.executable, os.path.join(ROOT, "run_pretrain.py"), *ARGS, "--workdir", sp],
                          cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  a, b = _losses(mh), _losses(sp)
  assert len(a) == len(b) == 3
  np.testing.assert_allclose(a, b, rtol=1e-4)
  assert sorted(os.listdir(os.path.join(mh, "checkpoints"))) == ["2", "3"]
  assert os.path.exists(os.path.join(mh, "encoder", "variables.msgpack"))
