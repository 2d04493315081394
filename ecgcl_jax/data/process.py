"""From a source record to stored rows: lead order, resampling, length policy, int16 quantisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ecgcl_jax import LEADS, NUM_SAMPLES, SAMPLE_RATE
from ecgcl_jax.data.leads import lead_index, missing_leads
from ecgcl_jax.data.wfdb_io import RawSignal, SkipRecord

INT16_MAX = 32767


@dataclass(frozen=True)
class ProcessOptions:
    """Every option that changes the stored signals (all recorded in the manifest).

    length: 'crop' keeps the first 10 s; 'windows' cuts consecutive non-overlapping 10 s windows.
    short: 'pad' zero-pads records shorter than 10 s (true length kept as `valid_length`); 'drop' skips them.
    missing_leads: 'drop' skips a record lacking a standard lead; 'zero' fills missing leads with zeros.
    min_seconds: records shorter than this are skipped even with short='pad'.
    max_denominator: the rate ratio target/fs is approximated by a fraction up/down with down <= this.
    """

    length: str = "crop"
    short: str = "pad"
    missing_leads: str = "drop"
    min_seconds: float = 1.0
    max_denominator: int = 1000


def rate_ratio(fs: float, max_denominator: int = 1000) -> tuple[int, int]:
    """(up, down) with up/down ~= SAMPLE_RATE / fs, e.g. 257 Hz -> (500, 257), 1000 Hz -> (1, 2)."""
    r = (Fraction(SAMPLE_RATE) / Fraction(fs).limit_denominator(100000)).limit_denominator(
        max_denominator
    )
    return r.numerator, r.denominator


def resample(x: np.ndarray, fs: float, max_denominator: int = 1000) -> tuple[np.ndarray, str]:
    """x: (n, c) at fs -> (ceil(n * up / down), c) at 500 Hz with scipy's polyphase anti-aliasing filter."""
    up, down = rate_ratio(fs, max_denominator)
    if up == down:
        return x, "1/1"
    from scipy.signal import resample_poly

    # padtype='line': extend the signal linearly instead of with zeros, which avoids a step at the edges
    return resample_poly(x, up, down, axis=0, padtype="line"), f"{up}/{down}"


def quantise(x: np.ndarray, gains: list[float] | None) -> tuple[np.ndarray, float]:
    """x: (L, 12) float mV -> (int16 counts, scale mV/count) with x ~= counts * scale.

    When every lead has the same ADC gain g and the record fits, scale = 1/g, so an un-resampled record is stored
    exactly (its own ADC counts); otherwise scale = max|x| / 32767 (error <= scale / 2).
    """
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    scale = 0.0
    if gains:
        g = np.asarray(gains, np.float64)
        if np.all(g > 0) and np.allclose(g, g[0], rtol=1e-9) and amax * g[0] <= INT16_MAX:
            scale = 1.0 / g[0]
    if scale == 0.0:
        scale = amax / INT16_MAX if amax > 0 else 1e-3
    scale = float(np.float32(scale))
    q = np.clip(np.rint(x / scale), -INT16_MAX, INT16_MAX).astype(np.int16)
    return q, scale


def to_rows(
    sig: RawSignal, opts: ProcessOptions
) -> tuple[list[tuple[np.ndarray, float, dict]], dict]:
    """Standardise one source record.

    Returns (rows, info): rows = [(counts (5000, 12) int16, scale, {'window', 'valid_length'})], info = record-level
    fields (fs_original, n_samples_original, leads_original, missing_leads, resample). Raises SkipRecord.
    """
    x = sig.x
    if x.ndim != 2 or x.shape[0] == 0 or sig.n_samples == 0:
        raise SkipRecord("zero-length record")
    if len(sig.names) != x.shape[1]:
        raise SkipRecord(f"{x.shape[1]} signal columns but {len(sig.names)} lead names")
    mapping, unknown, dup, inverted = lead_index(sig.names)
    miss = missing_leads(mapping)
    if miss and (opts.missing_leads == "drop" or len(miss) == len(LEADS)):
        why = f"missing leads {','.join(miss)}"
        if unknown:
            why += f" (unknown lead names: {','.join(unknown[:12])})"
        raise SkipRecord(why)
    if not (math.isfinite(sig.fs) and sig.fs > 0):
        raise SkipRecord(f"invalid sampling rate {sig.fs}")
    cols = [mapping.get(l) for l in LEADS]
    used = x[:, [c for c in cols if c is not None]]
    if not np.all(np.isfinite(used)):
        bad = [
            LEADS[i]
            for i, c in enumerate(cols)
            if c is not None and not np.all(np.isfinite(x[:, c]))
        ]
        raise SkipRecord(f"NaN samples in leads {','.join(bad)}")
    std = np.zeros((x.shape[0], len(LEADS)), np.float64)
    for i, c in enumerate(cols):
        if c is not None:
            std[:, i] = -x[:, c] if LEADS[i] in inverted else x[:, c]
    gains = None
    if sig.gains is not None:
        gains = [sig.gains[c] for c in cols if c is not None]
    y, ratio = resample(std, sig.fs, opts.max_denominator)
    # length of the whole record at 500 Hz
    n_total = math.ceil(sig.n_samples * SAMPLE_RATE / sig.fs - 1e-9)
    n = min(y.shape[0], n_total)
    y = y[:n]
    if n < opts.min_seconds * SAMPLE_RATE:
        raise SkipRecord(f"too short ({n / SAMPLE_RATE:.2f} s < min {opts.min_seconds:g} s)")
    if n < NUM_SAMPLES and opts.short == "drop":
        raise SkipRecord(f"shorter than 10 s ({n / SAMPLE_RATE:.2f} s)")
    if n >= NUM_SAMPLES:
        n_win = n // NUM_SAMPLES if opts.length == "windows" else 1
        segs = [(w, y[w * NUM_SAMPLES : (w + 1) * NUM_SAMPLES], NUM_SAMPLES) for w in range(n_win)]
    else:
        pad = np.zeros((NUM_SAMPLES, len(LEADS)), np.float64)
        pad[:n] = y
        segs = [(0, pad, n)]
    rows = []
    for w, seg, valid in segs:
        q, scale = quantise(seg, gains)
        rows.append((q, scale, {"window": w, "valid_length": int(valid)}))
    info = {
        "fs_original": float(sig.fs),
        "n_samples_original": int(sig.n_samples),
        "n_leads_original": int(x.shape[1]),
        "leads_original": ",".join(map(str, sig.names)),
        "missing_leads": ",".join(miss),
        # a lead given twice (e.g. a rhythm strip): the first channel is used
        "repeated_leads": ",".join(dup),
        "resample": ratio,
        "reader": sig.reader,
    }
    return rows, info


def seconds_needed(opts: ProcessOptions) -> float | None:
    """How much of a source record must be read (None = all): 10 s plus a resampling-filter margin when cropping."""
    if opts.length == "windows":
        return None
    return NUM_SAMPLES / SAMPLE_RATE + 1.0
