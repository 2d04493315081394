"""The K-repeat evaluation protocol, its baselines, and sweeps (`run_eval.py`).

Per repeat (seed s; default seeds 321, 123, 51, further ones drawn deterministically):
  1. split the labeled patients (splits.py): stratified train/val/test, one ECG per val/test patient;
  2. pretraining pool = every record of every patient not in val/test (checked, raises otherwise);
     pretrain on it with the nested `config.pretrain` (seed s) in WORKDIR/repeat_s/pretrain, or load
     `config.encoder_checkpoint` and refuse if its pretraining patients meet this repeat's val/test patients;
  3. normaliser (max_amp) fitted on the training split;
  4. methods on the same split, each trained `finetune.num_epochs` epochs, validation scored every epoch,
     the best-macro-AUROC epoch (one label: best AUROC) kept and scored once on test:
       finetune                  pretrained encoder + head, trained end to end (the reference protocol)
       linear_probe              frozen pretrained encoder (eval mode) + Dense(C)
       random_init               the same architecture from a random init, trained end to end
       random_init_linear_probe  frozen random-init encoder + Dense(C)
     C = 1 for one label column (config.data.label), else the classes of config.data.task;
  5. each method's test macro-AUROC gets a percentile bootstrap interval over test patients, and so do the
     paired differences pretrained minus random init (metrics.bootstrap, config.bootstrap.resamples);
  6. the repeat is recorded in WORKDIR/repeat_s/repeat.json as soon as it finishes; a re-run skips it.

Outputs: results.json, splits.json, results.md, results.csv, plots/val_auroc.png, plots/roc_test.png,
repeat_s/test_predictions.csv. With `config.sweep.field` set, `run` runs the protocol once per value into
WORKDIR/<field>=<value>/ and writes sweep.md, sweep.csv and sweep_<metric>.png.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
import typing
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from ecgcl_jax import (
    checkpoint,
    configdiff,
    embed,
    finetune,
    input_pipeline,
    metrics,
    monitor,
    optim,
    preemption,
    rundir,
    splits,
    views,
)
from ecgcl_jax.errors import UserError
from ecgcl_jax.fileio import atomic_write, nan_for_null, write_json

METHODS = ("finetune", "linear_probe", "random_init", "random_init_linear_probe")
BASELINES = METHODS[1:]
# "does pretraining help?": each pretrained method against its random-init twin, on the same test patients
PAIRS = (("finetune", "random_init"), ("linear_probe", "random_init_linear_probe"))
# Fields that may differ when an evaluation workdir is resumed (they cannot change a finished repeat).
RESUMABLE_CHANGES = (
    "repeats",
    "seeds",
    "allow_leakage",
    "sweep.field",
    "sweep.choices",
    "sweep.metric",
    "data.resident",
    "data.prefetch",
    "data.reader_threads",
    *(f"pretrain.{f}" for f in rundir.NEUTRAL_FIELDS),
)
# Fields added since evaluation workdirs were first written, with the value that ran before (see
# rundir.ADDED_FIELDS, which the nested pretraining config follows).
ADDED_FIELDS = {
    "split.rule": "random",
    "split.fold_column": "strat_fold",
    "split.train_folds": [1, 2, 3, 4, 5, 6, 7, 8],
    "split.val_folds": [9],
    "split.test_folds": [10],
    "data.task": "",
    **{f"pretrain.{f}": v for f, v in rundir.ADDED_FIELDS.items()},
    **optim.fields_before_recipes("finetune.", finetune=True),
}


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


def _config_json(config) -> dict:
    return json.loads(config.to_json())


def check_resume(saved: dict, current: dict, path: str) -> None:
    """Refuses a resume whose config differs in a field that changes results (lists them)."""
    detail = configdiff.changed_fields(saved, current, RESUMABLE_CHANGES, ADDED_FIELDS)
    if detail:
        raise UserError(
            f"{path}: this evaluation workdir was started with another config; changed fields: "
            f"{detail} (use a new --workdir; only repeats, seeds, logging, I/O and "
            "pretrain.on_nonfinite/restart_if_unrestorable may change)"
        )


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
    # fold splits do not use the fractions
    fractions_used = config.split.rule != "folds"
    if fractions_used and len(unset) < 3 and abs(sum(config.split[n] for n in names) - 1.0) > 1e-6:
        raise UserError(
            f"config.split: set train, val and test together; the unset {', '.join(unset)} took the "
            f"defaults ({'/'.join(f'{v:g}' for v in preset)}) and the three do not sum to 1"
        )
    return config


def validate(config) -> None:
    """Checks of the evaluation fields (the nested pretraining config is checked by pretrain)."""
    if config.split.rule not in ("random", "folds"):
        raise UserError(f"config.split.rule: {config.split.rule!r} is not one of random, folds")
    if config.split.rule == "random":
        splits.check_fractions(
            (config.split.train, config.split.val, config.split.test), "config.split"
        )
    if not 0.0 < float(config.label_fraction) <= 1.0:
        raise UserError(f"config.label_fraction: must be in (0, 1] (got {config.label_fraction})")
    finetune.validate_config(config.finetune)
    if int(config.bootstrap.resamples) < 0:
        raise UserError(
            f"config.bootstrap.resamples: must be >= 0 (0 = no bootstrap; got {config.bootstrap.resamples})"
        )
    bad = [b for b in config.baselines if b not in BASELINES]
    if bad:
        raise UserError(
            f"config.baselines: unknown baseline(s) {bad}; choose from {', '.join(BASELINES)}"
        )
    resolve_seeds(config)


# ------------------------------------------------------------------------------------------ the encoder
def _pretrained_encoder(
    config, ds, split: splits.Split, seed: int, pretrain_dir: str, exported, workdir: str, stop
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
    result = pretrain.run(pcfg, pretrain_dir, ds, split.pretrain, stop=stop, name="config.pretrain")
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
def task_labels(config, ds) -> tuple[np.ndarray | None, list[str]]:
    """(labels, classes) of the evaluation. config.data.task "" (one label column): (None, [the column]);
    the fine-tuning then uses ds.labels (N,) as always. A task: its (N, C) float32 matrix (NaN = unknown) and
    its C class names (ecgcl_jax.data.tasks.resolve_task)."""
    spec = str(config.data.get("task", "") or "")
    if not spec:
        return None, [str(getattr(ds, "label_column", "") or "label")]
    from ecgcl_jax.data import tasks  # noqa: PLC0415

    task = tasks.resolve_task(ds, spec, field="config.data.task")
    return np.asarray(task.labels, np.float32), [str(c) for c in task.classes]


def _bootstrap_repeat(config, seed: int, labels, probs: dict, groups) -> tuple[dict, dict]:
    """({method: interval}, {"a - b": interval}) of this repeat's test macro-AUROC (metrics.bootstrap over the
    test patients `groups`, rng numpy default_rng([seed, 1])); ({}, {}) when config.bootstrap.resamples is 0."""
    n = int(config.bootstrap.resamples)
    if n == 0:
        return {}, {}
    pairs = [(a, b) for a, b in PAIRS if a in probs and b in probs]
    out = metrics.bootstrap(labels, probs, groups, n, seed=[int(seed), 1], pairs=pairs)
    extra = {"resamples": out["resamples"], "level": out["level"]}
    return (
        {m: dict(v, **extra) for m, v in out["methods"].items()},
        {k: dict(v, **extra) for k, v in out["pairs"].items()},
    )


def _method_record(seed: int, out: dict) -> dict:
    return {
        "seed": int(seed),
        "test": out["test"],
        "val": out["val"],
        "best_epoch": out["best_epoch"],
        "history": out["history"],
    }


def fold_values(config, ds) -> np.ndarray:
    """(N,) the dataset's fold column config.split.fold_column (object; '' or NaN = no fold)."""
    col = str(config.split.fold_column)
    meta = getattr(ds, "meta", None)
    if meta is None or col not in meta.columns:
        where = os.path.join(str(getattr(ds, "path", "") or "(dataset)"), "meta.csv")
        have = ", ".join(
            c for c in (meta.columns if meta is not None else []) if "fold" in c.lower()
        )
        raise UserError(
            f"config.split.fold_column: no column '{col}' in {where}"
            + (f" (fold-like columns: {have})" if have else "")
        )
    return meta[col].to_numpy(dtype=object)


