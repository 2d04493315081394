"""Split invariants on hand-made patient tables (issue 7)."""

import math

import numpy as np
import pytest

from ecgcl_jax import splits
from ecgcl_jax.errors import UserError


def make_table(n_pos=12, n_neg=28, seed=0):
    """Patients P0.. with 1-4 ECGs each, a few unlabeled ECGs, 6 records without a patient id, 3 patients
    whose ECGs are all unlabeled. Returns (patient_ids, labels, records, truth) with truth = patient -> label."""
    rng = np.random.default_rng(seed)
    pids, labels, truth = [], [], {}
    for j in range(n_pos + n_neg):
        y = 1.0 if j < n_pos else 0.0
        truth[f"P{j}"] = int(y)
        for _ in range(rng.integers(1, 5)):
            pids.append(f"P{j}")
            labels.append(y)
        if j % 7 == 0:  # an extra ECG with an unknown label
            pids.append(f"P{j}")
            labels.append(np.nan)
    for j in range(3):  # unlabeled patients: pretraining only
        pids += [f"U{j}"] * 2
        labels += [np.nan, np.nan]
    for j in range(6):  # no patient id: each its own patient
        pids.append("")
        labels.append(1.0 if j < 2 else 0.0)
    records = [f"rec/{i:04d}" for i in range(len(pids))]
    for i, p in enumerate(pids):
        if p == "":
            truth[f"record:{records[i]}"] = int(labels[i])
    return np.array(pids), np.array(labels, dtype=np.float32), np.array(records), truth


def test_patient_keys_and_label_rounding():
    keys = splits.patient_keys(
        ["a", "a", "", "b", "b", "b", "c", "c", "d"],
        ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8"],
    )
    assert list(keys) == ["a", "a", "record:r2", "b", "b", "b", "c", "c", "d"]
    labels = np.array([1, 0, 1, 1, 1, 0, 0, np.nan, np.nan])
    # a: mean 0.5 -> 0 (half to even); record:r2: 1; b: 2/3 -> 1; c: NaN ignored -> 0; d: unknown -> absent
    assert splits.patient_labels(keys, labels) == {"a": 0, "record:r2": 1, "b": 1, "c": 0}


def test_split_invariants():
    pids, labels, records, truth = make_table()
    keys = splits.patient_keys(pids, records)
    s = splits.make_split(pids, labels, records, seed=321)
    tr, va, te, pool = (set(keys[getattr(s, k)]) for k in ("train", "val", "test", "pretrain"))
    # no patient in two splits
    assert not (tr & va) and not (tr & te) and not (va & te)
    # every labeled patient is in exactly one split; unlabeled patients in none
    labeled = set(truth)
    assert tr | va | te == labeled
    # val/test: one ECG per patient, each with a known label
    for rows in (s.val, s.test):
        assert len(set(keys[rows])) == len(rows)
        assert not np.isnan(labels[rows]).any()
    # train: every labeled ECG of the training patients, and nothing else
    expected_train = [i for i in range(len(keys)) if keys[i] in tr and not np.isnan(labels[i])]
    assert sorted(s.train.tolist()) == expected_train
    # pool: all records (labeled or not) of every patient not in val/test, and no val/test patient
    expected_pool = [i for i in range(len(keys)) if keys[i] not in (va | te)]
    assert sorted(s.pretrain.tolist()) == expected_pool
    assert not pool & (va | te)
    assert {"U0", "U1", "U2"} <= pool
    assert set(s.pretrain_patients) == pool
    assert set(s.val_patients) == va and set(s.test_patients) == te and set(s.train_patients) == tr


def _class_counts(s, truth):
    """(val, test, train) patient counts of each class: {label: (n_val, n_test, n_train)}."""
    return {
        c: tuple(
            sum(truth[p] == c for p in pats)
            for pats in (s.val_patients, s.test_patients, s.train_patients)
        )
        for c in (0, 1)
    }


def test_stratification_counts_by_hand():
    # SPEC: train/rest 70/30, then rest 50/50 into val/test, per class. Worked by hand:
    #   positives 8 + 2 id-less = 10: rest = nearest(3.0) = 3, test = nearest(1.5) = 2, val 1, train 7
    #   negatives 18 + 4 id-less = 22: rest = nearest(6.6) = 7, test = nearest(3.5) = 4, val 3, train 15
    pids, labels, records, truth = make_table(n_pos=8, n_neg=18)
    for seed in (321, 123, 51):
        s = splits.make_split(pids, labels, records, seed=seed)
        assert _class_counts(s, truth) == {1: (1, 2, 7), 0: (3, 4, 15)}
    #   positives 14: rest = nearest(4.2) = 4 -> 2 / 2, train 10; negatives 32: rest = nearest(9.6) = 10 -> 5 / 5
    pids, labels, records, truth = make_table(n_pos=12, n_neg=28)
    s = splits.make_split(pids, labels, records, seed=321)
    assert _class_counts(s, truth) == {1: (2, 2, 10), 0: (5, 5, 22)}


