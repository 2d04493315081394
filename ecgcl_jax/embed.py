"""Embeddings of a prepared dataset by an exported encoder.

Command line:

    python -m ecgcl_jax.embed --encoder runs/pre/encoder --data DIR --out emb.npy [--views mean] [--batch-size 256]

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

Inputs are prepared exactly as in pretraining: counts * scale (mV), divided by the encoder's `max_amp`, minus
each lead's mean; CLOCS encoders see their views (halves and/or single leads; |FFT| in the frequency
domain), and the V view embeddings are averaged (`views="mean"`), concatenated (`"concat"`, (N, V*E)) or kept
(`"none"`, (N, V, E)). The encoder runs in eval mode (running BatchNorm statistics, no dropout).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

import ecgcl_jax
from ecgcl_jax import checkpoint, cli
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ecgcl_jax.embed", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--encoder", required=True, help="exported encoder: pretraining WORKDIR or WORKDIR/encoder"
    )
    p.add_argument(
        "--data", default="", help='prepared dataset folder ("" = the embedded PTB-XL sample)'
    )
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument(
        "--views", default="mean", choices=VIEWS, help="CLOCS view embeddings: mean | concat | none"
    )
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    try:
        from ecgcl_jax import data  # noqa: PLC0415

        enc = load_encoder(args.encoder)
        ds = data.open_dataset(args.data)
        if args.batch_size < 1:
            raise UserError(f"--batch-size: must be positive (got {args.batch_size})")
        z = embed_dataset(enc, ds, batch_size=args.batch_size, views=args.views)
        out = args.out if args.out.endswith(".npy") else args.out + ".npy"
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
    except (UserError, OSError) as e:
        return cli.fail("python -m ecgcl_jax.embed", e)
    print(f"wrote {out} {tuple(z.shape)} float32 and {side}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
