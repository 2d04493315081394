"""Encoders, projector and classifier: lengths, parameter counts by hand, float64 NumPy forwards, modes, dtypes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ecgcl_jax import hashing, models
from ecgcl_jax.errors import UserError
from tests.conftest import model_fields

CH = (32, 32, 64, 64, 64)
KEYS = {"params": jax.random.key(0, impl="rbg"), "dropout": jax.random.key(1, impl="rbg")}


def cfg(encoder, **kw):
    return models.EncoderConfig(**model_fields(encoder=encoder, **kw))


def shapes_of(module, x, train=False):
    """Variables' shapes without running anything (jax.eval_shape)."""
    return jax.eval_shape(lambda: module.init(KEYS, x, train=train))


def n(tree):
    """Total number of array elements in a pytree of arrays or shapes."""
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------------------------------------------
# Sequence lengths
# ------------------------------------------------------------------------------------------------------------------
def test_trunk_lengths_by_hand():
    # conv: (n + 2*7 - 15)//2 + 1; pool: (n - 15)//2 + 1
    assert models.trunk_lengths(5000, 15, 5) == [2500, 1250, 618, 309, 148, 74, 37]
    assert models.trunk_lengths(2500, 15, 5) == [1250, 625, 306, 153, 70, 35, 18]


@pytest.mark.parametrize(
    "length,want",
    [(5000, [2500, 1250, 618, 309, 148, 74, 37]), (2500, [1250, 625, 306, 153, 70, 35, 18])],
)
def test_trunk_lengths_in_the_module(length, want):
    trunk = models.ConvTrunk(CH, 15, 0.3, residual=False)
    x = jnp.zeros((2, length, 12))

    def run():
        v = trunk.init(KEYS, x, train=False)
        return trunk.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda m, _: isinstance(m, (models.ConvBNAct, models.AvgPool)),
        )

    out, state = jax.eval_shape(run)
    inter = state["intermediates"]
    got = {name: inter[name]["__call__"][0].shape for name in inter}
    order = ["layer_0", "layer_1", "pool_1", "layer_2", "pool_2", "layer_3", "layer_4"]
    assert [got[k][1] for k in order] == want
    assert [got[k][2] for k in order] == [32, 32, 32, 64, 64, 64, 64]
    assert out.shape == (2, want[-1], 64)


# ------------------------------------------------------------------------------------------------------------------
# Parameter counts against a hand computation
# ------------------------------------------------------------------------------------------------------------------
def hand_counts(encoder, emb, proj=128, leads=12, length=5000, k=15, att=0, d_model=64, layers=1):
    """(params, batch_stats) computed from the architecture description (the head count changes nothing)."""
    chans = (leads,) + CH
    conv = sum(k * ci * co for ci, co in zip(chans[:-1], chans[1:]))  # no conv bias
    bn = sum(2 * c for c in CH)  # scale + bias
    stats = sum(2 * c for c in CH)  # mean + var
    dense = lambda i, o: i * o + o  # noqa: E731
    projector = dense(emb, emb) + dense(emb, proj)
    steps = {5000: 37, 2500: 18}[length]
    if encoder == "cnn":
        return conv + bn + dense(steps * 64, emb) + projector, stats
    if encoder == "cnn_transformer":
        d = d_model
        inp = dense(64, d) if d != 64 else 0
        # q,k,v,out; 2 LayerNorms; ff (width d)
        layer = 4 * dense(d, d) + 2 * 2 * d + dense(d, d) + dense(d, d)
        return conv + bn + inp + layers * layer + dense(d, emb) + projector, stats
    h = (
        emb + 1
    ) // 2  # per direction; an odd emb gives a BiLSTM output of emb + 1, which the head maps to emb
    # flax LSTM cell: input kernels without bias, hidden kernels with one bias per gate: 4*h*(in + h + 1)
    lstm = 2 * 4 * h * (64 + h + 1) + (layers - 1) * 2 * 4 * h * (2 * h + h + 1)
    total = conv + bn + lstm + dense(2 * h, emb) + projector
    if encoder == "cnn_attn_lstm":
        a = att or emb
        total += dense(2 * 2 * h, a) + a  # W [q; o_t] + b, v without bias
    if encoder == "res_cnn_lstm":
        total += sum(2 * (k * c * c + 2 * c) for c in CH)  # two stride-1 convs + BN per block
        stats += sum(2 * 2 * c for c in CH)
    return total, stats


def test_cnn_count_matches_the_torch_reference():
    # bench/torch_reference.py --check: 880,384 parameters (BN running stats are buffers, not parameters there)
    v = shapes_of(models.build_encoder(cfg("cnn")), jnp.zeros((2, 5000, 12)))
    assert n(v["params"]) == 880_384


