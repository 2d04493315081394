"""Two processes through jax.distributed on 127.0.0.1 equal one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ecgcl_jax.rundir import WorkdirLock
from tests.conftest import ROOT

ARGS = [
    "--config",
    "configs/cnn.py",
    "--config.model.emb_dim=32",
    "--config.model.proj_dim=16",
    "--config.batch_size=8",
    "--config.num_steps=3",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.optim.learning_rate=1e-5",
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def _start_two_processes(wd, env, args=ARGS, extra=((), ())):
    """Starts the two processes of a pretraining in ``wd`` through a coordinator on a free local port (process i
    with extra[i] flags, both with ``env``); returns their Popen objects, stdout and stderr piped as text."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "run_pretrain.py"),
        *args,
        "--workdir",
        wd,
        f"--coordinator=127.0.0.1:{_free_port()}",
        "--num_processes=2",
    ]
    return [
        subprocess.Popen(
            cmd + [f"--process_id={i}", *extra[i]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]


def _losses(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f if l.strip()]


# Test-only instrumentation, loaded at start-up by each process (sitecustomize): logs the dataset rows that
# input_pipeline.read_rows copies, one line per call, to ECGCL_TEST_ROWS_LOG.<pid>.
ROWS_HOOK = """
import os
if os.environ.get("ECGCL_TEST_ROWS_LOG"):
  import numpy as np
  from ecgcl_jax import input_pipeline as ip
  _real = ip.read_rows
  def _logged(raw, rows, *a, **k):
    with open(os.environ["ECGCL_TEST_ROWS_LOG"] + "." + str(os.getpid()), "a") as f:
      f.write(" ".join(str(int(r)) for r in np.asarray(rows)) + "\\n")
    return _real(raw, rows, *a, **k)
  ip.read_rows = _logged
"""


@pytest.mark.parametrize("resident", ["yes", "no"])
def test_two_processes_equal_one(tmp_path, resident):
    mh, sp = str(tmp_path / "mh"), str(tmp_path / "sp")
    args = [*ARGS, f"--config.data.resident={resident}"]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ROWS_HOOK)
    env = dict(
        _env(2),
        ECGCL_TEST_ROWS_LOG=str(tmp_path / "rows"),
        PYTHONPATH=os.pathsep.join([str(hook)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    )
    procs = _start_two_processes(mh, env, args)
    outs = [p.communicate(timeout=600) for p in procs]
    for i, (p, (_o, e)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, (
            f"process {i}: " + e[-3000:] + f"\nprocess {1 - i}: " + outs[1 - i][1][-1500:]
        )
    assert "step 3/3" in outs[0][0] and "step" not in outs[1][0]  # logs from process 0 only
    assert "devices: 4 (cpu) in 2 process(es); global batch 8, 2 per device" in outs[0][0]
    logs = sorted(tmp_path.glob("rows.*"))
    # each process reads only its own half of every global batch, never the other's
    if resident == "no":
        per_process = [[set(map(int, l.split())) for l in f.read_text().splitlines()] for f in logs]
        assert len(per_process) == 2 and [len(p) for p in per_process] == [3, 3]
        for a, b in zip(*per_process):
            assert len(a) == len(b) == 4 and not a & b
    else:  # the pool is placed on the devices once; no row is read per step
        assert logs == []
    single = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_pretrain.py"), *args, "--workdir", sp],
        cwd=ROOT,
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _losses(mh), _losses(sp)
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert sorted(os.listdir(os.path.join(mh, "checkpoints"))) == ["2", "3"]
    assert os.path.exists(os.path.join(mh, "encoder", "variables.msgpack"))


def _two_processes_failing(wd, extra=((), ())):
    """Runs the two processes of a pretraining in ``wd`` (process i with extra[i] flags) and checks that both end
    with exit code 2, no traceback and exactly one of our error lines each; returns those two lines."""
    procs = _start_two_processes(wd, _env(1), extra=extra)
    outs = [p.communicate(timeout=300) for p in procs]
    # our one-line errors; the runtime's own shutdown logging (C++, e.g. from the coordination service) may add
    # lines that are not ours, so only a traceback counts against the rule
    errs = [[l for l in e.splitlines() if l.startswith("run_pretrain.py: error:")] for _, e in outs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert not any("Traceback" in e for _, e in outs), outs
    assert [len(e) for e in errs] == [1, 1], outs
    return errs[0][0], errs[1][0]


def test_refusal_on_process_zero_stops_every_process(tmp_path):
    """Process 0 alone checks the workdir; when it refuses (here: a live run holds the lock), the other
    process stops with a one-line error too instead of hanging in its next collective."""

    wd = str(tmp_path / "busy")
    os.makedirs(wd)
    with WorkdirLock(wd):
        err0, err1 = _two_processes_failing(wd)
    assert "in use by another live run" in err0 and "process 0 stopped" in err1
    assert not os.path.exists(os.path.join(wd, "config.json"))


def test_error_on_another_process_stops_process_zero_with_one_line(tmp_path):
    """Process 1 cannot open its data (a path missing on that host): it stops with its own one-line error, and
    process 0 with one naming process 1, at once, instead of a traceback when the runtime's wait times out."""
    err0, err1 = _two_processes_failing(
        str(tmp_path / "wd"), ((), ("--config.data.path=/nonexistent/ptbxl",))
    )
    assert "/nonexistent/ptbxl" in err1 and "process 1 stopped with an error" in err0


def test_processes_with_different_configs_stop_with_one_line(tmp_path):
    err0, err1 = _two_processes_failing(str(tmp_path / "wd"), ((), ("--config.seed=7",)))
    assert (
        "the config differs between processes (processes 0 | 1)" in err0
        and err0.split(": ", 1)[1] == err1.split(": ", 1)[1]
    )


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    """A checkpoint is a collective: when only one host is told to stop, all agree on the step, save it once
    and exit 0."""

    wd = str(tmp_path / "pre")
    args = [a for a in ARGS if not a.startswith("--config.num_steps")] + ["--config.num_steps=500"]
    procs = _start_two_processes(wd, _env(1), args)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    line = [l for l in outs[0][0].splitlines() if l.startswith("interrupted")]
    assert len(line) == 1, outs[0][0]
    step = int(line[0].split("at step ")[1].split()[0])
    assert 0 < step < 500
    assert str(step) in os.listdir(os.path.join(wd, "checkpoints"))
    assert len(_losses(wd)) == step  # logged up to the agreed step, nothing beyond
