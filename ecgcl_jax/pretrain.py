"""Contrastive pretraining: state, the jitted step, and the host loop with checkpoints and resume.

Data flow of one step (all inside one ``jax.jit``, state donated)::

    int16 batch (B, 5000, 12) ── × scale / max_amp, − lead mean ──▶ x (B, 5000, 12)
      ── views.augmented_views (example i keyed by fold_in(k_aug, i); k_aug from fold_in(key, step)) ──▶ V views
      ── encoder + projector, one forward per view (BatchNorm statistics per view, global batch) ──▶ z
      ── NT-Xent / CLOCS loss (float32) ──▶ grad ──▶ optimizer (optim.make_optimizer) ──▶ new state

Contrast modes (``config.mode``; their views, in order, are ``views.augmented_views``'s) and their losses:
  simclr  nt_xent(z1, z2) of the two views of the whole 10 s ECG.
  cmsc    clocs_cmsc(h1v1, h1v2, h2v1, h2v2) of the two views of each 5 s half.
  cmlc    every pair of leads of one ECG is a positive pair; loss = mean over lead pairs of nt_xent.
  cmsmlc  views = halves × leads; loss = mean over view pairs of nt_xent.
``patient_positives`` passes patient codes as ``ids`` so that every view of every ECG of the same patient in
the global batch is a positive.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import ecgcl_jax
from ecgcl_jax import (
    augment,
    checkpoint,
    input_pipeline,
    losses,
    models,
    monitor,
    optim,
    parallel,
    preemption,
    rundir,
    splits,
    views,
)
from ecgcl_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32, optimizer steps done
    params: Any
    batch_stats: Any
    opt_state: Any
    # () int32, steps with a non-finite loss, gradient or update (their update skipped)
    nonfinite: jax.Array
    first_nonfinite: jax.Array  # () int32, the first such step (0-based), -1 when none


# --------------------------------------------------------------------------------------------- config
def validate_config(config, num_devices: int, name: str = "config") -> None:
    """Every check that can be made before compiling; raises UserError naming the field by its full dotted
    name. name: the config's own ("config", or "config.pretrain" inside an evaluation's config)."""
    if config.mode not in views.CONTRAST_MODES:
        raise UserError(
            f"{name}.mode: unknown contrast mode {config.mode!r}; "
            f"choose one of {', '.join(views.CONTRAST_MODES)}"
        )
    if config.dtype not in DTYPES:
        raise UserError(f"{name}.dtype: {config.dtype!r} is not one of {', '.join(DTYPES)}")
    if config.data.domain not in ("time", "frequency"):
        raise UserError(f"{name}.data.domain: {config.data.domain!r} is not 'time' or 'frequency'")
    if config.data.resident not in ("auto", "yes", "no"):
        raise UserError(f"{name}.data.resident: {config.data.resident!r} is not auto, yes or no")
    if not isinstance(config.data.reader_threads, int) or config.data.reader_threads < 0:
        raise UserError(
            f"{name}.data.reader_threads: must be 0 (auto) or a positive integer, got "
            f"{config.data.reader_threads!r}"
        )
    if config.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"{name}.on_nonfinite: {config.on_nonfinite!r} is not 'stop' or 'skip'")
    for field in ("num_steps", "log_every", "checkpoint_every"):
        if int(config[field]) <= 0:
            raise UserError(f"{name}.{field}: must be a positive integer (got {config[field]})")
    if config.batch_size <= 0:
        raise UserError(f"{name}.batch_size: must be positive (got {config.batch_size})")
    # alone in its batch, an ECG has no negative: the loss is 0 and nothing is learnt
    if config.batch_size < 2:
        raise UserError(
            f"{name}.batch_size: must be at least 2, for NT-Xent's negatives (got {config.batch_size})"
        )
    if config.batch_size % num_devices:
        raise UserError(
            f"{name}.batch_size: {config.batch_size} is not divisible by the {num_devices} devices"
        )
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:  # jax keys hold 32 bits
        raise UserError(f"{name}.seed: must be an integer in [0, 2**32) (got {config.seed!r})")
    if config.temperature <= 0:
        raise UserError(f"{name}.temperature: must be positive (got {config.temperature})")
    optim.recipe(config.optim, int(config.num_steps), f"{name}.optim")
    bad = [l for l in config.clocs_leads if l not in ecgcl_jax.LEADS]
    if bad or (config.mode in views.LEAD_MODES and len(config.clocs_leads) < 2):
        raise UserError(
            f"{name}.clocs_leads: need >= 2 of {', '.join(ecgcl_jax.LEADS)} (got {list(config.clocs_leads)})"
        )
    twice = sorted({l for l in config.clocs_leads if list(config.clocs_leads).count(l) > 1})
    if twice:  # a lead paired with itself is its own positive
        raise UserError(
            f"{name}.clocs_leads: {', '.join(twice)} listed more than once (got {list(config.clocs_leads)})"
        )
    models.encoder_config(config.model, f"{name}.model")
    for field in ("view1", "view2"):
        views.view_pipeline(config, field, name=name)
    if config.data.path and not os.path.exists(os.path.expanduser(config.data.path)):
        raise UserError(f"{name}.data.path: {config.data.path} does not exist")


# ----------------------------------------------------------------------------------------------- step
def contrastive_loss(config, zs: list[jax.Array], ids) -> jax.Array:
    t = config.temperature
    if config.mode == "simclr":
        return losses.nt_xent(zs[0], zs[1], t, ids)
    if config.mode == "cmsc":
        return losses.clocs_cmsc(*zs, temperature=t, ids=ids)
    return losses.multi_view_nt_xent(jnp.stack(zs), t, ids, reduction="mean")


def make_pretrain_step(config, model, tx):
    """Returns ``step(state, batch, key) -> (state, metrics)`` (pure; jit it with the state donated); metrics:
    'loss' () float32 and 'finite' () bool, whether the step's update was applied.

    batch: {'raw': (B, L, C) int16} or {'rows': (B,) int32, 'resident_raw': (N, L, C) int16 (the pool's rows
    on the device)}, plus 'scale': (B,) float32 mV per count, 'ids': (B,) int32 patient codes and 'max_amp':
    () float32 mV (replicated; a traced value, so a new pool does not recompile the step).
    """
    dtype = DTYPES[config.dtype]
    use_ids = bool(config.patient_positives)

    def step(state: TrainState, batch: dict, key: jax.Array):
        k = jax.random.fold_in(key, state.step)
        k_aug, k_drop = jax.random.split(k)
        raw = (
            jnp.take(batch["resident_raw"], batch["rows"], axis=0)
            if "rows" in batch
            else batch["raw"]
        )
        x = raw.astype(jnp.float32) * batch["scale"][:, None, None]
        x = input_pipeline.normalize(x, batch["max_amp"])
        # streamed: one buffer for x, read by the mean and both views (CPU: 0.93x -> ~1.0x resident)
        if "raw" in batch:
            x = augment.materialize(x)
        inputs = views.augmented_views(config, k_aug, x)
        ids = batch["ids"] if use_ids else None

        def loss_fn(params):
            bs = state.batch_stats
            zs = []
            for i, v in enumerate(inputs):
                (_, z), upd = model.apply(
                    {"params": params, "batch_stats": bs},
                    v.astype(dtype),
                    train=True,
                    rngs={"dropout": jax.random.fold_in(k_drop, i)},
                    mutable=["batch_stats"],
                )
                bs = upd["batch_stats"]
                zs.append(z.astype(jnp.float32))
            return contrastive_loss(config, zs, ids), bs

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # a finite gradient can still overflow the update (an absurd learning rate) or Adam's second moment (which
        # would then silently freeze the parameter): the step counts as bad unless everything it writes is finite
        finite = jnp.isfinite(loss) & _all_finite(grads, new_params, new_bs, new_opt)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            batch_stats=keep(new_bs, state.batch_stats),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where(
                (state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite
            ),
        )
        return new_state, {"loss": loss, "finite": finite}

    return step


def _all_finite(*trees) -> jax.Array:
    """() bool: every floating-point leaf of `trees` is finite."""
    leaves = [l for t in trees for l in jax.tree.leaves(t) if jnp.issubdtype(l.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves]))


def init_state(config, model, tx, key: jax.Array) -> TrainState:
    _, enc_len, in_leads = views.input_geometry(config)
    variables = model.init(
        {"params": key, "dropout": key}, jnp.zeros((2, enc_len, in_leads), jnp.float32), train=False
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        nonfinite=jnp.zeros((), jnp.int32),
        first_nonfinite=jnp.full((), -1, jnp.int32),
    )


# ----------------------------------------------------------------------------------------------- loop
def _stop_requested(stop: preemption.StopRequest, sync_point: bool) -> bool:
    """Whether to checkpoint and stop after this step. With several processes they must agree (a checkpoint is
    a collective), so the flags are compared at log steps only, where the host waits for the step anyway."""
    if jax.process_count() == 1:
        return stop.requested
    return sync_point and parallel.any_process(stop.requested)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every part of an admitted run reads: its config and workdir, the facts admission settled, where it
    logs, and whether this process writes the files."""

    config: ml_collections.ConfigDict
    workdir: str
    batch: int  # global batch size
    max_amp: float  # mV, the normaliser fitted on the pool
    log: Callable[[str], None]
    main: bool  # process 0: the one that writes metrics.jsonl, TensorBoard and the encoder
    name: str  # the config's dotted name ("config", "config.pretrain"), for the fields messages ask to set


