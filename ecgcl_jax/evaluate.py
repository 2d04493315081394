"""The K-repeat evaluation protocol, its baselines, and sweeps (`run_eval.py`).

Per repeat (seed s; default seeds 321, 123, 51, further ones drawn deterministically):
  1. split the labeled patients (splits.py): stratified train/val/test, one ECG per val/test patient;
  2. pretraining pool = every record of every patient not in val/test (checked, raises otherwise);
     pretrain on it with the nested `config.pretrain` (seed s) in WORKDIR/repeat_s/pretrain, or load
     `config.encoder_checkpoint` and refuse if its pretraining patients meet this repeat's val/test patients;
  3. normaliser (max_amp) fitted on the training split;
  4. methods on the same split, each trained `finetune.num_epochs` epochs, validation scored every epoch,
     the best-AUROC epoch kept and scored once on test:
       finetune                  pretrained encoder + head, trained end to end (the reference protocol)
       linear_probe              frozen pretrained encoder (eval mode) + Dense(1)
       random_init               the same architecture from a random init, trained end to end
       random_init_linear_probe  frozen random-init encoder + Dense(1)
  5. the repeat is recorded in WORKDIR/repeat_s/repeat.json as soon as it finishes; a re-run skips it.

Outputs: results.json, splits.json, results.md, results.csv, plots/val_auroc.png, plots/roc_test.png,
repeat_s/test_predictions.csv. With `config.sweep.field` set, `run` runs the protocol once per value into
WORKDIR/<field>=<value>/ and writes sweep.md, sweep.csv and sweep_<metric>.png.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import signal
import time
import typing
from typing import Any

import jax
import ml_collections
import numpy as np

from ecgcl_jax import (
    checkpoint,
    cli,
    configdiff,
    embed,
    finetune,
    input_pipeline,
    metrics,
    monitor,
    splits,
)
from ecgcl_jax.errors import UserError
from ecgcl_jax.fileio import atomic_write

METHODS = ("finetune", "linear_probe", "random_init", "random_init_linear_probe")
BASELINES = METHODS[1:]
# Fields that may differ when an evaluation workdir is resumed (they cannot change a finished repeat).
RESUMABLE_CHANGES = (
    "repeats",
    "seeds",
    "allow_leakage",
    "sweep.field",
    "sweep.choices",
    "sweep.metric",
    "pretrain.log_every",
    "pretrain.checkpoint_every",
    "pretrain.keep_checkpoints",
    "pretrain.data.resident",
    "pretrain.data.prefetch",
    "data.resident",
    "data.prefetch",
    "pretrain.data.reader_threads",
    "data.reader_threads",
    # what the pretraining's own errors ask for: skip bad steps, start over from unrestorable ones
    "pretrain.on_nonfinite",
    "pretrain.restart_if_unrestorable",
)


class Interrupted(Exception):
    """SIGTERM/SIGINT during an evaluation; finished repeats are kept."""


# ------------------------------------------------------------------------------------------------ helpers
def resolve_seeds(config) -> list[int]:
    """The K = config.repeats seeds: config.seeds first, then seeds drawn from a fixed generator (the i-th
    extra seed depends only on i, so K = 5 extends K = 3 without changing its first repeats)."""
    k = int(config.repeats)
    if k < 1:
        raise UserError(f"config.repeats: must be >= 1 (got {k})")
    try:
        seeds = [int(s) for s in config.seeds][:k]
    except (TypeError, ValueError):
        raise UserError(
            f"config.seeds: must be a list of integers (got {config.seeds!r})"
        ) from None
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:  # jax keys hold 32 bits: 2**32 would repeat seed 0's randomness
        raise UserError(f"config.seeds: each must be in [0, 2**32) (got {bad[0]})")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"config.seeds: seeds must be distinct (got {list(config.seeds)})")
    i = 0
    while len(seeds) < k:
        s = int(np.random.default_rng([0xEC6C1, i]).integers(1, 2**31 - 1))
        i += 1
        if s not in seeds:
            seeds.append(s)
    return seeds


def _jsonable(x):
    """NaN/inf -> None, numpy scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _unjson(x):
    """Inverse of `_jsonable` for metric dicts: None -> NaN."""
    if isinstance(x, dict):
        return {k: _unjson(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    return math.nan if x is None else x


def write_json(path: str, obj) -> None:
    """Atomic, strict JSON (no NaN)."""
    atomic_write(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False).encode())


def _config_json(config) -> dict:
    return json.loads(config.to_json())


def check_resume(saved: dict, current: dict, path: str) -> None:
    """Refuses a resume whose config differs in a field that changes results (lists them)."""
    detail = configdiff.changed_fields(saved, current, RESUMABLE_CHANGES)
    if detail:
        raise UserError(
            f"{path}: this evaluation workdir was started with another config; changed fields: "
            f"{detail} (use a new --workdir; only repeats, seeds, logging, I/O and "
            "pretrain.on_nonfinite/restart_if_unrestorable may change)"
        )


def _interruptible():
    """SIGTERM/SIGINT raise `Interrupted` at the next Python bytecode (finished repeats are on disk)."""

    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    return cli.on_stop_signals(handler)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def resolve_split(config, exported=None):
    """The config with its unset split fractions (None) chosen: splits.CLOCS_FRACTIONS when the pretraining mode,
    or the loaded encoder's, is a CLOCS mode, else splits.FRACTIONS. A copy when anything is filled in."""
    names = ("train", "val", "test")
    unset = [n for n in names if config.split[n] is None]
    if not unset:
        return config
    mode = (
        exported.preprocessing.get("mode", "simclr")
        if exported is not None
        else config.pretrain.mode
    )
    preset = splits.FRACTIONS if mode == "simclr" else splits.CLOCS_FRACTIONS
    config = copy.deepcopy(config)
    for name, value in zip(names, preset):
        if config.split[name] is None:
            config.split[name] = value
    if len(unset) < 3 and abs(sum(config.split[n] for n in names) - 1.0) > 1e-6:
        raise UserError(
            f"config.split: set train, val and test together; the unset {', '.join(unset)} took the "
            f"defaults ({'/'.join(f'{v:g}' for v in preset)}) and the three do not sum to 1"
        )
    return config


def validate(config) -> None:
    """Checks of the evaluation fields (the nested pretraining config is checked by pretrain)."""
    splits.check_fractions(
        (config.split.train, config.split.val, config.split.test), "config.split"
    )
    if not 0.0 < float(config.label_fraction) <= 1.0:
        raise UserError(f"config.label_fraction: must be in (0, 1] (got {config.label_fraction})")
    ft = config.finetune
    for field in ("num_epochs", "batch_size"):
        if int(ft[field]) < 1:
            raise UserError(
                f"config.finetune.{field}: must be a positive integer (got {ft[field]})"
            )
    for field in ("learning_rate", "weight_decay"):
        if float(ft[field]) < 0 or (field == "learning_rate" and float(ft[field]) == 0):
            raise UserError(f"config.finetune.{field}: must be positive (got {ft[field]})")
    if not 0.0 <= float(ft.head_dropout) < 1.0:
        raise UserError(f"config.finetune.head_dropout: must be in [0, 1) (got {ft.head_dropout})")
    from ecgcl_jax import models  # noqa: PLC0415

    if ft.aggregate not in models.AGGREGATES:
        raise UserError(
            f"config.finetune.aggregate: {ft.aggregate!r} is not one of {', '.join(models.AGGREGATES)}"
        )
    bad = [b for b in config.baselines if b not in BASELINES]
    if bad:
        raise UserError(
            f"config.baselines: unknown baseline(s) {bad}; choose from {', '.join(BASELINES)}"
        )
    resolve_seeds(config)


# ------------------------------------------------------------------------------------------ the encoder
def _pretrained_encoder(
    config, ds, split: splits.Split, seed: int, pretrain_dir: str, exported, workdir: str
):
    """(ExportedEncoder, info dict) for this repeat, or (None, info) when pretraining was interrupted."""
    if exported is not None:
        # what was loaded, in the results: config.pretrain does not describe it
        loaded = {
            "encoder_checkpoint": config.encoder_checkpoint,
            "encoder": exported.model_config.get("encoder"),
            "emb_dim": exported.model_config.get("emb_dim"),
            "mode": exported.preprocessing.get("mode"),
            "domain": exported.preprocessing.get("domain"),
            "steps": exported.extra.get("steps"),
        }
        try:
            splits.check_encoder_pool(
                exported.pretrain_patients,
                exported.pretrain_records,
                split,
                splits.patient_keys(ds.patient_ids, ds.records),
                ds.records,
                where=f"config.encoder_checkpoint={config.encoder_checkpoint} (seed {seed})",
            )
        except splits.LeakageError as e:
            if not config.allow_leakage:
                raise splits.LeakageError(
                    f"{e}; its test scores would be optimistic. Pretrain with run_eval.py "
                    "(per repeat) or pass --config.allow_leakage=True to evaluate anyway"
                ) from None
            _log(f"warning: {e} (allowed by config.allow_leakage)")
            return exported, dict(loaded, leaked_patients=e.count)
        return exported, dict(loaded, leaked_patients=0)

    # Pretrain on this repeat's pool (splits.make_split checked it; a finished pretraining returns at once).
    from ecgcl_jax import pretrain  # noqa: PLC0415

    pcfg = copy.deepcopy(config.pretrain)
    pcfg.seed = int(seed)
    _log(
        f"seed {seed}: pretraining {pcfg.model.encoder} ({pcfg.mode}) for {pcfg.num_steps} steps on "
        f"{len(split.pretrain)} records in {pretrain_dir}"
    )
    result = pretrain.run(
        pcfg, pretrain_dir, dataset=ds, indices=split.pretrain, field_prefix="pretrain."
    )
    if result.get("status") != "done":
        return None, {"status": result.get("status")}
    enc = checkpoint.load_encoder(os.path.join(pretrain_dir, "encoder"))
    # Asserted on what the encoder itself recorded, not only by construction.
    splits.check_pool(
        enc.pretrain_patients,
        split.val_patients,
        split.test_patients,
        where=f"{pretrain_dir}/encoder (seed {seed})",
    )
    # relative to the evaluation workdir: results.json does not depend on where the workdir lives
    return enc, {
        "pretrain_dir": os.path.relpath(pretrain_dir, workdir),
        "pretrain_steps": enc.extra.get("steps"),
        "pretrain_records": len(enc.pretrain_records),
    }


# -------------------------------------------------------------------------------------------- one repeat
def _method_record(seed: int, out: dict) -> dict:
    return {
        "seed": int(seed),
        "test": out["test"],
        "val": out["val"],
        "best_epoch": out["best_epoch"],
        "history": out["history"],
    }


def repeat_split(config, ds, seed: int) -> splits.Split:
    """This seed's patient-level split; UserError when its validation or test split holds one class only."""
    split = splits.split_dataset(
        ds,
        seed,
        (config.split.train, config.split.val, config.split.test),
        float(config.label_fraction),
    )
    for name in ("val", "test"):
        ys = np.asarray(ds.labels)[getattr(split, name)]
        if len(np.unique(ys)) < 2:
            raise UserError(
                f"data labels: the {name} split of seed {seed} holds one class only ({len(ys)} ECGs); "
                "AUROC is undefined - more labeled patients are needed"
            )
    return split


def run_repeat(
    config,
    ds,
    seed: int,
    rep_dir: str,
    pretrain_dir: str,
    exported=None,
    split: splits.Split | None = None,
    progress: monitor.EvalProgress | None = None,
    repeat: str = "",
) -> dict | None:
    """One repeat of the protocol (see the module docstring); None if pretraining was interrupted. split: this
    seed's `repeat_split`, when already made; progress: reports each fine-tuning epoch (`repeat` names it)."""
    t0 = time.time()
    split = split if split is not None else repeat_split(config, ds, seed)
    enc, info = _pretrained_encoder(
        config, ds, split, seed, pretrain_dir, exported, os.path.dirname(rep_dir)
    )
    if enc is None:
        return None
    embed.check_compatible(enc, ds, where=f"encoder of seed {seed}")
    spec = finetune.InputSpec.from_preprocessing(enc.preprocessing)
    ft = config.finetune
    max_amp = input_pipeline.fit_max_amp(ds, split.train)
    train = finetune.RawSource(ds, split.finetune, max_amp)
    val = finetune.RawSource(ds, split.val, max_amp)
    test = finetune.RawSource(ds, split.test, max_amp)
    key = jax.random.PRNGKey(seed)
    length, leads = int(ds.raw.shape[1]), int(ds.raw.shape[2])
    trainer = finetune.classifier_trainer(enc.model_config, spec, ft)
    emb_dim = int(enc.model_config.emb_dim)
    epochs = int(ft.num_epochs)
    results: dict[str, dict] = {}
    probs: dict[str, np.ndarray] = {}

    def watch(method):
        return progress.on_epoch(repeat, seed, method, epochs) if progress is not None else None

    def record(method, out):
        results[method] = _method_record(seed, out)
        probs[method] = out["test_probs"]
        _log(
            f"seed {seed}: {method:<25s} test AUROC {out['test']['auroc']:.4f}  PR-AUC {out['test']['auprc']:.4f}"
            f"  (best epoch {out['best_epoch']}/{epochs})"
        )

    def linear_probe(method, enc_vars, k):
        feats = {
            name: finetune.embed_rows(
                enc.model_config,
                spec,
                enc_vars,
                ds,
                src.rows,
                max_amp,
                batch_size=int(ft.batch_size),
            )
            for name, src in (("train", train), ("val", val), ("test", test))
        }
        probe = finetune.probe_trainer(emb_dim, spec, ft)
        head_vars = probe.init_head(jax.random.fold_in(k, 0), feats["train"])
        fs = {
            n: finetune.FeatureSource(feats[n], s.labels)
            for n, s in (("train", train), ("val", val), ("test", test))
        }
        record(
            method,
            finetune.run_finetune(
                probe,
                dict(head_vars),
                fs["train"],
                fs["val"],
                fs["test"],
                epochs,
                jax.random.fold_in(k, 1),
                seed,
                watch(method),
            ),
        )

    pre_vars = finetune.classifier_variables(
        trainer.model, spec, jax.random.fold_in(key, 1), enc.variables, length, leads
    )
    record(
        "finetune",
        finetune.run_finetune(
            trainer,
            pre_vars,
            train,
            val,
            test,
            epochs,
            jax.random.fold_in(key, 2),
            seed,
            watch("finetune"),
        ),
    )
    if "linear_probe" in config.baselines:
        linear_probe("linear_probe", enc.variables, jax.random.fold_in(key, 3))
    if "random_init" in config.baselines or "random_init_linear_probe" in config.baselines:
        rand_vars = finetune.classifier_variables(
            trainer.model, spec, jax.random.fold_in(key, 4), None, length, leads
        )
        if "random_init" in config.baselines:
            record(
                "random_init",
                finetune.run_finetune(
                    trainer,
                    rand_vars,
                    train,
                    val,
                    test,
                    epochs,
                    jax.random.fold_in(key, 5),
                    seed,
                    watch("random_init"),
                ),
            )
        if "random_init_linear_probe" in config.baselines:
            rand_enc = {
                "params": rand_vars["params"]["encoder"],
                "batch_stats": rand_vars.get("batch_stats", {}).get("encoder", {}),
            }
            linear_probe("random_init_linear_probe", rand_enc, jax.random.fold_in(key, 6))

    # Test predictions of every method, one row per test ECG.
    pred_path = os.path.join(rep_dir, "test_predictions.csv")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["record", "patient", "label"] + [f"p_{m}" for m in probs])
    keys = splits.patient_keys(ds.patient_ids, ds.records)
    for i, row in enumerate(test.rows):
        w.writerow(
            [ds.records[row], keys[row], int(test.labels[i])]
            + [repr(float(probs[m][i])) for m in probs]
        )
    atomic_write(pred_path, buf.getvalue().encode())

    main = results.pop("finetune")
    main["n"] = {
        k: int(len(getattr(split, k))) for k in ("train", "finetune", "val", "test", "pretrain")
    }
    main["n"]["patients"] = {
        k: len(getattr(split, f"{k}_patients"))
        for k in ("train", "finetune", "val", "test", "pretrain")
    }
    main["max_amp"] = float(max_amp)
    main["encoder"] = info
    rec = {
        "seed": int(seed),
        "finetune": main,
        "baselines": results,
        "split": split.to_json(ds.records),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(os.path.join(rep_dir, "repeat.json"), rec)
    return rec


# ------------------------------------------------------------------------------------------- aggregation
def assemble(config, records: list[dict], seeds: list[int]) -> dict:
    """results.json from the finished repeat records (a pure function of them and the config)."""
    records = [_unjson(r) for r in records]
    main = [r["finetune"] for r in records]
    out = {
        "protocol": {
            "seeds": seeds,
            "repeats_done": len(records),
            "split": {
                "train": config.split.train,
                "val": config.split.val,
                "test": config.split.test,
                "by": "patient",
                "stratified_on": "patient label (rounded mean, 0.5 -> 0)",
                "val_test_ecgs_per_patient": 1,
            },
            "label_fraction": config.label_fraction,
            "selection": "epoch with the best validation AUROC, scored once on test",
            "ci95": "half-width of the Student-t 95% interval over repeats (t_{0.975,K-1} * sd / sqrt(K), sd ddof=1)",
            "ci95_normal": "reference's normal approximation 1.96 * sd / sqrt(K)",
            "threshold": 0.5,
            "auprc": "average precision (scikit-learn)",
            "encoder": (
                f"loaded from {config.encoder_checkpoint}"
                if config.encoder_checkpoint
                else "pretrained per repeat on the leakage-free pool (config.pretrain)"
            ),
        },
        "repeats": main,
        "summary": metrics.summarize_repeats(main),
        "baselines": {},
        "config": _config_json(config),
    }
    for b in config.baselines:
        reps = [r["baselines"][b] for r in records if b in r["baselines"]]
        out["baselines"][b] = {"repeats": reps, "summary": metrics.summarize_repeats(reps)}
    return out


def write_reports(workdir: str, config, results: dict, records: list[dict]) -> None:
    """results.md, results.csv and the plots."""
    methods = {"finetune": results, **results["baselines"]}
    k = results["protocol"]["repeats_done"]
    data = results["protocol"].get("dataset") or {}
    notes = [
        "",
        *(
            [
                f"Data: {data.get('path')} ({data.get('records')} records, label column '{data.get('label')}')."
            ]
            if data
            else []
        ),
        f"K = {k} repeats (seeds {', '.join(str(r['seed']) for r in results['repeats'])}); patient-level "
        f"split {config.split.train:g}/{config.split.val:g}/{config.split.test:g}; label fraction "
        f"{config.label_fraction:g}; {config.finetune.num_epochs} epochs, best validation AUROC epoch.",
        "Reference-style normal interval (1.96 sd/sqrt(K)) for AUROC: "
        + "; ".join(
            f"{metrics.METHOD_TITLES.get(m, m)} ± {metrics._fmt(r['summary']['auroc']['ci95_normal'])}"
            for m, r in methods.items()
        ),
    ]
    enc = results["repeats"][0].get("encoder", {}) if results["repeats"] else {}
    if enc.get("encoder_checkpoint"):
        notes.append(
            f"Encoder loaded from {enc['encoder_checkpoint']}: {enc.get('encoder')}, emb {enc.get('emb_dim')}, "
            f"mode {enc.get('mode')}, {enc.get('domain')} domain, {enc.get('steps')} pretraining steps "
            "(config.pretrain is not used)."
        )
    asked = results["protocol"]["seeds"]
    if k < len(asked):  # an interrupted evaluation: its table must not pass for the whole one
        notes.append(
            f"**Incomplete**: {k} of the {len(asked)} repeats asked for have finished; run the same "
            "command to continue."
        )
    leaks = [
        (r["seed"], int(r.get("encoder", {}).get("leaked_patients", 0))) for r in results["repeats"]
    ]
    if any(n for _, n in leaks):  # the table alone is what gets pasted: it says so itself
        notes.append(
            "**Leakage allowed** (config.allow_leakage): the loaded encoder was pretrained on validation/"
            "test patients ("
            + ", ".join(f"seed {s}: {n}" for s, n in leaks)
            + "), so these test scores "
            "are optimistic."
        )
    atomic_write(
        os.path.join(workdir, "results.md"),
        metrics.markdown_table(methods, title="Evaluation results (test)", notes=notes).encode(),
    )
    metrics.write_csv(metrics.table_rows(methods), os.path.join(workdir, "results.csv"))
    plots = os.path.join(workdir, "plots")
    os.makedirs(plots, exist_ok=True)
    hist, rocs = {}, {}
    test_auroc = {}
    for m, r in methods.items():
        hist[m] = {
            rep["seed"]: [_nan(h["val"]["auroc"]) for h in rep["history"]] for rep in r["repeats"]
        }
        test_auroc[m] = {rep["seed"]: rep["test"]["auroc"] for rep in r["repeats"]}
    for rec in records:
        path = os.path.join(workdir, f"repeat_{rec['seed']}", "test_predictions.csv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = list(csv.DictReader(f))
        y = np.array([int(r["label"]) for r in rows])
        for m in methods:
            if rows and f"p_{m}" in rows[0] and len(np.unique(y)) == 2:
                p = np.array([float(r[f"p_{m}"]) for r in rows])
                fpr, tpr = metrics.roc_points(y, p)
                rocs.setdefault(m, {})[rec["seed"]] = (fpr, tpr, test_auroc[m].get(rec["seed"]))
    metrics.plot_val_curves(hist, os.path.join(plots, "val_auroc.png"))
    monitor.plot_eval_curves(
        {m: {rep["seed"]: rep["history"] for rep in r["repeats"]} for m, r in methods.items()},
        os.path.join(plots, "training_curves.png"),
        monitor.eval_title(
            data.get("path", ""),
            data.get("label", ""),
            enc.get("encoder") or config.pretrain.model.encoder,
        ),
        method_titles=metrics.METHOD_TITLES,
    )
    if rocs:
        metrics.plot_roc(rocs, os.path.join(plots, "roc_test.png"))


def _progress(config, workdir: str, seeds) -> monitor.EvalProgress:
    """Progress over the fine-tuning epochs of the repeats not finished yet."""
    left = sum(
        not os.path.exists(os.path.join(workdir, f"repeat_{s}", "repeat.json")) for s in seeds
    )
    methods = 1 + len([b for b in config.baselines if b in BASELINES])
    return monitor.EvalProgress(
        workdir,
        left * methods * int(config.finetune.num_epochs),
        _log,
        enabled=jax.process_index() == 0,
    )


def _nan(x):
    return math.nan if x is None else x


# ---------------------------------------------------------------------------------------------- entry
def open_data(config, dataset=None):
    from ecgcl_jax import data as data_lib  # noqa: PLC0415

    ds = dataset if dataset is not None else data_lib.open_dataset(config.data.path)
    if config.data.label:
        ds = ds.with_label(config.data.label)
    return ds


class Prepared(typing.NamedTuple):
    config: Any  # with its split fractions resolved
    exported: Any  # the loaded encoder, or None
    seeds: list
    ds: Any
    splits: dict  # seed -> splits.Split


def prepare_run(config, dataset=None) -> Prepared:
    """Every check of an evaluation that needs no training, before any. Each seed's split is made and checked here
    too, so that a one-class validation split of the last seed stops the run now, not after the other repeats'
    pretraining; `run` then uses these splits."""
    exported = (
        checkpoint.load_encoder(config.encoder_checkpoint) if config.encoder_checkpoint else None
    )
    config = resolve_split(config, exported)
    validate(config)
    seeds = resolve_seeds(config)
    ds = open_data(config, dataset)
    if exported is None:
        from ecgcl_jax import parallel, pretrain  # noqa: PLC0415

        pretrain.validate_config(
            config.pretrain, parallel.make_mesh().size, field_prefix="pretrain."
        )
    return Prepared(
        config, exported, seeds, ds, {seed: repeat_split(config, ds, seed) for seed in seeds}
    )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset=None,
    pretrain_root: str | None = None,
    prepared: Prepared | None = None,
) -> dict:
    """Runs (or continues) the evaluation in `workdir`; returns results.json's content (or the sweep's).

    dataset: an opened `ecgcl_jax.data.Dataset` (default: open config.data.path). pretrain_root: where the
    per-seed pretraining runs live (default WORKDIR/repeat_<seed>/pretrain; sweeps share one when the swept
    field cannot change pretraining).
    """
    if config.sweep.field:
        return run_sweep(config, workdir, dataset)
    if not workdir:
        raise UserError("--workdir: required")
    prepared = prepared if prepared is not None else prepare_run(config, dataset)
    config, exported, seeds, ds = prepared.config, prepared.exported, prepared.seeds, prepared.ds
    os.makedirs(workdir, exist_ok=True)
    from ecgcl_jax.pretrain import WorkdirLock  # noqa: PLC0415

    with WorkdirLock(workdir):
        cfg_path = os.path.join(workdir, "eval_config.json")
        current = {
            "config": _config_json(config),
            "dataset": _dataset_identity(ds),
            "split_rule": splits.RULE,
        }
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                saved = json.load(f)
            # its finished repeats were split another way
            if saved.get("split_rule") != splits.RULE:
                raise UserError(
                    f"{cfg_path}: this evaluation was started by an older version, whose split rounded "
                    "differently; use a new --workdir"
                )
            check_resume(saved["config"], current["config"], cfg_path)
            if saved.get("dataset") != current["dataset"]:
                raise UserError(
                    f"{cfg_path}: this evaluation was started on another dataset "
                    f"({saved.get('dataset')} vs {current['dataset']}); use a new --workdir"
                )
        write_json(cfg_path, current)
        records, status = [], "done"
        progress = _progress(config, workdir, seeds)
        try:
            with _interruptible(), contextlib.closing(progress):
                for i, seed in enumerate(seeds):
                    rep_dir = os.path.join(workdir, f"repeat_{seed}")
                    rec_path = os.path.join(rep_dir, "repeat.json")
                    if os.path.exists(rec_path):
                        with open(rec_path) as f:
                            records.append(json.load(f))
                        _log(f"repeat {i + 1}/{len(seeds)} (seed {seed}): already done, kept")
                        continue
                    os.makedirs(rep_dir, exist_ok=True)
                    _log(f"repeat {i + 1}/{len(seeds)} (seed {seed})")
                    pdir = (
                        os.path.join(pretrain_root, f"repeat_{seed}")
                        if pretrain_root
                        else os.path.join(rep_dir, "pretrain")
                    )
                    rec = run_repeat(
                        config,
                        ds,
                        seed,
                        rep_dir,
                        pdir,
                        exported,
                        split=prepared.splits[seed],
                        progress=progress,
                        repeat=f"repeat {i + 1}/{len(seeds)}",
                    )
                    if rec is None:
                        status = "preempted"
                        break
                    with open(rec_path) as f:  # exactly what a resumed run will read
                        records.append(json.load(f))
        except Interrupted as e:
            status = "preempted"
            _log(
                f"interrupted ({e}) during repeat {len(records) + 1}; {len(records)} finished repeat(s) kept in "
                f"{workdir}; run the same command to continue"
            )
        if not records:
            return {"status": status, "repeats": []}
        results = assemble(config, records, seeds)
        where = str(getattr(ds, "path", "") or config.data.path) or "(a dataset given in Python)"
        results["protocol"]["dataset"] = dict(current["dataset"], path=where)
        # "preempted": fewer repeats than asked; the same command continues
        results["status"] = status
        write_json(os.path.join(workdir, "results.json"), results)
        write_json(
            os.path.join(workdir, "splits.json"), {str(r["seed"]): r["split"] for r in records}
        )
        write_reports(workdir, config, results, records)
        s = results["summary"]["auroc"]
        _log(
            f"{'done' if status == 'done' else status}: {len(records)}/{len(seeds)} repeats; test AUROC "
            f"{s['mean']:.4f} ± {s['ci95']:.4f} (t 95%) -> {workdir}/results.md"
        )
        return results


def _dataset_identity(ds) -> dict:
    man = getattr(ds, "manifest", None) or {}
    ident = man.get("identity")
    if not ident:
        h = hashlib.sha1()
        for part in (np.asarray(ds.records).astype(str), np.asarray(ds.labels, np.float32)):
            h.update(part.tobytes())
        ident = h.hexdigest()
    return {
        "identity": ident,
        "label": str(getattr(ds, "label_column", "")),
        "records": int(len(ds)),
    }


# ---------------------------------------------------------------------------------------------- sweeps
def _get_path(config, path: str):
    node = config
    for part in path.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError):
            raise UserError(f"config.sweep.field: {path!r} is not a config field") from None
    return node