def repeat_split(config, ds, seed: int, task=None) -> splits.Split:
    """This seed's patient-level split (config.split.rule: random, or the dataset's folds); UserError when its
    validation or test split holds one class only (single label), or no class with both values (multi-label).
    task: `task_labels(config, ds)`, when already made."""
    task_matrix, _ = task if task is not None else task_labels(config, ds)
    # (N, C) for the stratification; one label column is C = 1
    labels = (
        np.asarray(ds.labels, np.float32).reshape(-1, 1) if task_matrix is None else task_matrix
    )
    if config.split.rule == "folds":
        split = splits.make_fold_split(
            ds.patient_ids,
            labels,
            ds.records,
            fold_values(config, ds),
            seed,
            tuple(config.split.train_folds),
            tuple(config.split.val_folds),
            tuple(config.split.test_folds),
            float(config.label_fraction),
            column=str(config.split.fold_column),
        )
    else:
        split = splits.split_dataset(
            ds,
            seed,
            (config.split.train, config.split.val, config.split.test),
            float(config.label_fraction),
            labels=labels,
        )
    what = f"of seed {seed}" if config.split.rule != "folds" else f"({config.split.rule})"
    for name in ("val", "test"):
        ys = labels[getattr(split, name)]
        if labels.shape[1] == 1:
            if len(np.unique(ys[:, 0])) < 2:
                raise UserError(
                    f"data labels: the {name} split {what} holds one class only ({len(ys)} ECGs); "
                    "AUROC is undefined - more labeled patients are needed"
                )
        elif not any(len(np.unique(c[np.isfinite(c)])) == 2 for c in ys.T):
            raise UserError(
                f"data labels: no class of task {config.data.task} has both values in the {name} split "
                f"{what} ({len(ys)} ECGs); AUROC is undefined - more labeled patients are needed"
            )
    return split


class RepeatData(typing.NamedTuple):
    """One repeat's fine-tuning data, normalised by `max_amp` (mV, fitted on the training split)."""

    train: finetune.RawSource  # the split's fine-tuning rows (the label fraction of train)
    val: finetune.RawSource
    test: finetune.RawSource
    classes: list[str]  # task_labels' class names (one label column: [the column])
    num_classes: int | None  # None: one label column (logits (B,)); else C (logits (B, C))
    max_amp: float
    test_patients: np.ndarray  # (n_test,) patient key of each test ECG (the bootstrap's groups)


def repeat_data(config, ds, split: splits.Split, task=None) -> RepeatData:
    """The sources, classes and normaliser of the repeat with this `split`. task: `task_labels(config, ds)`,
    when already made."""
    max_amp = input_pipeline.fit_max_amp(ds, split.train)
    task, classes = task if task is not None else task_labels(config, ds)
    train, val, test = (
        finetune.RawSource(ds, rows, max_amp, task)
        for rows in (split.finetune, split.val, split.test)
    )
    keys = splits.patient_keys(ds.patient_ids, ds.records)
    num_classes = None if task is None else len(classes)
    return RepeatData(train, val, test, classes, num_classes, max_amp, keys[test.rows])