@pytest.mark.parametrize("encoder", models.ENCODERS)
@pytest.mark.parametrize(
    "emb,proj,length,extra",
    [
        (256, 128, 5000, {}),
        (64, 32, 5000, {}),
        (
            64,
            16,
            2500,
            dict(
                lstm_layers=2,
                attention_dim=24,
                transformer_layers=2,
                transformer_d_model=48,
                transformer_heads=4,
            ),
        ),
        (17, 8, 2500, dict(lstm_layers=2)),  # "any emb size": odd too
    ],
)
def test_param_counts(encoder, emb, proj, length, extra):
    model_cfg = cfg(encoder, emb_dim=emb, proj_dim=proj, **extra)
    v = shapes_of(models.build_encoder(model_cfg), jnp.zeros((2, length, 12)))
    want_p, want_s = hand_counts(
        encoder,
        emb,
        proj,
        length=length,
        att=extra.get("attention_dim", 0),
        d_model=extra.get("transformer_d_model", 64),
        layers=extra.get("lstm_layers" if "lstm" in encoder else "transformer_layers", 1),
    )
    assert n(v["params"]) == want_p
    assert n(v["batch_stats"]) == want_s


# ------------------------------------------------------------------------------------------------------------------
# Float64 NumPy forwards (eval mode) of tiny encoders
# ------------------------------------------------------------------------------------------------------------------
def np_conv(x, kern, stride, pad):
    b, length, _ = x.shape
    k = kern.shape[0]
    xp = np.pad(x, ((0, 0), pad, (0, 0)))
    out_len = (length + pad[0] + pad[1] - k) // stride + 1
    return np.stack(
        [
            np.einsum("bjc,jcd->bd", xp[:, t * stride : t * stride + k], kern)
            for t in range(out_len)
        ],
        1,
    )


def np_leaky(x):
    return np.where(x > 0, x, 0.1 * x)


