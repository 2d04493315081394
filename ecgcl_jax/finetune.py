"""Fine-tuning a classifier on top of an encoder, per-epoch validation, best-epoch selection, prediction.

Data flow of one step (jitted once per architecture, state donated)::

    int16 batch (B, 5000, 12) ── × scale / max_amp, − lead mean ──▶ x (B, 5000, 12)
      ── views.input_views (CLOCS: halves and/or single leads; |FFT| in the frequency domain) ──▶ (B, [V,] L', C')
      ── models.Classifier (encoder ─▶ [aggregate over views] ─▶ Dense(emb) ─▶ ReLU ─▶ dropout ─▶ Dense(C))
      ── BCE on logits (mean over the known label entries) ──▶ grad ──▶ optimizer (optim.make_optimizer of
         config.finetune) ──▶ new state

Labels: one binary column (labels (n,), logits (B,): C = 1, every label known), or a task of C binary columns
(labels (n, C) float32 with NaN = unknown, logits (B, C)): C sigmoid outputs trained with binary cross-entropy
averaged over the known entries of the batch; unknown entries are masked out of the loss.

Two training methods:
  finetune      the whole classifier is trained end to end (the reference protocol).
  linear_probe  the encoder is frozen in eval mode (running BatchNorm statistics, no dropout); its embeddings
                of every record are computed once (`embed_rows`) and only a Dense(C) head (after the view
                aggregation) is trained on them: the same function as a frozen-encoder classifier, much cheaper.

Every epoch visits every training record (the last batch is filled up with records from the start of that
epoch's permutation, so all batches have one shape). `predict` never drops a record: the last batch is padded
and the padding masked out. The epoch with the best validation macro-AUROC (for C = 1 the AUROC) is kept
(ties: the earliest) and scored once on test.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ecgcl_jax
from ecgcl_jax import input_pipeline, losses, metrics, models, optim, views
from ecgcl_jax.errors import UserError


# ------------------------------------------------------------------------------------------------ inputs
def preprocess(raw: jax.Array, scale: jax.Array, max_amp: float, spec: views.ViewSpec) -> jax.Array:
    """raw: (B, L, C) int16 counts, scale: (B,) mV per count -> classifier input (see `views.input_views`)."""
    x = raw.astype(jnp.float32) * scale[:, None, None].astype(jnp.float32)
    return views.input_views(input_pipeline.normalize(x, max_amp), spec)


def gather(dataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw (n, L, C) int16, scale (n,) float32) of dataset rows, read in file order."""
    rows = np.asarray(rows, dtype=np.int64)
    return input_pipeline.read_rows(dataset.raw, rows), np.asarray(dataset.scales, np.float32)[rows]


def padded_batches(n: int, batch_size: int):
    """Yields (positions (batch_size,) int64, mask (batch_size,) bool) covering 0..n-1 once, in order;
    the last batch is padded with position n-1 and masked."""
    for start in range(0, n, batch_size):
        pos = np.arange(start, min(start + batch_size, n))
        mask = np.ones(batch_size, bool)
        if len(pos) < batch_size:
            mask[len(pos) :] = False
            pos = np.concatenate([pos, np.full(batch_size - len(pos), n - 1)])
        yield pos, mask


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator):
    """One epoch of training positions: a permutation in batches of `batch_size`; the last batch is filled
    up with the first positions of the same permutation (every record seen, one batch shape)."""
    perm = rng.permutation(n)
    for start in range(0, n, batch_size):
        pos = perm[start : start + batch_size]
        if len(pos) < batch_size:
            pos = np.concatenate([pos, perm[: batch_size - len(pos)]])
        yield pos


# ------------------------------------------------------------------------------------------------- state
@flax.struct.dataclass
class FinetuneState:
    step: jax.Array  # () int32
    params: Any
    batch_stats: Any
    opt_state: Any


def new_state(variables: dict, tx: optax.GradientTransformation) -> FinetuneState:
    """A fresh optimizer state over copies of `variables` (the step donates its state; the caller's
    variables, e.g. a pretrained encoder used again by another method, stay valid)."""
    params = _snapshot(variables["params"])
    return FinetuneState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=_snapshot(variables.get("batch_stats", {})),
        opt_state=tx.init(params),
    )


