"""Augmentations against their definitions (the reference's and the papers'), under jit and vmap."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ecgcl_jax
from ecgcl_jax import augment as A
from ecgcl_jax.errors import UserError

L, C = 5000, 12


@pytest.fixture(scope="module")
def xs():
    """(2, 5000, 12) float32 ECG-like signals with no exact zeros and per-lead scales/offsets."""
    rng = np.random.default_rng(0)
    t = np.arange(L)[None, :, None] / 500.0
    base = np.sin(2 * np.pi * 1.2 * t + rng.uniform(0, 6, (2, 1, C))) * rng.uniform(
        0.2, 2, (2, 1, C)
    )
    x = base + 0.1 * rng.normal(size=(2, L, C)) + rng.uniform(-1, 1, (2, 1, C))
    x[x == 0] = 1e-3
    return jnp.asarray(x, jnp.float32)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def batched(fn, *params):
    """jit(vmap(fn)) over (keys, xs) with the parameters closed over (static)."""
    return jax.jit(jax.vmap(lambda k, x: fn(k, x, *params)))


# ---------------------------------------------------------------- numpy references


def np_time_warp(x, m, w, stretched):
    """Two-stage definition: np.interp per segment, concatenate, np.interp back to L."""
    length, leads = x.shape
    s = length // m
    out = np.empty((length, leads))
    for c in range(leads):
        parts = []
        for k in range(m):
            seg = x[k * s : (k + 1) * s, c]
            n = int(np.floor(s * (1 + w))) if stretched[k, c] else int(np.floor(s * (1 - w)))
            parts.append(np.interp(np.linspace(0, s - 1, n), np.arange(s), seg))
        cat = np.concatenate(parts)
        out[:, c] = np.interp(np.linspace(0, len(cat) - 1, length), np.arange(len(cat)), cat)
    return out


def zero_runs(col):
    """(start, length) of the maximal runs of exact zeros in a 1-D array."""
    z = np.concatenate([[0], (col == 0).astype(int), [0]])
    d = np.diff(z)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return list(zip(starts, ends - starts))


# ---------------------------------------------------------------- Gaussian noise


def test_gaussian_noise_statistics(xs):
    factor = 0.5
    ys = np.asarray(batched(A.gaussian_noise, factor)(keys(2), xs))
    x = np.asarray(xs, np.float64)
    z = (ys - x) / (factor * x.std(axis=1, ddof=1, keepdims=True))  # should be iid N(0, 1)
    n = L
    assert np.all(np.abs(z.mean(axis=1)) < 5 / math.sqrt(n))
    assert np.all(np.abs(z.std(axis=1) - 1) < 5 / math.sqrt(2 * n))
    # independent across leads and examples
    corr = np.corrcoef(z[0].T)
    assert np.max(np.abs(corr - np.eye(C))) < 5 / math.sqrt(n)
    assert np.abs(np.corrcoef(z[0, :, 0], z[1, :, 0])[0, 1]) < 5 / math.sqrt(n)


def test_gaussian_noise_uses_unbiased_std():
    # x = [0, 1]: unbiased std = 1/sqrt(2), biased = 1/2; the noise std over many keys tells them apart.
    x = jnp.array([[0.0], [1.0]])
    ks = keys(20000, seed=3)
    ys = jax.jit(jax.vmap(lambda k: A.gaussian_noise(k, x, 1.0)))(ks)
    noise = np.asarray(ys) - np.asarray(x)
    assert abs(noise.std() - 1 / math.sqrt(2)) < 0.02


def test_gaussian_noise_traced_factor_and_fresh_keys(xs):
    x = xs[0]
    f = jax.jit(A.gaussian_noise)
    k1, k2 = keys(2, seed=5)
    a, b = f(k1, x, 0.05), f(k2, x, 0.05)
    assert not np.allclose(a, b)
    np.testing.assert_allclose(f(k1, x, 0.0), x)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("rate", [0.1, 0.37])
def test_dropout_exact_count_per_lead(xs, rate):
    ys = np.asarray(batched(A.dropout_mask, rate)(keys(2), xs))
    x = np.asarray(xs)
    k = int(np.floor(rate * L))
    zeros = ys == 0
    np.testing.assert_array_equal(zeros.sum(axis=1), np.full((2, C), k))
    np.testing.assert_array_equal(ys[~zeros], x[~zeros])  # the rest untouched
    # leads and examples independent: different masks
    assert not np.array_equal(zeros[0, :, 0], zeros[0, :, 1])
    assert not np.array_equal(zeros[0, :, 0], zeros[1, :, 0])


def test_dropout_traced_rate_and_edges(xs):
    x = xs[0]
    f = jax.jit(A.dropout_mask)  # rate traced: a different code path (sort threshold)
    k = jax.random.key(11)
    for rate in (0.0, 0.1, 0.2345, 1.0):
        y = np.asarray(f(k, x, rate))
        expect = int(np.floor(np.float32(rate) * L))
        np.testing.assert_array_equal((y == 0).sum(axis=0), np.full(C, expect))
    np.testing.assert_array_equal(A.dropout_mask(k, x, 0.0), x)
    assert np.all(np.asarray(A.dropout_mask(k, x, 1.0)) == 0)


def test_dropout_formulations_agree():
    k = jax.random.key(2)
    traced = jax.jit(lambda key, r: A._dropout_drop(key, L, C, r))
    for rate in (0.1, 0.999):
        kk = int(np.floor(rate * L))
        masks = {
            "feistel": A._drop_feistel(k, L, C, kk),
            "topk_threshold": A._drop_topk_threshold(k, L, C, kk),
            # k traced
            "sort_threshold": jax.jit(A._drop_sort_threshold, static_argnums=(1, 2))(k, L, C, kk),
        }
        masks = {m: np.asarray(v) for m, v in masks.items()}
        for m, mask in masks.items():
            np.testing.assert_array_equal(mask.sum(axis=0), np.full(C, kk), err_msg=m)
        # the two threshold formulations select the same positions from the same keys
        np.testing.assert_array_equal(masks["topk_threshold"], masks["sort_threshold"])
        # default (static and traced rate) is the Feistel formulation
        np.testing.assert_array_equal(np.asarray(traced(k, rate)), masks["feistel"])
        np.testing.assert_array_equal(np.asarray(A._dropout_drop(k, L, C, rate)), masks["feistel"])


def test_dropout_without_feistel_factors_uses_the_key_threshold():
    length = 4999  # prime: no divisor pair >= 8, so no Feistel network
    assert A._feistel_factors(length) is None
    k = jax.random.key(5)
    static = np.asarray(A._dropout_drop(k, length, C, 0.1))
    traced = np.asarray(jax.jit(lambda r: A._dropout_drop(k, length, C, r))(0.1))
    np.testing.assert_array_equal(
        static.sum(axis=0), np.full(C, int(np.floor(np.float32(0.1) * length)))
    )
    np.testing.assert_array_equal(static, np.asarray(A._drop_topk_threshold(k, length, C, 499)))
    np.testing.assert_array_equal(traced, static)


@pytest.mark.parametrize("length", [5000, 2500, 1000, 64])
def test_feistel_rank_is_a_permutation_per_lead(length):
    ranks = np.asarray(jax.jit(lambda k: A._feistel_rank(k, length, C))(jax.random.key(length)))
    for c in range(C):
        np.testing.assert_array_equal(np.sort(ranks[c]), np.arange(length))
    assert len({tuple(r) for r in ranks}) == C  # a different permutation per lead


def test_feistel_dropout_statistics():
    # L = 100 (10 x 10 Feistel), k = 10: each position with frequency 1/10, pairs with
    # k(k-1)/(L(L-1)) (as for a uniformly random 10-subset), for neighbours and far pairs.
    x = jnp.ones((100, 1))
    ys = jax.jit(jax.vmap(lambda k: A.dropout_mask(k, x, 0.1)))(keys(20000, seed=17))
    d = np.asarray(ys)[:, :, 0] == 0
    assert np.all(d.sum(axis=1) == 10)
    assert np.all(np.abs(d.mean(axis=0) - 0.1) < 0.012)
    pair = 10 * 9 / (100 * 99)
    for lag in (1, 7, 10, 50):
        both = (d[:, :-lag] & d[:, lag:]).mean(axis=0)
        assert abs(both.mean() - pair) < 0.001, lag
    # a prime length has no Feistel factorisation: the top_k fallback is exact too
    y = np.asarray(jax.jit(lambda k: A.dropout_mask(k, jnp.ones((997, 3)), 0.1))(jax.random.key(0)))
    np.testing.assert_array_equal((y == 0).sum(axis=0), [99, 99, 99])


def test_dropout_positions_uniform():
    # L = 20, rate 0.25 -> 5 positions per lead; each position dropped with frequency 1/4.
    x = jnp.ones((20, 2))
    ys = jax.jit(jax.vmap(lambda k: A.dropout_mask(k, x, 0.25)))(keys(4000, seed=7))
    freq = (np.asarray(ys) == 0).mean(axis=0)
    assert np.all(np.abs(freq - 0.25) < 0.035)


# ---------------------------------------------------------------- zero mask


@pytest.mark.parametrize("ratio", [0.1, 0.333])
def test_zero_mask_one_window_per_lead(xs, ratio):
    ys = np.asarray(batched(A.zero_mask, ratio)(keys(2, seed=1), xs))
    x = np.asarray(xs)
    w = int(np.floor(ratio * L))
    starts = []
    for b in range(2):
        for c in range(C):
            runs = zero_runs(ys[b, :, c])
            assert len(runs) == 1 and runs[0][1] == w
            s = runs[0][0]
            assert 0 <= s <= L - w
            starts.append(s)
            keep = np.ones(L, bool)
            keep[s : s + w] = False
            np.testing.assert_array_equal(ys[b, keep, c], x[b, keep, c])
    assert len(set(starts)) > 1  # independent windows per lead / example


def test_zero_mask_start_uniform_and_traced():
    x = jnp.ones((10, 1))
    ys = np.asarray(jax.jit(jax.vmap(lambda k: A.zero_mask(k, x, 0.3)))(keys(6000, seed=8)))
    starts = np.argmax(ys[:, :, 0] == 0, axis=1)
    counts = np.bincount(starts, minlength=10)
    assert counts[8:].sum() == 0  # start in [0, L - window] = [0, 7]
    assert np.all(np.abs(counts[:8] / 6000 - 1 / 8) < 0.025)
    y = np.asarray(jax.jit(A.zero_mask)(jax.random.key(0), jnp.ones((L, C)), 0.1))  # traced ratio
    assert all(zero_runs(y[:, c]) and zero_runs(y[:, c])[0][1] == 500 for c in range(C))


# ---------------------------------------------------------------- permutation


def segment_perm(x, y, m):
    """The permutation p with y segment i == x segment p[i] (per lead), or None."""
    s = x.shape[0] // m
    segs_x = [x[i * s : (i + 1) * s] for i in range(m)]
    perm = []
    for i in range(m):
        hits = [j for j in range(m) if np.array_equal(y[i * s : (i + 1) * s], segs_x[j])]
        if len(hits) != 1:
            return None
        perm.append(hits[0])
    return perm


def test_permute_per_lead_preserves_segments(xs):
    m = 5
    ys = np.asarray(batched(A.permute_segments, m)(keys(2, seed=4), xs))
    x = np.asarray(xs)
    perms = set()
    for b in range(2):
        for c in range(C):
            p = segment_perm(x[b, :, c], ys[b, :, c], m)
            assert p is not None and sorted(p) == list(range(m))
            perms.add(tuple(p))
    assert len(perms) > 1  # independent per lead by default


def test_permute_shared_keeps_leads_synchronous(xs):
    m = 10
    ys = np.asarray(batched(A.permute_segments, m, True)(keys(2, seed=4), xs))
    x = np.asarray(xs)
    for b in range(2):
        p = segment_perm(x[b], ys[b], m)  # whole (segment, 12 leads) blocks move together
        assert p is not None and sorted(p) == list(range(m)) and p != list(range(m))


def test_permute_uniform_over_permutations():
    x = jnp.arange(3, dtype=jnp.float32)[:, None] + 1
    ys = np.asarray(jax.jit(jax.vmap(lambda k: A.permute_segments(k, x, 3)))(keys(6000, seed=9)))
    perms = [tuple(r) for r in ys[:, :, 0].astype(int)]
    counts = {p: perms.count(p) for p in itertools.permutations([1, 2, 3])}
    assert all(abs(n / 6000 - 1 / 6) < 0.025 for n in counts.values())


def test_permute_requires_divisible_length(xs):
    with pytest.raises(UserError, match="num_segments=7 does not divide"):
        A.permute_segments(jax.random.key(0), xs[0], 7)
    # a traced count cannot raise: the result is NaN, never a silently wrong permutation
    assert np.isnan(np.asarray(jax.jit(A.permute_segments)(jax.random.key(0), xs[0], 7))).all()
    assert np.isnan(
        np.asarray(jax.jit(A.permute_segments)(jax.random.key(0), xs[0], 5.5))
    ).all()  # not 5


@pytest.mark.parametrize("shared", [False, True])
def test_permute_with_traced_count_equals_static(xs, shared):
    # the signature under a plain jax.jit: num_segments traced, a general path
    f = jax.jit(A.permute_segments, static_argnums=3)
    for i, m in enumerate((1, 2, 5, 50, 5000)):
        k, x = jax.random.key(100 + i), xs[i % 2]
        np.testing.assert_array_equal(
            np.asarray(f(k, x, m, shared)), np.asarray(A.permute_segments(k, x, m, shared))
        )
    # vmapped over per-example counts
    ms, ks = jnp.array([2, 5]), keys(2, seed=4)
    ys = jax.vmap(lambda k, x, m: A.permute_segments(k, x, m, shared))(ks, xs, ms)
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(ys[i]), np.asarray(A.permute_segments(ks[i], xs[i], int(ms[i]), shared))
        )


# ---------------------------------------------------------------- time warp


@pytest.mark.parametrize("m,w", [(4, 0.2), (10, 0.35), (2, 0.0)])
def test_time_warp_fixed_choices_match_numpy(xs, m, w):
    st = np.asarray(jax.vmap(lambda k: A._random_half(k, m, C))(keys(2, seed=m)))
    assert np.all(st.sum(axis=1) == m // 2)
    fused = jax.jit(jax.vmap(lambda x, s: A._time_warp_fixed(x, m, w, s)))(xs, st)
    traced_w = jax.jit(jax.vmap(lambda x, s, ww: A._time_warp_fixed(x, m, ww, s), (0, 0, None)))(
        xs, st, w
    )
    for b in range(2):
        ref = np_time_warp(np.asarray(xs[b], np.float64), m, w, st[b])
        np.testing.assert_allclose(np.asarray(fused[b]), ref, atol=2e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(traced_w[b]), ref, atol=2e-5, rtol=0)


def test_time_warp_public_is_a_valid_warp_per_lead(xs):
    m, w = 4, 0.2
    ys = np.asarray(batched(A.time_warp, m, w)(keys(2, seed=12), xs))
    choices = [np.isin(np.arange(m), c) for c in itertools.combinations(range(m), m // 2)]
    picked = set()
    for b in range(2):
        x = np.asarray(xs[b], np.float64)
        for c in range(C):
            matches = []
            for i, ch in enumerate(choices):
                ref = np_time_warp(x[:, c : c + 1], m, w, ch[:, None])[:, 0]
                if np.max(np.abs(ys[b, :, c] - ref)) < 2e-5:
                    matches.append(i)
            assert len(matches) == 1, (b, c, matches)
            picked.add(matches[0])
    assert len(picked) > 1  # the stretched half is drawn per lead


def test_time_warp_bad_params(xs):
    for m, w, msg in [(3, 0.2, "even"), (6, 0.2, "does not divide"), (4, 1.0, r"\[0, 1\)")]:
        with pytest.raises(UserError, match=msg):
            A.time_warp(jax.random.key(0), xs[0], m, w)
    # traced counts cannot raise: NaN, never a silently wrong warp
    for m, w in [
        (3, 0.2),
        (6, 0.2),
        (5000, 0.2),
        (4.5, 0.2),
    ]:  # odd; not a divisor; squeezed to nothing; not whole
        assert np.isnan(np.asarray(jax.jit(A.time_warp)(jax.random.key(0), xs[0], m, w))).all(), (
            m,
            w,
        )


def test_time_warp_with_traced_count_equals_static(xs):
    # the signature under a plain jax.jit: num_segments (and warp) traced, a general path; the same
    # segment choices and indices, values to float32 rounding (the static path's jit and eager differ as much)
    for i, (m, w) in enumerate([(4, 0.2), (2, 0.0), (10, 0.35), (50, 0.5)]):
        k, x = jax.random.key(200 + i), xs[i % 2]
        want = np.asarray(A.time_warp(k, x, m, w))
        np.testing.assert_allclose(
            np.asarray(jax.jit(A.time_warp)(k, x, m, w)), want, rtol=0, atol=1e-6
        )
        # warp static, count traced
        got = jax.jit(lambda k, x, m, w=w: A.time_warp(k, x, m, w))(k, x, m)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
    ms, ks = jnp.array([4, 10]), keys(2, seed=5)
    ys = jax.vmap(A.time_warp, in_axes=(0, 0, 0, None))(ks, xs, ms, 0.2)
    for i in range(2):
        np.testing.assert_allclose(
            np.asarray(ys[i]),
            np.asarray(A.time_warp(ks[i], xs[i], int(ms[i]), 0.2)),
            rtol=0,
            atol=1e-6,
        )


# ---------------------------------------------------------------- fresh randomness, dispatcher

OPS = [
    ("gaussian_noise", 0.05),
    ("dropout", 0.1),
    ("zero_mask", 0.1),
    ("permute", 5),
    ("permute_shared", 5),
    ("time_warp", (4, 0.2)),
]


def test_fresh_randomness_per_key(xs):
    f = jax.jit(lambda k: [A.apply(name, k, xs[0], param) for name, param in OPS])
    out1, out2, again = f(jax.random.key(1)), f(jax.random.key(2)), f(jax.random.key(1))
    for (name, _), a, b, c in zip(OPS, out1, out2, again):
        assert not np.array_equal(np.asarray(a), np.asarray(b)), name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c), err_msg=name)


def test_apply_aliases_match_direct_calls(xs):
    def both(k, x):
        via_apply = [
            A.apply("guassian_noise", k, x, 0.05),
            A.apply("zero-masking", k, x, 0.1),
            A.apply("permutation", k, x, 5),
            A.apply("permute", k, x, (5, True)),
            A.apply("time-wraping", k, x, (4, 0.2)),
            A.apply("dropout", k, x, None),  # None = the default 0.1
            A.apply("none", k, x, None),
        ]
        direct = [
            A.gaussian_noise(k, x, 0.05),
            A.zero_mask(k, x, 0.1),
            A.permute_segments(k, x, 5),
            A.permute_segments(k, x, 5, shared_across_leads=True),
            A.time_warp(k, x, 4, 0.2),
            A.dropout_mask(k, x, 0.1),
            x,
        ]
        return via_apply, direct

    via_apply, direct = jax.jit(both)(jax.random.key(3), xs[0])
    for i, (a, b) in enumerate(zip(via_apply, direct)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(i))


def test_apply_and_validate_errors():
    with pytest.raises(UserError, match=r"unknown augmentation 'blur'.*gaussian_noise.*time_warp"):
        A.apply("blur", jax.random.key(0), jnp.ones((L, C)), 1)
    bad = [
        (("permute", 7, 5000), "does not divide"),
        (("permute", 5.5, 5000), "integer"),
        (("time_warp", (4, 0.2), 2502), "does not divide"),
        (("time_warp", 0.2, 5000), r"\(time_warp\): num_segments must be an integer \(got 0.2\)"),
        (("dropout", 1.5, 5000), r"\[0, 1\]"),
        (("gaussian_noise", -1, 5000), r"\(gaussian_noise\): factor must be in \[0, inf\]"),
        (("mix", (0.1, 0.05, 3), 5000), r"\(mix\): takes at most 2 parameter"),
    ]
    for args, msg in bad:
        with pytest.raises(UserError, match=msg) as e:
            A.validate(*args, field="config.augment.aug1")
        assert str(e.value).startswith("config.augment.aug1: ") and "\n" not in str(e.value)
    assert A.validate("time-wraping", [4, 0.2], 2500) == ("time_warp", (4, 0.2))
    assert A.validate("permutation", 5.0, 2500) == ("permute", (5, False))
    assert A.validate("mix", None, 5000) == ("mix", (0.1, 0.05))
    # a prefix of the parameters: the rest take their defaults
    assert A.validate("mix", 0.2, 5000) == ("mix", (0.2, 0.05))
    assert A.validate("time_warp", 6, 5004) == ("time_warp", (6, 0.2))


# ---------------------------------------------------------------- mix and two_views


def test_mix_exact_half(xs):
    b, rate = 6, 0.1
    batch = jnp.concatenate([xs, xs, xs])[:, :1000]  # (6, 1000, 12)
    out = np.asarray(jax.jit(lambda k, x: A.mix(k, x, rate, 0.05))(jax.random.key(0), batch))
    x = np.asarray(batch)
    is_drop = []
    for i in range(b):
        zeros = (out[i] == 0).sum(axis=0)
        if zeros.sum():
            np.testing.assert_array_equal(zeros, np.full(C, 100))
            keep = out[i] != 0
            np.testing.assert_array_equal(out[i][keep], x[i][keep])
            is_drop.append(True)
        else:
            assert not np.allclose(out[i], x[i])  # noised
            is_drop.append(False)
    assert sum(is_drop) == b // 2


def test_mix_depends_on_global_index_not_order(xs):
    batch = jnp.concatenate([xs, xs, xs, xs])[:, :500]  # (8, 500, 12)
    gi = jnp.arange(100, 108)
    f = jax.jit(lambda k, x, g: A.mix(k, x, 0.1, 0.05, g))
    k = jax.random.key(4)
    out = np.asarray(f(k, batch, gi))
    perm = np.random.default_rng(1).permutation(8)
    out_p = np.asarray(f(k, batch[perm], gi[perm]))
    np.testing.assert_array_equal(out_p, out[perm])
    # the choice of the dropout half changes with the key
    halves = {
        tuple((np.asarray(f(jax.random.key(s), batch, gi)) == 0).any(axis=(1, 2))) for s in range(6)
    }
    assert len(halves) > 1


AUG_PAIRS = [
    (("time_warp", (4, 0.2)), ("dropout", 0.1)),
    (("zero_mask", 0.1), ("permute_shared", 5)),
]


@pytest.mark.parametrize("aug1,aug2", AUG_PAIRS)
def test_two_views_invariant_to_batch_split(xs, aug1, aug2):
    batch = jnp.concatenate([xs, xs[::-1]])[:, :1000]  # (4, 1000, 12)
    gi = jnp.array([10, 11, 12, 13], jnp.int32)
    f = jax.jit(lambda k, x, g: A.two_views(k, x, g, aug1, aug2))
    k = jax.random.key(7)
    v1, v2 = f(k, batch, gi)
    a1, a2 = f(k, batch[:2], gi[:2])
    b1, b2 = f(k, batch[2:], gi[2:])
    np.testing.assert_array_equal(np.asarray(v1), np.concatenate([a1, b1]))
    np.testing.assert_array_equal(np.asarray(v2), np.concatenate([a2, b2]))
    # same ECG at different global indices, and the two views, get different randomness
    c1, _ = f(k, batch[:2], gi[1:3])  # the same ECGs at other global indices
    assert not np.array_equal(np.asarray(v1[:2]), np.asarray(c1))
    assert not np.array_equal(np.asarray(v1), np.asarray(v2))


SHARDED_PAIRS = [
    (("mix", (0.1, 0.05)), ("time_warp", (4, 0.2))),
    (
        "baseline_wander@0.5|lead_mask:2|random_resized_crop:0.6,0.9@0.7|mix@0.5",
        "vcg_rotate_scale|muscle_noise:0.2@0.5|powerline|amplitude_scale:0.5,2,1@0.5",
    ),
]


@pytest.mark.parametrize("aug1,aug2", SHARDED_PAIRS)
def test_two_views_sharded_equals_single_device(xs, aug1, aug2):
    devs = np.array(jax.devices()[:8])
    if len(devs) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    batch = jnp.concatenate([xs] * 4)[:, :500]  # (8, 500, 12)
    gi = jnp.arange(8, dtype=jnp.int32) + 16
    f = jax.jit(lambda k, x, g: A.two_views(k, x, g, aug1, aug2))
    k = jax.random.key(5)
    ref = f(k, batch, gi)
    mesh = Mesh(devs, ("data",))
    xb = jax.device_put(batch, NamedSharding(mesh, P("data")))
    gb = jax.device_put(gi, NamedSharding(mesh, P("data")))
    out = f(k, xb, gb)
    for r, o in zip(ref, out):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(r))


def test_two_views_bad_config(xs):
    with pytest.raises(UserError, match="augment.aug2: step 1: unknown augmentation 'rotate'"):
        A.two_views(jax.random.key(0), xs, jnp.arange(2), ("dropout", 0.1), ("rotate", 1))


def test_fft_magnitude(xs):
    out = np.asarray(jax.jit(jax.vmap(A.fft_magnitude))(xs))
    ref = np.abs(np.fft.rfft(np.asarray(xs, np.float64), axis=1))[:, : L // 2]
    assert out.shape == (2, 2500, C)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- the new ops against NumPy float64 references

LS = 500  # short signals: 1 s at 500 Hz
FS = 500.0


@pytest.fixture(scope="module")
def xs_short(xs):
    return xs[:, :LS]


def _std(x):
    return x.std(axis=0, ddof=1, keepdims=True)


def np_baseline_wander(key, x, amp, lo, hi, k):
    f, a, phi = (
        np.asarray(v, np.float64) for v in A._baseline_wander_draw(key, x.shape[1], amp, lo, hi, k)
    )
    t = np.arange(x.shape[0])[:, None] / FS
    wander = sum(a[i] * np.sin(2 * np.pi * f[i] * t + phi[i]) for i in range(k))
    return x + _std(x) * wander


def np_powerline(key, x, amp, harmonics):
    f0, a, phi = (
        np.asarray(v, np.float64) for v in A._powerline_draw(key, x.shape[1], amp, harmonics)
    )
    t = np.arange(x.shape[0]) / FS
    hum = sum(np.sin(2 * np.pi * h * f0 * t + phi[h - 1]) / h for h in range(1, harmonics + 1))
    return x + hum[:, None] * a[None, :] * _std(x)


def np_muscle_noise(key, x, amp, lo, hi):
    length, leads = x.shape
    z = np.asarray(A._normal(key, length * leads), np.float64).reshape(length, leads)
    spec = np.fft.rfft(z, axis=0)
    f = np.fft.rfftfreq(length, 1 / FS)
    spec[(f < lo) | (f > hi)] = 0
    n = np.fft.irfft(spec, n=length, axis=0)
    return x + amp * _std(x) * n / _std(n)


def np_amplitude_scale(key, x, lo, hi, per_lead):
    s = np.asarray(jax.random.uniform(key, (x.shape[1] if per_lead else 1,), minval=lo, maxval=hi))
    return x * s.astype(np.float64)[None, :]


def np_random_resized_crop(key, x, lo, hi):
    w, s0 = (int(v) for v in A._crop_draw(key, x.shape[0], lo, hi))
    u = np.linspace(s0, s0 + w - 1, x.shape[0])
    return np.stack([np.interp(u, np.arange(x.shape[0]), x[:, c]) for c in range(x.shape[1])], 1)


def np_lead_mask(key, x, k):
    n = k if k >= 1 else int(np.floor(k * x.shape[1]))
    drop = np.asarray(A._lead_mask_draw(key, x.shape[1], n))
    return np.where(drop[None, :], 0.0, x)


def np_rotation(ax, ay, az):
    c, s = np.cos, np.sin
    rx = np.array([[1, 0, 0], [0, c(ax), -s(ax)], [0, s(ax), c(ax)]])
    ry = np.array([[c(ay), 0, s(ay)], [0, 1, 0], [-s(ay), 0, c(ay)]])
    rz = np.array([[c(az), -s(az), 0], [s(az), c(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def np_vcg_rotate_scale(key, x, angle, max_scale):
    angles, scales = (np.asarray(v, np.float64) for v in A._vcg_draw(key, angle, max_scale))
    idx = [ecgcl_jax.LEADS.index(n) for n in ("V1", "V2", "V3", "V4", "V5", "V6", "I", "II")]
    v = A.INVERSE_DOWER @ x[:, idx].T  # (3, L)
    y8 = A.DOWER @ (np.diag(scales) @ np_rotation(*angles) @ v)  # (8, L): V1..V6, I, II
    lead_i, lead_ii = y8[6], y8[7]
    derived = [
        lead_ii - lead_i,
        -(lead_i + lead_ii) / 2,
        lead_i - lead_ii / 2,
        lead_ii - lead_i / 2,
    ]
    return np.stack(
        [lead_i, lead_ii, *derived, *y8[:6]], axis=1
    )  # I, II, III, aVR, aVL, aVF, V1..V6


NEW_OPS = [  # (function, parameters, NumPy reference)
    (A.baseline_wander, (0.5, 0.1, 0.9, 3), np_baseline_wander),
    (A.powerline, (0.3, 4), np_powerline),
    (A.muscle_noise, (0.2, 20.0, 150.0), np_muscle_noise),
    (A.amplitude_scale, (0.5, 2.0, False), np_amplitude_scale),
    (A.amplitude_scale, (0.5, 2.0, True), np_amplitude_scale),
    (A.random_resized_crop, (0.3, 0.9), np_random_resized_crop),
    (A.lead_mask, (3,), np_lead_mask),
    (A.lead_mask, (0.5,), np_lead_mask),
    (A.vcg_rotate_scale, (45.0, 1.5), np_vcg_rotate_scale),
]
NEW_IDS = [f"{f.__name__}{p}" for f, p, _ in NEW_OPS]


@pytest.mark.parametrize("fn,params,ref", NEW_OPS, ids=NEW_IDS)
def test_new_op_matches_numpy_reference_under_jit_and_vmap(xs_short, fn, params, ref):
    ks = keys(2, seed=11)
    out = np.asarray(batched(fn, *params)(ks, xs_short))
    assert out.dtype == np.float32 and out.shape == xs_short.shape
    x = np.asarray(xs_short, np.float64)
    for i in range(2):
        want = ref(ks[i], x[i], *params)
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=2e-5 * np.abs(want).max())
        # eager, one ECG: the same values (vmap and jit change nothing)
        np.testing.assert_allclose(
            np.asarray(fn(ks[i], xs_short[i], *params)), out[i], rtol=1e-6, atol=1e-6
        )
    assert not np.allclose(
        out[0] - x[0], out[1] - x[1]
    )  # fresh randomness per key (same ECG shape)
    again = np.asarray(batched(fn, *params)(keys(2, seed=11), xs_short))
    np.testing.assert_array_equal(again, out)
    # every parameter has a default
    assert np.asarray(fn(ks[0], xs_short[0])).shape == xs_short[0].shape


def test_dower_matrices_are_the_published_pair():
    # the inverse Dower matrix is the pseudo-inverse of the Dower matrix, to its 3 published decimals
    np.testing.assert_allclose(A.INVERSE_DOWER, np.linalg.pinv(A.DOWER), atol=1.5e-3)
    assert A.DOWER.shape == (8, 3) and A.INVERSE_DOWER.shape == (3, 8)


# ---------------------------------------------------------------- statistics of the new ops' randomness


N_KEYS = 2000


def _draws(fn, *args):
    return [np.asarray(v) for v in jax.vmap(lambda k: fn(k, *args))(keys(N_KEYS, seed=5))]


def _spread(v, lo, hi):
    """Within [lo, hi] and spread over it: every tenth of the range is hit."""
    assert v.min() >= lo and v.max() <= hi
    hist = np.histogram(v, bins=10, range=(lo, hi))[0]
    assert hist.min() > 0.5 * v.size / 10, hist


def test_baseline_wander_statistics(xs_short):
    f, a, phi = _draws(A._baseline_wander_draw, 12, 0.4, 0.1, 0.7, 3)
    _spread(f, 0.1, 0.7)
    _spread(a, 0.0, 0.4)
    _spread(phi, 0.0, 2 * np.pi)
    # the added wander of a whole ECG has its spectrum below 1 Hz
    x = np.zeros((5000, 2), np.float32)
    x[::50] = 1.0  # a spiky signal with std > 0
    y = np.asarray(A.baseline_wander(jax.random.key(0), x, 0.5, 0.2, 0.6, 2)) - x
    power = np.abs(np.fft.rfft(y * np.hanning(5000)[:, None], axis=0)) ** 2  # Hann: little leakage
    f = np.fft.rfftfreq(5000, 1 / FS)
    assert power[f > 1.0].sum() < 1e-5 * power.sum()


def test_powerline_statistics():
    f0, a, phi = _draws(A._powerline_draw, 12, 0.3, 2)
    assert set(np.unique(f0)) == {50, 60}
    p60 = (f0 == 60).mean()
    assert abs(p60 - 0.5) < 4 * np.sqrt(0.25 / N_KEYS)
    _spread(a, 0.0, 0.3)
    _spread(phi, 0.0, 2 * np.pi)
    # the added hum sits exactly at h f0 (1 Hz bins over 1 s)
    x = np.zeros((LS, 3), np.float32)
    x[::7] = 1.0
    for s in range(4):
        k = jax.random.key(s)
        hum = np.asarray(A.powerline(k, x, 0.3, 2)) - x
        f0 = int(A._powerline_draw(k, 3, 0.3, 2)[0])
        power = (np.abs(np.fft.rfft(hum, axis=0)) ** 2).sum(axis=1)
        assert set(np.flatnonzero(power > 1e-6 * power.max())) == {f0, 2 * f0}


def test_muscle_noise_statistics(xs_short):
    lo, hi, amp = 30.0, 120.0, 0.3
    ys = np.asarray(batched(A.muscle_noise, amp, lo, hi)(keys(2), xs_short))
    n = ys - np.asarray(xs_short, np.float64)
    power = np.abs(np.fft.rfft(n, axis=1)) ** 2
    f = np.fft.rfftfreq(LS, 1 / FS)
    inside = (f >= lo) & (f <= hi)
    assert power[:, ~inside].sum() < 1e-8 * power.sum()
    # spread over the band, not at a few bins: each fifth of it holds a share of the power
    per_bin = power[:, inside].sum(axis=(0, 2))
    shares = np.array([c.sum() for c in np.array_split(per_bin, 5)]) / per_bin.sum()
    assert shares.min() > 0.1, shares
    np.testing.assert_allclose(
        n.std(axis=1, ddof=1), amp * np.asarray(xs_short, np.float64).std(axis=1, ddof=1), rtol=1e-4
    )


def test_amplitude_scale_statistics():
    x = np.ones((10, 12), np.float32)
    f = jax.vmap(lambda k: A.amplitude_scale(k, x, 0.7, 1.3, per_lead=True))(keys(N_KEYS))
    s = np.asarray(f)[:, 0, :]
    _spread(s, 0.7, 1.3)
    assert np.abs(np.corrcoef(s[:, 0], s[:, 1])[0, 1]) < 4 / np.sqrt(N_KEYS)  # leads independent
    one = np.asarray(jax.vmap(lambda k: A.amplitude_scale(k, x, 0.7, 1.3))(keys(N_KEYS)))
    assert np.all(one == one[:, :1, :1])  # one factor per ECG
    _spread(one[:, 0, 0], 0.7, 1.3)


def test_random_resized_crop_statistics():
    lo, hi = 0.3, 0.8
    w, s0 = _draws(A._crop_draw, LS, lo, hi)
    _spread(w / LS, np.ceil(lo * LS) / LS, hi)
    assert np.all(s0 >= 0) and np.all(s0 + w <= LS)
    _spread(s0 / (LS - w), 0.0, 1.0)
    # a ramp shows the window: y is linear from s0 to s0 + w - 1
    ramp = np.arange(LS, dtype=np.float32)[:, None]
    for i in range(5):
        k = jax.random.key(i)
        w, s0 = (int(v) for v in A._crop_draw(k, LS, lo, hi))
        y = np.asarray(A.random_resized_crop(k, ramp, lo, hi))[:, 0]
        np.testing.assert_allclose(y, np.linspace(s0, s0 + w - 1, LS), atol=1e-3)


def test_lead_mask_statistics():
    x = np.ones((20, 12), np.float32)
    for k, n in ((3, 3), (0.5, 6), (0.1, 1), (0.05, 0)):
        y = np.asarray(jax.vmap(lambda kk, k=k: A.lead_mask(kk, x, k))(keys(N_KEYS)))
        zero_leads = (y == 0).all(axis=1)
        assert np.all(zero_leads.sum(axis=1) == n) and np.all((y == 0) == zero_leads[:, None, :])
        if n:  # every lead as often
            freq = zero_leads.mean(axis=0)
            assert np.all(np.abs(freq - n / 12) < 5 * np.sqrt(n / 12 / N_KEYS))


def test_vcg_rotate_scale_statistics():
    angles, scales = _draws(A._vcg_draw, 30.0, 1.4)
    _spread(angles, -np.pi / 6, np.pi / 6)
    inv = scales < 1
    assert abs(inv.mean() - 0.5) < 4 * np.sqrt(0.25 / scales.size)
    _spread(scales[~inv], 1.0, 1.4)
    _spread(1 / scales[inv], 1.0, 1.4)
    r = np.asarray(jax.vmap(A.rotation_matrix)(jnp.asarray(angles)), np.float64)
    np.testing.assert_allclose(
        r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape), atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-6)
    np.testing.assert_allclose(r[:50], np.stack([np_rotation(*a) for a in angles[:50]]), atol=1e-6)
    # an ECG that is a dipole (12 leads = Dower projection of a VCG) comes back rotated and scaled as a dipole:
    # the derived leads obey Einthoven's law, and angle 0, scale 1 is the projection D T, not a change
    rng = np.random.default_rng(0)
    x = np.asarray(A._vcg_matrices()[0] @ rng.normal(size=(3, 50)), np.float32).T  # (50, 12)
    y = np.asarray(A.vcg_rotate_scale(jax.random.key(0), x, 0.0, 1.0))
    back, fwd = A._vcg_matrices()
    np.testing.assert_allclose(y, x @ (back @ fwd).T, rtol=1e-5, atol=1e-5)
    y = np.asarray(A.vcg_rotate_scale(jax.random.key(1), x))
    np.testing.assert_allclose(y[:, 2], y[:, 1] - y[:, 0], atol=1e-5)  # III = II - I


# ---------------------------------------------------------------- pipelines: parsing, probability, order, keys


def test_parse_grammar_and_canonical_record():
    p = A.parse("baseline_wander:0.1@0.5|gaussian_noise:0.05|time_warp:4,0.2@0.3", 5000, 12)
    assert p == (
        A.Op("baseline_wander", (0.1, 0.05, 0.5, 2), 0.5),
        A.Op("gaussian_noise", (0.05,)),
        A.Op("time_warp", (4, 0.2), 0.3),
    )
    assert A.parse(A.pipeline_spec(p), 5000, 12) == p  # the canonical spelling round-trips
    assert A.parse(p, 5000, 12) == p
    assert A.parse(" random_resized_crop@0.8 ", 2500, 1) == (
        A.Op("random_resized_crop", (0.5, 1.0), 0.8),
    )
    assert A.parse("3KG", 5000, 12) == (A.Op("vcg_rotate_scale", (45.0, 1.5)),)
    rec = A.pipeline_record(p)
    assert rec["ops"][2] == {
        "op": "time_warp",
        "params": {"num_segments": 4, "warp": 0.2},
        "prob": 0.3,
    }
    # today's single-op spellings: the same ops as before
    assert A.parse("guassian_noise", 5000, 12) == (A.Op("gaussian_noise", (0.05,)),)
    assert A.parse("permute_shared", 5000, 12) == (A.Op("permute", (5, 1)),)
    assert A.parse("permute:5", 5000, 12, permute_shared=True) == (A.Op("permute", (5, 1)),)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("none|time_warp:4,1.5", r"step 2 \(time_warp\): warp must be in \[0, 1\) \(got 1.5\)"),
        ("gaussian_noise@1.5", r"step 1 \(gaussian_noise\): probability must be in \[0, 1\]"),
        ("dropout|", r"step 2 is empty"),
        ("dropout:a", r"step 1: cannot parse parameter 'a'"),
        ("dropout@x", r"step 1: cannot parse probability 'x'"),
        ("dropout@0.5@0.5", r"step 1: expected NAME\[:PARAMS\]\[@PROB\]"),
        ("blur", r"step 1: unknown augmentation 'blur'"),
        ("powerline:0.1,5", r"step 1 \(powerline\): harmonics=5 puts 300 Hz at or above"),
        ("muscle_noise:0.1,100,50", r"low_hz must be < high_hz"),
        ("baseline_wander:0.1,0.05,2", r"max_hz must be in \[0, 1\]"),
        ("amplitude_scale:2,1", r"low must be <= high"),
        ("amplitude_scale:1,2,0.5", r"per_lead must be 0 or 1"),
        ("random_resized_crop:0,1", r"min_frac must be in \(0, 1\]"),
        ("lead_mask:12", r"k=12 would zero every lead of a 12-lead view"),
        ("lead_mask:2.5", r"k must be a whole number of leads"),
        ("vcg_rotate_scale:45,0.5", r"max_scale must be in \[1, inf\]"),
        ("lead_mask:1,2", r"takes at most 1 parameter"),
    ],
)
def test_parse_errors_are_one_line_naming_the_field_and_step(spec, msg):
    with pytest.raises(UserError, match=msg) as e:
        A.parse(spec, 5000, 12, field="config.augment.view1")
    assert str(e.value).startswith("config.augment.view1: step ") and "\n" not in str(e.value)


def test_probability_applies_to_a_binomial_fraction_of_examples():
    b, p = 400, 0.3
    x = jnp.ones((b, 8, 2), jnp.float32)
    v1, v2 = jax.jit(
        lambda k, x: A.two_views(k, x, jnp.arange(b), f"amplitude_scale:2,2@{p}", "lead_mask:1@0")
    )(jax.random.key(0), x)
    v1 = np.asarray(v1)
    hit = (v1 == 2).all(axis=(1, 2))
    assert np.all(hit | (v1 == 1).all(axis=(1, 2)))  # applied whole, or not at all
    assert abs(hit.mean() - p) < 4 * np.sqrt(p * (1 - p) / b)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(x))  # probability 0: the identity


def test_pipeline_is_the_composition_in_written_order(xs_short):
    gi = jnp.array([3, 4], jnp.int32)
    key = jax.random.key(9)
    vk = jax.vmap(lambda k: jax.random.split(k, 2))(A._example_keys(key, gi))[:, 0]

    def op_key(i, j):  # the key of step j of example i's view 1
        return jax.random.split(jax.random.fold_in(vk[i], j))[1]

    def manual(first, second):
        f = jax.jit(lambda k0, k1, x: second(k1, first(k0, x)))
        return np.stack([np.asarray(f(op_key(i, 0), op_key(i, 1), xs_short[i])) for i in range(2)])

    def warp(k, x):
        return A.time_warp(k, x, 4, 0.2)

    def noise(k, x):
        return A.muscle_noise(k, x, 0.5)

    def view1(spec):
        return np.asarray(
            jax.jit(lambda k, x: A.two_views(k, x, gi, spec, "none")[0])(key, xs_short)
        )

    ab, ba = view1("time_warp|muscle_noise:0.5"), view1("muscle_noise:0.5|time_warp")
    np.testing.assert_allclose(ab, manual(warp, noise), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ba, manual(noise, warp), rtol=1e-6, atol=1e-6)
    assert not np.allclose(ab, ba, atol=1e-3)


def test_single_op_views_keep_their_keys(xs_short):
    """A single op without '@' (today's spelling) draws from the view key itself, as before pipelines."""
    gi = jnp.array([7, 2], jnp.int32)
    key = jax.random.key(4)
    vk = jax.vmap(lambda k: jax.random.split(k, 2))(A._example_keys(key, gi))
    for spec, fn in [
        ("gaussian_noise:0.05", lambda k, x: A.gaussian_noise(k, x, 0.05)),
        ("time-wraping:4,0.2", lambda k, x: A.time_warp(k, x, 4, 0.2)),
        ("permute", lambda k, x: A.permute_segments(k, x, 5)),
        ("lead_mask:2", lambda k, x: A.lead_mask(k, x, 2)),
    ]:
        v1, v2 = A.two_views(key, xs_short, gi, spec, spec)
        np.testing.assert_array_equal(np.asarray(v1), np.asarray(jax.vmap(fn)(vk[:, 0], xs_short)))
        np.testing.assert_array_equal(np.asarray(v2), np.asarray(jax.vmap(fn)(vk[:, 1], xs_short)))