def _encoder_variables(classifier_variables: dict) -> dict:
    """The encoder module's {'params', 'batch_stats'} inside a classifier's variables."""
    return {
        "params": classifier_variables["params"]["encoder"],
        "batch_stats": classifier_variables.get("batch_stats", {}).get("encoder", {}),
    }


@dataclasses.dataclass
class MethodRunner:
    """Trains one repeat's methods on its data, each `config.finetune.num_epochs` epochs with the best
    validation epoch kept, and logs each one's test score. `end_to_end`: a classifier's variables trained
    whole on raw ECGs (finetune, random_init; one compiled trainer); `linear_probe`: a Dense(C) head on a
    frozen encoder's embeddings (linear_probe, random_init_linear_probe). Each returns
    `finetune.run_finetune`'s output."""

    ft: Any  # config.finetune
    enc: checkpoint.ExportedEncoder
    ds: Any
    data: RepeatData
    seed: int
    # monitor.EvalProgress.on_epoch with the repeat and seed bound (None: no progress), and its workdir
    watch: Callable[..., Callable] | None = None
    workdir: str | None = None

    def __post_init__(self):
        self.spec = views.ViewSpec.from_preprocessing(self.enc.preprocessing)
        self.epochs = int(self.ft.num_epochs)
        self.trainer = finetune.classifier_trainer(
            self.enc.model_config,
            self.spec,
            self.ft,
            train_size=len(self.data.train),
            num_classes=self.data.num_classes,
        )

    def classifier(self, key: jax.Array, encoder_variables: dict | None) -> dict:
        """Initial classifier variables: the head from `key`, the encoder `encoder_variables` (None: from
        `key` too, a random init)."""
        length, leads = int(self.ds.raw.shape[1]), int(self.ds.raw.shape[2])
        return finetune.classifier_variables(
            self.trainer.model, self.spec, key, encoder_variables, length, leads
        )

    def end_to_end(self, method: str, variables: dict, key: jax.Array) -> dict:
        """`variables` (from `classifier`) trained whole; key: the dropout key."""
        d = self.data
        return self._scored(method, self.trainer, variables, (d.train, d.val, d.test), key)

    def linear_probe(self, method: str, encoder_variables: dict, key: jax.Array) -> dict:
        """The head's init key is fold_in(key, 0), its dropout key fold_in(key, 1)."""
        d = self.data
        sources = (d.train, d.val, d.test)
        feats = [
            finetune.embed_rows(
                self.enc.model_config,
                self.spec,
                encoder_variables,
                self.ds,
                src.rows,
                d.max_amp,
                batch_size=int(self.ft.batch_size),
            )
            for src in sources
        ]
        probe = finetune.probe_trainer(
            int(self.enc.model_config.emb_dim),
            self.spec,
            self.ft,
            train_size=len(d.train),
            num_classes=d.num_classes,
        )
        head = dict(probe.init_head(jax.random.fold_in(key, 0), feats[0]))
        fs = tuple(finetune.FeatureSource(f, s.labels) for f, s in zip(feats, sources))
        return self._scored(method, probe, head, fs, jax.random.fold_in(key, 1))

    def _scored(self, method, trainer, variables, sources, key) -> dict:
        on_epoch = None if self.watch is None else self.watch(method, self.epochs, self.workdir)
        train, val, test = sources
        out = finetune.run_finetune(
            trainer,
            variables,
            train,
            val,
            test,
            self.epochs,
            key,
            self.seed,
            self.data.classes,
            on_epoch,
        )
        t = out["test"]
        _log(
            f"seed {self.seed}: {method:<25s} test macro-AUROC {t['macro_auroc']:.4f}  macro-AUPRC "
            f"{t['macro_auprc']:.4f}  ({t['classes_used']}/{len(self.data.classes)} classes; best epoch "
            f"{out['best_epoch']}/{self.epochs})"
        )
        return out


