"""Command line: `ecgcl-data prepare SRC [SRC ...] --out DIR [options]` and `ecgcl-data info DIR`
(`python -m ecgcl_jax.data ...` is the same command)."""

from __future__ import annotations

import argparse
import sys

from ecgcl_jax import cli
from ecgcl_jax.data.build import CHOICES, PrepareOptions
from ecgcl_jax.errors import UserError

D = PrepareOptions()  # the defaults live in one place


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
    q.add_argument(
        "--labels", metavar="TABLE.csv", help="label table: a 'record' column and label columns"
    )
    q.add_argument(
        "--label-column",
        metavar="NAME",
        help="column that becomes the binary label (default: the table's only label column; "
        "without a table 'label' where the sources give one, else 'normal')",
    )
    q.add_argument(
        "--no-auto-labels",
        action="store_true",
        help="do not attach a labels.csv / records.csv found at the top of a SRC folder",
    )
    q.add_argument(
        "--length",
        choices=CHOICES["length"],
        default=D.length,
        help="longer records: keep the first 10 s (crop) or cut consecutive 10 s windows",
    )
    q.add_argument(
        "--short",
        choices=CHOICES["short"],
        default=D.short,
        help="records shorter than 10 s: zero-pad (true length kept) or drop",
    )
    q.add_argument(
        "--min-seconds",
        type=float,
        default=D.min_seconds,
        help=f"drop records shorter than this (default {D.min_seconds:g})",
    )
    q.add_argument(
        "--missing-leads",
        choices=CHOICES["missing_leads"],
        default=D.missing_leads,
        help="a record lacking a standard lead: drop it, or zero-fill the lead",
    )
    q.add_argument(
        "--max-denominator",
        type=int,
        default=D.max_denominator,
        help=f"resampling ratio 500/fs approximated as up/down with down <= this "
        f"(default {D.max_denominator})",
    )
    q.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="keep PTB-XL 100 Hz NNNNN_lr records that have a 500 Hz NNNNN_hr twin",
    )
    q.add_argument(
        "--compress",
        action="store_true",
        help="store signals compressed (signals.npz, loaded whole) instead of memory-mapped",
    )
    q.add_argument(
        "--array-fs", type=float, default=D.array_fs, help=".npy/.npz/.parquet sampling rate (Hz)"
    )
    q.add_argument(
        "--array-units", default=D.array_units, help=".npy/.npz/.parquet unit (mV, uV, V)"
    )
    q.add_argument(
        "--array-leads", default=",".join(D.array_leads), help="lead order of .npy/.npz arrays"
    )
    q.add_argument(
        "--array-layout",
        choices=CHOICES["array_layout"],
        default=D.array_layout,
        help=".npy/.npz axis order: (N, length, leads) or (N, leads, length)",
    )
    q.add_argument("--parquet-lead-prefix", default=D.parquet_lead_prefix)
    q.add_argument("--parquet-patient-column", default=D.parquet_patient_column)
    q.add_argument("--parquet-label-column", default=D.parquet_label_column)
    q.add_argument(
        "--dx-min-count",
        type=int,
        default=D.dx_min_count,
        help=f"task dx: one column per '#Dx' code present in at least this many records "
        f"(default {D.dx_min_count})",
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

            opts = PrepareOptions(
                length=args.length,
                short=args.short,
                missing_leads=args.missing_leads,
                min_seconds=args.min_seconds,
                max_denominator=args.max_denominator,
                dedupe=not args.keep_duplicates,
                labels=args.labels,
                label_column=args.label_column,
                auto_labels=not args.no_auto_labels,
                compress=args.compress,
                array_fs=args.array_fs,
                array_units=args.array_units,
                array_leads=tuple(s.strip() for s in args.array_leads.split(",") if s.strip()),
                array_layout=args.array_layout,
                parquet_lead_prefix=args.parquet_lead_prefix,
                parquet_patient_column=args.parquet_patient_column,
                parquet_label_column=args.parquet_label_column,
                dx_min_count=args.dx_min_count,
            )
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
                print(format_summary(ds.manifest["summary"], ds.path))
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
