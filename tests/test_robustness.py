"""Runs that cannot be lost: preemption, corrupt checkpoints, divergence, one writer, config drift."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ecgcl_jax import input_pipeline
from tests.conftest import ROOT
from tests.test_pretrain import read_metrics, small_config


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


def test_stale_lock_file_does_not_block(tmp_path):
    from ecgcl_jax import pretrain

    wd = str(tmp_path / "w")
    os.makedirs(wd)
    with open(os.path.join(wd, ".lock"), "w") as f:
        f.write("pid 999999 on a-dead-host")  # left by a process that died: no flock is held
    assert pretrain.run(small_config(num_steps=1), wd)["steps"] == 1


def _garble(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage" * 7)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, capsys, monkeypatch):
    from ecgcl_jax import pretrain
    from ecgcl_jax.errors import UserError

    ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
    pretrain.run(small_config(num_steps=9, checkpoint_every=3), ref)
    pretrain.run(small_config(num_steps=6, checkpoint_every=3), wd)
    _garble(os.path.join(wd, "checkpoints", "6"))
    capsys.readouterr()
    r = pretrain.run(small_config(num_steps=9, checkpoint_every=3), wd)
    out = capsys.readouterr().out
    assert f"checkpoint {wd}/checkpoints/6 does not restore" in out
    assert f"resuming from {wd}/checkpoints/3" in out
    assert r["steps"] == 9
    np.testing.assert_allclose(
        [m["loss"] for m in read_metrics(ref)],
        [m["loss"] for m in read_metrics(wd)],
        atol=1e-5,
        rtol=0,
    )
    # none restores: a one-line error, unless the user asks to start over
    assert os.listdir(os.path.join(wd, "corrupt_checkpoints"))  # kept aside for inspection
    # array data cut short, metadata intact
    for step in os.listdir(os.path.join(wd, "checkpoints")):
        for root, _, files in os.walk(os.path.join(wd, "checkpoints", step)):
            for name in files:
                if os.path.basename(root) == "d":
                    os.truncate(os.path.join(root, name), 10)
    left = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    # as outside pytest, whose own hook would collect what orbax's failed reads leave behind
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    # refused, and refused again: the checkpoints stay, nothing starts over
    for _ in range(2):
        capsys.readouterr()
        with pytest.raises(UserError, match="no checkpoint restores"):
            pretrain.run(small_config(num_steps=10, checkpoint_every=3), wd)
        assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == left
        # orbax's hundreds of traceback lines
        assert "Event loop is closed" not in capsys.readouterr().err
    assert len(read_metrics(wd)) == 9  # the progress on record is untouched
    aside = len(os.listdir(os.path.join(wd, "corrupt_checkpoints")))
    r = pretrain.run(
        small_config(num_steps=10, checkpoint_every=3, restart_if_unrestorable=True), wd
    )
    assert r["steps"] == 10
    # moved aside, not met again by the new run's checkpoints
    assert len(os.listdir(os.path.join(wd, "corrupt_checkpoints"))) == aside + len(
        [s for s in left if s.isdigit()]
    )


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nan_at_step):
    from ecgcl_jax import checkpoint, pretrain
    from ecgcl_jax.errors import UserError

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
    from ecgcl_jax import checkpoint, pretrain
    from ecgcl_jax.errors import UserError

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


def test_newest_step_folder_emptied_falls_back(tmp_path, capsys):
    # a step folder without its item (a partial copy, a deletion): orbax decided from it that the checkpoints hold
    # several items, and every older step then failed to restore, and every later save failed, too
    import shutil

    from ecgcl_jax import pretrain

    pretrain.run(small_config(num_steps=12, checkpoint_every=3), str(tmp_path / "a"))
    wd = str(tmp_path / "w")
    pretrain.run(small_config(num_steps=9, checkpoint_every=3), wd)
    for name in os.listdir(os.path.join(wd, "checkpoints", "9")):
        p = os.path.join(wd, "checkpoints", "9", name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    capsys.readouterr()
    r = pretrain.run(small_config(num_steps=12, checkpoint_every=3), wd)
    out = capsys.readouterr()
    assert (
        r["steps"] == 12
        and "checkpoints/9 does not restore" in out.out
        and "using step 6" in out.out
    )
    assert "W" not in [
        l[:1] for l in out.err.splitlines()
    ]  # no orbax log lines about the missing files
    assert [m["loss"] for m in read_metrics(wd)] == [
        m["loss"] for m in read_metrics(str(tmp_path / "a"))
    ]
    assert os.listdir(os.path.join(wd, "corrupt_checkpoints"))[0].startswith("9-")
    assert "12" in os.listdir(os.path.join(wd, "checkpoints"))  # saving works after it


def test_evaluation_errors_name_the_fields_it_can_change(tmp_path, nan_at_step):
    # inside run_eval.py the pretraining config is config.pretrain: its errors must name that field, and a resumed
    # evaluation must accept it
    from ecgcl_jax import evaluate, pretrain
    from ecgcl_jax.errors import UserError

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


def test_changed_fields_names_every_field():
    from ecgcl_jax import configdiff

    old = {f"f{i:02d}": i for i in range(11)}
    new = {k: v + 1 for k, v in old.items()}
    text = configdiff.changed_fields(old, new, allowed=("f00",))
    assert text.startswith("f01: 1 -> 2, ") and "f08: 8 -> 9" in text
    assert text.endswith("; and 2 more: f09, f10")


def test_changed_config_on_resume_is_refused(tmp_path):
    from ecgcl_jax import pretrain
    from ecgcl_jax.errors import UserError

    wd = str(tmp_path / "w")
    pretrain.run(small_config(num_steps=2), wd)
    with pytest.raises(UserError, match=r"changed fields: model.encoder: 'cnn' -> 'cnn_lstm'"):
        pretrain.run(small_config("cnn_lstm", num_steps=4), wd)
    # cadence and length changes are fine
    assert (
        pretrain.run(small_config(num_steps=3, log_every=3, checkpoint_every=1), wd)["steps"] == 3
    )


def test_checkpoint_of_a_replicated_state_compiles_nothing_and_restores_exactly(tmp_path):
    """orbax's replica-parallel writes would compile a slice program per array shape and device at the first save."""
    import jax
    import jax.monitoring

    from ecgcl_jax import checkpoint, parallel

    mesh = parallel.make_mesh(8)
    rng = np.random.default_rng(0)
    host = {
        f"w{n}": rng.normal(size=(n + 1, 7 * n + 3)).astype(np.float32) for n in range(6)
    }  # distinct shapes
    state = {k: parallel.replicate_from_host(mesh, v) for k, v in host.items()}
    jax.block_until_ready(state)
    compiles = []
    listener = lambda event, secs, **kw: (
        compiles.append(event) if event.endswith("backend_compile_duration") else None
    )
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        manager = checkpoint.make_manager(str(tmp_path / "ck"), keep=1)
        checkpoint.save(manager, 1, state, wait=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    step, back = checkpoint.restore_latest(
        checkpoint.make_manager(str(tmp_path / "ck"), keep=1), abstract
    )
    assert step == 1
    for k, v in host.items():
        assert back[k].sharding == state[k].sharding
        np.testing.assert_array_equal(np.asarray(back[k]), v)


def test_a_stop_signal_during_the_export_reaches_the_enclosing_evaluation(tmp_path, monkeypatch):
    # an evaluation stops at once outside pretraining; a SIGTERM that lands after the pretraining loop's last
    # check (here in the export) must still stop it when the pretraining returns, not be swallowed
    from ecgcl_jax import preemption, pretrain

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


def test_stop_signal_before_the_run_started_reaches_its_handler():
    # run_pretrain.py / run_eval.py hold SIGTERM from their first lines (it killed them while JAX loaded); the run's
    # handler gets it when installed, so the run stops the way it does for a later signal
    from ecgcl_jax import preemption

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        preemption.hold_early_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        got = []
        with preemption.on_stop_signals(lambda signum, frame: got.append(signum)):
            assert got == [signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGINT)  # inside the block: straight to the handler
            time.sleep(0.05)
        assert got == [signal.SIGTERM, signal.SIGINT] and not preemption._EARLY_SIGNALS
        # the hold ends with the block: after it, the default handlers (a signal while writing results is not eaten)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        preemption.hold_early_stop_signals()
        preemption.release_early_stop_signals()
        assert (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
            and not preemption._EARLY_SIGNALS
        )
        # a second signal while still starting stops the process at once, as the signal does by default
        code = (
            "import os, signal, time\nfrom ecgcl_jax import preemption\npreemption.hold_early_stop_signals()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nprint('held', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\nprint('not stopped')\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == -signal.SIGTERM and r.stdout == "held\n", (
            r.returncode,
            r.stdout,
            r.stderr,
        )
        assert (
            r.stderr.splitlines()[-1]
            == "received SIGTERM again; stopping now (nothing to save yet)"
        )
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_failed_whole_file_write_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    # a full disk showed "No space left on device" without a path, and left an empty results.md behind
    import errno

    from ecgcl_jax import fileio

    path = tmp_path / "results.md"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError) as e:
        fileio.atomic_write(str(path), b"new")
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == [
        "results.md"
    ]  # no temporary file left


