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
import fcntl
import json
import math
import os
import signal
import time
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
    cli,
    configdiff,
    input_pipeline,
    losses,
    models,
    monitor,
    optim,
    parallel,
    splits,
    views,
)
from ecgcl_jax.errors import UserError
from ecgcl_jax.fileio import atomic_write

# config.json's (and encoder.json's "extra") record of the parsed view pipelines: {'view1': {'spec', 'ops'}, ...}
AUGMENT_RECORD = "augment_pipelines"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Fields that may change between a run and its resume.
RESUMABLE_CHANGES = (
    "num_steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "on_nonfinite",
    "restart_if_unrestorable",
    "data.resident",
    "data.prefetch",
    "data.reader_threads",
    # no longer a config field: workdirs written while it was one carry it
    "debug_nan_at_step",
)


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
def validate_config(config, num_devices: int, field_prefix: str = "") -> None:
    """Every check that can be made before compiling; raises UserError naming the field. field_prefix: where
    `config` sits in the caller's config ("pretrain." in an evaluation): the field is named from there."""
    try:
        _validate_config(config, num_devices)
    except UserError as e:
        if not field_prefix:
            raise
        # "config.x: ..." from the checks here, "model.x: ..." / "optim..." from the modules they call
        msg = str(e)
        if msg.startswith("config."):
            msg = msg[len("config.") :]
        if msg.split(":", 1)[0].split(".", 1)[0] in config.keys():  # the field's top-level name
            msg = f"config.{field_prefix}{msg}"
        raise UserError(msg) from None


def _validate_config(config, num_devices: int) -> None:
    if config.mode not in views.CONTRAST_MODES:
        raise UserError(
            f"config.mode: unknown contrast mode {config.mode!r}; "
            f"choose one of {', '.join(views.CONTRAST_MODES)}"
        )
    if config.dtype not in DTYPES:
        raise UserError(f"config.dtype: {config.dtype!r} is not one of {', '.join(DTYPES)}")
    if config.data.domain not in ("time", "frequency"):
        raise UserError(f"config.data.domain: {config.data.domain!r} is not 'time' or 'frequency'")
    if config.data.resident not in ("auto", "yes", "no"):
        raise UserError(f"config.data.resident: {config.data.resident!r} is not auto, yes or no")
    if not isinstance(config.data.reader_threads, int) or config.data.reader_threads < 0:
        raise UserError(
            f"config.data.reader_threads: must be 0 (auto) or a positive integer, got "
            f"{config.data.reader_threads!r}"
        )
    if config.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"config.on_nonfinite: {config.on_nonfinite!r} is not 'stop' or 'skip'")
    for field in ("num_steps", "log_every", "checkpoint_every"):
        if int(config[field]) <= 0:
            raise UserError(f"config.{field}: must be a positive integer (got {config[field]})")
    if config.batch_size <= 0:
        raise UserError(f"config.batch_size: must be positive (got {config.batch_size})")
    # alone in its batch, an ECG has no negative: the loss is 0 and nothing is learnt
    if config.batch_size < 2:
        raise UserError(
            f"config.batch_size: must be at least 2, for NT-Xent's negatives (got {config.batch_size})"
        )
    if config.batch_size % num_devices:
        raise UserError(
            f"config.batch_size: {config.batch_size} is not divisible by the {num_devices} devices"
        )
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:  # jax keys hold 32 bits
        raise UserError(f"config.seed: must be an integer in [0, 2**32) (got {config.seed!r})")
    if config.temperature <= 0:
        raise UserError(f"config.temperature: must be positive (got {config.temperature})")
    optim.recipe(config.optim, int(config.num_steps))
    bad = [l for l in config.clocs_leads if l not in ecgcl_jax.LEADS]
    if bad or (config.mode in views.LEAD_MODES and len(config.clocs_leads) < 2):
        raise UserError(
            f"config.clocs_leads: need >= 2 of {', '.join(ecgcl_jax.LEADS)} (got {list(config.clocs_leads)})"
        )
    twice = sorted({l for l in config.clocs_leads if list(config.clocs_leads).count(l) > 1})
    if twice:  # a lead paired with itself is its own positive
        raise UserError(
            f"config.clocs_leads: {', '.join(twice)} listed more than once (got {list(config.clocs_leads)})"
        )
    models.encoder_config(config.model)
    for field in ("view1", "view2"):
        views.view_pipeline(config, field)
    if config.data.path and not os.path.exists(os.path.expanduser(config.data.path)):
        raise UserError(f"config.data.path: {config.data.path} does not exist")


