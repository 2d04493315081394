"""Reading a prepared dataset: `open_dataset(path)` -> `Dataset`.

On-disk layout of a prepared dataset DIR (written by `python -m ecgcl_jax.data prepare`):
  manifest.json   sources, every option, package versions, summary, status
  signals.npy     (N, 5000, 12) int16 counts, memory-mapped on open   [or signals.npz, compressed, loaded whole]
  scales.npy      (N,) float32 mV per count: signal = counts * scale  [inside signals.npz when compressed]
  meta.csv        one row per stored row (record, name, patient_id, label, fs_original, ...)
  skipped.csv     every skipped input with its reason
"""

from __future__ import annotations

import json
import os
import zipfile
from importlib import resources

import numpy as np
import pandas as pd

from ecgcl_jax.data.labels import READ_COLUMNS, binary_column
from ecgcl_jax.errors import UserError

FORMAT = "ecgcl-jax prepared dataset"
FORMAT_VERSION = 1
NUMERIC_COLUMNS = (
    "label",
    "normal",
    "age",
    "fs_original",
    "n_samples_original",
    "n_leads_original",
    "valid_length",
    "window",
)
INT_COLUMNS = ("n_samples_original", "n_leads_original", "valid_length", "window")


def default_data_path() -> str:
    """Folder of the embedded default dataset (ecgcl_jax/default_data/)."""
    return str(resources.files("ecgcl_jax") / "default_data")


class Signals:
    """Array-like (N, 5000, 12) view: indexing returns float32 mV computed as raw * scale (nothing loaded whole)."""

    def __init__(self, raw, scales: np.ndarray):
        self._raw, self._scales = raw, scales

    shape = property(lambda self: tuple(self._raw.shape))
    ndim = 3
    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self._raw.shape[0]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        # spell `...` out against the 3 axes (record, time, lead)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        first, rest = key[0], key[1:]
        raw = np.asarray(self._raw[first])
        s = self._scales[first]
        x = raw.astype(np.float32) * (
            np.asarray(s, np.float32)[..., None, None] if np.ndim(s) else np.float32(s)
        )
        return x[(slice(None),) * (x.ndim - 2) + rest] if rest else x

    def __array__(self, dtype=None, copy=None):
        x = self[:]
        return x if dtype is None else x.astype(dtype)


class Dataset:
    """A prepared dataset. See module docstring for the layout; `signals[i]`: (5000, 12) float32 mV."""

    def __init__(
        self,
        path: str,
        manifest: dict,
        raw,
        scales: np.ndarray,
        meta: pd.DataFrame,
        label_column: str,
    ):
        self.path = path
        self.manifest = manifest
        self.raw = raw
        self.scales = np.asarray(scales, np.float32)
        self.meta = meta
        self.label_column = label_column
        self.signals = Signals(raw, self.scales)
        self.records = meta["record"].to_numpy(dtype=str)
        self.names = meta["name"].to_numpy(dtype=str)
        self.patient_ids = meta["patient_id"].to_numpy(dtype=str)
        self.labels = _label_array(meta, label_column, path)

    def __len__(self) -> int:
        return len(self.meta)

    def __repr__(self) -> str:
        known = ~np.isnan(self.labels)
        return (
            f"Dataset({self.path!r}, n={len(self)}, label={self.label_column!r}, "
            f"positives={int(np.nansum(self.labels))}/{int(known.sum())} known)"
        )

    def label_columns(self) -> list[str]:
        """Columns of `meta` usable as a binary label (all values 0/1, true/false, yes/no or empty)."""
        out = []
        for c in self.meta.columns:
            if c in INT_COLUMNS:  # window 0/1 of a two-window record is no label
                continue
            try:
                v = binary_column(self.meta[c].astype(str).replace("nan", ""), c)
            except UserError:
                continue
            if np.isfinite(v).any():
                out.append(c)
        return out

    def with_label(self, column: str) -> Dataset:
        """Same data, `.labels` taken from meta column `column` (UserError if absent or not binary)."""
        if column not in self.meta.columns:
            tasks = self.tasks()
            plain = [c for c in self.label_columns() if not any(c in v for v in tasks.values())]
            raise UserError(
                f"{self.path}: no label column '{column}' (label columns: {', '.join(plain)}"
                + (f"; and the columns of tasks {', '.join(tasks)}" if tasks else "")
                + ")"
            )
        return Dataset(self.path, self.manifest, self.raw, self.scales, self.meta, column)

    def task(self, spec: str, field: str = "config.data.task"):
        """`spec` -> `tasks.Task` (labels (N, C) float32, NaN = unknown); see `tasks.resolve_task`."""
        from ecgcl_jax.data.tasks import resolve_task

        return resolve_task(self, spec, field)

    def tasks(self) -> dict[str, tuple[str, ...]]:
        """Task name -> its ordered meta.csv columns, for every task `prepare` wrote (see `tasks.list_tasks`)."""
        from ecgcl_jax.data.tasks import list_tasks

        return list_tasks(self)