def np_block(x, p, s, stride, k, act=True):
    pad = (k // 2, k // 2) if stride > 1 else ((k - 1) // 2, k - 1 - (k - 1) // 2)
    y = np_conv(x, p["conv"]["kernel"], stride, pad)
    y = (y - s["bn"]["mean"]) / np.sqrt(s["bn"]["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    return np_leaky(y) if act else y


def np_pool(x, w, stride):
    out_len = (x.shape[1] - w) // stride + 1
    return np.stack([x[:, t * stride : t * stride + w].mean(1) for t in range(out_len)], 1)


def np_trunk(x, p, s, k, nconv, residual=False):
    for i in range(nconv):
        x = np_block(x, p[f"layer_{i}"], s[f"layer_{i}"], 2, k)
        if residual:
            r = p[f"res_{i}"], s[f"res_{i}"]
            y = np_block(x, r[0]["a"], r[1]["a"], 1, k)
            y = np_block(y, r[0]["b"], r[1]["b"], 1, k, act=False)
            x = np_leaky(x + y)
        if i in (1, 2):
            x = np_pool(x, k, 2)
    return x


def np_dense(x, p):
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_lstm(x, p, reverse):
    b, t_len, _ = x.shape
    hid = p["hi"]["kernel"].shape[0]
    h, c = np.zeros((b, hid)), np.zeros((b, hid))
    out = np.zeros((b, t_len, hid))
    for t in range(t_len - 1, -1, -1) if reverse else range(t_len):
        z = {
            g: x[:, t] @ p["i" + g]["kernel"] + h @ p["h" + g]["kernel"] + p["h" + g]["bias"]
            for g in "ifgo"
        }
        c = sigmoid(z["f"]) * c + sigmoid(z["i"]) * np.tanh(z["g"])
        h = sigmoid(z["o"]) * np.tanh(c)
        out[:, t] = h
    return out


def np_softmax(z, axis=-1):
    z = z - z.max(axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis, keepdims=True)


def np_layernorm(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def np_transformer_layer(x, p, heads):
    a = p["attention"]
    q, k, v = (
        np.einsum("btd,dhk->bthk", x, a[n]["kernel"]) + a[n]["bias"]
        for n in ("query", "key", "value")
    )
    w = np_softmax(np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1]))
    att = (
        np.einsum("bthk,hkd->btd", np.einsum("bhts,bshk->bthk", w, v), a["out"]["kernel"])
        + a["out"]["bias"]
    )
    x = np_layernorm(x + att, p["norm_1"])
    f = np_dense(np.maximum(np_dense(x, p["ff_1"]), 0), p["ff_2"])
    return np_layernorm(x + f, p["norm_2"])


def np_encoder(c, x, p, s):
    """Float64 NumPy forward of an encoder in eval mode -> (embedding, projection, attention weights or None)."""
    trunk = np_trunk(
        x, p["trunk"], s["trunk"], c.kernel_size, len(c.channels), c.encoder == "res_cnn_lstm"
    )
    w = None
    if c.encoder == "cnn":
        h = trunk.reshape(trunk.shape[0], -1)
    elif c.encoder == "cnn_transformer":
        y = np_dense(trunk, p["input_proj"]) if "input_proj" in p else trunk
        for i in range(c.transformer_layers):
            y = np_transformer_layer(y, p[f"layer_{i}"], c.transformer_heads)
        h = y.mean(1)
    else:
        o = trunk
        for i in range(c.lstm_layers):
            lp = p["lstm"][f"layer_{i}"]
            o = np.concatenate(
                [np_lstm(o, lp["forward"], False), np_lstm(o, lp["backward"], True)], -1
            )
        if c.encoder == "cnn_attn_lstm":
            q = o[:, -1]
            energy = np.tanh(
                np.stack(
                    [
                        np_dense(np.concatenate([q, o[:, t]], -1), p["attention"]["W"])
                        for t in range(o.shape[1])
                    ],
                    1,
                )
            )
            w = np_softmax(np_dense(energy, p["attention"]["v"])[..., 0])
            h = np.einsum("bt,btd->bd", w, o)
        else:
            h = o[:, -1]
    emb = np_leaky(np_dense(h, p["head"]["dense"]))
    z = np_dense(np.maximum(np_dense(emb, p["projector"]["dense_0"]), 0), p["projector"]["dense_1"])
    return emb, z, w


def random_variables(module, *args, seed=0):
    """Variables of `module` drawn with NumPy (no init compilation): kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1),
    and non-trivial BatchNorm scale/bias/mean/var so the eval-mode normalisation is really checked."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: module.init(KEYS, *args, train=False))

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        if "'var'" in name or "'scale'" in name:
            v = rng.uniform(0.5, 1.5, a.shape)
        elif "kernel" in name:
            v = rng.normal(0, 1 / math.sqrt(math.prod(a.shape[:-1])), a.shape)
        else:
            v = rng.normal(0, 0.3 if "bn" in name else 0.1, a.shape)
        return jnp.asarray(v, a.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


TINY = dict(channels=(4, 5, 6, 6, 7), kernel_size=5, dropout=0.2)


@pytest.mark.parametrize(
    "c",
    [
        cfg("cnn", emb_dim=7, proj_dim=3, **TINY),
        cfg("cnn_lstm", emb_dim=6, proj_dim=3, lstm_layers=2, **TINY),
        cfg("cnn_attn_lstm", emb_dim=6, proj_dim=3, attention_dim=5, **TINY),
        cfg(
            "cnn_transformer",
            emb_dim=7,
            proj_dim=3,
            transformer_heads=2,
            transformer_d_model=6,
            **TINY,
        ),
        cfg("res_cnn_lstm", emb_dim=4, proj_dim=3, **TINY),
    ],
    ids=lambda c: c.encoder,
)
def test_encoder_matches_numpy_float64_and_modes(c):
    # lengths 160,80,38,19,8,4,2
    x = np.random.default_rng(1).normal(size=(3, 320, 2)).astype(np.float32)
    model = models.build_encoder(c)
    v = random_variables(model, x)
    keys = jax.random.split(jax.random.key(10, impl="rbg"), 2)

    @jax.jit
    def run(v, x):  # one compilation: eval and train forwards under two dropout keys each
        fwd = lambda train, k: model.apply(
            v,
            x,
            train=train,
            rngs={"dropout": k},  # noqa: E731
            mutable=["batch_stats", "intermediates"],
        )
        return jax.vmap(lambda k: fwd(False, k))(keys), jax.vmap(lambda k: fwd(True, k))(keys)

    ((emb, z), s_eval), ((emb_t, _), s_train) = run(v, x)
    first = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)  # noqa: E731
    s_eval, s_train = first(s_eval), first(s_train)

    p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v)
    want_emb, want_z, want_w = np_encoder(
        c, x.astype(np.float64), p64["params"], p64["batch_stats"]
    )
    np.testing.assert_allclose(emb[0], want_emb, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(z[0], want_z, rtol=2e-4, atol=2e-5)
    if want_w is not None:
        for state in (s_eval, s_train):
            (w,) = state["intermediates"]["attention"]["attention_weights"]
            assert w.shape == (3, 2)
            np.testing.assert_allclose(np.sum(w, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(
            s_eval["intermediates"]["attention"]["attention_weights"][0],
            want_w,
            rtol=2e-4,
            atol=1e-6,
        )
    # eval: no dropout (the key does not matter), running statistics untouched
    np.testing.assert_array_equal(emb[0], emb[1])
    np.testing.assert_array_equal(z[0], z[1])
    jax.tree_util.tree_map(np.testing.assert_array_equal, s_eval["batch_stats"], v["batch_stats"])
    # train: dropout active, every running statistic moves
    assert emb_t.shape == (2, 3, c.emb_dim) and np.isfinite(emb_t).all()
    assert not np.allclose(emb_t[0], emb_t[1])
    for old, new in zip(
        jax.tree_util.tree_leaves(v["batch_stats"]),
        jax.tree_util.tree_leaves(s_train["batch_stats"]),
    ):
        assert not np.allclose(old, new)


@pytest.mark.parametrize("layers", [1, 2])
def test_bilstm_last_step_only_is_the_last_step_of_the_full_output(layers):
    """The last-step path scans only forward in its top layer; same parameters, values and gradients as [:, -1]."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 9, 5)), jnp.float32)
    full, last = models.BiLSTM(4, layers), models.BiLSTM(4, layers, last_step_only=True)
    v = full.init(KEYS, x)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(last.init(KEYS, x))

    def loss(module, take_last):
        def f(v, x):
            o = module.apply(v, x)
            o = o[:, -1] if take_last else o
            return jnp.sum(jnp.sin(3.0 * o)), o

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(v, x)

    (l_full, o_full), g_full = loss(full, True)
    (l_last, o_last), g_last = loss(last, False)
    assert o_last.shape == (3, 8)
    np.testing.assert_allclose(o_last, o_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l_last, l_full, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g_last), jax.tree_util.tree_leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_init_is_float32_and_pytorch_like():
    c = cfg("cnn_attn_lstm", emb_dim=8, proj_dim=3, **TINY)
    model = models.build_encoder(c, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 320, 2))
    v = jax.jit(lambda x: model.init(KEYS, x, train=False))(x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v))
    p = v["params"]
    # PyTorch defaults: conv / linear weights and biases U(+-1/sqrt(fan_in)); LSTM U(+-1/sqrt(hidden)); BN 1 / 0
    for kern, fan_in in [
        (p["trunk"]["layer_0"]["conv"]["kernel"], 5 * 2),
        (p["head"]["dense"]["kernel"], 8),
        (p["head"]["dense"]["bias"], 8),
        (p["lstm"]["layer_0"]["forward"]["hi"]["kernel"], 4),
        (p["lstm"]["layer_0"]["backward"]["hf"]["bias"], 4),
        (p["attention"]["W"]["bias"], 16),
    ]:
        bound = 1 / math.sqrt(fan_in)
        assert np.max(np.abs(kern)) <= bound and np.max(np.abs(kern)) > 0.5 * bound
    np.testing.assert_array_equal(p["trunk"]["layer_2"]["bn"]["scale"], 1.0)
    np.testing.assert_array_equal(v["batch_stats"]["trunk"]["layer_2"]["bn"]["var"], 1.0)
    np.testing.assert_array_equal(v["batch_stats"]["trunk"]["layer_2"]["bn"]["mean"], 0.0)


