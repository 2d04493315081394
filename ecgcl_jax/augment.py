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
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ecgcl_jax import hashing
from ecgcl_jax.errors import UserError

__all__ = [
    "gaussian_noise",
    "dropout_mask",
    "zero_mask",
    "permute_segments",
    "time_warp",
    "mix",
    "apply",
    "validate",
    "two_views",
    "fft_magnitude",
    "NAMES",
    "ALIASES",
    "DEFAULTS",
]

# Canonical config names -> default parameter (SPEC defaults).
DEFAULTS: dict[str, Any] = {
    "gaussian_noise": 0.05,
    "dropout": 0.1,
    "zero_mask": 0.1,
    "permute": 5,
    "permute_shared": 5,
    "time_warp": (4, 0.2),
    "mix": (0.1, 0.05),
    "none": None,
}
NAMES = tuple(DEFAULTS)
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
    "time-wraping": "time_warp",
    "time-warping": "time_warp",
    "time_wraping": "time_warp",
    "time_warping": "time_warp",
    "identity": "none",
}


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

    x: (length, leads) float, mV; factor: noise factor (SPEC default 0.05). Returns x's shape/dtype.
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

    x: (length, leads); rate in [0, 1] (SPEC default 0.1). Returns x's shape/dtype.
    """
    length, leads = x.shape
    drop = _dropout_drop(key, length, leads, rate)
    return jnp.where(drop, jnp.zeros((), x.dtype), x)


# ----------------------------------------------------------------------------------------------
# Zero masking


def zero_mask(key, x, ratio):
    """Per lead, zero one window of floor(ratio * L) consecutive samples; start ~ U{0..L-window}.

    x: (length, leads); ratio in [0, 1] (SPEC default 0.1). Returns x's shape/dtype.
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
    x: (length, leads); warp = w in [0, 1) (SPEC defaults m=4, w=0.2). A traced m (jax.jit(time_warp)(key, x,
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
# Config-level dispatch


def _canonical(name, field: str) -> str:
    if not isinstance(name, str):
        raise UserError(f"{field}: augmentation name must be a string, got {name!r}")
    key = name.strip()
    key = ALIASES.get(key, ALIASES.get(key.lower(), key.lower()))
    if key not in DEFAULTS:
        valid = ", ".join(NAMES)
        aliases = ", ".join(sorted(ALIASES))
        raise UserError(
            f"{field}: unknown augmentation {name!r}; valid names: {valid} (aliases: {aliases})"
        )
    return key


def _number(v, field: str, what: str, lo: float, hi: float, hi_open=False):
    if _is_traced(v):
        return v
    if isinstance(v, bool):
        raise UserError(f"{field}: {what} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{field}: {what} must be a number, got {v!r}") from None
    ok = math.isfinite(f) and lo <= f and (f < hi if hi_open else f <= hi)
    if not ok:
        rng = f"[{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise UserError(f"{field}: {what} must be in {rng}, got {v!r}")
    return f


def _pair(param, field: str, what: str):
    if isinstance(param, (tuple, list)) and len(param) == 2:
        return tuple(param)
    if isinstance(param, np.ndarray) and param.shape == (2,):
        return tuple(param.tolist())
    raise UserError(f"{field}: {what}, got {param!r}")


def validate(name, param, length: int, field: str = "augment"):
    """Check an augmentation config before jit; return (canonical name, normalised param).

    name: a config name or alias (see NAMES / ALIASES); param: None means the SPEC default;
    length: the signal length the op will see (e.g. 5000, or 2500 for CLOCS halves).
    Raises UserError("<field>: <problem>") on an unknown name, a bad type or range, or a
    segment count that does not divide the length.
    """
    canon = _canonical(name, field)
    if param is None:
        param = DEFAULTS[canon]
    if canon == "none":
        return canon, None
    if canon == "gaussian_noise":
        return canon, _number(param, field, "gaussian_noise factor", 0.0, math.inf)
    if canon == "dropout":
        return canon, _number(param, field, "dropout rate", 0.0, 1.0)
    if canon == "zero_mask":
        return canon, _number(param, field, "zero_mask ratio", 0.0, 1.0)
    if canon in ("permute", "permute_shared"):
        shared = canon == "permute_shared"
        if isinstance(param, (tuple, list)):
            m, shared = _pair(param, field, "permute takes m or (m, shared_across_leads)")
            # 0.3 is no answer to "shared?"
            if isinstance(shared, (bool, np.bool_)) or shared in (
                0,
                1,
            ):
                shared = bool(shared)
            else:
                raise UserError(
                    f"{field}: permute's shared_across_leads must be 0 or 1 (or a bool), got {shared!r}"
                )
        else:
            m = param
        m = _static_int(m, "permute num_segments", field)
        _check_divides(length, m, field, "permute num_segments")
        return "permute", (m, shared)
    if canon == "time_warp":
        m, w = _pair(param, field, "time_warp takes (num_segments, warp), e.g. (4, 0.2)")
        m = _static_int(m, "time_warp num_segments", field)
        w = _number(w, field, "time_warp warp", 0.0, 1.0, hi_open=True)
        _check_time_warp(length, m, w, field)
        return canon, (m, w)
    # mix
    rate, factor = _pair(param, field, "mix takes (dropout rate, noise factor), e.g. (0.1, 0.05)")
    return canon, (
        _number(rate, field, "mix dropout rate", 0.0, 1.0),
        _number(factor, field, "mix noise factor", 0.0, math.inf),
    )


def _apply_canonical(canon, key, x, param):
    if canon == "none":
        return x
    if canon == "gaussian_noise":
        return gaussian_noise(key, x, param)
    if canon == "dropout":
        return dropout_mask(key, x, param)
    if canon == "zero_mask":
        return zero_mask(key, x, param)
    if canon == "permute":
        return permute_segments(key, x, param[0], shared_across_leads=param[1])
    if canon == "time_warp":
        return time_warp(key, x, param[0], param[1])
    raise UserError("augment.apply: 'mix' acts on a batch; use augment.mix or augment.two_views")


def apply(name, key, x, param):
    """Apply the augmentation named in a config to one ECG x: (length, leads).

    name: gaussian_noise | dropout | zero_mask | permute | permute_shared | time_warp | none
    (or an alias such as the reference's guassian_noise, zero-masking, permutation,
    time-wraping); param: factor | rate | ratio | m or (m, shared) | m | (m, w) | ignored;
    None means the SPEC default. 'mix' needs a batch: see `mix` / `two_views`.
    """
    canon, p = validate(name, param, x.shape[0], field="augment.apply")
    return _apply_canonical(canon, key, x, p)


def _normalise_aug(aug, length, field):
    if isinstance(aug, str):
        aug = (aug, None)
    if not isinstance(aug, (tuple, list)) or len(aug) != 2:
        raise UserError(f"{field}: expected (name, param), got {aug!r}")
    return validate(aug[0], aug[1], length, field=field)


def _one_view(view_keys, xs, global_index, canon, param):
    if canon == "mix":
        return _mix_from_example_keys(view_keys, xs, param[0], param[1], global_index)
    if canon == "none":
        return xs
    return jax.vmap(lambda k, x: _apply_canonical(canon, k, x, param))(view_keys, xs)


def two_views(key, xs, global_index, aug1, aug2):
    """The two augmented views of a batch for one pretraining step.

    key: the step's key (e.g. fold_in(step_key, step)); xs: (B, length, leads);
    global_index: (B,) int32, each example's index in the global batch of this step;
    aug1, aug2: (name, param) pairs (or a bare name for the default param).
    Example i uses k1, k2 = split(fold_in(key, global_index[i])) for view 1 and view 2, so the
    views of an example do not depend on how the batch is split over devices or hosts ('mix'
    also ranks over the batch it is given: call it on the global batch, e.g. under jit with a
    sharded array). Returns (view1, view2), each (B, length, leads).
    """
    length = xs.shape[1]
    c1, p1 = _normalise_aug(aug1, length, "augment.aug1")
    c2, p2 = _normalise_aug(aug2, length, "augment.aug2")
    gi = jnp.asarray(global_index)
    ek = _example_keys(key, gi)
    vk = jax.vmap(lambda k: jax.random.split(k, 2))(ek)  # (B, 2) keys
    return (
        _one_view(vk[:, 0], xs, gi, c1, p1),
        _one_view(vk[:, 1], xs, gi, c2, p2),
    )


# ----------------------------------------------------------------------------------------------
# Frequency-domain input


def fft_magnitude(x):
    """|rfft(x)| along time, first L//2 bins. x: (..., length, leads) -> (..., length // 2, leads) float32."""
    length = x.shape[-2]
    spec = jnp.fft.rfft(jnp.asarray(x, jnp.float32), axis=-2)
    return jnp.abs(spec[..., : length // 2, :]).astype(jnp.float32)
