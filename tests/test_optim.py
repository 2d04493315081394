"""Training recipes (ecgcl_jax.optim): schedules against their closed form, AdamW / LARS / clipping against
float64 NumPy updates, the default against the literal Adam + L2 chain, one-line field errors, and pretraining
resumed mid-warmup and mid-decay against an uninterrupted run (learning_rate in metrics.jsonl)."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base, cnn, simclr_recipe
from configs import eval as eval_config
from ecgcl_jax import augment, evaluate, finetune, optim, pretrain, rundir
from ecgcl_jax.errors import UserError
from tests.conftest import read_metrics, small_config, view_spec
from tests.test_finetune import _features, ft_config


def section(**kw):
    """config.optim of configs/base.py with fields replaced."""

    c = ml_collections.ConfigDict(base.get_config().optim.to_dict())
    c.update(kw)
    return c


def lr_closed_form(t, kind, lr, warmup=0, decay=0, ratio=0.0):
    """Learning rate of the update with 0-based count t, written from the definition."""
    if kind == "constant":
        return lr
    if t < warmup:
        return lr * t / warmup
    if kind == "warmup_constant":
        return lr
    s = min(t - warmup, decay - warmup) / (decay - warmup)
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * s)))


PARAMS = {
    "w": np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], np.float32),
    "b": np.array([0.1, -0.2], np.float32),
}
GRADS = [
    {
        "w": np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.05]], np.float32),
        "b": np.array([0.2, -0.1], np.float32),
    },
    {
        "w": np.array([[-0.1, 0.6], [0.2, -0.3], [0.15, 0.25]], np.float32),
        "b": np.array([-0.05, 0.3], np.float32),
    },
]


def run_optax(r, steps=2):
    """Parameters (float64) after `steps` updates of make_optimizer(r) with the fixed GRADS."""
    tx = optim.make_optimizer(r)
    params = jax.tree.map(jnp.asarray, PARAMS)
    state = tx.init(params)
    for g in GRADS[:steps]:
        upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, upd)
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


@pytest.mark.parametrize(
    "kind,warmup,decay,ratio",
    [
        ("constant", 0, 0, 0.0),
        ("warmup_constant", 5, 0, 0.0),
        ("warmup_cosine", 4, 20, 0.1),
        ("warmup_cosine", 0, 10, 0.0),
    ],
)
def test_learning_rate_at_chosen_steps_is_the_closed_form(kind, warmup, decay, ratio):
    r = optim.recipe(
        section(
            schedule=kind,
            learning_rate=3e-3,
            warmup_steps=warmup,
            decay_steps=decay,
            min_lr_ratio=ratio,
        ),
        total_steps=999,
    )
    for t in [0, 1, 2, 3, 4, 5, 7, 10, 12, 19, 20, 21, 50]:
        want = lr_closed_form(t, kind, 3e-3, warmup, decay, ratio)
        assert optim.learning_rate_at(r, t) == pytest.approx(want, rel=1e-6, abs=1e-12), t


def test_cosine_length_defaults_to_the_run():
    r = optim.recipe(section(schedule="warmup_cosine", warmup_steps=2), total_steps=30)
    assert r.decay_steps == 30
    assert optim.learning_rate_at(r, 30) == pytest.approx(0.0, abs=1e-12)
    assert optim.learning_rate_at(r, 16) == pytest.approx(
        lr_closed_form(16, "warmup_cosine", 1e-5, 2, 30)
    )


@pytest.mark.parametrize("where", ["optim", "finetune"])
def test_default_recipe_is_the_literal_adam_plus_l2_chain(where):
    """The defaults build exactly the chain that pretraining and fine-tuning used before recipes existed:
    same updates bit for bit, same optimizer-state structure (so existing checkpoints restore)."""

    if where == "optim":
        sec, field = base.get_config().optim, "config.optim"
        old = optax.chain(
            optax.add_decayed_weights(sec.weight_decay),
            optax.adam(sec.learning_rate, b1=sec.b1, b2=sec.b2, eps=sec.eps),
        )
    else:
        sec, field = eval_config.get_config().finetune, "config.finetune"
        old = optax.chain(
            optax.add_decayed_weights(float(sec.weight_decay)), optax.adam(float(sec.learning_rate))
        )
    new = optim.make_optimizer(optim.recipe(sec, 300, field))
    p_old = p_new = jax.tree.map(jnp.asarray, PARAMS)
    s_old, s_new = old.init(p_old), new.init(p_new)
    assert jax.tree.structure(s_old) == jax.tree.structure(s_new)
    for g in GRADS + GRADS:
        g = jax.tree.map(jnp.asarray, g)
        u_old, s_old = old.update(g, s_old, p_old)
        u_new, s_new = new.update(g, s_new, p_new)
        p_old, p_new = optax.apply_updates(p_old, u_old), optax.apply_updates(p_new, u_new)
    jax.tree.map(np.testing.assert_array_equal, p_new, p_old)
    jax.tree.map(np.testing.assert_array_equal, s_new, s_old)


def test_adamw_with_cosine_against_numpy():
    lr, wd, b1, b2, eps = 0.05, 0.1, 0.8, 0.95, 1e-6
    r = optim.recipe(
        section(
            optimizer="adamw",
            schedule="warmup_cosine",
            learning_rate=lr,
            weight_decay=wd,
            b1=b1,
            b2=b2,
            eps=eps,
            decay_steps=4,
            min_lr_ratio=0.2,
        ),
        total_steps=100,
    )
    p = f64(PARAMS)
    m = {k: 0.0 * v for k, v in p.items()}
    v = {k: 0.0 * x for k, x in p.items()}
    for t, g in enumerate(GRADS):
        lr_t = lr_closed_form(t, "warmup_cosine", lr, 0, 4, 0.2)
        for k in p:
            gk = g[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            mh, vh = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
            p[k] = p[k] - lr_t * (mh / (np.sqrt(vh) + eps) + wd * p[k])
    got = run_optax(r)
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=2e-6, atol=1e-7)


def test_lars_against_numpy():
    """LARS: kernels get L2 and the trust ratio, 1-D arrays neither; then the learning rate and momentum."""
    lr, wd, mu, tc = 0.5, 0.01, 0.9, 0.02
    r = optim.recipe(
        section(
            optimizer="lars", learning_rate=lr, weight_decay=wd, momentum=mu, trust_coefficient=tc
        ),
        total_steps=10,
    )
    p = f64(PARAMS)
    buf = {k: 0.0 * x for k, x in p.items()}
    for g in GRADS:
        for k in p:
            u = g[k].astype(np.float64)
            if p[k].ndim > 1:
                u = u + wd * p[k]
                u = u * tc * np.linalg.norm(p[k]) / np.linalg.norm(u)
            buf[k] = -lr * u + mu * buf[k]
            p[k] = p[k] + buf[k]
    got = run_optax(r)
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=2e-6, atol=1e-7)


def test_clipping_rescales_the_gradient_before_l2_and_adam():
    """Both steps' gradients (norms > clip) are scaled to norm clip_norm, by different factors; the L2 term
    is added after clipping. Adam's second step depends on the ratio of the two, so clipping shows."""
    lr, wd, clip = 0.01, 0.05, 0.5
    r = optim.recipe(
        section(learning_rate=lr, weight_decay=wd, clip_norm=clip, eps=1e-8), total_steps=10
    )
    norms = [math.sqrt(sum(float(np.sum(g[k].astype(np.float64) ** 2)) for k in g)) for g in GRADS]
    assert norms[0] > clip > 0 and norms[1] > clip  # both clipped, by different factors
    p = f64(PARAMS)
    m = {k: 0.0 * v for k, v in p.items()}
    v = {k: 0.0 * x for k, x in p.items()}
    for t, g in enumerate(GRADS):
        scale = min(1.0, clip / norms[t])
        for k in p:
            gk = g[k].astype(np.float64) * scale + wd * p[k]
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.999 * v[k] + 0.001 * gk**2
            mh, vh = m[k] / (1 - 0.9 ** (t + 1)), v[k] / (1 - 0.999 ** (t + 1))
            p[k] = p[k] - lr * mh / (np.sqrt(vh) + 1e-8)
    got = run_optax(r)
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=2e-6, atol=1e-7)
    unclipped = run_optax(optim.recipe(section(learning_rate=lr, weight_decay=wd), total_steps=10))
    assert not np.allclose(unclipped["w"], got["w"], rtol=1e-4, atol=0)