class _Checkpointer:
    """WORKDIR/checkpoints: restores the newest good checkpoint, saves, and names the last one written."""

    def __init__(self, run: _Run):
        self.run = run
        self.manager = checkpoint.make_manager(
            os.path.join(run.workdir, "checkpoints"), run.config.keep_checkpoints
        )

    def restore(self, state: TrainState) -> tuple[int, TrainState]:
        """(step, state) of the newest checkpoint that restores; (0, `state`) when there is none, or when none
        restores and config.restart_if_unrestorable (they are moved to WORKDIR/corrupt_checkpoints)."""
        config, workdir, log = self.run.config, self.run.workdir, self.run.log
        try:
            restored = checkpoint.restore_latest(
                self.manager,
                state,
                log=log,
                restart_field=f"{self.run.name}.restart_if_unrestorable",
            )
        except UserError:
            if not config.restart_if_unrestorable:
                raise
            moved = checkpoint.quarantine_all(self.manager)
            log(
                f"{workdir}/checkpoints: no checkpoint restores; {len(moved)} moved to {workdir}/corrupt_checkpoints; "
                "starting from scratch as asked"
            )
            restored = None
        if restored is None:
            return 0, state
        start, state = restored
        log(f"resuming from {workdir}/checkpoints/{start} (step {start} of {config.num_steps})")
        return start, state

    def save(self, step: int, state: TrainState) -> None:
        checkpoint.save(self.manager, step, state)

    def save_and_stop(self, step: int, state: TrainState) -> None:
        """The checkpoint of a stopped run: `state` at `step`, written before this returns."""
        if self.manager.latest_step() != step:
            checkpoint.save(self.manager, step, state)
        self.manager.wait_until_finished()
        self.run.log(
            f"interrupted: checkpoint written at step {step} in {self.run.workdir}/checkpoints/{step}; "
            "run the same command to resume"
        )

    def last_good(self) -> str:
        """The directory of the newest checkpoint written, or "none written yet"."""
        self.manager.wait_until_finished()
        kept = self.manager.latest_step()
        return f"{self.run.workdir}/checkpoints/{kept}" if kept is not None else "none written yet"

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _NonFiniteGuard:
    """config.on_nonfinite: a step with a non-finite loss, gradient or update has its update skipped (by the step
    itself); with "stop" the run then ends with a UserError at the next log step, and a state that saw such a step
    is never checkpointed. Steps skipped before this run (by "skip", which may since have become "stop") are not
    this run's to judge."""

    def __init__(self, run: _Run, state: TrainState, checkpointer: _Checkpointer):
        self.run, self.checkpointer = run, checkpointer
        self.skipped_before, self.first_before = (
            int(v) for v in parallel.to_host((state.nonfinite, state.first_nonfinite))
        )

    def check(self, state: TrainState, nonfinite: int, since: int, done: int) -> None:
        """At a log step: `nonfinite` steps so far, `since`: the previous log step, `done`: steps done."""
        name = self.run.name
        if nonfinite > self.skipped_before and self.run.config.on_nonfinite == "stop":
            where = (
                f"at step {int(parallel.to_host(state.first_nonfinite)) + 1}"
                if self.first_before < 0
                else f"between steps {since} and {done}"
            )
            raise UserError(
                f"non-finite loss, gradient or update {where}; stopped. Last good checkpoint: "
                f"{self.checkpointer.last_good()} (lower --{name}.optim.learning_rate, or set "
                f"--{name}.on_nonfinite=skip)"
            )

    def tainted(self, state: TrainState) -> bool:
        """Whether `state` must not be checkpointed: on_nonfinite=stop and it saw a non-finite step."""
        return (
            self.run.config.on_nonfinite == "stop"
            and int(parallel.to_host(state.nonfinite)) > self.skipped_before
        )