# ------------------------------------------------------------------------------------------------------------------
# Full-size shapes, train vs eval
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", models.ENCODERS)
def test_full_size_shapes(encoder):
    model = models.build_encoder(cfg(encoder))
    x = jnp.zeros((2, 5000, 12))
    (e, z), state = jax.eval_shape(
        lambda: model.apply(
            model.init(KEYS, x, train=False),
            x,
            train=True,
            rngs={"dropout": KEYS["dropout"]},
            mutable=["batch_stats", "intermediates"],
        )
    )
    assert e.shape == (2, 256) and z.shape == (2, 128)
    if encoder == "cnn_attn_lstm":
        assert state["intermediates"]["attention"]["attention_weights"][0].shape == (2, 37)


def test_full_size_forward_runs():
    model = models.build_encoder(cfg("cnn_attn_lstm"))
    x = jax.random.normal(jax.random.key(3), (2, 5000, 12))

    v = random_variables(model, x)

    @jax.jit
    def run(v, x):
        return model.apply(
            v,
            x,
            train=True,
            rngs={"dropout": KEYS["dropout"]},
            mutable=["batch_stats", "intermediates"],
        )

    (e, z), state = run(v, x)
    assert e.shape == (2, 256) and z.shape == (2, 128)
    assert np.isfinite(e).all() and np.isfinite(z).all()
    (w,) = state["intermediates"]["attention"]["attention_weights"]
    assert w.shape == (2, 37) and np.all(w >= 0)
    np.testing.assert_allclose(np.sum(w, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("encoder", models.ENCODERS)
@pytest.mark.parametrize("emb,proj,leads,length", [(64, 32, 1, 2500), (128, 16, 12, 2500)])
def test_other_sizes_shapes(encoder, emb, proj, leads, length):
    model = models.build_encoder(cfg(encoder, emb_dim=emb, proj_dim=proj))
    x = jnp.zeros((3, length, leads))
    out = jax.eval_shape(
        lambda: model.apply(
            model.init(KEYS, x, train=False),
            x,
            train=True,
            rngs={"dropout": KEYS["dropout"]},
            mutable=["batch_stats"],
        )[0]
    )
    assert out[0].shape == (3, emb) and out[1].shape == (3, proj)


def test_batchnorm_running_stats_torch_momentum():
    block = models.ConvBNAct(3, 5, 2, dropout=0.0)
    x = np.random.default_rng(2).normal(size=(4, 40, 2)).astype(np.float32)
    v = random_variables(block, x)
    v = {
        "params": v["params"],
        "batch_stats": {"bn": {"mean": jnp.full(3, 0.5), "var": jnp.full(3, 2.0)}},
    }
    _, s = block.apply(v, x, train=True, mutable=["batch_stats"])
    y = np_conv(
        x.astype(np.float64), np.asarray(v["params"]["conv"]["kernel"], np.float64), 2, (2, 2)
    )
    # torch momentum 0.1: new = 0.9 * old + 0.1 * batch statistic over (batch, length); flax uses the biased var
    np.testing.assert_allclose(
        s["batch_stats"]["bn"]["mean"], 0.9 * 0.5 + 0.1 * y.mean((0, 1)), rtol=1e-5
    )
    np.testing.assert_allclose(
        s["batch_stats"]["bn"]["var"], 0.9 * 2.0 + 0.1 * y.var((0, 1)), rtol=1e-5
    )
    _, s_eval = block.apply(v, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(s_eval["batch_stats"]["bn"]["mean"], 0.5)


@pytest.mark.parametrize("encoder", ["cnn", "cnn_transformer"])
def test_odd_emb_dim_for_non_lstm_encoders(encoder):
    model = models.build_encoder(cfg(encoder, emb_dim=33, proj_dim=5))
    x = jnp.zeros((2, 5000, 12))
    out = jax.eval_shape(lambda: model.apply(model.init(KEYS, x, train=False), x, train=False))
    assert out[0].shape == (2, 33) and out[1].shape == (2, 5)


@pytest.mark.parametrize("encoder", ["cnn_lstm", "cnn_attn_lstm", "cnn_transformer"])
def test_bfloat16_compute(encoder):
    model = models.build_encoder(cfg(encoder, emb_dim=32, proj_dim=8), dtype="bfloat16")
    f32 = dataclasses.replace(model, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 1000, 12))

    v = random_variables(model, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(shapes_of(model, x)))

    @jax.jit
    def run(v, x):
        # noqa
        fwd = lambda m: m.apply(
            v, x, train=True, rngs={"dropout": KEYS["dropout"]}, mutable=["batch_stats"]
        )
        return fwd(model), fwd(f32)[0][0]

    ((e, z), s), e32 = run(v, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v))
    assert e.dtype == jnp.bfloat16 and z.dtype == jnp.bfloat16
    assert (
        np.isfinite(np.asarray(e, np.float32)).all()
        and np.isfinite(np.asarray(z, np.float32)).all()
    )
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(s))
    # bf16 compute stays close to the float32 model with the same params and dropout mask
    assert np.max(np.abs(np.asarray(e, np.float32) - e32)) < 0.1 * (np.max(np.abs(e32)) + 1e-3)


