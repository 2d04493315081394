"""Tasks: an ordered set of binary label columns of a prepared dataset (multi-label targets).

A task is either one that `prepare` wrote into the dataset (its manifest's `tasks` entry lists the task's ordered
meta.csv columns and class names) or a comma-separated list of meta.csv label columns (each 0/1/empty). The
`(N, C)` float32 matrix has 1/0 per record and class, NaN = unknown.

Column naming of the tasks `prepare` writes: `<prefix>:<class>`, where the prefix is the task's name without a
leading `ptbxl_` (task `ptbxl_superdiagnostic`, class `MI` -> column `superdiagnostic:MI`; task `dx`, code
`164934002` -> column `dx:164934002`).
"""

from __future__ import annotations

import ast
import dataclasses
import os

import numpy as np
import pandas as pd

from ecgcl_jax.data.dataset import INT_COLUMNS
from ecgcl_jax.data.labels import binary_column
from ecgcl_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    """name: the task's name (the spec it was resolved from); classes: (C,) class names; columns: (C,) meta.csv
    columns; labels: (N, C) float32 1/0, NaN = unknown, rows = the dataset's records."""

    name: str
    classes: tuple[str, ...]
    columns: tuple[str, ...]
    labels: np.ndarray


def column_prefix(task: str) -> str:
    """The meta.csv column prefix of a task `prepare` writes: its name without a leading `ptbxl_`."""
    return task[len("ptbxl_") :] if task.startswith("ptbxl_") else task


def task_column(task: str, cls: str) -> str:
    """meta.csv column of class `cls` of task `task` (`ptbxl_superdiagnostic`, `MI` -> `superdiagnostic:MI`)."""
    return f"{column_prefix(task)}:{cls}"


def _manifest_tasks(dataset) -> dict:
    t = dataset.manifest.get("tasks") or {}
    return t if isinstance(t, dict) else {}


def list_tasks(dataset) -> dict[str, tuple[str, ...]]:
    """Task name -> its ordered meta.csv columns, for every task `prepare` wrote into `dataset`."""
    return {name: tuple(t["columns"]) for name, t in _manifest_tasks(dataset).items()}


