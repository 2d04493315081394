"""Encoders (conv trunk + CNN / BiLSTM / attention-BiLSTM / Transformer heads), projector and classifier.

Channels-last everywhere (Flax convs are NWC; the PyTorch reference was channels-first):
`x: (B, L, C)` with L = 5000 (or 2500 for CLOCS halves / FFT bins) and C = 12 leads (or 1 for single-lead
CLOCS inputs); L and C are taken from the input at init time.

Every encoder is called as `encoder.apply(variables, x, train, rngs={'dropout': k}, mutable=['batch_stats'])`
and returns `(embedding (B, emb_dim), projection (B, proj_dim))` in the compute dtype. BatchNorm statistics live in
the collection ``batch_stats`` (updated only when ``train``); dropout draws from the rng ``dropout``; the
attention encoder sows its pooling weights into ``intermediates/attention_weights``.

Initialisation follows PyTorch's defaults (uniform +-1/sqrt(fan_in) for conv/dense kernels and biases and for the
LSTM, Xavier for the attention projections), so training at the reference's small learning rates behaves alike.
Parameters are always float32; ``dtype`` is only the compute dtype (e.g. bfloat16).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from ecgcl_jax import hashing
from ecgcl_jax.errors import UserError

ENCODERS = ("cnn", "cnn_lstm", "cnn_attn_lstm", "cnn_transformer", "res_cnn_lstm")
AGGREGATES = ("concat", "sum", "mean", "attention")
LEAKY_SLOPE = 0.1
BN_MOMENTUM = 0.9  # flax momentum = 1 - torch momentum (0.1)
BN_EPSILON = 1e-5
POOL_AFTER = (1, 2)  # AvgPool after conv2 and conv3 (0-based conv indices)

# PyTorch nn.Linear / nn.Conv1d default kernel init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), +...).
_TORCH_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torch.nn.MultiheadAttention in_proj: xavier_uniform over the stacked (3d, d) matrix == fan_avg 2d per (d, d).
_TORCH_QKV = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def _sym_uniform(bound: float) -> Callable:
    """Initializer drawing U(-bound, bound) (PyTorch's bias / LSTM init)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(
    features: int, fan_in: int, dtype, name: str | None = None, use_bias: bool = True
) -> nn.Dense:
    """nn.Dense with PyTorch-default init; float32 params, `dtype` compute."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_TORCH_KERNEL,
        bias_init=_sym_uniform(1.0 / math.sqrt(fan_in)),
        name=name,
    )


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The checked `config.model` fields. No defaults here: they are declared once, in configs/base.py, and
    `encoder_config` builds this from a config that holds every field.

    Any object with these attributes (an ml_collections ConfigDict, a dict, this dataclass) can be passed to
    `build_encoder` / `Classifier`.
    """

    # cnn | cnn_lstm | cnn_attn_lstm | cnn_transformer | res_cnn_lstm
    encoder: str
    emb_dim: int  # embedding width
    proj_dim: int  # projection width (the contrastive loss sees this)
    kernel_size: int  # conv kernel (trunk and residual blocks) and AvgPool window
    dropout: float  # p in the trunk / after the LSTM; the embedding head uses 2p
    channels: tuple  # trunk conv widths, one stride-2 conv each
    lstm_layers: int  # stacked BiLSTM layers (hidden emb_dim/2 per direction)
    attention_dim: int  # additive attention width; 0 = emb_dim
    transformer_layers: int  # post-norm encoder layers
    transformer_heads: int  # attention heads; they divide transformer_d_model
    transformer_d_model: int  # trunk channels are projected to this width when they differ