BAD_FIELDS = [
    ({"optimizer": "sgd"}, "config.optim.optimizer"),
    ({"schedule": "cosine"}, "config.optim.schedule"),
    ({"learning_rate": 0.0}, "config.optim.learning_rate"),
    ({"weight_decay": -1e-4}, "config.optim.weight_decay"),
    ({"b2": 1.0}, "config.optim.b2"),
    ({"warmup_steps": 5}, "config.optim.warmup_steps"),  # constant schedule: would be ignored
    ({"schedule": "warmup_constant"}, "config.optim.warmup_steps"),
    ({"schedule": "warmup_cosine", "warmup_steps": -1}, "config.optim.warmup_steps"),
    (
        {"schedule": "warmup_cosine", "warmup_steps": 10, "decay_steps": 10},
        "config.optim.decay_steps",
    ),
    (
        {"schedule": "warmup_cosine", "warmup_steps": 300},
        "config.optim.decay_steps",
    ),  # 0 = num_steps
    ({"schedule": "warmup_cosine", "min_lr_ratio": 1.5}, "config.optim.min_lr_ratio"),
    ({"decay_steps": 100}, "config.optim.decay_steps"),  # only for warmup_cosine
    ({"clip_norm": -1.0}, "config.optim.clip_norm"),
    ({"optimizer": "lars", "momentum": 1.0}, "config.optim.momentum"),
    ({"optimizer": "lars", "trust_coefficient": 0.0}, "config.optim.trust_coefficient"),
]