def _label_array(meta: pd.DataFrame, column: str, path: str) -> np.ndarray:
    if column not in meta.columns:
        return np.full(len(meta), np.nan, np.float32)
    col = meta[column]
    if col.dtype.kind == "f":
        v = col.to_numpy(np.float32)
        if np.all(np.isnan(v) | (v == 0) | (v == 1)):
            return v
    vals = col.astype(str).replace({"nan": "", "NaN": ""})
    return binary_column(vals.tolist(), f"{os.path.join(path, 'meta.csv')}: column '{column}'")


STRING_COLUMNS = (
    "record",
    "name",
    "relpath",
    "source",
    "source_id",
    "patient_id",
    "ecg_id",
    "sex",
    "dx",
    "labels",
    "scp_codes",
    *READ_COLUMNS,
)


def read_meta(path: str) -> pd.DataFrame:
    """meta.csv -> DataFrame: ids stay strings; known numeric columns and 0/1 columns become floats/ints."""
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    binary = [
        c
        for c in meta.columns
        if c not in STRING_COLUMNS
        and c not in NUMERIC_COLUMNS
        and meta[c].isin(["", "0", "1", "0.0", "1.0"]).all()
        and (meta[c] != "").any()
    ]
    for c in list(NUMERIC_COLUMNS) + binary:
        if c in meta.columns:
            meta[c] = pd.to_numeric(meta[c].replace("", np.nan), errors="coerce")
            if c in INT_COLUMNS and not meta[c].isna().any():
                meta[c] = meta[c].astype(np.int64)
    return meta


def open_dataset(path: str) -> Dataset:
    """Open a prepared dataset folder; `path == ""` opens the embedded default set."""
    path = default_data_path() if path in ("", None) else os.path.expanduser(str(path))
    man_path = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise UserError(
            f"{path}: dataset folder not found (make one with: python -m ecgcl_jax.data prepare SRC "
            f"--out {path})"
        )
    if not os.path.isfile(man_path):
        raise UserError(
            f"{path}: not a prepared dataset (no manifest.json; run python -m ecgcl_jax.data prepare)"
        )
    try:
        with open(man_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{man_path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{man_path}: not an ecgcl-jax prepared dataset manifest")
    if manifest.get("status") != "complete":
        raise UserError(
            f"{path}: preparation did not finish (status '{manifest.get('status')}'); re-run the same "
            "prepare command to continue it"
        )
    npy, npz = os.path.join(path, "signals.npy"), os.path.join(path, "signals.npz")
    try:  # a truncated copy, a disk that filled up: one line naming the file, not numpy's traceback
        if os.path.isfile(npy):
            where = npy
            raw = np.load(npy, mmap_mode="r")
            where = os.path.join(path, "scales.npy")
            scales = np.load(where)
        elif os.path.isfile(npz):
            where = npz
            with np.load(npz) as z:
                raw, scales = z["raw"], z["scales"]
        else:
            raise UserError(f"{path}: signals.npy missing")
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(
            f"{where}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "is it a complete copy? re-run prepare to rebuild it"
        ) from None
    meta = read_meta(os.path.join(path, "meta.csv"))
    if not (raw.shape[0] == len(scales) == len(meta)):
        raise UserError(
            f"{path}: signals ({raw.shape[0]}), scales ({len(scales)}) and meta.csv ({len(meta)}) "
            "disagree in length"
        )
    column = manifest.get("options", {}).get("label_column") or "label"
    return Dataset(path, manifest, raw, scales, meta, column if column in meta.columns else "label")
