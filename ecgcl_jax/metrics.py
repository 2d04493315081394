"""Scores of one binary classifier (scikit-learn), summaries over repeats, result tables and plots.

- `binary_scores`: accuracy, precision, recall, F1 at a 0.5 threshold on the predicted probability, AUROC and
  PR-AUC (`auprc` = scikit-learn's average precision, the step-wise area under the precision-recall curve).
- `summarize`: mean, sample sd (ddof=1), min, max over the K repeats and two 95% half-widths:
  `ci95` = t_{0.975, K-1} * sd / sqrt(K) (Student t, the honest one for small K) and
  `ci95_normal` = 1.96 * sd / sqrt(K) (the reference's normal approximation). Both are NaN for K = 1.
- Tables (`results.md`, `results.csv`) and PNG plots drawn with matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats
from sklearn import metrics as skm

from ecgcl_jax.fileio import atomic_write

METRICS = ("auroc", "auprc", "f1", "accuracy", "precision", "recall")
"""Metric names, in table order."""

METHOD_TITLES = {
    "finetune": "pretrained, fine-tuned",
    "linear_probe": "pretrained, linear probe",
    "random_init": "random init, fine-tuned",
    "random_init_linear_probe": "random init, linear probe",
}


def binary_scores(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """labels: (N,) 0/1; probs: (N,) predicted P(label = 1). Returns METRICS -> float.

    AUROC and PR-AUC are NaN when `labels` holds a single class; precision/recall/F1 are 0 when undefined.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in shape")
    pred = (p >= threshold).astype(np.int64)
    both = len(np.unique(y)) == 2
    return {
        "auroc": float(skm.roc_auc_score(y, p)) if both else math.nan,
        "auprc": float(skm.average_precision_score(y, p)) if both else math.nan,
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
    }


def roc_points(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve (scikit-learn), for plots."""
    fpr, tpr, _ = skm.roc_curve(
        np.asarray(labels).astype(np.int64), np.asarray(probs, dtype=np.float64)
    )
    return fpr, tpr


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Summary of one metric over K repeats: mean, sd, ci95 (Student t), ci95_normal (1.96), min, max, n."""
    v = np.asarray(values, dtype=np.float64)
    k = len(v)
    if k == 0:
        nan = math.nan
        return {
            "mean": nan,
            "ci95": nan,
            "ci95_normal": nan,
            "sd": nan,
            "min": nan,
            "max": nan,
            "n": 0,
        }
    sd = float(np.std(v, ddof=1)) if k > 1 else math.nan
    se = sd / math.sqrt(k) if k > 1 else math.nan
    return {
        "mean": float(np.mean(v)),
        "ci95": float(scipy.stats.t.ppf(0.975, k - 1) * se) if k > 1 else math.nan,
        "ci95_normal": float(1.96 * se) if k > 1 else math.nan,
        "sd": sd,
        "min": float(np.min(v)),
        "max": float(np.max(v)),
        "n": k,
    }


def summarize_repeats(repeats: Sequence[Mapping], key: str = "test") -> dict[str, dict[str, float]]:
    """{metric: summarize([r[key][metric] for r in repeats])} for every metric in METRICS."""
    return {m: summarize([r[key][m] for r in repeats]) for m in METRICS}


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table_rows(methods: Mapping[str, Mapping]) -> list[dict]:
    """Long-format rows (method, metric, mean, ci95, ci95_normal, sd, min, max, n) from {method: {"summary"}}."""
    rows = []
    for method, res in methods.items():
        for m in METRICS:
            s = res["summary"][m]
            rows.append(
                {
                    "method": method,
                    "metric": m,
                    **{k: s[k] for k in ("mean", "ci95", "ci95_normal", "sd", "min", "max", "n")},
                }
            )
    return rows


def write_csv(rows: Sequence[Mapping], path: str) -> None:
    """Writes dict rows (same keys) as a CSV with a header; floats with 6 decimals."""
    if not rows:
        raise ValueError("no rows to write")
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: (
                    f"{v:.6f}"
                    if isinstance(v, float) and not math.isnan(v)
                    else ("" if isinstance(v, float) else v)
                )
                for k, v in r.items()
            }
        )
    atomic_write(path, buf.getvalue().encode())


def markdown_table(
    methods: Mapping[str, Mapping], title: str = "", notes: Sequence[str] = ()
) -> str:
    """Markdown: one row per method, one column per metric, cells `mean ± ci95 [min, max]` (t interval)."""
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines.append("| method | K | " + " | ".join(METRICS) + " |")
    lines.append("|---|---|" + "---|" * len(METRICS))
    for method, res in methods.items():
        summ = res["summary"]
        cells = [
            f"{_fmt(summ[m]['mean'])} ± {_fmt(summ[m]['ci95'])} [{_fmt(summ[m]['min'])}, {_fmt(summ[m]['max'])}]"
            for m in METRICS
        ]
        lines.append(
            f"| {METHOD_TITLES.get(method, method)} | {summ[METRICS[0]]['n']} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    lines.append(
        "Cells: mean ± half-width of the Student-t 95% interval over the K repeats [min, max], on test."
    )
    lines += [n for n in notes]
    return "\n".join(lines) + "\n"


def _figure(width=6.0, height=4.5):
    """A matplotlib Figure on the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_val_curves(
    histories: Mapping[str, Mapping[int, Sequence[float]]], path: str, metric: str = "auroc"
) -> None:
    """Per-epoch validation metric per repeat, one panel per method.

    histories: {method: {seed: [value at epoch 1, 2, ...]}}.
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - matplotlib only when plotting, as _figure

    methods = list(histories)
    fig = _figure(4.0 * max(1, len(methods)), 3.5)
    # one y-scale: the methods' panels are compared
    axes = fig.subplots(1, max(1, len(methods)), squeeze=False, sharey=True)[0]
    for ax, method in zip(axes, methods):
        for seed, vals in histories[method].items():
            ax.plot(np.arange(1, len(vals) + 1), vals, marker="o", ms=3, label=f"seed {seed}")
        ax.set_title(METHOD_TITLES.get(method, method), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_roc(curves: Mapping[str, Mapping[int, tuple]], path: str) -> None:
    """ROC curves on test, one panel per method. curves: {method: {seed: (fpr, tpr, auroc)}}."""
    methods = list(curves)
    fig = _figure(4.0 * max(1, len(methods)), 4.0)
    axes = fig.subplots(1, max(1, len(methods)), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        for seed, (fpr, tpr, auc) in curves[method].items():
            ax.plot(fpr, tpr, label=f"seed {seed} (AUROC {_fmt(auc)})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_title(METHOD_TITLES.get(method, method), fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_sweep(
    xs: Sequence,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str,
    xlabel: str,
    metric: str = "auroc",
    log_x: bool = False,
) -> None:
    """Metric vs a swept value with 95% (Student t) error bars. series: {method: (means, ci95s)}."""
    fig = _figure(6.0, 4.5)
    ax = fig.subplots()
    numeric = all(isinstance(x, (int, float)) for x in xs)
    pos = np.asarray(xs, dtype=np.float64) if numeric else np.arange(len(xs))
    for method, (means, cis) in series.items():
        err = np.nan_to_num(np.asarray(cis, dtype=np.float64), nan=0.0)
        ax.errorbar(
            pos, means, yerr=err, marker="o", capsize=3, label=METHOD_TITLES.get(method, method)
        )
    if not numeric:
        ax.set_xticks(pos)
        ax.set_xticklabels([str(x) for x in xs])
    elif log_x:
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)  # every metric lies in [0, 1]; wider interval bars are clipped
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric} (mean ± t 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
