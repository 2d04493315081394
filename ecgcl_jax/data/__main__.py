"""Command line: `ecgcl-data prepare SRC [SRC ...] --out DIR [options]` and `ecgcl-data info DIR`
(`python -m ecgcl_jax.data ...` is the same command)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ecgcl_jax import cli
from ecgcl_jax.data.build import CHOICES, PrepareOptions
from ecgcl_jax.errors import UserError

D = PrepareOptions()  # the defaults live in one place


def _option(q: argparse.ArgumentParser, field: str, help: str | None = None, **kw) -> None:
    """--FIELD (underscores as dashes) for a field of PrepareOptions: its default there (unless given)
    and, for a string option, its allowed values (CHOICES); `main` hands the value back to the field."""
    kw.setdefault("default", getattr(D, field))
    if field in CHOICES:
        kw["choices"] = CHOICES[field]
    q.add_argument("--" + field.replace("_", "-"), help=help, **kw)


def build_parser(prog: str = "python -m ecgcl_jax.data") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser(
        "prepare",
        help="read ECG files into a prepared dataset folder",
        description="Walk each SRC (file or folder, recursively) and write a prepared dataset "
        "(10 s at 500 Hz, 12 standard leads, mV) to --out.",
    )
    q.add_argument("sources", nargs="+", metavar="SRC")
    q.add_argument("--out", required=True, metavar="DIR")
    _option(q, "labels", "label table: a 'record' column and label columns", metavar="TABLE.csv")
    _option(
        q,
        "label_column",
        "column that becomes the binary label (default: the table's only label column; "
        "without a table 'label' where the sources give one, else 'normal')",
        metavar="NAME",
    )
    q.add_argument(
        "--no-auto-labels",
        action="store_true",
        help="do not attach a labels.csv / records.csv found at the top of a SRC folder",
    )
    _option(
        q, "length", "longer records: keep the first 10 s (crop) or cut consecutive 10 s windows"
    )
    _option(q, "short", "records shorter than 10 s: zero-pad (true length kept) or drop")
    _option(
        q,
        "min_seconds",
        f"drop records shorter than this (default {D.min_seconds:g})",
        type=float,
    )
    _option(q, "missing_leads", "a record lacking a standard lead: drop it, or zero-fill the lead")
    _option(
        q,
        "max_denominator",
        f"resampling ratio 500/fs approximated as up/down with down <= this "
        f"(default {D.max_denominator})",
        type=int,
    )
    q.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="keep PTB-XL 100 Hz NNNNN_lr records that have a 500 Hz NNNNN_hr twin",
    )
    _option(
        q,
        "compress",
        "store signals compressed (signals.npz, loaded whole) instead of memory-mapped",
        action="store_true",
    )
    _option(q, "array_fs", ".npy/.npz/.parquet sampling rate (Hz)", type=float)
    _option(q, "array_units", ".npy/.npz/.parquet unit (mV, uV, V)")
    _option(q, "array_leads", "lead order of .npy/.npz arrays", default=",".join(D.array_leads))
    _option(q, "array_layout", ".npy/.npz axis order: (N, length, leads) or (N, leads, length)")
    _option(q, "parquet_lead_prefix")
    _option(q, "parquet_patient_column")
    _option(q, "parquet_label_column")
    _option(
        q,
        "dx_min_count",
        f"task dx: one column per '#Dx' code present in at least this many records "
        f"(default {D.dx_min_count})",
        type=int,
    )
    q.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    q.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
    i = sub.add_parser("info", help="print a prepared dataset's summary")
    i.add_argument("path", nargs="?", default="", help="dataset folder (default: the embedded set)")
    return p


def main(argv=None, prog: str = "python -m ecgcl_jax.data") -> int:
    """The command (also installed as `ecgcl-data`); returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.cmd == "prepare":
            from ecgcl_jax.data.build import prepare

            # every option named after its field, then those whose flag says the opposite or
            # is parsed here
            values = {
                f.name: getattr(args, f.name)
                for f in dataclasses.fields(PrepareOptions)
                if hasattr(args, f.name)
            }
            values.update(
                dedupe=not args.keep_duplicates,
                auto_labels=not args.no_auto_labels,
                array_leads=tuple(s.strip() for s in args.array_leads.split(",") if s.strip()),
            )
            opts = PrepareOptions(**values)
            prepare(args.sources, args.out, opts, workers=args.workers or None, force=args.force)
        else:
            from ecgcl_jax.data.build import format_summary
            from ecgcl_jax.data.dataset import open_dataset
            from ecgcl_jax.data.tasks import format_dataset_tasks

            ds = open_dataset(args.path)
            print(repr(ds))
            for line in format_dataset_tasks(ds):
                print(line)
            if "summary" in ds.manifest:
                print("its prepare run's summary, as recorded then:")
                print(format_summary(ds.manifest["summary"], ds.path, per_task=False))
    except (UserError, OSError) as e:  # OSError: e.g. DIR not writable, disk full
        return cli.fail(f"{prog} {args.cmd}", e)
    except KeyboardInterrupt:
        print(
            "\ninterrupted; run the same command again to continue where it stopped",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
