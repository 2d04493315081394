"""Runs that cannot be lost: preemption, non-finite losses and updates, errors naming the fields to change."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ecgcl_jax import checkpoint, evaluate, input_pipeline, preemption, pretrain
from ecgcl_jax.errors import UserError
from tests.conftest import ROOT, read_metrics, small_config


@pytest.fixture
def nan_at_step(monkeypatch):
    """nan_at_step(k): the batch of step k (0-based) carries NaN scales, so its loss and gradients are NaN, as
    a corrupt record would make them; nan_at_step(-1) turns it off."""
    host_batch = input_pipeline.BatchSource.host_batch
    bad = {"step": -1}

    def poisoned(self, step, executor=None):
        out = host_batch(self, step, executor)
        if step == bad["step"]:
            out["scale"] = np.full_like(out["scale"], np.nan)
        return out

    monkeypatch.setattr(input_pipeline.BatchSource, "host_batch", poisoned)
    return lambda k: bad.update(step=k)


SMALL = [
    "--config.model.emb_dim=32",
    "--config.model.proj_dim=16",
    "--config.batch_size=8",
    "--config.optim.learning_rate=1e-3",
]


def cli(workdir, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "run_pretrain.py"),
        "--config",
        "configs/cnn.py",
        "--workdir",
        workdir,
        *SMALL,
        *extra,
    ]


def env1():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one device: faster compiles
    return e


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
    args = ["--config.num_steps=120", "--config.log_every=1", "--config.checkpoint_every=100"]
    p = subprocess.run(
        cli(ref, *args), cwd=ROOT, capture_output=True, text=True, env=env1(), timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]

    proc = subprocess.Popen(
        cli(wd, *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env1(),
    )
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2:
            break
        time.sleep(0.2)
    # a second run on the live workdir is refused
    second = subprocess.run(
        cli(wd, *args), cwd=ROOT, capture_output=True, text=True, env=env1(), timeout=300
    )
    assert second.returncode == 2 and "in use by another live run" in second.stderr
    assert "Traceback" not in second.stderr
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert time.time() - t0 < 60
    line = [l for l in out.splitlines() if l.startswith("interrupted: checkpoint written at step")]
    assert line, out
    stopped_at = int(line[0].split("step ")[1].split()[0])
    assert stopped_at < 120 and os.path.isdir(os.path.join(wd, "checkpoints", str(stopped_at)))

    p = subprocess.run(
        cli(wd, *args), cwd=ROOT, capture_output=True, text=True, env=env1(), timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resuming from {wd}/checkpoints/{stopped_at}" in p.stdout
    a, b = read_metrics(ref), read_metrics(wd)
    assert [m["step"] for m in b] == list(range(1, 121))
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], atol=1e-5, rtol=0)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nan_at_step):
    wd = str(tmp_path / "nan")
    with pytest.raises(
        UserError, match=r"non-finite loss, gradient or update at step 5; stopped.*checkpoints/4"
    ):
        nan_at_step(4)
        pretrain.run(small_config(num_steps=8, checkpoint_every=2), wd)
    mgr = checkpoint.make_manager(os.path.join(wd, "checkpoints"), 3)
    assert max(mgr.all_steps()) == 4
    # skip mode: the bad step's update is dropped and counted, the run finishes
    wd2 = str(tmp_path / "skip")
    r = pretrain.run(small_config(num_steps=8, checkpoint_every=2, on_nonfinite="skip"), wd2)
    assert r["steps"] == 8
    m = read_metrics(wd2)
    assert m[-1]["nonfinite_steps"] == 1 and np.isfinite(m[-1]["loss"])
    with open(
        os.path.join(wd2, "metrics.jsonl")
    ) as f:  # strict JSON: the bad step's NaN loss is written as null
        strict = [
            json.loads(l, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
            for l in f
        ]
    assert [r["loss"] for r in strict if r["step"] == 5] == [None]
    # back to stop mode (a resumable change): the step skipped earlier is not held against the new steps ...
    r = pretrain.run(small_config(num_steps=10, checkpoint_every=2), wd2)
    assert r["steps"] == 10
    # ... a new bad step is, named by the log interval it fell in (the state records only the first bad step)
    with pytest.raises(
        UserError,
        match=r"non-finite loss, gradient or update between steps 11 and 12; stopped.*"
        r"checkpoints/10",
    ):
        nan_at_step(11)
        pretrain.run(small_config(num_steps=12, checkpoint_every=2), wd2)
    # a bad first step: no checkpoint to point to yet
    with pytest.raises(
        UserError, match=r"at step 1; stopped. Last good checkpoint: none written yet"
    ):
        nan_at_step(0)
        pretrain.run(small_config(num_steps=4, checkpoint_every=2), str(tmp_path / "nan0"))


# 1e39 is past float32's range, on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_update_that_overflows_is_a_bad_step(tmp_path):
    # finite loss and gradients, but a learning rate that takes the parameters past float32's range
    wd = str(tmp_path / "lr")
    cfg = small_config(
        num_steps=6, checkpoint_every=1, log_every=3, **{"optim.learning_rate": 1e39}
    )
    with pytest.raises(
        UserError, match=r"non-finite loss, gradient or update at step 1; stopped.*none written yet"
    ):
        pretrain.run(cfg, wd)
    assert not os.path.isdir(os.path.join(wd, "checkpoints")) or not os.listdir(
        os.path.join(wd, "checkpoints")
    )
    r = pretrain.run(
        small_config(
            num_steps=6,
            checkpoint_every=1,
            log_every=3,
            on_nonfinite="skip",
            **{"optim.learning_rate": 1e39},
        ),
        str(tmp_path / "skip"),
    )
    assert r["steps"] == 6 and read_metrics(str(tmp_path / "skip"))[-1]["nonfinite_steps"] == 6
    # every update dropped: the weights stay finite
    enc = checkpoint.load_encoder(str(tmp_path / "skip"))
    assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(enc.variables))


def test_evaluation_errors_name_the_fields_it_can_change(tmp_path, nan_at_step):
    # inside run_eval.py the pretraining config is config.pretrain: its errors must name that field, and a resumed
    # evaluation must accept it
    wd = str(tmp_path / "w")
    pretrain.run(small_config(num_steps=3, checkpoint_every=3), wd)
    with open(os.path.join(wd, "checkpoints", "3", "default", "_METADATA"), "w") as f:
        f.write("{")
    with pytest.raises(UserError, match=r"pass --config\.pretrain\.restart_if_unrestorable=True"):
        pretrain.run(small_config(num_steps=6), wd, name="config.pretrain")
    nan_at_step(0)
    with pytest.raises(UserError, match=r"set --config\.pretrain\.on_nonfinite=skip"):
        pretrain.run(
            small_config(num_steps=2),
            str(tmp_path / "n"),
            name="config.pretrain",
        )
    saved = {"pretrain": {"on_nonfinite": "stop", "restart_if_unrestorable": False, "seed": 0}}
    evaluate.check_resume(
        saved,
        {"pretrain": {"on_nonfinite": "skip", "restart_if_unrestorable": True, "seed": 0}},
        "eval_config.json",
    )
    with pytest.raises(UserError, match="pretrain.seed: 0 -> 1"):
        evaluate.check_resume(
            saved,
            {"pretrain": {"on_nonfinite": "stop", "restart_if_unrestorable": False, "seed": 1}},
            "eval_config.json",
        )


def test_a_stop_signal_during_the_export_reaches_the_enclosing_evaluation(tmp_path, monkeypatch):
    # an evaluation stops at once outside pretraining; a SIGTERM that lands after the pretraining loop's last
    # check (here in the export) must still stop it when the pretraining returns, not be swallowed
    real_export = pretrain.export

    def export_then(signum):
        def export(*a, **k):
            out = real_export(*a, **k)
            os.kill(os.getpid(), signum)
            return out

        return export

    monkeypatch.setattr(pretrain, "export", export_then(signal.SIGTERM))
    stop = preemption.StopRequest(signals=True)
    with pytest.raises(preemption.Interrupted, match="SIGTERM"), stop.interrupting():
        pretrain.run(small_config(num_steps=3, checkpoint_every=3), str(tmp_path / "wd"), stop=stop)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the routing ends with the blocks
    # the run itself was complete: final checkpoint and export are there
    assert os.path.isdir(tmp_path / "wd" / "checkpoints" / "3")
    assert os.path.exists(tmp_path / "wd" / "encoder" / "encoder.json")
    # a pretraining on its own: the finished run returns "done", no KeyboardInterrupt
    monkeypatch.setattr(pretrain, "export", export_then(signal.SIGINT))
    stop = preemption.StopRequest(signals=True)
    out = pretrain.run(
        small_config(num_steps=3, checkpoint_every=3), str(tmp_path / "wd2"), stop=stop
    )
    assert out["status"] == "done" and stop.requested and stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
