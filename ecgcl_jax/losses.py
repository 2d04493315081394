"""Contrastive and classification losses. All return float32 scalars, whatever the input dtype.

NT-Xent (SimCLR) with optional ids (patient-level positives), the CLOCS CMSC sum, a multi-view
NT-Xent for CMLC / CMSMLC, and a stable binary cross-entropy on logits.
Numerics: rows are L2-normalised in float32, similarities use a full-precision matmul, the
diagonal is masked with a large finite negative, and log-probabilities come from logsumexp
(never exp-then-log), so the loss and its gradient stay finite at temperature 0.01.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["nt_xent", "clocs_cmsc", "multi_view_nt_xent", "bce_with_logits"]

_NEG = -1e9  # masked self-similarity; |s| <= 1/T, so this contributes exp(-1e9) = 0
_HIGHEST = jax.lax.Precision.HIGHEST


def _normalise(z):
    """Rows to unit L2 norm in float32 (norm floored at 1e-12, as torch's F.normalize)."""
    z = jnp.asarray(z, jnp.float32)
    sq = jnp.sum(z * z, axis=-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def _row_losses(s, pos):
    """Per-anchor loss. s: (R, R) scaled similarities, self not yet masked; pos: (R, R) bool, no self.

    loss_i = logsumexp_{k != i} s_ik - mean_{p in P(i)} s_ip.
    """
    r = s.shape[0]
    eye = jnp.eye(r, dtype=bool)
    lse = jax.nn.logsumexp(jnp.where(eye, _NEG, s), axis=1)
    npos = jnp.sum(pos, axis=1)
    pos_mean = jnp.sum(jnp.where(pos, s, 0.0), axis=1) / jnp.maximum(npos, 1)
    return lse - pos_mean


def nt_xent(a, b, temperature, ids=None):
    """NT-Xent over two views. a, b: (N, D) projections (any float dtype) -> float32 scalar.

    z = [a; b] with unit rows, s = z z^T / temperature, self excluded. ids=None: the positive of
    row i is its other view (row i + N, resp. i - N); this is the reference's mean cross-entropy.
    ids: (N,) int; every row (of the 2N) with the anchor's id is a positive, its other view
    included: loss_i = -(1/|P(i)|) sum_{p in P(i)} log softmax_{k != i}(s_i)_p; mean over 2N.
    """
    n = a.shape[0]
    z = _normalise(jnp.concatenate([a, b], axis=0))
    s = jnp.matmul(z, z.T, precision=_HIGHEST) / jnp.asarray(temperature, jnp.float32)
    # distinct ids: the other view is the only positive
    ids = jnp.arange(n) if ids is None else jnp.asarray(ids)
    ids2 = jnp.concatenate([ids, ids])
    pos = (ids2[:, None] == ids2[None, :]) & ~jnp.eye(2 * n, dtype=bool)
    return jnp.mean(_row_losses(s, pos))


def clocs_cmsc(h1v1, h1v2, h2v1, h2v2, temperature, ids=None):
    """CLOCS CMSC loss. hXvY: (N, D) projections of half X under augmentation Y -> float32 scalar.

    nt_xent(h1v1, h1v2) + nt_xent(h2v1, h2v2) + nt_xent(h1v1, h2v2) + nt_xent(h2v1, h1v2),
    each with the same ids.
    """
    t, i = temperature, ids
    return (
        nt_xent(h1v1, h1v2, t, i)
        + nt_xent(h2v1, h2v2, t, i)
        + nt_xent(h1v1, h2v2, t, i)
        + nt_xent(h2v1, h1v2, t, i)
    )


def multi_view_nt_xent(views, temperature, ids=None, reduction="mean"):
    """NT-Xent over every pair of views. views: (V, N, D) -> float32 scalar.

    Equals sum (reduction="sum") or mean (reduction="mean") over pairs i < j of
    nt_xent(views[i], views[j], temperature, ids). CMLC: views = leads; CMSMLC: views = halves x
    leads. Computed from one (V N, V N) similarity matrix: per anchor row, the log-sum-exp over
    each (V, N) block is reused by every pair that contains it.
    """
    v, n, d = views.shape
    if v < 2:
        raise ValueError(f"multi_view_nt_xent: need at least 2 views, got {v}")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"multi_view_nt_xent: reduction must be 'mean' or 'sum', got {reduction!r}"
        )
    z = _normalise(views.reshape(v * n, d))
    s = jnp.matmul(z, z.T, precision=_HIGHEST) / jnp.asarray(temperature, jnp.float32)
    s = s.reshape(v, n, v, n)  # s[a, r, b, k]
    eye_n = jnp.eye(n, dtype=bool)
    self_mask = jnp.eye(v, dtype=bool)[:, None, :, None] & eye_n[None, :, None, :]
    s_masked = jnp.where(self_mask, _NEG, s)
    block_lse = jax.nn.logsumexp(s_masked, axis=3)  # (V, N, V): anchor (a, r) vs block b
    if ids is None:
        same = eye_n
    else:
        ids = jnp.asarray(ids)
        same = ids[:, None] == ids[None, :]
    # Sum of s over positives of anchor (a, r) inside block b (self excluded when b == a).
    pos = same[None, :, None, :] & ~self_mask
    block_pos = jnp.sum(jnp.where(pos, s, 0.0), axis=3)  # (V, N, V)
    block_cnt = jnp.sum(pos, axis=3)  # (V, N, V) int (count, broadcast over a)
    diag = lambda t: jnp.diagonal(t, axis1=0, axis2=2).T  # (V, N, V) -> (V, N): block b == a
    # Anchor (a, r) in the pair (a, b): its own view's block plus view b's block.
    lse_pair = jnp.logaddexp(diag(block_lse)[:, :, None], block_lse)
    pos_pair = diag(block_pos)[:, :, None] + block_pos
    cnt_pair = diag(block_cnt)[:, :, None] + block_cnt
    # (V, N, V): row loss of (a, r) in pair (a, b)
    row = lse_pair - pos_pair / jnp.maximum(cnt_pair, 1)
    # (V, V): sum over the N anchors of view a in pair (a, b)
    per_anchor_view = jnp.sum(row, axis=1)
    pair = (per_anchor_view + per_anchor_view.T) / (2 * n)  # pair loss, symmetric
    iu = jnp.triu_indices(v, k=1)
    total = jnp.sum(pair[iu])
    return total if reduction == "sum" else total / iu[0].shape[0]


def bce_with_logits(logits, labels, mask=None):
    """Mean binary cross-entropy on logits (stable: optax.sigmoid_binary_cross_entropy).

    logits: (B,) or (B, 1); labels: (B,) in {0, 1} (or probabilities); mask: (B,) bool/0-1 weights,
    the loss is then the masked mean (0 when the mask is empty). Returns a float32 scalar.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if logits.ndim == labels.ndim + 1 and logits.shape[-1] == 1:
        logits = logits[..., 0]
    if logits.shape != labels.shape:
        raise ValueError(f"bce_with_logits: logits {logits.shape} and labels {labels.shape} differ")
    per = optax.sigmoid_binary_cross_entropy(logits, labels)
    if mask is None:
        return jnp.mean(per)
    w = jnp.asarray(mask, jnp.float32).reshape(per.shape)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
