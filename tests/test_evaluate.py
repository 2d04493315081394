"""The evaluation protocol: seeds, leakage refusal, reproducibility, resume after a kill, sweeps, and one
end-to-end `run_eval.py` run (with pretraining) on the embedded data."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import ecgcl_jax
from configs import eval as eval_cfg
from configs import eval_ptbxl
from ecgcl_jax import (
    checkpoint,
    commands,
    data,
    embed,
    evaluate,
    models,
    preemption,
    pretrain,
    splits,
)
from ecgcl_jax.data.dataset import default_data_path
from ecgcl_jax.errors import UserError
from ecgcl_jax.rundir import WorkdirLock
from tests.conftest import ROOT, TINY, TINY_PRETRAIN_FLAGS, override, run_eval_cli

METRIC_KEYS = {"auroc", "auprc", "f1", "accuracy", "precision", "recall"}
SUMMARY_KEYS = {"mean", "ci95", "min", "max"}
# the program name the embedding command reports its errors under
EMBED_PROG = "python -m ecgcl_jax.embed"


class FakeDataset:
    """Stand-in for ecgcl_jax.data.Dataset: 36 patients (1-2 ECGs each), 3 records without a patient id,
    2 unlabeled records; positives carry a larger 1.2 Hz component."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        pids, labels = [], []
        for j in range(36):
            y = float(j % 2)
            for _ in range(1 + j % 3 // 2):
                pids.append(f"p{j}")
                labels.append(y)
        pids += ["", "", "", "p0", "p7"]
        labels += [1.0, 0.0, 1.0, np.nan, np.nan]
        n = len(pids)
        self.patient_ids = np.array(pids)
        self.labels = np.array(labels, np.float32)
        self.records = np.array([f"fake/r{i:03d}" for i in range(n)])
        t = np.arange(ecgcl_jax.NUM_SAMPLES) / ecgcl_jax.SAMPLE_RATE
        amp = 0.2 + 0.8 * np.nan_to_num(self.labels)
        x = (
            rng.normal(0, 0.1, (n, ecgcl_jax.NUM_SAMPLES, 12))
            + amp[:, None, None] * np.sin(2 * np.pi * 1.2 * t)[None, :, None]
        )
        self.scales = np.full(n, 0.005, np.float32)
        self.raw = np.round(x / 0.005).astype(np.int16)
        self.manifest = {"identity": "fake-0"}
        self.label_column = "label"

    def __len__(self):
        return len(self.labels)


def export_tiny_encoder(path, patients, records=(), max_amp: float = 1.0, seed: int = 0):
    """A tiny CNN encoder exported to `path` (its encoder.json records `patients`, `records`, `max_amp`)."""
    enc = models.build_encoder(TINY)
    variables = enc.init(
        {"params": jax.random.key(seed), "dropout": jax.random.key(seed)},
        np.zeros((2, ecgcl_jax.NUM_SAMPLES, 12), np.float32),
        train=False,
    )
    prep = {
        "sample_rate": 500,
        "num_samples": 5000,
        "leads": list(ecgcl_jax.LEADS),
        "max_amp": max_amp,
        "domain": "time",
        "mode": "simclr",
        "input_length": 5000,
        "in_leads": 12,
    }
    checkpoint.export_encoder(
        str(path), ml_collections.ConfigDict(TINY), dict(variables), prep, patients, list(records)
    )
    return str(path)


def eval_config(encoder_dir="", **kw):
    c = eval_cfg.get_config()
    c.encoder_checkpoint = encoder_dir
    c.repeats = 2
    c.finetune.num_epochs = 2
    c.finetune.batch_size = 16
    return override(c, **kw)


@pytest.fixture(scope="module")
def ds():
    return FakeDataset()


@pytest.fixture(scope="module")
def clean_encoder(tmp_path_factory):
    """An exported encoder whose pretraining patients are none of the fake dataset's."""
    return export_tiny_encoder(tmp_path_factory.mktemp("enc") / "encoder", ["other1", "other2"])


def test_seeds():
    c = eval_config()
    assert evaluate.resolve_seeds(c) == [321, 123]
    c.repeats = 3
    assert evaluate.resolve_seeds(c) == [321, 123, 51]
    c.repeats = 6
    six = evaluate.resolve_seeds(c)
    assert six[:3] == [321, 123, 51] and len(set(six)) == 6
    assert evaluate.resolve_seeds(c) == six  # deterministic
    c.repeats = 4
    assert evaluate.resolve_seeds(c) == six[:4]  # more repeats extend, never reshuffle
    c.repeats = 0
    with pytest.raises(UserError, match="config.repeats"):
        evaluate.resolve_seeds(c)


def test_leakage_refused_unless_allowed(tmp_path, ds):
    keys = splits.patient_keys(ds.patient_ids, ds.records)
    leaky = export_tiny_encoder(tmp_path / "leaky", sorted(set(keys.tolist())))  # saw every patient
    with pytest.raises(splits.LeakageError, match="allow_leakage"):
        evaluate.run(
            eval_config(leaky, repeats=1, **{"finetune.num_epochs": 1}),
            str(tmp_path / "w1"),
            dataset=ds,
        )
    assert not os.path.exists(tmp_path / "w1" / "results.json")
    res = evaluate.run(
        eval_config(leaky, repeats=1, allow_leakage=True, **{"finetune.num_epochs": 1}),
        str(tmp_path / "w2"),
        dataset=ds,
    )
    split = splits.make_split(ds.patient_ids, ds.labels, ds.records, 321, label_fraction=1.0)
    n = len(split.val_patients) + len(split.test_patients)
    assert res["repeats"][0]["encoder"]["leaked_patients"] == n
    assert {k: res["repeats"][0]["encoder"][k] for k in ("encoder", "mode", "domain")} == {
        "encoder": "cnn",
        "mode": "simclr",
        "domain": "time",
    }  # what was loaded, not config.pretrain
    with open(tmp_path / "w2" / "results.md") as f:
        assert (
            f"**Leakage allowed** (config.allow_leakage): the loaded encoder was pretrained on validation/test "
            f"patients (seed 321: {n})" in f.read()
        )


def test_seed_and_pretraining_field_errors_name_the_evaluation_fields(tmp_path, ds):
    for seeds, needle in (
        ((-5,), r"config.seeds: each must be in \[0, 2\*\*32\) \(got -5\)"),
        ((2**32,), r"\(got 4294967296\)"),
    ):
        with pytest.raises(UserError, match=needle):
            evaluate.run(eval_config(seeds=seeds, repeats=1), str(tmp_path / "w"), dataset=ds)
    with pytest.raises(UserError, match=r"^config.pretrain.temperature: must be positive"):
        evaluate.run(eval_config(**{"pretrain.temperature": 0.0}), str(tmp_path / "w"), dataset=ds)
    with pytest.raises(UserError, match=r"^config.pretrain.model.encoder: unknown encoder"):
        evaluate.run(
            eval_config(**{"pretrain.model.encoder": "resnet"}), str(tmp_path / "w"), dataset=ds
        )


def test_leakage_by_recording_under_other_patient_ids(tmp_path, ds):
    # the same recordings prepared into another dataset, where patients had other ids (or none): the encoder's
    # recorded patients are all foreign, its recorded records are not
    split = splits.make_split(ds.patient_ids, ds.labels, ds.records, 321, label_fraction=1.0)
    seen = [ds.records[split.test[0]], ds.records[split.val[0]], ds.records[split.pretrain[0]]]
    enc = export_tiny_encoder(tmp_path / "enc", ["elsewhere_1", "elsewhere_2"], seen)
    with pytest.raises(splits.LeakageError, match="2 validation/test patient"):
        evaluate.run(
            eval_config(enc, repeats=1, **{"finetune.num_epochs": 1}),
            str(tmp_path / "w"),
            dataset=ds,
        )


def _kill_second_repeat(monkeypatch):
    """Deliver a real SIGTERM as the second repeat starts (it lands before that repeat does any work; a SIGTERM
    inside a repeat's pretraining: test_sigterm_during_a_repeats_pretraining_resumes_it_to_identical_results)."""
    real = evaluate.run_repeat
    calls = []

    def wrapped(config, ds, seed, *a, **k):
        calls.append(seed)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(config, ds, seed, *a, **k)

    monkeypatch.setattr(evaluate, "run_repeat", wrapped)
    return calls


def test_reproducible_and_resume_after_kill(tmp_path, ds, clean_encoder, monkeypatch):
    cfg = eval_config(clean_encoder)
    a = evaluate.run(cfg, str(tmp_path / "a"), dataset=ds)
    assert a["status"] == "done" and [r["seed"] for r in a["repeats"]] == [321, 123]
    # same seeds, fresh workdir: the same numbers
    b = evaluate.run(eval_config(clean_encoder), str(tmp_path / "b"), dataset=ds)
    assert (tmp_path / "a" / "results.json").read_text() == (
        tmp_path / "b" / "results.json"
    ).read_text()
    assert b["summary"] == a["summary"]
    # killed as the second repeat starts: the first one is kept, a re-run finishes with identical results.json
    calls = _kill_second_repeat(monkeypatch)
    stop = preemption.StopRequest(signals=True)  # as the command's entry point makes it
    c = evaluate.run(eval_config(clean_encoder), str(tmp_path / "c"), dataset=ds, stop=stop)
    assert c["status"] == "preempted" and len(c["repeats"]) == 1 and calls == [321, 123]
    assert not (tmp_path / "c" / "repeat_123" / "repeat.json").exists()
    # the files of the interrupted evaluation say so themselves
    assert json.loads((tmp_path / "c" / "results.json").read_text())["status"] == "preempted"
    assert (
        "**Incomplete**: 1 of the 2 repeats asked for have finished"
        in (tmp_path / "c" / "results.md").read_text()
    )
    monkeypatch.undo()
    c = evaluate.run(eval_config(clean_encoder), str(tmp_path / "c"), dataset=ds)
    assert c["status"] == "done"
    assert (tmp_path / "c" / "results.json").read_text() == (
        tmp_path / "a" / "results.json"
    ).read_text()
    assert "Incomplete" not in (tmp_path / "c" / "results.md").read_text()
    # another seed gives another split
    d = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert d["321"]["test"] != d["123"]["test"]
    # a workdir started by a version with the old split rule is refused: its repeats were split another way
    saved = json.loads((tmp_path / "a" / "eval_config.json").read_text())
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "eval_config.json").write_text(
        json.dumps({k: v for k, v in saved.items() if k != "split_rule"})
    )
    with pytest.raises(
        UserError, match="started by an older version, whose split rounded differently"
    ):
        evaluate.run(eval_config(clean_encoder), str(tmp_path / "old"), dataset=ds)
    # a changed fine-tuning config is refused on resume, naming the field
    with pytest.raises(UserError, match="finetune.num_epochs"):
        evaluate.run(
            eval_config(clean_encoder, **{"finetune.num_epochs": 3}),
            str(tmp_path / "a"),
            dataset=ds,
        )


