"""Checkpoints (orbax) and the exported encoder.

Training checkpoints: ``WORKDIR/checkpoints/<step>/`` written by an orbax ``CheckpointManager``
(asynchronous, the newest ``keep`` kept). Restoring walks from the newest step down and skips, with one
line each, checkpoints that do not restore (truncated, overwritten, half written).

Exported encoder: ``WORKDIR/encoder/`` = ``variables.msgpack`` (encoder params + BatchNorm statistics) and
``encoder.json`` (model config, preprocessing that produced its inputs, pretraining patients/records).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from ecgcl_jax import parallel
from ecgcl_jax.errors import UserError
from ecgcl_jax.fileio import atomic_write, write_json


def _one_writer_per_array() -> None:
    """Each replicated array is written whole by one replica (process-wide, in orbax's handler registry).

    orbax's default on CPU and TPU, replica-parallel writes, slices every array into one piece per replica: a slice
    program compiled per array shape and device (80 compiles, about 5 s, at the first save of an 8-device CPU run)
    to split states of a few MB. Everything else stays as orbax registered it (its array metadata store included).
    """
    current = ocp.type_handlers.get_type_handler(jax.Array)
    # GPU default, done already, or an orbax without it
    if not getattr(current, "_use_replica_parallel", False):
        return
    try:
        handler = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False,
            array_metadata_store=getattr(current, "_array_metadata_store", None),
        )
    except TypeError:
        return
    with _absl_quiet(logging.ERROR):  # orbax logs a warning for every override; this one is meant
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


@contextlib.contextmanager
def _absl_quiet(level: int = logging.CRITICAL):
    """Drop orbax's absl log records below `level` inside the block (they print past stderr redirection)."""
    absl_log = logging.getLogger("absl")
    old = absl_log.level
    absl_log.setLevel(level)
    try:
        yield
    finally:
        absl_log.setLevel(old)


def make_manager(directory: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    _one_writer_per_array()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep), create=True, enable_async_checkpointing=async_save
    )
    # One unnamed item, fixed here: left open, orbax decides it at the first save or restore, from that step's folder,
    # and a damaged newest step (no default/ inside) turned every later restore and save of this manager into an error.
    # it reads every step's metadata; restore_latest says in one line what is wrong
    with _absl_quiet():
        return ocp.CheckpointManager(
            os.path.abspath(directory),
            options=options,
            item_handlers=ocp.StandardCheckpointHandler(),
        )


def save(manager: ocp.CheckpointManager, step: int, state: Any, wait: bool = False) -> None:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if wait:
        manager.wait_until_finished()


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    log: Callable[[str], None] = print,
    restart_field: str = "config.restart_if_unrestorable",
) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores, or None when there is none at all.

    Newer checkpoints that do not restore are moved to corrupt_checkpoints/ once an older one has restored. When
    none restores, UserError, and every checkpoint stays where it is: the next run refuses the same way rather
    than starting over (see quarantine_all for starting over); the message names `restart_field`, the config field
    that asks for that (full dotted name).
    """
    # a damaged step makes orbax log its missing files; the reason is said in one line below
    with _absl_quiet():
        manager.reload()
        steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    failed = []
    for step in steps:
        # A failing restore leaves orbax's pending reads calling back into its closed event loop, and each prints a
        # traceback (hundreds of lines); the failure's own reason is the exception. Kept only when the restore works.
        printed = io.StringIO()
        _drop_failed_read_reports()  # those of a failing restore come from other threads, and some only at exit
        try:
            with contextlib.redirect_stderr(printed), _absl_quiet():
                try:
                    state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                except Exception:
                    # the callbacks print from other threads for a moment after the failure
                    _until_quiet(printed)
                    # "coroutine ... was never awaited": the same abandoned reads
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        # the failed reads' coroutines report themselves when collected: here, into the buffer
                        gc.collect()
                    # their futures' "exception never retrieved"
                    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
                    raise
            _check_finite_tree(state)
        except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            failed.append((step, f"{type(e).__name__}: {msg}"))
            continue
        sys.stderr.write(printed.getvalue())
        for bad, why in failed:
            moved = _quarantine(os.fspath(manager.directory), bad)
            log(
                f"checkpoint {manager.directory}/{bad} does not restore ({why}); moved to {moved}; using step {step}"
            )
        if failed:
            with _absl_quiet():
                manager.reload()
        return step, state
    with _absl_quiet():
        manager.reload()
    raise UserError(
        f"{manager.directory}: no checkpoint restores (tried steps {steps}; step {failed[0][0]}: "
        f"{failed[0][1]}); they are left in place: fix or remove them, or pass "
        f"--{restart_field}=True to move them aside and start from scratch"
    )


def _drop_failed_read_reports() -> None:
    """From a restore on: orbax's abandoned array reads of a failing restore print their error (tens of lines each)
    when Python collects them, as late as at exit, and its callbacks find their event loop closed; restore_latest
    says in one line why the checkpoint failed. Only those reports are dropped (unraisable-exception hook)."""
    previous = sys.unraisablehook
    if getattr(previous, "ecgcl_drops_failed_reads", False):
        return

    def hook(unraisable):
        text = str(unraisable.exc_value)
        if (
            "_read_array_index_and_device_put" in repr(unraisable.object)
            or text.startswith("Encountered error while reading array index")
            or text == "Event loop is closed"
        ):
            return
        previous(unraisable)

    hook.ecgcl_drops_failed_reads = True
    sys.unraisablehook = hook


def _until_quiet(buffer: io.StringIO, quiet_s: float = 0.5, limit_s: float = 5.0) -> None:
    """Returns once nothing has been written to `buffer` for quiet_s seconds (at most limit_s in all)."""
    deadline, size = time.monotonic() + limit_s, -1
    while time.monotonic() < deadline and len(buffer.getvalue()) != size:
        size = len(buffer.getvalue())
        time.sleep(quiet_s)


def quarantine_all(manager: ocp.CheckpointManager) -> list[str]:
    """Moves every checkpoint step to corrupt_checkpoints/ (a restart from scratch must not meet them again)."""
    with _absl_quiet():
        manager.reload()
        moved = [_quarantine(os.fspath(manager.directory), step) for step in manager.all_steps()]
        manager.reload()
    return moved


def _quarantine(directory: str, step: int) -> str:
    """Move an unrestorable step out of the manager's folder (kept for inspection, never reused)."""
    src = os.path.join(directory, str(step))
    dst_root = os.path.join(os.path.dirname(directory.rstrip("/")), "corrupt_checkpoints")
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(src):
        os.makedirs(dst_root, exist_ok=True)
        os.replace(src, dst)
    return dst