def write_predictions(path: str, ds, data: RepeatData, probs: dict) -> None:
    """test_predictions.csv: one row per test ECG, its record, patient and label(s), and each method's
    probability (`probs`: method -> (n_test,) or (n_test, C)); C > 1: one label and one p column per class."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    test = data.test
    if data.num_classes is None:
        w.writerow(["record", "patient", "label"] + [f"p_{m}" for m in probs])
        for i, row in enumerate(test.rows):
            w.writerow(
                [ds.records[row], data.test_patients[i], int(test.labels[i])]
                + [repr(float(probs[m][i])) for m in probs]
            )
    else:
        w.writerow(
            ["record", "patient"]
            + [f"label:{c}" for c in data.classes]
            + [f"p_{m}:{c}" for m in probs for c in data.classes]
        )
        for i, row in enumerate(test.rows):
            w.writerow(
                [ds.records[row], data.test_patients[i]]
                + ["" if np.isnan(v) else str(int(v)) for v in test.labels[i]]
                + [repr(float(probs[m][i, j])) for m in probs for j in range(data.num_classes)]
            )
    atomic_write(path, buf.getvalue().encode())


def score_methods(config, seed: int, data: RepeatData, outs: dict) -> tuple[dict, dict]:
    """({method: its record, with its test bootstrap interval}, {"a - b": the paired difference of test
    macro-AUROC, with its interval}) from `outs` (method -> `finetune.run_finetune` output)."""
    results = {m: _method_record(seed, out) for m, out in outs.items()}
    probs = {m: out["test_probs"] for m, out in outs.items()}
    boot, paired_boot = _bootstrap_repeat(config, seed, data.test.labels, probs, data.test_patients)
    for m, b in boot.items():
        results[m]["bootstrap"] = b
    paired = {}
    for a, b in PAIRS:
        if a in results and b in results:
            name = f"{a} - {b}"
            paired[name] = {
                "metric": metrics.PRIMARY,
                "difference": results[a]["test"][metrics.PRIMARY]
                - results[b]["test"][metrics.PRIMARY],
                **({"bootstrap": paired_boot[name]} if name in paired_boot else {}),
            }
    return results, paired


def repeat_record(
    seed: int, results: dict, paired: dict, data: RepeatData, split, ds, encoder: dict, seconds
) -> dict:
    """repeat.json: the finetune record (with the split's sizes, max_amp and the `encoder` info), the
    baselines' records, the classes, the paired differences and the split (`score_methods` made `results` and
    `paired`)."""
    names = ("train", "finetune", "val", "test", "pretrain")
    n = {k: int(len(getattr(split, k))) for k in names}
    n["patients"] = {k: len(getattr(split, f"{k}_patients")) for k in names}
    main = dict(results["finetune"], n=n, max_amp=float(data.max_amp), encoder=encoder)
    return {
        "seed": int(seed),
        "finetune": main,
        "baselines": {m: r for m, r in results.items() if m != "finetune"},
        "classes": data.classes,
        "paired": paired,
        "split": split.to_json(ds.records),
        "seconds": seconds,
    }


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
    stop: preemption.StopRequest | None = None,
    task=None,
) -> dict | None:
    """One repeat of the protocol (see the module docstring); None if pretraining was interrupted. split: this
    seed's `repeat_split` and task: `task_labels`, when already made (an `EvalPlan` holds both); progress:
    reports each fine-tuning epoch (`repeat` names it); stop: the evaluation's stop request, passed to the
    pretraining."""
    t0 = time.time()
    workdir = os.path.dirname(rep_dir)
    split = split if split is not None else repeat_split(config, ds, seed, task)
    with pretraining_lock(None if exported is not None else pretrain_dir):
        enc, info = _pretrained_encoder(
            config, ds, split, seed, pretrain_dir, exported, workdir, stop
        )
    if enc is None:
        return None
    embed.check_compatible(enc, ds, where=f"encoder of seed {seed}")
    data = repeat_data(config, ds, split, task)
    watch = None if progress is None else functools.partial(progress.on_epoch, repeat, seed)
    fit = MethodRunner(config.finetune, enc, ds, data, seed, watch, workdir)

    # k[i] = fold_in(PRNGKey(seed), i): each initialisation and each method has its fixed index i
    k = [jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in range(7)]
    outs = {"finetune": fit.end_to_end("finetune", fit.classifier(k[1], enc.variables), k[2])}
    baselines = config.baselines
    if "linear_probe" in baselines:
        outs["linear_probe"] = fit.linear_probe("linear_probe", enc.variables, k[3])
    if "random_init" in baselines or "random_init_linear_probe" in baselines:
        rand = fit.classifier(k[4], None)
        if "random_init" in baselines:
            outs["random_init"] = fit.end_to_end("random_init", rand, k[5])
        if "random_init_linear_probe" in baselines:
            rand_enc = _encoder_variables(rand)
            outs["random_init_linear_probe"] = fit.linear_probe(
                "random_init_linear_probe", rand_enc, k[6]
            )

    probs = {m: out["test_probs"] for m, out in outs.items()}
    write_predictions(os.path.join(rep_dir, "test_predictions.csv"), ds, data, probs)
    results, paired = score_methods(config, seed, data, outs)
    rec = repeat_record(seed, results, paired, data, split, ds, info, round(time.time() - t0, 1))
    write_json(os.path.join(rep_dir, "repeat.json"), rec)
    return rec


# ------------------------------------------------------------------------------------------- aggregation
def assemble(config, records: list[dict], seeds: list[int]) -> dict:
    """results.json from the finished repeat records (a pure function of them and the config)."""
    records = [nan_for_null(r) for r in records]
    main = [r["finetune"] for r in records]
    classes = records[0].get("classes") if records else None
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
            "classes": classes,
            "selection": "epoch with the best validation macro-AUROC (one label: AUROC), scored once on test",
            "ci95": "half-width of the Student-t 95% interval over repeats (t_{0.975,K-1} * sd / sqrt(K), sd ddof=1)",
            "ci95_normal": "reference's normal approximation 1.96 * sd / sqrt(K)",
            "threshold": 0.5,
            "auprc": "average precision (scikit-learn)",
            "macro_auroc": "mean of the per-class test AUROCs over the classes with both values in the split "
            "(classes_used per repeat)",
            "micro_auroc": "one AUROC over every known (record, class) entry pooled",
            "macro_auprc": "mean of the per-class average precisions over the same classes",
            "bootstrap": (
                f"each repeat's test macro_auroc: {int(config.bootstrap.resamples)} resamples of the test "
                "patients with replacement (numpy default_rng([seed, 1])), 95% percentile interval"
                if int(config.bootstrap.resamples)
                else "none (config.bootstrap.resamples = 0)"
            ),
            "paired": "per repeat, test macro_auroc of the pretrained method minus its random-init twin on "
            "the same test patients; summary = t interval over repeats, bootstrap = paired percentile interval",
            "encoder": (
                f"loaded from {config.encoder_checkpoint}"
                if config.encoder_checkpoint
                else "pretrained per repeat on the leakage-free pool (config.pretrain)"
            ),
        },
        "repeats": main,
        "summary": metrics.summarize_repeats(main),
        "per_class": metrics.summarize_per_class(main),
        "baselines": {},
        "paired": {},
        "config": _config_json(config),
    }
    for b in config.baselines:
        reps = [r["baselines"][b] for r in records if b in r["baselines"]]
        out["baselines"][b] = {
            "repeats": reps,
            "summary": metrics.summarize_repeats(reps),
            "per_class": metrics.summarize_per_class(reps),
        }
    for a, b in PAIRS:
        name = f"{a} - {b}"
        reps = [
            dict(r["paired"][name], seed=r["seed"]) for r in records if name in r.get("paired", {})
        ]
        if reps:
            out["paired"][name] = {
                "metric": reps[0]["metric"],
                "repeats": reps,
                "summary": metrics.summarize([r["difference"] for r in reps]),
            }
    return out


def write_reports(workdir: str, config, results: dict, records: list[dict]) -> None:
    """results.md (the t-interval table, per-class table, per-repeat bootstrap intervals, paired differences),
    results.csv and the plots."""
    methods = {"finetune": results, **results["baselines"]}
    classes = results["protocol"].get("classes") or []
    primary = "AUROC" if len(classes) < 2 else "macro-AUROC"
    k = results["protocol"]["repeats_done"]
    data = results["protocol"].get("dataset") or {}
    task = str(config.data.get("task", "") or "")
    what = f"task {task}" if task else f"label column '{data.get('label')}'"
    if config.split.rule == "folds":
        folds = (records[0]["split"].get("folds") or {}) if records else {}
        split_text = (
            f"the dataset's folds (column {config.split.fold_column}: train "
            f"{','.join(map(str, config.split.train_folds))}, validation "
            f"{','.join(map(str, config.split.val_folds))}, test {','.join(map(str, config.split.test_folds))}"
            f"; {folds.get('labeled_records_without_fold', 0)} labeled records without a fold left out)"
        )
    else:
        split_text = (
            f"patient-level split {config.split.train:g}/{config.split.val:g}/{config.split.test:g}"
        )
    notes = [
        "",
        *([f"Data: {data.get('path')} ({data.get('records')} records, {what})."] if data else []),
        f"K = {k} repeats (seeds {', '.join(str(r['seed']) for r in results['repeats'])}); "
        f"{split_text}; label fraction "
        f"{config.label_fraction:g}; {config.finetune.num_epochs} epochs, best validation "
        f"{'AUROC' if len(classes) < 2 else 'macro-AUROC'} epoch.",
        *(
            [
                f"Task: {len(classes)} classes ({', '.join(classes)}); macro means over the classes with both "
                "values in the test split (column classes)."
            ]
            if len(classes) > 1
            else []
        ),
        f"Reference-style normal interval (1.96 sd/sqrt(K)) for {primary}: "
        + "; ".join(
            f"{metrics.METHOD_TITLES.get(m, m)} ± "
            f"{metrics._fmt(r['summary'][metrics.PRIMARY]['ci95_normal'])}"
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
    sections = [
        metrics.markdown_table(methods, title="Evaluation results (test)", notes=notes),
        metrics.per_class_markdown(methods),
        metrics.bootstrap_markdown(methods, title=primary),
        metrics.paired_markdown(results.get("paired") or {}, title=primary),
    ]
    atomic_write(
        os.path.join(workdir, "results.md"),
        "\n".join(s for s in sections if s).encode(),
    )
    metrics.write_csv(
        metrics.table_rows(methods, results.get("paired")), os.path.join(workdir, "results.csv")
    )
    plots = os.path.join(workdir, "plots")
    os.makedirs(plots, exist_ok=True)
    hist, rocs = {}, {}
    test_auroc = {}
    for m, r in methods.items():
        hist[m] = {
            rep["seed"]: [monitor.val_metric(h["val"], metrics.PRIMARY) for h in rep["history"]]
            for rep in r["repeats"]
        }
        test_auroc[m] = {rep["seed"]: rep["test"].get("auroc") for rep in r["repeats"]}
    for rec in records:
        path = os.path.join(workdir, f"repeat_{rec['seed']}", "test_predictions.csv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows or "label" not in rows[0]:  # C > 1: no single ROC curve per method
            continue
        y = np.array([int(r["label"]) for r in rows])
        for m in methods:
            if rows and f"p_{m}" in rows[0] and len(np.unique(y)) == 2:
                p = np.array([float(r[f"p_{m}"]) for r in rows])
                fpr, tpr = metrics.roc_points(y, p)
                rocs.setdefault(m, {})[rec["seed"]] = (fpr, tpr, test_auroc[m].get(rec["seed"]))
    title = monitor.eval_title(
        data.get("path", ""),
        str(config.data.get("task", "") or "") or data.get("label", ""),
        enc.get("encoder") or config.pretrain.model.encoder,
    )
    metrics.plot_val_curves(hist, os.path.join(plots, "val_auroc.png"), metric=primary, title=title)
    monitor.plot_eval_curves(
        {m: {rep["seed"]: rep["history"] for rep in r["repeats"]} for m, r in methods.items()},
        os.path.join(plots, "training_curves.png"),
        title,
        metric=metrics.PRIMARY,
        method_titles=metrics.METHOD_TITLES,
    )
    if rocs:
        metrics.plot_roc(rocs, os.path.join(plots, "roc_test.png"))


def _progress(units: list) -> monitor.EvalProgress:
    """Progress over the fine-tuning epochs of `units` ((variant, seed) pairs) not finished yet."""
    epochs = 0
    for v, seed in units:
        if not v.done(seed):
            config = v.plan.config
            methods = 1 + len([b for b in config.baselines if b in BASELINES])
            epochs += methods * int(config.finetune.num_epochs)
    return monitor.EvalProgress(
        units[0][0].workdir if units else "",
        epochs,
        _log,
        metric=metrics.PRIMARY,
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


class EvalPlan(typing.NamedTuple):
    """An evaluation checked before any training (`plan_evaluation`): what its repeats run on."""

    config: Any  # with its split fractions resolved
    exported: Any  # the loaded encoder, or None (pretrain per repeat)
    seeds: list  # one per repeat
    ds: Any  # the opened dataset
    splits: dict  # seed -> splits.Split
    # task_labels: ((N, C) float32 labels or None for one column, class names)
    task: tuple = (None, [])


def plan_evaluation(config, dataset=None) -> EvalPlan:
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

        pretrain.validate_config(config.pretrain, parallel.make_mesh().size, "config.pretrain")
    task = task_labels(config, ds)
    split_of = {seed: repeat_split(config, ds, seed, task) for seed in seeds}
    # a fine-tuning cosine's length depends on the training split's size
    for split in split_of.values():
        finetune.finetune_recipe(config.finetune, len(split.finetune))
    return EvalPlan(config, exported, seeds, ds, split_of, task)


def parse_shard(shard) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n (a SLURM array's $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with
    --array=0-(n-1)); None or '' -> None (every unit)."""
    if shard is None or (isinstance(shard, str) and not shard.strip()):
        return None
    if isinstance(shard, tuple):
        i, n = shard
    else:
        try:
            i, n = (int(x) for x in str(shard).split("/"))
        except ValueError:
            raise UserError(f"--shard: expected i/n, e.g. 0/4 (got {shard!r})") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard: i/n needs n >= 1 and 0 <= i < n, counting from 0 (got {i}/{n})")
    return int(i), int(n)


