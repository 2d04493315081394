"""Host gather throughput of the streamed input path: `input_pipeline.read_rows` with 1, 2, 4, .. reader threads.

Streaming feeds the step from the memory-mapped int16 dataset; at accelerator rates (100k ECG/s is 12 GB/s) the
host's gather can be the bottleneck. This measures how many ECG/s the gather alone delivers, from the page cache
(the file is read once before timing), for random batches of distinct rows.

    python bench/bench_read_rows.py                          # synthetic 4096-record dataset, batch 512 and 2048
    python bench/bench_read_rows.py --dataset prepared/ptbxl --batch 2048 --threads 1,2,4,8,16

Prints a table and appends one JSON line per measurement to --json (default $OUT/bench_read_rows.jsonl or
bench/results_read_rows.jsonl).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dataset", default=None, help="a prepared dataset (default: a synthetic one in --workdir)"
    )
    ap.add_argument("--records", type=int, default=4096, help="records of the synthetic dataset")
    ap.add_argument("--workdir", default=os.path.join("/tmp", "ecgcl_bench_data"))
    ap.add_argument("--batch", default="512,2048", help="rows per batch, comma-separated")
    ap.add_argument(
        "--threads", default=None, help="reader threads, comma-separated (default 1, 2, 4, .. CPUs)"
    )
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from bench_pretrain import machine_info, write_synthetic_dataset

    from ecgcl_jax import available_cpus
    from ecgcl_jax.data import open_dataset
    from ecgcl_jax.input_pipeline import read_rows

    ds = open_dataset(
        args.dataset
        or write_synthetic_dataset(
            os.path.join(args.workdir, f"synthetic_{args.records}"), args.records
        )
    )
    raw, n = ds.raw, len(ds)
    batches = [int(b) for b in args.batch.split(",")]
    cpus = available_cpus()
    threads = (
        [int(t) for t in args.threads.split(",")]
        if args.threads
        else sorted({1 << i for i in range(cpus.bit_length()) if 1 << i <= cpus} | {cpus})
    )
    if max(batches) > n:
        ap.error(f"--batch {max(batches)} exceeds the dataset's {n} records")
    out_dir = os.environ.get("OUT", "")
    json_path = args.json or (
        os.path.join(out_dir, "bench_read_rows.jsonl")
        if out_dir
        else os.path.join(HERE, "results_read_rows.jsonl")
    )
    for s in range(0, n, 1024):  # into the page cache
        np.asarray(raw[s : s + 1024]).sum()
    row_bytes = int(np.prod(raw.shape[1:])) * raw.dtype.itemsize
    info = machine_info()
    print(f"# {ds.path}: {n} records of {row_bytes / 1e3:.0f} kB | {info['cpu']} | {cpus} CPUs")
    print(f"{'batch':>6} {'threads':>7} {'ms/batch':>9} {'ECG/s':>9} {'GB/s':>6}  rounds (ECG/s)")
    rng = np.random.default_rng(0)
    with concurrent.futures.ThreadPoolExecutor(max(threads)) as ex:
        for b in batches:
            for t in threads:
                rates = []
                for _ in range(args.rounds):
                    t0, k = time.perf_counter(), 0
                    while time.perf_counter() - t0 < args.seconds:
                        read_rows(raw, rng.choice(n, b, replace=False), ex, t)
                        k += 1
                    rates.append(b * k / (time.perf_counter() - t0))
                med = statistics.median(rates)
                print(
                    f"{b:>6} {t:>7} {1e3 * b / med:>9.1f} {med:>9.0f} {med * row_bytes / 1e9:>6.2f}  "
                    + ", ".join(f"{r:.0f}" for r in rates)
                )
                with open(json_path, "a") as f:
                    f.write(
                        json.dumps(
                            dict(
                                info,
                                kind="read_rows",
                                dataset=ds.path,
                                records=n,
                                batch=b,
                                threads=t,
                                ecg_per_s_median=med,
                                ecg_per_s_rounds=rates,
                                gb_per_s=med * row_bytes / 1e9,
                                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            ),
                            default=str,
                        )
                        + "\n"
                    )
    print(f"# JSON lines appended to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
