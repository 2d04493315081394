"""Metrics against hand-worked examples, the t interval against a hand computation, tables and plots."""

import csv
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ecgcl_jax import metrics


def test_binary_scores_hand_example():
    # Classic example: scores 0.1 0.4 | 0.35 0.8 for labels 0 0 | 1 1.
    # Pairs (pos > neg): 0.35>0.1, 0.8>0.1, 0.8>0.4; 0.35<0.4  -> AUROC = 3/4.
    # Ranked: 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 1/2 * (1/1) + 1/2 * (2/3) = 5/6.
    # Threshold 0.5: predictions 0 0 0 1 -> TP 1, FP 0, FN 1, TN 2.
    s = metrics.binary_scores([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert s["auroc"] == pytest.approx(0.75)
    assert s["auprc"] == pytest.approx(5 / 6)
    assert s["accuracy"] == pytest.approx(3 / 4)
    assert s["precision"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert set(s) == set(metrics.METRICS)


def test_binary_scores_threshold_ties_and_degenerate():
    # p == 0.5 counts as positive; one false positive, one true positive, one FN.
    s = metrics.binary_scores([1, 0, 1, 0, 0], [0.5, 0.7, 0.2, 0.1, 0.3])
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(3 / 5)
    # AUROC by pair counting: positives 0.5, 0.2 vs negatives 0.7, 0.1, 0.3 -> 0.5 beats 0.1, 0.3; 0.2 beats 0.1
    assert s["auroc"] == pytest.approx(3 / 6)
    one_class = metrics.binary_scores([1, 1, 1], [0.2, 0.6, 0.9])
    assert math.isnan(one_class["auroc"]) and math.isnan(one_class["auprc"])
    none_pred = metrics.binary_scores([0, 1], [0.1, 0.2])
    assert none_pred["precision"] == 0.0 and none_pred["f1"] == 0.0


def test_summary_t_interval_hand_computation():
    v = [0.8, 0.7, 0.9]
    s = metrics.summarize(v)
    # mean 0.8; sample sd = sqrt((0.01 + 0.01 + 0) / 2) = 0.1; t_{0.975, 2} = 4.302653 (t table)
    assert s["mean"] == pytest.approx(0.8)
    assert s["sd"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert s["ci95_normal"] == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    assert (s["min"], s["max"], s["n"]) == (pytest.approx(0.7), pytest.approx(0.9), 3)
    # K = 5: t_{0.975, 4} = 2.776445
    v5 = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert metrics.summarize(v5)["ci95"] == pytest.approx(
        2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6
    )
    one = metrics.summarize([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["ci95"]) and math.isnan(one["ci95_normal"])


def _methods():
    reps = [
        {"seed": s, "test": {m: 0.5 + 0.1 * i for m in metrics.METRICS}}
        for i, s in enumerate((321, 123, 51))
    ]
    summ = metrics.summarize_repeats(reps)
    return {
        "finetune": {"repeats": reps, "summary": summ},
        "random_init": {"repeats": reps, "summary": summ},
    }


def test_tables(tmp_path):
    methods = _methods()
    rows = metrics.table_rows(methods)
    metrics.write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 * len(metrics.METRICS)
    assert got[0]["method"] == "finetune" and got[0]["metric"] == "auroc"
    assert float(got[0]["mean"]) == pytest.approx(0.6)
    md = metrics.markdown_table(methods, title="t")
    assert "| pretrained, fine-tuned | 3 | 0.600 ± " in md
    assert md.count("\n|") >= 4


def test_plots(tmp_path):
    metrics.plot_val_curves(
        {"finetune": {321: [0.5, 0.6, 0.7], 123: [0.4, 0.5, 0.55]}}, tmp_path / "v.png"
    )
    fpr, tpr = metrics.roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    metrics.plot_roc(
        {"finetune": {321: (fpr, tpr, 0.75)}, "linear_probe": {321: (fpr, tpr, 0.75)}},
        tmp_path / "r.png",
    )
    metrics.plot_sweep(
        [0.1, 0.5, 1.0],
        {"finetune": ([0.6, 0.7, 0.8], [0.05, float("nan"), 0.02])},
        tmp_path / "s.png",
        xlabel="label fraction",
    )
    for name in ("v.png", "r.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multilabel_scores_against_sklearn_a_one_valued_class_is_left_out_and_counted():
    nan = float("nan")
    # class a: all known, both values; class b: two unknowns, both values among the known;
    # class c: only 0 among its known labels -> no AUROC, left out of the macro means
    y = np.array(
        [[1, 0, 0], [0, 1, 0], [1, nan, 0], [0, 1, nan], [1, 0, 0], [0, nan, 0], [0, 0, 0]]
    )
    p = np.array(
        [
            [0.9, 0.2, 0.1],
            [0.3, 0.8, 0.4],
            [0.6, 0.5, 0.3],
            [0.4, 0.3, 0.9],
            [0.2, 0.1, 0.2],
            [0.1, 0.9, 0.5],
            [0.5, 0.4, 0.6],
        ]
    )
    s = metrics.scores(y, p, ["a", "b", "c"])
    ka, kb = slice(None), ~np.isnan(y[:, 1])
    auc_a, auc_b = roc_auc_score(y[ka, 0], p[ka, 0]), roc_auc_score(y[kb, 1], p[kb, 1])
    ap_a, ap_b = (
        average_precision_score(y[ka, 0], p[ka, 0]),
        average_precision_score(y[kb, 1], p[kb, 1]),
    )
    assert s["classes_used"] == 2
    assert s["macro_auroc"] == pytest.approx((auc_a + auc_b) / 2)
    assert s["macro_auprc"] == pytest.approx((ap_a + ap_b) / 2)
    known = ~np.isnan(y)
    assert s["micro_auroc"] == pytest.approx(roc_auc_score(y[known], p[known]))
    assert s["per_class"]["b"]["auroc"] == pytest.approx(auc_b)
    assert s["per_class"]["b"]["known"] == 5 and s["per_class"]["b"]["positives"] == 2
    assert math.isnan(s["per_class"]["c"]["auroc"]) and s["per_class"]["c"]["positives"] == 0
    assert "auroc" not in s  # the binary set belongs to one label
    # the rank-sum AUROC of the bootstrap equals scikit-learn's, ties and unknowns included
    cols = metrics.auroc_columns(y, np.round(p, 1))
    assert cols[1] == pytest.approx(roc_auc_score(y[kb, 1], np.round(p[kb, 1], 1)))
    assert cols[0] == pytest.approx(roc_auc_score(y[:, 0], np.round(p[:, 0], 1)))
    assert math.isnan(cols[2])
    # one label (C = 1): today's binary set, and the macro figures are exactly its AUROC / AUPRC
    one = metrics.scores([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    binary = metrics.binary_scores([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert {k: one[k] for k in binary} == binary
    assert one["macro_auroc"] == one["micro_auroc"] == binary["auroc"] == 0.75
    assert one["macro_auprc"] == binary["auprc"] and one["classes_used"] == 1


def _percentile_bootstrap(y, probs, groups, resamples, seed, pairs):
    """Independent re-implementation: resample patients, score with scikit-learn, 2.5/97.5 percentiles."""

    patients = list(dict.fromkeys(groups))
    rows_of = {g: [i for i, x in enumerate(groups) if x == g] for g in patients}
    rng = np.random.default_rng(seed)
    stats = {m: [] for m in probs}
    for _ in range(resamples):
        pick = rng.integers(0, len(patients), size=len(patients))
        rows = [r for i in pick for r in rows_of[patients[i]]]
        for m, p in probs.items():
            aucs = []
            for j in range(y.shape[1]):
                yj = y[rows, j]
                known = ~np.isnan(yj)
                if len(set(yj[known])) == 2:
                    aucs.append(roc_auc_score(yj[known], p[rows, j][known]))
            stats[m].append(np.mean(aucs) if aucs else np.nan)
    stats = {m: np.array(v) for m, v in stats.items()}

    def iv(v):
        v = v[np.isfinite(v)]
        return np.percentile(v, 2.5), np.percentile(v, 97.5), len(v)

    return {m: iv(v) for m, v in stats.items()}, {
        f"{a} - {b}": iv(stats[a] - stats[b]) for a, b in pairs
    }


def test_bootstrap_against_a_numpy_percentile_bootstrap():
    rng = np.random.default_rng(5)
    n = 30
    groups = [f"p{i // 2}" if i < 10 else f"q{i}" for i in range(n)]  # 5 patients with 2 ECGs each
    y = (rng.uniform(size=(n, 2)) < 0.4).astype(np.float64)
    y[rng.uniform(size=(n, 2)) < 0.15] = np.nan
    good = np.clip(np.nan_to_num(y, nan=0.5) * 0.4 + rng.uniform(0, 0.6, (n, 2)), 0, 1)
    bad = rng.uniform(size=(n, 2))
    probs = {"a": good, "b": bad}
    got = metrics.bootstrap(y, probs, groups, resamples=200, seed=[7, 1], pairs=[("a", "b")])
    want, want_pairs = _percentile_bootstrap(y, probs, groups, 200, [7, 1], [("a", "b")])
    for m in probs:
        lo, hi, used = want[m]
        assert got["methods"][m]["low"] == pytest.approx(lo, abs=1e-9)
        assert got["methods"][m]["high"] == pytest.approx(hi, abs=1e-9)
        assert got["methods"][m]["resamples_used"] == used
    lo, hi, _ = want_pairs["a - b"]
    assert got["pairs"]["a - b"]["low"] == pytest.approx(lo, abs=1e-9)
    assert got["pairs"]["a - b"]["high"] == pytest.approx(hi, abs=1e-9)
    # the informative predictions are better than noise on every resample's patients
    assert got["methods"]["a"]["low"] > 0.5 and got["pairs"]["a - b"]["low"] > 0


def test_intervals_outside_the_range_are_marked_and_explained():
    wide = [{"seed": s, "test": {m: v for m in metrics.METRICS}} for s, v in ((1, 0.2), (2, 0.9))]
    md = metrics.markdown_table(
        {"finetune": {"repeats": wide, "summary": metrics.summarize_repeats(wide)}}
    )
    # K = 2: mean 0.55, half-width 12.706 * 0.495 / sqrt(2) = 4.45 -> outside [0, 1]
    assert "0.550 ± 4.447† [0.200, 0.900]" in md
    assert "runs outside the metric's range [0, 1]; shown unclipped" in md and "= 12.71" in md
    narrow = [
        {"seed": s, "test": {m: v for m in metrics.METRICS}} for s, v in ((1, 0.5), (2, 0.51))
    ]
    md = metrics.markdown_table(
        {"finetune": {"repeats": narrow, "summary": metrics.summarize_repeats(narrow)}}
    )
    assert "†" not in md
    # a difference lives in [-1, 1]
    paired = {
        "finetune - random_init": {
            "metric": "macro_auroc",
            "repeats": [{"seed": 1, "difference": 0.3}, {"seed": 2, "difference": -0.2}],
            "summary": metrics.summarize([0.3, -0.2]),
        }
    }
    md = metrics.paired_markdown(paired)
    assert "0.050 ± 3.177† [-0.200, 0.300]" in md and "range [-1, 1]" in md