def classifier_variables(
    model: models.Classifier,
    spec: views.ViewSpec,
    key: jax.Array,
    encoder_variables: dict | None = None,
    input_length: int = ecgcl_jax.NUM_SAMPLES,
    leads: int = len(ecgcl_jax.LEADS),
) -> dict:
    """Initial classifier variables; with `encoder_variables` ({'params', 'batch_stats'} of the encoder
    module) the classifier's 'encoder' subtrees are the pretrained encoder's, the head is fresh."""
    variables = _init_fn(model, spec, int(input_length), int(leads))(key)
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    if encoder_variables is not None:
        variables = models.plug_encoder(variables, encoder_variables)
    return variables


@functools.lru_cache(maxsize=16)
def _init_fn(model, spec: views.ViewSpec, input_length: int, leads: int) -> Callable:
    dummy = views.input_views(jnp.zeros((2, input_length, leads), jnp.float32), spec)
    return jax.jit(lambda k: model.init({"params": k, "dropout": k}, dummy, train=False))


def make_finetune_step(model, tx: optax.GradientTransformation, to_input: Callable) -> Callable:
    """Returns jitted `finetune_step(state, batch, key) -> (state, {'loss'})` (state donated).

    model: a flax module called as model.apply(vars, x, train) -> logits (B,) or (B, C); batch: dict with 'y'
    (B,) or (B, C) 0/1 float32, optionally 'known' (the same shape, bool: entries in the loss; absent = all), and
    whatever `to_input(batch) -> x` reads. Dropout keys: fold_in(key, state.step).
    """

    def step(state: FinetuneState, batch: dict, key: jax.Array):
        k = jax.random.fold_in(key, state.step)
        x = to_input(batch)

        def loss_fn(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                rngs={"dropout": k},
                mutable=["batch_stats"],
            )
            loss = losses.bce_with_logits(logits, batch["y"], mask=batch.get("known"))
            return loss, upd.get("batch_stats", state.batch_stats)

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return (
            FinetuneState(
                step=state.step + 1,
                params=optax.apply_updates(state.params, updates),
                batch_stats=new_bs,
                opt_state=opt_state,
            ),
            {"loss": loss},
        )

    return jax.jit(
        step, donate_argnums=(0,), compiler_options=models.xla_compiler_options() or None
    )


def make_predict(model, to_input: Callable) -> Callable:
    """Returns jitted `predict_logits(params, batch_stats, batch) -> logits (B,) or (B, C)` in eval mode."""

    def fn(params, batch_stats, batch):
        return model.apply(
            {"params": params, "batch_stats": batch_stats}, to_input(batch), train=False
        )

    return jax.jit(fn)


# ----------------------------------------------------------------------------------------- data sources
def label_batch(labels: np.ndarray) -> dict:
    """{'y'} of one batch of labels (b,) (every one known, as today's single column), or {'y', 'known'} of labels
    (b, C) / labels with unknowns: NaN entries become 0 in 'y' and False in 'known' (out of the loss)."""
    if labels.ndim == 1 and not np.isnan(labels).any():
        return {"y": labels}
    known = ~np.isnan(labels)
    return {"y": np.where(known, labels, np.float32(0)), "known": known}


class RawSource:
    """Rows of a dataset as classifier batches {'raw', 'scale', 'max_amp', 'y'[, 'known']}; labels float32.

    max_amp: the normaliser's global scale (mV), fitted on the training split; it travels with the batch so
    that one compiled step serves every repeat. labels: the whole dataset's labels, (N,) 0/1 (default
    `dataset.labels`; the rows must all be known) or (N, C) 0/1/NaN (a task; NaN = unknown, masked).
    """

    # Splits up to this many int16 bytes are read into memory once; larger ones are read per batch.
    IN_MEMORY_LIMIT = 2 << 30

    def __init__(self, dataset, rows: np.ndarray, max_amp: float, labels: np.ndarray | None = None):
        self.dataset = dataset
        self.rows = np.asarray(rows, dtype=np.int64)
        labels = dataset.labels if labels is None else labels
        self.labels = np.asarray(labels, np.float32)[self.rows]
        if self.labels.ndim == 1 and np.isnan(self.labels).any():
            raise ValueError("RawSource: rows with unknown labels")
        self.max_amp = np.float32(max_amp)
        self.in_memory = (
            len(self.rows) * int(np.prod(dataset.raw.shape[1:])) * 2 <= self.IN_MEMORY_LIMIT
        )
        self.raw, self.scale = gather(dataset, self.rows) if self.in_memory else (None, None)

    def __len__(self):
        return len(self.rows)

    def arrays(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw (b, L, C) int16, scale (b,) float32) of positions `pos` in this source."""
        if self.in_memory:
            return self.raw[pos], self.scale[pos]
        return gather(self.dataset, self.rows[pos])

    def batch(self, pos: np.ndarray) -> dict:
        raw, scale = self.arrays(pos)
        return {
            "raw": raw,
            "scale": scale,
            "max_amp": self.max_amp,
            **label_batch(self.labels[pos]),
        }


class FeatureSource:
    """Precomputed embeddings as batches {'x': (B, V, E), 'y'[, 'known']} for the linear probe; labels (n,) or
    (n, C) with NaN = unknown (see `label_batch`)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.x = np.asarray(features, np.float32)
        self.labels = np.asarray(labels, np.float32)

    def __len__(self):
        return len(self.labels)

    def batch(self, pos: np.ndarray) -> dict:
        return {"x": self.x[pos], **label_batch(self.labels[pos])}