@pytest.mark.parametrize("fields,needle", BAD_FIELDS)
def test_a_bad_field_is_one_line_naming_it(fields, needle):
    c = cnn.get_config()
    c.optim.update(fields)
    with pytest.raises(UserError) as e:
        pretrain.validate_config(c, 8)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(needle + ":"), msg
    with pytest.raises(UserError) as e:  # inside an evaluation: the full dotted name from there
        pretrain.validate_config(c, 8, "config.pretrain")
    assert str(e.value).startswith(needle.replace("config.", "config.pretrain.") + ":")


def test_a_bad_finetune_field_is_one_line_naming_it():
    c = eval_config.get_config()
    c.finetune.schedule = "warmup_linear"
    with pytest.raises(
        UserError, match=r"^config\.finetune\.schedule: 'warmup_linear' is not one of"
    ):
        evaluate.validate(evaluate.resolve_split(c))
    # a cosine over all fine-tuning steps: its length is checked per seed's split before any training
    c = eval_config.get_config()
    c.finetune.schedule, c.finetune.warmup_steps = "warmup_cosine", 10**6
    with pytest.raises(
        UserError, match=r"^config\.finetune\.decay_steps: the cosine needs more steps"
    ):
        evaluate.plan_evaluation(c)
    for field, value, needle in (
        ("aggregate", "max", r"^config\.finetune\.aggregate: 'max' is not one of concat, sum"),
        ("head_dropout", 1.0, r"^config\.finetune\.head_dropout: must be in \[0, 1\) \(got 1\.0\)"),
        ("num_epochs", 0, r"^config\.finetune\.num_epochs: must be a positive integer \(got 0\)"),
    ):
        c = eval_config.get_config()
        c.finetune[field] = value
        with pytest.raises(UserError, match=needle):
            finetune.validate_config(c.finetune)


