"""Split invariants on hand-made patient tables."""

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
    s = splits.make_split(pids, labels, records, seed=321, label_fraction=1.0)
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
    # the reference: train/rest 70/30, then rest 50/50 into val/test, per class. Worked by hand:
    #   positives 8 + 2 id-less = 10: rest = nearest(3.0) = 3, test = nearest(1.5) = 2, val 1, train 7
    #   negatives 18 + 4 id-less = 22: rest = nearest(6.6) = 7, test = nearest(3.5) = 4, val 3, train 15
    pids, labels, records, truth = make_table(n_pos=8, n_neg=18)
    for seed in (321, 123, 51):
        s = splits.make_split(pids, labels, records, seed=seed, label_fraction=1.0)
        assert _class_counts(s, truth) == {1: (1, 2, 7), 0: (3, 4, 15)}
    #   positives 14: rest = nearest(4.2) = 4 -> 2 / 2, train 10; negatives 32: rest = nearest(9.6) = 10 -> 5 / 5
    pids, labels, records, truth = make_table(n_pos=12, n_neg=28)
    s = splits.make_split(pids, labels, records, seed=321, label_fraction=1.0)
    assert _class_counts(s, truth) == {1: (2, 2, 10), 0: (5, 5, 22)}


def test_custom_fractions_and_small_class():
    pids, labels, records, truth = make_table(n_pos=3, n_neg=40)
    s = splits.make_split(
        pids, labels, records, seed=1, fractions=(0.6, 0.2, 0.2), label_fraction=1.0
    )
    # every class with >= 3 patients reaches validation and test
    for pats in (s.val_patients, s.test_patients):
        assert {truth[p] for p in pats} == {0, 1}
    # by hand: positives 3 + 2 = 5: rest = nearest(2.0) = 2 -> 1 / 1; negatives 40 + 4 = 44: rest = nearest(17.6)
    # = 18 -> 9 / 9
    assert _class_counts(s, truth) == {1: (1, 1, 3), 0: (9, 9, 26)}
    # a small class still gives one patient to each of val and test: 3 patients, rest = nearest(0.9) = 1 -> 1 / 1
    pids, labels, records, truth = make_table(n_pos=1, n_neg=40)
    s = splits.make_split(pids, labels, records, seed=1, label_fraction=1.0)
    assert _class_counts(s, truth)[1] == (1, 1, 1)