class _MetricsWriter:
    """The log steps: the losses since the previous one and the non-finite count (one transfer), a
    metrics.jsonl line, TensorBoard scalars (monitor.PretrainMonitor) and the progress line with ECG/s and ETA.
    A context manager: metrics.jsonl is open, and loss.png rewritten on exit."""

    def __init__(self, run: _Run, recipe, file: rundir.MetricsFile, start: int, last_loss: float):
        self.run, self.recipe, self.file = run, recipe, file
        self.last_loss = last_loss  # the loss of the last logged step (NaN before one)
        self.board = monitor.PretrainMonitor(run.workdir, run.log, run.main)
        self.pending: list = []  # the losses (device scalars) of the steps since the last log step
        self.t_last, self.n_last = time.perf_counter(), start
        # the first interval includes compilation; the ETA uses the later ones
        self.t0, self.steps_timed = None, 0

    def add(self, loss: jax.Array) -> None:
        self.pending.append(loss)

    def write(self, done: int, state: TrainState) -> tuple[int, int]:
        """Log step `done` (steps done); returns (non-finite steps so far, the previous log step)."""
        num_steps = int(self.run.config.num_steps)
        ls, nonfinite = parallel.to_host((self.pending, state.nonfinite))
        ls, nonfinite = np.asarray(ls, np.float64), int(nonfinite)
        self.pending = []
        now = time.perf_counter()
        ecg_s = (done - self.n_last) * self.run.batch / max(now - self.t_last, 1e-9)
        if self.t0 is None:
            self.t0, self.steps_timed = now, done
        timed = done > self.steps_timed
        rate = (done - self.steps_timed) / (now - self.t0) if timed else float("nan")
        eta = (num_steps - done) / rate if rate and rate == rate and rate > 0 else float("nan")
        since = self.n_last
        self.t_last, self.n_last = now, done
        self.last_loss = float(ls[-1])
        rec = {
            "step": done,
            "loss": self.last_loss,
            "loss_mean": float(np.mean(ls)),
            "ecg_per_s": round(ecg_s, 2),
            "batch_size": self.run.batch,
            "nonfinite_steps": nonfinite,
            # the rate of the last update applied (skipped steps do not advance the schedule)
            "learning_rate": optim.learning_rate_at(self.recipe, max(done - nonfinite - 1, 0)),
            "time": round(time.time(), 3),
        }
        self.file.write(rec)
        self.board.record(rec)
        self.run.log(
            f"step {done}/{num_steps}  loss {self.last_loss:.4f}  {ecg_s:,.1f} ECG/s  "
            + (f"ETA {monitor.fmt_duration(eta)}" if timed else "(includes compilation)")
            + (f"  ({nonfinite} non-finite steps skipped)" if nonfinite else "")
        )
        return nonfinite, since

    def plot(self) -> None:
        self.board.plot()

    def __enter__(self):
        self.file.__enter__()
        self.board.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.board.__exit__(*exc)
        finally:
            self.file.__exit__(*exc)
        return False


