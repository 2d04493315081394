"""ECG augmentations as pure, jit/vmap-safe functions of one ECG and a PRNG key.

One ECG is `x: (length, leads)` (channels-last, float32, mV); a batch is `(B, length, leads)`.
Every op draws its randomness for each lead independently (unless said otherwise), so under
`vmap` each example and each lead gets fresh numbers. Rates, ratios, factors, warps and
`num_segments` may be traced (a traced `num_segments` takes a slower general path with the same
result; `shared_across_leads` and `apply`/`validate`'s parameters are static). When they are
Python numbers, `floor(p * length)` is computed in float64 on the host (exactly NumPy's value);
when traced, in float32 on the device.

Randomness of a pretraining step: `two_views` derives each example's key as
`fold_in(key, global_index)`, so a view depends only on (key, the example's index in the
global batch, the ECG) and not on how the batch is sharded over devices or hosts.

A view is a pipeline of ops (`parse`: 'NAME[:PARAMS][@PROB]' steps joined by '|'), each step
keyed by its position (`apply_pipeline`); docs/pipelines.md describes every op and the keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ecgcl_jax import LEADS, SAMPLE_RATE, hashing
from ecgcl_jax.errors import UserError

__all__ = [
    "gaussian_noise",
    "dropout_mask",
    "zero_mask",
    "permute_segments",
    "time_warp",
    "mix",
    "baseline_wander",
    "powerline",
    "muscle_noise",
    "amplitude_scale",
    "random_resized_crop",
    "lead_mask",
    "vcg_rotate_scale",
    "rotation_matrix",
    "Op",
    "OPS",
    "IDENTITY",
    "parse",
    "pipeline_spec",
    "pipeline_record",
    "apply_pipeline",
    "apply",
    "validate",
    "two_views",
    "fft_magnitude",
    "NAMES",
    "ALIASES",
    "DEFAULTS",
]

# ----------------------------------------------------------------------------------------------
# helpers


def _is_traced(v) -> bool:
    return isinstance(v, jax.core.Tracer)


def _static_int(v, what: str, where: str = "augment") -> int:
    """A static Python int from an int-like value (int, numpy int, integral float, concrete array).
    Errors read '<where>: <what> must be ...'."""
    if _is_traced(v):
        raise UserError(
            f"{where}: {what} must be a static Python int (close over it or mark it static under jit)"
        )
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {what} must be an integer, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise UserError(f"{where}: {what} must be an integer, got {v!r}")
    return int(f)


def _floor_count(p, length: int):
    """floor(p * length): a Python int when p is static, an int32 scalar when traced."""
    if _is_traced(p):
        return jnp.floor(jnp.asarray(p, jnp.float32) * length).astype(jnp.int32)
    return int(math.floor(float(p) * length))


def _float_dtype(x):
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def materialize(z):
    """Keep z as its own buffer on CPU.

    XLA:CPU vectorises an elementwise fusion along the minor dimension of its output; fused into
    a (length, 12)-shaped consumer, random-number and erfinv arithmetic runs 3-7x slower than in
    its own long-minor-dimension loop (bench/bench_augment.py). On GPU/TPU fusing is better.
    """
    return jax.lax.optimization_barrier(z) if jax.default_backend() == "cpu" else z


def _normal(key, n: int):
    """(n,) float32 iid N(0, 1) from 64 bits of `key`.

    Counter-based: bits_i = hashing.hash_bits (a keyed lowbias32 hash of position i),
    u_i = (2 (bits_i >> 9) + 1) / 2^23 - 1
    (2^23 levels, symmetric, open (-1, 1)), z_i = sqrt(2) erfinv(u_i) (inverse-CDF transform,
    as jax.random.normal). Several times cheaper than threefry per value; the key still comes
    from jax.random, so everything stays a pure function of (key, position).
    """
    s = jax.random.bits(key, (2,), jnp.uint32)
    bits = hashing.hash_bits(s, (n,))
    u = ((bits >> 9) * 2 + 1).astype(jnp.float32) * jnp.float32(2.0**-23) - 1.0
    return jnp.float32(math.sqrt(2.0)) * jax.lax.erf_inv(u)


# ----------------------------------------------------------------------------------------------
# Gaussian noise


def gaussian_noise(key, x, factor):
    """x + N(0, 1) * factor * std(x), std per lead, unbiased (ddof=1).

    x: (length, leads) float, mV; factor: noise factor (the reference's default 0.05). Returns x's shape/dtype.
    The N(0, 1) values come from `_normal` (one independent value per sample and lead).
    """
    length, leads = x.shape
    dt = _float_dtype(x)
    x32 = jnp.asarray(x, jnp.float32)
    std = jnp.std(x32, axis=0, ddof=1, keepdims=True)
    z = materialize(_normal(key, length * leads)).reshape(length, leads)
    return (x32 + z * (jnp.asarray(factor, jnp.float32) * std)).astype(dt)


# ----------------------------------------------------------------------------------------------
# Dropout masking: exactly k = floor(rate * L) distinct positions per lead set to 0.


def _distinct_keys(key, length: int, leads: int):
    """(length, leads) uint32 random sort keys, pairwise distinct within each lead.

    The high bits are uniform random; the low ceil(log2 L) bits hold a random bijection of the
    time index (odd multiplier + offset mod 2^b), so ties in the high bits are impossible and
    are broken at random rather than by position.
    """
    nb = max(1, (length - 1).bit_length())
    low = jnp.uint32((1 << nb) - 1)
    kb, ka = jax.random.split(key)
    bits = jax.random.bits(kb, (length, leads), jnp.uint32)
    ab = jax.random.bits(ka, (2, leads), jnp.uint32)
    t = jnp.arange(length, dtype=jnp.uint32)[:, None]
    tie = (t * (ab[0] | jnp.uint32(1)) + ab[1]) & low
    return (bits & ~low) | tie


def _drop_topk_threshold(key, length, leads, k):
    """Boolean (length, leads) mask of the k largest keys per lead; k static. One top_k per lead."""
    keys = _distinct_keys(key, length, leads)
    thr = jax.lax.top_k(keys.T, k)[0][:, k - 1]
    return keys >= thr[None, :]


def _drop_sort_threshold(key, length, leads, k):
    """Same mask as `_drop_topk_threshold` via a full sort; k may be traced."""
    keys = _distinct_keys(key, length, leads)
    srt = jnp.sort(keys, axis=0)
    k = jnp.asarray(k, jnp.int32)
    thr = srt[jnp.clip(length - k, 0, length - 1)]
    return (keys >= thr[None, :]) & (k > 0)


_FEISTEL_ROUNDS = 6
_FEISTEL_MIN_FACTOR = 8


def _feistel_factors(length: int):
    """(a, b) with a b = length, a the largest divisor <= sqrt(length); None if a < 8."""
    a = max(d for d in range(1, math.isqrt(length) + 1) if length % d == 0)
    return (a, length // a) if a >= _FEISTEL_MIN_FACTOR else None


def _feistel_rank(key, length: int, leads: int):
    """(leads, length) int32: per lead, a keyed pseudo-random permutation of 0..length-1.

    A generalised Feistel network on Z_a x Z_b (a b = length, alternating moduli, an even number
    of rounds, round function lowbias32(v ^ round_key) mod a|b), so every lead gets a bijection:
    no sort, no scatter, just elementwise integer arithmetic. Round keys: 6 x leads uint32 from key.
    """
    a, b = _feistel_factors(length)
    rk = jax.random.bits(key, (_FEISTEL_ROUNDS, leads), jnp.uint32)
    t = jnp.arange(length, dtype=jnp.uint32)[None, :]
    u, v = t // jnp.uint32(b), t % jnp.uint32(b)  # u in Z_a, v in Z_b
    for r in range(_FEISTEL_ROUNDS):
        mod = jnp.uint32((a, b)[r % 2])
        w = u + hashing.lowbias32(v ^ rk[r][:, None]) % mod
        u, v = v, jnp.where(w >= mod, w - mod, w)
    return (u * jnp.uint32(b) + v).astype(jnp.int32)


def _drop_feistel(key, length, leads, k):
    """Positions whose Feistel rank is < k: exactly k per lead; k may be traced."""
    return materialize(_feistel_rank(key, length, leads) < k).T


def _dropout_drop(key, length: int, leads: int, rate):
    """(length, leads) bool: exactly floor(rate * length) True per lead.

    The Feistel ranks (fast everywhere, see bench/bench_augment.py); for lengths without a divisor
    pair >= 8 (e.g. prime), the k largest of distinct random keys via top_k (static k) or a sort
    (traced k).
    """
    k = _floor_count(rate, length)
    static = isinstance(k, int)
    if static:
        k = min(max(k, 0), length)
        if k == 0:
            return jnp.zeros((length, leads), bool)
    else:
        k = jnp.clip(k, 0, length)
    if _feistel_factors(length):
        return _drop_feistel(key, length, leads, k)
    return (_drop_topk_threshold if static else _drop_sort_threshold)(key, length, leads, k)


def dropout_mask(key, x, rate):
    """Set exactly floor(rate * L) distinct time positions of each lead to 0 (leads independent).

    x: (length, leads); rate in [0, 1] (the reference's default 0.1). Returns x's shape/dtype.
    """
    length, leads = x.shape
    drop = _dropout_drop(key, length, leads, rate)
    return jnp.where(drop, jnp.zeros((), x.dtype), x)


# ----------------------------------------------------------------------------------------------
# Zero masking


def zero_mask(key, x, ratio):
    """Per lead, zero one window of floor(ratio * L) consecutive samples; start ~ U{0..L-window}.

    x: (length, leads); ratio in [0, 1] (the reference's default 0.1). Returns x's shape/dtype.
    """
    length, leads = x.shape
    window = _floor_count(ratio, length)
    if isinstance(window, int):
        window = min(max(window, 0), length)
        if window == 0:
            return x
    else:
        window = jnp.clip(window, 0, length)
    start = jax.random.randint(key, (1, leads), 0, length - window + 1)
    t = jnp.arange(length)[:, None]
    drop = (t >= start) & (t < start + window)
    return jnp.where(drop, jnp.zeros((), x.dtype), x)


# ----------------------------------------------------------------------------------------------
# Segment permutation


def _check_divides(length: int, m: int, where: str, what: str = "num_segments"):
    if m < 1:
        raise UserError(f"{where}: {what} must be >= 1, got {m}")
    if length % m:
        raise UserError(f"{where}: {what}={m} does not divide the signal length {length}")


def permute_segments(key, x, num_segments, shared_across_leads=False):
    """Split time into m equal segments and shuffle them; concatenate.

    x: (length, leads) with length % m == 0 (else UserError); m = num_segments.
    Each lead draws its own permutation (the reference's behaviour); with
    shared_across_leads=True one permutation moves all leads together (leads stay synchronous).
    A traced m (jax.jit(permute_segments)(key, x, 5)) gives exactly the static result, by a slower
    general path; it cannot raise, so a traced m that does not divide L gives NaNs.
    """
    length, leads = x.shape
    if _is_traced(num_segments):
        return _permute_traced(key, x, num_segments, shared_across_leads)
    m = _static_int(num_segments, "num_segments")
    _check_divides(length, m, "augment.permute_segments")
    s = length // m
    xr = x.reshape(m, s, leads)
    if shared_across_leads:
        perm = jnp.argsort(jax.random.uniform(key, (m,)))
        return xr[perm].reshape(length, leads)
    perm = jnp.argsort(jax.random.uniform(key, (m, leads)), axis=0)  # (m, leads)
    return jnp.take_along_axis(xr, perm[:, None, :], axis=0).reshape(length, leads)


def _first_rows_uniform(key, m, shape):
    """uniform(key, shape) with rows >= m (a traced count) set to 2.0, above every draw.

    jax's default (partitionable) threefry draws element i of a shape from counter i, so rows < m equal
    uniform(key, (m,) + shape[1:]): an argsort of the result starts with the static path's permutation.
    """
    u = jax.random.uniform(key, shape)
    rows = jnp.arange(shape[0], dtype=jnp.int32).reshape((-1,) + (1,) * (len(shape) - 1))
    return jnp.where(rows < m, u, 2.0)


def _nan_unless(valid, y):
    """y where the traced parameters were valid, else NaN (a traced value cannot raise)."""
    return jnp.where(valid, y, jnp.asarray(jnp.nan, y.dtype))


def _permute_traced(key, x, num_segments, shared: bool):
    """permute_segments for a traced segment count: every shape from L (m <= L), a gather per sample."""
    length, leads = x.shape
    m = jnp.asarray(num_segments, jnp.int32)
    # 5.5 is not 5
    valid = (m == num_segments) & (m >= 1) & (m <= length) & (length % jnp.maximum(m, 1) == 0)
    m = jnp.where(valid, m, 1)
    s = length // m
    t = jnp.arange(length, dtype=jnp.int32)
    seg, off = t // s, t % s
    if shared:
        perm = jnp.argsort(_first_rows_uniform(key, m, (length,))).astype(jnp.int32)
        y = x[perm[seg] * s + off]
    else:
        perm = jnp.argsort(_first_rows_uniform(key, m, (length, leads)), axis=0).astype(jnp.int32)
        src = (
            jnp.take_along_axis(perm, jnp.broadcast_to(seg[:, None], (length, leads)), axis=0) * s
            + off[:, None]
        )
        y = jnp.take_along_axis(x, src, axis=0)
    return _nan_unless(valid, y.astype(_float_dtype(x)))


# ----------------------------------------------------------------------------------------------
# Time warping


def _warp_lengths(s: int, warp):
    """(stretched length, squeezed length) of one segment of s samples: floor(s(1+w)), floor(s(1-w))."""
    if _is_traced(warp):
        w = jnp.asarray(warp, jnp.float32)
        return (
            jnp.floor(s * (1 + w)).astype(jnp.int32),
            jnp.floor(s * (1 - w)).astype(jnp.int32),
        )
    w = float(warp)
    return int(math.floor(s * (1 + w))), int(math.floor(s * (1 - w)))


def _random_half(key, m: int, leads: int):
    """(m, leads) bool: for each lead an exact random half (m/2) of the m segments."""
    u = jax.random.uniform(key, (m, leads))
    rank = jnp.argsort(jnp.argsort(u, axis=0), axis=0)
    return rank < m // 2


def _frac_index(num, den):
    """floor(num / den) and its fraction, num >= 0 and den >= 1 int32: exact integer arithmetic."""
    q = num // den
    return q, (num - q * den).astype(jnp.float32) / den.astype(jnp.float32)


def _warp_tables(s: int, m: int, warp, stretched):
    """Per lead: new length and start of each segment in the concatenated signal, and its length T.

    stretched: (m, leads) bool. Returns seg_len, offsets: (m, leads) int32; total: int32 scalar
    (T = (m/2) (floor(s(1+w)) + floor(s(1-w))) <= L, the same for every lead).
    """
    ls, lq = _warp_lengths(s, warp)
    seg_len = jnp.where(stretched, ls, lq).astype(jnp.int32)
    offsets = jnp.cumsum(seg_len, axis=0) - seg_len
    return seg_len, offsets, jnp.asarray((m // 2) * (ls + lq), jnp.int32)


def _warp_source(n, s: int, seg_len, offsets, lengths=None):
    """Source coordinates in x of concatenated-signal index n: (leads, length) int32.

    Sample r of a segment resampled to `len` samples sits at r (s - 1) / (len - 1) of the original
    segment (np.linspace(0, s - 1, len)). The segment of n is found with a where-chain over the
    m segment starts (elementwise, so it fuses; a gather from the small table would not).
    lengths: the static (stretched, squeezed) lengths when the warp is a Python number: the
    division by len - 1 is then by one of two constants (4.6x faster on CPU than a division by
    a per-element divisor, bench/bench_augment.py); None when the warp is traced.
    Returns (i0, i1, g): value = (1 - g) x[i0] + g x[i1], indices along time.
    """
    m = offsets.shape[0]
    k = jnp.zeros_like(n)
    start = jnp.zeros_like(n)
    ln = jnp.broadcast_to(seg_len[0][:, None], n.shape)
    for kk in range(1, m):
        past = n >= offsets[kk][:, None]
        k = jnp.where(past, kk, k)
        start = jnp.where(past, offsets[kk][:, None], start)
        ln = jnp.where(past, seg_len[kk][:, None], ln)
    num = (n - start) * (s - 1)
    if lengths is None:
        q, g = _frac_index(num, jnp.maximum(ln - 1, 1))
    else:
        d_long, d_short = max(lengths[0] - 1, 1), max(lengths[1] - 1, 1)
        is_long = ln == lengths[0]
        q = jnp.where(is_long, num // d_long, num // d_short)
        den = jnp.where(is_long, d_long, d_short)
        g = (num - q * den).astype(jnp.float32) / den.astype(jnp.float32)
    i0 = k * s + q
    i1 = jnp.minimum(i0 + 1, k * s + s - 1)
    return i0, i1, g


def _lerp_gather(xt, i0, i1, g):
    """xt: (leads, length); i0, i1, g: (leads, n) -> (1 - g) xt[i0] + g xt[i1] along time."""
    a = jnp.take_along_axis(xt, i0, axis=1)
    b = jnp.take_along_axis(xt, i1, axis=1)
    return a + g * (b - a)


def _resample_index(length: int, total, leads: int):
    """Concatenated-signal coordinates of the L output samples: floor, floor + 1, fraction."""
    j = jnp.arange(length, dtype=jnp.int32)[None, :]
    n0, f = _frac_index(j * (total - 1), jnp.asarray(max(length - 1, 1), jnp.int32))
    n0 = jnp.broadcast_to(n0, (leads, length))
    return n0, jnp.minimum(n0 + 1, total - 1), f


def _time_warp_fixed(x, num_segments: int, warp, stretched):
    """Time warp with given segment choices. x: (length, leads); stretched: (m, leads) bool.

    Fused formulation: output sample j sits at u = j (T - 1) / (L - 1) in the concatenated warped
    signal (length T); its value is the lerp of concatenated samples floor(u) and floor(u) + 1,
    each a lerp of two input samples. So every output is a fixed combination of 4 gathered
    inputs: static shapes, no intermediate signal. Computed leads-major (time is the minor axis
    of the gathers): 1.2x faster than time-major on 2 CPU cores, the same on GPU.
    """
    length, leads = x.shape
    m = num_segments
    s = length // m
    seg_len, offsets, total = _warp_tables(s, m, warp, stretched)
    lengths = None if _is_traced(warp) else _warp_lengths(s, warp)
    xt = jnp.asarray(x, jnp.float32).T
    n0, n1, f = _resample_index(length, total, leads)
    c0 = _lerp_gather(xt, *_warp_source(n0, s, seg_len, offsets, lengths))
    c1 = _lerp_gather(xt, *_warp_source(n1, s, seg_len, offsets, lengths))
    return (c0 + f * (c1 - c0)).T.astype(_float_dtype(x))


def _check_time_warp(length: int, m: int, warp, where="augment.time_warp"):
    if m < 2 or m % 2:
        raise UserError(f"{where}: num_segments must be even and >= 2, got {m}")
    _check_divides(length, m, where)
    if not _is_traced(warp):
        w = float(warp)
        if not (0.0 <= w < 1.0):
            raise UserError(f"{where}: warp must be in [0, 1), got {w}")
        if math.floor((length // m) * (1 - w)) < 1:
            raise UserError(f"{where}: warp={w} squeezes a {length // m}-sample segment to nothing")


def time_warp(key, x, num_segments, warp):
    """Time warping, each lead independently.

    Split into m equal segments (m = num_segments, even, dividing L); an exact random half
    of them (drawn per lead) is linearly resampled to floor(len (1 + w)) samples, the others to
    floor(len (1 - w)); the pieces are concatenated and linearly resampled back to L samples.
    Resampling a piece of n samples to n' samples takes the samples at np.linspace(0, n - 1, n').
    x: (length, leads); warp = w in [0, 1) (the reference's defaults m=4, w=0.2). A traced m (jax.jit(time_warp)(key, x,
    4, 0.2)) gives the static result (the same indices; values to float32 rounding, as jit against eager), by a
    slower general path (_time_warp_traced_m).
    """
    length, leads = x.shape
    if _is_traced(num_segments):
        return _time_warp_traced_m(key, x, num_segments, warp)
    m = _static_int(num_segments, "num_segments")
    _check_time_warp(length, m, warp)
    stretched = _random_half(key, m, leads)
    return _time_warp_fixed(x, m, warp, stretched)


def _time_warp_traced_m(key, x, num_segments, warp):
    """time_warp for a traced segment count: the static m's result, by a slower general path.

    The possible m are the even divisors of L (a static list), so the segment lengths come from a table computed
    as the static path computes them; segments are found by a search over per-lead offsets of shape (L, leads)
    instead of a where-chain over m. A traced m that is not an even divisor of L (or a warp that squeezes a
    segment to nothing) gives NaNs: a traced value cannot raise.
    """
    length, leads = x.shape
    if not _is_traced(warp) and not 0.0 <= float(warp) < 1.0:
        raise UserError(f"augment.time_warp: warp must be in [0, 1), got {float(warp)}")
    ms = [mm for mm in range(2, length + 1, 2) if length % mm == 0]
    if not ms:
        raise UserError(f"augment.time_warp: the signal length {length} has no even divisor")
    m = jnp.asarray(num_segments, jnp.int32)
    where_m = jnp.searchsorted(jnp.asarray(ms, jnp.int32), m)
    sel = jnp.minimum(where_m, len(ms) - 1)
    valid = (jnp.asarray(ms, jnp.int32)[sel] == m) & (m == num_segments)  # 4.5 is not 4
    s = jnp.asarray([length // mm for mm in ms], jnp.int32)[sel]
    if _is_traced(warp):
        ls, lq = _warp_lengths(s, warp)
    else:
        table = [_warp_lengths(length // mm, warp) for mm in ms]
        ls = jnp.asarray([a for a, _ in table], jnp.int32)[sel]
        lq = jnp.asarray([b for _, b in table], jnp.int32)[sel]
    valid = valid & (lq >= 1)
    m = jnp.where(valid, m, ms[0])
    u = _first_rows_uniform(key, m, (length, leads))
    # rows >= m rank last: never stretched
    stretched = jnp.argsort(jnp.argsort(u, axis=0), axis=0) < m // 2
    rows = jnp.arange(length, dtype=jnp.int32)[:, None]
    seg_len = jnp.where(stretched, ls, jnp.where(rows < m, lq, 0)).astype(jnp.int32)  # (L, leads)
    offsets = jnp.cumsum(seg_len, axis=0) - seg_len
    total = (m // 2) * (ls + lq)
    off_t, len_t = offsets.T, seg_len.T  # (leads, L)

    def source(n):  # n: (leads, length) -> (i0, i1, g), as _warp_source
        k = (
            jax.vmap(lambda o, nn: jnp.searchsorted(o, nn, side="right"))(off_t, n).astype(
                jnp.int32
            )
            - 1
        )
        start = jnp.take_along_axis(off_t, k, axis=1)
        ln = jnp.take_along_axis(len_t, k, axis=1)
        q, g = _frac_index((n - start) * (s - 1), jnp.maximum(ln - 1, 1))
        i0 = k * s + q
        return i0, jnp.minimum(i0 + 1, k * s + s - 1), g

    xt = jnp.asarray(x, jnp.float32).T
    n0, n1, f = _resample_index(length, total, leads)
    c0 = _lerp_gather(xt, *source(n0))
    c1 = _lerp_gather(xt, *source(n1))
    return _nan_unless(valid, (c0 + f * (c1 - c0)).T.astype(_float_dtype(x)))


# ----------------------------------------------------------------------------------------------
# Mix over a batch


def _mix_from_example_keys(example_keys, xs, rate, factor, global_index):
    """mix with the per-example keys given. example_keys: (B,) keys; global_index: (B,) int."""
    b = xs.shape[0]
    sub = jax.vmap(lambda k: jax.random.split(k, 2))(example_keys)
    sel_keys, aug_keys = sub[:, 0], sub[:, 1]
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(sel_keys)
    # Rank of each example's uniform in the batch (ties broken by global index): the B//2
    # lowest get dropout. Depends only on (key, global indices), not on batch order or sharding.
    order = jnp.lexsort((jnp.asarray(global_index), u))
    rank = jnp.zeros((b,), jnp.int32).at[order].set(jnp.arange(b, dtype=jnp.int32))
    is_drop = rank < b // 2
    # Both augmentations for every example, then a select: gathering each half instead would halve the work but
    # move whole ECGs between devices when the batch is sharded.
    dropped = jax.vmap(dropout_mask, in_axes=(0, 0, None))(aug_keys, xs, rate)
    noised = jax.vmap(gaussian_noise, in_axes=(0, 0, None))(aug_keys, xs, factor)
    return jnp.where(is_drop[:, None, None], dropped, noised)


def _example_keys(key, global_index):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(global_index))


def mix(key, xs, rate=0.1, factor=0.05, global_index=None):
    """Exactly floor(B/2) examples of the batch get dropout masking, the others Gaussian noise.

    xs: (B, length, leads); global_index: (B,) int, the examples' indices in the global batch
    (default arange(B)). Example i uses key fold_in(key, global_index[i]); the dropout half is
    the floor(B/2) examples with the smallest uniform drawn from their own key, so the outcome
    is a function of the global indices, not of the order or sharding of the batch.
    """
    b = xs.shape[0]
    gi = jnp.arange(b, dtype=jnp.int32) if global_index is None else jnp.asarray(global_index)
    return _mix_from_example_keys(_example_keys(key, gi), xs, rate, factor, gi)


# ----------------------------------------------------------------------------------------------
# Physiological noise: baseline wander, powerline interference, muscle (EMG) noise


def _lead_std(x32):
    """(1, leads) unbiased (ddof=1) standard deviation of each lead, as gaussian_noise uses."""
    return jnp.std(x32, axis=0, ddof=1, keepdims=True)


def _baseline_wander_draw(key, leads: int, amplitude, min_hz, max_hz, components: int):
    """Random quantities of baseline_wander: f (K,) Hz, a (K, leads), phi (K, leads) radians."""
    kf, ka, kp = jax.random.split(key, 3)
    f = jax.random.uniform(kf, (components,), minval=min_hz, maxval=max_hz)
    a = jax.random.uniform(ka, (components, leads)) * jnp.asarray(amplitude, jnp.float32)
    phi = jax.random.uniform(kp, (components, leads), maxval=2 * math.pi)
    return f, a, phi


def baseline_wander(
    key,
    x,
    amplitude=0.3,
    min_hz=0.05,
    max_hz=0.5,
    components=2,
    sample_rate=SAMPLE_RATE,
):
    """Add a slow baseline drift: a sum of K low-frequency sinusoids, scaled by each lead's std.

    y[t, c] = x[t, c] + std_c(x) sum_k a[k, c] sin(2 pi f[k] t / fs + phi[k, c])
    with f[k] ~ U[min_hz, max_hz] Hz per ECG (one breathing-like source shared by the leads),
    a[k, c] ~ U[0, amplitude] and phi[k, c] ~ U[0, 2 pi) per component and lead; std_c is the
    unbiased std of lead c, so `amplitude` is relative (the pretraining inputs are normalised,
    not in mV). t = 0 .. L-1 samples, fs = sample_rate Hz (500). x: (length, leads) float;
    components = K static. Returns float32 of x's shape.
    """
    length, leads = x.shape
    f, a, phi = _baseline_wander_draw(key, leads, amplitude, min_hz, max_hz, components)
    x32 = jnp.asarray(x, jnp.float32)
    t = jnp.arange(length, dtype=jnp.float32) / jnp.float32(sample_rate)
    ang = jnp.float32(2 * math.pi) * (t[:, None] * f[None, :])  # (L, K)
    s, c = materialize(jnp.sin(ang)), materialize(jnp.cos(ang))  # computed once, not per lead
    # sin(w t + phi) = sin(w t) cos(phi) + cos(w t) sin(phi): K (L,) sines, not K * leads
    ca, sa = a * jnp.cos(phi), a * jnp.sin(phi)
    wander = sum(s[:, k, None] * ca[k] + c[:, k, None] * sa[k] for k in range(components))
    return x32 + _lead_std(x32) * wander


def _powerline_draw(key, leads: int, amplitude, harmonics: int):
    """Random quantities of powerline: f0 () int32 Hz (50 or 60), a (leads,), phi (H,) radians."""
    kf, ka, kp = jax.random.split(key, 3)
    f0 = jnp.where(jax.random.bernoulli(kf), 60, 50).astype(jnp.int32)
    a = jax.random.uniform(ka, (leads,)) * jnp.asarray(amplitude, jnp.float32)
    phi = jax.random.uniform(kp, (harmonics,), maxval=2 * math.pi)
    return f0, a, phi


def powerline(key, x, amplitude=0.1, harmonics=1, sample_rate=SAMPLE_RATE):
    """Add mains interference: a 50 Hz or 60 Hz sinusoid (and harmonics), scaled by each lead's std.

    y[t, c] = x[t, c] + std_c(x) a[c] sum_{h=1..H} sin(2 pi h f0 t / fs + phi[h]) / h
    with f0 = 50 or 60 Hz (probability 1/2 each, per ECG), phi[h] ~ U[0, 2 pi) per harmonic
    (one mains source: shared by the leads) and a[c] ~ U[0, amplitude] per lead (relative to
    the lead's unbiased std). H = harmonics (static; h f0 must stay below fs / 2). The phase
    h f0 t / fs is reduced mod 1 in integers (exact: f0, t and fs are integers).
    x: (length, leads) float; fs = sample_rate Hz (an integer, 500). Returns float32.
    """
    length, leads = x.shape
    f0, a, phi = _powerline_draw(key, leads, amplitude, harmonics)
    x32 = jnp.asarray(x, jnp.float32)
    n = jnp.arange(length, dtype=jnp.int32)
    hum = jnp.zeros((length,), jnp.float32)
    for h in range(1, harmonics + 1):
        cycles = ((h * f0 * n) % sample_rate).astype(jnp.float32) / jnp.float32(sample_rate)
        hum = hum + jnp.sin(jnp.float32(2 * math.pi) * cycles + phi[h - 1]) / h
    return x32 + materialize(hum)[:, None] * (a[None, :] * _lead_std(x32))


def _band_mask(length: int, low_hz, high_hz, sample_rate):
    """(length // 2 + 1,) bool: the rfft bins k with low_hz <= k fs / L <= high_hz."""
    f = jnp.arange(length // 2 + 1, dtype=jnp.float32) * (jnp.float32(sample_rate) / length)
    return (f >= low_hz) & (f <= high_hz)


def muscle_noise(key, x, amplitude=0.1, low_hz=20.0, high_hz=150.0, sample_rate=SAMPLE_RATE):
    """Add band-limited Gaussian noise in the EMG band, with std amplitude * std_c(x) per lead.

    Noise: white N(0, 1) values (as gaussian_noise draws them), ideal band-pass filtered in the
    frequency domain (rfft along time, bins outside [low_hz, high_hz] set to 0, irfft: exact and
    cheap), then divided by its own unbiased std per lead, so that
    y[t, c] = x[t, c] + amplitude std_c(x) n[t, c] / std_c(n)  (n all zero if no bin is in band).
    Band default 20-150 Hz: surface-EMG power at ECG sampling rates. x: (length, leads) float;
    fs = sample_rate Hz. Returns float32.
    """
    length, leads = x.shape
    x32 = jnp.asarray(x, jnp.float32)
    z = _normal(key, length * leads).reshape(length, leads)
    spec = jnp.fft.rfft(z, axis=0)
    keep = _band_mask(length, low_hz, high_hz, sample_rate)[:, None]
    n = jnp.fft.irfft(jnp.where(keep, spec, 0), n=length, axis=0).astype(jnp.float32)
    sd = _lead_std(n)
    n = jnp.where(sd > 0, n / jnp.where(sd > 0, sd, 1), 0)
    return x32 + n * (jnp.asarray(amplitude, jnp.float32) * _lead_std(x32))


# ----------------------------------------------------------------------------------------------
# Amplitude scaling, random resized crop, lead masking


def amplitude_scale(key, x, low=0.5, high=1.5, per_lead=False):
    """y = x * s, s ~ U[low, high]: one factor for the whole ECG, or one per lead (per_lead, static).

    x: (length, leads) float. Returns float32.
    """
    leads = x.shape[1]
    s = jax.random.uniform(key, (leads if per_lead else 1,), minval=low, maxval=high)
    return jnp.asarray(x, jnp.float32) * s[None, :]


def _crop_widths(
    length: int, min_frac: float, max_frac: float, where="augment.random_resized_crop"
):
    """(smallest, largest) window in samples: ceil(min_frac L) and floor(max_frac L), at least 2."""
    lo = max(2, math.ceil(float(min_frac) * length))
    hi = math.floor(float(max_frac) * length)
    if hi < lo:
        raise UserError(
            f"{where}: no window of {float(min_frac):g}-{float(max_frac):g} of {length} samples "
            "holds 2 samples or more"
        )
    return lo, hi


def _crop_draw(key, length: int, min_frac: float, max_frac: float):
    """Random quantities of random_resized_crop: window width W and start s0, () int32 each."""
    lo, hi = _crop_widths(length, min_frac, max_frac)
    kw, ks = jax.random.split(key)
    w = jax.random.randint(kw, (), lo, hi + 1, jnp.int32)
    s0 = jax.random.randint(ks, (), 0, length - w + 1, jnp.int32)
    return w, s0


def random_resized_crop(key, x, min_frac=0.5, max_frac=1.0):
    """Crop a window of W consecutive samples and linearly resample it back to L samples.

    W ~ U{ceil(min_frac L) .. floor(max_frac L)} (at least 2), start s0 ~ U{0 .. L - W}, one
    window for all leads; y = np.interp(np.linspace(s0, s0 + W - 1, L), arange(L), x[:, c]).
    Positions j (W - 1) / (L - 1) are split into integer and fraction exactly (int32 arithmetic).
    x: (length, leads) float; min_frac, max_frac static, 0 < min_frac <= max_frac <= 1.
    Returns float32.
    """
    length = x.shape[0]
    w, s0 = _crop_draw(key, length, min_frac, max_frac)
    x32 = jnp.asarray(x, jnp.float32)
    j = jnp.arange(length, dtype=jnp.int32)
    q, g = _frac_index(j * (w - 1), jnp.asarray(max(length - 1, 1), jnp.int32))
    i0 = s0 + q
    i1 = jnp.minimum(i0 + 1, s0 + w - 1)
    a, b = x32[i0], x32[i1]
    return a + g[:, None] * (b - a)


def _lead_count(k, leads: int) -> int:
    """Leads to mask: k itself when k >= 1 (an integer), else floor(k * leads)."""
    k = float(k)
    return int(k) if k >= 1 else int(math.floor(k * leads))


def _lead_mask_draw(key, leads: int, n: int):
    """(leads,) bool, exactly n True: the n leads with the smallest uniforms."""
    u = jax.random.uniform(key, (leads,))
    return jnp.argsort(jnp.argsort(u)) < n


def lead_mask(key, x, k=0.25):
    """Set exactly n random leads (all their samples) to 0; the others are unchanged.

    n = k when k >= 1 (an integer number of leads), else floor(k * leads) (a rate in [0, 1)).
    x: (length, leads); k static. Returns x's shape and dtype.
    """
    leads = x.shape[1]
    n = _lead_count(k, leads)
    drop = _lead_mask_draw(key, leads, n)
    return jnp.where(drop[None, :], jnp.zeros((), x.dtype), x)


# ----------------------------------------------------------------------------------------------
# 3KG: rotation and scaling of the heart's electrical axis in vectorcardiogram space

# The Dower matrix (Dower et al. 1980): the 8 independent leads (rows V1..V6, I, II) from the
# Frank VCG (X, Y, Z), s = D v; and the inverse Dower matrix (Edenbrandt & Pahlm 1988),
# v = T s, T = pinv(D) to 3 decimals. Coefficients as published (G. D. Clifford's idowerT.m).
DOWER = np.array(
    [
        [-0.515, 0.157, -0.917],
        [0.044, 0.164, -1.387],
        [0.882, 0.098, -1.277],
        [1.213, 0.127, -0.601],
        [1.125, 0.127, -0.086],
        [0.831, 0.076, 0.230],
        [0.632, -0.235, 0.059],
        [0.235, 1.066, -0.132],
    ]
)
INVERSE_DOWER = np.array(
    [
        [-0.172, -0.074, 0.122, 0.231, 0.239, 0.194, 0.156, -0.010],
        [0.057, -0.019, -0.106, -0.022, 0.041, 0.048, -0.227, 0.887],
        [-0.229, -0.310, -0.246, -0.063, 0.055, 0.108, 0.022, 0.102],
    ]
)
DOWER_LEADS = ("V1", "V2", "V3", "V4", "V5", "V6", "I", "II")


def _vcg_matrices():
    """(A D: (12, 3), T P: (3, 12)) float64: 12 leads -> VCG and VCG -> 12 leads in LEADS order.

    P picks the 8 independent leads; A rebuilds the 12 from them: III = II - I,
    aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2 (Einthoven, Goldberger).
    """
    col = {name: i for i, name in enumerate(DOWER_LEADS)}
    p = np.zeros((8, 12))
    for i, name in enumerate(DOWER_LEADS):
        p[i, LEADS.index(name)] = 1.0
    a = np.zeros((12, 8))
    for name in DOWER_LEADS:
        a[LEADS.index(name), col[name]] = 1.0
    i_, ii = col["I"], col["II"]
    a[LEADS.index("III"), [i_, ii]] = (-1.0, 1.0)
    a[LEADS.index("aVR"), [i_, ii]] = (-0.5, -0.5)
    a[LEADS.index("aVL"), [i_, ii]] = (1.0, -0.5)
    a[LEADS.index("aVF"), [i_, ii]] = (-0.5, 1.0)
    return a @ DOWER, INVERSE_DOWER @ p


def rotation_matrix(angles):
    """(3, 3) R = Rz(az) Ry(ay) Rx(ax) from angles (3,) = (ax, ay, az) in radians (right-handed)."""
    ax, ay, az = angles[0], angles[1], angles[2]
    one, zero = jnp.ones_like(ax), jnp.zeros_like(ax)

    def m(rows):
        return jnp.stack([jnp.stack(r) for r in rows])

    rx = m([[one, zero, zero], [zero, jnp.cos(ax), -jnp.sin(ax)], [zero, jnp.sin(ax), jnp.cos(ax)]])
    ry = m([[jnp.cos(ay), zero, jnp.sin(ay)], [zero, one, zero], [-jnp.sin(ay), zero, jnp.cos(ay)]])
    rz = m([[jnp.cos(az), -jnp.sin(az), zero], [jnp.sin(az), jnp.cos(az), zero], [zero, zero, one]])
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(rz, jnp.matmul(ry, rx, precision=hi), precision=hi)


def _vcg_draw(key, angle, max_scale):
    """Random quantities of vcg_rotate_scale: angles (3,) radians, scales (3,)."""
    ka, ks, ki = jax.random.split(key, 3)
    lim = jnp.float32(math.pi / 180) * jnp.asarray(angle, jnp.float32)
    angles = jax.random.uniform(ka, (3,), minval=-1.0, maxval=1.0) * lim
    s = jax.random.uniform(ks, (3,), minval=1.0, maxval=max_scale)
    scales = jnp.where(jax.random.bernoulli(ki, 0.5, (3,)), 1.0 / s, s)
    return angles, scales


def vcg_rotate_scale(key, x, angle=45.0, max_scale=1.5):
    """3KG (Gopal et al. 2021): rotate and scale the ECG's vectorcardiogram, project back to 12 leads.

    v = T x8 (x8: the leads V1..V6, I, II; T: the inverse Dower matrix INVERSE_DOWER), then
    v' = S R v with R = rotation_matrix(angles), angles ~ U[-angle, angle] degrees about X, Y
    and Z, S = diag(s), s_i ~ U[1, max_scale] inverted (1 / s_i) with probability 1/2 each;
    y8 = D v' (D: the Dower matrix DOWER), and III, aVR, aVL, aVF rebuilt from y8's I and II.
    3KG's setting: angle 45, max_scale 1.5 (the law as the ecg3kg reimplementation states it).
    Even with R = S = I, y = D T x8 is x projected on the dipole model (what 3KG trains on), not
    x. x: (length, 12) in ecgcl_jax.LEADS order.
    Returns float32 (length, 12).
    """
    length, leads = x.shape
    if leads != len(LEADS):
        raise UserError(
            f"augment.vcg_rotate_scale: needs the {len(LEADS)} standard leads, got {leads}"
        )
    angles, scales = _vcg_draw(key, angle, max_scale)
    back, fwd = _vcg_matrices()
    m = scales[:, None] * rotation_matrix(angles)  # S R
    hi = jax.lax.Precision.HIGHEST
    w = jnp.matmul(
        jnp.asarray(back, jnp.float32),
        jnp.matmul(m, jnp.asarray(fwd, jnp.float32), precision=hi),
        precision=hi,
    )  # (12, 12): y = x w^T
    return jnp.matmul(jnp.asarray(x, jnp.float32), w.T, precision=hi)


# ----------------------------------------------------------------------------------------------
# Pipelines: parsing (the one parser of augmentation specs), validation, application


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of an op: its name, default and allowed range (integer: a whole number)."""

    name: str
    default: float
    lo: float = 0.0
    hi: float = math.inf
    hi_open: bool = False
    integer: bool = False
    flag: bool = False  # 0 or 1
    lo_open: bool = False

    def range_text(self) -> str:
        if self.flag:
            return "0 or 1"
        return (
            f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        )


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op of the pipeline grammar: its parameters (in PARAMS order) and what it does."""

    params: tuple[Param, ...]
    summary: str
    batch: bool = False  # acts on the whole batch (mix)
    # one of the reference system's ops; the others (physiological noise, geometric ops) are each a
    # function of this module named after the op that runs it with its defaults as f(key, x)
    reference: bool = False


_FRAC = dict(lo=0.0, hi=1.0)
OPS: dict[str, OpSpec] = {
    "gaussian_noise": OpSpec((Param("factor", 0.05),), "x + N(0, 1) factor std(x)", reference=True),
    "dropout": OpSpec(
        (Param("rate", 0.1, **_FRAC),), "floor(rate L) samples per lead set to 0", reference=True
    ),
    "zero_mask": OpSpec(
        (Param("ratio", 0.1, **_FRAC),),
        "one window of floor(ratio L) samples per lead set to 0",
        reference=True,
    ),
    "permute": OpSpec(
        (
            Param("num_segments", 5, lo=-math.inf, integer=True),
            Param("shared_across_leads", 0, flag=True),
        ),
        "m equal segments shuffled (per lead, or shared)",
        reference=True,
    ),
    "time_warp": OpSpec(
        (
            Param("num_segments", 4, lo=-math.inf, integer=True),
            Param("warp", 0.2, hi=1.0, hi_open=True),
        ),
        "half of m segments stretched by 1 + w, half squeezed by 1 - w, back to L",
        reference=True,
    ),
    "mix": OpSpec(
        (Param("rate", 0.1, **_FRAC), Param("factor", 0.05)),
        "half the batch dropout(rate), half gaussian_noise(factor)",
        batch=True,
        reference=True,
    ),
    "none": OpSpec((), "identity", reference=True),
    "baseline_wander": OpSpec(
        (
            Param("amplitude", 0.3),
            Param("min_hz", 0.05, hi=1.0),
            Param("max_hz", 0.5, hi=1.0),
            Param("components", 2, lo=1, hi=16, integer=True),
        ),
        "sum of sinusoids below 1 Hz, amplitude relative to each lead's std",
    ),
    "powerline": OpSpec(
        (Param("amplitude", 0.1), Param("harmonics", 1, lo=1, hi=16, integer=True)),
        "50 or 60 Hz sinusoid (and harmonics), amplitude relative to each lead's std",
    ),
    "muscle_noise": OpSpec(
        (
            Param("amplitude", 0.1),
            Param("low_hz", 20.0, hi=SAMPLE_RATE / 2),
            Param("high_hz", 150.0, hi=SAMPLE_RATE / 2),
        ),
        "band-pass (FFT) Gaussian noise, std relative to each lead's std",
    ),
    "amplitude_scale": OpSpec(
        (Param("low", 0.5), Param("high", 1.5), Param("per_lead", 0, flag=True)),
        "x * U[low, high], per ECG or per lead",
    ),
    "random_resized_crop": OpSpec(
        (
            Param("min_frac", 0.5, lo_open=True, **_FRAC),
            Param("max_frac", 1.0, lo_open=True, **_FRAC),
        ),
        "random window of min_frac..max_frac of L, resampled to L",
    ),
    "lead_mask": OpSpec((Param("k", 0.25),), "exactly k leads (or floor(k C) when k < 1) set to 0"),
    "vcg_rotate_scale": OpSpec(
        (Param("angle", 45.0, hi=180.0), Param("max_scale", 1.5, lo=1.0)),
        "3KG: VCG rotated within +-angle degrees and scaled, back to 12 leads",
    ),
}
NAMES = tuple(OPS)
# every op's default parameter(s), as `validate` returns them
DEFAULTS: dict[str, Any] = {}  # filled below, once `validate` exists
# The reference's config spellings (and a few obvious variants).
ALIASES = {
    "guassian_noise": "gaussian_noise",
    "gaussian": "gaussian_noise",
    "noise": "gaussian_noise",
    "dropout_mask": "dropout",
    "zero-masking": "zero_mask",
    "zero_masking": "zero_mask",
    "permutation": "permute",
    "permute_segments": "permute",
    "permute_shared": "permute",  # with shared_across_leads = 1 by default
    "time-wraping": "time_warp",
    "time-warping": "time_warp",
    "time_wraping": "time_warp",
    "time_warping": "time_warp",
    "identity": "none",
    "3kg": "vcg_rotate_scale",
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One validated step of a view's pipeline.

    name: canonical op name (a key of OPS); params: every parameter, defaults filled in, in the
    order of OPS[name].params (ints for integer and 0/1 parameters, floats otherwise); prob: the
    probability that an example gets the op (1 = always).
    """

    name: str
    params: tuple = ()
    prob: float = 1.0

    def spec(self) -> str:
        """The canonical spelling: 'name:p1,p2@prob' (every parameter; '@prob' only when < 1)."""
        text = self.name + (":" + ",".join(f"{v:g}" for v in self.params) if self.params else "")
        return text + (f"@{self.prob:g}" if self.prob < 1 else "")

    def record(self) -> dict:
        """JSON-ready: {'op', 'params': {name: value}, 'prob'}."""
        names = [p.name for p in OPS[self.name].params]
        return {"op": self.name, "params": dict(zip(names, self.params)), "prob": self.prob}


Pipeline = tuple  # tuple[Op, ...]: the ops applied in order
IDENTITY: Pipeline = (Op("none"),)


def pipeline_spec(pipe: Pipeline) -> str:
    """The canonical spelling of a pipeline; parse(pipeline_spec(p)) == p."""
    return "|".join(op.spec() for op in pipe)


def pipeline_record(pipe: Pipeline) -> dict:
    """What config.json / encoder.json record of a view: {'spec': canonical string, 'ops': [...]}."""
    return {"spec": pipeline_spec(pipe), "ops": [op.record() for op in pipe]}


def _canonical(name, where: str) -> str:
    if not isinstance(name, str):
        raise UserError(f"{where}: augmentation name must be a string, got {name!r}")
    key = name.strip()
    key = ALIASES.get(key, ALIASES.get(key.lower(), key.lower()))
    if key not in OPS:
        valid = ", ".join(NAMES)
        aliases = ", ".join(sorted(ALIASES))
        raise UserError(
            f"{where}: unknown augmentation {name!r}; valid names: {valid} (aliases: {aliases})"
        )
    return key


def _check_value(v, p: Param, where: str):
    """v as the parameter's type (int for integer/flag parameters), or UserError naming p."""
    if isinstance(v, (bool, np.bool_)) and not p.flag:
        raise UserError(f"{where}: {p.name} must be a number (got {v!r})")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {p.name} must be a number (got {v!r})") from None
    if p.flag:
        if f not in (0.0, 1.0):
            raise UserError(f"{where}: {p.name} must be 0 or 1 (got {v!r})")
        return int(f)
    if p.integer and (not math.isfinite(f) or f != int(f)):
        raise UserError(f"{where}: {p.name} must be an integer (got {v!r})")
    ok = (
        math.isfinite(f)
        and (p.lo < f if p.lo_open else p.lo <= f)
        and (f < p.hi if p.hi_open else f <= p.hi)
    )
    if not ok:
        raise UserError(f"{where}: {p.name} must be in {p.range_text()} (got {v!r})")
    return int(f) if p.integer else f


def _check_op(name: str, vals: tuple, length: int, leads: int | None, where: str) -> None:
    """The checks that involve several parameters or the signal's shape."""
    if name == "permute":
        _check_divides(length, vals[0], where)
    elif name == "time_warp":
        _check_time_warp(length, vals[0], vals[1], where)
    elif name == "baseline_wander" and vals[1] > vals[2]:
        raise UserError(f"{where}: min_hz must be <= max_hz (got {vals[1]:g} > {vals[2]:g})")
    elif name == "powerline" and 60 * vals[1] >= SAMPLE_RATE / 2:
        raise UserError(
            f"{where}: harmonics={vals[1]} puts {60 * vals[1]} Hz at or above the Nyquist "
            f"frequency ({SAMPLE_RATE / 2:g} Hz)"
        )
    elif name == "muscle_noise" and vals[1] >= vals[2]:
        raise UserError(f"{where}: low_hz must be < high_hz (got {vals[1]:g} >= {vals[2]:g})")
    elif name == "amplitude_scale" and vals[0] > vals[1]:
        raise UserError(f"{where}: low must be <= high (got {vals[0]:g} > {vals[1]:g})")
    elif name == "random_resized_crop":
        if vals[0] > vals[1]:
            raise UserError(
                f"{where}: min_frac must be <= max_frac (got {vals[0]:g} > {vals[1]:g})"
            )
        _crop_widths(length, vals[0], vals[1], where)
    elif name == "lead_mask":
        k = vals[0]
        if k >= 1 and k != int(k):
            raise UserError(f"{where}: k must be a whole number of leads when >= 1 (got {k:g})")
        if leads is not None and k >= 1 and int(k) >= leads:
            raise UserError(
                f"{where}: k={int(k)} would zero every lead of a {leads}-lead view "
                "(give fewer leads, or a rate below 1)"
            )
    elif name == "vcg_rotate_scale" and leads is not None and leads != len(LEADS):
        raise UserError(
            f"{where}: needs the {len(LEADS)} standard leads, and this view has {leads} "
            "(the CLOCS lead modes cmlc and cmsmlc give single-lead views)"
        )


def _make_op(name, values, prob, length, leads, where, shared=False) -> Op:
    """Validate one step: name (or alias), its given parameter values (a prefix: the rest take their
    defaults), prob; errors read '<where> (<name>): <problem>'."""
    canon = _canonical(name, where)
    spec = OPS[canon]
    where = f"{where} ({canon})"
    values = tuple(values)
    if len(values) > len(spec.params):
        names = ", ".join(p.name for p in spec.params) or "no parameters"
        raise UserError(
            f"{where}: takes at most {len(spec.params)} parameter(s) ({names}), got {len(values)}"
        )
    defaults = [p.default for p in spec.params]
    if isinstance(name, str) and name.strip().lower() == "permute_shared":
        defaults[1] = 1
    vals = tuple(
        _check_value(v, p, where)
        for v, p in zip(values + tuple(defaults[len(values) :]), spec.params)
    )
    if canon == "permute" and shared:
        vals = (vals[0], 1)
    if isinstance(prob, (bool, np.bool_)):
        raise UserError(f"{where}: probability must be a number in [0, 1] (got {prob!r})")
    try:
        p = float(prob)
    except (TypeError, ValueError):
        raise UserError(f"{where}: probability must be a number in [0, 1] (got {prob!r})") from None
    if not 0.0 <= p <= 1.0:
        raise UserError(f"{where}: probability must be in [0, 1] (got {prob!r})")
    _check_op(canon, vals, length, leads, where)
    return Op(canon, vals, p)


def _parse_step(text: str, where: str):
    """'name:1,2@0.5' -> ('name', (1.0, 2.0), 0.5); numbers only, checked by _make_op."""
    body, at, prob = text.partition("@")
    if at and ("@" in prob or not prob.strip()):
        raise UserError(f"{where}: expected NAME[:PARAMS][@PROB], got {text!r}")
    name, _, arg = body.partition(":")
    values = ()
    if arg.strip():
        try:
            values = tuple(float(v) for v in arg.split(","))
        except ValueError:
            raise UserError(f"{where}: cannot parse parameter {arg!r} of {text!r}") from None
    if at:
        try:
            p = float(prob)
        except ValueError:
            raise UserError(f"{where}: cannot parse probability {prob!r} of {text!r}") from None
    else:
        p = 1.0
    return name.strip(), values, p


def _as_values(param) -> tuple:
    """A Python-API parameter (None, a number, a sequence, an array) as a tuple of values."""
    if param is None:
        return ()
    if isinstance(param, np.ndarray):
        return tuple(param.reshape(-1).tolist())
    if isinstance(param, (tuple, list)):
        return tuple(param)
    return (param,)


@functools.lru_cache(maxsize=256)
def _parse_cached(spec: str, length: int, leads, field: str, permute_shared: bool) -> Pipeline:
    steps = spec.split("|")
    out = []
    for i, text in enumerate(steps, 1):
        where = f"{field}: step {i}"
        if not text.strip():
            raise UserError(f"{where} is empty (the grammar is NAME[:PARAMS][@PROB] joined by '|')")
        name, values, p = _parse_step(text, where)
        out.append(_make_op(name, values, p, length, leads, where, permute_shared))
    return tuple(out)


def parse(
    spec,
    length: int,
    leads: int | None = None,
    field: str = "augment",
    permute_shared: bool = False,
) -> Pipeline:
    """The pipeline of one view, validated for signals of `length` samples and `leads` leads.

    spec: a string in the grammar
        view := step ('|' step)* ;  step := NAME [':' PARAMS] ['@' PROB]
    (PARAMS: comma-separated numbers, a prefix of the op's parameters, the rest default; PROB in
    [0, 1], default 1), e.g. 'baseline_wander:0.1@0.5|gaussian_noise:0.05|time_warp:4,0.2@0.3';
    or a Pipeline (tuple of Op, checked again for this shape); or, as the Python API has long
    taken, a (name, param) pair or a bare name. leads: None skips the lead-count checks.
    permute_shared: every permute step moves all leads together (config.augment.permute_shared_leads).
    Raises UserError('<field>: step <i> (<op>): <problem>') before anything is compiled.
    """
    if isinstance(spec, tuple) and spec and all(isinstance(o, Op) for o in spec):
        return tuple(
            _make_op(o.name, o.params, o.prob, length, leads, f"{field}: step {i}", permute_shared)
            for i, o in enumerate(spec, 1)
        )
    if isinstance(spec, Op):
        return parse((spec,), length, leads, field, permute_shared)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise UserError(f"{field}: expected a spec string or (name, param), got {spec!r}")
        return (
            _make_op(
                spec[0], _as_values(spec[1]), 1.0, length, leads, f"{field}: step 1", permute_shared
            ),
        )
    if not isinstance(spec, str):
        raise UserError(f"{field}: expected an augmentation spec string, got {spec!r}")
    return _parse_cached(spec, int(length), leads, field, bool(permute_shared))


def _legacy_param(op: Op):
    """The parameter as `validate` has always returned it: a number, a tuple, or None."""
    if op.name == "none":
        return None
    if op.name == "permute":
        return (op.params[0], bool(op.params[1]))
    return op.params[0] if len(op.params) == 1 else op.params


def validate(name, param, length: int, field: str = "augment"):
    """Check one augmentation before jit; return (canonical name, normalised param).

    name: a name of NAMES or an alias (ALIASES); param: None (the defaults), a number, or a sequence
    (a prefix of the op's parameters, the rest default); length: the signal length the op will see.
    Returns e.g. ('time_warp', (4, 0.2)), ('permute', (5, False)), ('dropout', 0.1), ('none', None).
    Raises UserError("<field>: ...") naming the problem.
    """
    (op,) = parse((name, param), length, None, field)
    return op.name, _legacy_param(op)


def _run_op(op: Op, key, x):
    """Apply one per-example op to one ECG x: (length, leads)."""
    v = op.params
    name = op.name
    if name == "none":
        return x
    if name == "gaussian_noise":
        return gaussian_noise(key, x, v[0])
    if name == "dropout":
        return dropout_mask(key, x, v[0])
    if name == "zero_mask":
        return zero_mask(key, x, v[0])
    if name == "permute":
        return permute_segments(key, x, v[0], shared_across_leads=bool(v[1]))
    if name == "time_warp":
        return time_warp(key, x, v[0], v[1])
    if name == "baseline_wander":
        return baseline_wander(key, x, *v)
    if name == "powerline":
        return powerline(key, x, *v)
    if name == "muscle_noise":
        return muscle_noise(key, x, *v)
    if name == "amplitude_scale":
        return amplitude_scale(key, x, v[0], v[1], per_lead=bool(v[2]))
    if name == "random_resized_crop":
        return random_resized_crop(key, x, *v)
    if name == "lead_mask":
        return lead_mask(key, x, v[0])
    if name == "vcg_rotate_scale":
        return vcg_rotate_scale(key, x, *v)
    raise UserError("augment.apply: 'mix' acts on a batch; use augment.mix or augment.two_views")


def apply(name, key, x, param):
    """Apply the augmentation named in a config to one ECG x: (length, leads).

    name: any per-example op of NAMES (or an alias such as the reference's guassian_noise,
    zero-masking, permutation, time-wraping); param as for `validate` (None: the defaults).
    'mix' needs a batch: see `mix` / `two_views`.
    """
    (op,) = parse((name, param), x.shape[0], x.shape[1], "augment.apply")
    return _run_op(op, key, x)


def _step_keys(view_keys, i: int):
    """(coin keys, op keys), (B,) each, of step i: split(fold_in(view key, i))."""
    k = jax.vmap(lambda vk: jax.random.split(jax.random.fold_in(vk, i)))(view_keys)
    return k[:, 0], k[:, 1]


def _apply_op_batch(op: Op, keys, xs, global_index):
    if op.name == "mix":
        return _mix_from_example_keys(keys, xs, op.params[0], op.params[1], global_index)
    return jax.vmap(lambda k, x: _run_op(op, k, x))(keys, xs)


def apply_pipeline(pipe: Pipeline, view_keys, xs, global_index):
    """One view of a batch: the pipeline's ops in order, each example with its own keys.

    view_keys: (B,) the examples' view keys; xs: (B, length, leads); global_index: (B,) int.
    A single op without '@' (the single-op spelling) uses the view key itself, as it always has;
    otherwise step i (0-based) uses coin, op = split(fold_in(view key, i)): the op draws from
    `op`, and with prob p < 1 the example keeps the op's output where uniform(coin) < p, else its
    input. So every random number is a function of (seed, step, global index, view, i).
    Returns float32 (B, length, leads) (xs unchanged for the identity).
    """
    if len(pipe) == 1 and pipe[0].prob == 1.0:
        if pipe[0].name == "none":
            return xs
        return _apply_op_batch(pipe[0], view_keys, xs, global_index)
    for i, op in enumerate(pipe):
        if op.name == "none" or op.prob == 0.0:
            continue
        coin, keys = _step_keys(view_keys, i)
        y = _apply_op_batch(op, keys, xs, global_index)
        if op.prob < 1.0:
            hit = jax.vmap(lambda k: jax.random.uniform(k, ()))(coin) < op.prob
            y = jnp.where(hit[:, None, None], y, jnp.asarray(xs, y.dtype))
        xs = y
    return xs


def two_views(key, xs, global_index, aug1, aug2):
    """The two augmented views of a batch for one pretraining step.

    key: the step's key (e.g. fold_in(step_key, step)); xs: (B, length, leads);
    global_index: (B,) int32, each example's index in the global batch of this step;
    aug1, aug2: Pipelines from `parse`, or anything `parse` takes (a spec string, a (name, param)
    pair, a bare name). Example i uses k1, k2 = split(fold_in(key, global_index[i])) for view 1
    and view 2 (and `apply_pipeline`'s per-step keys from them), so the views of an example do not
    depend on how the batch is split over devices or hosts ('mix' also ranks over the batch it is
    given: call it on the global batch, e.g. under jit with a sharded array).
    Returns (view1, view2), each (B, length, leads).
    """
    _, length, leads = xs.shape
    p1 = parse(aug1, length, leads, "augment.aug1")
    p2 = parse(aug2, length, leads, "augment.aug2")
    gi = jnp.asarray(global_index)
    ek = _example_keys(key, gi)
    vk = jax.vmap(lambda k: jax.random.split(k, 2))(ek)  # (B, 2) keys
    return apply_pipeline(p1, vk[:, 0], xs, gi), apply_pipeline(p2, vk[:, 1], xs, gi)


DEFAULTS.update({name: validate(name, None, 5000)[1] for name in NAMES})
DEFAULTS["permute_shared"] = (5, True)

# ----------------------------------------------------------------------------------------------
# Frequency-domain input


def fft_magnitude(x):
    """|rfft(x)| along time, first L//2 bins. x: (..., length, leads) -> (..., length // 2, leads) float32."""
    length = x.shape[-2]
    spec = jnp.fft.rfft(jnp.asarray(x, jnp.float32), axis=-2)
    return jnp.abs(spec[..., : length // 2, :]).astype(jnp.float32)
