"""User label tables: a CSV with a `record` column and label columns, attached to prepared records.

A table row matches a record when `record` equals (in this order of precedence) the record's path relative to its
SRC without extension, its name (file stem), its id in the source's own metadata (PTB-XL ecg_id, e.g. `841` or
`00841`), or a trailing part of its path (`hr_gt/00841_hr`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ecgcl_jax.data.header_meta import clean_id, parse_binary
from ecgcl_jax.errors import UserError

_EXTS = (".hea", ".dat", ".mat", ".npy", ".npz", ".parquet")
# The text fields `prepare` writes for every record on how it read the file (its leads, resampling,
# reader and file format).
READ_COLUMNS = ("leads_original", "missing_leads", "repeated_leads", "resample", "reader", "format")
# Fields `prepare` writes itself for every record; a table column may not replace them (label, normal, age, sex,
# patient_id, dx, ... it may: the old values stay as `source_<name>`).
RESERVED_COLUMNS = (
    "name",
    "relpath",
    "source",
    "source_id",
    "window",
    "valid_length",
    "fs_original",
    "n_samples_original",
    "n_leads_original",
    *READ_COLUMNS,
)


def normalise_key(v: str) -> str:
    """Table `record` value or record path -> comparison key (forward slashes, no './', no known extension)."""
    k = str(v).strip().replace("\\", "/")
    while k.startswith("./"):
        k = k[2:]
    low = k.lower()
    for e in _EXTS:
        if low.endswith(e):
            k = k[: -len(e)]
            break
    return k


def _id_key(k: str) -> str | None:
    return str(int(k)) if re.fullmatch(r"\d+", k) else None


def binary_column(values, where: str, records=None) -> np.ndarray:
    """Strings -> float32 1/0/NaN; raises UserError naming `where`, the row (and its record, when `records`
    is given) and the value on anything else."""
    out = np.empty(len(values), np.float32)
    for i, v in enumerate(values):
        p = parse_binary(v)
        if p is None:
            rec = f" (record '{records[i]}')" if records is not None else ""
            raise UserError(
                f"{where}: row {i + 1}{rec}: invalid label value '{v}' (expected 0/1, true/false, "
                "yes/no or empty for unknown)"
            )
        out[i] = p
    return out


@dataclass
class LabelTable:
    path: str
    df: pd.DataFrame  # all columns as str, '' for empty
    label_column: str | None
    sha1: str
    columns: list[str] = field(default_factory=list)  # kept columns (all but `record`)


AUTO_TABLE_NAMES = ("labels.csv", "records.csv")


def find_auto_table(src: str) -> str | None:
    """A label table lying at the top of a SRC folder (`labels.csv` or `records.csv` with a `record` column)."""
    if not os.path.isdir(src):
        return None
    for n in AUTO_TABLE_NAMES:
        p = os.path.join(src, n)
        if os.path.isfile(p):
            try:
                cols = pd.read_csv(p, nrows=0).columns
            except Exception:
                continue
            if "record" in [str(c).strip() for c in cols]:
                return p
    return None


def load_label_table(path: str, label_column: str | None, auto: bool = False) -> LabelTable:
    """Read and validate a label table (UserError on a missing file/column, duplicate record, bad value).

    auto: a table found in a SRC folder; its label column is `label_column` if it has one, else `label`, else
    `normal`, else its only 0/1 column, else none (it then only contributes patient ids and extra columns)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: label table not found")
    with open(path, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as e:  # pandas' parser errors
        raise UserError(f"{path}: cannot read as CSV ({str(e).splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if "record" not in df.columns:
        raise UserError(f"{path}: no 'record' column (columns: {', '.join(df.columns)})")
    cols = [c for c in df.columns if c != "record"]
    hint = " (give --no-auto-labels to ignore this table)" if auto else ""
    if len(df) == 0:
        raise UserError(f"{path}: the table has a header but no rows{hint}")
    clash = [c for c in cols if c in RESERVED_COLUMNS]
    if clash:
        raise UserError(
            f"{path}: column '{clash[0]}' names a field prepare writes itself for every record "
            f"({', '.join(RESERVED_COLUMNS)}); rename it{hint}"
        )
    df["record"] = df["record"].map(normalise_key)
    dup = df["record"][df["record"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: record '{dup.iloc[0]}' appears in more than one row{hint}")
    if auto:
        valid = [
            c
            for c in cols
            if c != "patient_id"
            and all(parse_binary(v) is not None for v in df[c])
            and (df[c].str.strip() != "").any()
        ]
        pick = [c for c in (label_column, "label", "normal") if c in valid]
        chosen = pick[0] if pick else (valid[0] if len(valid) == 1 else None)
        # the column that will become the label must hold labels: say so now, not after every record is read. That
        # is an asked-for column, or, when the table offers none, a `label` / `normal` column, which replaces the
        # records' own and is then prepare's default
        for c in ([label_column] if label_column else []) + (
            ["label", "normal"] if chosen is None else []
        ):
            if (
                c in df.columns
                and c not in valid
                and c != "record"
                and (df[c].str.strip() != "").any()
            ):
                binary_column(
                    df[c].tolist(),
                    f"{path}: column '{c}' (found in SRC; --no-auto-labels ignores it)",
                    df["record"].tolist(),
                )
        label_column = chosen
        return LabelTable(path, df, label_column, sha1, cols)
    if label_column is None:
        cands = [c for c in cols if c != "patient_id"]
        if len(cands) != 1:
            raise UserError(
                f"{path}: choose the label with --label-column (columns: {', '.join(cands)})"
            )
        label_column = cands[0]
    if label_column not in df.columns or label_column == "record":
        raise UserError(f"{path}: no label column '{label_column}' (columns: {', '.join(cols)})")
    binary_column(
        df[label_column].tolist(), f"{path}: column '{label_column}'", df["record"].tolist()
    )
    return LabelTable(path, df, label_column, sha1, cols)


def match_rows(table: LabelTable, meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For each meta row the matching table row index (-1 if none), and per table row whether it matched.

    A record is matched by its most specific key (path, then name, then id, then a trailing part of the path);
    two table rows that match one record by keys of the same kind (e.g. ids `841` and `00841`) are a UserError."""
    by: dict[str, dict[str, list[int]]] = {"relpath": {}, "name": {}, "id": {}, "suffix": {}}
    for i, (rel, name, sid) in enumerate(zip(meta["relpath"], meta["name"], meta["source_id"])):
        rel = normalise_key(rel)
        by["relpath"].setdefault(rel, []).append(i)
        by["name"].setdefault(str(name), []).append(i)
        if sid:
            by["id"].setdefault(str(sid), []).append(i)
        parts = rel.split("/")
        for j in range(1, len(parts) - 1):
            by["suffix"].setdefault("/".join(parts[j:]), []).append(i)
    rank = {"relpath": 0, "name": 1, "id": 2, "suffix": 3}
    row_of = np.full(len(meta), -1, np.int64)
    best = np.full(len(meta), 99, np.int64)
    used = np.zeros(len(table.df), bool)
    for t, key in enumerate(table.df["record"]):
        for kind in ("relpath", "name", "id", "suffix"):
            k = _id_key(key) if kind == "id" else key
            hits = by[kind].get(k, []) if k else []
            if hits:
                used[t] = True
                for i in hits:
                    if rank[kind] < best[i]:
                        best[i], row_of[i] = rank[kind], t
                    elif rank[kind] == best[i] and row_of[i] != t:
                        raise UserError(
                            f"{table.path}: rows '{table.df['record'].iloc[row_of[i]]}' and '{key}' "
                            f"both name record {meta['record'].iloc[i]} (by {kind}); keep one"
                        )
                break
    return row_of, used


def apply_label_table(table: LabelTable, meta: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Copy the table's columns onto matched meta rows ('' where unmatched); the chosen column -> meta['label'].

    A table column whose name is already a meta column replaces it; the old values stay as `source_<name>`.
    `patient_id` from the table only fills/overrides where the table gives one. Returns (meta, match stats).
    """
    meta = meta.copy()
    row_of, used = match_rows(table, meta)
    matched = row_of >= 0
    for col in table.columns:
        vals = table.df[col].to_numpy(dtype=object)
        new = np.where(matched, vals[np.maximum(row_of, 0)], "")
        if col == "patient_id":
            new = [
                clean_id(str(n)) if (m and clean_id(str(n))) else str(o)
                for n, m, o in zip(new, matched, meta["patient_id"])
            ]
            meta["patient_id"] = new
            continue
        if col in meta.columns:
            meta[f"source_{col}"] = meta[col]
        meta[col] = new
    unmatched = table.df["record"][~used].tolist()
    # a row that labels several records (the same file name in two folders; windows of one record are one record)
    records_of: dict[int, set] = {}
    for t, rec in zip(row_of, meta["record"]):
        if t >= 0:
            records_of.setdefault(int(t), set()).add(str(rec))
    several = [
        table.df["record"].iloc[t] for t, recs in sorted(records_of.items()) if len(recs) > 1
    ]
    # rows that matched records, each of which a more specific row (path over name over id) took instead
    shadowed = [
        table.df["record"].iloc[t] for t in np.flatnonzero(used) if int(t) not in records_of
    ]
    stats = {
        "table": table.path,
        "label_column": table.label_column,
        "records_matched": int(matched.sum()),
        "records_unmatched": int((~matched).sum()),
        "table_rows": int(len(table.df)),
        "table_rows_unmatched": len(unmatched),
        "unmatched_examples": unmatched[:5],
        "table_rows_matching_several_records": len(several),
        "several_examples": several[:5],
        "table_rows_overridden": len(shadowed),
        "overridden_examples": shadowed[:5],
    }
    return meta, stats


def patient_conflicts(patient_ids, labels) -> list[str]:
    """Patients (non-empty id) whose known labels disagree across their ECGs."""
    seen: dict[str, set] = {}
    for p, y in zip(patient_ids, labels):
        if p and not (isinstance(y, float) and math.isnan(y)):
            seen.setdefault(str(p), set()).add(float(y))
    return sorted(p for p, s in seen.items() if len(s) > 1)