def _set_path(config, path: str, value) -> None:
    *parents, last = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    try:
        node[last] = value
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"config.sweep.choices: cannot set {path} = {value!r} ({e})") from None


def _sweep_fields(field: str) -> list[str]:
    return [f.strip() for f in field.split(",") if f.strip()]


def _assignments(fields: list[str], value) -> list[tuple[str, Any]]:
    """[(field, value)] of one sweep point; with several fields a point is a tuple of one value per field."""
    if len(fields) == 1:
        return [(fields[0], value)]
    if not isinstance(value, (tuple, list)) or len(value) != len(fields):
        raise UserError(
            f"config.sweep.choices: with {len(fields)} fields ({', '.join(fields)}) every choice must "
            f"be a tuple of {len(fields)} values, got {value!r}"
        )
    return list(zip(fields, value))


def _value_str(v) -> str:
    return "-".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def variant_name(field: str, value) -> str:
    """Folder name of one sweep point, e.g. 'label_fraction=0.1' or 'view1=dropout_0.1+view2=none'; past 100
    characters (a long path as the value), its first 80 and a hash of the whole."""
    parts = [
        f"{f.split('.')[-1]}={_value_str(v)}" for f, v in _assignments(_sweep_fields(field), value)
    ]
    name = "".join(c if c.isalnum() or c in "._-=+" else "_" for c in "+".join(parts))
    if len(name) > 100:
        name = f"{name[:80]}-{hashlib.sha1('+'.join(parts).encode()).hexdigest()[:12]}"
    return name