# ------------------------------------------------------------------------------------------------------------------
# Classifier
# ------------------------------------------------------------------------------------------------------------------
def np_head(e, p, aggregate, linear=False):
    """Float64 classifier head on view embeddings e: (B, V, E) -> logits (B,)."""
    if aggregate in (None, "concat"):
        h = e.reshape(e.shape[0], -1)
    elif aggregate == "sum":
        h = e.sum(1)
    elif aggregate == "mean":
        h = e.mean(1)
    else:
        score = np_dense(np.tanh(np_dense(e, p["view_W"])), p["view_v"])[..., 0]
        h = np.einsum("bv,bve->be", np_softmax(score), e)
    if not linear:
        h = np.maximum(np_dense(h, p["dense_0"]), 0)
    return np_dense(h, p["out"])[..., 0]


@pytest.mark.parametrize(
    "aggregate,views", [(None, 1), ("concat", 2), ("sum", 2), ("mean", 3), ("attention", 2)]
)
def test_classifier_head_matches_numpy(aggregate, views):
    head = models.ClassifierHead(hidden=6, dropout=0.3, aggregate=aggregate)
    e = np.random.default_rng(0).normal(size=(4, views, 5)).astype(np.float32)
    v = random_variables(head, e)
    logits = head.apply(v, e, train=False)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
    np.testing.assert_allclose(
        logits, np_head(e.astype(np.float64), p64, aggregate), rtol=1e-5, atol=1e-6
    )


SMALL = cfg("cnn_attn_lstm", emb_dim=16, proj_dim=8)


@pytest.mark.parametrize(
    "aggregate,views,leads",
    [(None, 1, 12), ("concat", 2, 12), ("sum", 2, 12), ("mean", 4, 1), ("attention", 4, 1)],
)
def test_classifier_shapes_and_param_names(aggregate, views, leads):
    clf = models.Classifier(SMALL, head_dropout=0.3, aggregate=aggregate, num_views=views)
    x = jnp.zeros((5, 2500, leads) if aggregate is None else (5, views, 2500, leads))
    v = jax.eval_shape(lambda: clf.init(KEYS, x, train=False))
    assert set(v["params"]) == {"encoder", "head"}
    assert set(v["batch_stats"]) == {"encoder"}
    out = jax.eval_shape(
        lambda v: clf.apply(
            v, x, train=True, rngs={"dropout": KEYS["dropout"]}, mutable=["batch_stats"]
        )[0],
        v,
    )
    assert out.shape == (5,) and out.dtype == jnp.float32


