"""Generators of small WFDB test records (written with wfdb's own writer) and corrupt copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import wfdb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STD_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
UPPER_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def ecg_like(n: int, n_leads: int, fs: float, seed: int) -> np.ndarray:
    """(n, n_leads) float64 mV: a few sinusoids below 15 Hz plus small noise, within about +-2 mV."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    x = np.zeros((n, n_leads))
    for _ in range(4):
        f = rng.uniform(0.5, 15.0)
        x += rng.uniform(0.1, 0.5, n_leads) * np.sin(
            2 * np.pi * f * t[:, None] + rng.uniform(0, 6, n_leads)
        )
    return x + 0.01 * rng.standard_normal((n, n_leads))


def write_record(
    folder: str,
    name: str,
    fs: float = 500,
    seconds: float = 10.0,
    leads=STD_LEADS,
    comments=(),
    seed: int = 0,
    fmt: str = "16",
    signal=None,
) -> str:
    """Write `folder/name.hea` + `.dat` with wfdb.wrsamp; returns the header path."""

    os.makedirs(folder, exist_ok=True)
    n = int(round(seconds * fs))
    x = ecg_like(n, len(leads), fs, seed) if signal is None else signal
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * len(leads),
        sig_name=list(leads),
        p_signal=x,
        fmt=[fmt] * len(leads),
        comments=list(comments),
        write_dir=folder,
    )
    return os.path.join(folder, name + ".hea")


def read_reference(hea: str) -> tuple[np.ndarray, list[str], float]:
    """wfdb's own reading: (p_signal (n, c) mV, lead names, fs)."""

    r = wfdb.rdrecord(hea[:-4])
    return r.p_signal, list(r.sig_name), float(r.fs)


def copy_record(src_hea: str, folder: str) -> str:
    """Copy a header and the signal files it names into folder; returns the new header path."""

    os.makedirs(folder, exist_ok=True)
    d = os.path.dirname(src_hea)
    files = {os.path.basename(src_hea)}
    with open(src_hea) as f:
        lines = [l for l in f.read().splitlines() if l.strip() and not l.startswith("#")]
    for l in lines[1:]:
        files.add(l.split()[0])
    for fn in files:
        shutil.copy(os.path.join(d, fn), os.path.join(folder, fn))
    return os.path.join(folder, os.path.basename(src_hea))


def prepare_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m ecgcl_jax.data prepare ARGS` in a subprocess with the repository on PYTHONPATH; its exit code
    and text output."""
    return subprocess.run(
        [sys.executable, "-m", "ecgcl_jax.data", "prepare", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=timeout,
    )