def test_custom_fractions_and_small_class():
    pids, labels, records, truth = make_table(n_pos=3, n_neg=40)
    s = splits.make_split(pids, labels, records, seed=1, fractions=(0.6, 0.2, 0.2))
    # every class with >= 3 patients reaches validation and test
    for pats in (s.val_patients, s.test_patients):
        assert {truth[p] for p in pats} == {0, 1}
    # by hand: positives 3 + 2 = 5: rest = nearest(2.0) = 2 -> 1 / 1; negatives 40 + 4 = 44: rest = nearest(17.6)
    # = 18 -> 9 / 9
    assert _class_counts(s, truth) == {1: (1, 1, 3), 0: (9, 9, 26)}
    # a small class still gives one patient to each of val and test: 3 patients, rest = nearest(0.9) = 1 -> 1 / 1
    pids, labels, records, truth = make_table(n_pos=1, n_neg=40)
    s = splits.make_split(pids, labels, records, seed=1)
    assert _class_counts(s, truth)[1] == (1, 1, 1)


def test_seeded_reproducible_and_seed_dependent():
    pids, labels, records, _ = make_table()
    a = splits.make_split(pids, labels, records, seed=123)
    b = splits.make_split(pids, labels, records, seed=123)
    c = splits.make_split(pids, labels, records, seed=51)
    for k in ("train", "val", "test", "pretrain", "finetune"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.test_patients != c.test_patients


def test_label_fraction_stratified_and_nested():
    pids, labels, records, truth = make_table(n_pos=20, n_neg=40)
    full = splits.make_split(pids, labels, records, seed=7)
    keys = splits.patient_keys(pids, records)
    prev = set(full.finetune_patients)
    assert prev == set(full.train_patients)
    n_pos_tr = sum(truth[p] for p in full.train_patients)
    n_neg_tr = len(full.train_patients) - n_pos_tr
    for frac in (0.5, 0.25, 0.1, 0.01):
        s = splits.make_split(pids, labels, records, seed=7, label_fraction=frac)
        sub = set(s.finetune_patients)
        # val/test/pool unchanged by the label fraction
        assert s.val_patients == full.val_patients and s.test_patients == full.test_patients
        np.testing.assert_array_equal(s.pretrain, full.pretrain)
        assert sub <= set(s.train_patients) and sub <= prev
        assert sum(truth[p] for p in sub) == max(1, math.ceil(frac * n_pos_tr))
        assert sum(1 - truth[p] for p in sub) == max(1, math.ceil(frac * n_neg_tr))
        assert set(keys[s.finetune]) == sub and set(s.finetune) <= set(s.train)
        prev = sub


def test_pool_check_raises():
    with pytest.raises(splits.LeakageError, match="validation/test patient"):
        splits.check_pool(["a", "b", "c"], val_patients=["x"], test_patients=["c"])
    splits.check_pool(["a", "b"], ["x"], ["y"])  # no overlap: fine
    pids, labels, records, _ = make_table()
    s = splits.make_split(pids, labels, records, seed=3)
    keys = splits.patient_keys(pids, records)
    bad = splits.Split(
        **{**s.__dict__, "pretrain": np.sort(np.concatenate([s.pretrain, s.test[:1]]))}
    )
    with pytest.raises(splits.LeakageError):
        splits.check_split(bad, keys)
    assert issubclass(splits.LeakageError, UserError)


def test_bad_inputs_are_user_errors():
    pids, labels, records, _ = make_table()
    with pytest.raises(UserError, match="fractions"):
        splits.make_split(pids, labels, records, seed=0, fractions=(0.8, 0.15, 0.15))
    with pytest.raises(UserError, match="label_fraction"):
        splits.make_split(pids, labels, records, seed=0, label_fraction=0.0)
    with pytest.raises(UserError, match="positive patients"):
        splits.make_split(pids, np.where(labels == 1, 0.0, labels), records, seed=0)
    with pytest.raises(
        UserError, match=r"no record has a known label \(\d+ records, all unknown\)"
    ):
        splits.make_split(pids, np.full(len(labels), np.nan), records, seed=0)


def test_split_json_lists_patients():
    pids, labels, records, _ = make_table()
    s = splits.make_split(pids, labels, records, seed=321)
    j = s.to_json(records)
    assert set(j) >= {"train", "val", "test", "pretrain"}
    assert j["test"] == s.test_patients
    assert j["records"]["val"] == [records[i] for i in s.val]
