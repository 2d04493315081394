"""Checkpoints: restore the newest good one, quarantine corrupt ones, one-line errors, no compiles on save."""

import gc
import os
import shutil
import sys

import jax.monitoring
import numpy as np
import pytest

from ecgcl_jax import checkpoint, parallel, pretrain
from ecgcl_jax.errors import UserError
from tests.conftest import read_metrics, small_config


def _garble(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage" * 7)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, capsys, monkeypatch):
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


def test_newest_step_folder_emptied_falls_back(tmp_path, capsys):
    # a step folder without its item (a partial copy, a deletion): orbax decided from it that the checkpoints hold
    # several items, and every older step then failed to restore, and every later save failed, too
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


def test_checkpoint_of_a_replicated_state_compiles_nothing_and_restores_exactly(tmp_path):
    """orbax's replica-parallel writes would compile a slice program per array shape and device at the first save."""

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


def test_unreadable_array_data_is_one_line_not_orbax_tracebacks(tmp_path, capsys):
    # truncated array chunks: each abandoned read printed a traceback of ~60 lines when collected (1000 lines)
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