# ----------------------------------------------------------------------------------------------- step
def contrastive_loss(config, zs: list[jax.Array], ids) -> jax.Array:
    t = config.temperature
    if config.mode == "simclr":
        return losses.nt_xent(zs[0], zs[1], t, ids)
    if config.mode == "cmsc":
        return losses.clocs_cmsc(*zs, temperature=t, ids=ids)
    return losses.multi_view_nt_xent(jnp.stack(zs), t, ids, reduction="mean")


def make_pretrain_step(config, model, tx):
    """Returns ``step(state, batch, key) -> (state, metrics)`` (pure; jit it with the state donated).

    batch: {'raw': (B, L, C) int16} or {'rows': (B,) int32, 'pool': (N, L, C) int16 resident pool},
    plus 'scale': (B,) float32 mV per count, 'ids': (B,) int32 patient codes and 'max_amp': () float32 mV
    (replicated; a traced value, so a new pool does not recompile the step).
    """
    dtype = DTYPES[config.dtype]
    use_ids = bool(config.patient_positives)

    def step(state: TrainState, batch: dict, key: jax.Array):
        k = jax.random.fold_in(key, state.step)
        k_aug, k_drop = jax.random.split(k)
        raw = jnp.take(batch["pool"], batch["rows"], axis=0) if "rows" in batch else batch["raw"]
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
def _stop_requested(preempt, sync_point: bool) -> bool:
    """Whether to checkpoint and stop after this step. With several processes they must agree (a checkpoint is
    a collective), so the flags are compared at log steps only, where the host waits for the step anyway."""
    if jax.process_count() == 1:
        return preempt.requested
    return sync_point and parallel.any_process(preempt.requested)


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and returns (and sets `acted`).

    A signal that came after the loop's last check (during the final save or the export) is passed on when the
    block ends to the handler it replaced, if that is a Python function (run_eval's, which stops the evaluation);
    with the default handlers the finished run simply returns. Single process only: with several, one process
    stopping on its own would leave the others waiting in a collective.
    """

    def __init__(self):
        self.requested, self.acted, self.signum = False, False, None
        self._signals = cli.on_stop_signals(self._handle)

    def __enter__(self):
        self._signals.__enter__()
        return self

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        out = self._signals.__exit__(*exc)
        if self.requested and not self.acted and exc[0] is None and jax.process_count() == 1:
            previous = signal.getsignal(self.signum)  # restored just now
            # Python's own SIGINT handler would raise KeyboardInterrupt after a finished run: it counts as a default
            if callable(previous) and previous not in (
                signal.SIG_DFL,
                signal.SIG_IGN,
                signal.default_int_handler,
            ):
                previous(self.signum, None)
        return out


class WorkdirLock:
    """One writer per workdir: an flock on WORKDIR/.lock, released by the OS when the process dies.

    shared=True: a shared flock, held together by cooperating processes (the shards of one evaluation, which
    claim their units with locks of their own) and refused while an exclusive holder runs, and vice versa."""

    def __init__(self, workdir: str, shared: bool = False):
        self.path = os.path.join(workdir, ".lock")
        self.fd = None
        self.shared = shared

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
            except OSError:
                holder = "?"
            os.close(self.fd)
            raise UserError(
                f"{os.path.dirname(self.path)}: in use by another live run ({holder or 'unknown pid'}); "
                "wait for it or choose another --workdir"
            ) from None
        holder = f"pid {os.getpid()} on {os.uname().nodename}"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (f"shared, e.g. {holder}" if self.shared else holder).encode(), 0)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def check_resume_config(saved: dict, current: dict, path: str) -> None:
    # a field added since the workdir was written ran with its old-behaviour value
    before = {"data.task": "", **optim.fields_before_recipes("optim.")}
    detail = configdiff.changed_fields(saved, current, RESUMABLE_CHANGES, before)
    if detail:
        raise UserError(
            f"{path}: this workdir was started with another config; changed fields: {detail} "
            "(use a new --workdir, or change only num_steps/logging/checkpoint cadence)"
        )


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset=None,
    indices=None,
    mesh=None,
    field_prefix: str = "",
) -> dict:
    """Pretrain (or resume) in ``workdir``; see the module docstring. Returns a summary dict.

    dataset: an opened dataset (default: ``open_dataset(config.data.path)``); indices: rows to pretrain on
    (default: all); mesh: device mesh (default: every device of every process); field_prefix: where `config` sits
    in the caller's config (evaluation: "pretrain."), for the fields that messages tell the user to set.
    """
    from ecgcl_jax import data as data_lib  # noqa: PLC0415 - keeps `import ecgcl_jax.pretrain` light

    main = parallel.is_main_process()
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    err = None
    try:  # on every process, each with its own files: all go on, or all stop
        validate_config(config, mesh.size, field_prefix)
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
                f"config.patient_positives: all {len(pool)} pretraining records belong to one patient, so no "
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

    with contextlib.ExitStack() as held, _Preemption() as preempt:

        def admit() -> float:  # process 0 only: the other processes wait for its verdict
            os.makedirs(workdir, exist_ok=True)
            held.enter_context(WorkdirLock(workdir))
            return _admit_workdir(config, workdir, ds, pool, batch)

        max_amp = parallel.on_main(admit, workdir)
        finished = _already_exported(config, workdir, batch, max_amp, log)
        if not parallel.any_process(finished is None):  # every process returns here, or none does
            return finished
        return _run_locked(
            config, workdir, ds, pool, batch, mesh, log, main, preempt, max_amp, field_prefix
        )


def _admit_workdir(config, workdir: str, ds, pool, batch: int) -> float:
    """Check a resumed workdir against this run (or record a new one); returns max_amp (mV) of the pool."""
    cfg_path = os.path.join(workdir, "config.json")
    run_path = os.path.join(workdir, "run.json")
    current_cfg = json.loads(config.to_json())
    pool_records = [str(r) for r in np.asarray(ds.records)[pool]]
    if os.path.exists(cfg_path):
        saved = _read_json(cfg_path)
        if isinstance(saved, dict):
            saved.pop(AUGMENT_RECORD, None)  # derived from the fields compared
        check_resume_config(saved, current_cfg, cfg_path)
    else:
        record = dict(current_cfg, **{AUGMENT_RECORD: views.pipeline_records(config)})
        atomic_write(cfg_path, json.dumps(record, indent=1).encode())
    if os.path.exists(run_path):
        run_info = _read_json(run_path)
        if not isinstance(run_info.get("max_amp"), (int, float)):
            raise UserError(f"{run_path}: no max_amp recorded; use a new --workdir")
        if run_info.get("pool_records") != pool_records:
            raise UserError(
                f"{run_path}: this workdir was started on another dataset or pool; use a new --workdir"
            )
        return float(run_info["max_amp"])
    max_amp = input_pipeline.fit_max_amp(ds, pool)
    run_info = {
        "max_amp": max_amp,
        "batch_size": batch,
        "pool_records": pool_records,
        "data_path": config.data.path,
        "version": ecgcl_jax.__version__,
    }
    atomic_write(run_path, json.dumps(run_info).encode())
    return max_amp


def _already_exported(config, workdir: str, batch: int, max_amp: float, log) -> dict | None:
    """The run's summary when this (admitted) workdir already exported its encoder at num_steps: a re-run, e.g. an
    evaluation resuming, then compiles and restores nothing."""
    enc_json = os.path.join(workdir, "encoder", "encoder.json")
    if not os.path.isfile(enc_json):
        return None
    steps = _read_json(enc_json).get("extra", {}).get("steps")
    if steps != int(config.num_steps):
        return None
    last_loss = _last_logged_loss(os.path.join(workdir, "metrics.jsonl"))
    log(
        f"{workdir}: already trained for {steps} steps (num_steps={config.num_steps}); encoder in {workdir}/encoder "
        "(raise --config.num_steps to train longer)"
    )
    return _summary(
        "done", steps, last_loss, batch, max_amp, workdir, os.path.join(workdir, "encoder")
    )


def _summary(
    status: str,
    steps: int,
    final_loss: float,
    batch: int,
    max_amp: float,
    workdir: str,
    encoder_dir: str | None = None,
) -> dict:
    """What run() returns; encoder_dir only when the encoder was exported ("" on processes other than 0)."""
    out = {
        "status": status,
        "steps": steps,
        "final_loss": final_loss,
        "batch_size": batch,
        "max_amp": max_amp,
        "workdir": workdir,
    }
    if encoder_dir is not None:
        out["encoder_dir"] = encoder_dir
    return out


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); use a new --workdir") from None


def _run_locked(
    config,
    workdir,
    ds,
    pool,
    batch,
    mesh,
    log,
    main,
    preempt,
    max_amp: float,
    field_prefix: str = "",
) -> dict:
    model = models.build_encoder(config.model, dtype=DTYPES[config.dtype])
    recipe = optim.recipe(config.optim, int(config.num_steps))
    tx = optim.make_optimizer(recipe)
    root = jax.random.PRNGKey(config.seed)
    init_key, step_key = jax.random.split(root)
    repl = parallel.replicated(mesh)
    state = jax.jit(lambda k: init_state(config, model, tx, k), out_shardings=repl)(init_key)

    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    try:
        restored = checkpoint.restore_latest(
            manager, state, log=log, restart_field=f"{field_prefix}restart_if_unrestorable"
        )
    except UserError:
        if not config.restart_if_unrestorable:
            raise
        moved = checkpoint.quarantine_all(manager)
        log(
            f"{workdir}/checkpoints: no checkpoint restores; {len(moved)} moved to {workdir}/corrupt_checkpoints; "
            "starting from scratch as asked"
        )
        restored = None
    start = 0
    if restored is not None:
        start, state = restored
        log(f"resuming from {workdir}/checkpoints/{start} (step {start} of {config.num_steps})")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    last_loss = _truncate_metrics(metrics_path, start) if main else float("nan")

    # every process must take the same path (the two feed the step differently): resident only if it fits everywhere
    resident = not parallel.any_process(
        not input_pipeline.choose_resident(config.data.resident, ds, pool, mesh.local_devices)
    )
    readers = input_pipeline.reader_threads(config.data.reader_threads)
    pool_mb = input_pipeline.pool_nbytes(ds, pool) / 2**20
    kind = mesh.devices.flat[0].device_kind
    log(
        f"devices: {mesh.size} ({kind}) in {jax.process_count()} process(es); global batch {batch}, "
        f"{batch // mesh.size} per device"
    )
    log(
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
    step_fn = jax.jit(
        make_pretrain_step(config, model, tx),
        donate_argnums=(0,),
        out_shardings=(repl, repl),
        compiler_options=models.xla_compiler_options() or None,
    )

    max_amp_dev = parallel.replicate_from_host(mesh, np.asarray(max_amp, np.float32))
    num_steps = int(config.num_steps)
    status = "done"
    pending: list = []
    t_last, n_last = time.perf_counter(), start
    t0, steps_timed = None, 0
    if start >= int(config.num_steps):
        log(
            f"{workdir}: already trained for {start} steps (num_steps={config.num_steps}); exporting the encoder "
            "(raise --config.num_steps to train longer)"
        )
    step = start
    # steps skipped before this run (by on_nonfinite=skip, which may since have become stop): not this run's to judge
    skipped_before, first_before = (
        int(v) for v in parallel.to_host((state.nonfinite, state.first_nonfinite))
    )
    lr = config.optim.get("learning_rate")
    board = monitor.PretrainMonitor(workdir, log, main, lr if isinstance(lr, float) else None)
    with open(metrics_path, "a") if main else _NullFile() as mfile, board:
        for step, b in source.iterate(start, num_steps):
            if resident:
                b["pool"] = source.device_pool
            b["max_amp"] = max_amp_dev
            state, m = step_fn(state, b, step_key)
            pending.append(m["loss"])
            done = step + 1
            last = done == num_steps
            if done % config.log_every == 0 or last:
                # the logged losses and the count, one transfer
                ls, nonfinite = parallel.to_host((pending, state.nonfinite))
                ls, nonfinite = np.asarray(ls, np.float64), int(nonfinite)
                pending = []
                now = time.perf_counter()
                ecg_s = (done - n_last) * batch / max(now - t_last, 1e-9)
                if t0 is None:  # the first interval includes compilation; ETA uses later ones
                    t0, steps_timed = now, done
                rate = (done - steps_timed) / (now - t0) if done > steps_timed else float("nan")
                eta = (
                    (num_steps - done) / rate
                    if rate and rate == rate and rate > 0
                    else float("nan")
                )
                since = n_last
                t_last, n_last = now, done
                last_loss = float(ls[-1])
                rec = {
                    "step": done,
                    "loss": last_loss,
                    "loss_mean": float(np.mean(ls)),
                    "ecg_per_s": round(ecg_s, 2),
                    "batch_size": batch,
                    "nonfinite_steps": nonfinite,
                    # the rate of the last update applied (skipped steps do not advance the schedule)
                    "learning_rate": optim.learning_rate_at(recipe, max(done - nonfinite - 1, 0)),
                    "time": round(time.time(), 3),
                }
                mfile.write(
                    json.dumps(
                        {
                            k: None
                            if isinstance(v, float) and not math.isfinite(v)
                            else v  # strict JSON
                            for k, v in rec.items()
                        }
                    )
                    + "\n"
                )
                mfile.flush()
                board.record(rec, _step_learning_rate(m))
                log(
                    f"step {done}/{num_steps}  loss {last_loss:.4f}  {ecg_s:,.1f} ECG/s  "
                    + (f"ETA {_fmt_eta(eta)}" if done > steps_timed else "(includes compilation)")
                    + (f"  ({nonfinite} non-finite steps skipped)" if nonfinite else "")
                )
                if nonfinite > skipped_before and config.on_nonfinite == "stop":
                    where = (
                        f"at step {int(parallel.to_host(state.first_nonfinite)) + 1}"
                        if first_before < 0
                        else f"between steps {since} and {done}"
                    )
                    manager.wait_until_finished()
                    kept = manager.latest_step()
                    good = (
                        f"{workdir}/checkpoints/{kept}" if kept is not None else "none written yet"
                    )
                    raise UserError(
                        f"non-finite loss, gradient or update {where}; stopped. Last good checkpoint: {good} "
                        f"(lower --config.{field_prefix}optim.learning_rate, or set "
                        f"--config.{field_prefix}on_nonfinite=skip)"
                    )
            if done % config.checkpoint_every == 0 or last:
                if (
                    config.on_nonfinite == "stop"
                    and int(parallel.to_host(state.nonfinite)) > skipped_before
                ):
                    continue  # caught at the log line above; never checkpoint a state that saw a bad step
                checkpoint.save(manager, done, state)
                board.plot()
            if _stop_requested(preempt, done % config.log_every == 0 or last):
                if manager.latest_step() != done:
                    checkpoint.save(manager, done, state)
                manager.wait_until_finished()
                log(
                    f"interrupted: checkpoint written at step {done} in {workdir}/checkpoints/{done}; "
                    "run the same command to resume"
                )
                status, preempt.acted = "preempted", True
                break
    manager.wait_until_finished()
    manager.close()

    steps = int(parallel.to_host(state.step))
    if status != "done":
        return _summary(status, steps, last_loss, batch, max_amp, workdir)
    encoder_dir = export(config, workdir, state, ds, pool, max_amp) if main else ""
    log(f"done: {steps} steps, final loss {last_loss:.4f}; encoder exported to {workdir}/encoder")
    return _summary(status, steps, last_loss, batch, max_amp, workdir, encoder_dir)


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
            AUGMENT_RECORD: views.pipeline_records(config),
        },
    )
    return out


def _step_learning_rate(m: dict) -> float | None:
    """The learning rate a step reports (metric `learning_rate`), when its optimizer reports one."""
    return float(parallel.to_host(m["learning_rate"])) if "learning_rate" in m else None


def _last_logged_loss(path: str) -> float:
    try:
        with open(path) as f:
            lines = [l for l in f if l.strip()]
        return _loss_of(json.loads(lines[-1])) if lines else float("nan")
    except (OSError, ValueError, KeyError):
        return float("nan")


def _loss_of(rec: dict) -> float:
    """A metrics line's loss; null (a non-finite loss, written as null) is NaN."""
    return float("nan") if rec["loss"] is None else float(rec["loss"])


def _truncate_metrics(path: str, step: int) -> float:
    """On resume, drop metric lines past the restored step (logged again with the same losses); returns the
    last kept loss (NaN if none)."""
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    keep, last = [], float("nan")
    for l in lines:
        try:
            rec = json.loads(l)
            if rec["step"] <= step:
                keep.append(l)
                last = _loss_of(rec)
        except (ValueError, KeyError):
            pass
    atomic_write(path, "".join(keep).encode())  # a crash here keeps the old file, not half of it
    return last


class _NullFile:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def write(self, s):
        pass

    def flush(self):
        pass


if __name__ == "__main__":  # `python -m ecgcl_jax.pretrain` is the pretraining command
    import sys

    from ecgcl_jax import commands

    sys.exit(commands.pretrain_main(prog="python -m ecgcl_jax.pretrain"))