def test_seeded_reproducible_and_seed_dependent():
    pids, labels, records, _ = make_table()
    a = splits.make_split(pids, labels, records, seed=123, label_fraction=1.0)
    b = splits.make_split(pids, labels, records, seed=123, label_fraction=1.0)
    c = splits.make_split(pids, labels, records, seed=51, label_fraction=1.0)
    for k in ("train", "val", "test", "pretrain", "finetune"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.test_patients != c.test_patients


def test_label_fraction_stratified_and_nested():
    pids, labels, records, truth = make_table(n_pos=20, n_neg=40)
    full = splits.make_split(pids, labels, records, seed=7, label_fraction=1.0)
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
    s = splits.make_split(pids, labels, records, seed=3, label_fraction=1.0)
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
        splits.make_split(
            pids, labels, records, seed=0, fractions=(0.8, 0.15, 0.15), label_fraction=1.0
        )
    with pytest.raises(UserError, match="label_fraction"):
        splits.make_split(pids, labels, records, seed=0, label_fraction=0.0)
    with pytest.raises(UserError, match="positive patients"):
        splits.make_split(
            pids, np.where(labels == 1, 0.0, labels), records, seed=0, label_fraction=1.0
        )
    with pytest.raises(
        UserError, match=r"no record has a known label \(\d+ records, all unknown\)"
    ):
        splits.make_split(pids, np.full(len(labels), np.nan), records, seed=0, label_fraction=1.0)


def test_split_json_lists_patients():
    pids, labels, records, _ = make_table()
    s = splits.make_split(pids, labels, records, seed=321, label_fraction=1.0)
    j = s.to_json(records)
    assert set(j) >= {"train", "val", "test", "pretrain"}
    assert j["test"] == s.test_patients
    assert j["records"]["val"] == [records[i] for i in s.val]


# ------------------------------------------------------------------------------ multi-label and folds
def _frozen_single_label_split(patient_ids, labels, records, seed, fractions, label_fraction):
    """The single-label split as it was before multi-label tasks (a frozen copy of its steps): C = 1 splits
    must stay exactly these."""
    _, val_fraction, test_fraction = splits.check_fractions(fractions)
    keys = splits.patient_keys(patient_ids, records)
    labels = np.asarray(labels, dtype=np.float64)
    plabels = splits.patient_labels(keys, labels)
    by_class = {0: [], 1: []}
    for p in sorted(plabels):
        by_class[plabels[p]].append(p)
    rng = np.random.default_rng([int(seed), 0])
    train, val, test = [], [], []
    for c in sorted(by_class):
        members = list(by_class[c])
        rng.shuffle(members)
        n = len(members)
        n_rest = int(math.floor(n * (val_fraction + test_fraction) + 0.5 + 1e-9))
        n_test = int(
            math.floor(n_rest * test_fraction / (val_fraction + test_fraction) + 0.5 + 1e-9)
        )
        n_val = n_rest - n_test
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        while n_val + n_test > n - 1 and n_val + n_test > 0 and n > 1:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        val += members[:n_val]
        test += members[n_val : n_val + n_test]
        train += members[n_val + n_test :]
    fin = sorted(train)
    if label_fraction < 1.0:
        frng = np.random.default_rng([int(seed), 1])
        fin = []
        for c in (0, 1):
            members = sorted(p for p in train if plabels[p] == c)
            order = frng.permutation(len(members))
            fin += [members[i] for i in order[: max(1, math.ceil(label_fraction * len(members)))]]
        fin = sorted(fin)
    known = ~np.isnan(labels)
    rows_of = {}
    for i in np.flatnonzero(known):
        rows_of.setdefault(keys[i], []).append(int(i))
    pick = np.random.default_rng([int(seed), 2])
    val_rows = sorted(rows_of[p][pick.integers(len(rows_of[p]))] for p in sorted(val))
    test_rows = sorted(rows_of[p][pick.integers(len(rows_of[p]))] for p in sorted(test))
    return sorted(train), fin, sorted(val), sorted(test), val_rows, test_rows


@pytest.mark.parametrize("seed", [321, 123, 51, 7])
@pytest.mark.parametrize("frac", [1.0, 0.3])
def test_single_label_splits_unchanged(seed, frac):
    pids, labels, records, _ = make_table(n_pos=13, n_neg=31, seed=seed)
    want = _frozen_single_label_split(pids, labels, records, seed, splits.FRACTIONS, frac)
    for lab in (labels, labels[:, None]):  # (N,) and a task of one column (N, 1)
        s = splits.make_split(pids, lab, records, seed=seed, label_fraction=frac)
        got = (
            s.train_patients,
            s.finetune_patients,
            s.val_patients,
            s.test_patients,
            s.val.tolist(),
            s.test.tolist(),
        )
        assert got == want


def _multilabel_table(n=400, seed=0):
    """n patients (1-2 ECGs each) with 5 correlated classes of positive rates ~0.45/0.25/0.2/0.12/0.05."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 5)) < np.array([0.45, 0.25, 0.2, 0.12, 0.05])
    base[:, 3] |= base[:, 1] & (rng.random(n) < 0.3)  # correlated classes
    pids, labels = [], []
    for j in range(n):
        for _ in range(1 + j % 2):
            pids.append(f"P{j}")
            labels.append(base[j].astype(np.float32))
    labels = np.array(labels)
    labels[::17, 2] = np.nan  # some unknown entries
    return np.array(pids), labels, np.array([f"r{i}" for i in range(len(pids))])


def test_multilabel_split_keeps_each_class_ratio():
    pids, labels, records = _multilabel_table()
    keys = splits.patient_keys(pids, records)
    plab = splits.patient_label_matrix(keys, labels)
    for seed in (321, 123):
        s = splits.make_split(pids, labels, records, seed=seed, label_fraction=1.0)
        tr, va, te = (set(getattr(s, f"{k}_patients")) for k in ("train", "val", "test"))
        assert not (tr & va or tr & te or va & te) and tr | va | te == set(plab)
        assert abs(len(va) - 0.15 * len(plab)) <= 3 and abs(len(te) - 0.15 * len(plab)) <= 3
        # independent re-count: per class the patient-level positive rate in each split
        st = s.info["stratification"]
        worst = 0.0
        for c in range(5):
            rates = []
            for pats in (tr, va, te):
                y = np.array([plab[p][c] for p in pats])
                y = y[np.isfinite(y)]
                rates.append(y.mean())
            worst = max(worst, max(rates) - min(rates))
            assert (
                max(rates) - min(rates) <= 0.03
            )  # the stated tolerance: 3 points of positive rate
            # finetune == train at 1.0, so the three splits' spread is the reported one
            assert st["max_abs_diff"][c] == pytest.approx(max(rates) - min(rates), abs=1e-6)
        # val/test: one ECG per patient; the pool leaves them out
        assert len(set(keys[s.val])) == len(s.val) and not set(s.pretrain_patients) & (va | te)
        # label fraction: nested prefixes, each class's rate kept within the tolerance too
        prev = tr
        for frac in (0.5, 0.2):
            f = splits.make_split(pids, labels, records, seed=seed, label_fraction=frac)
            sub = set(f.finetune_patients)
            assert sub <= prev and len(sub) == math.ceil(frac * len(tr))
            assert f.test_patients == s.test_patients
            for c in range(5):
                y = np.array([plab[p][c] for p in sub])
                t = np.array([plab[p][c] for p in tr])
                assert abs(np.nanmean(y) - np.nanmean(t)) <= 0.03
            prev = sub


def test_iterative_stratification_beats_a_random_split():
    """Against a seeded random patient split of the same sizes, the class-rate gap is smaller on average."""
    pids, labels, records = _multilabel_table(n=300, seed=2)
    keys = splits.patient_keys(pids, records)
    plab = splits.patient_label_matrix(keys, labels)
    pats = sorted(plab)
    y = np.stack([plab[p] for p in pats])
    gaps_strat, gaps_rand = [], []
    for seed in range(5):
        a = splits.iterative_stratification(y, (0.7, 0.15, 0.15), np.random.default_rng(seed))
        b = np.random.default_rng(seed).permutation(np.repeat([0, 1, 2], [210, 45, 45]))
        for assign, out in ((a, gaps_strat), (b, gaps_rand)):
            r = np.array([np.nanmean(y[assign == j], 0) for j in range(3)])
            out.append((r.max(0) - r.min(0)).max())
    assert np.mean(gaps_strat) < 0.5 * np.mean(gaps_rand)


def test_fold_split_is_the_fold_column():
    pids, labels, records = _multilabel_table(n=120, seed=3)
    keys = splits.patient_keys(pids, records)
    pfold = {p: 1 + int(p[1:]) % 10 for p in set(keys.tolist())}
    folds = np.array([str(pfold[k]) for k in keys], dtype=object)
    folds[5] = ""  # a record without a fold: in no labeled split, counted
    folds[6] = np.nan

    def fold_split(seed, fraction=1.0, folds=folds, val=(9,), test=(10,)):
        return splits.make_fold_split(
            pids,
            labels,
            records,
            folds,
            seed,
            range(1, 9),
            val,
            test,
            fraction,
            column="strat_fold",
        )

    for seed in (1, 2):
        s = fold_split(seed, test=("10",))
        for name, fs in (("train", set(range(1, 9))), ("val", {9}), ("test", {10})):
            want = [
                i
                for i in range(len(keys))
                if folds[i] not in ("",) and folds[i] == folds[i] and int(folds[i]) in fs
            ]
            assert getattr(s, name).tolist() == want  # every labeled ECG of its folds
        assert s.info["folds"]["records_without_fold"] == 2
        held = {k for k in keys if pfold[k] in (9, 10)}
        assert set(s.pretrain_patients) == set(keys.tolist()) - held
    # fixed: another seed, the same split
    a, b = fold_split(1), fold_split(2)
    assert a.train_patients == b.train_patients and a.test.tolist() == b.test.tolist()
    # ...but the label-fraction subset varies with the seed
    a, b = fold_split(1, 0.3), fold_split(2, 0.3)
    assert a.finetune_patients != b.finetune_patients
    # a patient in two folds is refused, in one line
    bad = folds.copy()
    i, j = np.flatnonzero(keys == "P1")  # P1 has two ECGs
    bad[j] = "4"
    with pytest.raises(splits.LeakageError, match=r"patient P1 has records in folds 2, 4") as e:
        fold_split(1, folds=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"config.split.test_folds: fold\(s\) 9 also in"):
        fold_split(1, test=(9,))
