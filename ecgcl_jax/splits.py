"""Patient-level splits for the evaluation protocol, and the leakage-free pretraining pool.

Every function here works on plain per-record arrays (`patient_ids`, `labels`, `records`, all (N,)), so the
rules can be tested on hand-made tables without a dataset.

Rules (SPEC "Fine-tuning and evaluation protocol", issue 7):
- A record without a patient id is its own patient, keyed `"record:<record path>"` (the same key the exported
  encoder records in `pretrain_patients`).
- A patient's label is the rounded mean of the known labels of its ECGs (NaN = unknown, ignored). A mean of
  exactly 0.5 rounds to 0, as `numpy.round` (round half to even) does; patients with no known label are not in
  the labeled splits (their ECGs still go to the pretraining pool).
- Labeled patients are split as the SPEC's train/rest 70/30, then rest 50/50 into validation/test, with
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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ecgcl_jax.errors import UserError

RULE = "per class: rest = nearest(n (val + test)), test = nearest(rest test / (val + test))"  # in eval_config.json
FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test: the SPEC's 70/30, then the rest 50/50
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
    labels: Sequence[float],
    records: Sequence[str],
    seed: int,
    fractions: Sequence[float] = FRACTIONS,
    label_fraction: float = 1.0,
) -> Split:
    """Patient-level stratified split of one repeat.

    patient_ids: (N,) str ("" = unknown); labels: (N,) float 1/0/NaN; records: (N,) str unique record paths.
    seed: the repeat's seed (all choices are a function of it and the inputs only).
    """
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

    known = ~np.isnan(labels)
    rows_of: dict[str, list[int]] = {}
    for i in np.flatnonzero(known):
        rows_of.setdefault(keys[i], []).append(int(i))
    pick_rng = np.random.default_rng([int(seed), 2])

    def one_per_patient(pats):
        return np.sort(
            np.array(
                [rows_of[p][pick_rng.integers(len(rows_of[p]))] for p in sorted(pats)],
                dtype=np.int64,
            )
        )

    str_keys = keys.astype(str)

    def all_rows(pats):
        return np.flatnonzero(known & np.isin(str_keys, list(pats))).astype(np.int64)

    val_rows, test_rows = one_per_patient(val_p), one_per_patient(test_p)
    held_out = set(val_p) | set(test_p)
    pool_rows = np.flatnonzero(~np.isin(str_keys, list(held_out))).astype(np.int64)
    split = Split(
        seed=int(seed),
        train=all_rows(train_p),
        finetune=all_rows(finetune_p),
        val=val_rows,
        test=test_rows,
        pretrain=pool_rows,
        train_patients=sorted(train_p),
        finetune_patients=finetune_p,
        val_patients=sorted(val_p),
        test_patients=sorted(test_p),
        pretrain_patients=sorted(set(keys[pool_rows].tolist())),
        label_fraction=float(label_fraction),
    )
    check_split(split, keys)
    return split


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
    for name in ("val", "test"):
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


def split_dataset(dataset, seed: int, fractions=FRACTIONS, label_fraction: float = 1.0) -> Split:
    """`make_split` on an `ecgcl_jax.data.Dataset` (its patient_ids, labels, records)."""
    return make_split(
        dataset.patient_ids, dataset.labels, dataset.records, seed, fractions, label_fraction
    )
