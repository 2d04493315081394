"""Embeddings of a prepared dataset by an exported encoder.

Command line (`commands.embed_main`):

    ecgcl-embed --encoder runs/pre/encoder --data DIR --out emb.npy [--views mean] [--batch-size 256]

writes `emb.npy` ((N, emb_dim) float32, one row per dataset row, in dataset order) and `emb.records.csv`
(row, record, patient_id, label). `--data ""` (the default) embeds the embedded PTB-XL sample.

From Python:

    from ecgcl_jax import data, embed
    enc = embed.load_encoder("runs/pre")              # the pretraining WORKDIR or WORKDIR/encoder
    ds = data.open_dataset("prepared/my_ecgs")
    z = embed.embed_dataset(enc, ds)                  # (N, emb_dim) float32
    # enc.model_config (the `model` config section), enc.variables ({'params', 'batch_stats'} of
    # models.build_encoder(enc.model_config)), enc.preprocessing (max_amp, mode, domain, ...),
    # enc.pretrain_patients (patient ids it was pretrained on: keep them out of any test set).
    z = embed.embed_arrays(enc, x, fs=250, leads=("I", "II", ..., "V6"))  # x: (N, L, 12) mV in memory

Inputs are prepared exactly as in pretraining: counts * scale (mV), divided by the encoder's `max_amp`, minus
each lead's mean; CLOCS encoders see their views (halves and/or single leads; |FFT| in the frequency
domain), and the V view embeddings are averaged (`views="mean"`), concatenated (`"concat"`, (N, V*E)) or kept
(`"none"`, (N, V, E)). The encoder runs in eval mode (running BatchNorm statistics, no dropout).
"""

from __future__ import annotations

import csv
import io
import os
import sys

import numpy as np

import ecgcl_jax
from ecgcl_jax import checkpoint
from ecgcl_jax.errors import UserError
from ecgcl_jax.fileio import atomic_write
from ecgcl_jax.views import CONTRAST_MODES, ViewSpec

VIEWS = ("mean", "concat", "none")


load_encoder = checkpoint.load_encoder  # WORKDIR/encoder or the WORKDIR itself


def check_compatible(encoder: checkpoint.ExportedEncoder, dataset, where: str = "--data") -> None:
    """Raises UserError unless the dataset's signals are in the format the encoder was trained on
    (sample rate, samples per ECG, lead order)."""
    prep = encoder.preprocessing
    fs = int(prep.get("sample_rate", ecgcl_jax.SAMPLE_RATE))
    n = int(prep.get("num_samples", ecgcl_jax.NUM_SAMPLES))
    leads = list(prep.get("leads", ecgcl_jax.LEADS))
    shape = tuple(dataset.raw.shape[1:])
    if shape != (n, len(leads)):
        raise UserError(
            f"{where}: ECGs are {shape[0]} samples x {shape[1]} leads; the encoder expects "
            f"{n} x {len(leads)}"
        )
    if fs != ecgcl_jax.SAMPLE_RATE or leads != list(ecgcl_jax.LEADS):
        raise UserError(
            f"{where}: the encoder was trained on {fs} Hz, leads {leads}; prepared datasets are "
            f"{ecgcl_jax.SAMPLE_RATE} Hz, leads {list(ecgcl_jax.LEADS)}"
        )
    meta = getattr(dataset, "meta", None)
    if meta is not None and "fs" in getattr(meta, "columns", ()):
        rates = sorted({float(v) for v in meta["fs"].dropna()})
        if rates and rates != [float(fs)]:
            raise UserError(
                f"{where}: dataset sample rate(s) {rates} Hz differ from the encoder's {fs} Hz"
            )
    if prep.get("mode") not in (None, *CONTRAST_MODES):
        raise UserError(
            f"encoder: unknown contrast mode {prep.get('mode')!r} in its preprocessing record"
        )
    if prep.get("domain", "time") not in ("time", "frequency"):
        raise UserError(
            f"encoder: unknown input domain {prep.get('domain')!r} in its preprocessing record"
        )


def embed_dataset(
    encoder: checkpoint.ExportedEncoder,
    dataset,
    rows=None,
    batch_size: int = 256,
    views: str = "mean",
) -> np.ndarray:
    """Embeddings of dataset `rows` (default: all) in that order: (n, E), (n, V*E) or (n, V, E) float32, with the
    encoder's own normaliser (max_amp fitted on its pretraining pool)."""
    from ecgcl_jax import finetune  # noqa: PLC0415 - keeps `--help` fast

    if views not in VIEWS:
        raise UserError(f"--views: {views!r} is not one of {', '.join(VIEWS)}")
    check_compatible(encoder, dataset)
    spec = ViewSpec.from_preprocessing(encoder.preprocessing)
    scale = float(encoder.preprocessing["max_amp"])
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise UserError("--data: no records to embed")
    e = finetune.embed_rows(
        encoder.model_config, spec, encoder.variables, dataset, rows, scale, batch_size
    )
    if views == "mean":
        return e.mean(axis=1)
    if views == "concat":
        return e.reshape(len(e), -1)
    return e