def pretraining_lock(pretrain_dir: str | None):
    """Held while a unit pretrains or loads its repeat's encoder: units of a sweep that share one pretraining
    (WORKDIR/pretrain/repeat_<seed>) wait for each other instead of running it twice. None: no lock."""
    return rundir.FileLock(f"{pretrain_dir}.lock") if pretrain_dir else contextlib.nullcontext()


@dataclasses.dataclass
class _Variant:
    """One evaluation (a sweep point, or the whole of a plain run) and its units (one per seed)."""

    workdir: str
    plan: EvalPlan
    pretrain_root: str | None = None
    value: Any = None  # the sweep value; None in a plain run
    identity: dict | None = None  # eval_config.json's dataset entry, once opened

    def record_path(self, seed: int) -> str:
        return os.path.join(self.workdir, f"repeat_{seed}", "repeat.json")

    def done(self, seed: int) -> bool:
        return os.path.exists(self.record_path(seed))

    def complete(self) -> bool:
        return all(self.done(s) for s in self.plan.seeds)


def _open_variant(v: _Variant) -> None:
    """Creates the workdir and checks (or writes) its eval_config.json, under a short lock shared by every
    process of the evaluation (so that two shards starting together write it once)."""
    config, ds = v.plan.config, v.plan.ds
    os.makedirs(v.workdir, exist_ok=True)
    cfg_path = os.path.join(v.workdir, "eval_config.json")
    current = {
        "config": _config_json(config),
        "dataset": _dataset_identity(ds),
        "split_rule": splits.RULE,
    }
    with rundir.FileLock(os.path.join(v.workdir, ".config.lock")):
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
            if (
                saved != current
            ):  # a resumable change (e.g. more repeats): the newest config is recorded
                write_json(cfg_path, current)
        else:
            write_json(cfg_path, current)
    v.identity = current["dataset"]