@dataclasses.dataclass(frozen=True)
class Feed:
    """Global device batches for the step: the batch source's, plus the resident pool and max_amp (what
    `make_pretrain_step`'s batch holds; the benchmark feeds its step the same way)."""

    source: input_pipeline.BatchSource
    max_amp: jax.Array  # () float32, replicated

    def batches(self, start: int, num_steps: int):
        """(step, batch) for step = start .. num_steps - 1."""
        for step, b in self.source.iterate(start, num_steps):
            if self.source.resident:
                b["resident_raw"] = self.source.resident_raw
            b["max_amp"] = self.max_amp
            yield step, b


@dataclasses.dataclass(frozen=True)
class LoopHooks:
    """What the training loop reports to: built before it, each owning one concern."""

    metrics: _MetricsWriter
    checkpointer: _Checkpointer
    guard: _NonFiniteGuard
    stop: preemption.StopRequest


def train_loop(
    config, state: TrainState, step, feed: Feed, hooks: LoopHooks, start: int
) -> tuple[TrainState, str]:
    """Steps `start` .. num_steps - 1 of ``step(state, batch) -> (state, metrics)``; returns the last state and
    "done", or "preempted" when a stop was requested (after its checkpoint). Every process takes the same
    branches: the log, checkpoint and stop steps are functions of the step and of values all processes share."""
    num_steps = int(config.num_steps)
    for i, batch in feed.batches(start, num_steps):
        state, m = step(state, batch)
        hooks.metrics.add(m["loss"])
        done = i + 1
        log_step = done % config.log_every == 0 or done == num_steps
        if log_step:
            nonfinite, since = hooks.metrics.write(done, state)
            hooks.guard.check(state, nonfinite, since, done)
        if done % config.checkpoint_every == 0 or done == num_steps:
            if hooks.guard.tainted(state):
                continue  # caught at the log line above; never checkpoint a state that saw a bad step
            hooks.checkpointer.save(done, state)
            hooks.metrics.plot()
        if _stop_requested(hooks.stop, log_step):
            hooks.checkpointer.save_and_stop(done, state)
            hooks.stop.acted = True
            return state, "preempted"
    return state, "done"


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset=None,
    indices=None,
    mesh=None,
    stop: preemption.StopRequest | None = None,
    name: str = "config",
) -> dict:
    """Pretrain (or resume) in ``workdir``; see the module docstring. Returns a summary dict.

    dataset: an opened dataset (default: ``open_dataset(config.data.path)``); indices: the pool, rows to pretrain
    on (default: all); mesh: device mesh (default: every device of every process); stop: the entry point's stop
    request (SIGTERM/SIGINT: checkpoint after the current step and return "preempted"; default: none); name: the
    config's dotted name in the user's config ("config.pretrain" inside an evaluation), for the fields that
    messages name.
    """
    from ecgcl_jax import data as data_lib  # noqa: PLC0415 - keeps `import ecgcl_jax.pretrain` light

    main = parallel.is_main_process()
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    stop = stop if stop is not None else preemption.StopRequest()
    err = None
    try:  # on every process, each with its own files: all go on, or all stop
        validate_config(config, mesh.size, name)
        ds = dataset if dataset is not None else data_lib.open_dataset(config.data.path)
        if config.data.label and hasattr(ds, "with_label"):
            ds = ds.with_label(config.data.label)
        pool = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(pool) == 0:
            raise UserError("pretraining pool is empty")
        patients = input_pipeline.patient_codes(ds.patient_ids, ds.records)[pool]
        # every pair a positive: nothing to contrast
        if config.patient_positives and len(np.unique(patients)) < 2:
            raise UserError(
                f"{name}.patient_positives: all {len(pool)} pretraining records belong to one patient, so no "
                "ECG would have a negative; turn it off or add other patients"
            )
        batch, note = input_pipeline.effective_batch_size(config.batch_size, len(pool), mesh.size)
    except Exception as e:  # noqa: BLE001 - re-raised by all_succeeded, after the other processes heard of it
        err = e
    parallel.all_succeeded(err, "setting up the run")
    # every process must run the same config (its data may sit elsewhere on each host)
    if jax.process_count() > 1:
        same = copy.deepcopy(config)
        same.data.path = ""
        parallel.same_on_all(same.to_json(), "the config")
    if note:
        log(note)

    with contextlib.ExitStack() as held, stop.deferred():

        def lock_and_admit_max_amp() -> float:  # process 0 only: the others wait for its verdict
            os.makedirs(workdir, exist_ok=True)
            held.enter_context(rundir.WorkdirLock(workdir))
            return rundir.admit_max_amp(config, workdir, ds, pool, batch)

        max_amp = parallel.on_main(lock_and_admit_max_amp, workdir)
        finished = rundir.finished_summary(config, workdir, batch, max_amp, log)
        if not parallel.any_process(finished is None):  # every process returns here, or none does
            return finished
        admitted = _Run(config, workdir, batch, max_amp, log, main, name)
        return _train_and_export(admitted, ds, pool, mesh, stop)


