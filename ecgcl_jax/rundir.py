"""A run's directory: who may write it (the lock), what it was started with (config.json, run.json), what it
has logged (metrics.jsonl) and what a run reports at the end (the summary).

Layout of a pretraining workdir::

    .lock            the flock of the one live writer (or the shared flock of an evaluation's shards)
    config.json      the config the run was started with, plus its parsed view pipelines
    run.json         max_amp (mV) fitted on the pool, the pool's records, batch size, data path, version
    metrics.jsonl    one strict-JSON line per logged step (a non-finite float is written as null)
    checkpoints/     orbax training checkpoints (checkpoint.py)
    encoder/         the exported encoder (checkpoint.export_encoder)

TensorBoard scalars, loss.png and the console log file are monitor.py's.
"""

from __future__ import annotations

import fcntl
import json
import os

import numpy as np

import ecgcl_jax
from ecgcl_jax import configdiff, input_pipeline, optim, views
from ecgcl_jax.errors import UserError
from ecgcl_jax.fileio import atomic_write, strict_json, write_json

CONFIG_JSON, RUN_JSON, METRICS_JSONL = "config.json", "run.json", "metrics.jsonl"
# config.json's (and encoder.json's "extra") record of the parsed view pipelines: {'view1': {'spec', 'ops'}, ...}
AUGMENT_RECORD = "augment_pipelines"
# Fields that change nothing a finished step computed (logging, checkpoint cadence, input I/O, the error
# policy): a resume may change them, and so may an evaluation's resume in its nested pretraining config.
NEUTRAL_FIELDS = (
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
# Fields that may change between a pretraining run and its resume: also num_steps (train longer).
RESUMABLE_CHANGES = ("num_steps", *NEUTRAL_FIELDS)
# Fields added since pretraining workdirs were first written, with the value that ran before: a saved config
# without one resumes when the current config keeps that value.
ADDED_FIELDS = {"data.task": "", **optim.fields_before_recipes("optim.")}


# ----------------------------------------------------------------------------------------------- lock
class FileLock:
    """An flock on `path` (created, with its folder), released by the OS when the process dies. shared: a
    shared flock instead of an exclusive one. A context manager that waits for it, or `acquire(blocking)`."""

    def __init__(self, path: str, shared: bool = False):
        self.path, self.shared, self.fd = path, shared, None

    def acquire(self, blocking: bool) -> bool:
        """Whether the lock was taken (always, when blocking)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        kind = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.flock(self.fd, kind | (0 if blocking else fcntl.LOCK_NB))
        except BaseException as e:  # busy, or a stop signal while waiting
            os.close(self.fd)
            self.fd = None
            if isinstance(e, OSError) and not blocking:
                return False
            raise
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc):
        self.release()


class WorkdirLock:
    """One writer per workdir: a FileLock on WORKDIR/.lock that refuses at once (UserError naming the holder)
    when another live process holds it; the lock file says who holds it.

    shared=True: a shared flock, held together by cooperating processes (the shards of one evaluation, which
    claim their units with locks of their own) and refused while an exclusive holder runs, and vice versa."""

    def __init__(self, workdir: str, shared: bool = False):
        self.lock = FileLock(os.path.join(workdir, ".lock"), shared)

    def __enter__(self):
        lock = self.lock
        if not lock.acquire(blocking=False):
            try:
                with open(lock.path, "rb") as f:
                    holder = f.read(200).decode(errors="replace").strip()
            except OSError:
                holder = "?"
            raise UserError(
                f"{os.path.dirname(lock.path)}: in use by another live run ({holder or 'unknown pid'}); "
                "wait for it or choose another --workdir"
            )
        holder = f"pid {os.getpid()} on {os.uname().nodename}"
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, (f"shared, e.g. {holder}" if lock.shared else holder).encode(), 0)
        return self

    def __exit__(self, *exc):
        self.lock.release()


# ------------------------------------------------------------------------------ config.json, run.json
def read_json(path: str) -> dict:
    """A JSON file of the workdir; unreadable is a UserError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); use a new --workdir") from None


def check_resume_config(saved: dict, current: dict, path: str) -> None:
    """Raises a UserError naming `path` when `current` changes a field a resume may not change."""
    detail = configdiff.changed_fields(saved, current, RESUMABLE_CHANGES, ADDED_FIELDS)
    if detail:
        raise UserError(
            f"{path}: this workdir was started with another config; changed fields: {detail} "
            "(use a new --workdir, or change only num_steps/logging/checkpoint cadence)"
        )


