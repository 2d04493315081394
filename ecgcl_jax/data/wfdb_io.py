"""WFDB (.hea + .dat) and PhysioNet/CinC (.hea + .mat) reading.

A fast path parses the header text and reads format-16 signal files with NumPy (most 12-lead
sets: PTB-XL, CinC 2020/21 `.mat`, LUDB, PTB, INCART, MIMIC-IV-ECG). Anything else (formats 212,
24, 32, 80, FLAC, multi-segment records, several samples per frame) goes through `wfdb.rdrecord`.
Both return physical units (mV) and raise `SkipRecord` with a one-line reason on bad input.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np


class SkipRecord(Exception):
    """A bad input: skipped, reported with this one-line reason."""


@dataclass
class RawSignal:
    """One source record. x: (n, channels) float64, mV (NaN where the source marks invalid samples)."""

    x: np.ndarray
    names: list[str]
    fs: float
    n_samples: int  # length of the whole source record (x may hold only its beginning)
    gains: list[float] | None = None  # ADC counts per mV of each channel where known
    comments: list[str] = field(default_factory=list)
    reader: str = "numpy"


# units -> factor to mV
_UNIT_FACTORS = {
    "mv": 1.0,
    "millivolt": 1.0,
    "millivolts": 1.0,
    "uv": 1e-3,
    "µv": 1e-3,
    "μv": 1e-3,
    "microvolt": 1e-3,
    "microvolts": 1e-3,
    "v": 1e3,
    "volt": 1e3,
    "volts": 1e3,
    "nv": 1e-6,
}


def unit_factor(unit: str | None) -> float:
    """mV per `unit`; an absent unit means mV (the WFDB default)."""
    u = (unit or "mV").strip().lower()
    if u in ("", "nu"):  # 'NU' is WFDB's "no unit given" placeholder
        return 1.0
    if u not in _UNIT_FACTORS:
        raise SkipRecord(f"unknown signal unit '{unit}'")
    return _UNIT_FACTORS[u]


@dataclass
class _SigSpec:
    file: str
    fmt: str
    spf: int
    skew: int
    offset: int
    gain: float
    baseline: int
    units: str
    name: str


@dataclass
class Header:
    name: str
    nseg: int | None
    nsig: int
    fs: float
    nsamp: int | None
    signals: list[_SigSpec]
    comments: list[str]


_FMT = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?$")
_GAIN = re.compile(r"^([-+]?[\d.]+(?:[eE][-+]?\d+)?)(?:\((-?\d+)\))?(?:/(.*))?$")


def parse_header(path: str) -> Header:
    """Parse a WFDB header file; raises SkipRecord on garbage."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as e:
        raise SkipRecord(f"cannot read header ({e.strerror})") from None
    if not raw.strip():
        raise SkipRecord("empty header")
    if b"\x00" in raw:
        raise SkipRecord("garbage header (binary content)")
    text = raw.decode("utf-8", errors="replace")
    comments: list[str] = []
    lines: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            comments.append(s.lstrip("# \t"))
            continue
        if "#" in s:  # trailing comment on a specification line
            s, c = s.split("#", 1)
            comments.append(c.strip())
            s = s.strip()
        lines.append(s)
    if not lines:
        raise SkipRecord("header has no record line")
    rec = lines[0].split()
    try:
        name, _, nseg_s = rec[0].partition("/")
        nseg = int(nseg_s) if nseg_s else None
        nsig = int(rec[1])
        fs = 250.0
        if len(rec) > 2:
            fs = float(rec[2].split("/")[0].split("(")[0])
        nsamp = int(rec[3]) if len(rec) > 3 else None
    except (ValueError, IndexError):
        raise SkipRecord(f"garbage header (record line '{lines[0][:60]}')") from None
    if nsig < 0 or fs <= 0 or not np.isfinite(fs):
        raise SkipRecord(f"garbage header (record line '{lines[0][:60]}')")
    if nseg is not None:
        return Header(name, nseg, nsig, fs, nsamp, [], comments)
    specs = lines[1 : 1 + nsig]
    if len(specs) < nsig:
        raise SkipRecord(f"header declares {nsig} signals but lists {len(specs)}")
    sigs = []
    for s in specs:
        t = s.split()
        m = _FMT.match(t[1]) if len(t) > 1 else None
        if m is None:
            raise SkipRecord(f"garbage header (signal line '{s[:60]}')")
        gain, baseline, units = 200.0, None, "mV"
        if len(t) > 2:
            g = _GAIN.match(t[2])
            if g is None:
                raise SkipRecord(f"garbage header (gain field '{t[2][:30]}')")
            gain = float(g.group(1)) or 200.0
            baseline = int(g.group(2)) if g.group(2) is not None else None
            units = g.group(3) or "mV"
        try:
            adczero = int(t[4]) if len(t) > 4 else 0
        except ValueError:
            raise SkipRecord(f"garbage header (signal line '{s[:60]}')") from None
        sigs.append(
            _SigSpec(
                file=t[0],
                fmt=m.group(1),
                spf=int(m.group(2) or 1),
                skew=int(m.group(3) or 0),
                offset=int(m.group(4) or 0),
                gain=gain,
                baseline=adczero if baseline is None else baseline,
                units=units,
                name=" ".join(t[8:]) if len(t) > 8 else "",
            )
        )
    return Header(name, None, nsig, fs, nsamp, sigs, comments)