def _train_and_export(run: _Run, ds, pool, mesh, stop: preemption.StopRequest) -> dict:
    """Build the state (restored if a checkpoint restores), the step, the feed and the loop's hooks, train to
    num_steps (or a stop request) and export the encoder; returns the run's summary. Every process calls it."""
    config, workdir, log = run.config, run.workdir, run.log
    model = models.build_encoder(config.model, dtype=DTYPES[config.dtype])
    recipe = optim.recipe(config.optim, int(config.num_steps))
    tx = optim.make_optimizer(recipe)
    init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
    repl = parallel.replicated(mesh)
    state = jax.jit(lambda k: init_state(config, model, tx, k), out_shardings=repl)(init_key)
    checkpointer = _Checkpointer(run)
    start, state = checkpointer.restore(state)
    metrics_file = rundir.MetricsFile(workdir, run.main)
    last_loss = metrics_file.resume(start)
    feed = _make_feed(run, ds, pool, mesh)
    step_fn = jax.jit(
        make_pretrain_step(config, model, tx),
        donate_argnums=(0,),
        out_shardings=(repl, repl),
        compiler_options=models.xla_compiler_options() or None,
    )
    if start >= int(config.num_steps):
        log(
            f"{workdir}: already trained for {start} steps (num_steps={config.num_steps}); exporting the encoder "
            "(raise --config.num_steps to train longer)"
        )
    guard = _NonFiniteGuard(run, state, checkpointer)
    metrics = _MetricsWriter(run, recipe, metrics_file, start, last_loss)
    hooks = LoopHooks(metrics, checkpointer, guard, stop)
    with metrics:
        state, status = train_loop(
            config, state, lambda s, b: step_fn(s, b, step_key), feed, hooks, start
        )
    checkpointer.close()

    steps = int(parallel.to_host(state.step))
    last_loss = metrics.last_loss
    if status != "done":
        return rundir.summary(status, steps, last_loss, run.batch, run.max_amp, workdir)
    encoder_dir = export(config, workdir, state, ds, pool, run.max_amp) if run.main else ""
    log(f"done: {steps} steps, final loss {last_loss:.4f}; encoder exported to {workdir}/encoder")
    return rundir.summary(status, steps, last_loss, run.batch, run.max_amp, workdir, encoder_dir)