def test_a_full_disk_inside_orbax_is_one_line(capsys):
    # orbax reports ENOSPC as ValueError: RESOURCE_EXHAUSTED; it ended the run with a traceback and exit code 1
    from ecgcl_jax import cli

    def save():
        raise ValueError(
            "RESOURCE_EXHAUSTED: Failed to write /w/checkpoints/3/x: No space left on device "
            "[os_error_code='28']"
        )

    assert cli.run_entry("run_pretrain.py", save) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "run_pretrain.py: error: no space left on device (RESOURCE_EXHAUSTED"
    )

    def bug():
        raise ValueError("a bug, not the disk")

    with pytest.raises(ValueError, match="a bug"):  # anything else keeps its traceback
        cli.run_entry("run_pretrain.py", bug)


def test_unreadable_array_data_is_one_line_not_orbax_tracebacks(tmp_path, capsys):
    # truncated array chunks: each abandoned read printed a traceback of ~60 lines when collected (1000 lines)
    import gc

    from ecgcl_jax import pretrain

    wd = str(tmp_path / "w")
    hook = sys.unraisablehook
    try:
        pretrain.run(small_config(num_steps=3, checkpoint_every=1), wd)
        data = [
            os.path.join(r, f)
            for r, _, fs in os.walk(os.path.join(wd, "checkpoints", "3"))
            for f in fs
            if os.sep + "d" + os.sep in os.path.join(r, f)
        ]
        assert data
        for f in data:
            os.truncate(f, 10)
        capsys.readouterr()
        assert pretrain.run(small_config(num_steps=4, checkpoint_every=1), wd)["steps"] == 4
        gc.collect()
        out = capsys.readouterr()
        assert "checkpoints/3 does not restore" in out.out and "using step 2" in out.out
        assert "Exception ignored" not in out.err and "Traceback" not in out.err
    finally:  # (the asyncio logger stays quiet: its reports of the abandoned reads come at exit)
        sys.unraisablehook = hook