def encoder_config(model_cfg: Any, field: str = "model") -> EncoderConfig:
    """Reads and checks the model fields of `model_cfg` (attribute object or mapping) -> EncoderConfig.

    Raises UserError("<field>.<name>: <problem>") on a missing or invalid field; field: the section's dotted
    name ("config.model", "config.pretrain.model", or "model" of an exported encoder's record).
    """
    if isinstance(model_cfg, EncoderConfig):
        values = dataclasses.asdict(model_cfg)
    else:
        values = {}
        for f in dataclasses.fields(EncoderConfig):
            if isinstance(model_cfg, Mapping):
                if f.name not in model_cfg:
                    raise UserError(f"{field}.{f.name}: missing from the model config")
                values[f.name] = model_cfg[f.name]
            else:
                try:
                    values[f.name] = getattr(model_cfg, f.name)
                except (AttributeError, KeyError):
                    raise UserError(f"{field}.{f.name}: missing from the model config") from None
    try:
        values["channels"] = tuple(int(c) for c in values["channels"])
    except (TypeError, ValueError):
        raise UserError(
            f"{field}.channels: expected a list of integers, got {values['channels']!r}"
        ) from None
    cfg = EncoderConfig(**values)
    _check(cfg, field)
    return cfg


def _check(cfg: EncoderConfig, field: str) -> None:
    if cfg.encoder not in ENCODERS:
        raise UserError(
            f"{field}.encoder: unknown encoder {cfg.encoder!r}; choose one of {', '.join(ENCODERS)}"
        )
    for name in (
        "emb_dim",
        "proj_dim",
        "kernel_size",
        "lstm_layers",
        "transformer_layers",
        "transformer_heads",
        "transformer_d_model",
    ):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{field}.{name}: must be a positive integer, got {v!r}")
    if not isinstance(cfg.attention_dim, int) or cfg.attention_dim < 0:
        raise UserError(
            f"{field}.attention_dim: must be 0 (= emb_dim) or a positive integer, got {cfg.attention_dim!r}"
        )
    if not cfg.channels or min(cfg.channels) < 1:
        raise UserError(
            f"{field}.channels: must be a non-empty list of positive widths, got {cfg.channels!r}"
        )
    if not 0.0 <= cfg.dropout < 0.5:
        raise UserError(
            f"{field}.dropout: must be in [0, 0.5) because the embedding head drops 2p, got {cfg.dropout!r}"
        )
    if cfg.encoder == "cnn_transformer" and cfg.transformer_d_model % cfg.transformer_heads:
        raise UserError(
            f"{field}.transformer_heads: {cfg.transformer_heads} heads do not divide "
            f"{field}.transformer_d_model={cfg.transformer_d_model}"
        )


