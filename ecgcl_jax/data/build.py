"""`prepare`: walk sources, standardise every record in a process pool, write a prepared dataset.

Work is cut into fixed chunks of inputs; each finished chunk is written to DIR/.partial/ so an interrupted run
continues where it stopped. The manifest's `identity` (sources and their file listing, every option, the label
table's hash, the package version) decides whether a re-run is a no-op, a continuation or a fresh build.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

import ecgcl_jax
from ecgcl_jax import LEADS, NUM_SAMPLES
from ecgcl_jax.data import arrays
from ecgcl_jax.data.dataset import FORMAT, FORMAT_VERSION
from ecgcl_jax.data.header_meta import clean_id, parse_comments, ptbxl_rate_tag, source_id
from ecgcl_jax.data.labels import (
    AUTO_TABLE_NAMES,
    apply_label_table,
    binary_column,
    find_auto_table,
    load_label_table,
    patient_conflicts,
)
from ecgcl_jax.data.leads import normalise_lead
from ecgcl_jax.data.process import ProcessOptions, seconds_needed, to_rows
from ecgcl_jax.data.tasks import SCP_STATEMENTS, derive_tasks, load_scp_statements
from ecgcl_jax.data.wfdb_io import SkipRecord, read_wfdb
from ecgcl_jax.errors import UserError

OUTPUT_FILES = (
    "manifest.json",
    "signals.npy",
    "signals.npz",
    "scales.npy",
    "meta.csv",
    "skipped.csv",
)
PARTIAL = ".partial"


CHOICES = {
    "length": ("crop", "windows"),
    "short": ("pad", "drop"),
    "missing_leads": ("drop", "zero"),
    "array_layout": ("auto", "NLC", "NCL"),
}  # the allowed values of PrepareOptions' string options


@dataclass(frozen=True)
class PrepareOptions:
    """Every option of `prepare` that shapes the output (recorded in the manifest; see README_data)."""

    length: str = "crop"  # crop | windows
    short: str = "pad"  # pad | drop
    missing_leads: str = "drop"  # drop | zero
    min_seconds: float = 1.0
    max_denominator: int = 1000
    # PTB-XL NNNNN_lr with a NNNNN_hr twin in the same SRC: keep only the 500 Hz one
    dedupe: bool = True
    labels: str | None = None  # label table CSV
    label_column: str | None = None  # None: the table's only label column, else 'normal'
    # without --labels: attach labels.csv / records.csv found at the top of a SRC folder
    auto_labels: bool = True
    # signals.npz (compressed, loaded whole) instead of signals.npy (memory-mapped)
    compress: bool = False
    array_fs: float = 500.0  # .npy/.npz/.parquet: sampling rate, unit and lead order of the arrays
    array_units: str = "mV"
    array_leads: tuple = tuple(LEADS)
    array_layout: str = "auto"  # auto | NLC | NCL
    parquet_lead_prefix: str = "full_lead_"
    parquet_patient_column: str = "patient_id"
    parquet_label_column: str = "label"
    # task `dx`: one column per `#Dx` code present in at least this many records
    dx_min_count: int = 1

    def process(self) -> ProcessOptions:
        return ProcessOptions(
            self.length, self.short, self.missing_leads, self.min_seconds, self.max_denominator
        )

    def validate(self) -> None:
        for k, allowed in CHOICES.items():
            if getattr(self, k) not in allowed:
                raise UserError(
                    f"--{k.replace('_', '-')}: '{getattr(self, k)}' is not one of {', '.join(allowed)}"
                )
        if not (self.array_fs > 0):
            raise UserError(f"--array-fs: must be > 0, got {self.array_fs}")
        if self.min_seconds < 0 or self.min_seconds > NUM_SAMPLES / ecgcl_jax.SAMPLE_RATE:
            raise UserError(f"--min-seconds: must be in [0, 10], got {self.min_seconds}")
        if int(self.dx_min_count) != self.dx_min_count or self.dx_min_count < 1:
            raise UserError(f"--dx-min-count: must be an integer >= 1, got {self.dx_min_count}")
        bad = [l for l in self.array_leads if normalise_lead(l) is None]
        if bad:
            raise UserError(f"--array-leads: unknown lead names {', '.join(bad)}")


# ----------------------------------------------------------------------------------------------- discovery
@dataclass
class Inputs:
    items: list = field(default_factory=list)  # (kind, src_index, path, row)
    duplicates: list = field(default_factory=list)  # (100 Hz twin left out, reason)
    # PTB-XL 500 Hz header -> (src index, its 100 Hz twin's header)
    twins: dict = field(default_factory=dict)
    ptbxl_csvs: list = field(default_factory=list)
    # (src index, labels.csv / records.csv below the SRC's top)
    nested_tables: list = field(default_factory=list)
    listing_hash: str = ""
    n_files: int = 0


def _is_prepared(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "manifest.json")) and (
        os.path.isfile(os.path.join(folder, "signals.npy"))
        or os.path.isfile(os.path.join(folder, "signals.npz"))
        or os.path.isdir(os.path.join(folder, PARTIAL))
    )


def discover(sources: list[str], dedupe: bool, out: str | None = None) -> Inputs:
    """Walk sources (files or folders, recursively, sorted) and list the inputs to read.

    Hidden folders, the output folder and other prepared datasets inside a SRC are not walked."""
    inp = Inputs()
    h = hashlib.sha1()
    seen: set[str] = set()
    out_abs = os.path.abspath(out) if out else None
    for si, src in enumerate(sources):
        if os.path.isfile(src):
            files = [src]
        elif os.path.isdir(src):
            files = []
            for root, dirs, names in os.walk(src):
                if os.path.abspath(root) == out_abs or (root != src and _is_prepared(root)):
                    dirs[:] = []
                    continue
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(root, n) for n in sorted(names))
        else:
            raise UserError(f"{src}: no such file or folder")
        heas = {}
        for f in files:
            fa = os.path.abspath(f)
            if fa in seen:  # the same file reached through two SRCs
                continue
            seen.add(fa)
            try:
                size = os.path.getsize(f)
            except OSError:
                size = -1
            h.update(f"{si}\0{os.path.relpath(f, src)}\0{size}\n".encode())
            inp.n_files += 1
            low = f.lower()
            if low.endswith(".hea"):
                heas[f] = (si, f)
            elif low.endswith(".npy"):
                try:
                    n = arrays.npy_rows(f)
                    arrays.check_side_csv(f, n)  # a bad CSV skips the file once, not once per row
                except SkipRecord as e:
                    inp.items.append(("bad", si, f, str(e)))
                    continue
                inp.items.extend(("npy", si, f, r) for r in range(n))
            elif low.endswith(".npz"):
                inp.items.append(("npz", si, f, None))
            elif low.endswith(".parquet"):
                arrays.require_pyarrow(f)
                inp.items.append(("parquet", si, f, None))
            elif os.path.basename(low) == "ptbxl_database.csv":
                inp.ptbxl_csvs.append(f)
            elif os.path.basename(f) in AUTO_TABLE_NAMES and os.path.dirname(fa) != os.path.abspath(
                src
            ):
                inp.nested_tables.append((si, f))
            elif low.endswith(".mat") and not os.path.exists(f[:-4] + ".hea"):
                inp.items.append(("bad", si, f, "'.mat' file without its '.hea' header"))
        twins = set()
        if dedupe:
            by = {}
            for f in heas:
                tag = ptbxl_rate_tag(os.path.basename(f)[:-4])
                if tag:
                    by.setdefault(tag[0], {})[tag[1]] = f
            for d in by.values():
                if "hr" in d and "lr" in d:
                    twins.add(d["lr"])
                    inp.twins[d["hr"]] = (si, d["lr"])
        inp.items.extend(("wfdb", si, f, None) for f in heas if f not in twins)
    order = {k: i for i, k in enumerate(("wfdb", "npy", "npz", "parquet", "bad"))}
    inp.items.sort(
        key=lambda t: (
            t[1],
            t[2],
            order[t[0]],
            -1 if t[3] is None or isinstance(t[3], str) else t[3],
        )
    )
    inp.listing_hash = h.hexdigest()
    return inp


# ----------------------------------------------------------------------------------------------- workers
def _relpath(path: str, src: str) -> str:
    rel = os.path.basename(path) if os.path.isfile(src) else os.path.relpath(path, src)
    return os.path.splitext(rel.replace(os.sep, "/"))[0]


def _records_of(item, sources, opts: PrepareOptions, popts: ProcessOptions):
    """Yield (record path, relpath, name, RawSignal | SkipRecord, extra meta) for one input item."""
    kind, si, path, row = item
    src = sources[si]
    rel = _relpath(path, src)
    if kind == "bad":
        yield path, rel, os.path.splitext(os.path.basename(path))[0], SkipRecord(row), {}
        return
    if kind == "wfdb":
        name = os.path.basename(path)[:-4]
        try:
            sig = read_wfdb(path, seconds_needed(popts))
        except SkipRecord as e:
            yield path, rel, name, e, {}
            return
        meta = parse_comments(sig.comments)
        meta["format"] = "cinc_mat" if os.path.exists(path[:-4] + ".mat") else "wfdb"
        yield path, rel, name, sig, meta
        return
    if kind == "parquet":
        gen = arrays.iter_parquet_records(
            path,
            opts.array_fs,
            opts.array_units,
            opts.parquet_lead_prefix,
            opts.parquet_patient_column,
            opts.parquet_label_column,
        )
    else:
        gen = arrays.iter_array_records(
            path,
            None if row is None else [row],
            opts.array_fs,
            opts.array_units,
            list(opts.array_leads),
            opts.array_layout,
        )
    for r, sig, meta in gen:
        rec = path if r is None else f"{path}#{r}"
        name = meta.pop("name", os.path.splitext(os.path.basename(path))[0])
        meta["format"] = kind
        yield rec, rel if r is None else f"{rel}#{r}", name, sig, meta


def _process_chunk(job) -> dict:
    """Worker: process one chunk of inputs and write DIR/.partial/chunk_XXXXX.{npy,json}. Never raises on data."""
    idx, items, sources, opts_d, partial = job
    opts = PrepareOptions(**opts_d)
    popts = opts.process()
    counts, scales, metas, skips = [], [], [], []
    for item in items:
        for rec, rel, name, sig, extra in _records_of(item, sources, opts, popts):
            try:
                if isinstance(sig, SkipRecord):
                    raise sig
                rows, info = to_rows(sig, popts)
            except SkipRecord as e:
                skips.append((rec, str(e)))
                continue
            except Exception as e:  # a reader bug must not lose the other records
                skips.append((rec, f"unexpected error ({type(e).__name__}: {str(e)[:100]})"))
                continue
            for q, scale, win in rows:
                m = {
                    "record": rec,
                    "name": name,
                    "relpath": rel,
                    "source": sources[item[1]],
                    "source_id": source_id(name),
                    **info,
                    **win,
                    **extra,
                }
                counts.append(q)
                scales.append(scale)
                metas.append(m)
    arr = np.stack(counts) if counts else np.zeros((0, NUM_SAMPLES, len(LEADS)), np.int16)
    base = os.path.join(partial, f"chunk_{idx:05d}")
    np.save(base + ".tmp.npy", arr)
    os.replace(base + ".tmp.npy", base + ".npy")
    with open(base + ".tmp.json", "w") as f:
        json.dump(
            {"inputs": len(items), "scales": scales, "meta": metas, "skips": skips},
            f,
            default=_json_default,
        )
    os.replace(base + ".tmp.json", base + ".json")  # the .json marks the chunk as done
    return {"chunk": idx, "inputs": len(items), "rows": len(metas), "skips": skips}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """One progress line on stderr: records done, records/s, ETA (rewritten in place on a terminal)."""

    def __init__(self, total: int, stream=None, every: float = 0.5):
        self.total, self.done, self.base, self.t0 = total, 0, 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every if self.tty else 10.0
        self.last = -1e9

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = (
            self.done - self.base
        ) / dt  # records read in this run (a continued run starts at base)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = "--" if not math.isfinite(eta) else f"{int(eta // 60)}:{int(eta % 60):02d}"
        return f"prepare: {self.done}/{self.total} records  {rate:.0f} records/s  ETA {eta_s}"

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if force or now - self.last >= self.every or self.done == self.total:
            self.last = now
            if self.tty:
                self.stream.write("\r\033[K" + self.line())
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------- manifest
def _versions() -> dict:
    import scipy
    import wfdb

    return {
        "ecgcl_jax": ecgcl_jax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "wfdb": wfdb.__version__,
        "pandas": pd.__version__,
        "python": sys.version.split()[0],
    }


def _identity(sources, inputs: Inputs, opts: PrepareOptions, table_sha, chunk: int) -> str:
    d = {
        "format_version": FORMAT_VERSION,
        "version": ecgcl_jax.__version__,
        "sources": sources,
        "listing": inputs.listing_hash,
        "options": asdict(opts),
        "labels_sha1": table_sha,
        "chunk": chunk,
    }
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)


def _clear(out: str) -> None:
    for n in OUTPUT_FILES:
        p = os.path.join(out, n)
        if os.path.exists(p):
            os.remove(p)
    shutil.rmtree(os.path.join(out, PARTIAL), ignore_errors=True)


def _chunk_size(n: int) -> int:
    return int(min(256, max(4, math.ceil(n / 64))))


# ----------------------------------------------------------------------------------------------- metadata joins
def load_ptbxl_db(csv: str) -> pd.DataFrame | None:
    """PTB-XL's ptbxl_database.csv, indexed by canonical ecg_id ('00841' -> '841'); None without an ecg_id column.

    Read before any record is processed, so that a bad file stops prepare at once (UserError, one line)."""
    try:
        db = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas' parser errors
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{csv}: cannot read as CSV ({type(e).__name__}: {first})") from None
    if "ecg_id" not in db.columns:
        return None
    db = db.set_index(
        db["ecg_id"].map(lambda v: str(int(c)) if (c := clean_id(v)).isdigit() else c)
    )
    dup = db.index[db.index.duplicated() & (db.index != "")]
    if len(dup):
        raise UserError(f"{csv}: ecg_id {dup[0]} appears in more than one row")
    return db


def _apply_ptbxl(meta: pd.DataFrame, dbs: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """Patient id, scp_codes, strat_fold, age, sex, ecg_id and `normal` (NORM at likelihood 100) from PTB-XL's
    ptbxl_database.csv (path, load_ptbxl_db's frame) for records in the folder holding it."""
    for csv, db in dbs:
        root = os.path.dirname(os.path.abspath(csv)) + os.sep
        for col in ("patient_id", "scp_codes", "strat_fold", "ecg_id", "age", "sex", "normal"):
            if col not in meta.columns:
                meta[col] = "" if col != "normal" else np.nan
        for i in range(len(meta)):
            sid = meta.at[i, "source_id"]
            if (
                not sid
                or sid not in db.index
                or not os.path.abspath(meta.at[i, "record"]).startswith(root)
            ):
                continue
            r = db.loc[sid]
            pid = clean_id(str(r.get("patient_id", "")))
            if pid:
                meta.at[i, "patient_id"] = pid
            meta.at[i, "ecg_id"] = sid
            for c in ("scp_codes", "strat_fold"):
                if c in r:
                    meta.at[i, c] = str(r[c])
            try:
                meta.at[i, "age"] = float(r.get("age", "nan"))
            except ValueError:
                pass
            if str(r.get("sex", "")).strip() in ("0", "1"):
                meta.at[i, "sex"] = "M" if str(r["sex"]).strip() == "0" else "F"
            try:  # a malformed scp_codes cell leaves `normal` unknown for that record
                codes = ast.literal_eval(str(r.get("scp_codes", "")))
                meta.at[i, "normal"] = 1.0 if float(codes.get("NORM", 0)) == 100.0 else 0.0
            except (
                ValueError,
                TypeError,
                SyntaxError,
                AttributeError,
                MemoryError,
                RecursionError,
            ):
                pass
    return meta


def find_scp_statements(ptbxl_csvs, table_paths, sources) -> str | None:
    """PTB-XL's scp_statements.csv: the first found beside a ptbxl_database.csv, beside a label table, or at the
    top of a SRC folder; None when there is none."""
    # paths as given (relative ones stay relative, as the label tables' in the manifest)
    folders = [os.path.dirname(p) for p in list(ptbxl_csvs) + list(table_paths)]
    folders += [s for s in sources if os.path.isdir(s)]
    for d in folders:
        p = os.path.join(d, SCP_STATEMENTS) if d else SCP_STATEMENTS
        if os.path.isfile(p):
            return p
    return None


def _add_tasks(meta, header_words, header_dx, statements, opts, manifest):
    """Derive the dataset's tasks (see data/tasks.py) and append their `<task>:<class>` columns to meta; the
    manifest's `tasks` lists each task's ordered columns and classes. Returns (meta, summary of the tasks)."""
    has_scp = "scp_codes" in meta.columns and meta["scp_codes"].astype(str).str.strip().ne("").any()
    tasks, stats = derive_tasks(
        scp_codes=meta["scp_codes"].astype(str).tolist() if has_scp else None,
        statements=statements[1] if statements else None,
        label_words=header_words,
        dx=header_dx,
        dx_min_count=int(opts.dx_min_count),
        statements_path=statements[0] if statements else "",
    )
    if has_scp and not statements:
        stats["note"] = (
            f"records have scp_codes but no {SCP_STATEMENTS} was found beside ptbxl_database.csv, a "
            "label table or at the top of a SRC, so the PTB-XL tasks other than what '# Labels' gives are "
            "not written"
        )
    if statements:
        stats["scp_statements"] = statements[0]
    manifest["tasks"] = {}
    summary = {}
    new = {}
    for t in tasks:
        for j, col in enumerate(t.columns):
            if col in meta.columns:  # a label table's column of that name stays as source_<name>
                meta[f"source_{col}"] = meta[col]
                meta = meta.drop(columns=[col])
            new[col] = t.labels[:, j]
        manifest["tasks"][t.name] = {
            "columns": list(t.columns),
            "classes": list(t.classes),
            "source": t.source,
        }
        known = np.isfinite(t.labels).all(axis=1)
        summary[t.name] = {
            "known": int(known.sum()),
            "positives": {c: int(np.nansum(t.labels[:, j])) for j, c in enumerate(t.classes)},
        }
    if new:  # all at once: a column at a time fragments the frame (PTB-XL has ~170 task columns)
        meta = pd.concat([meta, pd.DataFrame(new, index=meta.index)], axis=1)
    if not manifest["tasks"]:
        del manifest["tasks"]
    return meta, ({"tasks": summary, **stats} if summary or stats else {})


def _reason_kind(reason: str) -> str:
    r = reason.lower()
    for key, kind in (
        ("duplicate:", "duplicate (lower-rate copy)"),
        ("truncated", "truncated signal file"),
        ("signal file", "missing signal file"),
        ("header", "bad header"),
        ("nan", "NaN samples"),
        ("missing leads", "missing/unknown leads"),
        ("lead names", "wrong lead count"),
        ("no axis of", "wrong lead count"),
        ("duplicate leads", "duplicate leads"),
        ("zero-length", "zero-length"),
        ("too short", "too short"),
        ("shorter than 10 s", "shorter than 10 s"),
        (".mat", "unreadable .mat"),
        ("unit", "unknown unit"),
        ("unreadable", "unreadable file"),
    ):
        if key in r:
            return kind
    return "other"


# ----------------------------------------------------------------------------------------------- main entry
def prepare(
    sources: list[str],
    out: str,
    opts: PrepareOptions | None = None,
    workers: int | None = None,
    force: bool = False,
    stream=None,
) -> dict:
    """Prepare `sources` into dataset folder `out`; returns the summary dict. Raises UserError on bad usage or
    when no record could be prepared; bad records are skipped and reported."""
    opts = opts or PrepareOptions()
    opts.validate()
    stream = stream or sys.stderr
    t0 = time.perf_counter()
    sources = [
        os.path.expanduser(str(s)) for s in sources
    ]  # `~/data/x` from Python as from a shell
    out = os.path.expanduser(str(out))
    if not sources:
        raise UserError("prepare: give at least one SRC")
    unused = []  # label tables in SRC that are not applied, and why (said in the summary)
    if opts.labels:
        tables = [(None, load_label_table(opts.labels, opts.label_column))]
        unused = [
            (p, "--labels was given; its patient ids are not applied either")
            for p in (find_auto_table(s) for s in sources)
            if p and os.path.abspath(p) != os.path.abspath(opts.labels)
        ]
    else:
        found = (
            [(si, find_auto_table(s)) for si, s in enumerate(sources)] if opts.auto_labels else []
        )
        tables = [(si, load_label_table(p, opts.label_column, auto=True)) for si, p in found if p]
    inputs = discover(sources, opts.dedupe, out)
    ptbxl_dbs = [(p, db) for p in inputs.ptbxl_csvs if (db := load_ptbxl_db(p)) is not None]
    # tables below a SRC's top, which only that subfolder as SRC would use
    if opts.auto_labels and not opts.labels:
        unused = [
            (p, "in a subfolder of SRC: give that folder as SRC, or the table with --labels")
            for si, p in inputs.nested_tables
            if not found[si][1] and find_auto_table(os.path.dirname(p)) == p
        ]
    statements = find_scp_statements(inputs.ptbxl_csvs, [t.path for _, t in tables], sources)
    if statements:
        with open(statements, "rb") as f:
            statements_sha = hashlib.sha1(f.read()).hexdigest()
        statements = (statements, load_scp_statements(statements), statements_sha)
    n_items = len(inputs.items)
    chunk = _chunk_size(n_items)
    ident = _identity(
        [os.path.abspath(s) for s in sources],
        inputs,
        opts,
        [t.sha1 for _, t in tables] + ([statements[2]] if statements else []),
        chunk,
    )
    os.makedirs(out, exist_ok=True)
    man_path = os.path.join(out, "manifest.json")
    old = None
    if os.path.isfile(man_path):
        try:
            with open(man_path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
    if old and not force and old.get("identity") == ident and old.get("status") == "complete":
        stream.write(
            f"prepare: {out} is up to date ({old.get('summary', {}).get('rows', '?')} rows); nothing to "
            "do (--force rebuilds)\n"
        )
        return dict(old.get("summary", {}), up_to_date=True)
    resume = bool(
        old and not force and old.get("identity") == ident and old.get("status") == "in_progress"
    )
    if not resume:
        _clear(out)
    partial = os.path.join(out, PARTIAL)
    os.makedirs(partial, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "in_progress",
        "identity": ident,
        "sources": sources,
        "source_files": inputs.n_files,
        "options": asdict(opts),
        "label_tables": [
            {
                "path": t.path,
                "sha1": t.sha1,
                "found_in_src": si is not None,
                "label_column": t.label_column,
            }
            for si, t in tables
        ],
        "versions": _versions(),
        "chunk_size": chunk,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["options"]["array_leads"] = list(opts.array_leads)
    _write_json(man_path, manifest)

    chunks = [inputs.items[i : i + chunk] for i in range(0, n_items, chunk)]
    done = {
        i
        for i in range(len(chunks))
        if os.path.isfile(os.path.join(partial, f"chunk_{i:05d}.json"))
    }
    prog = Progress(n_items, stream)
    if inputs.twins:
        prog.message(
            f"prepare: {len(inputs.twins)} PTB-XL 100 Hz records have a 500 Hz twin in the same "
            "SRC; the 500 Hz ones are used (--keep-duplicates keeps both; list in skipped.csv)"
        )
    if done:
        prog.message(
            f"prepare: continuing an interrupted run: {len(done)} of {len(chunks)} chunks already done"
        )
        prog.done = prog.base = sum(len(chunks[i]) for i in done)
    todo = [i for i in range(len(chunks)) if i not in done]
    opts_d = asdict(opts)
    jobs = [(i, chunks[i], sources, opts_d, partial) for i in todo]
    if not workers:
        workers = ecgcl_jax.available_cpus()
    workers = max(1, min(int(workers or 1), len(jobs) or 1))

    def report(res):
        for rec, reason in res["skips"]:
            prog.message(f"skip {rec}: {reason}")
        prog.update(res["inputs"])

    if workers == 1 or len(jobs) <= 1:
        for j in jobs:
            report(_process_chunk(j))
    else:
        ctx = mp.get_context(
            "fork" if "fork" in mp.get_all_start_methods() and "jax" not in sys.modules else "spawn"
        )
        with cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futs = [pool.submit(_process_chunk, j) for j in jobs]
            try:
                for fut in cf.as_completed(futs):
                    report(fut.result())
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
    # A 100 Hz twin stands in for a 500 Hz record that could not be read, so no good ECG is lost.
    results = [_chunk_result(partial, i) for i in range(len(chunks))]
    failed = {r for c in results for r, _ in c["skips"]}
    rescue = [
        ("wfdb", si, lr, None) for hr, (si, lr) in sorted(inputs.twins.items()) if hr in failed
    ]
    if rescue:
        prog.total += len(rescue)
        prog.message(
            f"prepare: reading {len(rescue)} 100 Hz twins of 500 Hz records that were skipped"
        )
        if not os.path.isfile(os.path.join(partial, f"chunk_{len(chunks):05d}.json")):
            report(_process_chunk((len(chunks), rescue, sources, opts_d, partial)))
        chunks.append(rescue)
        results.append(_chunk_result(partial, len(chunks) - 1))
    used = {lr for _, _, lr, _ in rescue}
    inputs.duplicates = [
        (lr, f"duplicate: 100 Hz copy of {hr} (500 Hz kept)")
        for hr, (_, lr) in sorted(inputs.twins.items())
        if lr not in used
    ]
    prog.close()
    summary = _assemble(
        out, chunks, results, inputs, opts, tables, ptbxl_dbs, sources, manifest, stream, statements
    )
    summary["label_tables_not_used"] = [{"table": p, "why": why} for p, why in unused]
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["records_per_s"] = round(n_items / max(summary["seconds"], 1e-9), 1)
    manifest["summary"] = summary
    manifest["status"] = "complete"
    _write_json(man_path, manifest)
    shutil.rmtree(partial, ignore_errors=True)
    stream.write(format_summary(summary, out) + "\n")
    return summary


def _die_with_parent(parent: int) -> None:
    """Worker initializer (Linux): the kernel kills this worker when prepare's process dies. A SIGTERM (or
    SIGKILL) to prepare otherwise left its idle workers behind; finished chunks are on disk either way."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # it died before the prctl
            os._exit(1)


def _chunk_result(partial: str, i: int) -> dict:
    """What worker chunk i recorded: its rows' meta and scales, and its skips."""
    with open(os.path.join(partial, f"chunk_{i:05d}.json")) as f:
        return json.load(f)


def _assemble(
    out,
    chunks,
    results,
    inputs: Inputs,
    opts: PrepareOptions,
    tables,
    ptbxl_dbs,
    sources,
    manifest,
    stream,
    statements=None,
) -> dict:
    partial = os.path.join(out, PARTIAL)
    metas, scales, skips, sizes = [], [], [], []
    for c in results:
        metas.extend(c["meta"])
        scales.extend(c["scales"])
        skips.extend(c["skips"])
        sizes.append(len(c["meta"]))
    skips = [(p, r) for p, r in inputs.duplicates] + [tuple(s) for s in skips]
    pd.DataFrame(skips, columns=["record", "reason"]).to_csv(
        os.path.join(out, "skipped.csv"), index=False
    )
    n = len(metas)
    if n == 0:
        manifest["status"] = "empty"
        _write_json(os.path.join(out, "manifest.json"), manifest)
        raise UserError(
            f"{out}: no record could be prepared ({len(skips)} inputs skipped, see "
            f"{os.path.join(out, 'skipped.csv')})"
        )
    meta = pd.DataFrame(metas)
    for col, default in (
        ("patient_id", ""),
        ("age", np.nan),
        ("sex", ""),
        ("dx", ""),
        ("labels", ""),
        ("normal", np.nan),
    ):
        if col not in meta.columns:
            meta[col] = default
    meta["patient_id"] = meta["patient_id"].fillna("").astype(str)
    # the headers' own `# Labels` / `#Dx`, before a label table's columns of the same name replace them
    header_words = meta["labels"].fillna("").astype(str).tolist()
    header_dx = meta["dx"].fillna("").astype(str).tolist()
    meta = _apply_ptbxl(meta, ptbxl_dbs)
    label_stats = []
    for si, table in tables:
        if si is None:  # --labels: applies to every record
            meta, st = apply_label_table(table, meta)
        else:  # found in SRC number si: applies to that SRC's records
            mask = (meta["source"] == sources[si]).to_numpy()
            sub, st = apply_label_table(table, meta[mask].reset_index(drop=True))
            for c in sub.columns:
                if c not in meta.columns:
                    meta[c] = ""
                meta[c] = meta[c].astype(object)
                meta.loc[mask, c] = sub[c].to_numpy(dtype=object)
        st["found_in_src"] = si is not None
        label_stats.append(st)
    picked = [t.label_column for _, t in tables if t.label_column]
    if tables and tables[0][0] is None:
        column = tables[0][1].label_column
    elif picked and (opts.label_column is None or opts.label_column == picked[0]):
        column = picked[0]
    else:
        # a label the source states (a header's `Label:`, an array CSV's `label`) before one derived from Dx codes
        column = opts.label_column or next(
            (
                c
                for c in ("label", "normal")
                if c in meta.columns and pd.to_numeric(meta[c], errors="coerce").notna().any()
            ),
            "normal",
        )
        if column not in meta.columns:
            raise UserError(
                f"--label-column: no column '{column}' in the prepared records "
                f"(columns: {', '.join(meta.columns)})"
            )
    if (
        column != "label"
        and "label" in meta.columns
        and meta["label"].astype(str).str.strip().replace("nan", "").ne("").any()
    ):
        # a label table's own `label` column already kept the header's
        if "source_label" not in meta.columns:
            meta["source_label"] = meta[
                "label"
            ]  # the source's own `label`, kept: `label` becomes the chosen column
    meta["label"] = binary_column(
        meta[column].tolist(), f"--label-column {column}", meta["record"].tolist()
    )
    manifest["options"]["label_column"] = column
    meta, task_summary = _add_tasks(meta, header_words, header_dx, statements, opts, manifest)
    front = [
        "record",
        "name",
        "patient_id",
        "label",
        "window",
        "valid_length",
        "fs_original",
        "n_samples_original",
        "age",
        "sex",
    ]
    meta = meta[front + [c for c in meta.columns if c not in front]]
    # signals
    if opts.compress:
        raw = np.concatenate(
            [np.load(os.path.join(partial, f"chunk_{i:05d}.npy")) for i in range(len(chunks))]
        )
        np.savez_compressed(
            os.path.join(out, "signals.npz"), raw=raw, scales=np.asarray(scales, np.float32)
        )
    else:
        mm = np.lib.format.open_memmap(
            os.path.join(out, "signals.tmp.npy"),
            mode="w+",
            dtype=np.int16,
            shape=(n, NUM_SAMPLES, len(LEADS)),
        )
        pos = 0
        for i in range(len(chunks)):
            a = np.load(os.path.join(partial, f"chunk_{i:05d}.npy"), mmap_mode="r")
            mm[pos : pos + len(a)] = a
            pos += len(a)
            del a
        del mm  # no msync: the kernel writes the pages back; a crash before the manifest says "complete" reruns
        os.replace(os.path.join(out, "signals.tmp.npy"), os.path.join(out, "signals.npy"))
        np.save(os.path.join(out, "scales.npy"), np.asarray(scales, np.float32))
    meta.to_csv(os.path.join(out, "meta.csv"), index=False)
    # summary
    labels = meta["label"].to_numpy(np.float64)
    pids = meta["patient_id"].astype(str)
    conflicts = patient_conflicts(pids.tolist(), labels.tolist())
    kinds = Counter(_reason_kind(r) for _, r in skips[len(inputs.duplicates) :])
    summary = {
        "rows": n,
        "records": int(meta["record"].nunique()),
        "inputs": sum(len(c) for c in chunks),
        "skipped": len(skips) - len(inputs.duplicates),
        "skipped_by_reason": dict(sorted(kinds.items())),
        "duplicates": len(inputs.duplicates),
        "patients": int(pids[pids != ""].nunique()),
        "rows_without_patient_id": int((pids == "").sum()),
        "label_column": column,
        "labels": {
            "positive": int((labels == 1).sum()),
            "negative": int((labels == 0).sum()),
            "unknown": int(np.isnan(labels).sum()),
        },
        "rates_hz": {
            f"{k:g}": int(v)
            for k, v in sorted(Counter(meta.drop_duplicates("record")["fs_original"]).items())
        },
        "padded_rows": int((meta["valid_length"] < NUM_SAMPLES).sum()),
        "patients_with_conflicting_labels": len(conflicts),
        "conflict_examples": conflicts[:5],
    }
    if task_summary:
        summary["tasks"] = task_summary
    if label_stats:
        summary["label_table"] = label_stats[0]
        summary["label_tables"] = label_stats
    return summary


def format_summary(s: dict, out: str, per_task: bool = True) -> str:
    """prepare's summary `s` of the dataset in `out` as lines; per_task=False leaves out the per-task lines
    (`data info` prints the dataset's tasks as they are now)."""
    lab = s["labels"]
    lines = [
        f"prepared {s['rows']} rows from {s['records']} records into {out} "
        f"({s.get('seconds', 0):.2f} s, {s.get('records_per_s', 0):.0f} inputs/s); skipped {s['skipped']}"
        + (
            ": " + ", ".join(f"{k} {v}" for k, v in s["skipped_by_reason"].items())
            if s["skipped"]
            else ""
        )
        + (f"; {s['duplicates']} lower-rate duplicates left out" if s.get("duplicates") else ""),
        f"patients: {s['patients']} ({s['rows_without_patient_id']} rows without patient id); rates seen: "
        + ", ".join(f"{k} Hz x{v}" for k, v in s["rates_hz"].items()),
        f"label '{s['label_column']}': {lab['positive']} positive, {lab['negative']} negative, "
        f"{lab['unknown']} unknown; patients with conflicting labels: {s['patients_with_conflicting_labels']}"
        + (f" (e.g. {', '.join(s['conflict_examples'])})" if s["conflict_examples"] else ""),
    ]
    for t in s.get("label_tables", [s["label_table"]] if s.get("label_table") else []):
        lines.append(
            f"label table {t['table']}{' (found in SRC)' if t.get('found_in_src') else ''}: "
            f"{t['records_matched']} records matched, {t['records_unmatched']} "
            f"records without a row; {t['table_rows_unmatched']} of {t['table_rows']} table rows matched "
            "nothing"
            + (f" (e.g. {', '.join(t['unmatched_examples'])})" if t["unmatched_examples"] else "")
            + (
                "; rows that name the lower-rate duplicates left out count among them"
                if s.get("duplicates") and t["table_rows_unmatched"]
                else ""
            )
        )
        if t["records_matched"] == 0:
            lines.append(
                f"WARNING: label table {t['table']} matched no record, so its labels and patient ids are "
                "not in the dataset; check its record column against the records' names or paths"
            )
        if t.get("table_rows_overridden"):
            lines.append(
                f"label table {t['table']}: rows not used because a more specific row names the same "
                f"record (path over name over id): {t['table_rows_overridden']} "
                f"(e.g. {', '.join(t['overridden_examples'])})"
            )
        if t.get("table_rows_matching_several_records"):
            lines.append(
                f"label table {t['table']}: table rows that label more than one record each: "
                f"{t['table_rows_matching_several_records']} (e.g. {', '.join(t['several_examples'])}); "
                "a path in the record column picks one"
            )
    lines.extend(format_tasks(s.get("tasks") or {}, per_task))
    for t in s.get("label_tables_not_used", []):
        lines.append(f"note: label table {t['table']} was not used ({t['why']})")
    if s["rows"] and s["patients"] == 0:
        lines.append(
            "note: no record has a patient id, so the evaluation counts every ECG as its own patient "
            "(a label table's patient_id column, or header comments, give them)"
        )
    return "\n".join(lines)


def format_tasks(t: dict, per_task: bool = True) -> list[str]:
    """The summary's lines on the tasks prepare derived: per task its known records and per-class positives
    (unless not per_task), then its notes."""
    lines = []
    for name, d in (t.get("tasks") or {}).items() if per_task else ():
        counts = ", ".join(f"{c} {n}" for c, n in d["positives"].items())
        lines.append(
            f"task {name}: {len(d['positives'])} classes, {d['known']} records known; positives: {counts}"
        )
    if t.get("dx_codes_below_min_count"):
        lines.append(
            f"task dx: {t['dx_codes_below_min_count']} of {t['dx_codes']} '#Dx' codes are in fewer "
            "records than --dx-min-count and have no column"
        )
    if t.get("superdiagnostic_from_labels"):
        lines.append(
            f"task ptbxl_superdiagnostic: {t['superdiagnostic_from_labels']} records from their "
            "header's '# Labels'"
            + (
                f"; {t['labels_disagreeing_with_scp_codes']} records whose '# Labels' disagree with "
                "their scp_codes (scp_codes used)"
                if t.get("labels_disagreeing_with_scp_codes")
                else ""
            )
        )
    if t.get("scp_codes_malformed"):
        lines.append(
            f"note: {t['scp_codes_malformed']} records have a malformed scp_codes; they are unknown in "
            "the PTB-XL tasks"
        )
    if t.get("note"):
        lines.append(f"note: {t['note']}")
    return lines
