"""Patient-level splits for the evaluation protocol, and the leakage-free pretraining pool.

Every function here works on plain per-record arrays (`patient_ids`, `labels`, `records`, all (N,)), so the
rules can be tested on hand-made tables without a dataset.

Rules (the reference's fine-tuning and evaluation protocol):
- A record without a patient id is its own patient, keyed `"record:<record path>"` (the same key the exported
  encoder records in `pretrain_patients`).
- A patient's label is the rounded mean of the known labels of its ECGs (NaN = unknown, ignored). A mean of
  exactly 0.5 rounds to 0, as `numpy.round` (round half to even) does; patients with no known label are not in
  the labeled splits (their ECGs still go to the pretraining pool).
- Labeled patients are split as the reference's train/rest 70/30, then rest 50/50 into validation/test, with
  stratification on the patient label, per class: the class's patients are shuffled (seeded);
  n_rest = nearest(n_c * (val + test)) leave training, and of those n_test = nearest(n_rest * test / (val + test))
  go to test, the others to validation (nearest rounds halves up, so with 50/50 an odd rest gives test the extra
  patient); a class with at least 3 patients gives at least one to validation and one to test.
- Training uses every labeled ECG of its patients, each with its own label; validation and test keep one labeled
  ECG per patient (a seeded choice), scored with that ECG's own label.
- Label fraction: a stratified subset of the training patients, `ceil(fraction * n_c)` per class (at least one).
  The subsets are nested: for one seed, a smaller fraction keeps a subset of the patients of a larger one.
- Pretraining pool: every record (labeled or not) whose patient is neither a validation nor a test patient.
  `check_pool` re-checks this on the final indices and raises `LeakageError` otherwise.

Multi-label tasks (labels (N, C), C > 1; C = 1 takes the single-label rules above unchanged):
- A patient's label vector is the per-class rounded mean of its ECGs' known labels (NaN where none is known); a
  patient with no known entry is not in the labeled splits. A labeled ECG has at least one known entry.
- Train/val/test: iterative stratification over patients (Sechidis, Tsoumakas & Vlahavas 2011): the class with
  the fewest unassigned positive patients goes first, each of its patients (seeded order) to the split that
  still wants most of that class's positives (ties: most wanted patients overall, then seeded); patients without
  a positive entry fill the splits' remaining sizes.
- Label fraction: `ceil(fraction * n)` training patients (at least 1), a prefix of one seeded order built so that
  every prefix keeps each class's positive rate close to the training patients' (greedy: the next patient is the
  one whose label vector brings the prefix's positive counts nearest to rate x known, each class weighted by
  1 / (rate (1 - rate))). Nested in the fraction, like the single-label subset.
- `Split.info["stratification"]`: each class's patient-level positive rate per split and the largest absolute
  difference between splits (C = 1 included), so how close the stratification came is on record.

Fold splits (`make_fold_split`, e.g. PTB-XL's `strat_fold`): the dataset's own folds. Train/val/test hold every
labeled ECG of their folds (val/test are not thinned to one ECG per patient: the folds are the benchmark's test
set); a patient with records in two folds is refused; records without a fold are in no labeled split (counted),
but stay in the pretraining pool unless their patient is a validation/test patient, like unlabeled records. The
pool leaves out every patient with a record in a validation or test fold.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

from ecgcl_jax.errors import UserError

RULE = "per class: rest = nearest(n (val + test)), test = nearest(rest test / (val + test))"  # in eval_config.json
FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test: the reference's 70/30, then the rest 50/50
CLOCS_FRACTIONS = (0.6, 0.2, 0.2)  # the CLOCS variant's


class LeakageError(UserError):
    """A validation/test patient would be seen during pretraining; ``count``: how many (0 if not counted)."""

    def __init__(self, message: str, count: int = 0):
        super().__init__(message)
        self.count = count


def patient_keys(patient_ids: Sequence[str], records: Sequence[str]) -> np.ndarray:
    """(N,) str patient key per record: the patient id, or `"record:<path>"` when the id is empty."""
    pids = np.asarray(patient_ids, dtype=object)
    recs = np.asarray(records, dtype=object)
    if pids.shape != recs.shape:
        raise ValueError(f"patient_ids {pids.shape} and records {recs.shape} differ in shape")
    out = np.empty(len(pids), dtype=object)
    for i, (p, r) in enumerate(zip(pids, recs)):
        p = "" if p is None else str(p).strip()
        out[i] = p if p else f"record:{r}"
    return out


def patient_labels(keys: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """Patient key -> 0/1: rounded mean (half to even, so 0.5 -> 0) of its known ECG labels.

    Patients without any known (non-NaN) label are absent from the result.
    """
    labels = np.asarray(labels, dtype=np.float64)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for k, y in zip(keys, labels):
        if np.isnan(y):
            continue
        sums[k] = sums.get(k, 0.0) + float(y)
        counts[k] = counts.get(k, 0) + 1
    return {k: int(np.round(sums[k] / counts[k])) for k in sums}


def check_fractions(
    fractions: Sequence[float], field: str = "config.split"
) -> tuple[float, float, float]:
    """Validates (train, val, test) fractions: each in (0, 1), summing to 1."""
    if len(fractions) != 3:
        raise UserError(f"{field}: need three fractions (train, val, test), got {tuple(fractions)}")
    tr, va, te = (float(f) for f in fractions)
    if not all(0.0 < f < 1.0 for f in (tr, va, te)) or abs(tr + va + te - 1.0) > 1e-6:
        raise UserError(
            f"{field}: train/val/test fractions must each be in (0, 1) and sum to 1, got {tr}, {va}, {te}"
        )
    return tr, va, te


@dataclasses.dataclass(frozen=True)
class Split:
    """One repeat's split. Index arrays are sorted int64 row indices into the dataset."""

    seed: int
    train: np.ndarray  # every labeled ECG of the training patients
    # the label-fraction subset of `train` used for fine-tuning (== train at 1.0)
    finetune: np.ndarray
    val: np.ndarray  # one labeled ECG per validation patient
    test: np.ndarray  # one labeled ECG per test patient
    pretrain: np.ndarray  # pretraining pool: all records of patients not in val/test
    train_patients: list[str]
    finetune_patients: list[str]
    val_patients: list[str]
    test_patients: list[str]
    pretrain_patients: list[str]
    label_fraction: float
    rule: str  # random | folds: the config.split.rule that made it
    # splits.json extras: "stratification" (per-class positive rates), "folds" (fold split counts)
    info: dict = dataclasses.field(default_factory=dict)

    def to_json(self, records: Sequence[str] | None = None) -> dict:
        """The splits.json entry: patient ids per split (and record paths when `records` is given)."""
        out = {
            "train": list(self.train_patients),
            "val": list(self.val_patients),
            "test": list(self.test_patients),
            "pretrain": list(self.pretrain_patients),
            "finetune": list(self.finetune_patients),
            "label_fraction": self.label_fraction,
            "num_records": {
                k: int(len(getattr(self, k)))
                for k in ("train", "finetune", "val", "test", "pretrain")
            },
        }
        if records is not None:
            recs = np.asarray(records, dtype=object)
            out["records"] = {
                k: [str(r) for r in recs[getattr(self, k)]]
                for k in ("train", "finetune", "val", "test", "pretrain")
            }
        out.update(self.info)
        return out


