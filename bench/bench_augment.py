"""Micro-benchmark of augmentation formulations (pick what XLA fuses well, keep exact semantics).

Each case maps a batch (B, L, C) float32 to an augmented batch with per-example keys, under jit +
vmap. The timed program chains `inner` applications in one lax.fori_loop (the output of one is
the input of the next, so nothing is dead code and dispatch overhead is amortised), and the
time per application is reported as ms per batch and ECG/s, with the ratio to Gaussian noise.

    python bench/bench_augment.py                       # CPU-sized defaults
    python bench/bench_augment.py --batch 512 --batch 2048 --inner 20 --jsonl bench/augment.jsonl

Runs unchanged on GPU/TPU (whatever jax.devices() gives). Prints a table and appends one JSON object per
case (to --jsonl; default $OUT/bench_augment.jsonl, or bench/results_augment.jsonl).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time

import benchutil  # bench/, beside this script
import jax
import jax.numpy as jnp
import numpy as np

from ecgcl_jax import augment as A
from ecgcl_jax import models

# ------------------------------------------------------------------ alternative formulations
# (the library's choices live in ecgcl_jax/augment.py; these are the ones measured against them)


def permute_flat_gather(key, x, m):
    """Per-lead permutation as one gather with per-sample source indices (vs reshape + take)."""
    length, leads = x.shape
    s = length // m
    perm = jnp.argsort(jax.random.uniform(key, (m, leads)), axis=0)
    t = jnp.arange(length)[:, None]
    seg = jnp.broadcast_to(t // s, (length, leads))
    src = jnp.take_along_axis(perm, seg, axis=0) * s + t % s
    return jnp.take_along_axis(x, src, axis=0)


def _lerp_time_major(x, i0, i1, g):
    a = jnp.take_along_axis(x, i0, axis=0)
    b = jnp.take_along_axis(x, i1, axis=0)
    return a + g * (b - a)


def _source_time_major(n, s, seg_len, offsets, select):
    """Time-major (length, leads) source coordinates; small tables by gather or where-chain."""
    m = offsets.shape[0]
    if select:
        k = jnp.zeros_like(n)
        start = jnp.zeros_like(n)
        ln = jnp.broadcast_to(seg_len[0][None, :], n.shape)
        for kk in range(1, m):
            past = n >= offsets[kk][None, :]
            k = jnp.where(past, kk, k)
            start = jnp.where(past, offsets[kk][None, :], start)
            ln = jnp.where(past, seg_len[kk][None, :], ln)
    else:
        k = jnp.sum(offsets[1:, None, :] <= n[None], axis=0)
        start = jnp.take_along_axis(offsets, k, axis=0)
        ln = jnp.take_along_axis(seg_len, k, axis=0)
    q, g = A._frac_index((n - start) * (s - 1), jnp.maximum(ln - 1, 1))
    i0 = k * s + q
    return i0, jnp.minimum(i0 + 1, k * s + s - 1), g


def time_warp_time_major(key, x, m, w, select):
    """Fused 4-gather time warp computed in (length, leads) order (the first formulation)."""
    length, leads = x.shape
    s = length // m
    seg_len, offsets, total = A._warp_tables(s, m, w, A._random_half(key, m, leads))
    j = jnp.arange(length, dtype=jnp.int32)[:, None]
    n0, f = A._frac_index(j * (total - 1), jnp.asarray(length - 1, jnp.int32))
    n0 = jnp.broadcast_to(n0, (length, leads))
    n1 = jnp.minimum(n0 + 1, total - 1)
    c0 = _lerp_time_major(x, *_source_time_major(n0, s, seg_len, offsets, select))
    c1 = _lerp_time_major(x, *_source_time_major(n1, s, seg_len, offsets, select))
    return c0 + f * (c1 - c0)


def time_warp_jnp_interp(key, x, m, w):
    """Two-stage time warp whose second stage is jnp.interp per lead (searchsorted-based)."""
    length, leads = x.shape
    s = length // m
    seg_len, offsets, _ = A._warp_tables(s, m, w, A._random_half(key, m, leads))
    ls, lq = A._warp_lengths(s, w)
    total = (m // 2) * (ls + lq)  # static: w is a Python float
    n = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32)[None, :], (leads, total))
    cat = A._lerp_gather(x.T, *A._warp_source(n, s, seg_len, offsets))
    u = jnp.linspace(0.0, total - 1.0, length)
    return jax.vmap(lambda c: jnp.interp(u, jnp.arange(total, dtype=jnp.float32), c), 0, 1)(cat)


def dropout_feistel_fused(key, x, rate):
    """Feistel dropout without the CPU materialisation barrier, computed time-major."""
    length, leads = x.shape
    k = int(math.floor(rate * length))
    return jnp.where(A._feistel_rank(key, length, leads).T < k, 0.0, x)


def gaussian_noise_threefry(key, x, factor):
    """gaussian_noise with jax.random.normal (threefry) normals instead of the counter hash."""
    x32 = jnp.asarray(x, jnp.float32)
    std = jnp.std(x32, axis=0, ddof=1, keepdims=True)
    return x32 + jax.random.normal(key, x32.shape, jnp.float32) * (factor * std)


def _drop_topk_scatter(key, length, leads, k):
    """k static: top_k indices of uniforms per lead, scattered into a mask."""
    u = jax.random.uniform(key, (leads, length))
    idx = jax.lax.top_k(u, k)[1]  # (leads, k), distinct per lead
    return jnp.zeros((leads, length), bool).at[jnp.arange(leads)[:, None], idx].set(True).T


def _drop_argsort_scatter(key, length, leads, k):
    """k static: first k of a per-lead argsort of uniforms, scattered into a mask."""
    u = jax.random.uniform(key, (leads, length))
    idx = jnp.argsort(u, axis=1)[:, :k]
    return jnp.zeros((leads, length), bool).at[jnp.arange(leads)[:, None], idx].set(True).T


# exact-count dropout masks (length, leads) -> bool, besides the library's Feistel ranks
DROPOUT_MASKS = {
    "topk_threshold": A._drop_topk_threshold,  # the library's choice for lengths without Feistel factors
    "sort_threshold": A._drop_sort_threshold,  # the same, for a traced rate
    "topk_scatter": _drop_topk_scatter,
    "argsort_scatter": _drop_argsort_scatter,
}


def time_warp_two_stage(key, x, m, w):
    """time_warp materialising the concatenated warped signal (T <= L) first, then resampling it."""
    length, leads = x.shape
    s = length // m
    seg_len, offsets, total = A._warp_tables(s, m, w, A._random_half(key, m, leads))
    n = jnp.broadcast_to(
        jnp.minimum(jnp.arange(length, dtype=jnp.int32)[None, :], total - 1), (leads, length)
    )
    cat = A._lerp_gather(x.T, *A._warp_source(n, s, seg_len, offsets))  # (leads, L), first T valid
    n0, n1, f = A._resample_index(length, total, leads)
    return A._lerp_gather(cat, n0, n1, jnp.broadcast_to(f, n0.shape)).T


def scale_only(key, x, f):
    """Memory-bound floor: one elementwise pass, no randomness."""
    return x * f


# the ops beyond the reference's, each timed alone with its defaults (augment.<name>(key, x))
NEW_OPS = tuple(name for name, spec in A.OPS.items() if not spec.reference)
PIPELINE = "baseline_wander@0.5|powerline@0.5|gaussian_noise:0.05|random_resized_crop@0.5"


def _pipeline(spec, length):
    """A view pipeline as pretraining applies it: per-example keys folded with each step's position."""

    def run(key, xs):
        pipe = A.parse(spec, xs.shape[1], xs.shape[2], "bench")
        return A.apply_pipeline(
            pipe, jax.random.split(key, xs.shape[0]), xs, jnp.arange(xs.shape[0])
        )

    return run