def _check_finite_tree(tree) -> None:
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "dtype") and np.issubdtype(leaf.dtype, np.floating):
            if not bool(np.all(np.isfinite(np.asarray(parallel.to_host(leaf), np.float32)))):
                raise ValueError("non-finite values in checkpoint")


# ---------------------------------------------------------------------------------------------- export
@dataclasses.dataclass
class ExportedEncoder:
    model_config: ml_collections.ConfigDict
    variables: dict  # {'params': ..., 'batch_stats': ...} of models.build_encoder(model_config)
    preprocessing: (
        dict  # sample_rate, num_samples, leads, max_amp, domain, mode, input_length, in_leads
    )
    pretrain_patients: list
    pretrain_records: list
    extra: dict

    def __repr__(self) -> str:  # not every weight and record path
        n = sum(int(np.size(v)) for v in jax.tree.leaves(self.variables.get("params", {})))
        return (
            f"ExportedEncoder(encoder={self.model_config.get('encoder')!r}, "
            f"emb_dim={self.model_config.get('emb_dim')}, mode={self.preprocessing.get('mode')!r}, "
            f"params={n:,}, pretrain_patients={len(self.pretrain_patients)}, "
            f"pretrain_records={len(self.pretrain_records)}, steps={self.extra.get('steps')})"
        )


def export_encoder(
    directory: str,
    model_config,
    variables: dict,
    preprocessing: dict,
    pretrain_patients,
    pretrain_records,
    extra: dict | None = None,
) -> None:
    os.makedirs(directory, exist_ok=True)
    host_vars = jax.tree.map(parallel.to_host, variables)
    atomic_write(
        os.path.join(directory, "variables.msgpack"), serialization.msgpack_serialize(host_vars)
    )
    meta = {
        "model_config": json.loads(model_config.to_json()),
        "preprocessing": preprocessing,
        "pretrain_patients": list(pretrain_patients),
        "pretrain_records": list(pretrain_records),
        "extra": extra or {},
    }
    write_json(os.path.join(directory, "encoder.json"), meta)


def load_encoder(directory: str) -> ExportedEncoder:
    """Load an encoder exported by ``run_pretrain.py``: ``WORKDIR/encoder`` or the ``WORKDIR`` that holds it."""
    directory = os.path.expanduser(str(directory))
    if not os.path.isfile(os.path.join(directory, "encoder.json")) and os.path.isfile(
        os.path.join(directory, "encoder", "encoder.json")
    ):
        directory = os.path.join(directory, "encoder")
    meta_path = os.path.join(directory, "encoder.json")
    var_path = os.path.join(directory, "variables.msgpack")
    for p in (meta_path, var_path):
        if not os.path.exists(p):
            raise UserError(
                f"{directory}: holds no exported encoder ({os.path.basename(p)} missing; run_pretrain.py "
                "writes it to WORKDIR/encoder)"
            )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(var_path, "rb") as f:
            variables = serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{directory}: cannot read the exported encoder ({type(e).__name__}: {e})"
        ) from None
    need = ("model_config", "preprocessing", "pretrain_patients", "pretrain_records")
    lacking = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if lacking:
        raise UserError(
            f"{meta_path}: not an exported encoder's metadata (no {', '.join(lacking)})"
        )
    enc = ExportedEncoder(
        model_config=ml_collections.ConfigDict(meta["model_config"]),
        variables=variables,
        preprocessing=meta["preprocessing"],
        pretrain_patients=meta["pretrain_patients"],
        pretrain_records=meta["pretrain_records"],
        extra=meta.get("extra", {}),
    )
    _check_variables_fit(enc, directory)
    return enc


def _check_variables_fit(enc: ExportedEncoder, directory: str) -> None:
    """UserError unless the variables have exactly the shapes the model config builds for the recorded input."""
    from ecgcl_jax import models  # noqa: PLC0415

    try:
        model = models.build_encoder(enc.model_config)
        x = jax.ShapeDtypeStruct(
            (1, int(enc.preprocessing["input_length"]), int(enc.preprocessing["in_leads"])),
            np.float32,
        )
        keys = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
        want = jax.eval_shape(lambda x: model.init(keys, x, train=False), x)
    except Exception as e:  # noqa: BLE001 - a config this version cannot build
        raise UserError(
            f"{directory}/encoder.json: its model config does not build ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    shapes = lambda tree: {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))  # noqa: E731
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }
    got, expected = shapes(enc.variables), shapes(want)
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))
        raise UserError(
            f"{directory}: variables.msgpack does not fit the model config in encoder.json "
            f"(first difference: {diff[0][0]})"
        )