def test_finetune_history_records_the_learning_rate_of_each_epoch():
    """Cosine over all epochs' steps: 3 epochs x ceil(10 / 4) = 9 steps; epoch e ends with count 3e - 1."""

    cfg = ft_config(
        num_epochs=3,
        batch_size=4,
        learning_rate=0.01,
        optimizer="adamw",
        schedule="warmup_cosine",
        warmup_steps=2,
    )
    x, y = _features(n=10)
    tr = finetune.probe_trainer(5, view_spec(), cfg, train_size=10)
    assert tr.recipe.decay_steps == 9
    head = tr.init_head(jax.random.key(0), x)
    src = finetune.FeatureSource(x, y)
    out = finetune.run_finetune(tr, head, src, src, src, 3, jax.random.key(1), seed=0)
    got = [h["learning_rate"] for h in out["history"]]
    want = [lr_closed_form(3 * e - 1, "warmup_cosine", 0.01, 2, 9) for e in (1, 2, 3)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_resume_mid_warmup_and_mid_decay_equals_uninterrupted(tmp_path):
    """An uninterrupted run checkpoints every step; copies of its workdir cut back to step 2 (warmup) and
    step 5 (cosine) resume from there: the losses and the logged learning rates are those of the
    uninterrupted run (the schedule's count is restored with the optimizer state), and each logged rate is
    the closed form of its update."""

    recipe = {
        "optim.optimizer": "adamw",
        "optim.schedule": "warmup_cosine",
        "optim.warmup_steps": 3,
        "optim.min_lr_ratio": 0.1,
        "optim.clip_norm": 1.0,
        "optim.learning_rate": 2e-3,
        "checkpoint_every": 1,
        "keep_checkpoints": 7,
        "model.channels": (4, 4, 4, 4, 4),
        "model.emb_dim": 8,
        "model.proj_dim": 4,
    }
    full = str(tmp_path / "full")
    pretrain.run(small_config(num_steps=7, **recipe), full)
    a = read_metrics(full)
    assert [m["step"] for m in a] == list(range(1, 8))
    want = [lr_closed_form(s - 1, "warmup_cosine", 2e-3, 3, 7, 0.1) for s in range(1, 8)]
    np.testing.assert_allclose([m["learning_rate"] for m in a], want, rtol=1e-6)
    for cut in (2, 5):
        part = str(tmp_path / f"from{cut}")
        shutil.copytree(full, part)
        shutil.rmtree(os.path.join(part, "encoder"))
        for step in range(cut + 1, 8):
            shutil.rmtree(os.path.join(part, "checkpoints", str(step)))
        r = pretrain.run(small_config(num_steps=7, **recipe), part)
        assert r["steps"] == 7
        b = read_metrics(part)
        assert [m["step"] for m in b] == list(range(1, 8))
        np.testing.assert_allclose(
            [m["loss"] for m in b[cut:]], [m["loss"] for m in a[cut:]], atol=1e-5, rtol=0
        )
        np.testing.assert_allclose([m["learning_rate"] for m in b], want, rtol=1e-6)


def test_recipe_config_is_a_composed_pipeline_with_warmup_cosine_adamw():
    """configs/simclr_recipe.py: its composed views parse into pipelines of three ops, the config validates as
    it stands, and its recipe is AdamW with warmup + cosine over num_steps."""

    c = simclr_recipe.get_config()
    for view in (c.augment.view1, c.augment.view2):
        ops = augment.parse(view, 5000, 12, "config.augment.view1", False)
        assert len(ops) == 3 and any(op.prob < 1 for op in ops), view
    pretrain.validate_config(c, 8)
    r = optim.recipe(c.optim, c.num_steps)
    assert (r.optimizer, r.schedule, r.decay_steps) == ("adamw", "warmup_cosine", c.num_steps)
    assert 0 < r.warmup_steps < r.decay_steps


def test_workdirs_saved_before_the_recipe_fields_still_resume():
    """A saved config without the recipe fields ran constant-rate Adam + L2: the default config resumes it, a
    config with another recipe is refused, naming the field."""

    def without_recipe(cfg, *sections):
        d = json.loads(cfg.to_json())
        for sec in sections:
            node = d
            for part in sec.split("."):
                node = node[part]
            for k in ("optimizer", "schedule", "warmup_steps", "decay_steps", "min_lr_ratio"):
                del node[k]
            for k in ("clip_norm", "momentum", "trust_coefficient"):
                del node[k]
            if sec == "finetune":
                for k in ("b1", "b2", "eps"):
                    del node[k]
        return d

    c = cnn.get_config()
    saved = without_recipe(c, "optim")
    rundir.check_resume_config(saved, json.loads(c.to_json()), "w/config.json")
    c.optim.schedule, c.optim.warmup_steps = "warmup_constant", 10
    with pytest.raises(UserError, match=r"optim\.schedule: 'constant' -> 'warmup_constant'"):
        rundir.check_resume_config(saved, json.loads(c.to_json()), "w/config.json")
    e = eval_config.get_config()
    saved = without_recipe(e, "pretrain.optim", "finetune")
    evaluate.check_resume(saved, json.loads(e.to_json()), "ev/config.json")
    e.finetune.clip_norm = 1.0
    with pytest.raises(UserError, match=r"finetune\.clip_norm: 0\.0 -> 1\.0"):
        evaluate.check_resume(saved, json.loads(e.to_json()), "ev/config.json")