class _PreparedRows:
    """Prepared rows held in memory: the part of a Dataset that `finetune.embed_rows` reads."""

    def __init__(self, raw: np.ndarray, scales: np.ndarray):
        self.raw, self.scales, self.meta = raw, scales, None

    def __len__(self) -> int:
        return len(self.raw)


def prepare_arrays(
    x,
    fs: float,
    leads=ecgcl_jax.LEADS,
    units: str = "mV",
    options=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ECGs held in memory, prepared as `ecgcl_jax.data.prepare` prepares an array file (the same functions:
    lead order, resampling to 500 Hz, length policy, int16 quantisation).

    x: (N, L, C) signals in `units` (mV, uV, V) at `fs` Hz, channels named by `leads` (any order; C names).
    options: an `ecgcl_jax.data.PrepareOptions` (length, short, missing_leads, min_seconds, max_denominator;
    default: prepare's defaults). Returns (raw (M, 5000, 12) int16 counts, scales (M,) float32 mV per count,
    source (M,) int64: the row of x each prepared row comes from); M = N unless options.length='windows'.
    A record that prepare would skip raises UserError naming its row.
    """
    from ecgcl_jax.data import PrepareOptions  # noqa: PLC0415 - pandas only when used
    from ecgcl_jax.data.leads import normalise_lead  # noqa: PLC0415
    from ecgcl_jax.data.process import to_rows  # noqa: PLC0415
    from ecgcl_jax.data.wfdb_io import RawSignal, SkipRecord, unit_factor  # noqa: PLC0415

    opts = options if options is not None else PrepareOptions()
    opts.validate()
    leads = [str(l) for l in leads]
    bad = [l for l in leads if normalise_lead(l) is None]
    if bad:
        raise UserError(f"leads: unknown lead names {', '.join(bad)}")
    if np.ndim(x) != 3 or np.shape(x)[2] != len(leads):
        raise UserError(
            f"x: shape {np.shape(x)}; expected (N, length, {len(leads)}) for leads {','.join(leads)}"
        )
    if not (fs > 0):
        raise UserError(f"fs: must be > 0 (got {fs})")
    factor = unit_factor(units)
    raw, scales, source = [], [], []
    for i in range(np.shape(x)[0]):
        sig = np.asarray(x[i], np.float64) * factor
        try:
            rows, _ = to_rows(RawSignal(sig, leads, float(fs), sig.shape[0]), opts.process())
        except SkipRecord as e:
            raise UserError(f"x[{i}]: {e}") from None
        for counts, scale, _ in rows:
            raw.append(counts)
            scales.append(scale)
            source.append(i)
    if not raw:
        raise UserError("x: no records to embed")
    return np.stack(raw), np.asarray(scales, np.float32), np.asarray(source, np.int64)


def embed_arrays(
    encoder: checkpoint.ExportedEncoder,
    x,
    fs: float,
    leads=ecgcl_jax.LEADS,
    units: str = "mV",
    options=None,
    views: str = "mean",
    batch_size: int = 256,
) -> np.ndarray:
    """Embeddings of ECGs held in memory, equal to preparing them (`prepare_arrays`, the same preprocessing
    as `ecgcl_jax.data.prepare`) and embedding the prepared rows (`embed_dataset`, the encoder's own
    normalisation): (M, E), (M, V*E) or (M, V, E) float32, one row per record (M = N) unless
    options.length='windows' (then use `prepare_arrays`'s source index to map rows to records).

    x: (N, L, C) in `units` at `fs` Hz, channels named by `leads` in any order, e.g.
    `embed_arrays(enc, x, fs=250, leads=("I", "II", "V1", ...))`.
    """
    raw, scales, _ = prepare_arrays(x, fs, leads, units, options)
    return embed_dataset(encoder, _PreparedRows(raw, scales), batch_size=batch_size, views=views)


def write_embeddings(out: str, z: np.ndarray, ds) -> tuple[str, str]:
    """Writes `z` (one row per row of `ds`) to `out` (.npy added when missing) and its side table
    `<out>.records.csv` (row, record, patient_id, label), each atomically; returns both paths."""
    out = out if out.endswith(".npy") else out + ".npy"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    npy = io.BytesIO()
    np.save(npy, z)
    atomic_write(out, npy.getvalue())
    side = out[:-4] + ".records.csv"
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["row", "record", "patient_id", "label"])
    for i in range(len(ds)):
        y = float(ds.labels[i])
        w.writerow([i, ds.records[i], ds.patient_ids[i], "" if y != y else int(y)])
    atomic_write(side, buf.getvalue().encode())
    return out, side


if __name__ == "__main__":  # `python -m ecgcl_jax.embed` is the embedding command
    from ecgcl_jax import commands

    sys.exit(commands.embed_main(prog="python -m ecgcl_jax.embed"))
