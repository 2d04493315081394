"""Metrics against hand-worked examples, the t interval against a hand computation, tables and plots."""

import csv
import math

import pytest

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
