"""Tasks: an ordered set of binary label columns of a prepared dataset (multi-label targets).

A task is either one that `prepare` wrote into the dataset (its manifest's `tasks` entry lists the task's ordered
meta.csv columns and class names) or a comma-separated list of meta.csv label columns (each 0/1/empty). The
`(N, C)` float32 matrix has 1/0 per record and class, NaN = unknown.

Column naming of the tasks `prepare` writes: `<prefix>:<class>`, where the prefix is the task's name without a
leading `ptbxl_` (task `ptbxl_superdiagnostic`, class `MI` -> column `superdiagnostic:MI`; task `dx`, code
`164934002` -> column `dx:164934002`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd

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