def test_label_fraction_sweep(tmp_path, ds, clean_encoder):
    cfg = eval_config(
        clean_encoder,
        **{
            "finetune.num_epochs": 1,
            "sweep.field": "label_fraction",
            "sweep.choices": (0.5, 1.0),
            "baselines": ("random_init",),
        },
    )
    out = evaluate.run(cfg, str(tmp_path), dataset=ds)
    assert out["status"] == "done" and out["values"] == [0.5, 1.0]
    for v in ("0.5", "1.0"):
        res = json.loads((tmp_path / f"label_fraction={v}" / "results.json").read_text())
        assert set(res["baselines"]) == {"random_init"}
    half = json.loads((tmp_path / "label_fraction=0.5" / "splits.json").read_text())["321"]
    full = json.loads((tmp_path / "label_fraction=1.0" / "splits.json").read_text())["321"]
    assert set(half["finetune"]) < set(full["finetune"]) and half["test"] == full["test"]
    for name in ("sweep.md", "sweep.csv", "sweep_auroc.png", "label_efficiency_auroc.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * len(METRIC_KEYS)  # header + values x methods x metrics
    again = evaluate.run(cfg, str(tmp_path), dataset=ds)  # resumable: everything is already done
    assert again["rows"] == out["rows"]


def test_sigterm_during_a_repeats_pretraining_resumes_it_to_identical_results(
    tmp_path, monkeypatch
):
    """A SIGTERM that lands inside a repeat's pretraining (not between repeats): the pretraining checkpoints and
    stops, the evaluation reports itself preempted, and the same command resumes that pretraining from its
    checkpoint and ends with the results.json of an uninterrupted run."""

    over = {
        "repeats": 1,
        "finetune.num_epochs": 1,
        "baselines": ("random_init",),
        "data.label": "normal",
        "pretrain.num_steps": 4,
        "pretrain.checkpoint_every": 2,
        "pretrain.log_every": 1,
        "pretrain.batch_size": 8,
        "pretrain.model.encoder": "cnn",
        "pretrain.model.emb_dim": 16,
        "pretrain.model.channels": (4, 4, 4, 4, 4),
        "pretrain.augment.view1": "gaussian_noise:0.05",
        "pretrain.augment.view2": "dropout:0.1",
    }
    a = evaluate.run(eval_config(**over), str(tmp_path / "a"))
    assert a["status"] == "done"
    real, checks = pretrain._stop_requested, []

    def stop_after_step_2(preempt, sync_point):
        checks.append(sync_point)
        if len(checks) == 2:  # the check after the second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(preempt, sync_point)

    monkeypatch.setattr(pretrain, "_stop_requested", stop_after_step_2)
    stop = preemption.StopRequest(signals=True)
    b = evaluate.run(eval_config(**over), str(tmp_path / "b"), stop=stop)
    monkeypatch.undo()
    assert b["status"] == "preempted" and not b["repeats"]
    ckpts = tmp_path / "b" / "repeat_321" / "pretrain" / "checkpoints"
    assert (
        sorted(os.listdir(ckpts)) == ["2"]
        and not (tmp_path / "b" / "repeat_321" / "repeat.json").exists()
    )
    b = evaluate.run(eval_config(**over), str(tmp_path / "b"))
    assert b["status"] == "done"
    metrics_b = (
        (tmp_path / "b" / "repeat_321" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    )
    assert [json.loads(l)["step"] for l in metrics_b] == [
        1,
        2,
        3,
        4,
    ]  # resumed at step 2, not started again
    assert (tmp_path / "b" / "results.json").read_text() == (
        tmp_path / "a" / "results.json"
    ).read_text()


def test_damaged_exported_encoder_is_one_line_error(tmp_path):
    good = export_tiny_encoder(tmp_path / "enc", ["p"])
    enc = checkpoint.load_encoder(good)
    assert enc.model_config.emb_dim == TINY["emb_dim"]
    n_params = sum(int(np.size(v)) for v in jax.tree.leaves(enc.variables["params"]))
    assert repr(enc) == (
        f"ExportedEncoder(encoder='cnn', emb_dim={TINY['emb_dim']}, mode='simclr', "
        f"params={n_params:,}, pretrain_patients=1, pretrain_records=0, steps=None)"
    )
    meta_path = os.path.join(good, "encoder.json")
    meta = json.loads(open(meta_path).read())
    # a model config that is not the one the weights were trained with
    json.dump(
        dict(meta, model_config=dict(meta["model_config"], emb_dim=TINY["emb_dim"] + 1)),
        open(meta_path, "w"),
    )
    with pytest.raises(
        UserError, match=r"variables.msgpack does not fit the model config in encoder.json"
    ):
        checkpoint.load_encoder(good)
    json.dump({k: v for k, v in meta.items() if k != "model_config"}, open(meta_path, "w"))
    with pytest.raises(
        UserError, match=r"encoder.json: not an exported encoder's metadata \(no model_config\)"
    ):
        checkpoint.load_encoder(good)


def test_split_fractions_follow_the_mode_however_it_is_set():
    simclr, clocs = splits.FRACTIONS, splits.CLOCS_FRACTIONS
    # the reference's 70/30 and the CLOCS 60/20/20
    assert (simclr, clocs) == (
        (0.7, 0.15, 0.15),
        (0.6, 0.2, 0.2),
    )

    def fractions(c, exported=None):
        r = evaluate.resolve_split(c, exported)
        return r.split.train, r.split.val, r.split.test

    c = eval_cfg.get_config()
    assert fractions(c) == simclr
    c.pretrain.mode = "cmsc"  # as --config.pretrain.mode=cmsc on the command line
    assert fractions(c) == clocs
    assert c.split.train is None  # the caller's config is left as it was
    assert fractions(eval_cfg.get_config("clocs_cmlc")) == clocs
    c.split.val, c.split.test, c.split.train = 0.25, 0.25, 0.5  # set by the user: kept
    assert fractions(c) == (0.5, 0.25, 0.25)
    half = eval_cfg.get_config()
    # alone: the defaults of the other two do not fit with it, and the error says why
    half.split.train = 0.8
    with pytest.raises(
        UserError, match=r"set train, val and test together; the unset val, test took the defaults"
    ):
        fractions(half)
    # a loaded encoder's own mode decides, not the unused pretraining section's
    exported = types.SimpleNamespace(preprocessing={"mode": "cmsmlc"})
    assert fractions(eval_cfg.get_config(), exported) == clocs


def _done_result():
    """What evaluate.run returns for a finished evaluation, with every summary figure made up: for sweep tests
    that stub run() and look only at what each variant was given."""
    one = (
        {k: 0.5 for k in ("mean", "min", "max")}
        | {k: 0.0 for k in ("ci95", "ci95_normal", "sd")}
        | {"n": 1}
    )
    return {"status": "done", "baselines": {}, "summary": {m: dict(one) for m in METRIC_KEYS}}


def test_sweep_over_the_mode_scores_every_variant_on_one_split(tmp_path, ds, monkeypatch):
    seen = []

    def fake_run(variant, workdir, dataset=None, pretrain_root=None, plan=None, stop=None):
        sp = evaluate.resolve_split(variant).split
        seen.append((variant.pretrain.mode, {k: sp[k] for k in ("train", "val", "test")}))
        return _done_result()

    monkeypatch.setattr(evaluate, "run", fake_run)
    cfg = eval_config(**{"sweep.field": "pretrain.mode", "sweep.choices": ("simclr", "cmsc")})
    evaluate.run_sweep(cfg, str(tmp_path / "sweep"), dataset=ds)
    assert [m for m, _ in seen] == ["simclr", "cmsc"]
    assert seen[0][1] == seen[1][1] == {"train": 0.7, "val": 0.15, "test": 0.15}


def test_sweep_over_the_data_path_opens_each_variants_data(
    tmp_path, ds, clean_encoder, monkeypatch
):
    # every variant used to get the base config's opened dataset, so a swept data.path was never read
    seen = []

    def fake_run(variant, workdir, dataset=None, pretrain_root=None, plan=None, stop=None):
        seen.append((variant.data.path, variant.pretrain.data.path, plan.ds))
        return _done_result()

    monkeypatch.setattr(evaluate, "run", fake_run)

    # a real dataset: every variant is checked first
    shutil.copytree(default_data_path(), tmp_path / "other")
    cfg = eval_config(
        clean_encoder,
        **{"sweep.field": "data.path", "sweep.choices": ("", str(tmp_path / "other"))},
    )
    out = evaluate.run_sweep(cfg, str(tmp_path / "sweep"), dataset=ds)
    assert out["status"] == "done"
    assert [(a, b) for a, b, _ in seen] == [("", ""), (str(tmp_path / "other"),) * 2]
    # the base data for the base path; the other variant opened its own (once, in the sweep's checks)
    assert seen[0][2] is ds and seen[1][2] is not ds and len(seen[1][2]) == 52


def test_each_seeds_split_is_made_once(tmp_path, ds, clean_encoder, monkeypatch):
    # checked up front by plan_evaluation, then used by the repeats (it was made again per repeat)
    made = []
    real = splits.split_dataset
    monkeypatch.setattr(
        splits,
        "split_dataset",
        lambda d, seed, *a, **k: made.append(seed) or real(d, seed, *a, **k),
    )
    out = evaluate.run(
        eval_config(clean_encoder, **{"finetune.num_epochs": 1}), str(tmp_path / "w"), dataset=ds
    )
    assert out["status"] == "done" and made == [321, 123]


def test_sweep_checks_every_variant_before_running_any(tmp_path, ds, clean_encoder, monkeypatch):
    ran = []
    monkeypatch.setattr(
        evaluate,
        "run",
        lambda variant, workdir, dataset=None, pretrain_root=None, plan=None, stop=None: (
            ran.append(workdir) or _done_result()
        ),
    )
    bad = eval_config(
        clean_encoder, **{"sweep.field": "label_fraction", "sweep.choices": (0.5, 1.5, 1.0)}
    )
    with pytest.raises(
        UserError, match=r"^sweep label_fraction = 1.5: config.label_fraction: must be in"
    ):
        evaluate.run_sweep(bad, str(tmp_path / "a"), dataset=ds)
    assert ran == []  # not after the first variant's hours
    # with a loaded encoder, a pretraining field would give the same variant every time
    same = eval_config(
        clean_encoder,
        **{"sweep.field": "pretrain.model.encoder", "sweep.choices": ("cnn", "cnn_transformer")},
    )
    with pytest.raises(UserError, match="changes pretraining, but config.encoder_checkpoint loads"):
        evaluate.run_sweep(same, str(tmp_path / "b"), dataset=ds)
    # folder names: a long value is cut and hashed; two values that clean to one name get two folders
    long_a = "x" * 150
    names = [evaluate.variant_name("finetune.aggregate", v) for v in (long_a, long_a + "y")]
    assert all(len(n) <= 100 for n in names) and names[0] != names[1]
    monkeypatch.setattr(evaluate, "plan_evaluation", lambda variant, dataset=None: None)
    evaluate.run_sweep(
        eval_config(
            clean_encoder, **{"sweep.field": "finetune.aggregate", "sweep.choices": ("a/b", "a_b")}
        ),
        str(tmp_path / "c"),
        dataset=ds,
    )
    assert (
        len(set(ran)) == 2
        and os.path.basename(ran[0]) == "aggregate=a_b"
        and ran[1].startswith(ran[0] + "-")
    )


def _check_method(block, seeds):
    assert [r["seed"] for r in block["repeats"]] == seeds
    for r in block["repeats"]:
        assert (
            set(r["test"]) >= METRIC_KEYS and 1 <= r["best_epoch"] <= 2 and len(r["history"]) == 2
        )
    assert set(block["summary"]) >= METRIC_KEYS
    for m, s in block["summary"].items():
        vals = [r["test"][m] for r in block["repeats"]]
        assert SUMMARY_KEYS <= set(s)
        assert (
            s["mean"] == pytest.approx(np.mean(vals))
            and s["min"] == min(vals)
            and s["max"] == max(vals)
        )
        # K = 2: t_{0.975, 1} = 12.7062047 (t table); sd = |a - b| / sqrt(2)
        sd = abs(vals[0] - vals[1]) / math.sqrt(2)
        assert s["ci95"] == pytest.approx(12.7062047 * sd / math.sqrt(2), rel=1e-7, abs=1e-12)
        assert s["ci95_normal"] == pytest.approx(1.96 * sd / math.sqrt(2), abs=1e-9)


def test_run_eval_cli_end_to_end(tmp_path):
    """run_eval.py with pretraining per repeat on the embedded PTB-XL sample, tiny settings."""
    wd = tmp_path / "eval"
    p = run_eval_cli(
        wd,
        "--config.repeats=2",
        *TINY_PRETRAIN_FLAGS,
        "--config.finetune.num_epochs=2",
        "--config.finetune.batch_size=16",
        "--config.pretrain.augment.view1=none",
        "--config.pretrain.augment.view2=none",
        "--config.data.label=normal",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for name in (
        "results.json",
        "splits.json",
        "results.md",
        "results.csv",
        "plots/val_auroc.png",
        "plots/roc_test.png",
        "repeat_321/test_predictions.csv",
    ):
        assert (wd / name).stat().st_size > 0, name
    res = json.loads((wd / "results.json").read_text())
    seeds = [321, 123]
    _check_method(res, seeds)
    assert set(res["baselines"]) >= {"linear_probe", "random_init"}
    for b in res["baselines"].values():
        _check_method(b, seeds)
    # the shared data section reached the nested pretraining config
    pcfg = json.loads((wd / "repeat_321" / "pretrain" / "config.json").read_text())
    assert pcfg["data"]["label"] == "normal" and pcfg["seed"] == 321
    # splits.json: disjoint patients, pool without val/test, one ECG per val/test patient
    sp = json.loads((wd / "splits.json").read_text())
    assert sorted(sp) == ["123", "321"]
    for s in sp.values():
        tr, va, te, pool = (set(s[k]) for k in ("train", "val", "test", "pretrain"))
        assert not (tr & va) and not (tr & te) and not (va & te) and not (pool & (va | te))
        assert len(s["records"]["val"]) == len(va) and len(s["records"]["test"]) == len(te)
        enc = checkpoint.load_encoder(
            str(wd / f"repeat_{seeds[0] if s is sp['321'] else seeds[1]}" / "pretrain" / "encoder")
        )
        assert not set(enc.pretrain_patients) & (va | te)
    assert "± " in (wd / "results.md").read_text()
    # which data and label the table is about
    assert (
        f"Data: {os.path.join(os.path.dirname(ecgcl_jax.__file__), 'default_data')} (52 records, label column "
        "'normal')."
    ) in (wd / "results.md").read_text()
    assert (
        res["protocol"]["dataset"]["records"] == 52
        and res["protocol"]["dataset"]["label"] == "normal"
    )
    # every test ECG has a prediction, and the reported test AUROC is that of the saved predictions

    for i, seed in enumerate(seeds):
        with open(wd / f"repeat_{seed}" / "test_predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["record"] for r in rows] == sp[str(seed)]["records"]["test"]
        y = [int(r["label"]) for r in rows]
        assert res["repeats"][i]["test"]["auroc"] == pytest.approx(
            roc_auc_score(y, [float(r["p_finetune"]) for r in rows]), abs=1e-12
        )
        assert res["baselines"]["random_init"]["repeats"][i]["test"]["auroc"] == pytest.approx(
            roc_auc_score(y, [float(r["p_random_init"]) for r in rows]), abs=1e-12
        )
    # a config error is one line on stderr, exit status 2
    p = run_eval_cli(wd, "--config.split.train=0.9", timeout=300)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "config.split" in p.stderr


def test_embed_matches_encoder_and_cli(tmp_path, ds, clean_encoder, capsys):
    # the WORKDIR that holds encoder/ works too
    enc = embed.load_encoder(os.path.dirname(clean_encoder))
    rows = np.array([5, 0, 3])
    z = embed.embed_dataset(enc, ds, rows=rows, batch_size=2)
    # independent path: NumPy normalisation with the encoder's max_amp, then the encoder module directly
    x = ds.raw[rows].astype(np.float64) * ds.scales[rows, None, None] / enc.preprocessing["max_amp"]
    x = x - x.mean(axis=1, keepdims=True)
    want, _ = models.build_encoder(enc.model_config).apply(
        enc.variables, np.float32(x), train=False
    )
    np.testing.assert_allclose(z, np.asarray(want), rtol=1e-4, atol=1e-5)
    assert z.shape == (3, TINY["emb_dim"])
    # the command on the embedded dataset: one row per record, with a records table
    out = tmp_path / "emb.npy"
    assert commands.embed_main(["--encoder", clean_encoder, "--out", str(out)], EMBED_PROG) == 0

    n = len(data.open_dataset(""))
    assert np.load(out).shape == (n, TINY["emb_dim"])
    assert len((tmp_path / "emb.records.csv").read_text().splitlines()) == n + 1
    # an output path that cannot be written: one line with the path and the reason, exit code 2
    (tmp_path / "a_file").write_text("")
    assert (
        commands.embed_main(
            ["--encoder", clean_encoder, "--out", str(tmp_path / "a_file" / "e.npy")], EMBED_PROG
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"{EMBED_PROG}: error: {tmp_path / 'a_file'}: File exists"
    # a dataset in another format is refused with one line
    short = FakeDataset()
    short.raw = short.raw[:, :2500]
    with pytest.raises(UserError, match="2500 samples"):
        embed.embed_dataset(enc, short)


def test_sweep_over_field_pairs(tmp_path, ds, clean_encoder):
    """Several fields at once (e.g. augmentation pairs): every choice is a tuple with one value per field."""
    cfg = eval_config(
        clean_encoder,
        **{
            "sweep.field": "finetune.num_epochs,label_fraction",
            "sweep.choices": ((1, 0.5), (2, 1.0)),
            "baselines": (),
        },
    )
    out = evaluate.run(cfg, str(tmp_path), dataset=ds)
    assert out["status"] == "done"
    a = json.loads((tmp_path / "num_epochs=1+label_fraction=0.5" / "results.json").read_text())
    b = json.loads((tmp_path / "num_epochs=2+label_fraction=1.0" / "results.json").read_text())
    assert a["config"]["finetune"]["num_epochs"] == 1 and a["config"]["label_fraction"] == 0.5
    assert len(a["repeats"][0]["history"]) == 1 and len(b["repeats"][0]["history"]) == 2
    assert a["baselines"] == {} and "1, 0.5" in (tmp_path / "sweep.md").read_text()
    bad = eval_config(
        clean_encoder,
        **{"sweep.field": "finetune.num_epochs,label_fraction", "sweep.choices": (1, 2)},
    )
    with pytest.raises(UserError, match="tuple of 2 values"):
        evaluate.run(bad, str(tmp_path / "bad"), dataset=ds)


def test_one_writer_per_workdir(tmp_path, ds, clean_encoder):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(UserError, match="in use"):
            evaluate.run(eval_config(clean_encoder), str(tmp_path), dataset=ds)


_SHARD_CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from ecgcl_jax import evaluate
from tests.test_evaluate import FakeDataset, eval_config

def claimed_then_killed(v, seed, *progress):
    open({marker!r}, "w").close()  # the unit's lock is held: this shard is killed in the middle of it
    time.sleep(600)

evaluate._run_unit = claimed_then_killed
cfg = eval_config({enc!r}, **{{"finetune.num_epochs": 1, "baselines": ()}})
evaluate.run(cfg, {wd!r}, dataset=FakeDataset(), shard="0/2")
"""


def test_shards_share_a_workdir_and_a_killed_shards_unit_reruns(tmp_path, ds, clean_encoder):
    """Shard 0/2 (a subprocess) claims its unit and is killed in the middle of it, while shard 1/2 runs beside it
    in the same workdir; a second shard 0/2 leaves the claimed unit alone; after the kill the same command runs
    it and, being the last, writes the reports: the results of one unsharded run, byte for byte."""
    cfg = eval_config(clean_encoder, **{"finetune.num_epochs": 1, "baselines": ()})
    wd, marker = tmp_path / "sharded", tmp_path / "claimed"
    script = _SHARD_CHILD.format(root=ROOT, marker=str(marker), enc=clean_encoder, wd=str(wd))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert child.poll() is None and time.time() < deadline, "the shard did not start"
            time.sleep(0.2)
        # side by side with the live shard 0/2: shard 1/2 runs its unit; nobody writes reports yet
        out = evaluate.run(cfg, str(wd), dataset=ds, shard="1/2")
        assert out == {"status": "incomplete", "units_done": 1, "units": 2}
        assert (wd / "repeat_123" / "repeat.json").exists()
        # a second shard 0/2: its unit is claimed by the live one, so it is left alone
        assert evaluate.run(cfg, str(wd), dataset=ds, shard="0/2")["units_done"] == 1
        assert (
            not (wd / "repeat_321" / "repeat.json").exists() and not (wd / "results.json").exists()
        )
    finally:
        child.kill()
        child.wait()
    # the killed shard's unit: run by the next command, which finds every unit done and writes the reports
    res = evaluate.run(cfg, str(wd), dataset=ds, shard="0/2")
    assert res["status"] == "done" and [r["seed"] for r in res["repeats"]] == [321, 123]
    evaluate.run(cfg, str(tmp_path / "one"), dataset=ds)
    for name in ("results.json", "splits.json", "results.csv"):
        assert (wd / name).read_text() == (tmp_path / "one" / name).read_text(), name
    with pytest.raises(UserError, match=r"--shard: i/n needs n >= 1 and 0 <= i < n"):
        evaluate.run(cfg, str(wd), dataset=ds, shard="2/2")


class FoldDataset(FakeDataset):
    """FakeDataset with a meta table: strat_fold per patient (1-10), two records without a fold."""

    def __init__(self):
        super().__init__()

        keys = splits.patient_keys(self.patient_ids, self.records)
        fold = [str(1 + sum(map(ord, k)) % 10) for k in keys]
        fold[0] = fold[-1] = ""
        self.meta = pd.DataFrame({"record": self.records, "strat_fold": fold})
        self.path = "fake"


FOLDS = {
    "split.rule": "folds",
    "split.train_folds": (1, 2, 3, 6, 7, 8),
    "split.val_folds": (9, 4),
    "split.test_folds": (10, 5),
}


def test_fold_rule_in_the_evaluation(tmp_path, clean_encoder):
    fds = FoldDataset()
    cfg = eval_config(clean_encoder, **FOLDS)
    p = evaluate.plan_evaluation(cfg, fds)
    fold = fds.meta["strat_fold"].to_numpy()
    known = ~np.isnan(fds.labels)
    sets = {"train": set("123678"), "val": {"9", "4"}, "test": {"10", "5"}}
    for seed in p.seeds:  # every repeat: exactly the labeled records of the fold column's folds
        for name, fs in sets.items():
            want = [i for i in range(len(fold)) if known[i] and fold[i] in fs]
            assert getattr(p.splits[seed], name).tolist() == want, name
        assert p.splits[seed].to_json()["folds"]["records_without_fold"] == 2
    with pytest.raises(UserError, match="config.split.fold_column: no column 'fold'"):
        evaluate.plan_evaluation(override(cfg, **{"split.fold_column": "fold"}), fds)
    with pytest.raises(UserError, match="config.split.rule: 'kfold'"):
        evaluate.plan_evaluation(override(cfg, **{"split.rule": "kfold"}), fds)
    # a loaded encoder that saw a test-fold patient is refused, as with random splits
    leaky = export_tiny_encoder(tmp_path / "leaky", [p.splits[321].test_patients[0]])
    with pytest.raises(splits.LeakageError, match="allow_leakage"):
        evaluate.run(eval_config(leaky, **FOLDS), str(tmp_path / "w"), dataset=fds)


def test_eval_ptbxl_smoke_on_the_embedded_set(tmp_path, clean_encoder):
    """configs/eval_ptbxl.py at a smoke size on the embedded set (its superdiagnostic task and strat_fold)."""

    emb = data.open_dataset("")
    # 29 of the 52 embedded ECGs have a fold; fold 10 alone is all NORM, so the smoke size regroups the folds
    cfg = override(
        eval_ptbxl.get_config(),
        encoder_checkpoint=clean_encoder,
        repeats=1,
        baselines=("linear_probe",),
        **{
            "finetune.num_epochs": 1,
            "finetune.batch_size": 16,
            "split.train_folds": (2, 3, 4, 5, 6),
            "split.val_folds": (7, 9),
            "split.test_folds": (8, 10),
        },
    )
    res = evaluate.run(cfg, str(tmp_path / "ptbxl"), dataset=emb)
    assert res["status"] == "done" and res["protocol"]["split"]["rule"] == "folds"


def test_multilabel_task_results_per_class_bootstrap_and_paired_difference(
    tmp_path, ds, clean_encoder, monkeypatch
):
    """A 3-class task (the label, its complement with unknowns, a class absent from every split): macro figures
    over the classes with both values, a per-class table, bootstrap intervals, the paired difference."""
    y = np.nan_to_num(ds.labels, nan=0.0)
    task = np.stack([ds.labels, 1 - y, np.zeros_like(y)], axis=1).astype(np.float32)
    task[::4, 1] = np.nan
    monkeypatch.setattr(evaluate, "task_labels", lambda config, d: (task, ["pos", "neg", "none"]))
    cfg = eval_config(
        clean_encoder,
        **{"finetune.num_epochs": 1, "baselines": ("random_init",), "bootstrap.resamples": 50},
    )
    evaluate.run(cfg, str(tmp_path), dataset=ds)
    res = json.loads((tmp_path / "results.json").read_text())  # the file's contract: NaN is null
    assert res["protocol"]["classes"] == ["pos", "neg", "none"]
    for block in (res, res["baselines"]["random_init"]):
        assert set(block["summary"]) == {"macro_auroc", "micro_auroc", "macro_auprc"}
        for r in block["repeats"]:
            t = r["test"]
            assert t["classes_used"] == 2 and t["per_class"]["none"]["auroc"] is None
            assert t["macro_auroc"] == pytest.approx(
                (t["per_class"]["pos"]["auroc"] + t["per_class"]["neg"]["auroc"]) / 2
            )
            b = r["bootstrap"]
            assert b["resamples"] == 50 and 0 <= b["low"] <= b["high"] <= 1
        assert set(block["per_class"]) == {"pos", "neg", "none"}
        assert block["per_class"]["none"]["auroc"]["n"] == 0
    paired = res["paired"]["finetune - random_init"]
    diffs = [
        a["test"]["macro_auroc"] - b["test"]["macro_auroc"]
        for a, b in zip(res["repeats"], res["baselines"]["random_init"]["repeats"])
    ]
    assert [r["difference"] for r in paired["repeats"]] == pytest.approx(diffs)
    assert paired["summary"]["mean"] == pytest.approx(np.mean(diffs))
    assert paired["summary"]["ci95"] == pytest.approx(
        12.7062047 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2), rel=1e-6
    )
    assert all(
        -1 <= r["bootstrap"]["low"] <= r["bootstrap"]["high"] <= 1 for r in paired["repeats"]
    )
    md = (tmp_path / "results.md").read_text()
    for text in (
        "| method | K | macro_auroc | micro_auroc | macro_auprc | classes |",
        "## Test AUROC per class",
        "| neg |",
        "bootstrap interval",
        "## Does pretraining help?",
    ):
        assert text in md
    csv_text = (tmp_path / "results.csv").read_text()
    assert (
        "finetune,auroc[neg]," in csv_text
        and "finetune - random_init,macro_auroc difference," in csv_text
    )
    with open(tmp_path / "repeat_321" / "test_predictions.csv") as f:
        header = f.readline().strip().split(",")
    assert header[:5] == ["record", "patient", "label:pos", "label:neg", "label:none"]
    assert "p_random_init:none" in header