def admit_max_amp(config, workdir: str, ds, pool, batch: int) -> float:
    """Check a resumed workdir against this run (config.json, run.json) or record a new one; returns max_amp
    (mV) of the pool: the recorded one on a resume, else fitted on `pool` (rows of `ds`) now."""
    cfg_path = os.path.join(workdir, CONFIG_JSON)
    run_path = os.path.join(workdir, RUN_JSON)
    current_cfg = json.loads(config.to_json())
    pool_records = [str(r) for r in np.asarray(ds.records)[pool]]
    if os.path.exists(cfg_path):
        saved = read_json(cfg_path)
        if isinstance(saved, dict):
            saved.pop(AUGMENT_RECORD, None)  # derived from the fields compared
        check_resume_config(saved, current_cfg, cfg_path)
    else:
        record = dict(current_cfg, **{AUGMENT_RECORD: views.pipeline_records(config)})
        write_json(cfg_path, record)
    if os.path.exists(run_path):
        run_info = read_json(run_path)
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
    write_json(run_path, run_info, indent=None)
    return max_amp


# ------------------------------------------------------------------------------------- metrics.jsonl
def loss_of(rec: dict) -> float:
    """A metrics line's loss; null (a non-finite loss, written as null) is NaN."""
    return float("nan") if rec["loss"] is None else float(rec["loss"])


def last_logged_loss(path: str) -> float:
    """The loss of the last line of metrics file `path` (NaN when none can be read)."""
    try:
        with open(path) as f:
            lines = [l for l in f if l.strip()]
        return loss_of(json.loads(lines[-1])) if lines else float("nan")
    except (OSError, ValueError, KeyError):
        return float("nan")


def truncate_metrics(path: str, step: int) -> float:
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
                last = loss_of(rec)
        except (ValueError, KeyError):
            pass
    atomic_write(path, "".join(keep).encode())  # a crash here keeps the old file, not half of it
    return last


class MetricsFile:
    """WORKDIR/metrics.jsonl, appended one strict-JSON line per record (a no-op where `enabled` is False: the
    processes other than 0). A context manager; `resume(step)` first drops the lines past `step`."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, METRICS_JSONL)
        self.enabled = enabled
        self._file = None

    def resume(self, step: int) -> float:
        """Drop the lines past `step`; returns the last kept loss (NaN if none, or when not enabled)."""
        return truncate_metrics(self.path, step) if self.enabled else float("nan")

    def write(self, rec: dict) -> None:
        """One line, flushed; a non-finite float is written as null (strict JSON)."""
        if self._file is None:
            return
        self._file.write(json.dumps(strict_json(rec)) + "\n")
        self._file.flush()

    def __enter__(self):
        if self.enabled:
            self._file = open(self.path, "a")  # noqa: SIM115 - closed by __exit__
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()
            self._file = None
        return False


# ------------------------------------------------------------------------------------------- summary
def summary(
    status: str,
    steps: int,
    final_loss: float,
    batch: int,
    max_amp: float,
    workdir: str,
    encoder_dir: str | None = None,
) -> dict:
    """What a pretraining run returns; encoder_dir only when the encoder was exported ("" on processes other
    than 0)."""
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


def finished_summary(config, workdir: str, batch: int, max_amp: float, log) -> dict | None:
    """The run's summary when this (admitted) workdir already exported its encoder at num_steps: a re-run, e.g.
    an evaluation resuming, then compiles and restores nothing. None otherwise."""
    enc_json = os.path.join(workdir, "encoder", "encoder.json")
    if not os.path.isfile(enc_json):
        return None
    steps = read_json(enc_json).get("extra", {}).get("steps")
    if steps != int(config.num_steps):
        return None
    last_loss = last_logged_loss(os.path.join(workdir, METRICS_JSONL))
    log(
        f"{workdir}: already trained for {steps} steps (num_steps={config.num_steps}); encoder in {workdir}/encoder "
        "(raise --config.num_steps to train longer)"
    )
    return summary(
        "done", steps, last_loss, batch, max_amp, workdir, os.path.join(workdir, "encoder")
    )
