"""Scores of a classifier with C sigmoid outputs (scikit-learn), bootstrap intervals, summaries over repeats,
result tables and plots.

- `binary_scores`: accuracy, precision, recall, F1 at a 0.5 threshold on the predicted probability, AUROC and
  PR-AUC (`auprc` = scikit-learn's average precision, the step-wise area under the precision-recall curve).
- `scores`: C classes (labels 0/1, NaN = unknown, left out class by class): `macro_auroc` = mean of the
  per-class AUROCs over the classes that have both values among the known labels (`classes_used` counts them),
  `micro_auroc` = one AUROC over every known (record, class) entry pooled, `macro_auprc` = mean of the per-class
  average precisions over the same classes, and `per_class` {class: {auroc, auprc, positives, known}}. For
  C = 1 the binary set is there too, and macro_auroc equals auroc.
- `bootstrap`: percentile intervals of macro-AUROC over resampled test patients, and of paired differences.
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

from ecgcl_jax import monitor
from ecgcl_jax.fileio import atomic_write

METRICS = ("auroc", "auprc", "f1", "accuracy", "precision", "recall")
"""Metric names of one binary label (C = 1), in table order."""

MULTI_METRICS = ("macro_auroc", "micro_auroc", "macro_auprc")
"""Metric names of C classes, in table order (for C = 1 too: there they equal auroc, auroc, auprc)."""

ALL_METRICS = METRICS + MULTI_METRICS
"""Every summarised metric name (what config.sweep.metric may name)."""

PRIMARY = "macro_auroc"
"""The metric of model selection, the bootstrap and the paired difference (for C = 1 it is the AUROC)."""

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


def _auc_usable(y: np.ndarray) -> bool:
    return bool(np.any(y == 1) and np.any(y == 0))


def scores(labels, probs, classes: Sequence[str] | None = None, threshold: float = 0.5) -> dict:
    """Scores of C sigmoid outputs. labels: (N,) 0/1 (one label, every one known) or (N, C) 0/1/NaN (NaN =
    unknown: that entry is left out of its class); probs: the same shape, predicted P(label = 1).

    Returns {macro_auroc, micro_auroc, macro_auprc, classes_used, per_class: {class: {auroc, auprc, positives,
    known}}}, plus `binary_scores` of the known entries when C = 1 (macro_auroc is then exactly its auroc).
    A class without both values among its known labels has NaN AUROC/AUPRC and is left out of the macro means;
    `classes_used` says how many were averaged (the means are NaN when none is left).
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in shape")
    y2, p2 = y.reshape(len(y), -1), p.reshape(len(p), -1)
    c = y2.shape[1]
    names = [str(n) for n in classes] if classes is not None else [f"class_{j}" for j in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} label columns")
    per_class, aurocs, auprcs = {}, [], []
    for j, name in enumerate(names):
        known = ~np.isnan(y2[:, j])
        yj, pj = y2[known, j].astype(np.int64), p2[known, j]
        ok = _auc_usable(yj)
        auc = float(skm.roc_auc_score(yj, pj)) if ok else math.nan
        ap = float(skm.average_precision_score(yj, pj)) if ok else math.nan
        per_class[name] = {"auroc": auc, "auprc": ap, "positives": int(yj.sum()), "known": len(yj)}
        if ok:
            aurocs.append(auc)
            auprcs.append(ap)
    known = ~np.isnan(y2)
    yk, pk = y2[known].astype(np.int64), p2[known]
    out = {
        "macro_auroc": float(np.mean(aurocs)) if aurocs else math.nan,
        "micro_auroc": float(skm.roc_auc_score(yk, pk)) if _auc_usable(yk) else math.nan,
        "macro_auprc": float(np.mean(auprcs)) if auprcs else math.nan,
        "classes_used": len(aurocs),
    }
    if c == 1:
        binary = binary_scores(yk, pk, threshold)
        # the same numbers as the binary set, bit for bit
        out.update(binary, macro_auroc=binary["auroc"], micro_auroc=binary["auroc"])
        out["macro_auprc"] = binary["auprc"]
    out["per_class"] = per_class
    return out


