"""Benchmark `prepare` against a plain single-process `wfdb.rdsamp` loop on synthetic WFDB records.

    python bench/bench_prepare.py                      # 2000 records (10 s, 500 Hz, 12 leads, format 16)
    python bench/bench_prepare.py --records 21799      # PTB-XL size

Records are written with wfdb's own writer (`wfdb.wrsamp`): `--distinct` different ones, then copied under new
names (a header rewrite + a copy of the signal file) up to `--records`, which keeps generation fast. Both timed
runs read the same files from the page cache. Prints records/s of both and appends a JSON line to
bench/results_prepare.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from ecgcl_jax import LEADS  # noqa: E402


def generate(folder: str, n: int, distinct: int, fs: int, seconds: float) -> list[str]:
    """Write n records `folder/NNNNN/rNNNNNN.{hea,dat}` (1000 per subfolder, like PTB-XL); returns record paths."""
    import wfdb

    rng = np.random.default_rng(0)
    L = int(fs * seconds)
    t = np.arange(L) / fs
    paths = []
    for i in range(n):
        sub = os.path.join(folder, f"{i // 1000:05d}")
        os.makedirs(sub, exist_ok=True)
        name = f"r{i:06d}"
        if i < distinct:
            x = sum(
                rng.uniform(0.1, 0.5, 12)
                * np.sin(2 * np.pi * rng.uniform(0.5, 15) * t[:, None] + rng.uniform(0, 6, 12))
                for _ in range(4)
            )
            x += 0.02 * rng.standard_normal((L, 12))
            wfdb.wrsamp(
                name,
                fs=fs,
                units=["mV"] * 12,
                sig_name=list(LEADS),
                p_signal=x,
                fmt=["16"] * 12,
                adc_gain=[1000.0] * 12,
                baseline=[0] * 12,
                comments=[f"patient_id: {i}"],
                write_dir=sub,
            )
        else:
            j = i % distinct
            src_dir, src = os.path.join(folder, f"{j // 1000:05d}"), f"r{j:06d}"
            with open(os.path.join(src_dir, src + ".hea")) as f:
                hea = f.read().replace(src, name)
            with open(os.path.join(sub, name + ".hea"), "w") as f:
                f.write(hea)
            shutil.copyfile(os.path.join(src_dir, src + ".dat"), os.path.join(sub, name + ".dat"))
        paths.append(os.path.join(sub, name))
    return paths


def plain_loop(paths: list[str]) -> float:
    """Seconds for `wfdb.rdsamp` over every record, one process."""
    import wfdb

    t0 = time.perf_counter()
    for p in paths:
        wfdb.rdsamp(p)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument(
        "--distinct",
        type=int,
        default=200,
        help="records written by wfdb.wrsamp; the rest are copies",
    )
    ap.add_argument("--workers", type=int, default=0, help="prepare processes (default: all cores)")
    ap.add_argument(
        "--loop-records",
        type=int,
        default=0,
        help="time the rdsamp loop on this many only (0: all)",
    )
    ap.add_argument(
        "--dir", default="", help="work folder (default: a temporary one, removed afterwards)"
    )
    ap.add_argument("--json", default=os.path.join(HERE, "results_prepare.jsonl"))
    args = ap.parse_args()

    from ecgcl_jax.data import PrepareOptions, open_dataset, prepare

    work = args.dir or tempfile.mkdtemp(prefix="bench_prepare_")
    src, out = os.path.join(work, "src"), os.path.join(work, "out")
    try:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        paths = generate(src, args.records, min(args.distinct, args.records), 500, 10.0)
        gen_s = time.perf_counter() - t0
        print(f"generated {len(paths)} records in {gen_s:.1f} s", flush=True)
        loop_paths = paths[: args.loop_records] if args.loop_records else paths
        loop_s = plain_loop(loop_paths)
        loop_rate = len(loop_paths) / loop_s
        print(
            f"plain wfdb.rdsamp loop (1 process): {len(loop_paths)} records in {loop_s:.1f} s = "
            f"{loop_rate:.0f} records/s ({1e3 * loop_s / len(loop_paths):.2f} ms/record)",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        prepare([src], out, PrepareOptions(), workers=args.workers or None)
        prep_s = time.perf_counter() - t0
        n = len(open_dataset(out))
        assert n == args.records, (n, args.records)
        prep_rate = args.records / prep_s
        workers = args.workers or len(os.sched_getaffinity(0))
        print(
            f"prepare ({workers} processes): {args.records} records in {prep_s:.1f} s = {prep_rate:.0f} records/s "
            f"({prep_rate / loop_rate:.1f}x the plain loop); PTB-XL-size (21,799) estimate "
            f"{21799 / prep_rate:.0f} s",
            flush=True,
        )
        import scipy
        import wfdb

        # bench/ is the script's folder; imported late: it imports jax
        from bench_pretrain import (
            cpu_name,
        )

        import ecgcl_jax

        cpu = cpu_name()
        rec = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "records": args.records,
            "distinct": args.distinct,
            "workers": workers,
            "cores": os.cpu_count(),
            "cpu": cpu,
            "prepare_s": round(prep_s, 3),
            "prepare_records_per_s": round(prep_rate, 1),
            "loop_records": len(loop_paths),
            "loop_s": round(loop_s, 3),
            "loop_records_per_s": round(loop_rate, 1),
            "speedup": round(prep_rate / loop_rate, 2),
            "generate_s": round(gen_s, 1),
            "loadavg_1min_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
            "versions": {
                "ecgcl_jax": ecgcl_jax.__version__,
                "wfdb": wfdb.__version__,
                "numpy": np.__version__,
                "scipy": scipy.__version__,
                "python": platform.python_version(),
            },
        }
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"appended to {args.json}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