def test_pretrained_encoder_plugs_into_classifier():
    x = jax.random.normal(jax.random.key(4), (3, 2, 2500, 12))
    encoder = models.build_encoder(SMALL)
    clf = models.Classifier(SMALL, head_dropout=0.3, aggregate="mean", num_views=2)

    enc_vars = random_variables(encoder, x[:, 0], seed=3)
    clf_vars = models.plug_encoder(random_variables(clf, x), enc_vars)

    @jax.jit
    def run(enc_vars, clf_vars, x):
        e = [encoder.apply(enc_vars, x[:, i], train=False)[0] for i in range(2)]
        return clf.apply(clf_vars, x, train=False), jnp.stack(e, 1)

    logits, e = run(enc_vars, clf_vars, x)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, clf_vars["params"]["encoder"], enc_vars["params"]
    )
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, clf_vars["batch_stats"]["encoder"], enc_vars["batch_stats"]
    )
    p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), clf_vars["params"]["head"])
    np.testing.assert_allclose(
        logits, np_head(np.asarray(e, np.float64), p64, "mean"), rtol=1e-4, atol=1e-5
    )
    # a different config does not fit
    other = models.build_encoder(cfg("cnn_attn_lstm", emb_dim=18, proj_dim=8))
    with pytest.raises(UserError, match="encoder checkpoint"):
        models.plug_encoder(
            clf_vars, jax.eval_shape(lambda: other.init(KEYS, x[:, 0], train=False))
        )


def test_classifier_normalises_each_view_with_its_own_batch_statistics():
    # the views differ 10x in amplitude (as leads do): pooled BatchNorm statistics would give other logits
    c = cfg("cnn", emb_dim=16, proj_dim=8, dropout=0.0, channels=(4, 4, 8, 8, 8))
    x = (
        jax.random.normal(jax.random.key(6), (6, 2, 2500, 1))
        * jnp.array([1.0, 10.0])[None, :, None, None]
    )
    clf = models.Classifier(c, head_dropout=0.0, aggregate="concat", num_views=2)
    v = random_variables(clf, x)
    encoder, head = models.build_encoder(c), models.ClassifierHead(16, 0.0, "concat")

    @jax.jit
    def both(v, x):
        logits, new = clf.apply(
            v, x, train=True, rngs={"dropout": KEYS["dropout"]}, mutable=["batch_stats"]
        )
        # reference: the encoder applied view by view, its running statistics updated after each view, then the head
        bs, embs = v["batch_stats"]["encoder"], []
        for i in range(2):
            (e, _), upd = encoder.apply(
                {"params": v["params"]["encoder"], "batch_stats": bs},
                x[:, i],
                train=True,
                mutable=["batch_stats"],
            )
            bs = upd["batch_stats"]
            embs.append(e)
        want = head.apply({"params": v["params"]["head"]}, jnp.stack(embs, 1), train=False)
        (pooled, _), _ = encoder.apply(
            {"params": v["params"]["encoder"], "batch_stats": v["batch_stats"]["encoder"]},
            x.reshape((12, 2500, 1)),
            train=True,
            mutable=["batch_stats"],
        )
        pooled_logits = head.apply(
            {"params": v["params"]["head"]}, pooled.reshape(6, 2, -1), train=False
        )
        return logits, new["batch_stats"]["encoder"], want, bs, pooled_logits

    logits, new_bs, want, bs, pooled_logits = both(v, x)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new_bs, bs
    )
    assert np.max(np.abs(np.asarray(pooled_logits) - np.asarray(logits))) > 1e-2


def test_linear_probe_freezes_encoder():
    clf = models.Classifier(SMALL, head_dropout=0.3, linear_probe=True)
    x = jax.random.normal(jax.random.key(5), (4, 2500, 12))
    v = random_variables(clf, x)
    assert set(v["params"]["head"]) == {"out"}  # a single Dense(1)

    def loss(params):
        logits, state = clf.apply(
            {"params": params, "batch_stats": v["batch_stats"]},
            x,
            train=True,
            rngs={"dropout": KEYS["dropout"]},
            mutable=["batch_stats"],
        )
        return jnp.sum(logits), state

    grads, state = jax.jit(jax.grad(loss, has_aux=True))(v["params"])
    assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(grads["encoder"]))
    assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads["head"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state["batch_stats"], v["batch_stats"])


# ------------------------------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_cfg,match",
    [
        (cfg("cnn_lstm", emb_dim=-1), "model.emb_dim"),
        (cfg("cnn_attn_lstm", emb_dim=0), "model.emb_dim"),
        (cfg("resnet"), "model.encoder"),
        (cfg("cnn_transformer", transformer_heads=5), "model.transformer_heads"),
        (cfg("cnn", dropout=0.5), "model.dropout"),
        ({"encoder": "cnn", "emb_dim": 256}, "model.proj_dim: missing"),
    ],
)
def test_config_errors(model_cfg, match):
    with pytest.raises(UserError, match=match):
        models.build_encoder(model_cfg)


def test_configdict_and_dict_are_accepted():
    d = dataclasses.asdict(cfg("cnn_lstm", emb_dim=32))
    d["channels"] = list(d["channels"])  # e.g. read back from JSON
    for c in (ml_collections.ConfigDict(d), d):
        m = models.build_encoder(c)
        assert isinstance(m, models.LSTMEncoder) and m.emb_dim == 32 and m.channels == CH
    with pytest.raises(UserError, match="dtype"):
        models.build_encoder(d, dtype="float17")