def _run_unit(
    v: _Variant, seed: int, progress: monitor.EvalProgress, label: str, stop: preemption.StopRequest
) -> bool:
    """Runs one unit (v, seed) whose lock the caller holds; False if its pretraining was interrupted.
    progress: reports each fine-tuning epoch, named by `label` (e.g. 'repeat 2/3')."""
    p = v.plan
    rep_dir = os.path.join(v.workdir, f"repeat_{seed}")
    os.makedirs(rep_dir, exist_ok=True)
    pdir = (
        os.path.join(v.pretrain_root, f"repeat_{seed}")
        if v.pretrain_root
        else os.path.join(rep_dir, "pretrain")
    )
    rec = run_repeat(
        p.config,
        p.ds,
        seed,
        rep_dir,
        pdir,
        p.exported,
        split=p.splits[seed],
        progress=progress,
        repeat=label,
        stop=stop,
        task=p.task,
    )
    return rec is not None


def _finish_variant(v: _Variant, status: str) -> dict:
    """results.json, splits.json and the reports of `v` from its finished repeat records (a pure function of
    them, so that any process may write them); {"status", "repeats": []} when none has finished."""
    p = v.plan
    records = []
    for seed in p.seeds:
        if v.done(seed):
            with open(v.record_path(seed)) as f:  # exactly what a resumed run reads
                records.append(json.load(f))
    if not records:
        return {"status": status, "repeats": []}
    config, ds = p.config, p.ds
    results = assemble(config, records, p.seeds)
    where = str(getattr(ds, "path", "") or config.data.path) or "(a dataset given in Python)"
    results["protocol"]["dataset"] = dict(v.identity or _dataset_identity(ds), path=where)
    results["protocol"]["split"].update(split_protocol(config, records))
    # "preempted": fewer repeats than asked; the same command continues
    results["status"] = status
    # one writer of the reports at a time (a shard finishing while the run without --shard writes them)
    with rundir.FileLock(os.path.join(v.workdir, ".reports.lock")):
        write_json(os.path.join(v.workdir, "results.json"), results)
        write_json(
            os.path.join(v.workdir, "splits.json"), {str(r["seed"]): r["split"] for r in records}
        )
        write_reports(v.workdir, config, results, records)
    s = results["summary"][metrics.PRIMARY]
    _log(
        f"{'done' if status == 'done' else status}: {len(records)}/{len(p.seeds)} repeats; test macro-AUROC "
        f"{s['mean']:.4f} ± {s['ci95']:.4f} (t 95%) -> {v.workdir}/results.md"
    )
    return results