def trunk_lengths(length: int, kernel_size: int, num_convs: int) -> list[int]:
    """Sequence lengths through the trunk: after every conv, and after the pools (conv2, conv3).

    5000 -> [2500, 1250, 618, 309, 148, 74, 37] for kernel 15 and 5 convs (conv k, stride 2, pad k//2;
    pool k, stride 2).
    """
    out, n = [], length
    for i in range(num_convs):
        n = (n + 2 * (kernel_size // 2) - kernel_size) // 2 + 1
        out.append(n)
        if i in POOL_AFTER:
            n = (n - kernel_size) // 2 + 1
            out.append(n)
    return out


def _dtype(dtype) -> Any:
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise UserError(
            f"dtype: unknown compute dtype {dtype!r}; use float32 or bfloat16"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
# How stride-2 convolutions are computed (same parameters, same maths, different XLA programs):
#   "paired":  the input is viewed as sample pairs (B, L/2, 2C) (a free reshape) and convolved with stride 1 and
#              ceil(k/2) taps of 2C channels; XLA:CPU runs the strided form's input gradient as a convolution over
#              a zero-dilated gradient, which does twice the work (measured in bench/RESULTS.md).
#   "strided": lax's stride-2 convolution (cuDNN's native path on GPUs).
#   "auto":    "paired" on CPU, "strided" elsewhere.
# Read when a model is traced; benchmarks set it to compare the two.
CONV_FORMULATION = "auto"
_CONV_DIMS = ("NWC", "WIO", "NWC")


def conv_formulation() -> str:
    """The stride-2 formulation in effect ("paired" or "strided"), resolving "auto" by the default backend."""
    if CONV_FORMULATION == "auto":
        return "paired" if jax.default_backend() == "cpu" else "strided"
    if CONV_FORMULATION not in ("paired", "strided"):
        raise ValueError(
            f"models.CONV_FORMULATION must be auto, paired or strided, got {CONV_FORMULATION!r}"
        )
    return CONV_FORMULATION


def xla_compiler_options() -> dict:
    """`compiler_options` for `jax.jit` of a training step on the default backend.

    On CPU: keep optimization barriers through fusion (XLA:CPU otherwise removes them first), so the buffers that
    models.py and augment.py mark are computed once instead of inside every consumer: about 1.25x (Gaussian pair) to
    1.6x (time warp + dropout) on the CNN step (bench/RESULTS.md). Elsewhere: no options.
    """
    return (
        {"xla_disable_hlo_passes": "cse_barrier_expander"} if jax.default_backend() == "cpu" else {}
    )


def _conv_stride2_paired(x, kernel):
    """Conv1d stride 2, padding k//2, odd k, as a stride-1 conv over sample pairs. x: (B, L, C), kernel: (k, C, F).

    With P[m] = (x[2m], x[2m+1]) and j - k//2 = 2a + r: y[t] = sum_j w[j] x[2t + j - k//2] = sum_a P[t+a]_r w[2a + r +
    k//2], i.e. taps a = a0..a1 over pairs with kernel rows W'[a - a0] = [w[2a + k//2], w[2a + 1 + k//2]] (zero where
    the index falls outside 0..k-1). Output length ceil(L/2) == (L + 2(k//2) - k)//2 + 1 for odd k.
    """
    b, length, c = x.shape
    k, _, f = kernel.shape
    p = k // 2
    if length % 2:  # the extra zero is inside the right zero padding of the strided form
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    # One buffer for both readers of the input: the forward conv and the (transposed) weight-gradient conv. Without
    # the barrier XLA:CPU recomputes the producer (BatchNorm, activation, dropout, augmentation) inside the transposed
    # copy, in a slow non-vectorised loop. XLA:CPU drops barriers before fusion unless the step is compiled with
    # xla_compiler_options() (measured in bench/RESULTS.md). The barrier comes before the pair reshape: with the
    # reshape inside the producer's fusion, XLA:CPU's loop over the paired shape ran about 5x slower.
    pairs = jax.lax.optimization_barrier(x).reshape(b, x.shape[1] // 2, 2 * c)
    a0 = -((p + 1) // 2)
    taps = (k - 1 - p) // 2 - a0 + 1
    lo = 2 * a0 + p  # kernel index of tap 0's even sample (negative: a zero row)
    w = jnp.pad(kernel, ((-lo, 2 * taps + lo - k), (0, 0), (0, 0))).reshape(taps, 2 * c, f)
    return jax.lax.conv_general_dilated(
        pairs, w, (1,), [(-a0, taps - 1 + a0)], dimension_numbers=_CONV_DIMS
    )


class Conv1D(nn.Module):
    """Conv1d without bias, PyTorch padding: k//2 on both sides for stride 2, 'SAME' for stride 1.

    x: (B, L, Cin) -> (B, L', features); param 'kernel' (k, Cin, features) float32 (the layout of nn.Conv's).
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", _TORCH_KERNEL, (k, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.stride == 2 and k % 2 == 1 and conv_formulation() == "paired":
            return _conv_stride2_paired(x, kernel)
        if self.stride > 1:
            padding = [(k // 2, k // 2)]
        else:
            padding = [((k - 1) // 2, k - 1 - (k - 1) // 2)]
        return jax.lax.conv_general_dilated(
            x, kernel, (self.stride,), padding, dimension_numbers=_CONV_DIMS
        )


def hash_dropout(key, x, rate: float):
    """Inverted dropout of x: each element zeroed with probability `rate` (exact to 2**-32), survivors scaled by
    1/(1 - rate). The mask comes from `hashing.hash_bits` keyed by 64 bits of `key`: about 0.4 ns per element on
    XLA:CPU against about 10 ns for jax.random.bernoulli's threefry, which made dropout the largest cost of a CPU
    training step."""
    if rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    seed = jax.random.bits(key, (2,), jnp.uint32)
    threshold = min(int(round(rate * 2.0**32)), (1 << 32) - 1)
    keep = hashing.hash_bits(seed, x.shape) >= jnp.uint32(threshold)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
    """nn.Dropout's semantics with `hash_dropout`'s mask, drawn from the module's 'dropout' rng."""

    rate: float
    deterministic: bool = False

    @nn.compact
    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        return hash_dropout(self.make_rng("dropout"), x, self.rate)


def hash_dropout_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
):
    """nn.dot_product_attention (an `attention_fn` for nn.MultiHeadDotProductAttention, same arguments and
    semantics) whose attention-weight dropout mask comes from `hash_dropout` instead of threefry.

    query, key, value: (B, T, heads, head_dim) -> (B, T, heads, head_dim). broadcast_dropout: one mask shared by
    the batch and the heads (flax's default) or one draw per weight.
    """
    query, key, value = promote_dtype(query, key, value, dtype=dtype)
    w = nn.dot_product_attention_weights(
        query, key, bias, mask, deterministic=True, dtype=dtype, precision=precision, module=module
    )
    if not deterministic and dropout_rate > 0.0:
        if broadcast_dropout:
            w = w * hash_dropout(
                dropout_rng, jnp.ones((1,) * (w.ndim - 2) + w.shape[-2:], w.dtype), dropout_rate
            )
        else:
            w = hash_dropout(dropout_rng, w, dropout_rate)
    return jnp.einsum("...hqk,...khd->...qhd", w, value, precision=precision)


class AvgPool(nn.Module):
    """AvgPool1d(window, stride), no padding: (B, L, C) -> (B, (L - window)//stride + 1, C)."""

    window: int
    stride: int = 2

    def __call__(self, x):
        return nn.avg_pool(x, (self.window,), (self.stride,), padding="VALID")


class ConvBNAct(nn.Module):
    """Conv1d (no bias; BatchNorm follows) -> BatchNorm -> LeakyReLU(0.1) -> Dropout(p).

    (B, L, Cin) -> (B, L', Cout).
    """

    features: int
    kernel_size: int
    stride: int
    dropout: float
    dtype: Any = jnp.float32
    activate: bool = True  # False: stop after BatchNorm (the second conv of a residual block)

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv1D(self.features, self.kernel_size, self.stride, self.dtype, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn",
        )(x)
        if not self.activate:
            return x
        x = nn.leaky_relu(x, LEAKY_SLOPE)
        return Dropout(self.dropout, deterministic=not train)(x)


class ResBlock(nn.Module):
    """Residual block: x + [ConvBNAct -> Conv -> BN], then LeakyReLU; stride 1, length and width kept."""

    kernel_size: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        y = ConvBNAct(c, self.kernel_size, 1, self.dropout, self.dtype, name="a")(x, train)
        y = ConvBNAct(c, self.kernel_size, 1, self.dropout, self.dtype, activate=False, name="b")(
            y, train
        )
        return nn.leaky_relu(x + y, LEAKY_SLOPE)


class ConvTrunk(nn.Module):
    """The common conv stack: (B, L, C) -> (B, T, channels[-1]); T = 37 for L = 5000, 18 for L = 2500.

    Conv k s2 pad k//2 (no bias) -> BN -> LeakyReLU(0.1) -> Dropout(p) per width in `channels`, AvgPool(k, 2) after
    conv2 and conv3. With `residual`, a stride-1 ResBlock follows every conv layer (the residual CNN-LSTM variant).
    """

    channels: tuple
    kernel_size: int
    dropout: float
    residual: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if x.ndim != 3:
            raise ValueError(f"encoder input must be (batch, length, leads), got shape {x.shape}")
        lengths = trunk_lengths(x.shape[1], self.kernel_size, len(self.channels))
        if min(lengths) < 1:
            raise UserError(
                f"encoder input: length {x.shape[1]} is too short for the conv trunk "
                f"(kernel {self.kernel_size}, {len(self.channels)} stride-2 convs, 2 pools)"
            )
        x = x.astype(self.dtype)
        for i, c in enumerate(self.channels):
            x = ConvBNAct(c, self.kernel_size, 2, self.dropout, self.dtype, name=f"layer_{i}")(
                x, train
            )
            if self.residual:
                x = ResBlock(self.kernel_size, self.dropout, self.dtype, name=f"res_{i}")(x, train)
            if i in POOL_AFTER:
                x = AvgPool(self.kernel_size, 2, name=f"pool_{i}")(x)
        return x


class Projector(nn.Module):
    """Dense(emb) -> ReLU -> Dense(proj_dim): (B, emb) -> (B, proj_dim)."""

    proj_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        e = h.shape[-1]
        h = nn.relu(_dense(e, e, self.dtype, name="dense_0")(h))
        return _dense(self.proj_dim, e, self.dtype, name="dense_1")(h)


class EmbeddingHead(nn.Module):
    """Dense(emb) -> LeakyReLU(0.1) -> Dropout(2p): (B, D) -> (B, emb)."""

    emb_dim: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool):
        h = _dense(self.emb_dim, h.shape[-1], self.dtype, name="dense")(h)
        h = nn.leaky_relu(h, LEAKY_SLOPE)
        return Dropout(2 * self.dropout, deterministic=not train)(h)


class BiLSTM(nn.Module):
    """`layers` stacked bidirectional LSTMs: (B, T, D) -> (B, T, 2 * hidden), [forward; backward] per step.

    Like torch.nn.LSTM(bidirectional=True, batch_first=True), no dropout between layers. Flax's cell has one bias
    per gate (PyTorch has two), so each direction holds 4*hidden*(in + hidden + 1) parameters.
    With `last_step_only` it returns only the top layer's output at the last step, (B, 2 * hidden), the same numbers
    as `[:, -1]` of the full output for half the top layer's work (see BiLSTMLayer).
    """

    hidden: int
    layers: int
    dtype: Any = jnp.float32
    last_step_only: bool = False

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            last = self.last_step_only and i == self.layers - 1
            x = BiLSTMLayer(self.hidden, self.dtype, last_step_only=last, name=f"layer_{i}")(x)
        return x.astype(self.dtype)


class BiLSTMLayer(nn.Module):
    """One bidirectional LSTM layer: (B, T, D) -> (B, T, 2 * hidden); params under 'forward' / 'backward'.

    With `last_step_only`: (B, T, D) -> (B, 2 * hidden), the output at step T - 1. The backward direction starts at
    T - 1, so its output there is one cell step from the zero state on x[:, -1]; only the forward direction scans.
    """

    hidden: int
    dtype: Any = jnp.float32
    last_step_only: bool = False

    @nn.compact
    def __call__(self, x):
        init = _sym_uniform(1.0 / math.sqrt(self.hidden))
        forward, backward = [
            nn.OptimizedLSTMCell(
                self.hidden,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=init,
                recurrent_kernel_init=init,
                bias_init=init,
                name=name,
            )
            for name in ("forward", "backward")
        ]
        if not self.last_step_only:
            return nn.Bidirectional(nn.RNN(forward), nn.RNN(backward))(x)
        h_forward = nn.RNN(forward)(x)[:, -1]
        x_last = x[:, -1]
        # nn.RNN's initial (c, h)
        zeros = jnp.zeros(x_last.shape[:-1] + (self.hidden,), jnp.float32)
        _, h_backward = backward((zeros, zeros), x_last)
        return jnp.concatenate([h_forward, h_backward], axis=-1)


class AdditivePooling(nn.Module):
    """Additive attention pooling over steps with the last step as query.

    o: (B, T, D). energy_t = tanh(W [q; o_t] + b), score_t = v . energy_t, w = softmax_t(score),
    context = sum_t w_t o_t.
    Returns context (B, D); sows w (B, T) float32 as intermediates/attention_weights.
    """

    attention_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, o):
        q = jnp.broadcast_to(o[:, -1:, :], o.shape)
        qo = jnp.concatenate([q, o], axis=-1)
        energy = jnp.tanh(_dense(self.attention_dim, qo.shape[-1], self.dtype, name="W")(qo))
        score = _dense(1, self.attention_dim, self.dtype, name="v", use_bias=False)(energy)[..., 0]
        w = jax.nn.softmax(score.astype(jnp.float32), axis=-1)
        self.sow("intermediates", "attention_weights", w)
        return jnp.einsum("bt,btd->bd", w.astype(o.dtype), o)


class TransformerLayer(nn.Module):
    """Post-norm encoder layer like torch.nn.TransformerEncoderLayer (ReLU, LayerNorm eps 1e-5).

    (B, T, d) -> (B, T, d).
    """

    heads: int
    ff_dim: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        d = x.shape[-1]
        a = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            dropout_rate=self.dropout,
            broadcast_dropout=False,
            deterministic=not train,
            kernel_init=_TORCH_QKV,
            out_kernel_init=_TORCH_KERNEL,
            attention_fn=hash_dropout_attention,
            name="attention",
        )(x, x)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name="norm_1")(
            x + Dropout(self.dropout, deterministic=not train)(a)
        )
        f = nn.relu(_dense(self.ff_dim, d, self.dtype, name="ff_1")(x))
        f = _dense(d, self.ff_dim, self.dtype, name="ff_2")(
            Dropout(self.dropout, deterministic=not train)(f)
        )
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name="norm_2")(
            x + Dropout(self.dropout, deterministic=not train)(f)
        )