def run_sweep(config, workdir: str, dataset=None) -> dict:
    """The protocol once per choice of config.sweep.field; a sweep table and plot. Resumable.

    sweep.field: one dotted config field, or several separated by commas (then every choice is a tuple with
    one value per field, e.g. augmentation pairs: field "pretrain.augment.view1,pretrain.augment.view2").
    """
    field, values = str(config.sweep.field), list(config.sweep.choices)
    if not values:
        raise UserError(
            "config.sweep.choices: empty; give the values to sweep, e.g. (0.1, 0.5, 1.0)"
        )
    fields = _sweep_fields(field)
    for f in fields:
        _get_path(config, f)
        if f.startswith("sweep"):
            raise UserError(f"config.sweep.field: cannot sweep {f}")
    for v in values:
        _assignments(fields, v)
    metric = str(config.sweep.metric)
    if metric not in metrics.METRICS:
        raise UserError(
            f"config.sweep.metric: {metric!r} is not one of {', '.join(metrics.METRICS)}"
        )
    ds = open_data(config, dataset)
    os.makedirs(workdir, exist_ok=True)
    from ecgcl_jax.pretrain import WorkdirLock  # noqa: PLC0415

    with WorkdirLock(workdir):
        return _run_sweep_locked(config, workdir, ds, field, fields, values, metric)