def split_protocol(config, records: list[dict]) -> dict:
    """results.json's protocol.split additions: the rule, the folds and their counts, and how close each
    repeat's split kept each class's positive rate (splits.json has the rates)."""
    out: dict[str, Any] = {"rule": str(config.split.rule)}
    if config.split.rule == "folds":
        folds = records[0]["split"].get("folds", {})
        out["folds"] = folds
        out["by"] = f"the dataset's folds (column '{config.split.fold_column}')"
        out["val_test_ecgs_per_patient"] = "all (every labeled ECG of the validation/test folds)"
    out["stratification_max_abs_diff"] = {
        str(r["seed"]): r["split"].get("stratification", {}).get("max") for r in records
    }
    return out


def _run_units(variants: list[_Variant], shard, stop: preemption.StopRequest) -> str:
    """Runs the units (variant x seed, variant-major) of this process: every one, or with shard (i, n) those
    whose index k has k % n == i. Each is claimed with a lock on WORKDIR/repeat_<seed>/unit.lock, so that no
    two processes run one unit; the lock dies with its process, so a killed unit runs again in the next command.
    Without a shard, units another live process holds are waited for at the end (and run if it died).
    Returns "done" or "preempted"."""
    units = [(v, s) for v in variants for s in v.plan.seeds]
    mine = [u for k, u in enumerate(units) if shard is None or k % shard[1] == shard[0]]
    total = {id(v): len(v.plan.seeds) for v in variants}
    deferred = []
    progress = _progress(mine)

    def label(v, seed) -> str:
        return f"repeat {v.plan.seeds.index(seed) + 1}/{total[id(v)]}"

    def attempt(v, seed, blocking) -> str:
        if v.done(seed):
            return "done"
        lock = rundir.FileLock(os.path.join(v.workdir, f"repeat_{seed}", "unit.lock"))
        if not lock.acquire(blocking):
            return "busy"
        try:
            if v.done(seed):  # finished by the process that held the lock
                return "done"
            return "done" if _run_unit(v, seed, progress, label(v, seed), stop) else "preempted"
        finally:
            lock.release()

    try:
        with stop.interrupting(), contextlib.closing(progress):
            for v, seed in mine:
                i = v.plan.seeds.index(seed)
                where = f" ({os.path.basename(v.workdir)})" if v.value is not None else ""
                if v.done(seed):
                    _log(f"repeat {i + 1}/{total[id(v)]} (seed {seed}){where}: already done, kept")
                    continue
                _log(f"repeat {i + 1}/{total[id(v)]} (seed {seed}){where}")
                out = attempt(v, seed, blocking=False)
                if out == "busy":
                    _log(f"seed {seed}{where}: running in another process; left to it")
                    deferred.append((v, seed))
                    continue
                if out == "preempted":
                    return "preempted"
            if shard is None:
                for v, seed in deferred:
                    _log(f"seed {seed}: waiting for the process that runs it")
                    if attempt(v, seed, blocking=True) == "preempted":
                        return "preempted"
    except preemption.Interrupted as e:
        where = variants[0].workdir if len(variants) == 1 else os.path.dirname(variants[0].workdir)
        _log(
            f"interrupted ({e}); finished repeats are kept in {where}; run the same command to continue"
        )
        return "preempted"
    return "done"


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset=None,
    pretrain_root: str | None = None,
    plan: EvalPlan | None = None,
    shard=None,
    stop: preemption.StopRequest | None = None,
) -> dict:
    """Runs (or continues) the evaluation in `workdir`; returns results.json's content (or the sweep's).

    dataset: an opened `ecgcl_jax.data.Dataset` (default: open config.data.path). pretrain_root: where the
    per-seed pretraining runs live (default WORKDIR/repeat_<seed>/pretrain; sweeps share one when the swept
    field cannot change pretraining). shard: 'i/n' (or (i, n)): run only this process's share of the units
    (repeats, or variant x repeat in a sweep) in a workdir shared with the other shards; the reports are
    written by the last shard to find every unit finished, or by a run without a shard. A shard that leaves
    units to others returns {"status": "incomplete", "units_done", "units"}. stop: the entry point's stop
    request (SIGTERM/SIGINT: finished repeats are kept, a pretraining checkpoints; default: none). plan: this
    config's `plan_evaluation`, when already made (default: made here).
    """
    shard = parse_shard(shard)
    stop = stop if stop is not None else preemption.StopRequest()
    if config.sweep.field:
        return run_sweep(config, workdir, dataset, shard=shard, stop=stop)
    if not workdir:
        raise UserError("--workdir: required")
    plan = plan if plan is not None else plan_evaluation(config, dataset)
    os.makedirs(workdir, exist_ok=True)
    # shared: the shards of this evaluation work side by side (each unit has its own lock)
    with rundir.WorkdirLock(workdir, shared=True):
        v = _Variant(workdir, plan, pretrain_root)
        _open_variant(v)
        _run_units([v], shard, stop)  # complete or not is what the files say
        if shard is not None and not v.complete():
            return _incomplete([v], shard)
        return _finish_variant(v, "done" if v.complete() else "preempted")


def _incomplete(variants: list[_Variant], shard) -> dict:
    done = sum(v.done(s) for v in variants for s in v.plan.seeds)
    total = sum(len(v.plan.seeds) for v in variants)
    _log(
        f"shard {shard[0]}/{shard[1]}: its units are finished or taken; {done}/{total} units done in all. "
        "The last shard to finish, or the same command without --shard, writes the reports"
    )
    return {"status": "incomplete", "units_done": done, "units": total}


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


def run_sweep(
    config, workdir: str, dataset=None, shard=None, stop: preemption.StopRequest | None = None
) -> dict:
    """The protocol once per choice of config.sweep.field; a sweep table and plot. Resumable; with shard (i, n)
    only this process's share of the units (variant x repeat).

    sweep.field: one dotted config field, or several separated by commas (then every choice is a tuple with
    one value per field, e.g. augmentation pairs: field "pretrain.augment.view1,pretrain.augment.view2").
    """
    stop = stop if stop is not None else preemption.StopRequest()
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
    if metric not in metrics.ALL_METRICS:
        raise UserError(
            f"config.sweep.metric: {metric!r} is not one of {', '.join(metrics.ALL_METRICS)}"
        )
    ds = open_data(config, dataset)
    os.makedirs(workdir, exist_ok=True)
    with rundir.WorkdirLock(workdir, shared=True):
        return _run_sweep_locked(config, workdir, ds, field, fields, values, metric, shard, stop)