def _nearest(x: float) -> int:
    """x >= 0 rounded to the nearest integer, halves up; products like 10 * 0.15 land a hair off .5, so 1e-9 of
    slack keeps a half a half."""
    return int(math.floor(x + 0.5 + 1e-9))


def _stratified_partition(
    patients_by_class: dict[int, list[str]],
    rng: np.random.Generator,
    val_fraction: float,
    test_fraction: float,
):
    train, val, test = [], [], []
    for c in sorted(patients_by_class):
        members = list(patients_by_class[c])
        rng.shuffle(members)
        n = len(members)
        n_rest = _nearest(n * (val_fraction + test_fraction))
        n_test = _nearest(n_rest * test_fraction / (val_fraction + test_fraction))
        n_val = n_rest - n_test
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        while n_val + n_test > n - 1 and n_val + n_test > 0 and n > 1:  # keep >= 1 training patient
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        val += members[:n_val]
        test += members[n_val : n_val + n_test]
        train += members[n_val + n_test :]
    return train, val, test


def label_fraction_subset(
    train_patients: Sequence[str], plabels: dict[str, int], fraction: float, seed: int
) -> list[str]:
    """Stratified subset of the training patients: `ceil(fraction * n_c)` of each class (at least 1).

    Nested in `fraction` for one seed (one fixed seeded order per class, a prefix of it is kept).
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"config.label_fraction: must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return sorted(train_patients)
    rng = np.random.default_rng([int(seed), 1])
    keep = []
    for c in (0, 1):
        members = sorted(p for p in train_patients if plabels[p] == c)
        if not members:
            continue
        order = rng.permutation(len(members))
        k = max(1, math.ceil(fraction * len(members)))
        keep += [members[i] for i in order[:k]]
    return sorted(keep)


def make_split(
    patient_ids: Sequence[str],
    labels,
    records: Sequence[str],
    seed: int,
    fractions: Sequence[float] = FRACTIONS,
    *,
    label_fraction: float,
) -> Split:
    """Patient-level stratified split of one repeat.

    patient_ids: (N,) str ("" = unknown); labels: (N,) or (N, C) float 1/0/NaN; records: (N,) str unique record
    paths. seed: the repeat's seed (all choices are a function of it and the inputs only). (N, 1) is (N,).
    """
    arr = np.asarray(labels, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] > 1:
        split, plabels = _make_multilabel_split(
            patient_ids, arr, records, seed, fractions, label_fraction
        )
    else:
        arr = arr.reshape(-1) if arr.ndim == 2 else arr
        split = _make_single_label_split(patient_ids, arr, records, seed, fractions, label_fraction)
        plabels = None
    return _with_stratification(split, patient_keys(patient_ids, records), arr, plabels)


def _make_single_label_split(
    patient_ids, labels, records, seed, fractions, label_fraction
) -> Split:
    """The single-label rules of the module docstring (per-class shuffles and nearest-rounded counts)."""
    _, val_fraction, test_fraction = check_fractions(fractions)
    keys = patient_keys(patient_ids, records)
    labels = np.asarray(labels, dtype=np.float64)
    if labels.shape != keys.shape:
        raise ValueError(f"labels {labels.shape} and patient_ids {keys.shape} differ in shape")
    plabels = patient_labels(keys, labels)
    by_class: dict[int, list[str]] = {0: [], 1: []}
    for p in sorted(plabels):
        by_class[plabels[p]].append(p)
    if not np.isfinite(labels).any():
        raise UserError(
            f"data labels: no record has a known label ({len(labels)} records, all unknown); choose a "
            "label column with --config.data.label, or attach labels with prepare --labels"
        )
    for c, name in ((0, "negative"), (1, "positive")):
        if len(by_class[c]) < 3:
            raise UserError(
                f"data labels: need at least 3 {name} patients for a train/val/test split, "
                f"found {len(by_class[c])}"
            )
    rng = np.random.default_rng([int(seed), 0])
    train_p, val_p, test_p = _stratified_partition(by_class, rng, val_fraction, test_fraction)
    finetune_p = label_fraction_subset(train_p, plabels, label_fraction, seed)

    parts = {"train": train_p, "val": val_p, "test": test_p, "finetune": finetune_p}
    return _assemble_split(keys, ~np.isnan(labels), seed, parts, label_fraction, "random")


# ------------------------------------------------------------------------------------------ multi-label
def patient_label_matrix(keys: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Patient key -> (C,) float64 label vector: per class the rounded mean (half to even) of its ECGs' known
    labels, NaN where none is known. Patients without any known entry are absent. labels: (N, C), NaN = unknown."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for k, y in zip(keys, labels):
        known = np.isfinite(y)
        if not known.any():
            continue
        if k not in sums:
            sums[k] = np.zeros(labels.shape[1])
            counts[k] = np.zeros(labels.shape[1])
        sums[k] += np.where(known, y, 0.0)
        counts[k] += known
    out = {}
    for k in sums:
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(counts[k] > 0, np.round(sums[k] / counts[k]), np.nan)
    return out


def _argmax_ties(values: np.ndarray, *tiebreaks: np.ndarray) -> int:
    """Index of the largest `values`, ties broken by the largest of each next array in turn."""
    return int(np.lexsort(tuple(-np.asarray(t) for t in reversed(tiebreaks)) + (-values,))[0])


def iterative_stratification(
    y: np.ndarray, ratios: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """(n,) subset index in [0, len(ratios)) per row of y (n, C) 0/1/NaN (NaN counts as not positive), by the
    iterative stratification of Sechidis et al. (2011); see the module docstring."""
    pos = np.nan_to_num(np.asarray(y, dtype=np.float64)) > 0.5
    n = pos.shape[0]
    ratios = np.asarray(ratios, dtype=np.float64)
    want = ratios * n  # patients each subset still wants
    want_c = (
        ratios[:, None] * pos.sum(0)[None, :]
    )  # (k, C) positives of each class each subset wants
    assign = np.full(n, -1, dtype=np.int64)
    free = np.ones(n, dtype=bool)
    while True:
        left = pos[free].sum(0)
        live = np.flatnonzero(left > 0)
        if not len(live):
            break
        order = rng.permutation(len(live))  # ties between equally rare classes: seeded
        c = int(live[order[np.argmin(left[live][order])]])
        rows = np.flatnonzero(free & pos[:, c])
        for r in rows[rng.permutation(len(rows))]:
            j = _argmax_ties(want_c[:, c], want, rng.random(len(ratios)))
            assign[r] = j
            free[r] = False
            want[j] -= 1
            want_c[j] -= pos[r]
    rows = np.flatnonzero(free)
    for r in rows[rng.permutation(len(rows))]:
        j = _argmax_ties(want, rng.random(len(ratios)))
        assign[r] = j
        want[j] -= 1
    return assign


def stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded order of the rows of y (n, C) 0/1/NaN whose every prefix keeps each class's positive rate close
    to the whole's (greedy, see the module docstring). Rows with one label pattern keep a seeded order among
    themselves, so the work grows with the number of distinct patterns, not rows squared."""
    y = np.asarray(y, dtype=np.float64)
    known = np.isfinite(y)
    vals = np.where(known, y, 0.0)
    n_known = known.sum(0)
    rate = np.divide(vals.sum(0), n_known, out=np.zeros(y.shape[1]), where=n_known > 0)
    var = rate * (1 - rate)
    w = np.divide(1.0, var, out=np.zeros_like(var), where=var > 0)
    pattern = np.where(known, vals, -1.0)
    uniq, inverse = np.unique(pattern, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    members = []
    for u in range(len(uniq)):
        rows = np.flatnonzero(inverse == u)
        members.append(list(rows[rng.permutation(len(rows))]))
    delta = np.where(uniq >= 0, uniq - rate, 0.0)  # (P, C): change of (positives - rate x known)
    left = np.array([len(m) for m in members])
    prio = rng.random(len(uniq))
    d = np.zeros(y.shape[1])
    nxt = np.zeros(len(uniq), dtype=np.int64)
    order = np.empty(len(y), dtype=np.int64)
    for step in range(len(y)):
        cost = ((d + delta) ** 2 * w).sum(1)
        cost[left == 0] = np.inf
        u = int(np.lexsort((prio, cost))[0])
        order[step] = members[u][nxt[u]]
        nxt[u] += 1
        left[u] -= 1
        d += delta[u]
    return order


def multilabel_fraction_subset(
    train_patients: Sequence[str], plabels: dict[str, np.ndarray], fraction: float, seed: int
) -> list[str]:
    """`ceil(fraction * n)` (at least 1) of the n training patients: a prefix of `stratified_order` (seeded), so
    nested in `fraction` for one seed."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"config.label_fraction: must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return sorted(train_patients)
    pats = sorted(train_patients)
    if not pats:
        return []
    order = stratified_order(
        np.stack([plabels[p] for p in pats]), np.random.default_rng([int(seed), 1])
    )
    k = max(1, math.ceil(fraction * len(pats)))
    return sorted(pats[i] for i in order[:k])


def fraction_subset(train_patients, plabels: dict, fraction: float, seed: int) -> list[str]:
    """The label-fraction subset: `label_fraction_subset` for single-label patient labels (int), else
    `multilabel_fraction_subset`."""
    if plabels and not np.isscalar(next(iter(plabels.values()))):
        return multilabel_fraction_subset(train_patients, plabels, fraction, seed)
    return label_fraction_subset(train_patients, plabels, fraction, seed)


def _assemble_split(
    keys: np.ndarray,
    known: np.ndarray,
    seed: int,
    parts: dict[str, list[str]],
    label_fraction: float,
    rule: str,
    eval_rows: dict[str, np.ndarray] | None = None,
    held_out: set | None = None,
    info: dict | None = None,
) -> Split:
    """Split from patient lists (parts: train, val, test, finetune). known: (N,) bool, the labeled ECGs.
    eval_rows: val/test rows when given (fold splits), else one seeded labeled ECG per patient. held_out: the
    patients kept out of the pretraining pool (default: the val and test patients)."""
    str_keys = keys.astype(str)

    def all_rows(pats):
        return np.flatnonzero(known & np.isin(str_keys, list(pats))).astype(np.int64)

    if eval_rows is None:
        rows_of: dict[str, list[int]] = {}
        for i in np.flatnonzero(known):
            rows_of.setdefault(keys[i], []).append(int(i))
        pick_rng = np.random.default_rng([int(seed), 2])

        def one_per_patient(pats):
            picks = [rows_of[p][pick_rng.integers(len(rows_of[p]))] for p in sorted(pats)]
            return np.sort(np.array(picks, dtype=np.int64))

        eval_rows = {"val": one_per_patient(parts["val"])}
        eval_rows["test"] = one_per_patient(parts["test"])
    held = set(parts["val"]) | set(parts["test"]) if held_out is None else held_out
    pool_rows = np.flatnonzero(~np.isin(str_keys, list(held))).astype(np.int64)
    split = Split(
        seed=int(seed),
        train=all_rows(parts["train"]),
        finetune=all_rows(parts["finetune"]),
        val=np.sort(eval_rows["val"]).astype(np.int64),
        test=np.sort(eval_rows["test"]).astype(np.int64),
        pretrain=pool_rows,
        train_patients=sorted(parts["train"]),
        finetune_patients=sorted(parts["finetune"]),
        val_patients=sorted(parts["val"]),
        test_patients=sorted(parts["test"]),
        pretrain_patients=sorted(set(keys[pool_rows].tolist())),
        label_fraction=float(label_fraction),
        rule=rule,
        info=dict(info or {}),
    )
    check_split(split, keys)
    return split


def _make_multilabel_split(
    patient_ids, labels, records, seed, fractions, label_fraction
) -> tuple[Split, dict]:
    """The multi-label rules of the module docstring (iterative stratification over patients); also returns
    the patient label vectors it stratified (`patient_label_matrix`)."""
    fractions = check_fractions(fractions)
    keys = patient_keys(patient_ids, records)
    if labels.shape[0] != keys.shape[0]:
        raise ValueError(f"labels {labels.shape} and patient_ids {keys.shape} differ in shape")
    known = np.isfinite(labels).any(axis=1)
    if not known.any():
        raise UserError(
            f"data labels: no record has a known label ({len(labels)} records, all unknown); choose a "
            "task with --config.data.task, or attach labels with prepare --labels"
        )
    plabels = patient_label_matrix(keys, labels)
    pats = sorted(plabels)
    if len(pats) < 3:
        raise UserError(
            f"data labels: need at least 3 labeled patients for a train/val/test split, found {len(pats)}"
        )
    assign = iterative_stratification(
        np.stack([plabels[p] for p in pats]), fractions, np.random.default_rng([int(seed), 0])
    )
    parts = {
        name: [p for p, a in zip(pats, assign) if a == j]
        for j, name in enumerate(("train", "val", "test"))
    }
    parts["finetune"] = multilabel_fraction_subset(parts["train"], plabels, label_fraction, seed)
    return _assemble_split(keys, known, seed, parts, label_fraction, "random"), plabels


def _with_stratification(split: Split, keys: np.ndarray, labels, plabels=None) -> Split:
    """`split` with info['stratification'] (see `stratification`)."""
    info = {**split.info, "stratification": stratification(split, keys, labels, plabels)}
    return dataclasses.replace(split, info=info)


def stratification(split: Split, keys: np.ndarray, labels, plabels: dict | None = None) -> dict:
    """How close the split kept each class's ratio: per class the patient-level positive rate in train, finetune,
    val and test (patients with a known value of that class), and `max_abs_diff`, the largest absolute
    difference between two of those rates (per class, and `max` over classes). plabels: the patients'
    `patient_label_matrix(keys, labels)` when already computed."""
    labels = np.asarray(labels, dtype=np.float64)
    if plabels is None:
        plabels = patient_label_matrix(np.asarray(keys, dtype=object), labels)
    n_classes = 1 if labels.ndim == 1 else labels.shape[1]
    rates = {}
    for name in ("train", "finetune", "val", "test"):
        pats = [p for p in getattr(split, f"{name}_patients") if p in plabels]
        y = np.stack([plabels[p] for p in pats]) if pats else np.full((0, n_classes), np.nan)
        n = np.isfinite(y).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rates[name] = np.where(n > 0, np.nansum(y, 0) / np.maximum(n, 1), np.nan)
    table = np.stack(list(rates.values()))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class no split knows: NaN
        diff = np.nanmax(table, 0) - np.nanmin(table, 0)
    return {
        "positive_rate": {k: [round(float(v), 6) for v in r] for k, r in rates.items()},
        "max_abs_diff": [round(float(v), 6) for v in diff],
        "max": round(float(np.nanmax(diff)), 6) if np.isfinite(diff).any() else math.nan,
        "measure": "per class: largest absolute difference of the patient-level positive rate between "
        "train, finetune, val and test",
    }


# ------------------------------------------------------------------------------------------ fold splits
def fold_value(v) -> str | None:
    """A fold as text ('3' for 3, 3.0, '3', ' 3 '); None when missing (NaN, None, '')."""
    if v is None:
        return None
    if isinstance(v, (float, np.floating)) and not np.isfinite(v):
        return None
    t = str(v).strip()
    if t in ("", "nan", "NaN", "None", "<NA>"):
        return None
    try:
        f = float(t)
    except ValueError:
        return t
    return str(int(f)) if f.is_integer() else t


def make_fold_split(
    patient_ids: Sequence[str],
    labels,
    records: Sequence[str],
    folds: Sequence,
    seed: int,
    train_folds: Sequence,
    val_folds: Sequence,
    test_folds: Sequence,
    label_fraction: float,
    column: str,
    field: str = "config.split",
) -> Split:
    """The dataset's own folds as train/val/test (see the module docstring); fixed, only the label-fraction subset
    depends on `seed`. folds: (N,) fold per record (None/NaN/'' = missing); labels (N,) or (N, C)."""
    keys = patient_keys(patient_ids, records)
    labels = np.asarray(labels, dtype=np.float64)
    lab2 = labels[:, None] if labels.ndim == 1 else labels
    if lab2.shape[0] != keys.shape[0] or len(folds) != len(keys):
        raise ValueError(
            f"labels {labels.shape}, folds ({len(folds)},) and records {keys.shape} differ"
        )
    sets = {}
    for name, fs in (("train", train_folds), ("val", val_folds), ("test", test_folds)):
        vals = [fold_value(f) for f in fs]
        if not vals or None in vals:
            raise UserError(f"{field}.{name}_folds: give one or more folds (got {tuple(fs)!r})")
        sets[name] = set(vals)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = sets[a] & sets[b]
        if common:
            raise UserError(
                f"{field}.{b}_folds: fold(s) {', '.join(sorted(common))} also in {field}.{a}_folds"
            )
    fold = np.array([fold_value(f) for f in folds], dtype=object)
    has_fold = np.array([f is not None for f in fold])
    folds_of: dict[str, set] = {}
    for k, f in zip(keys[has_fold], fold[has_fold]):
        folds_of.setdefault(k, set()).add(f)
    multi = sorted(k for k, fs in folds_of.items() if len(fs) > 1)
    if multi:
        shown = sorted(folds_of[multi[0]], key=lambda x: (len(x), x))
        raise LeakageError(
            f"{field}.fold_column: patient {multi[0]} has records in folds {', '.join(shown)} of column "
            f"'{column}' ({len(multi)} patient(s) in more than one fold); a fold split needs each patient "
            "in one fold",
            len(multi),
        )
    known = np.isfinite(lab2).any(axis=1)
    in_split = {name: known & np.isin(fold, list(s)) for name, s in sets.items()}
    used = set().union(*sets.values())
    plabels_all = (
        patient_label_matrix(keys, lab2) if lab2.shape[1] > 1 else patient_labels(keys, lab2[:, 0])
    )
    parts = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(in_split[name])
        if not len(rows):
            raise UserError(
                f"{field}.{name}_folds: no labeled record in fold(s) "
                f"{', '.join(sorted(sets[name], key=lambda x: (len(x), x)))} of column '{column}'"
            )
        parts[name] = sorted(set(keys[rows].tolist()))
    plabels = {p: plabels_all[p] for p in parts["train"] if p in plabels_all}
    parts["finetune"] = fraction_subset(sorted(plabels), plabels, label_fraction, seed)
    held = set(keys[np.isin(fold, list(sets["val"] | sets["test"]))].tolist())
    info = {
        "rule": "folds",
        "folds": {
            "column": column,
            **{f"{n}_folds": sorted(sets[n], key=lambda x: (len(x), x)) for n in sets},
            "records_without_fold": int((~has_fold).sum()),
            "labeled_records_without_fold": int((~has_fold & known).sum()),
            "records_in_other_folds": int((has_fold & ~np.isin(fold, list(used))).sum()),
        },
    }
    eval_rows = {n: np.flatnonzero(in_split[n]) for n in ("val", "test")}
    # training rows: the labeled ECGs in the training folds (a training patient's fold-less records stay out)
    split = _assemble_split(
        keys, in_split["train"], seed, parts, label_fraction, "folds", eval_rows, held, info
    )
    return _with_stratification(split, keys, lab2, plabels_all if lab2.shape[1] > 1 else None)


def check_pool(pool_patients, val_patients, test_patients, where: str = "pretraining pool") -> None:
    """Raises LeakageError if any pretraining patient is a validation or test patient."""
    leaked = sorted(set(pool_patients) & (set(val_patients) | set(test_patients)))
    if leaked:
        shown = ", ".join(leaked[:5]) + (" ..." if len(leaked) > 5 else "")
        raise LeakageError(
            f"{where}: {len(leaked)} validation/test patient(s) would be seen during pretraining "
            f"({shown})",
            len(leaked),
        )


def check_encoder_pool(
    pretrain_patients, pretrain_records, split: Split, keys, records, where: str = "encoder"
) -> None:
    """Raises LeakageError if a loaded encoder saw a validation/test patient: by patient key, or by record path (the
    same recordings prepared into another dataset, where the patient ids may differ or be missing)."""
    seen_records = {str(r) for r in pretrain_records}
    by_recording = {str(k) for r, k in zip(records, keys) if str(r) in seen_records}
    check_pool(
        {str(p) for p in pretrain_patients} | by_recording,
        split.val_patients,
        split.test_patients,
        where=f"{where} (by patient id or by recording)",
    )


def check_split(split: Split, keys: np.ndarray) -> None:
    """Asserts the split's invariants on its final row indices (raises, never `assert`, so -O keeps it)."""
    keys = np.asarray(keys, dtype=object)
    sets = {
        name: set(keys[getattr(split, name)].tolist())
        for name in ("train", "val", "test", "pretrain")
    }
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = sets[a] & sets[b]
        if common:
            raise LeakageError(
                f"split seed {split.seed}: patient(s) in both {a} and {b}: {sorted(common)[:5]}"
            )
    for name in ("val", "test") if split.rule == "random" else ():
        rows = getattr(split, name)
        if len(sets[name]) != len(rows):
            raise LeakageError(
                f"split seed {split.seed}: {name} has more than one ECG for some patient"
            )
    if not set(split.finetune.tolist()) <= set(split.train.tolist()):
        raise LeakageError(
            f"split seed {split.seed}: fine-tuning records outside the training split"
        )
    check_pool(
        sets["pretrain"],
        sets["val"],
        sets["test"],
        where=f"split seed {split.seed}: pretraining pool",
    )
    check_pool(
        split.pretrain_patients,
        split.val_patients,
        split.test_patients,
        where=f"split seed {split.seed}: pretraining pool",
    )


def split_dataset(dataset, seed: int, fractions, label_fraction: float, labels=None) -> Split:
    """`make_split` on an `ecgcl_jax.data.Dataset` (its patient_ids, records, and labels unless `labels`, (N,)
    or (N, C), is given)."""
    return make_split(
        dataset.patient_ids,
        dataset.labels if labels is None else labels,
        dataset.records,
        seed,
        fractions,
        label_fraction=label_fraction,
    )