def _fast_ok(h: Header) -> bool:
    return (
        h.nseg is None
        and h.nsig > 0
        and all(s.fmt == "16" and s.spf == 1 and s.skew == 0 and s.file != "~" for s in h.signals)
    )


def read_wfdb(hea_path: str, max_seconds: float | None = None) -> RawSignal:
    """Read a WFDB/CinC record given its header path. max_seconds: read at most this much of its beginning."""
    h = parse_header(hea_path)
    if h.nsig == 0:
        raise SkipRecord("header declares 0 signals")
    max_samples = None if max_seconds is None else int(np.ceil(max_seconds * h.fs))
    _check_sizes(hea_path, h)  # missing or short signal files, whichever reader follows
    if not _fast_ok(h):
        return _read_with_wfdb(hea_path, h, max_samples)
    folder = os.path.dirname(hea_path)
    groups: dict[str, list[int]] = {}
    for j, s in enumerate(h.signals):
        groups.setdefault(s.file, []).append(j)
    nsamp = h.nsamp
    digital = [None] * h.nsig
    for fname, chans in groups.items():
        path = os.path.join(folder, fname)
        k = len(chans)
        offset = h.signals[chans[0]].offset
        if any(h.signals[c].offset != offset for c in chans):
            return _read_with_wfdb(hea_path, h, max_samples)
        if nsamp is None or nsamp <= 0:  # length not in the header: what the file holds
            try:
                size = os.path.getsize(path)
            except OSError:
                raise SkipRecord(f"signal file {fname} missing") from None
            nsamp = (size - offset) // (2 * k) if size > offset else 0
        n_read = nsamp if max_samples is None else min(nsamp, max_samples)
        if fname.lower().endswith(".mat") and not _mat_v4_ok(path, offset, k, nsamp):
            d = _loadmat(path, k)[:n_read]
            for i, c in enumerate(chans):
                digital[c] = d[:, i]
            continue
        d = np.fromfile(path, dtype="<i2", count=n_read * k, offset=offset)
        if d.size != n_read * k:
            raise SkipRecord(f"truncated signal file {fname}")
        d = d.reshape(n_read, k)
        for i, c in enumerate(chans):
            digital[c] = d[:, i]
    if not nsamp:
        raise SkipRecord("zero-length record")
    n = digital[0].shape[0]
    x = np.empty((n, h.nsig), np.float64)
    for c, s in enumerate(h.signals):
        d = digital[c]
        x[:, c] = (d.astype(np.float64) - s.baseline) * (unit_factor(s.units) / s.gain)
        invalid = d == -32768  # WFDB's invalid-sample value for format 16
        if invalid.any():
            x[invalid, c] = np.nan
    gains = [s.gain / unit_factor(s.units) for s in h.signals]
    return RawSignal(x, [s.name for s in h.signals], h.fs, int(nsamp), gains, h.comments, "numpy")