def _run_sweep_locked(
    config, workdir: str, ds, field: str, fields: list[str], values: list, metric: str, shard, stop
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
    variants, names, configs = [], {}, []
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
            plan = plan_evaluation(variant, ds if same_data else None)
        except UserError as e:
            raise UserError(f"sweep {field} = {value!r}: {e}") from None
        # a task's summaries are the multi-label ones (the one-label set only when it has one class)
        if str(variant.data.get("task", "") or "") and metric not in metrics.MULTI_METRICS:
            raise UserError(
                f"config.sweep.metric: {metric!r} is a one-label metric, but {field} = {value!r} evaluates "
                f"the task {variant.data.task!r}: use one of {', '.join(metrics.MULTI_METRICS)}"
            )
        variants.append(_Variant(os.path.join(workdir, name), plan, pretrain_root, value))
        configs.append(variant)
    results: dict[int, dict] = {}
    done_values = []
    if shard is None:  # variant after variant, each a whole evaluation
        for v, vconfig in zip(variants, configs):
            _log(f"sweep {field} = {v.value!r} -> {v.workdir}")
            res = run(vconfig, v.workdir, pretrain_root=v.pretrain_root, plan=v.plan, stop=stop)
            if res.get("status") != "done":
                _log(
                    f"sweep interrupted at {field} = {v.value!r}; run the same command to continue"
                )
                break
            results[id(v)] = res
            done_values.append(v.value)
    else:  # this shard's share of the units of every variant
        for v in variants:
            _open_variant(v)
        _run_units(variants, shard, stop)
        if not all(v.complete() for v in variants):
            return _incomplete(variants, shard)
        for v in variants:  # this shard is the last one: every unit is done
            results[id(v)] = _finish_variant(v, "done")
            done_values.append(v.value)
    rows = _sweep_rows(fields, variants, results, len(done_values))
    if rows:
        _write_sweep_reports(workdir, field, fields, done_values, rows, metric)
    return {
        "status": "done" if len(done_values) == len(values) else "preempted",
        "field": field,
        "values": done_values,
        "rows": rows,
    }


def _sweep_rows(fields, variants, results, n_done: int) -> list[dict]:
    rows = []
    for v in variants[:n_done]:
        res = results[id(v)]
        for m, r in {"finetune": res, **res["baselines"]}.items():
            for name in metrics.shown_metrics(r["summary"]):
                s = r["summary"][name]
                rows.append(
                    {
                        "value": _value_str(v.value)
                        if len(fields) == 1
                        else ", ".join(_value_str(x) for x in v.value),
                        "method": m,
                        "metric": name,
                        **{
                            k: s[k]
                            for k in ("mean", "ci95", "ci95_normal", "sd", "min", "max", "n")
                        },
                    }
                )
    return rows


def _write_sweep_reports(workdir, field, fields, done_values, rows, metric) -> None:
    """sweep.csv, sweep.md, sweep_<metric>.png and, for a label-fraction sweep,
    label_efficiency_<metric>.png."""
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r["metric"] == metric:
            series.setdefault(r["method"], ([], []))
            series[r["method"]][0].append(_nan(r["mean"]))
            series[r["method"]][1].append(_nan(r["ci95"]))
    with rundir.FileLock(os.path.join(workdir, ".reports.lock")):
        metrics.write_csv(rows, os.path.join(workdir, "sweep.csv"))
        atomic_write(
            os.path.join(workdir, "sweep.md"), _sweep_markdown(field, rows, metric).encode()
        )
        numeric = len(fields) == 1 and all(isinstance(v, (int, float)) for v in done_values)
        xs = done_values if numeric else list(dict.fromkeys(r["value"] for r in rows))
        log_x = numeric and min(done_values) > 0 and max(done_values) / min(done_values) >= 20
        metrics.plot_sweep(
            xs,
            series,
            os.path.join(workdir, f"sweep_{metric}.png"),
            xlabel=field,
            metric=metric,
            log_x=log_x,
        )
        if fields == ["label_fraction"]:
            plot_label_efficiency(
                done_values,
                series,
                os.path.join(workdir, f"label_efficiency_{metric}.png"),
                metric=metric,
                log_x=log_x,
            )


def plot_label_efficiency(
    fractions, series, path: str, metric: str = "auroc", log_x: bool = False
) -> None:
    """Test `metric` vs label fraction, one line per method, with its Student-t 95% interval over the repeats
    as a band (clipped to the metric's range [0, 1]). series: {method: (means, ci95 half-widths)}, one value per
    fraction (NaN half-width: no band at that point)."""
    fig = monitor.figure(6.0, 4.5)
    ax = fig.subplots()
    x = np.asarray(fractions, dtype=np.float64) * 100
    order = np.argsort(x)
    for method, (means, cis) in series.items():
        m = np.asarray(means, dtype=np.float64)[order]
        h = np.asarray(cis, dtype=np.float64)[order]
        (line,) = ax.plot(x[order], m, marker="o", label=metrics.METHOD_TITLES.get(method, method))
        ok = np.isfinite(h) & np.isfinite(m)
        ax.fill_between(
            x[order],
            np.clip(m - h, 0, 1),
            np.clip(m + h, 0, 1),
            where=ok,
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("labeled training patients (%)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(
        "Label efficiency: mean over repeats, band = Student-t 95% interval (clipped to [0, 1])",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
