"""Pretraining-step throughput (ECG/s) of ecgcl-jax beside the expert-PyTorch reference, same work, same machine.

What is timed: the project's real step (`pretrain.make_pretrain_step` on `pretrain.init_state`, jitted with the state
donated and the batch sharded over a 1-D data mesh, exactly as `pretrain.run` does): int16 batch x scale ->
normalise -> two augmented views -> two encoder forwards -> NT-Xent -> backward -> L2 + Adam. Batches come from
`input_pipeline.BatchSource` reading a prepared dataset on disk (a synthetic one is written in the on-disk format
unless --dataset is given):
  resident  the whole int16 dataset lives on the device; each step gathers its rows by index (data.resident=yes);
  streamed  a host thread gathers the rows from the memory-mapped file and prefetches device batches (data.resident=no).
ECG/s = the median over >= 3 timed windows (block_until_ready at each window's end) after compilation and warm-up.
Also reported: compile seconds (lower + compile), XLA's static peak memory of the step program and, where the backend
reports it, the device's peak bytes in use (cumulative over this process).

In the same invocation, `torch_reference.py` (../shared/bench; the expert-PyTorch step, see its README) runs the same
work (encoder, augmentation pair, precision, batch) on the same machine. Project and torch alternate, A B A B, for
--rounds rounds; the table gives the median over rounds of each and the median of the per-round ratios project/torch.
Absolute numbers on shared machines are noisy; the ratios of one run are what count.

    python bench/bench_pretrain.py                                    # CPU defaults: cnn, batch 16,64, gauss pair
    python bench/bench_pretrain.py --pair time_warp:4,0.2+dropout:0.1 --torch-args="--layout nhwc"
    python bench/bench_pretrain.py --batch 128,512,2048 --precision bfloat16,float32 --data resident,streamed
    python bench/bench_pretrain.py --scaling --batch 64 --no-torch    # 1..N devices (weak scaling)

bench/run_cpu.sh and bench/run_gpu.sh run the recorded suites (bench/README.md). JSON lines are appended to --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import benchutil  # noqa: E402 - bench/, beside this script
import jax  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_PAIR = "gaussian_noise:0.05+gaussian_noise:0.25"  # torch_reference.py's default pair
TORCH_ENCODERS = ("cnn", "cnn_lstm")  # the encoders torch_reference.py implements
# what a measured case is keyed by (results' keys, in this order) and recorded under
CASE_FIELDS = ("encoder", "aug_pair", "precision", "data", "batch")
TORCH_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
TORCH_REF_CANDIDATES = (
    os.path.join(REPO, "..", "shared", "bench", "torch_reference.py"),
    os.path.join(REPO, ".bench_shared", "torch_reference.py"),
    os.path.join(HERE, "torch_reference.py"),
)


# ---------------------------------------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_info() -> dict:
    import flax
    import jaxlib
    import optax

    devs = jax.devices()
    from ecgcl_jax import available_cpus

    ncpu = available_cpus()
    info = {
        "backend": jax.default_backend(),
        "device_kind": devs[0].device_kind,
        "num_devices": len(devs),
        "cpu": f"{cpu_name()} ({ncpu} CPUs)",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    # a copy of the tree without .git (a device machine): say it from outside
    if not info.get("git_commit"):
        info["git_commit"] = os.environ.get("ECGCL_GIT_COMMIT", "")
    return info


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- dataset
def write_synthetic_dataset(folder: str, n: int, seed: int = 0) -> str:
    """A prepared dataset in the on-disk format of `python -m ecgcl_jax.data prepare` (see ecgcl_jax/data/dataset.py):
    n records of (5000, 12) int16 counts (random-normal signal, about 1 mV rms at 0.001 mV per count)."""
    import ecgcl_jax
    from ecgcl_jax.data.dataset import FORMAT, FORMAT_VERSION

    man_path = os.path.join(folder, "manifest.json")
    if os.path.exists(man_path):
        with open(man_path) as f:
            man = json.load(f)
        if man.get("summary", {}).get("rows") == n and man.get("synthetic_seed") == seed:
            return folder  # already written by an earlier invocation
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    sig = np.lib.format.open_memmap(
        os.path.join(folder, "signals.npy"),
        mode="w+",
        dtype=np.int16,
        shape=(n, ecgcl_jax.NUM_SAMPLES, len(ecgcl_jax.LEADS)),
    )
    for s in range(0, n, 256):
        e = min(n, s + 256)
        sig[s:e] = np.clip(rng.normal(0.0, 1000.0, sig[s:e].shape), -32767, 32767).astype(np.int16)
    sig.flush()
    del sig
    np.save(os.path.join(folder, "scales.npy"), np.full(n, 1e-3, np.float32))
    with open(os.path.join(folder, "meta.csv"), "w") as f:
        f.write("record,name,patient_id,label\n")
        for i in range(n):
            f.write(f"synthetic/r{i:06d},r{i:06d},p{i:06d},{i % 2}\n")
    with open(man_path, "w") as f:
        json.dump(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "status": "complete",
                "options": {},
                "summary": {"rows": n},
                "synthetic_seed": seed,
                "note": "written by bench/bench_pretrain.py",
            },
            f,
        )
    return folder


# ---------------------------------------------------------------------------------------------- project side
def compiler_options(args) -> dict:
    """XLA options of the step's jit: 'auto' = models.xla_compiler_options() (on CPU: keep optimization barriers
    through fusion), 'none' = XLA's defaults, or KEY=VALUE[;KEY=VALUE]."""
    from ecgcl_jax import models

    if args.compiler_options == "auto":
        return dict(models.xla_compiler_options())
    if args.compiler_options == "none":
        return {}
    return dict(kv.split("=", 1) for kv in args.compiler_options.split(";") if kv)


