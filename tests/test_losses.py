"""Losses against float64 NumPy computations of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.metrics import log_loss

from ecgcl_jax import losses, parallel

TEMPS = [0.01, 0.03, 0.07, 0.2, 0.5, 1.0]


def np_nt_xent_spec(a, b, t):
    """The reference: unit rows, z = [a; b], s = z z^T / t, diagonal -> very negative, CE with target i+N / i."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = a.shape[0]
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / t
    np.fill_diagonal(s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    logp = s - (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))
    target = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return -logp[np.arange(2 * n), target].mean()


def np_nt_xent_ids(a, b, t, ids):
    """Patient positives: loss_i = -(1/|P(i)|) sum_{p in P(i)} log(exp(s_ip) / sum_{k != i} exp(s_ik)), mean over 2N."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / t
    ids2 = np.concatenate([ids, ids])
    r = len(z)
    total = 0.0
    for i in range(r):
        others = [k for k in range(r) if k != i]
        m = s[i, others].max()
        log_den = m + np.log(np.sum(np.exp(s[i, others] - m)))
        pos = [p for p in others if ids2[p] == ids2[i]]
        total += -np.mean([s[i, p] - log_den for p in pos])
    return total / r


def rand(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def rel(x, y):
    return abs(float(x) - float(y)) / abs(float(y))


nt_xent = jax.jit(losses.nt_xent)


@pytest.mark.parametrize("t", TEMPS)
def test_nt_xent_matches_float64_spec(t):
    a, b = rand((16, 32), 0), rand((16, 32), 1)
    b = a + 2.0 * b  # correlated views; the loss stays O(1) at every temperature
    assert rel(nt_xent(a, b, t), np_nt_xent_spec(a, b, t)) < 1e-4
    assert rel(nt_xent(b, a, t), nt_xent(a, b, t)) < 1e-5  # symmetric in (a, b)


def test_nt_xent_nearly_identical_rows_at_t001():
    base = rand((1, 64), 2)
    a = base + 1e-3 * rand((12, 64), 3)
    b = base + 1e-3 * rand((12, 64), 4)
    t = 0.01
    val, (ga, gb) = jax.jit(jax.value_and_grad(losses.nt_xent, argnums=(0, 1)), static_argnums=2)(
        a, b, t
    )
    assert np.isfinite(float(val))
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert rel(val, np_nt_xent_spec(a, b, t)) < 1e-4
    ids = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 8])
    val, g = jax.value_and_grad(losses.nt_xent)(a, b, t, ids)
    assert np.isfinite(float(val)) and np.all(np.isfinite(g))
    assert rel(val, np_nt_xent_ids(a, b, t, ids)) < 1e-4


def test_nt_xent_gradient_matches_finite_differences():
    a, b = rand((6, 8), 5), rand((6, 8), 6)
    ids = np.array([0, 1, 1, 2, 3, 3])
    t = 0.1
    ga = np.asarray(jax.grad(losses.nt_xent)(a, b, t, ids))
    eps = 1e-6
    for i, j in [(0, 0), (2, 3), (5, 7)]:
        ap, am = a.astype(np.float64), a.astype(np.float64)
        ap = ap.copy()
        am = am.copy()
        ap[i, j] += eps
        am[i, j] -= eps
        fd = (np_nt_xent_ids(ap, b, t, ids) - np_nt_xent_ids(am, b, t, ids)) / (2 * eps)
        assert abs(ga[i, j] - fd) < 1e-3 * max(1.0, abs(fd))


@pytest.mark.parametrize("t", [0.01, 0.07, 1.0])
def test_nt_xent_with_duplicate_ids(t):
    # three ECGs of patient 7, two of patient 3, the rest distinct
    ids = np.array([7, 1, 7, 3, 7, 4, 3, 5, 6, 9])
    a, b = rand((10, 16), 10), rand((10, 16), 11)
    b = a + 0.7 * b
    ref = np_nt_xent_ids(a, b, t, ids)
    assert rel(nt_xent(a, b, t, jnp.asarray(ids)), ref) < 1e-4
    assert rel(nt_xent(b, a, t, jnp.asarray(ids)), ref) < 1e-4


def test_nt_xent_distinct_ids_equal_plain():
    a, b = rand((12, 16), 12), rand((12, 16), 13)
    ids = np.random.default_rng(0).permutation(100)[:12]
    plain = nt_xent(a, b, 0.07)
    assert rel(nt_xent(a, b, 0.07, jnp.asarray(ids)), plain) < 1e-6
    assert rel(np_nt_xent_ids(a, b, 0.07, ids), np_nt_xent_spec(a, b, 0.07)) < 1e-12


def test_nt_xent_bfloat16_inputs():
    a, b = rand((16, 32), 14), rand((16, 32), 15)
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b + a, jnp.bfloat16)
    out = nt_xent(a16, b16, 0.07)
    assert out.dtype == jnp.float32
    ref = np_nt_xent_spec(np.asarray(a16, np.float64), np.asarray(b16, np.float64), 0.07)
    assert rel(out, ref) < 1e-4
    g = jax.grad(losses.nt_xent)(a16, b16, 0.07)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_clocs_cmsc_is_its_four_terms():
    h = [rand((8, 16), 20 + i) for i in range(4)]
    h = [h[0], h[0] + 0.5 * h[1], h[0] + 0.8 * h[2], h[0] + h[3]]
    ids = np.array([0, 1, 1, 1, 2, 3, 4, 4])
    t = 0.1
    for use_ids in (None, ids):
        got = jax.jit(losses.clocs_cmsc, static_argnums=4)(*h, t, use_ids)
        ref_ids = np.arange(8) if use_ids is None else use_ids
        terms = [(0, 1), (2, 3), (0, 3), (2, 1)]
        ref = sum(np_nt_xent_ids(h[i], h[j], t, ref_ids) for i, j in terms)
        assert rel(got, ref) < 1e-4


@pytest.mark.parametrize("use_ids", [False, True])
def test_multi_view_nt_xent_is_sum_over_pairs(use_ids):
    v, n = 4, 6
    base = rand((n, 16), 30)
    views = np.stack([base + 0.6 * rand((n, 16), 31 + i) for i in range(v)])
    ids = np.array([0, 0, 1, 2, 2, 2]) if use_ids else None
    t = 0.07
    ref_ids = np.arange(n) if ids is None else ids
    pairs = [(i, j) for i in range(v) for j in range(i + 1, v)]
    ref = [np_nt_xent_ids(views[i], views[j], t, ref_ids) for i, j in pairs]
    f = jax.jit(losses.multi_view_nt_xent, static_argnums=3)
    got_sum = f(views, t, None if ids is None else jnp.asarray(ids), "sum")
    got_mean = f(views, t, None if ids is None else jnp.asarray(ids), "mean")
    assert rel(got_sum, sum(ref)) < 1e-4
    assert rel(got_mean, np.mean(ref)) < 1e-4
    # two views: the same as nt_xent
    assert rel(f(views[:2], t, None, "sum"), nt_xent(views[0], views[1], t)) < 1e-5
    g = jax.grad(lambda x: losses.multi_view_nt_xent(x, 0.01))(views)
    assert np.all(np.isfinite(g))


def test_nt_xent_sharded_over_8_devices_with_ids():
    devs = np.array(jax.devices()[:8])
    if len(devs) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    a, b = rand((16, 8), 40), rand((16, 8), 41)
    ids = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11])
    sh = NamedSharding(Mesh(devs, ("data",)), P("data"))
    h = (a, b, b + a, a - b)
    terms = [(0, 1), (2, 3), (0, 3), (2, 1)]
    ref = sum(np_nt_xent_ids(h[i], h[j], 0.07, ids) for i, j in terms)
    out = jax.jit(losses.clocs_cmsc)(
        *(jax.device_put(x, sh) for x in h), 0.07, jax.device_put(jnp.asarray(ids), sh)
    )
    assert rel(out, ref) < 1e-4


def test_bce_with_logits_against_sklearn():
    rng = np.random.default_rng(50)
    logits = rng.normal(scale=3, size=40).astype(np.float32)
    labels = (rng.uniform(size=40) < 0.4).astype(np.float32)
    mask = rng.uniform(size=40) < 0.7
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ref = log_loss(labels, p, labels=[0, 1])
    ref_masked = log_loss(labels[mask], p[mask], labels=[0, 1])
    f = jax.jit(losses.bce_with_logits)
    assert rel(f(logits, labels), ref) < 1e-5
    assert rel(f(logits[:, None], labels), ref) < 1e-5  # (B, 1) logits from a Dense(1) head
    assert rel(f(logits, labels, mask), ref_masked) < 1e-5
    assert rel(f(logits, labels, mask.astype(np.float32)), ref_masked) < 1e-5
    # stable for large logits: log(1 + exp(-|x|)) + max(x, 0) - x y
    big = np.array([100.0, -100.0, 80.0], np.float32)
    y = np.array([0.0, 1.0, 1.0], np.float32)
    np.testing.assert_allclose(float(f(big, y)), (100 + 100 + 0) / 3, rtol=1e-6)
    assert float(f(big, y, np.zeros(3))) == 0.0


def test_clocs_loss_with_patient_ids_same_on_one_and_eight_devices():
    rng = np.random.default_rng(0)
    zs = [rng.normal(size=(16, 8)).astype(np.float32) for _ in range(4)]
    # three ECGs of patient 0
    ids = np.array([0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11], np.int32)
    f = jax.jit(lambda a, b, c, d, i: losses.clocs_cmsc(a, b, c, d, temperature=0.1, ids=i))
    one = float(f(*zs, ids))
    mesh = parallel.make_mesh(8)
    sh = NamedSharding(mesh, P("data"))
    eight = float(f(*[jax.device_put(z, sh) for z in zs], jax.device_put(ids, sh)))
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    # ids that differ change the loss (the positives are really used)
    assert abs(float(f(*zs, jnp.arange(16, dtype=jnp.int32))) - one) > 1e-3