def _per_example(fn):
    return lambda key, xs: jax.vmap(fn)(jax.random.split(key, xs.shape[0]), xs)


def cases(length):
    tw = (4, 0.2)
    c = {
        "copy (x * 1.0001)": _per_example(lambda k, x: scale_only(k, x, 1.0001)),
        "gaussian_noise": _per_example(lambda k, x: A.gaussian_noise(k, x, 0.05)),
        "gaussian_noise (threefry normal)": _per_example(
            lambda k, x: gaussian_noise_threefry(k, x, 0.05)
        ),
        "zero_mask": _per_example(lambda k, x: A.zero_mask(k, x, 0.1)),
        "permute (reshape + take)": _per_example(lambda k, x: A.permute_segments(k, x, 5)),
        "permute (flat gather)": _per_example(lambda k, x: permute_flat_gather(k, x, 5)),
        "permute_shared": _per_example(lambda k, x: A.permute_segments(k, x, 5, True)),
        "time_warp": _per_example(lambda k, x: A.time_warp(k, x, *tw)),
        "time_warp (two-stage)": _per_example(lambda k, x: time_warp_two_stage(k, x, *tw)),
        "time_warp (time-major, select)": _per_example(
            lambda k, x: time_warp_time_major(k, x, *tw, True)
        ),
        "time_warp (time-major, gathers)": _per_example(
            lambda k, x: time_warp_time_major(k, x, *tw, False)
        ),
        "time_warp (jnp.interp)": _per_example(lambda k, x: time_warp_jnp_interp(k, x, *tw)),
        "dropout": _per_example(lambda k, x: A.dropout_mask(k, x, 0.1)),
        "dropout (feistel, fused time-major)": _per_example(
            lambda k, x: dropout_feistel_fused(k, x, 0.1)
        ),
        "dropout (traced rate)": _per_example(
            lambda k, x: A.dropout_mask(k, x, jnp.float32(0.1) + 0 * x[0, 0])
        ),
        "mix": lambda k, xs: A.mix(k, xs, 0.1, 0.05, jnp.arange(xs.shape[0])),
    }
    # the physiological / geometric ops with their defaults, alone, and one composed pipeline
    for name in NEW_OPS:
        c[name] = _per_example(getattr(A, name))
    c["pipeline " + PIPELINE] = _pipeline(PIPELINE, length)
    k = int(np.floor(0.1 * length))
    for method, drop in DROPOUT_MASKS.items():
        c[f"dropout ({method})"] = _per_example(
            lambda key, x, drop=drop: jnp.where(drop(key, x.shape[0], x.shape[1], k), 0.0, x)
        )
    return c


