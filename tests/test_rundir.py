"""Run directory: the workdir lock, the recorded run (max_amp, pool), the resume-config check."""

import os

import numpy as np
import pytest

from ecgcl_jax import pretrain, rundir
from ecgcl_jax.data import open_dataset
from ecgcl_jax.errors import UserError
from tests.conftest import small_config


def test_damaged_workdir_files_are_one_line_errors(tmp_path):
    ds, c = open_dataset(""), small_config()
    pool = np.arange(len(ds))
    wd = str(tmp_path)
    max_amp = rundir.admit_max_amp(c, wd, ds, pool, 8)  # a new workdir: recorded
    # resumed: the recorded value
    assert max_amp > 0 and rundir.admit_max_amp(c, wd, ds, pool, 8) == max_amp
    with open(os.path.join(wd, "run.json"), "w") as f:
        f.write('{"pool_records": []}')
    with pytest.raises(UserError, match="no max_amp recorded"):
        rundir.admit_max_amp(c, wd, ds, pool, 8)
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write('{"seed": 0, "mod')  # cut short, as by a crash mid-write before writes were atomic
    with pytest.raises(UserError, match="config.json: unreadable") as e:
        rundir.admit_max_amp(c, wd, ds, pool, 8)
    assert "\n" not in str(e.value)


def test_stale_lock_file_does_not_block(tmp_path):
    wd = str(tmp_path / "w")
    os.makedirs(wd)
    with open(os.path.join(wd, ".lock"), "w") as f:
        f.write("pid 999999 on a-dead-host")  # left by a process that died: no flock is held
    assert pretrain.run(small_config(num_steps=1), wd)["steps"] == 1


def test_changed_config_on_resume_is_refused(tmp_path):
    wd = str(tmp_path / "w")
    pretrain.run(small_config(num_steps=2), wd)
    with pytest.raises(UserError, match=r"changed fields: model.encoder: 'cnn' -> 'cnn_lstm'"):
        pretrain.run(small_config("cnn_lstm", num_steps=4), wd)
    # cadence and length changes are fine
    assert (
        pretrain.run(small_config(num_steps=3, log_every=3, checkpoint_every=1), wd)["steps"] == 3
    )
