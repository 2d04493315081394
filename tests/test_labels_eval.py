"""End to end: a user label table on the shipped PTB-XL sample, evaluated with run_eval.py,
switching the label column at evaluation time."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from ecgcl_jax.data import open_dataset
from tests.conftest import ROOT, TINY_PRETRAIN_FLAGS, run_eval_cli

SAMPLE = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "ptbxl_sample"))


def test_run_eval_on_prepared_dataset_with_label_table(tmp_path):
    names = [n for n in open_dataset("").names]
    rng = np.random.default_rng(7)
    lvh = np.array(["1", "0"] * (len(names) // 2))
    other = np.where(rng.random(len(names)) < 0.5, "yes", "no").astype(object)
    other[:6] = ""  # unknown for the second column: pretraining only
    table = tmp_path / "labels.csv"
    pd.DataFrame({"record": names, "lvh": lvh, "other": other}).to_csv(table, index=False)
    out = tmp_path / "prepared"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "ecgcl_jax.data",
            "prepare",
            SAMPLE,
            "--out",
            str(out),
            "--labels",
            str(table),
            "--label-column",
            "lvh",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    ds = open_dataset(str(out))
    assert np.nansum(ds.labels) == (lvh == "1").sum()
    unknown_other = {r for r, o in zip(ds.names, ds.with_label("other").labels) if np.isnan(o)}
    assert len(unknown_other) == 6

    wd = tmp_path / "eval"
    p = run_eval_cli(
        wd,
        f"--config.data.path={out}",
        "--config.data.label=other",
        "--config.repeats=1",
        *TINY_PRETRAIN_FLAGS,
        "--config.finetune.num_epochs=1",
        "--config.finetune.batch_size=16",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert set(res["repeats"][0]["test"]) >= {
        "auroc",
        "auprc",
        "f1",
        "accuracy",
        "precision",
        "recall",
    }
    sp = json.loads((wd / "splits.json").read_text())["321"]
    name_of = dict(zip(map(str, ds.records), ds.names))
    labelled = [name_of[r] for k in ("train", "val", "test") for r in sp["records"][k]]
    # unknown labels stay out of the labeled splits
    assert labelled and not set(labelled) & unknown_other
    assert len(sp["pretrain"]) > 0
