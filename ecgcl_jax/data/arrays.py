"""Array sources: plain `.npy`/`.npz` arrays (+ a CSV of ids and labels) and the reference's parquet files.

- `X.npy`: (N, length, leads) or (N, leads, length) physical values; leads in `--array-leads` order
  (default the standard 12), rate `--array-fs`, unit `--array-units`.
- `X.npz`: the same array under key `signals` (or `x`, or its only 3-D array).
- `X.csv` beside it (optional): one row per array row, in order: `record` (or `id`/`name`) -> record name,
  `patient_id`, and label columns (kept; a column `label` is the binary label).
- `*.parquet` (reference schema): one list column per lead named `<prefix><lead>` (default prefix `full_lead_`),
  a patient column and a binary label column (names configurable). Needs the optional extra `parquet` (pyarrow).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd

from ecgcl_jax.data.header_meta import clean_id
from ecgcl_jax.data.wfdb_io import RawSignal, SkipRecord, unit_factor
from ecgcl_jax.errors import UserError

PARQUET_HINT = "reading parquet files needs pyarrow: pip install 'ecgcl-jax[parquet]' (or: pip install pyarrow)"


def have_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def require_pyarrow(path: str) -> None:
    """UserError with an install hint when pyarrow is missing."""
    if not have_pyarrow():
        raise UserError(f"{path}: {PARQUET_HINT}")


def npy_rows(path: str) -> int:
    """Number of records in a .npy file (reads only its header); raises SkipRecord if unreadable."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise SkipRecord(f"unreadable .npy ({type(e).__name__})") from None
    if arr.ndim == 2:
        return 1
    if arr.ndim != 3:
        raise SkipRecord(f"array of shape {arr.shape} (expected (N, length, leads))")
    return int(arr.shape[0])


def _side_csv(path: str) -> pd.DataFrame | None:
    """The CSV beside array file `path` (None if there is none); SkipRecord if unreadable.

    A .npy is read one row per input item, so the table is parsed once per file and process, not once per row."""
    csv = os.path.splitext(path)[0] + ".csv"
    try:
        st = os.stat(csv)
    except OSError:
        return None
    return _read_side_csv(csv, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_side_csv(csv: str, mtime_ns: int, size: int) -> pd.DataFrame:
    try:
        return pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:
        raise SkipRecord(f"unreadable {os.path.basename(csv)} ({type(e).__name__})") from None


def check_side_csv(path: str, n_rows: int) -> None:
    """SkipRecord when the CSV beside `path` cannot be read or has not one line per array row (ids and labels
    would not line up with the rows)."""
    side = _side_csv(path)
    if side is not None and len(side) != n_rows:
        stem = os.path.splitext(os.path.basename(path))[0]
        raise SkipRecord(
            f"{stem}.csv has {len(side)} lines for {n_rows} array rows (one line per row)"
        )


def _orient(x: np.ndarray, n_leads: int, layout: str) -> np.ndarray:
    """One record (a, b) -> (length, leads)."""
    if layout == "NLC" or (layout == "auto" and x.shape[-1] == n_leads and x.shape[0] != n_leads):
        return x
    if layout == "NCL" or (layout == "auto" and x.shape[0] == n_leads):
        return x.T
    raise SkipRecord(f"record of shape {x.shape} has no axis of {n_leads} leads")


def _row_meta(side: pd.DataFrame | None, i: int, stem: str) -> dict:
    m = {"name": f"{stem}_{i}", "patient_id": ""}
    if side is None:
        return m
    row = side.iloc[i]
    for c in side.columns:
        v = str(row[c])
        if c in ("record", "id", "name"):
            if v.strip():
                m["name"] = v.strip()
        elif c == "patient_id":
            m["patient_id"] = clean_id(v)
        else:
            m[c] = v
    return m


def iter_array_records(
    path: str, rows: list[int] | None, fs: float, units: str, leads: list[str], layout: str
):
    """Yield (row, RawSignal or SkipRecord, meta) for rows of a .npy/.npz file (rows None = all)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = next((k for k in ("signals", "x", "X") if k in keys), None)
                if key is None:
                    k3 = [k for k in keys if z[k].ndim == 3]
                    if len(k3) != 1:
                        raise SkipRecord(
                            f"no 'signals' array in .npz (keys: {', '.join(keys[:8])})"
                        )
                    key = k3[0]
                arr = np.asarray(z[key])
        else:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise SkipRecord(f"array of shape {arr.shape} (expected (N, length, leads))")
        check_side_csv(path, arr.shape[0])
        side = _side_csv(path)
        fac = unit_factor(units)
    except SkipRecord as e:
        yield None, e, {"name": stem}
        return
    except Exception as e:
        yield None, SkipRecord(f"unreadable array file ({type(e).__name__})"), {"name": stem}
        return
    for i in range(arr.shape[0]) if rows is None else rows:
        try:
            meta = _row_meta(side, i, stem)
            x = _orient(np.asarray(arr[i], np.float64), len(leads), layout) * fac
            yield i, RawSignal(x, list(leads), float(fs), int(x.shape[0]), None, [], "numpy"), meta
        except SkipRecord as e:
            yield i, e, {"name": f"{stem}_{i}"}


def iter_parquet_records(
    path: str, fs: float, units: str, prefix: str, patient_col: str, label_col: str
):
    """Yield (row, RawSignal or SkipRecord, meta) for each row of a reference-schema parquet file."""
    import pyarrow.parquet as pq

    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        table = pq.read_table(path)
    except Exception as e:
        yield None, SkipRecord(f"unreadable parquet ({type(e).__name__})"), {"name": stem}
        return
    lead_cols = [c for c in table.column_names if c.startswith(prefix)]
    if not lead_cols:
        yield None, SkipRecord(f"no lead columns named '{prefix}<lead>'"), {"name": stem}
        return
    names = [c[len(prefix) :] for c in lead_cols]
    cols = {c: table.column(c).to_pylist() for c in lead_cols}
    pids = table.column(patient_col).to_pylist() if patient_col in table.column_names else None
    labs = table.column(label_col).to_pylist() if label_col in table.column_names else None
    fac = unit_factor(units)
    for i in range(table.num_rows):
        meta = {
            "name": f"{stem}_{i}",
            "patient_id": "" if pids is None or pids[i] is None else clean_id(str(pids[i])),
        }
        if labs is not None:
            meta[label_col] = "" if labs[i] is None else str(labs[i])
        try:
            seqs = [cols[c][i] for c in lead_cols]
            if any(s is None for s in seqs):
                raise SkipRecord("empty lead column")
            n = min(len(s) for s in seqs)
            if any(len(s) != n for s in seqs):
                raise SkipRecord("lead arrays of different lengths")
            x = np.array([np.asarray(s, np.float64) for s in seqs]).T * fac
            yield i, RawSignal(x, names, float(fs), int(n), None, [], "parquet"), meta
        except SkipRecord as e:
            yield i, e, meta
        except (TypeError, ValueError) as e:
            yield i, SkipRecord(f"bad lead values ({type(e).__name__})"), meta
