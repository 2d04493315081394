"""Fine-tuning: padded prediction, the optimizer step against a hand-derived update, linear-probe
equivalence, plugging a pretrained encoder, and best-epoch selection with a fake model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import ecgcl_jax
from configs import eval as eval_config
from ecgcl_jax import finetune, models
from ecgcl_jax.errors import UserError
from tests.conftest import TINY, view_spec


def ft_config(**kw):
    c = ml_collections.ConfigDict(eval_config.get_config().finetune.to_dict())  # every recipe field
    c.update(
        dict(
            num_epochs=2,
            batch_size=8,
            learning_rate=1e-3,
            weight_decay=1e-4,
            head_dropout=0.3,
            aggregate="concat",
        )
    )
    c.update(kw)
    return c


class FakeDataset:
    """Minimal stand-in for ecgcl_jax.data.Dataset: raw int16 counts, per-record scales, labels."""

    def __init__(self, n=21, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = (np.arange(n) % 3 == 0).astype(np.float32)
        t = np.arange(ecgcl_jax.NUM_SAMPLES) / ecgcl_jax.SAMPLE_RATE
        x = rng.normal(0, 0.1, (n, ecgcl_jax.NUM_SAMPLES, 12))
        x += (0.2 + 0.8 * self.labels[:, None, None]) * np.sin(2 * np.pi * 1.2 * t)[None, :, None]
        self.scales = np.full(n, 0.005, np.float32)
        self.raw = np.round(x / 0.005).astype(np.int16)
        self.patient_ids = np.array([f"p{i}" for i in range(n)])
        self.records = np.array([f"r{i}" for i in range(n)])

    def __len__(self):
        return len(self.labels)


def test_batches_cover_every_record():
    seen = []
    for pos, mask in finetune.padded_batches(11, 4):
        assert len(pos) == 4 and len(mask) == 4
        seen += list(pos[mask])
    assert seen == list(range(11))
    for n, b in ((11, 4), (8, 4), (3, 3)):
        batches = list(finetune.epoch_batches(n, b, np.random.default_rng(0)))
        assert all(len(p) == b for p in batches) and len(batches) == -(-n // b)
        assert set(np.concatenate(batches)) == set(range(n))


def _features(n=13, v=1, e=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, v, e)).astype(np.float32)
    y = (rng.uniform(size=n) < 0.5).astype(np.float32)
    return x, y


def test_step_is_l2_plus_adam_and_predict_pads():
    """One step of the linear head vs a float64 hand derivation: g = X^T(sigmoid(Xw+b) - y)/B + wd*w, and the
    first Adam update is -lr * g / (|g| + eps)."""
    lr, wd = 1e-2, 0.1
    x, y = _features(n=8)
    tr = finetune.probe_trainer(
        5, view_spec(), ft_config(learning_rate=lr, weight_decay=wd, batch_size=8)
    )
    variables = tr.model.init(jax.random.key(0), jnp.asarray(x), train=False)
    w0 = np.asarray(variables["params"]["out"]["kernel"], np.float64)[:, 0]
    b0 = float(variables["params"]["out"]["bias"][0])
    state = finetune.new_state(variables, tr.tx)
    state, m = tr.step(state, {"x": x, "y": y}, jax.random.key(1))
    X = x[:, 0].astype(np.float64)
    z = X @ w0 + b0
    p = 1 / (1 + np.exp(-z))
    loss = np.mean(np.logaddexp(0, z) - y * z)
    gw = X.T @ (p - y) / 8 + wd * w0
    gb = np.mean(p - y) + wd * b0
    assert float(m["loss"]) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(
        np.asarray(state.params["out"]["kernel"])[:, 0],
        w0 - lr * gw / (np.abs(gw) + 1e-8),
        rtol=1e-4,
        atol=1e-6,
    )
    assert float(state.params["out"]["bias"][0]) == pytest.approx(
        b0 - lr * gb / (abs(gb) + 1e-8), rel=1e-4
    )
    # predict over 13 records with batch 8: 13 probabilities, equal to a float64 forward of all at once
    x13, y13 = _features(n=13, seed=1)
    probs = tr.predict(state, finetune.FeatureSource(x13, y13))
    w1 = np.asarray(state.params["out"]["kernel"], np.float64)[:, 0]
    b1 = float(state.params["out"]["bias"][0])
    np.testing.assert_allclose(
        probs, 1 / (1 + np.exp(-(x13[:, 0].astype(np.float64) @ w1 + b1))), rtol=1e-5
    )


def test_plug_encoder_and_linear_probe_equivalence():
    ds = FakeDataset(n=10)
    spec = view_spec(mode="cmsc")
    max_amp = 2.0
    enc = models.build_encoder(TINY)
    enc_vars = enc.init(
        {"params": jax.random.key(3), "dropout": jax.random.key(3)},
        jnp.zeros((2, 2500, 12)),
        train=False,
    )
    enc_vars = jax.tree.map(lambda a: a + 0.01, dict(enc_vars))  # distinguishable from a fresh init
    cfg = ft_config(aggregate="mean")
    # end-to-end classifier with the encoder plugged in
    tr = finetune.classifier_trainer(TINY, spec, cfg, linear=True)
    cv = finetune.classifier_variables(tr.model, spec, jax.random.key(4), enc_vars)
    for col in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, cv[col]["encoder"], enc_vars[col])
    src = finetune.RawSource(ds, np.arange(10), max_amp)
    direct = tr.predict(finetune.new_state(cv, tr.tx), src)
    # linear probe on precomputed embeddings with the same head params
    emb = finetune.embed_rows(TINY, spec, enc_vars, ds, np.arange(10), max_amp, batch_size=4)
    assert emb.shape == (10, 2, 8)
    probe = finetune.probe_trainer(8, spec, cfg)
    head_vars = {"params": cv["params"]["head"]}
    via_probe = probe.predict(
        finetune.new_state(head_vars, probe.tx), finetune.FeatureSource(emb, src.labels)
    )
    np.testing.assert_allclose(via_probe, direct, rtol=1e-4, atol=1e-6)


def test_best_epoch_selection_with_fake_model():
    val_y = np.array([0, 0, 1, 1])
    # validation AUROC per epoch: 0.5, 1.0, 0.75, 1.0 (tie -> earliest, epoch 2)
    val_probs = {
        1: [0.5, 0.5, 0.5, 0.5],
        2: [0.1, 0.2, 0.8, 0.9],
        3: [0.1, 0.4, 0.35, 0.8],
        4: [0.1, 0.2, 0.3, 0.4],
    }
    calls = []

    def train_epoch(state, epoch):
        return {"epoch": epoch}, 1.0 / epoch

    def predict(state, name):
        calls.append((name, state["epoch"]))
        if name == "val":
            return np.array(val_probs[state["epoch"]])
        return np.array([0.3, 0.6]) if state["epoch"] == 2 else np.array([0.6, 0.3])

    out = finetune.fit_and_select(
        {"epoch": 0}, 4, train_epoch, predict, val_y, np.array([0, 1]), snapshot=dict
    )
    assert out["best_epoch"] == 2
    assert [c for c in calls if c[0] == "test"] == [
        ("test", 2)
    ]  # test scored once, with epoch 2's state
    assert out["test"]["auroc"] == 1.0
    assert [h["val"]["auroc"] for h in out["history"]] == [0.5, 1.0, 0.75, 1.0]
    assert out["val"]["auroc"] == 1.0
    # a diverged epoch (NaN predictions) stops with one line; scikit-learn raised a traceback on it
    val_probs[3] = [0.1, float("nan"), 0.3, 0.4]
    with pytest.raises(
        UserError,
        match=r"^fine-tuning diverged at epoch 3 \(non-finite predictions, train loss "
        r"0.3333\); lower config.finetune.learning_rate$",
    ):
        finetune.fit_and_select(
            {"epoch": 0}, 4, train_epoch, predict, val_y, np.array([0, 1]), snapshot=dict
        )
    # the selection rule: strictly better wins (ties keep the earliest); NaN only beats nothing
    nan = float("nan")
    assert finetune.better(0.6, None) and finetune.better(nan, None) and finetune.better(0.6, nan)
    assert (
        not finetune.better(0.7, 0.7)
        and not finetune.better(nan, 0.6)
        and not finetune.better(nan, nan)
    )


def test_masked_bce_step_against_numpy_with_unknown_labels():
    """C = 3 outputs, labels with NaN: the loss is the mean BCE over the known entries only, and the gradient of
    the head is X^T((sigmoid(XW+b) - y) * known) / n_known (+ L2), in float64."""
    lr, wd = 1e-2, 0.0
    x, _ = _features(n=8)
    rng = np.random.default_rng(3)
    y = (rng.uniform(size=(8, 3)) < 0.5).astype(np.float32)
    y[[0, 2, 5, 5], [1, 0, 0, 2]] = np.nan
    tr = finetune.probe_trainer(
        5,
        view_spec(),
        ft_config(learning_rate=lr, weight_decay=wd, batch_size=8),
        num_classes=3,
    )
    variables = tr.model.init(jax.random.key(0), jnp.asarray(x), train=False)
    W0 = np.asarray(variables["params"]["out"]["kernel"], np.float64)
    b0 = np.asarray(variables["params"]["out"]["bias"], np.float64)
    assert W0.shape == (5, 3)
    src = finetune.FeatureSource(x, y)
    batch = src.batch(np.arange(8))
    state, m = tr.step(finetune.new_state(variables, tr.tx), batch, jax.random.key(1))
    X = x[:, 0].astype(np.float64)
    z = X @ W0 + b0
    known = ~np.isnan(y)
    yy = np.nan_to_num(y.astype(np.float64))
    per = np.logaddexp(0, z) - yy * z
    assert float(m["loss"]) == pytest.approx(per[known].mean(), rel=1e-5)
    g = (1 / (1 + np.exp(-z)) - yy) * known / known.sum()
    gw = X.T @ g
    np.testing.assert_allclose(
        np.asarray(state.params["out"]["kernel"]),
        W0 - lr * gw / (np.abs(gw) + 1e-8),
        rtol=1e-4,
        atol=1e-6,
    )
    # an unknown entry's label value does not matter
    other = dict(batch, y=np.where(known, batch["y"], 1.0).astype(np.float32))
    _, m2 = tr.step(finetune.new_state(variables, tr.tx), other, jax.random.key(1))
    assert float(m2["loss"]) == float(m["loss"])
    probs = tr.predict(state, src)
    assert probs.shape == (8, 3)


def test_multilabel_finetune_separates_a_synthetic_task():
    """Three classes, each decided by its own embedding coordinate, 10% of the labels unknown: a Dense(3) head
    fine-tuned for a few epochs separates them, and the kept epoch has the best validation macro-AUROC."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 1, 6)).astype(np.float32)
    y = (x[:, 0, :3] + 0.1 * rng.normal(size=(160, 3)) > 0).astype(np.float32)
    y[rng.uniform(size=y.shape) < 0.1] = np.nan
    tr = finetune.probe_trainer(
        6, view_spec(), ft_config(batch_size=16, learning_rate=0.2), num_classes=3
    )
    head = tr.init_head(jax.random.key(0), x)
    train, val, test = (
        finetune.FeatureSource(x[s], y[s]) for s in np.split(np.arange(160), [96, 128])
    )
    out = finetune.run_finetune(
        tr, head, train, val, test, 8, jax.random.key(1), 0, ["a", "b", "c"]
    )
    assert out["test_probs"].shape == (32, 3)
    assert out["test"]["classes_used"] == 3 and set(out["test"]["per_class"]) == {"a", "b", "c"}
    assert out["test"]["macro_auroc"] > 0.9
    vals = [h["val"]["macro_auroc"] for h in out["history"]]
    assert out["best_epoch"] == 1 + int(np.argmax(vals))