# -------------------------------------------------------------------------------------------- a trainer
@dataclasses.dataclass
class Trainer:
    """One architecture's jitted step and predict; reused across repeats and methods (compiled once)."""

    model: Any
    tx: optax.GradientTransformation
    step: Callable
    predict_logits: Callable
    batch_size: int
    recipe: optim.Recipe

    def init_head(self, key: jax.Array, example: np.ndarray) -> dict:
        """Variables of a probe head (self.model = ClassifierHead) for inputs shaped like `example`."""
        return dict(_head_init_fn(self.model, tuple(example.shape[1:]))(key))

    @classmethod
    def create(cls, model, to_input: Callable, recipe: optim.Recipe, batch_size: int):
        tx = optim.make_optimizer(recipe)
        return cls(
            model,
            tx,
            make_finetune_step(model, tx, to_input),
            make_predict(model, to_input),
            batch_size,
            recipe,
        )

    def learning_rate_at(self, count: int) -> float:
        """The learning rate of the update with 0-based optimizer count `count`."""
        return optim.learning_rate_at(self.recipe, count)

    def predict(self, state: FinetuneState, source) -> np.ndarray:
        """(n,) or (n, C) float64 probabilities for every record of `source` (padded last batch, masked)."""
        b = min(self.batch_size, len(source))
        out = []
        for pos, mask in padded_batches(len(source), b):
            logits = self.predict_logits(state.params, state.batch_stats, source.batch(pos))
            out.append(np.asarray(jax.device_get(logits), np.float64)[mask])
        logits = np.concatenate(out)
        return 1.0 / (1.0 + np.exp(-logits))

    def train_epoch(self, state: FinetuneState, source, key: jax.Array, rng: np.random.Generator):
        """One epoch over `source`; returns (state, mean training loss)."""
        b = min(self.batch_size, len(source))
        loss_sum, n = None, 0
        for pos in epoch_batches(len(source), b, rng):
            state, m = self.step(state, source.batch(pos), key)
            loss_sum = m["loss"] if loss_sum is None else loss_sum + m["loss"]
            n += 1
        return state, float(jax.device_get(loss_sum)) / max(n, 1)


def validate_config(ft_config) -> None:
    """Every check of the `config.finetune` fields that needs no data; UserError naming the field."""
    for field in ("num_epochs", "batch_size"):
        if int(ft_config[field]) < 1:
            raise UserError(
                f"config.finetune.{field}: must be a positive integer (got {ft_config[field]})"
            )
    finetune_recipe(ft_config, None)
    if not 0.0 <= float(ft_config.head_dropout) < 1.0:
        raise UserError(
            f"config.finetune.head_dropout: must be in [0, 1) (got {ft_config.head_dropout})"
        )
    if ft_config.aggregate not in models.AGGREGATES:
        raise UserError(
            f"config.finetune.aggregate: {ft_config.aggregate!r} is not one of "
            f"{', '.join(models.AGGREGATES)}"
        )


def _aggregate(spec: views.ViewSpec, ft_config) -> str | None:
    """How the classifier combines its views: None for one view, else config.finetune.aggregate."""
    return str(ft_config.aggregate) if spec.multi_view else None