def time_case(fn, xs, inner, repeats, compiler_options=None):
    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run(key, xs):
        def body(i, x):
            return fn(jax.random.fold_in(key, i), x)

        return jax.lax.fori_loop(0, inner, body, xs)

    key = jax.random.key(0)
    t0 = time.perf_counter()
    jax.block_until_ready(run(key, xs))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(run(key, xs))  # warm (thread pools, allocator)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(jax.random.fold_in(key, r + 1), xs))
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times)), compile_s


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--batch",
        type=int,
        action="append",
        help="batch size(s); default 16 on CPU, 512 and 2048 otherwise",
    )
    p.add_argument("--length", type=int, default=5000)
    p.add_argument("--leads", type=int, default=12)
    p.add_argument(
        "--inner",
        type=int,
        default=None,
        help="applications per timed call (default 5 CPU, 20 accelerator)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    p.add_argument(
        "--jsonl",
        default=None,
        help="append one JSON object per case to this file (default "
        "$OUT/bench_augment.jsonl if $OUT is set, else bench/results_augment.jsonl)",
    )
    p.add_argument(
        "--compiler-options",
        choices=("auto", "none"),
        default="auto",
        help="auto: compile as the pretraining step does (models.xla_compiler_options(), which keeps "
        "the CPU optimization barriers); none: XLA's defaults",
    )
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    batches = a.batch or ([16] if on_cpu else [512, 2048])
    inner = a.inner or (5 if on_cpu else 20)
    env = dict(
        device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        n_devices=len(jax.devices()),
        jax=jax.__version__,
        python=platform.python_version(),
        compiler_options=a.compiler_options,
    )
    copts = (models.xla_compiler_options() or None) if a.compiler_options == "auto" else None
    print(f"# {env}", flush=True)
    all_cases = cases(a.length)
    only = [s for s in a.only.split(",") if s]
    names = [n for n in all_cases if not only or any(s in n for s in only)]
    rows = []
    for b in batches:
        xs = jax.random.normal(jax.random.key(1), (b, a.length, a.leads), jnp.float32)
        base = None
        print(f"\nbatch {b} x {a.length} x {a.leads} float32, {inner} applications per call")
        print(f"{'case':34s} {'ms/batch':>10s} {'ECG/s':>12s} {'vs noise':>9s} {'compile s':>10s}")
        for name in names:
            sec, comp = time_case(all_cases[name], xs, inner, a.repeats, copts)
            if name == "gaussian_noise":
                base = sec
            ratio = f"{sec / base:.2f}x" if base else "-"
            print(
                f"{name:34s} {sec * 1e3:10.3f} {b / sec:12.0f} {ratio:>9s} {comp:10.1f}", flush=True
            )
            rows.append(
                dict(
                    env,
                    bench="augment",
                    case=name,
                    batch=b,
                    length=a.length,
                    leads=a.leads,
                    ms_per_batch=sec * 1e3,
                    ecg_per_s=b / sec,
                    time_vs_gaussian=(sec / base) if base else None,
                    compile_s=comp,
                )
            )
    path = benchutil.json_path(a.jsonl, "augment")
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(rows)} JSON lines to {path}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