def column_values(meta: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """meta column -> (N,) float32 1/0/NaN (UserError naming `where` on a value that is not a binary label)."""
    col = meta[column]
    if col.dtype.kind in "fiub":
        v = col.to_numpy(np.float32)
        if np.all(np.isnan(v) | (v == 0) | (v == 1)):
            return v
    vals = col.astype(str).replace({"nan": "", "NaN": "", "<NA>": ""})
    return binary_column(vals.tolist(), where)


def _is_binary(meta: pd.DataFrame, column: str) -> bool:
    if column in INT_COLUMNS:  # window 0/1 of a two-window record is no label
        return False
    try:
        v = column_values(meta, column, column)
    except UserError:
        return False
    return bool(np.isfinite(v).any())


def resolve_task(dataset, spec: str, field: str = "config.data.task") -> Task:
    """`spec` -> Task over `dataset`'s records.

    spec: "" = the dataset's current single label column (C = 1); a task name that prepare wrote (see
    `list_tasks`); or a comma-separated list of meta.csv label columns (one column = C = 1). An unknown name or
    column, or a column that is not 0/1/empty, is a one-line UserError naming `field` and the dataset folder."""
    spec = str(spec or "").strip()
    meta = dataset.meta
    meta_csv = os.path.join(dataset.path, "meta.csv")
    if not spec:
        col = dataset.label_column
        return Task(col, (col,), (col,), np.asarray(dataset.labels, np.float32).reshape(-1, 1))
    tasks = _manifest_tasks(dataset)
    if spec in tasks:
        t = tasks[spec]
        columns = tuple(t["columns"])
        classes = tuple(t.get("classes") or columns)
        missing = [c for c in columns if c not in meta.columns]
        if missing:
            raise UserError(
                f"{field}: task '{spec}' of {dataset.path} names column '{missing[0]}' that meta.csv "
                "lacks; re-run prepare"
            )
    else:
        columns = tuple(c.strip() for c in spec.split(",") if c.strip())
        classes = columns
        bad = [c for c in columns if c not in meta.columns or not _is_binary(meta, c)]
        if bad or not columns or len(set(columns)) != len(columns):
            what = (
                f"'{bad[0]}' is neither a task nor a label column"
                if bad
                else f"'{spec}' names a column twice"
                if columns
                else f"'{spec}' names no column"
            )
            avail_t = ", ".join(tasks) or "none"
            avail_c = ", ".join(c for c in meta.columns if _is_binary(meta, c) and ":" not in c)
            raise UserError(
                f"{field}: {what} of {dataset.path} (tasks: {avail_t}; label columns: "
                f"{avail_c or 'none'})"
            )
    labels = np.stack(
        [column_values(meta, c, f"{meta_csv}: column '{c}'") for c in columns], axis=1
    ).astype(np.float32)
    return Task(spec, classes, columns, labels)


def class_counts(task: Task) -> list[tuple[str, int, int]]:
    """Per class: (class, positives, known) over the task's records."""
    known = np.isfinite(task.labels)
    return [
        (c, int(np.nansum(task.labels[:, j])), int(known[:, j].sum()))
        for j, c in enumerate(task.classes)
    ]


# ----------------------------------------------------------------------------------------------- derivation
# The six PTB-XL tasks, derived from `scp_codes` and PTB-XL's scp_statements.csv as its benchmark code does
# (Strodthoff et al., ecg_ptbxl_benchmarking, utils.compute_label_aggregations): every statement of a record
# counts, whatever its likelihood; classes are sorted by name (as a MultiLabelBinarizer orders them).
PTBXL_TASKS = (
    "ptbxl_superdiagnostic",
    "ptbxl_subdiagnostic",
    "ptbxl_diagnostic",
    "ptbxl_form",
    "ptbxl_rhythm",
    "ptbxl_all",
)
SUPERCLASSES = ("CD", "HYP", "MI", "NORM", "STTC")
# `# Labels` words (PhysioNet Challenge 2024 headers of PTB-XL records) that name a superclass; the rest go to
# the task `labels_other`
LABEL_WORD_SUPERCLASS = {
    "NORM": "NORM",
    "MI": "MI",
    "OLD MI": "MI",
    "ACUTE MI": "MI",
    "STTC": "STTC",
    "CD": "CD",
    "HYP": "HYP",
}
LABELS_OTHER = "labels_other"
DX = "dx"
SCP_STATEMENTS = "scp_statements.csv"
_STATEMENT_COLUMNS = ("diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass")


def load_scp_statements(path: str) -> pd.DataFrame:
    """PTB-XL's scp_statements.csv -> frame indexed by statement (its first column), with `diagnostic`,
    `form`, `rhythm` as bool and `diagnostic_class` / `diagnostic_subclass` as str ('' where empty).
    UserError (one line naming the file) when unreadable or a column is missing."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=0)
    except Exception as e:  # pandas' parser errors, unreadable file
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path}: cannot read as CSV ({type(e).__name__}: {first})") from None
    missing = [c for c in _STATEMENT_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: not PTB-XL's statement table (no column '{missing[0]}'; expected "
            f"{', '.join(_STATEMENT_COLUMNS)})"
        )
    df.index = df.index.astype(str).str.strip()
    out = pd.DataFrame(index=df.index)
    for c in ("diagnostic", "form", "rhythm"):
        out[c] = pd.to_numeric(df[c].str.strip().replace("", "nan"), errors="coerce") == 1.0
    for c in ("diagnostic_class", "diagnostic_subclass"):
        out[c] = df[c].str.strip()
    return out


def parse_scp_codes(value) -> dict | None:
    """A `scp_codes` cell ("{'NORM': 100.0, 'SR': 0.0}") -> {statement: likelihood}; None when empty or
    malformed (the record's statements are then unknown)."""
    s = "" if value is None else str(value).strip()
    if not s or s.lower() == "nan":
        return None
    try:
        d = ast.literal_eval(s)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return {str(k).strip(): v for k, v in d.items()} if isinstance(d, dict) else None


@dataclasses.dataclass(frozen=True)
class StatementMaps:
    """scp_statements.csv as sets and dicts (a record's classes by set/dict lookups, ~20k records in < 1 s)."""

    known: frozenset
    diagnostic: frozenset
    form: frozenset
    rhythm: frozenset
    superclass: dict  # diagnostic statement -> diagnostic_class ('' dropped)
    subclass: dict  # diagnostic statement -> diagnostic_subclass ('' dropped)

    @classmethod
    def of(cls, statements: pd.DataFrame) -> StatementMaps:
        diag = frozenset(statements.index[statements["diagnostic"]])
        return cls(
            frozenset(statements.index),
            diag,
            frozenset(statements.index[statements["form"]]),
            frozenset(statements.index[statements["rhythm"]]),
            {k: v for k, v in statements["diagnostic_class"].items() if k in diag and v},
            {k: v for k, v in statements["diagnostic_subclass"].items() if k in diag and v},
        )


def ptbxl_classes(codes: dict, statements) -> dict[str, set]:
    """One record's statements -> {task: its set of classes} for the six PTB-XL tasks (an empty set: the record
    has no statement of that task, so it is unknown there). statements: load_scp_statements' frame or its
    StatementMaps."""
    m = statements if isinstance(statements, StatementMaps) else StatementMaps.of(statements)
    keys = set(codes)
    diag = keys & m.diagnostic
    return {
        "ptbxl_superdiagnostic": {m.superclass[k] for k in diag if k in m.superclass},
        "ptbxl_subdiagnostic": {m.subclass[k] for k in diag if k in m.subclass},
        "ptbxl_diagnostic": diag,
        "ptbxl_form": keys & m.form,
        "ptbxl_rhythm": keys & m.rhythm,
        "ptbxl_all": keys,
    }


def parse_label_words(value) -> tuple[set, set] | None:
    """A `# Labels` value ("Old MI, CD, TACHY") -> (superclasses, other words); None when there is no line.
    Both MI words (`Old MI`, `Acute MI`) are MI; a word matches its superclass in any case."""
    s = "" if value is None else str(value).strip()
    if not s or s.lower() == "nan":
        return None
    words = [w.strip() for w in s.split(",") if w.strip()]
    sup = {LABEL_WORD_SUPERCLASS[w.upper()] for w in words if w.upper() in LABEL_WORD_SUPERCLASS}
    other = {w for w in words if w.upper() not in LABEL_WORD_SUPERCLASS}
    return sup, other


def parse_dx(value) -> set | None:
    """A `#Dx` value ("164934002,426783006") -> set of SNOMED-CT codes; None when there is none."""
    s = "" if value is None else str(value).strip()
    if not s or s.lower() == "nan":
        return None
    codes = {c.strip() for c in s.replace(";", ",").replace(" ", ",").split(",") if c.strip()}
    return codes or None


def _class_order(c: str):
    return (0, int(c), c) if c.isdigit() else (1, 0, c)


def task_matrix(sets: list, min_count: int = 1) -> tuple[tuple[str, ...], np.ndarray]:
    """Per record a set of classes (None = unknown) -> (classes present in >= min_count known records, sorted;
    (N, C) float32 1/0, NaN on unknown rows). Numeric class names sort as numbers."""
    counts: dict[str, int] = {}
    for s in sets:
        for c in s or ():
            counts[c] = counts.get(c, 0) + 1
    classes = tuple(sorted((c for c, n in counts.items() if n >= min_count), key=_class_order))
    y = np.full((len(sets), len(classes)), np.nan, np.float32)
    col = {c: j for j, c in enumerate(classes)}
    for i, s in enumerate(sets):
        if s is None:
            continue
        y[i] = 0.0
        for c in s:
            if c in col:
                y[i, col[c]] = 1.0
    return classes, y


@dataclasses.dataclass
class DerivedTask:
    name: str
    classes: tuple[str, ...]
    labels: np.ndarray  # (N, C) float32, NaN = unknown
    source: str  # how it was derived, in words

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(task_column(self.name, c) for c in self.classes)


def derive_tasks(
    scp_codes=None,
    statements: pd.DataFrame | None = None,
    label_words=None,
    dx=None,
    dx_min_count: int = 1,
    statements_path: str = "",
) -> tuple[list[DerivedTask], dict]:
    """The tasks a prepared dataset carries, from per-record (N,) sequences of strings.

    scp_codes + statements: the six PTB-XL tasks (a record without a parseable `scp_codes`, or without a statement
    of a task, is unknown for that task); label_words (`# Labels` values): superdiagnostic for records that
    scp_codes leave unknown there, and `labels_other` (the words that are not a superclass; known for every
    record with a `# Labels` line); dx (`#Dx` values): task `dx`, one class per code present in >= dx_min_count
    records (known for every record with a `#Dx` line). Returns (tasks with at least one class, stats)."""
    n = len(next(x for x in (scp_codes, label_words, dx, ()) if x is not None))
    tasks: list[DerivedTask] = []
    stats: dict = {}
    sets = {t: [None] * n for t in PTBXL_TASKS}
    if scp_codes is not None and statements is not None:
        parsed = [parse_scp_codes(v) for v in scp_codes]
        stats["scp_codes_records"] = sum(p is not None for p in parsed)
        stats["scp_codes_malformed"] = sum(
            p is None and str(v).strip() not in ("", "nan") for p, v in zip(parsed, scp_codes)
        )
        maps = StatementMaps.of(statements)
        for i, p in enumerate(parsed):
            if p is None:
                continue
            for t, cl in ptbxl_classes(p, maps).items():
                sets[t][i] = cl or None
    words = [parse_label_words(v) for v in label_words] if label_words is not None else [None] * n
    from_words = disagree = 0
    for i, w in enumerate(words):
        if w is None or not w[0]:
            continue
        if sets["ptbxl_superdiagnostic"][i] is None:
            sets["ptbxl_superdiagnostic"][i] = set(w[0])
            from_words += 1
        elif sets["ptbxl_superdiagnostic"][i] != w[0]:
            disagree += 1
    if any(w is not None for w in words):
        stats["labels_records"] = sum(w is not None for w in words)
        stats["superdiagnostic_from_labels"] = from_words
        stats["labels_disagreeing_with_scp_codes"] = disagree
    scp = scp_codes is not None and statements is not None
    for t in PTBXL_TASKS:
        src = f"scp_codes and {statements_path or SCP_STATEMENTS}" if scp else ""
        if t == "ptbxl_superdiagnostic" and from_words:
            words_src = "header '# Labels'"
            src = f"{src}; {words_src} where scp_codes give none" if scp else words_src
        classes, y = task_matrix(sets[t])
        if classes:
            tasks.append(DerivedTask(t, classes, y, src))
    if any(w is not None for w in words):
        classes, y = task_matrix([None if w is None else w[1] for w in words])
        if classes:
            tasks.append(
                DerivedTask(
                    LABELS_OTHER, classes, y, "header '# Labels' words that are no superclass"
                )
            )
    if dx is not None:
        codes = [parse_dx(v) for v in dx]
        if any(c is not None for c in codes):
            classes, y = task_matrix(codes, dx_min_count)
            counts: dict[str, int] = {}
            for c in codes:
                for k in c or ():
                    counts[k] = counts.get(k, 0) + 1
            stats["dx_records"] = sum(c is not None for c in codes)
            stats["dx_codes"] = len(counts)
            stats["dx_codes_below_min_count"] = len(counts) - len(classes)
            if classes:
                tasks.append(
                    DerivedTask(DX, classes, y, f"header '#Dx' codes in >= {dx_min_count} records")
                )
    return tasks, stats


def format_dataset_tasks(dataset) -> list[str]:
    """Lines for `data info`: each task of the dataset with its classes' positives / known records."""
    lines = []
    for name in list_tasks(dataset):
        t = resolve_task(dataset, name, "data info")
        known = int(np.isfinite(t.labels).all(axis=1).sum())
        counts = ", ".join(f"{c} {p}" for c, p, _ in class_counts(t))
        cols = t.columns
        lines.append(
            f"task {name}: {len(t.classes)} classes, {known} of {len(dataset)} records known; "
            f"positives: {counts}; columns {cols[0]}{' ... ' + cols[-1] if len(cols) > 1 else ''}"
        )
    if not lines:
        lines.append(
            "tasks: none written by prepare (a comma-separated list of label columns is a task too)"
        )
    return lines