def test_too_short_input_is_a_user_error():
    model = models.build_encoder(cfg("cnn"))
    with pytest.raises(UserError, match="too short"):
        jax.eval_shape(lambda: model.init(KEYS, jnp.zeros((2, 100, 12)), train=False))


# ------------------------------------------------------------------------------------------------------------------
# Performance formulations: stride-2 conv as a conv over sample pairs; hash-based dropout
# ------------------------------------------------------------------------------------------------------------------
def np_conv_grads(x, kern, g, stride, pad):
    """float64 gradients of sum(conv(x, kern) * g) with respect to x and kern (windows written out by hand)."""
    b, length, _ = x.shape
    k = kern.shape[0]
    xp = np.pad(x, ((0, 0), pad, (0, 0)))
    dxp, dk = np.zeros_like(xp), np.zeros_like(kern)
    for t in range(g.shape[1]):
        win = slice(t * stride, t * stride + k)
        dk += np.einsum("bjc,bd->jcd", xp[:, win], g[:, t])
        dxp[:, win] += np.einsum("bd,jcd->bjc", g[:, t], kern)
    return dxp[:, pad[0] : pad[0] + length], dk


@pytest.mark.parametrize("formulation", ["paired", "strided"])
@pytest.mark.parametrize("k,length", [(15, 64), (15, 37), (5, 20), (5, 9), (3, 8), (4, 12)])
def test_conv1d_stride2_formulations_match_numpy(formulation, k, length, monkeypatch):
    monkeypatch.setattr(models, "CONV_FORMULATION", formulation)
    rng = np.random.default_rng(k * 100 + length)
    x = rng.normal(size=(2, length, 3))
    conv = models.Conv1D(4, k, 2)
    kern = rng.normal(size=(k, 3, 4)) / math.sqrt(3 * k)
    out_len = (length + 2 * (k // 2) - k) // 2 + 1
    g = rng.normal(size=(2, out_len, 4))

    def loss(kern, x):
        y = conv.apply({"params": {"kernel": kern}}, x)
        return jnp.sum(y * g), y

    (dk, dx), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.float32(kern), jnp.float32(x)
    )
    want_dx, want_dk = np_conv_grads(x, kern, g, 2, (k // 2, k // 2))
    np.testing.assert_allclose(y, np_conv(x, kern, 2, (k // 2, k // 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dk, want_dk, rtol=1e-4, atol=1e-4)


def test_conv_formulation_auto_and_errors(monkeypatch):
    assert models.conv_formulation() == ("paired" if jax.default_backend() == "cpu" else "strided")
    monkeypatch.setattr(models, "CONV_FORMULATION", "im2col")
    with pytest.raises(ValueError, match="CONV_FORMULATION"):
        models.conv_formulation()


def _masks(rate, shape, seeds):
    drop = models.Dropout(rate)
    x = jnp.ones(shape, jnp.float32)
    f = jax.jit(lambda k: drop.apply({}, x, rngs={"dropout": k}))
    return [np.asarray(f(jax.random.key(s))) for s in seeds]


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_dropout_is_bernoulli_and_inverted(rate):
    shape = (4, 500, 32)  # 64,000 elements
    y0, y1 = _masks(rate, shape, [0, 1])
    n = y0.size
    for y in (y0, y1):
        kept = y != 0
        # survivors scaled by 1/(1-p)
        np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)
        assert abs(kept.mean() - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / n)
    # independence: between two keys, between neighbours in time, between neighbouring channels and examples
    d0, d1 = (y0 == 0).ravel().astype(float), (y1 == 0).ravel().astype(float)
    tol = 5 * math.sqrt(rate * (1 - rate) / n) + 5 * rate * math.sqrt(1 / n)
    assert abs(np.mean(d0 * d1) - rate**2) < tol
    dz = y0 == 0
    for a, b in [(dz[:, 1:], dz[:, :-1]), (dz[..., 1:], dz[..., :-1]), (dz[1:], dz[:-1])]:
        assert abs(np.mean(a & b) - rate**2) < tol
    # the drop frequency of each position over many keys is the rate (no position is favoured)
    many = np.stack([m == 0 for m in _masks(rate, (1, 8, 4), range(400))])
    assert np.all(np.abs(many.mean(0) - rate) < 5 * math.sqrt(rate * (1 - rate) / 400))


def test_dropout_modes_and_reproducibility():
    x = jnp.arange(1.0, 61.0).reshape(3, 20)
    k = jax.random.key(7)
    assert models.Dropout(0.3, deterministic=True).apply({}, x) is x
    assert models.Dropout(0.0).apply({}, x, rngs={"dropout": k}) is x
    np.testing.assert_array_equal(models.Dropout(1.0).apply({}, x, rngs={"dropout": k}), 0.0)
    a = models.Dropout(0.5).apply({}, x, rngs={"dropout": k})
    b = models.Dropout(0.5).apply({}, x, rngs={"dropout": k})
    np.testing.assert_array_equal(a, b)
    xb = x.astype(jnp.bfloat16)
    assert models.Dropout(0.5).apply({}, xb, rngs={"dropout": k}).dtype == jnp.bfloat16


def test_attention_dropout_drops_weights_and_rescales():
    # query = key = 0: every attention weight is 1/T; value = one-hot over the T keys, so the output row of each
    # (example, query, head) is that row's weights after dropout.
    b, t, h, rate = 16, 37, 2, 0.3
    q = jnp.zeros((b, t, h, t))
    v = jnp.broadcast_to(jnp.eye(t)[None, :, None, :], (b, t, h, t))
    att = lambda **kw: np.asarray(
        models.hash_dropout_attention(
            q, q, v, dropout_rng=jax.random.key(3), dropout_rate=rate, **kw
        )
    )
    np.testing.assert_allclose(att(deterministic=True), 1.0 / t, rtol=1e-6)
    for broadcast in (False, True):
        out = att(broadcast_dropout=broadcast)
        kept = out != 0
        np.testing.assert_allclose(out[kept], 1.0 / t / (1.0 - rate), rtol=1e-5)
        n = t * t if broadcast else out.size  # independent draws
        assert abs(kept.mean() - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / n)
        same_examples, same_heads = (
            np.mean(kept[0] == kept[1]),
            np.mean(kept[:, :, 0] == kept[:, :, 1]),
        )
        if broadcast:  # flax's default: one mask shared by the batch and the heads
            assert same_examples == 1.0 and same_heads == 1.0
        else:  # one draw per weight
            assert same_examples < 0.7 and same_heads < 0.7


def test_transformer_layer_drops_attention_weights_per_weight(monkeypatch):
    calls = []
    real = models.hash_dropout
    monkeypatch.setattr(
        models,
        "hash_dropout",
        lambda key, x, rate: calls.append((x.shape, rate)) or real(key, x, rate),
    )
    layer = models.TransformerLayer(2, 8, 0.2)
    x = jax.random.normal(jax.random.key(0), (3, 9, 8))
    v = layer.init(jax.random.key(1), x, train=False)
    assert calls == []  # eval mode draws nothing
    layer.apply(v, x, train=True, rngs={"dropout": jax.random.key(5)})
    # the attention weights (batch, heads, query, key), then the three Dropout modules on (batch, steps, width)
    assert sorted(calls) == sorted([((3, 2, 9, 9), 0.2)] + [((3, 9, 8), 0.2)] * 3)


def test_hash_bits_do_not_depend_on_sharding():
    devices = jax.devices()
    assert len(devices) >= 2, "tests/conftest.py sets 8 fake CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    seed = jnp.array([3, 1234567], jnp.uint32)
    shape = (8 * len(devices), 5, 3)
    full = jax.jit(lambda s: hashing.hash_bits(s, shape))(seed)
    sharded = jax.jit(
        lambda s: hashing.hash_bits(s, shape), out_shardings=NamedSharding(mesh, P("data"))
    )(seed)
    assert len(sharded.sharding.device_set) == len(devices)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(full))
    # a different seed word changes (nearly) every element
    other = jax.jit(lambda s: hashing.hash_bits(s, shape))(seed.at[1].add(1))
    assert np.mean(np.asarray(other) != np.asarray(full)) > 0.99


def test_xla_compiler_options_keep_barriers_and_change_no_result():
    opts = models.xla_compiler_options()
    assert opts == (
        {"xla_disable_hlo_passes": "cse_barrier_expander"} if jax.default_backend() == "cpu" else {}
    )
    conv = models.Conv1D(4, 15, 2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 3)), jnp.float32)
    v = conv.init(KEYS, x)

    def grads(v, x):
        return jax.grad(lambda v: jnp.sum(jnp.sin(conv.apply(v, jnp.cos(x)))))(v)

    plain, kept = jax.jit(grads), jax.jit(grads, compiler_options=opts)
    # the barrier on the paired input survives into the optimised program
    if jax.default_backend() == "cpu":
        assert "opt-barrier" in kept.lower(v, x).compile().as_text()
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain(v, x), kept(v, x)
    )


@pytest.mark.parametrize("p", [0.1, 0.25])
def test_embedding_head_drops_at_twice_the_trunk_rate(p):
    # the reference: dropout p in the trunk, 2p in the embedding head. 64 x 4096 outputs: the dropped fraction is within
    # 5 binomial standard deviations of 2p, and survivors are scaled by 1 / (1 - 2p)
    head = models.EmbeddingHead(emb_dim=4096, dropout=p)
    h = jax.random.normal(jax.random.key(0), (64, 32))
    v = head.init(KEYS, h, train=False)
    plain = np.asarray(head.apply(v, h, train=False))
    out = np.asarray(head.apply(v, h, train=True, rngs={"dropout": jax.random.key(3)}))
    dropped = (out == 0) & (plain != 0)
    n, q = plain.size, 2 * p
    assert abs(dropped.mean() - q) < 5 * np.sqrt(q * (1 - q) / n), dropped.mean()
    np.testing.assert_allclose(out[~dropped], plain[~dropped] / (1 - q), rtol=1e-5, atol=1e-6)