def _make_feed(run: _Run, ds, pool, mesh) -> Feed:
    """The batch source (resident on every device if the pool fits everywhere, else streamed) and its log lines."""
    config, batch = run.config, run.batch
    # every process must take the same path (the two feed the step differently): resident only if it fits everywhere
    resident = not parallel.any_process(
        not input_pipeline.choose_resident(config.data.resident, ds, pool, mesh.local_devices)
    )
    readers = input_pipeline.reader_threads(config.data.reader_threads)
    pool_mb = input_pipeline.pool_nbytes(ds, pool) / 2**20
    kind = mesh.devices.flat[0].device_kind
    run.log(
        f"devices: {mesh.size} ({kind}) in {jax.process_count()} process(es); global batch {batch}, "
        f"{batch // mesh.size} per device"
    )
    run.log(
        f"data: {len(pool)} records ({pool_mb:.0f} MB int16) "
        + (
            "resident on every device"
            if resident
            else f"streamed from {getattr(ds, 'path', 'the dataset')}, {config.data.prefetch} batches ahead, "
            f"{readers} reader thread(s)"
        )
    )
    order = input_pipeline.BatchOrder(len(pool), batch, config.seed)
    source = input_pipeline.BatchSource(
        ds, pool, order, mesh, resident, config.data.prefetch, readers
    )
    max_amp = parallel.replicate_from_host(mesh, np.asarray(run.max_amp, np.float32))
    return Feed(source, max_amp)


def export(config, workdir: str, state: TrainState, ds, pool, max_amp: float) -> str:
    length, enc_len, in_leads = views.input_geometry(config)
    recs = np.asarray(ds.records).astype(str)[pool]
    patients = sorted(set(splits.patient_keys(ds.patient_ids, ds.records)[pool].astype(str)))
    prep = {
        "sample_rate": ecgcl_jax.SAMPLE_RATE,
        "num_samples": ecgcl_jax.NUM_SAMPLES,
        "leads": list(ecgcl_jax.LEADS),
        "max_amp": max_amp,
        "domain": config.data.domain,
        "mode": config.mode,
        "input_length": enc_len,
        "in_leads": in_leads,
        "clocs_leads": list(config.clocs_leads),
        "normalisation": "x / max_amp - per-lead mean",
    }
    out = os.path.join(workdir, "encoder")
    checkpoint.export_encoder(
        out,
        config.model,
        {"params": state.params, "batch_stats": state.batch_stats},
        prep,
        patients,
        list(recs),
        extra={
            "steps": int(parallel.to_host(state.step)),
            "data_path": config.data.path,
            "version": ecgcl_jax.__version__,
            rundir.AUGMENT_RECORD: views.pipeline_records(config),
        },
    )
    return out


if __name__ == "__main__":  # `python -m ecgcl_jax.pretrain` is the pretraining command
    import sys

    from ecgcl_jax import commands

    sys.exit(commands.pretrain_main(prog="python -m ecgcl_jax.pretrain"))