def _mat_v4_ok(path: str, offset: int, nsig: int, nsamp: int) -> bool:
    """True if `path` starts with the MATLAB v4 int16 matrix header (nsig x nsamp, name 'val') the CinC sets use."""
    if offset != 24:
        return False
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        return False
    mopt, mrows, ncols, imagf, namlen = struct.unpack("<5i", head[:20])
    return mopt == 30 and mrows == nsig and ncols >= nsamp and imagf == 0 and namlen == 4


def _loadmat(path: str, nsig: int) -> np.ndarray:
    """(nsamp, nsig) int16-valued digital samples from a .mat file that is not plain MATLAB v4 int16."""
    from scipy.io import loadmat

    try:
        m = loadmat(path)
    except Exception as e:
        raise SkipRecord(f"unreadable .mat file ({type(e).__name__})") from None
    val = m.get("val")
    if val is None:
        arrs = [v for k, v in m.items() if not k.startswith("__") and getattr(v, "ndim", 0) == 2]
        val = arrs[0] if len(arrs) == 1 else None
    if val is None or val.ndim != 2 or nsig not in val.shape:
        raise SkipRecord(f"unreadable .mat file (no {nsig}-lead 'val' matrix)")
    val = val if val.shape[0] == nsig and val.shape[1] != nsig else val.T
    return np.asarray(val.T)


_BYTES_PER_SAMPLE = {
    "8": 1,
    "16": 2,
    "61": 2,
    "80": 1,
    "160": 2,
    "212": 1.5,
    "24": 3,
    "32": 4,
    "310": 4 / 3,
    "311": 4 / 3,
}


def _check_sizes(hea_path: str, h: Header) -> None:
    """SkipRecord for a missing or too short signal file of an uncompressed format (before wfdb reads it)."""
    if h.nseg is not None or not h.nsamp:
        return
    folder = os.path.dirname(hea_path)
    per_file: dict[str, list[_SigSpec]] = {}
    for sp in h.signals:
        per_file.setdefault(sp.file, []).append(sp)
    for fname, sigs in per_file.items():
        if fname == "~":
            continue
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise SkipRecord(f"signal file {fname} missing")
        if any(sp.fmt not in _BYTES_PER_SAMPLE for sp in sigs):
            continue
        need = sigs[0].offset + int(
            np.ceil(h.nsamp * sum(_BYTES_PER_SAMPLE[sp.fmt] * sp.spf for sp in sigs))
        )
        size = os.path.getsize(path)
        if size < need:
            raise SkipRecord(f"truncated signal file {fname} ({size} bytes, header needs {need})")


def _read_with_wfdb(hea_path: str, h: Header, max_samples: int | None) -> RawSignal:
    import wfdb

    rec_name = hea_path[:-4] if hea_path.lower().endswith(".hea") else hea_path
    try:
        total = int(h.nsamp or 0)  # from our own parse of the header: no second wfdb.rdheader
        sampto = None if (max_samples is None or not total) else min(total, max_samples)
        r = wfdb.rdrecord(rec_name, sampto=sampto, physical=True, smooth_frames=True)
    except FileNotFoundError as e:
        raise SkipRecord(
            f"signal file missing ({os.path.basename(str(e.filename or e))})"
        ) from None
    except Exception as e:  # wfdb raises many types on corrupt files
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SkipRecord(f"unreadable record ({type(e).__name__}: {msg})") from None
    x = r.p_signal
    if x is None:
        raise SkipRecord("record has no signal")
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise SkipRecord("zero-length record")
    units = r.units or ["mV"] * x.shape[1]
    fac = np.array([unit_factor(u) for u in units])
    x = x * fac
    gains = None
    if r.adc_gain is not None:
        gains = [float(g) / f if g else 200.0 / f for g, f in zip(r.adc_gain, fac)]
    return RawSignal(
        x,
        list(r.sig_name or []),
        float(r.fs),
        int(total or x.shape[0]),
        gains,
        list(r.comments or h.comments),
        "wfdb",
    )