def total_steps(ft_config, train_size: int) -> int:
    """Optimizer steps of a fine-tuning run: num_epochs x batches per epoch over `train_size` records."""
    b = min(int(ft_config.batch_size), int(train_size))
    return int(ft_config.num_epochs) * -(-int(train_size) // max(b, 1))


def finetune_recipe(ft_config, train_size: int | None) -> optim.Recipe:
    """The optimizer recipe of config.finetune for a training split of `train_size` records (None: not
    known, only the fields are checked)."""
    steps = None if train_size is None else total_steps(ft_config, train_size)
    return optim.recipe(ft_config, steps, "config.finetune")


def classifier_trainer(
    model_cfg,
    spec: views.ViewSpec,
    ft_config,
    linear: bool = False,
    train_size: int | None = None,
    num_classes: int | None = None,
) -> Trainer:
    """End-to-end classifier trainer on raw batches (RawSource). Cached: one compile per architecture and
    recipe. train_size: records of the training split (the length of a cosine schedule over all epochs).
    num_classes: None = one binary label (logits (B,)), else C outputs (logits (B, C))."""
    return _classifier_trainer(
        models.encoder_config(model_cfg),
        spec,
        float(ft_config.head_dropout),
        _aggregate(spec, ft_config),
        finetune_recipe(ft_config, train_size),
        int(ft_config.batch_size),
        bool(linear),
        None if num_classes is None else int(num_classes),
    )


@functools.lru_cache(maxsize=16)
def _classifier_trainer(
    enc_cfg, spec, head_dropout, aggregate, recipe, batch_size, linear, num_classes
) -> Trainer:
    model = models.Classifier(
        enc_cfg,
        head_dropout=head_dropout,
        aggregate=aggregate,
        num_views=spec.num_views,
        linear_probe=linear,
        num_classes=num_classes,
    )
    to_input = lambda b: preprocess(b["raw"], b["scale"], b["max_amp"], spec)
    return Trainer.create(model, to_input, recipe, batch_size)


def probe_trainer(
    emb_dim: int,
    spec: views.ViewSpec,
    ft_config,
    train_size: int | None = None,
    num_classes: int | None = None,
) -> Trainer:
    """Linear-probe trainer on precomputed embeddings (B, V, E) (FeatureSource): view aggregation + Dense(C)
    (num_classes: None = one binary label, logits (B,)). train_size: as in `classifier_trainer`."""
    return _probe_trainer(
        int(emb_dim),
        _aggregate(spec, ft_config),
        finetune_recipe(ft_config, train_size),
        int(ft_config.batch_size),
        None if num_classes is None else int(num_classes),
    )


@functools.lru_cache(maxsize=16)
def _probe_trainer(emb_dim, aggregate, recipe, batch_size, num_classes) -> Trainer:
    head = models.ClassifierHead(emb_dim, 0.0, aggregate, linear=True, num_classes=num_classes)
    return Trainer.create(head, lambda b: b["x"], recipe, batch_size)


@functools.lru_cache(maxsize=16)
def _head_init_fn(head, feature_shape: tuple) -> Callable:
    return jax.jit(
        lambda k: head.init(k, jnp.zeros((2,) + feature_shape, jnp.float32), train=False)
    )


@functools.lru_cache(maxsize=16)
def _embed_fn(enc_cfg, spec: views.ViewSpec) -> Callable:
    encoder = models.build_encoder(enc_cfg)

    def fn(variables, raw, scale, max_amp):
        x = preprocess(raw, scale, max_amp, spec)
        if not spec.multi_view:
            x = x[:, None]
        b, v = x.shape[:2]
        e, _ = encoder.apply(variables, x.reshape((b * v,) + x.shape[2:]), train=False)
        return e.astype(jnp.float32).reshape(b, v, -1)

    return jax.jit(fn)


def embed_rows(
    model_cfg,
    spec: views.ViewSpec,
    variables: dict,
    dataset,
    rows: np.ndarray,
    max_amp: float,
    batch_size: int,
) -> np.ndarray:
    """Embeddings (n, V, E) float32 of dataset `rows` by the encoder `models.build_encoder(model_cfg)` with
    `variables` ({'params', 'batch_stats'}) in eval mode; inputs normalised with `max_amp` (mV) and cut into
    views per `spec`. Padded last batch, masked: no record dropped."""
    fn = _embed_fn(models.encoder_config(model_cfg), spec)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    b = min(batch_size, n)
    out = []
    for pos, mask in padded_batches(n, b):
        raw, scale = gather(dataset, rows[pos])
        e = fn(variables, raw, scale, np.float32(max_amp))
        out.append(np.asarray(jax.device_get(e))[mask])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------ the epoch loop
def better(score: float, best: float | None) -> bool:
    """Strictly better validation macro-AUROC (NaN never wins; the first finite one beats None)."""
    if score != score:  # NaN
        return best is None
    return best is None or best != best or score > best


def _snapshot(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a, tree)


def fit_and_select(
    state,
    num_epochs: int,
    train_epoch: Callable,
    predict: Callable,
    val_labels: np.ndarray,
    test_labels: np.ndarray,
    snapshot: Callable = _snapshot,
    learning_rate: Callable | None = None,
    classes: list[str] | None = None,
    on_epoch: Callable | None = None,
) -> dict:
    """Trains `num_epochs`, scores validation after each, keeps the best-macro-AUROC epoch (for one label: the
    best AUROC), scores test once.

    train_epoch(state, epoch) -> (state, train_loss); predict(state, split_name in {'val','test'}) -> probs
    (n,) or (n, C), matching val_labels / test_labels ((n,) 0/1 or (n, C) 0/1/NaN). classes: the C class names.
    learning_rate(state) -> the rate of the epoch's last update (recorded in the history when given).
    on_epoch(history entry), when given, after each epoch (progress).
    Returns {'best_epoch', 'history': [{'epoch', 'train_loss', 'val_loss', 'val': scores without per_class
    [, 'learning_rate']}], 'val': best val scores, 'test': test scores (`metrics.scores`), 'test_probs'}.
    """
    if num_epochs < 1:
        raise UserError(f"config.finetune.num_epochs: must be >= 1 (got {num_epochs})")
    history, best_state, best_auroc, best_epoch = [], None, None, 0
    for epoch in range(1, num_epochs + 1):
        state, train_loss = train_epoch(state, epoch)
        probs = predict(state, "val")
        if not np.all(np.isfinite(probs)):
            raise UserError(
                f"fine-tuning diverged at epoch {epoch} (non-finite predictions, train loss "
                f"{float(train_loss):.4g}); lower config.finetune.learning_rate"
            )
        scores = metrics.scores(val_labels, probs, classes)
        # the per-class table of every epoch would bloat the history; the selected epoch's is kept below
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(train_loss),
                "val_loss": _bce(val_labels, probs),
                "val": {k: v for k, v in scores.items() if k != "per_class"},
            }
        )
        if learning_rate is not None:
            history[-1]["learning_rate"] = float(learning_rate(state))
        if on_epoch is not None:
            on_epoch(history[-1])
        if better(scores["macro_auroc"], best_auroc):
            best_auroc, best_epoch, best_state = scores["macro_auroc"], epoch, snapshot(state)
            best_val = scores
    test_probs = predict(best_state, "test")
    return {
        "best_epoch": best_epoch,
        "history": history,
        "val": best_val,
        "test": metrics.scores(test_labels, test_probs, classes),
        "test_probs": test_probs,
    }