class ProjectCase:
    """One compiled configuration of the project's step, kept across rounds (compiled once)."""

    def __init__(self, args, dataset, encoder, pair, precision, batch, data, mesh):
        from configs import base
        from ecgcl_jax import input_pipeline, models, optim, parallel, pretrain

        self.encoder, self.pair, self.precision, self.batch, self.data = (
            encoder,
            pair,
            precision,
            batch,
            data,
        )
        self.num_devices = mesh.size
        c = base.get_config()
        c.model.encoder = encoder
        c.augment.view1, c.augment.view2 = pair.split("+")
        c.dtype = precision
        c.batch_size = batch
        c.data.path = dataset.path
        c.data.resident = "yes" if data == "resident" else "no"
        pretrain.validate_config(c, mesh.size)
        pool = np.arange(len(dataset))
        max_amp = input_pipeline.fit_max_amp(dataset, pool[:256])
        model = models.build_encoder(c.model, dtype=pretrain.DTYPES[precision])
        tx = optim.make_optimizer(optim.recipe(c.optim, int(c.num_steps)))
        repl = parallel.replicated(mesh)
        init_key, step_key = jax.random.split(jax.random.PRNGKey(c.seed))
        self.state = jax.jit(lambda k: pretrain.init_state(c, model, tx, k), out_shardings=repl)(
            init_key
        )
        self.key = jax.device_put(step_key, repl)
        order = input_pipeline.BatchOrder(len(pool), batch, c.seed)
        self.source = input_pipeline.BatchSource(
            dataset,
            pool,
            order,
            mesh,
            data == "resident",
            c.data.prefetch,
            input_pipeline.reader_threads(c.data.reader_threads),
        )
        # as pretrain.run feeds it
        max_amp = parallel.replicate_from_host(mesh, np.asarray(max_amp, np.float32))
        self._it = pretrain.Feed(self.source, max_amp).batches(0, 1 << 40)
        self.conv = models.conv_formulation()
        self.compiler_options = compiler_options(args)
        step = jax.jit(
            pretrain.make_pretrain_step(c, model, tx),
            donate_argnums=(0,),
            out_shardings=(repl, repl),
            compiler_options=self.compiler_options or None,
        )
        t0 = time.perf_counter()
        compiled = step.lower(self.state, self._next(), self.key).compile()
        self.compile_s = time.perf_counter() - t0
        self.step = compiled
        mem = compiled.memory_analysis()
        self.memory = {}
        if mem is not None:
            self.memory = {
                k: getattr(mem, k)
                for k in (
                    "argument_size_in_bytes",
                    "output_size_in_bytes",
                    "alias_size_in_bytes",
                    "temp_size_in_bytes",
                    "peak_memory_in_bytes",
                )
                if hasattr(mem, k)
            }
        # XLA:CPU's peak_memory_in_bytes counts the arguments only: take arguments + outputs - aliased + temporaries
        # as well, whichever is larger
        live = sum(
            self.memory.get(k, 0)
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
        ) - self.memory.get("alias_size_in_bytes", 0)
        self.static_peak = max(live, self.memory.get("peak_memory_in_bytes", 0)) or None
        self.first_step_s = None
        self.rounds_done = 0

    def _next(self):
        return next(self._it)[1]

    def _run(self, n: int):
        m = None
        for _ in range(n):
            self.state, m = self.step(self.state, self._next(), self.key)
        jax.block_until_ready(m["loss"])
        return m

    def measure(self, seconds: float, windows: int, warmup: int) -> dict:
        if self.first_step_s is None:
            t0 = time.perf_counter()
            self._run(1)
            self.first_step_s = time.perf_counter() - t0
        self._run(max(1, warmup if self.rounds_done == 0 else 1))
        t0 = time.perf_counter()
        self._run(1)
        est = max(time.perf_counter() - t0, 1e-6)
        windows = max(3, windows)
        n = max(1, round(seconds / windows / est))
        rates = []
        for _ in range(windows):
            t0 = time.perf_counter()
            m = self._run(n)
            rates.append(self.batch * n / (time.perf_counter() - t0))
        self.rounds_done += 1
        loss = float(jax.device_get(m["loss"]))
        med = statistics.median(rates)
        rec = dict(
            ecg_per_s_median=med,
            ecg_per_s_min=min(rates),
            ecg_per_s_max=max(rates),
            step_ms=1e3 * self.batch / med,
            steps_per_window=n,
            windows=windows,
            compile_s=round(self.compile_s, 2),
            first_step_s=round(self.first_step_s, 3),
            final_loss=loss,
            loss_finite=math.isfinite(loss),
            static_peak_bytes=self.static_peak,
            xla_memory=self.memory,
            steps_done=int(jax.device_get(self.state.step)),
        )
        stats = jax.local_devices()[0].memory_stats()
        if stats:
            rec["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
            rec["device_bytes_limit"] = stats.get("bytes_limit")
        return rec

    def close(self):
        self._it.close()  # BatchSource.iterate's finally stops and joins its prefetch thread


# ---------------------------------------------------------------------------------------------- torch side
# the augmentations torch_reference.py implements (single ops, no pipelines): pairs with others run without torch
TORCH_AUGS = ("none", "gaussian_noise", "dropout", "zero_mask", "permute", "time_warp")


def torch_has_pair(pair: str) -> bool:
    """Whether torch_reference.py can run both views of AUG1+AUG2 (one of TORCH_AUGS each, no '|' or '@')."""
    return all(
        "|" not in v and "@" not in v and v.partition(":")[0].strip() in TORCH_AUGS
        for v in pair.split("+")
    )


def run_torch(args, encoder, pair, precision, batches, log) -> dict[int, dict]:
    """One torch_reference.py invocation for all batches; returns {batch: its JSON record}."""
    a1, a2 = pair.split("+")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.jsonl")
        cmd = [
            args.torch_python,
            args.torch_ref,
            "--device",
            args.torch_device,
            "--encoder",
            encoder,
            "--batch",
            ",".join(map(str, batches)),
            "--aug1",
            a1,
            "--aug2",
            a2,
            "--precision",
            TORCH_PRECISION[precision],
            "--seconds",
            str(args.seconds),
            "--windows",
            str(args.windows),
            "--warmup",
            str(args.warmup),
            "--json",
            out,
        ] + shlex.split(args.torch_args)
        log(f"$ {shlex.join(cmd)}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torch_timeout)
            log(proc.stdout.rstrip())
            if proc.returncode:
                log(proc.stderr[-3000:])
        except subprocess.TimeoutExpired:
            log(f"torch_reference.py timed out after {args.torch_timeout} s")
        recs = {}
        if os.path.exists(out):
            with open(out) as f:
                for line in f:
                    r = json.loads(line)
                    recs[int(r["batch"])] = r
        return recs


def torch_variant(args) -> str:
    toks = shlex.split(args.torch_args)
    layout = toks[toks.index("--layout") + 1] if "--layout" in toks else "ncl"
    kind = "compiled" if "--compile" in toks else "eager"
    return f"{kind} {layout}"


# ---------------------------------------------------------------------------------------------- main
def parse_list(values, cast=str):
    out = []
    for v in values:
        out += [cast(s.strip()) for s in str(v).split(",") if s.strip()]
    return out


def main(argv=None) -> int:
    on_gpu = jax.default_backend() != "cpu"
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--encoder", action="append", help="encoder(s), comma-separated or repeated (default cnn)"
    )
    ap.add_argument(
        "--batch",
        action="append",
        help="global batch size(s) (default CPU 16,64; GPU 128,512,2048); "
        "with --scaling: per-device batch",
    )
    ap.add_argument(
        "--pair",
        action="append",
        help=f"augmentation pair AUG1+AUG2 (default {DEFAULT_PAIR}); "
        "names as torch_reference.py's --aug1/--aug2 and the config's augment.view1/view2",
    )
    ap.add_argument(
        "--precision", action="append", help="float32 and/or bfloat16 (default float32)"
    )
    ap.add_argument("--data", action="append", help="resident and/or streamed (default resident)")
    ap.add_argument(
        "--rounds", type=int, default=2, help="A B rounds of project and torch (default 2)"
    )
    ap.add_argument(
        "--seconds", type=float, default=10.0, help="timed seconds per measurement, all windows"
    )
    ap.add_argument("--windows", type=int, default=3, help="timed windows per measurement (>= 3)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first step")
    ap.add_argument(
        "--conv",
        choices=["auto", "paired", "strided"],
        default="auto",
        help="stride-2 conv formulation (models.CONV_FORMULATION)",
    )
    ap.add_argument(
        "--compiler-options",
        default="auto",
        help="XLA options of the step's jit: auto (= "
        "models.xla_compiler_options(), as pretrain.run compiles), none, or KEY=VALUE[;KEY=VALUE]",
    )
    ap.add_argument("--no-torch", dest="torch", action="store_false", help="project only")
    ap.add_argument(
        "--torch-python", default=sys.executable, help="python with torch (default: this one)"
    )
    ap.add_argument(
        "--torch-ref",
        default=None,
        help="path of torch_reference.py (default: ../shared/bench/ or .bench_shared/ of the repo)",
    )
    ap.add_argument(
        "--torch-args",
        default=None,
        help="extra torch_reference.py options naming the variant "
        "(default CPU '--layout nhwc' = best eager; GPU '--layout nhwc --compile')",
    )
    ap.add_argument(
        "--torch-device", default=None, help="cpu or cuda (default: follows the JAX backend)"
    )
    ap.add_argument("--torch-timeout", type=float, default=1800.0)
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices the project's step runs on, outside --scaling "
        "(default 1: torch_reference.py runs on one device, so the ratio compares one device with one)",
    )
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="device scaling 1, 2, 4, .., N devices (project only)",
    )
    ap.add_argument(
        "--scaling-devices",
        default=None,
        help="device counts for --scaling, comma-separated (default 1, 2, 4, .., N)",
    )
    ap.add_argument(
        "--dataset",
        default=None,
        help="an existing prepared dataset (default: write a synthetic one)",
    )
    ap.add_argument(
        "--records",
        type=int,
        default=0,
        help="records of the synthetic dataset (default max(256, 2 x largest global batch))",
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help="where the synthetic dataset goes (default $OUT/data or a temp dir)",
    )
    ap.add_argument(
        "--json",
        default=None,
        help="append JSON lines here (default $OUT/bench_pretrain.jsonl if $OUT "
        "is set, else bench/results_pretrain.jsonl)",
    )
    args = ap.parse_args(argv)

    from ecgcl_jax import models, parallel
    from ecgcl_jax.data import open_dataset

    encoders = parse_list(args.encoder or ["cnn"])
    batches = parse_list(args.batch or (["128,512,2048"] if on_gpu else ["16,64"]), int)
    pairs = args.pair or [
        DEFAULT_PAIR
    ]  # not comma-split: a pair may contain commas (time_warp:4,0.2)
    precisions = parse_list(args.precision or ["float32"])
    datas = parse_list(args.data or ["resident"])
    for p in pairs:
        if p.count("+") != 1:
            ap.error(f"--pair {p!r}: expected AUG1+AUG2")
    for p in precisions:
        if p not in TORCH_PRECISION:
            ap.error(f"--precision {p!r}: float32 or bfloat16")
    for d in datas:
        if d not in ("resident", "streamed"):
            ap.error(f"--data {d!r}: resident or streamed")
    models.CONV_FORMULATION = args.conv
    json_path = benchutil.json_path(args.json, "pretrain")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    if args.torch:
        args.torch_ref = args.torch_ref or next(
            (os.path.normpath(p) for p in TORCH_REF_CANDIDATES if os.path.exists(p)), None
        )
        if not args.torch_ref or not os.path.exists(args.torch_ref):
            ap.error("torch_reference.py not found: pass --torch-ref PATH (or --no-torch)")
        args.torch_device = args.torch_device or (
            "cuda" if jax.default_backend() == "gpu" else "cpu"
        )
        if args.torch_args is None:
            args.torch_args = (
                "--layout nhwc --compile" if args.torch_device == "cuda" else "--layout nhwc"
            )

    info = machine_info()
    run_id = time.strftime("%Y%m%dT%H%M%S")

    def log(msg=""):
        print(msg, flush=True)

    def emit(rec):
        with open(json_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")

    ndev = len(jax.devices())
    dev_counts = [1]
    if args.scaling and args.scaling_devices:
        dev_counts = parse_list([args.scaling_devices], int)
        if min(dev_counts) < 1 or max(dev_counts) > ndev:
            ap.error(f"--scaling-devices {args.scaling_devices}: counts must be in 1..{ndev}")
    elif args.scaling:
        while dev_counts[-1] * 2 < ndev:
            dev_counts.append(dev_counts[-1] * 2)
        if ndev > 1:
            dev_counts.append(ndev)
    largest = max(batches) * (max(dev_counts) if args.scaling else 1)
    if args.dataset:
        dataset = open_dataset(args.dataset)
    else:
        out_dir = os.environ.get("OUT", "")
        folder = args.workdir or (
            os.path.join(out_dir, "data")
            if out_dir
            else os.path.join(tempfile.gettempdir(), "ecgcl_bench_data")
        )
        n = args.records or max(256, 2 * largest)
        t0 = time.perf_counter()
        dataset = open_dataset(write_synthetic_dataset(os.path.join(folder, f"synthetic_{n}"), n))
        log(f"# dataset {dataset.path}: {len(dataset)} records ({time.perf_counter() - t0:.1f} s)")
    if len(dataset) < largest:
        ap.error(
            f"dataset has {len(dataset)} records, fewer than the largest global batch {largest}"
        )

    info["compiler_options"] = compiler_options(args)
    log(
        f"# {info['device_kind']} x{ndev} ({info['backend']}) | {info['cpu']} | jax {info['jax']} flax {info['flax']} "
        f"| conv {models.conv_formulation()} | compiler options {info['compiler_options'] or '-'} "
        f"| commit {info.get('git_commit', '?')} | load {loadavg()}"
    )
    if args.torch:
        log(
            f"# torch: {args.torch_python} {args.torch_ref} {args.torch_args} (variant: {torch_variant(args)})"
        )

    if args.scaling:
        return scaling(
            args, dataset, encoders, batches, pairs, precisions, dev_counts, info, run_id, log, emit
        )

    if not 1 <= args.devices <= len(jax.devices()):
        ap.error(f"--devices {args.devices}: this machine has {len(jax.devices())}")
    mesh = parallel.make_mesh(args.devices)
    groups = [(e, p, q) for e in encoders for p in pairs for q in precisions]
    cases: dict[tuple, ProjectCase] = {}
    results: dict[
        tuple, dict
    ] = {}  # (enc, pair, prec, data, batch) -> {"project": [...], "torch": [...]}
    common = dict(info, run_id=run_id, conv=models.conv_formulation(), num_devices_used=mesh.size)
    for r in range(args.rounds):
        for enc, pair, prec in groups:
            for data in datas:
                for b in batches:
                    key = (enc, pair, prec, data, b)
                    rec = dict(
                        common,
                        framework="ecgcl-jax",
                        **dict(zip(CASE_FIELDS, key)),
                        round=r + 1,
                        load1=loadavg(),
                        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    )
                    try:
                        if key not in cases:
                            cases[key] = ProjectCase(args, dataset, enc, pair, prec, b, data, mesh)
                        rec.update(cases[key].measure(args.seconds, args.windows, args.warmup))
                        log(
                            f"[round {r + 1}] ecgcl-jax {enc} {pair} {prec} {data} B={b}: "
                            f"{rec['ecg_per_s_median']:.1f} ECG/s "
                            f"({rec['ecg_per_s_min']:.1f}-{rec['ecg_per_s_max']:.1f}), "
                            f"compile {rec['compile_s']:.1f} s, "
                            f"loss {rec['final_loss']:.4f}, load {rec['load1']}"
                        )
                    except Exception as e:  # report and go on
                        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                        log(
                            f"[round {r + 1}] ecgcl-jax {enc} {pair} {prec} {data} B={b}: FAILED {rec['error'][:300]}"
                        )
                        traceback.print_exc(limit=4)
                    emit(rec)
                    results.setdefault(key, {"project": [], "torch": []})["project"].append(rec)
            if args.torch and enc in TORCH_ENCODERS and torch_has_pair(pair):
                t_recs = run_torch(args, enc, pair, prec, batches, log)
                for b in batches:
                    t = t_recs.get(b, {"error": "no result"})
                    t = dict(
                        t,
                        framework="torch",
                        variant=torch_variant(args),
                        torch_args=args.torch_args,
                        round=r + 1,
                        run_id=run_id,
                        aug_pair_project=pair,
                        precision_project=prec,
                        load1=loadavg(),
                    )
                    emit(t)
                    for data in datas:
                        results[(enc, pair, prec, data, b)]["torch"].append(t)
    for c in cases.values():
        c.close()
    summary(args, results, batches, run_id, common, log, emit)
    log(f"# JSON lines appended to {json_path}")
    return 0


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summary(args, results, batches, run_id, common, log, emit):
    variant = torch_variant(args) if args.torch else "-"
    log("")
    log(
        f"## ECG/s, median over rounds (ratio = median of the per-round project/torch ratios); ecgcl-jax on "
        f"{common['num_devices_used']} device(s), torch on one; torch: {variant}"
    )
    hdr = (
        f"{'encoder':15} {'aug pair':46} {'prec':8} {'data':9} {'batch':>6} {'ecgcl-jax':>10} {'torch':>9} "
        f"{'ratio':>6} {'rounds ratios':>16} {'compile s':>9} {'static MB':>9} {'dev peak MB':>11} {'max load':>8}"
    )
    log(hdr)
    for (enc, pair, prec, data, b), r in results.items():
        p = [x.get("ecg_per_s_median") for x in r["project"]]
        t = [x.get("ecg_per_s_median") for x in r["torch"]]
        ratios = [a / c for a, c in zip(p, t) if a and c]
        pm, tm, rm = _median(p), _median(t), _median(ratios)
        last = r["project"][-1]
        load = max((x.get("load1") or 0 for x in r["project"] + r["torch"]), default=None)
        # a window far below its round's median means another process took the cores during it
        disturbed = any(
            x.get("ecg_per_s_min") and x["ecg_per_s_min"] < 0.6 * x["ecg_per_s_median"]
            for x in r["project"] + r["torch"]
        )
        static = last.get("static_peak_bytes")
        # the device's peak is cumulative over the process: take it after this case's first round, when only the cases
        # before it (smaller batches first) had run, not after the last round, when every case had
        peak = r["project"][0].get("device_peak_bytes_in_use")
        fmt = lambda v, f: format(v, f) if v is not None else format("-", ">" + f.split(".")[0])  # noqa: E731
        log(
            f"{enc:15} {pair[:46]:46} {prec:8} {data:9} {b:>6} {fmt(pm, '10.1f')} {fmt(tm, '9.1f')} {fmt(rm, '6.2f')} "
            f"{','.join(f'{x:.2f}' for x in ratios):>16} {fmt(last.get('compile_s'), '9.1f')} "
            f"{fmt(static / 2**20 if static else None, '9.0f')} {fmt(peak / 2**20 if peak else None, '11.0f')} "
            f"{fmt(load, '8.2f')}{'  disturbed?' if disturbed else ''}"
        )
        emit(
            dict(
                common,
                kind="summary",
                **dict(zip(CASE_FIELDS, (enc, pair, prec, data, b))),
                project_ecg_per_s=pm,
                torch_ecg_per_s=tm,
                ratio_median=rm,
                ratios=ratios,
                torch_variant=variant,
                max_load1=load,
                disturbed=disturbed,
                static_peak_bytes=static,
                device_peak_bytes_round1=peak,
                torch_args=args.torch_args if args.torch else None,
                rounds=args.rounds,
            )
        )
    # every pair against the Gaussian pair, and streamed against resident (the 10% targets of bench/RESULTS.md)
    gauss = {k[:1] + k[2:]: v for k, v in results.items() if k[1] == DEFAULT_PAIR}
    rows = []
    for (enc, pair, prec, data, b), r in results.items():
        pm = _median([x.get("ecg_per_s_median") for x in r["project"]])
        g = gauss.get((enc, prec, data, b))
        if pair != DEFAULT_PAIR and g and pm:
            gm = _median([x.get("ecg_per_s_median") for x in g["project"]])
            rows.append(f"{enc} {prec} {data} B={b}: {pair} / gauss pair = {pm / gm:.2f}")
        if data == "streamed":
            res = results.get((enc, pair, prec, "resident", b))
            if res and pm:
                rm = _median([x.get("ecg_per_s_median") for x in res["project"]])
                rows.append(f"{enc} {pair} {prec} B={b}: streamed / resident = {pm / rm:.2f}")
    if rows:
        log("")
        log("## ecgcl-jax against itself")
        for line in rows:
            log(line)


def scaling(
    args, dataset, encoders, batches, pairs, precisions, dev_counts, info, run_id, log, emit
) -> int:
    """Weak scaling: per-device batch fixed, 1, 2, 4, .., N devices; efficiency vs n x one device."""
    from ecgcl_jax import models, parallel

    log("## device scaling (project only; per-device batch fixed)")
    log(
        f"{'encoder':15} {'aug pair':46} {'prec':8} {'per-dev B':>9} {'devices':>7} {'global B':>8} {'ECG/s':>10} "
        f"{'per device':>10} {'efficiency':>10}"
    )
    for enc in encoders:
        for pair in pairs:
            for prec in precisions:
                for b in batches:
                    base = None
                    for n in dev_counts:
                        mesh = parallel.make_mesh(n)
                        rec = dict(
                            info,
                            run_id=run_id,
                            kind="scaling",
                            framework="ecgcl-jax",
                            encoder=enc,
                            aug_pair=pair,
                            precision=prec,
                            data="resident",
                            per_device_batch=b,
                            batch=b * n,
                            num_devices_used=n,
                            conv=models.conv_formulation(),
                            load1=loadavg(),
                        )
                        try:
                            case = ProjectCase(
                                args, dataset, enc, pair, prec, b * n, "resident", mesh
                            )
                            rec.update(case.measure(args.seconds, args.windows, args.warmup))
                            case.close()
                            rate = rec["ecg_per_s_median"]
                            base = base or rate
                            rec["efficiency"] = rate / (n * base)
                            log(
                                f"{enc:15} {pair[:46]:46} {prec:8} {b:>9} {n:>7} {b * n:>8} {rate:>10.1f} "
                                f"{rate / n:>10.1f} "
                                f"{rec['efficiency']:>10.2f}"
                            )
                        except Exception as e:
                            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                            log(f"{enc} {pair} {prec} B={b} x{n}: FAILED {rec['error'][:300]}")
                        emit(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