def _run_sweep_locked(
    config, workdir: str, ds, field: str, fields: list[str], values: list, metric: str
) -> dict:
    # One split for every variant (chosen from the base config unless the sweep sets it), so that all are scored on
    # the same test patients, even when the swept field is the contrast mode whose own default split differs.
    if not any(f.startswith("split.") for f in fields):
        exported = (
            checkpoint.load_encoder(config.encoder_checkpoint)
            if config.encoder_checkpoint
            else None
        )
        config = resolve_split(config, exported)
    # Fine-tuning-only fields leave pretraining unchanged: share it between the variants.
    shared = all(f in ("label_fraction", "baselines") or f.startswith("finetune.") for f in fields)
    pretrain_root = (
        os.path.join(workdir, "pretrain") if shared and not config.encoder_checkpoint else None
    )
    if config.encoder_checkpoint and any(f.startswith("pretrain.") for f in fields):
        raise UserError(
            f"config.sweep.field: {field} changes pretraining, but config.encoder_checkpoint loads a "
            "pretrained encoder: every variant would be the same"
        )
    # every variant and its folder are checked before any runs: a bad value in the middle must not stop the sweep
    # after hours of the variants before it
    variants, names = [], {}
    for value in values:
        variant = copy.deepcopy(config)
        for f, v in _assignments(fields, value):
            _set_path(variant, f, v)
        variant.sweep.field = ""
        name = variant_name(field, value)
        # e.g. '/a/pt_x' and '/a/pt/x': the later one's folder gets a hash of its value
        if name in names:
            name = f"{name}-{hashlib.sha1(repr(value).encode()).hexdigest()[:12]}"
        names[name] = value
        # a swept data.path opens its own dataset
        same_data = str(variant.data.path) == str(config.data.path)
        try:
            prepared = prepare_run(variant, ds if same_data else None)
        except UserError as e:
            raise UserError(f"sweep {field} = {value!r}: {e}") from None
        variants.append((value, variant, os.path.join(workdir, name), prepared))
    rows, series = [], {}
    done_values = []
    for value, variant, sub, prepared in variants:
        _log(f"sweep {field} = {value!r} -> {sub}")
        res = run(variant, sub, pretrain_root=pretrain_root, prepared=prepared)
        if res.get("status") != "done":
            _log(f"sweep interrupted at {field} = {value!r}; run the same command to continue")
            break
        done_values.append(value)
        methods = {"finetune": res, **res["baselines"]}
        for m, r in methods.items():
            for name in metrics.METRICS:
                s = r["summary"][name]
                rows.append(
                    {
                        "value": _value_str(value)
                        if len(fields) == 1
                        else ", ".join(_value_str(v) for v in value),
                        "method": m,
                        "metric": name,
                        **{
                            k: s[k]
                            for k in ("mean", "ci95", "ci95_normal", "sd", "min", "max", "n")
                        },
                    }
                )
            s = r["summary"][metric]
            series.setdefault(m, ([], []))
            series[m][0].append(_nan(s["mean"]))
            series[m][1].append(_nan(s["ci95"]))
    if rows:
        metrics.write_csv(rows, os.path.join(workdir, "sweep.csv"))
        atomic_write(
            os.path.join(workdir, "sweep.md"), _sweep_markdown(field, rows, metric).encode()
        )
        numeric = len(fields) == 1 and all(isinstance(v, (int, float)) for v in done_values)
        xs = done_values if numeric else list(dict.fromkeys(r["value"] for r in rows))
        metrics.plot_sweep(
            xs,
            series,
            os.path.join(workdir, f"sweep_{metric}.png"),
            xlabel=field,
            metric=metric,
            log_x=numeric and min(done_values) > 0 and max(done_values) / min(done_values) >= 20,
        )
    return {
        "status": "done" if len(done_values) == len(values) else "preempted",
        "field": field,
        "values": done_values,
        "rows": rows,
    }


def _sweep_markdown(field: str, rows: list[dict], metric: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    values = list(dict.fromkeys(r["value"] for r in rows))
    cell = {(r["value"], r["method"]): r for r in rows if r["metric"] == metric}
    lines = [
        f"# Sweep over {field}: test {metric}",
        "",
        f"| {field} | " + " | ".join(metrics.METHOD_TITLES.get(m, m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for v in values:
        cells = []
        for m in methods:
            r = cell.get((v, m))
            cells.append(
                "" if r is None else f"{metrics._fmt(r['mean'])} ± {metrics._fmt(r['ci95'])}"
            )
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: mean ± half-width of the Student-t 95% interval over the repeats. All metrics: sweep.csv.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # `python -m ecgcl_jax.evaluate` is the evaluation command
    import sys

    from ecgcl_jax import commands

    sys.exit(commands.eval_main(prog="python -m ecgcl_jax.evaluate"))
