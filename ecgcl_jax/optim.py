"""Training recipes: the one optimizer factory of pretraining and fine-tuning (learning-rate schedule,
optimizer, gradient clipping), all through optax.

A recipe is read from a config section (``config.optim`` for pretraining, ``config.finetune`` for
fine-tuning; the fields are declared in configs/base.py and configs/eval.py) by `recipe`, which checks
every field, and turned into an ``optax.GradientTransformation`` by `make_optimizer`.

Schedules (learning rate of the update with 0-based optimizer count t; W = warmup_steps, D = decay_steps,
lr = learning_rate, r = min_lr_ratio):
  constant         lr.
  warmup_cosine    lr * t / W for t < W; then lr * (r + (1 - r) * (1 + cos(pi * s)) / 2) with
                   s = min(t - W, D - W) / (D - W): a cosine from lr down to r * lr at t = D, r * lr after.
  warmup_constant  lr * t / W for t < W, then lr.
The count is the optimizer's own (in its state, so it is checkpointed with it, and a step whose update is
skipped as non-finite does not advance it).

Optimizers (g: the gradient, p: the parameters, wd: weight_decay):
  adam_l2  Adam on g + wd * p (torch.optim.Adam's weight_decay): optax.chain(add_decayed_weights, adam).
  adamw    Adam with decoupled decay: update -lr_t * (adam(g) + wd * p) (optax.adamw; torch.optim.AdamW).
  lars     optax.lars: g + wd * p scaled per array by trust_coefficient * |p| / |g + wd * p|, times lr_t,
           then heavy-ball momentum. Biases and normalisation scales (arrays of one dimension) get neither
           the decay nor the trust ratio, as in SimCLR's LARS.
clip_norm > 0 first rescales the whole gradient to a global L2 norm of at most clip_norm.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import optax

from ecgcl_jax.errors import UserError

OPTIMIZERS = ("adam_l2", "adamw", "lars")
SCHEDULES = ("constant", "warmup_cosine", "warmup_constant")


# The recipe fields' values that reproduce a run whose saved config predates them (constant-rate Adam with L2;
# b1, b2, eps were optax's defaults in fine-tuning): a workdir saved then still resumes.
_BEFORE_RECIPES = {
    "optimizer": "adam_l2",
    "schedule": "constant",
    "warmup_steps": 0,
    "decay_steps": 0,
    "min_lr_ratio": 0.0,
    "clip_norm": 0.0,
    "momentum": 0.9,
    "trust_coefficient": 1e-3,
}
_BEFORE_RECIPES_FINETUNE = {**_BEFORE_RECIPES, "b1": 0.9, "b2": 0.999, "eps": 1e-8}


def fields_before_recipes(prefix: str, finetune: bool = False) -> dict:
    """{prefix + field: value} for configdiff.changed_fields(absent_as=...): see _BEFORE_RECIPES."""
    fields = _BEFORE_RECIPES_FINETUNE if finetune else _BEFORE_RECIPES
    return {prefix + k: v for k, v in fields.items()}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A checked training recipe (hashable: a cache key for compiled steps). decay_steps is resolved:
    the cosine's total length in optimizer steps (0 for the other schedules). Built only by `recipe` from a
    config section; the fields' defaults and meanings are declared in configs/base.py (add_recipe_fields)."""

    optimizer: str
    schedule: str
    learning_rate: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float
    clip_norm: float
    momentum: float
    trust_coefficient: float