# ----------------------------------------------------------------------------------------------------------------
# Encoders: __call__(x (B, L, C), train) -> (embedding (B, emb_dim), projection (B, proj_dim))
# ----------------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Fields shared by every encoder (see EncoderConfig; `build_encoder` sets every field). Subclasses define
    __call__."""

    emb_dim: int
    proj_dim: int
    kernel_size: int
    dropout: float
    channels: tuple
    dtype: Any

    def trunk(self, residual: bool = False) -> ConvTrunk:
        return ConvTrunk(
            self.channels, self.kernel_size, self.dropout, residual, self.dtype, name="trunk"
        )

    def project(self, h):
        return Projector(self.proj_dim, self.dtype, name="projector")(h)


class CNNEncoder(Encoder):
    """Trunk -> flatten (T * 64, 2368 for L = 5000) -> Dense(emb) -> LeakyReLU -> Dropout(2p); + projector."""

    @nn.compact
    def __call__(self, x, train: bool):
        s = self.trunk()(x, train)
        # time-major flatten (PyTorch flattened channel-major: weights differ in order)
        h = s.reshape(s.shape[0], -1)
        h = EmbeddingHead(self.emb_dim, self.dropout, self.dtype, name="head")(h, train)
        return h, self.project(h)


class LSTMEncoder(Encoder):
    """Trunk -> BiLSTM (ceil(emb/2) per direction) -> last step or additive attention pooling -> Dropout(p)
    -> Dense(emb) -> LeakyReLU -> Dropout(2p); + projector. `residual` adds stride-1 ResBlocks to the trunk.
    An odd emb gives a BiLSTM output one wider than emb, which the Dense head maps to emb."""

    lstm_layers: int
    attention: bool  # encoder cnn_attn_lstm
    attention_dim: int
    residual: bool  # encoder res_cnn_lstm

    @nn.compact
    def __call__(self, x, train: bool):
        s = self.trunk(self.residual)(x, train)
        # without attention only torch's out[:, -1] is used: forward's final state, backward's state at the last step
        h = BiLSTM(
            (self.emb_dim + 1) // 2,
            self.lstm_layers,
            self.dtype,
            last_step_only=not self.attention,
            name="lstm",
        )(s)
        if self.attention:
            h = AdditivePooling(self.attention_dim or self.emb_dim, self.dtype, name="attention")(h)
        h = Dropout(self.dropout, deterministic=not train)(h)
        h = EmbeddingHead(self.emb_dim, self.dropout, self.dtype, name="head")(h, train)
        return h, self.project(h)


class TransformerEncoder(Encoder):
    """Trunk -> Dense(d_model) if the trunk width differs -> post-norm Transformer layers (feed-forward width
    d_model) -> mean over steps -> Dense(emb) -> LeakyReLU -> Dropout(2p); + projector. No positional encoding
    (as the reference)."""

    layers: int
    heads: int
    d_model: int

    @nn.compact
    def __call__(self, x, train: bool):
        s = self.trunk()(x, train)
        if s.shape[-1] != self.d_model:
            s = _dense(self.d_model, s.shape[-1], self.dtype, name="input_proj")(s)
        for i in range(self.layers):
            s = TransformerLayer(
                self.heads, self.d_model, self.dropout, self.dtype, name=f"layer_{i}"
            )(s, train)
        h = jnp.mean(s, axis=1)
        h = EmbeddingHead(self.emb_dim, self.dropout, self.dtype, name="head")(h, train)
        return h, self.project(h)


def build_encoder(model_cfg: Any, dtype=jnp.float32) -> Encoder:
    """config.model -> an encoder module. `dtype` is the compute dtype (float32 / bfloat16, or its name):
    pretraining passes config.dtype; fine-tuning, embedding and loading an exported encoder compute in float32.

    Raises UserError on an invalid model config (unknown encoder, odd emb_dim for a BiLSTM encoder, ...).
    """
    cfg = encoder_config(model_cfg)
    common = dict(
        emb_dim=cfg.emb_dim,
        proj_dim=cfg.proj_dim,
        kernel_size=cfg.kernel_size,
        dropout=float(cfg.dropout),
        channels=cfg.channels,
        dtype=_dtype(dtype),
    )
    if cfg.encoder == "cnn":
        return CNNEncoder(**common)
    if cfg.encoder == "cnn_transformer":
        return TransformerEncoder(
            layers=cfg.transformer_layers,
            heads=cfg.transformer_heads,
            d_model=cfg.transformer_d_model,
            **common,
        )
    return LSTMEncoder(
        lstm_layers=cfg.lstm_layers,
        attention=cfg.encoder == "cnn_attn_lstm",
        attention_dim=cfg.attention_dim,
        residual=cfg.encoder == "res_cnn_lstm",
        **common,
    )


# ----------------------------------------------------------------------------------------------------------------
# Classifier for fine-tuning
# ----------------------------------------------------------------------------------------------------------------
class ClassifierHead(nn.Module):
    """Aggregates view embeddings (B, V, E) and maps them to logits float32: (B,) when `num_classes` is None
    (one binary label), else (B, num_classes) (one sigmoid output per class of a multi-label task).

    aggregate: None (V must be 1) | concat (B, V*E) | sum | mean | attention (softmax over views of
    v . tanh(W e_v + b), weights sown as intermediates/view_weights). Then Dense(hidden) -> ReLU -> Dropout ->
    Dense(C), or only Dense(C) when `linear` (C = num_classes, 1 when None).
    """

    hidden: int
    dropout: float
    # not config fields: one view, an MLP head, float32 compute, one binary label unless the caller says otherwise
    aggregate: str | None = None
    linear: bool = False
    dtype: Any = jnp.float32
    num_classes: int | None = None

    @nn.compact
    def __call__(self, e, train: bool):
        if self.aggregate in (None, "concat"):
            h = e.reshape(e.shape[0], -1)
        elif self.aggregate == "sum":
            h = jnp.sum(e, axis=1)
        elif self.aggregate == "mean":
            h = jnp.mean(e, axis=1)
        else:  # attention
            energy = jnp.tanh(_dense(e.shape[-1], e.shape[-1], self.dtype, name="view_W")(e))
            score = _dense(1, e.shape[-1], self.dtype, name="view_v", use_bias=False)(energy)[
                ..., 0
            ]
            w = jax.nn.softmax(score.astype(jnp.float32), axis=-1)
            self.sow("intermediates", "view_weights", w)
            h = jnp.einsum("bv,bve->be", w.astype(e.dtype), e)
        if not self.linear:
            h = nn.relu(_dense(self.hidden, h.shape[-1], self.dtype, name="dense_0")(h))
            h = Dropout(self.dropout, deterministic=not train)(h)
        out = _dense(self.num_classes or 1, h.shape[-1], self.dtype, name="out")(h)
        return (out[..., 0] if self.num_classes is None else out).astype(jnp.float32)


class Classifier(nn.Module):
    """Encoder + a head of one or C sigmoid outputs for fine-tuning.

    params = {'encoder': <encoder params>, 'head': ...}.

    x: (B, L, C) when `aggregate` is None, else (B, V, L, C) with V = num_views views (CLOCS: the two 2500-sample
    halves, or each lead as a (L, 1) input) run through the shared encoder one view at a time (BatchNorm statistics
    per view, as in pretraining) and aggregated. Returns logits (B,) float32, or (B, num_classes) when
    `num_classes` is set (apply the sigmoid in the loss / metrics). With `linear_probe` the encoder runs in eval
    mode (running BatchNorm statistics, no dropout) behind a stop_gradient and the head is a single Dense(C);
    freeze the encoder params in the optimizer too (e.g. optax.multi_transform on the top-level 'encoder' /
    'head' keys).
    """

    model_cfg: Any
    head_dropout: float
    # not config fields: one view, trained end to end, float32 compute unless the caller says otherwise
    aggregate: str | None = None
    num_views: int = 1
    linear_probe: bool = False
    dtype: Any = jnp.float32
    num_classes: int | None = None  # None: one binary label, logits (B,)

    def setup(self):
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise UserError(
                f"finetune.aggregate: unknown aggregation {self.aggregate!r}; "
                f"choose one of {', '.join(AGGREGATES)} (or none)"
            )
        if self.num_views < 1 or (self.aggregate is None and self.num_views != 1):
            raise UserError(
                f"finetune.num_views: {self.num_views} views need an aggregate (concat, sum, mean, attention)"
            )
        self.encoder = build_encoder(self.model_cfg, self.dtype)
        self.head = ClassifierHead(
            self.encoder.emb_dim,
            self.head_dropout,
            self.aggregate,
            self.linear_probe,
            _dtype(self.dtype),
            self.num_classes,
        )

    def __call__(self, x, train: bool):
        if self.aggregate is None:
            if x.ndim != 3:
                raise ValueError(
                    f"Classifier without aggregate expects (batch, length, leads), got shape {x.shape}"
                )
            views = x[:, None]
        else:
            if x.ndim != 4 or x.shape[1] != self.num_views:
                raise ValueError(
                    f"Classifier with aggregate={self.aggregate!r} expects (batch, {self.num_views}, length, "
                    f"leads), got shape {x.shape}"
                )
            views = x
        enc_train = train and not self.linear_probe
        # one encoder call per view, as in pretraining: in training each view is normalised with its own BatchNorm
        # statistics (one call on all B * V inputs would pool, e.g., lead II with aVR) and updates the running ones
        e = jnp.stack(
            [self.encoder(views[:, i], enc_train)[0] for i in range(views.shape[1])], axis=1
        )
        if self.linear_probe:
            e = jax.lax.stop_gradient(e)
        return self.head(e, train)


def plug_encoder(classifier_variables: Mapping, encoder_variables: Mapping) -> dict:
    """Returns classifier variables whose 'encoder' subtrees (params, batch_stats) are the pretrained encoder's.

    Both trees must have the same structure and shapes (same model config and input length/leads), else UserError.
    """
    out = {k: dict(v) for k, v in classifier_variables.items()}
    for col in ("params", "batch_stats"):
        if col not in classifier_variables:
            continue
        new, old = encoder_variables.get(col, {}), classifier_variables[col]["encoder"]

        def shapes(tree):
            return [
                (jax.tree_util.keystr(k), tuple(a.shape))
                for k, a in jax.tree_util.tree_flatten_with_path(tree)[0]
            ]

        if shapes(new) != shapes(old):
            raise UserError(
                f"encoder checkpoint: its {col} do not match the classifier's encoder (different model "
                "config, input length or number of leads)"
            )
        out[col]["encoder"] = jax.tree_util.tree_map(
            lambda a, ref: jnp.asarray(a, ref.dtype), new, old
        )
    return out