def auroc_columns(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-column AUROC (C,) of labels (N, C) 0/1/NaN and probs (N, C), by the rank-sum (Mann-Whitney) formula
    with tied scores given their mean rank, as scikit-learn's roc_auc_score; NaN where a column lacks one of
    the two values among its known labels. Fast enough for thousands of bootstrap resamples."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    out = np.full(y.shape[1], math.nan)
    known = ~np.isnan(y)
    rows = known.any(axis=1)
    if known[
        rows
    ].all():  # each row known in every class or in none (a task's unlabelled records): one ranking
        y, p, known = y[rows], p[rows], known[rows]
    if known.all():
        ranks = scipy.stats.rankdata(p, axis=0)
        cols = [(j, slice(None)) for j in range(y.shape[1])]
    else:
        ranks, cols = None, [(j, known[:, j]) for j in range(y.shape[1])]
    for j, rows in cols:
        yj = y[rows, j]
        n1 = float(np.sum(yj == 1))
        n0 = float(len(yj) - n1)
        if n1 == 0 or n0 == 0:
            continue
        rj = ranks[:, j] if ranks is not None else scipy.stats.rankdata(p[rows, j])
        out[j] = (float(np.sum(rj[yj == 1])) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def _macro(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(np.mean(a)) if len(a) else math.nan


def bootstrap(
    labels,
    probs: Mapping[str, np.ndarray],
    groups,
    resamples: int,
    seed=0,
    level: float = 0.95,
    pairs: Sequence[tuple[str, str]] = (),
) -> dict:
    """Percentile bootstrap of test macro-AUROC over patients, for several methods on one test set.

    labels: (N,) or (N, C) 0/1/NaN; probs: {method: predictions shaped like labels}; groups: (N,) patient key of
    each row. Resample b: `rng.integers(0, P, size=P)` with rng = numpy default_rng(seed) draws P of the P
    patients (in order of first appearance in `groups`) with replacement; its rows are every row of each drawn
    patient. Every method (and every pair) is scored on the same resamples. Per resample the macro-AUROC is the
    mean over the classes with both values in that resample (as `scores`); resamples where none has are dropped.
    The interval is the (1-level)/2 and (1+level)/2 percentiles (numpy's linear interpolation) of the resampled
    values. pairs: (a, b) -> the same for the difference macro_auroc(a) - macro_auroc(b).

    Returns {"methods": {m: {low, high, resamples_used}}, "pairs": {"a - b": {low, high, resamples_used}},
    "resamples", "level"}.
    """
    y = np.asarray(labels, np.float64)
    y = y.reshape(len(y), -1)
    ps = {m: np.asarray(v, np.float64).reshape(len(y), -1) for m, v in probs.items()}
    _, first, codes = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    order = np.argsort(first)  # patient codes in order of first appearance
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    codes = rank_of[codes.ravel()]
    # rows grouped by patient (ascending within each): patient i owns by_patient[start[i] : start[i] + size[i]]
    by_patient = np.argsort(codes, kind="stable")
    size = np.bincount(codes, minlength=len(order))
    start = np.cumsum(size) - size
    rng = np.random.default_rng(seed)
    stats = {m: np.full(int(resamples), math.nan) for m in ps}
    for b in range(int(resamples)):
        pick = rng.integers(0, len(order), size=len(order))
        sizes = size[pick]
        offset = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        rows = by_patient[np.repeat(start[pick], sizes) + offset]
        for m, p in ps.items():
            stats[m][b] = _macro(auroc_columns(y[rows], p[rows]))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(v: np.ndarray) -> dict:
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, q) if len(v) else (math.nan, math.nan)
        return {"low": float(lo), "high": float(hi), "resamples_used": len(v)}

    return {
        "methods": {m: interval(v) for m, v in stats.items()},
        "pairs": {f"{a} - {b}": interval(stats[a] - stats[b]) for a, b in pairs},
        "resamples": int(resamples),
        "level": float(level),
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
        "ci95": t_quantile(k) * se if k > 1 else math.nan,
        "ci95_normal": float(1.96 * se) if k > 1 else math.nan,
        "sd": sd,
        "min": float(np.min(v)),
        "max": float(np.max(v)),
        "n": k,
    }


def summarize_repeats(repeats: Sequence[Mapping], key: str = "test") -> dict[str, dict[str, float]]:
    """{metric: summarize([r[key][metric] for r in repeats])} for every metric of ALL_METRICS that the repeats
    hold (C = 1: METRICS and MULTI_METRICS; C > 1: MULTI_METRICS)."""
    names = [m for m in ALL_METRICS if repeats and all(m in r[key] for r in repeats)]
    return {m: summarize([r[key][m] for r in repeats]) for m in (names or METRICS)}


def summarize_per_class(repeats: Sequence[Mapping], key: str = "test") -> dict[str, dict]:
    """{class: {"auroc": summary, "auprc": summary, "positives": [per repeat]}} from each repeat's per_class;
    a class's NaN AUROC (no both values in that repeat's split) is left out of its summary (its n says so)."""
    out = {}
    for name in (repeats[0][key].get("per_class") or {}) if repeats else ():
        cells = [r[key]["per_class"][name] for r in repeats if name in r[key].get("per_class", {})]
        out[name] = {
            m: summarize([c[m] for c in cells if c[m] is not None and not math.isnan(c[m])])
            for m in ("auroc", "auprc")
        }
        out[name]["positives"] = [c["positives"] for c in cells]
    return out


def shown_metrics(summary: Mapping) -> tuple[str, ...]:
    """The table columns of a result: the binary set for one label, else the multi-label set."""
    return METRICS if "auroc" in summary else MULTI_METRICS


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table_rows(
    methods: Mapping[str, Mapping], paired: Mapping[str, Mapping] | None = None
) -> list[dict]:
    """Long-format rows (method, metric, mean, ci95, ci95_normal, sd, min, max, n) from {method: {"summary"}}:
    the shown metrics (`shown_metrics`), then, for C > 1, each class's AUROC and AUPRC (metric `auroc[CLASS]`,
    `auprc[CLASS]`, from the method's `per_class`), then each paired difference (method `A - B`, metric
    `PRIMARY difference`)."""
    keys = ("mean", "ci95", "ci95_normal", "sd", "min", "max", "n")
    rows = []
    for method, res in methods.items():
        for m in shown_metrics(res["summary"]):
            s = res["summary"][m]
            rows.append({"method": method, "metric": m, **{k: s[k] for k in keys}})
    for method, res in methods.items():
        per_class = res.get("per_class") or {}
        if len(per_class) > 1:
            for name, cell in per_class.items():
                for m in ("auroc", "auprc"):
                    s = cell[m]
                    rows.append(
                        {"method": method, "metric": f"{m}[{name}]", **{k: s[k] for k in keys}}
                    )
    for name, d in (paired or {}).items():
        s = d["summary"]
        rows.append(
            {"method": name, "metric": f"{d['metric']} difference", **{k: s[k] for k in keys}}
        )
    return rows


def t_quantile(k: int) -> float:
    """t_{0.975, K-1}: the factor of sd / sqrt(K) in the ci95 half-width (NaN for K < 2)."""
    return float(scipy.stats.t.ppf(0.975, k - 1)) if k > 1 else math.nan


def interval_cell(summary: Mapping, low: float = 0.0, high: float = 1.0) -> tuple[str, bool]:
    """(`mean ± ci95 [min, max]`, whether mean ± ci95 runs outside the metric's range [low, high]); the text then
    carries a dagger, which the report's note explains."""
    mean, hw = summary["mean"], summary["ci95"]
    outside = hw is not None and not math.isnan(hw) and (mean - hw < low or mean + hw > high)
    text = (
        f"{_fmt(mean)} ± {_fmt(hw)}{'†' if outside else ''} "
        f"[{_fmt(summary['min'])}, {_fmt(summary['max'])}]"
    )
    return text, outside


def wide_note(k: int, low: float = 0.0, high: float = 1.0) -> str:
    """The note under a table whose t interval runs outside [low, high] (cells marked †)."""
    kk = f"K = {k} repeats give" if k > 1 else "K repeats give"
    return (
        f"† mean ± half-width runs outside the metric's range [{low:g}, {high:g}]; shown unclipped: "
        f"{kk} t_{{0.975,K-1}} = {_fmt(t_quantile(k), 2)}, so the half-width is {_fmt(t_quantile(k), 2)} "
        f"× sd/√K (the two-sided 95% t quantile grows without bound as K shrinks). Clipped to the range it "
        f"says only that the repeats do not pin the mean down; run more repeats for a useful interval."
    )


def markdown_table(
    methods: Mapping[str, Mapping], title: str = "", notes: Sequence[str] = ()
) -> str:
    """Markdown: one row per method, one column per shown metric (`shown_metrics`), cells
    `mean ± ci95 [min, max]` (t interval over the repeats); a dagger and a note where mean ± ci95 leaves
    [0, 1]. For C > 1 a column `classes` gives the classes averaged in macro-AUROC (per repeat: min-max)."""
    lines = []
    if title:
        lines += [f"# {title}", ""]
    first = next(iter(methods.values()))["summary"] if methods else {"auroc": None}
    cols = shown_metrics(first)
    multi = cols == MULTI_METRICS
    lines.append("| method | K | " + " | ".join(cols) + (" | classes |" if multi else " |"))
    lines.append("|---|---|" + "---|" * (len(cols) + multi))
    wide, k_max = False, 0
    for method, res in methods.items():
        summ = res["summary"]
        cells = []
        for m in cols:
            text, outside = interval_cell(summ[m])
            wide |= outside
            cells.append(text)
        if multi:
            used = [r["test"].get("classes_used") for r in res.get("repeats", [])]
            used = [u for u in used if u is not None]
            cells.append(
                (f"{min(used)}" if min(used) == max(used) else f"{min(used)}-{max(used)}")
                if used
                else "n/a"
            )
        k_max = max(k_max, summ[cols[0]]["n"])
        lines.append(
            f"| {METHOD_TITLES.get(method, method)} | {summ[cols[0]]['n']} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    lines.append(
        "Cells: mean ± half-width of the Student-t 95% interval over the K repeats [min, max], on test. "
        "It measures how much the result moves between repeats (split, initialisation, training order)."
    )
    if wide:
        lines.append(wide_note(k_max))
    lines += [n for n in notes]
    return "\n".join(lines) + "\n"


def per_class_markdown(methods: Mapping[str, Mapping]) -> str:
    """Markdown: one row per class, one column per method, cells `mean ± ci95` of the test AUROC over the
    repeats where the class had both values (n/K when fewer), and the positives per repeat."""
    names = list(next(iter(methods.values())).get("per_class") or {}) if methods else []
    if len(names) < 2:
        return ""
    k = max(len(r.get("repeats", [])) for r in methods.values())
    lines = [
        "## Test AUROC per class",
        "",
        "| class | positives per repeat | "
        + " | ".join(METHOD_TITLES.get(m, m) for m in methods)
        + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    wide = False
    for name in names:
        cells = []
        for res in methods.values():
            s = (res.get("per_class") or {}).get(name, {}).get("auroc")
            if s is None or not s["n"]:
                cells.append("n/a")
                continue
            text, outside = interval_cell(s)
            wide |= outside
            cells.append(text + (f" (n = {s['n']}/{k})" if s["n"] < k else ""))
        pos = next(iter(methods.values()))["per_class"][name]["positives"]
        lines.append(f"| {name} | {', '.join(str(p) for p in pos)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: mean ± Student-t 95% half-width over the repeats [min, max]; a repeat whose test split has "
        "one value only of a class has no AUROC for it and is left out (n = repeats counted).",
    ]
    if wide:
        lines.append(wide_note(k))
    return "\n".join(lines) + "\n"


def bootstrap_markdown(
    methods: Mapping[str, Mapping], metric: str = PRIMARY, title: str = "macro-AUROC"
) -> str:
    """Markdown: one row per method, one column per repeat, cells `value [low, high]` of each repeat's test
    `metric` with its percentile bootstrap interval over test patients (from each repeat's `bootstrap`); `title`
    names the metric in the heading."""
    seeds = [r["seed"] for r in next(iter(methods.values()))["repeats"]] if methods else []
    boots = [r.get("bootstrap") for res in methods.values() for r in res["repeats"]]
    boots = [b for b in boots if b]
    if not seeds or not boots:
        return ""
    lines = [
        f"## Test {title} per repeat, with its bootstrap interval",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for method, res in methods.items():
        by_seed = {r["seed"]: r for r in res["repeats"]}
        cells = []
        for s in seeds:
            r = by_seed.get(s)
            b = (r or {}).get("bootstrap")
            if r is None:
                cells.append("")
            else:
                iv = f" [{_fmt(b['low'])}, {_fmt(b['high'])}]" if b else ""
                cells.append(f"{_fmt(r['test'][metric])}{iv}")
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    b = boots[0]
    lines += [
        "",
        f"Brackets: {100 * b['level']:g}% percentile bootstrap interval over the test patients "
        f"({b['resamples']} resamples, patients drawn with replacement, seeded by the repeat's seed). It "
        "measures how much that one trained model's score depends on which test patients were drawn; it "
        "says nothing about retraining (that is the t interval over repeats above). A percentile "
        "interval never leaves [0, 1].",
    ]
    return "\n".join(lines) + "\n"


def paired_markdown(paired: Mapping[str, Mapping], title: str = "macro-AUROC") -> str:
    """Markdown: "does pretraining help?": per comparison A - B, the mean difference of the test metric ± its
    Student-t 95% half-width over the repeats, and each repeat's difference with its paired bootstrap interval."""
    if not paired:
        return ""
    lines = [
        "## Does pretraining help? Pretrained minus random init, same test patients",
        "",
        "| comparison | K | mean difference ± t 95% [min, max] | per repeat: difference [bootstrap 95%] |",
        "|---|---|---|---|",
    ]
    wide, k_max = False, 0
    for name, d in paired.items():
        text, outside = interval_cell(d["summary"], -1.0, 1.0)
        wide |= outside
        k_max = max(k_max, d["summary"]["n"])
        per = []
        for r in d["repeats"]:
            b = r.get("bootstrap")
            iv = f" [{_fmt(b['low'])}, {_fmt(b['high'])}]" if b else ""
            per.append(f"seed {r['seed']}: {_fmt(r['difference'])}{iv}")
        a, b_ = name.split(" - ")
        row = f"{METHOD_TITLES.get(a, a)} − {METHOD_TITLES.get(b_, b_)}"
        lines.append(f"| {row} | {d['summary']['n']} | {text} | {'; '.join(per)} |")
    lines += [
        "",
        f"Difference of test {title}, pretrained minus random init, within each repeat (the same split and "
        "test patients). The t interval over repeats asks whether the gain survives retraining; the bootstrap "
        "interval of one repeat (the same patient resamples for both methods) asks whether it survives another "
        "draw of test patients. An interval that excludes 0 is evidence of a difference; one that holds 0 is "
        "not evidence of none.",
    ]
    if wide:
        lines.append(wide_note(k_max, -1.0, 1.0))
    return "\n".join(lines) + "\n"


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


def plot_val_curves(
    histories: Mapping[str, Mapping[int, Sequence[float]]],
    path: str,
    metric: str = "auroc",
    title: str = "",
) -> None:
    """Per-epoch validation metric per repeat, one panel per method; `title` above them (e.g. dataset, task
    and encoder).

    histories: {method: {seed: [value at epoch 1, 2, ...]}}.
    """
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - matplotlib only when plotting, as monitor.figure

    methods = list(histories)
    fig = monitor.figure(4.0 * max(1, len(methods)), 3.5)
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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_roc(curves: Mapping[str, Mapping[int, tuple]], path: str) -> None:
    """ROC curves on test, one panel per method. curves: {method: {seed: (fpr, tpr, auroc)}}."""
    methods = list(curves)
    fig = monitor.figure(4.0 * max(1, len(methods)), 4.0)
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
    fig = monitor.figure(6.0, 4.5)
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
