"""Devices, mesh and shardings: the one place that knows how many devices and hosts there are.

Data parallelism is `jax.jit` over a 1-D device mesh with axis ``data``: the global batch is sharded along
its first axis, parameters and optimizer state are replicated. The step is written for the *global* batch,
so NT-Xent negatives, BatchNorm statistics and the gradient mean all span every device and host
(XLA inserts the collectives); 1 device and 8 devices compute the same numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ecgcl_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
    """Start `jax.distributed` for multi-host runs.

    With no arguments JAX auto-detects the cluster (TPU pods, SLURM, Open MPI); on plain GPU machines pass the
    coordinator ``host:port``, the number of processes and this process's id.
    """
    kwargs = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """1-D mesh over all global devices (or the first ``num_devices``), ordered by process so that each
    host owns a contiguous slice of the batch."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))[:num_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_slice(mesh: Mesh, global_batch: int) -> slice:
    """The rows of every global batch that this process reads and feeds (contiguous)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return slice(min(starts), max(stops))


def global_batch_array(mesh: Mesh, local: np.ndarray, global_batch: int) -> jax.Array:
    """Assemble this process's rows ``local`` into the global batch-sharded array."""
    shape = (global_batch,) + tuple(local.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, shape)


def replicate_from_host(mesh: Mesh, value: np.ndarray) -> jax.Array:
    """Place an array (identical on every process) on every device."""
    sharding = replicated(mesh)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def is_main_process() -> bool:
    return jax.process_index() == 0


def to_host(x):
    """Replicated (or fully local) arrays as numpy, without gathering across hosts: one array, or a pytree of them
    fetched in one transfer."""
    local = jax.tree.map(
        lambda a: (
            a.addressable_data(0) if isinstance(a, jax.Array) and not a.is_fully_addressable else a
        ),
        x,
    )
    return jax.tree.map(np.asarray, jax.device_get(local))


def on_main(fn: Callable[[], float], what: str) -> float:
    """Run ``fn`` on process 0 only and give its result to every process (as float32 to the others).

    If ``fn`` raises on process 0, the error is re-raised there and every other process stops with a
    one-line error too, instead of waiting forever in its next collective.
    """
    if jax.process_count() == 1:
        return float(fn())
    err, value = None, 0.0
    if is_main_process():
        try:
            value = float(fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others heard about it
            err = e
    out = multihost_utils.broadcast_one_to_all(np.asarray([err is None, value], np.float32))
    if err is not None:
        raise err
    if not out[0]:
        raise UserError(f"{what}: process 0 stopped (see its log)")
    return value if is_main_process() else float(out[1])


def all_succeeded(err: Exception | None, what: str) -> None:
    """A collective after a step every process takes on its own (config checks, opening its data): re-raises
    ``err`` where it happened, and stops every other process with a one-line error naming the failed ones,
    instead of leaving them waiting in the next collective until the runtime times out."""
    if jax.process_count() > 1:
        failed = np.flatnonzero(
            multihost_utils.process_allgather(np.asarray([err is not None], np.int32)).reshape(-1)
        )
    else:
        failed = []
    if err is not None:
        raise err
    if len(failed):
        raise UserError(
            f"{what}: process {', '.join(map(str, failed))} stopped with an error (see its log)"
        )


def same_on_all(text: str, what: str) -> None:
    """A collective: UserError on every process unless ``text`` (e.g. a config as JSON) is the same on all of them."""
    code = int(hashlib.sha1(text.encode()).hexdigest()[:7], 16)  # 28 bits: fits int32
    codes = np.asarray(multihost_utils.process_allgather(np.asarray([code], np.int32))).reshape(-1)
    if len(set(codes.tolist())) > 1:
        groups = {}
        for i, c in enumerate(codes.tolist()):
            groups.setdefault(c, []).append(i)
        split = " | ".join(",".join(map(str, g)) for g in groups.values())
        raise UserError(
            f"{what} differs between processes (processes {split}): start every process with the same "
            "command"
        )


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (a collective: call it on all)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))