def recipe(section, total_steps: int | None, field: str = "config.optim") -> Recipe:
    """The recipe of config `section` (config.optim or config.finetune), every field checked.

    total_steps: optimizer steps of the whole run, the cosine's length when section.decay_steps is 0; None
    when not known yet (then only the fields are checked, and the cosine's length is left 0).
    field: the section's dotted name, for messages ("config.optim", "config.pretrain.optim", ...).
    Raises UserError naming the full field and its allowed range.
    """

    def get(name):
        try:
            return section[name]
        except (KeyError, AttributeError):
            raise UserError(
                f"{field}: lacks field {name} (a config from an older version?)"
            ) from None

    def num(name, lo, hi, lo_open=False, hi_open=True):
        v = get(name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = (
            ok
            and (v > lo if lo_open else v >= lo)
            and (hi is None or (v < hi if hi_open else v <= hi))
        )
        if not ok:
            lb, rb = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
            raise UserError(
                f"{field}.{name}: must be a number in {lb}{lo}, {'inf' if hi is None else hi}{rb} (got {v!r})"
            )
        return float(v)

    def count(name):
        v = get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"{field}.{name}: must be an integer >= 0 (got {v!r})")
        return int(v)

    optimizer, schedule = get("optimizer"), get("schedule")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"{field}.optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise UserError(f"{field}.schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    r = dict(
        optimizer=optimizer,
        schedule=schedule,
        learning_rate=num("learning_rate", 0.0, None, lo_open=True),
        weight_decay=num("weight_decay", 0.0, None),
        b1=num("b1", 0.0, 1.0),
        b2=num("b2", 0.0, 1.0),
        eps=num("eps", 0.0, None),
        warmup_steps=count("warmup_steps"),
        decay_steps=count("decay_steps"),
        min_lr_ratio=num("min_lr_ratio", 0.0, 1.0, hi_open=False),
        clip_norm=num("clip_norm", 0.0, None),
        momentum=num("momentum", 0.0, 1.0),
        trust_coefficient=num("trust_coefficient", 0.0, None, lo_open=True),
    )
    # a field that the schedule ignores would be a silent no-op: refused instead
    if schedule == "constant" and r["warmup_steps"]:
        raise UserError(
            f"{field}.warmup_steps: must be 0 with schedule 'constant' (got {r['warmup_steps']}); "
            "use warmup_constant or warmup_cosine"
        )
    if schedule == "warmup_constant" and not r["warmup_steps"]:
        raise UserError(
            f"{field}.warmup_steps: must be >= 1 with schedule 'warmup_constant' (got 0; that is 'constant')"
        )
    if schedule != "warmup_cosine":
        for name in ("decay_steps", "min_lr_ratio"):
            if r[name]:
                raise UserError(
                    f"{field}.{name}: only used by schedule 'warmup_cosine'; must be 0 with {schedule!r} "
                    f"(got {r[name]})"
                )
        return Recipe(**r)
    length = r["decay_steps"] or (int(total_steps) if total_steps is not None else 0)
    if length and length <= r["warmup_steps"]:
        what = f"got {length}" if r["decay_steps"] else f"0: the run's {length} steps"
        raise UserError(
            f"{field}.decay_steps: the cosine needs more steps than warmup_steps={r['warmup_steps']} ({what})"
        )
    r["decay_steps"] = length
    return Recipe(**r)


def schedule(r: Recipe) -> float | optax.Schedule:
    """The learning rate: a float for 'constant' (optax then keeps no count of its own, as before schedules
    existed), else an optax schedule of the 0-based optimizer count."""
    if r.schedule == "constant":
        return r.learning_rate
    if r.schedule == "warmup_constant":
        return optax.linear_schedule(0.0, r.learning_rate, r.warmup_steps)
    if r.decay_steps <= r.warmup_steps:
        raise ValueError("warmup_cosine needs a resolved decay_steps > warmup_steps (optim.recipe)")
    return optax.warmup_cosine_decay_schedule(
        0.0,
        r.learning_rate,
        r.warmup_steps,
        r.decay_steps,
        end_value=r.learning_rate * r.min_lr_ratio,
    )


def learning_rate_at(r: Recipe, count: int) -> float:
    """The learning rate of the update with 0-based optimizer count `count`, by the same optax schedule."""
    s = schedule(r)
    return float(s(count)) if callable(s) else float(s)


def _matrices(params):
    """True for the arrays of more than one dimension (kernels), False for biases and norm scales."""
    return jax.tree.map(lambda p: np.ndim(p) > 1, params)


def make_optimizer(r: Recipe) -> optax.GradientTransformation:
    """The GradientTransformation of recipe `r` (see the module docstring)."""
    lr = schedule(r)
    if r.optimizer == "adam_l2":
        tx = optax.chain(
            optax.add_decayed_weights(r.weight_decay),
            optax.adam(lr, b1=r.b1, b2=r.b2, eps=r.eps),
        )
    elif r.optimizer == "adamw":
        tx = optax.adamw(lr, b1=r.b1, b2=r.b2, eps=r.eps, weight_decay=r.weight_decay)
    elif r.optimizer == "lars":
        tx = optax.lars(
            lr,
            weight_decay=r.weight_decay,
            weight_decay_mask=_matrices,
            trust_coefficient=r.trust_coefficient,
            trust_ratio_mask=_matrices,
            momentum=r.momentum,
        )
    else:
        raise ValueError(f"unknown optimizer {r.optimizer!r} (optim.recipe checks it)")
    if r.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(r.clip_norm), tx)
    return tx