def _bce(labels, probs) -> float:
    """Binary cross-entropy of probabilities, the mean over the known (non-NaN) label entries."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, np.float64)
    known = ~np.isnan(y)
    y, p = y[known], p[known]
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def run_finetune(
    trainer: Trainer,
    variables: dict,
    train,
    val,
    test,
    num_epochs: int,
    key: jax.Array,
    seed: int,
    classes: list[str] | None = None,
    on_epoch: Callable | None = None,
) -> dict:
    """Fine-tunes from `variables` on source `train` (RawSource or FeatureSource); see `fit_and_select`.

    key: dropout key (folded with the step inside the step); seed: the batch order of epoch e is
    numpy default_rng([seed, e]).
    """
    state = new_state(variables, trainer.tx)
    sources = {"val": val, "test": test}

    def train_epoch(st, epoch):
        return trainer.train_epoch(st, train, key, np.random.default_rng([int(seed), int(epoch)]))

    def predict(st, name):
        return trainer.predict(st, sources[name])

    try:
        return fit_and_select(
            state,
            num_epochs,
            train_epoch,
            predict,
            val.labels,
            test.labels,
            learning_rate=lambda st: trainer.learning_rate_at(max(int(st.step) - 1, 0)),
            classes=classes,
            on_epoch=on_epoch,
        )
    except UserError as e:
        raise UserError(f"seed {seed}: {e}") from None
