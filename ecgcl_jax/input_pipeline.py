"""From a prepared dataset to global device batches.

* The normaliser (the reference's): one global scale ``max_amp`` = the largest sample value (mV) over the training
  records and all leads, then each lead's own mean is removed. It is fitted on the records the run trains
  on, never on validation/test rows, and applied inside the jitted step.
* The batch order is a pure function of (seed, step): epoch ``e`` uses a fresh permutation drawn from
  ``(seed, e)``; a batch never straddles two epochs, so no ECG appears twice in one batch (it would be its
  own negative). A resumed run therefore sees exactly the batches an uninterrupted run sees.
* Batches are int16 counts plus a per-record scale (mV per count), 2 bytes a sample on the wire. Either
  the whole pool lives on the device (``resident``) and the step gathers rows by index, or a host thread
  gathers rows from the memory-mapped file and prefetches sharded device arrays (``streamed``).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import ecgcl_jax
from ecgcl_jax import parallel, splits
from ecgcl_jax.errors import UserError

# data.resident == "auto" keeps the int16 pool on every device up to a quarter of the smallest device memory the
# backend reports (the step needs the rest), or up to this many bytes where it reports none (CPU).
RESIDENT_AUTO_LIMIT = 4 << 30


def fit_max_amp(dataset, indices: np.ndarray | None = None, chunk: int = 512) -> float:
    """Largest sample value (mV) over ``dataset`` rows ``indices`` and all leads (the reference's ``max_amp``)."""
    idx = np.arange(len(dataset)) if indices is None else np.sort(np.asarray(indices))
    best = -np.inf
    for s in range(0, len(idx), chunk):
        rows = idx[s : s + chunk]
        raw = np.asarray(dataset.raw[rows], dtype=np.float32)
        scales = np.asarray(dataset.scales[rows], dtype=np.float32)
        best = max(best, float((raw * scales[:, None, None]).max()))
    if not np.isfinite(best) or best <= 0:
        raise UserError(
            f"{getattr(dataset, 'path', 'dataset')}: cannot fit max_amp on the training records "
            f"(largest sample value is {best})"
        )
    return best


def normalize(x, max_amp: float):
    """x: (..., length, leads) mV -> x / max_amp minus each lead's mean over time (numpy or jax arrays)."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = x / max_amp
    return x - xp.mean(x, axis=-2, keepdims=True)


def effective_batch_size(requested: int, pool_size: int, num_devices: int) -> tuple[int, str]:
    """The global batch actually used, and a one-line note when it had to shrink (empty otherwise)."""
    if pool_size >= requested:
        return requested, ""
    b = (pool_size // num_devices) * num_devices
    if b <= 1:
        raise UserError(
            f"dataset has {pool_size} records: too few for a contrastive batch on {num_devices} devices"
        )
    return b, (
        f"dataset holds {pool_size} records, fewer than batch_size={requested}: "
        f"using a global batch of {b} (an ECG never appears twice in one batch)"
    )


class BatchOrder:
    """Rows of the pool for every step: a pure function of (seed, step)."""

    def __init__(self, pool_size: int, batch_size: int, seed: int):
        if batch_size > pool_size:
            raise ValueError("batch larger than the pool")
        self.pool_size, self.batch_size, self.seed = pool_size, batch_size, seed
        self.steps_per_epoch = pool_size // batch_size
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, epoch, 0x5EC6])
            self._cache[epoch] = rng.permutation(self.pool_size)
        return self._cache[epoch]

    def __call__(self, step: int) -> np.ndarray:
        """(batch_size,) int64 positions in the pool for ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


class BatchSource:
    """Global device batches for each step: ``{'raw', 'scale', 'ids'}`` or ``{'rows', 'scale', 'ids'}``.

    raw: (B, L, C) int16 counts, sharded over ``data``; scale: (B,) float32 mV per count;
    ids: (B,) int32 patient codes (records without a patient id get a code of their own);
    rows: (B,) int32 rows of ``resident_raw``, the pool's int16 rows on every device (``resident`` mode; the
    step gathers them).
    """

    def __init__(
        self,
        dataset,
        pool: np.ndarray,
        order: BatchOrder,
        mesh,
        resident: bool,
        prefetch: int,
        readers: int,
    ):
        self.dataset, self.pool, self.order, self.mesh = dataset, np.asarray(pool), order, mesh
        self.resident, self.prefetch, self.readers = resident, max(1, prefetch), max(1, readers)
        self.batch = order.batch_size
        self.slice = parallel.process_slice(mesh, self.batch)
        self.pool_ids = patient_codes(dataset.patient_ids, dataset.records)[self.pool]
        self.pool_scales = np.asarray(dataset.scales, np.float32)[self.pool]
        self.resident_raw = None
        if resident:
            self.resident_raw = parallel.replicate_from_host(
                mesh, np.asarray(dataset.raw[np.sort(self.pool)])
            )
            # positions in the sorted pool copy
            self._sorted_pos = np.argsort(np.argsort(self.pool))

    def host_batch(
        self, step: int, executor: concurrent.futures.Executor | None = None
    ) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of ``step`` (numpy); ``executor``: the reader threads."""
        pos = self.order(step)[self.slice]
        out = {"scale": self.pool_scales[pos], "ids": self.pool_ids[pos].astype(np.int32)}
        if self.resident:
            out["rows"] = self._sorted_pos[pos].astype(np.int32)
        else:
            out["raw"] = read_rows(self.dataset.raw, self.pool[pos], executor, self.readers)
        return out

    def device_batch(
        self, step: int, executor: concurrent.futures.Executor | None = None
    ) -> dict[str, jax.Array]:
        host = self.host_batch(step, executor)
        return {k: parallel.global_batch_array(self.mesh, v, self.batch) for k, v in host.items()}

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """(step, device batch) for steps [start, stop), assembled ``prefetch`` steps ahead in a thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop_flag = threading.Event()
        executor = None
        if not self.resident and self.readers > 1:
            executor = concurrent.futures.ThreadPoolExecutor(
                self.readers, thread_name_prefix="ecgcl-read"
            )

        def work():
            try:
                for s in range(start, stop):
                    if stop_flag.is_set():
                        return
                    q.put((s, self.device_batch(s, executor)))
                q.put(None)
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Stop the producer and wait for it: a process must not exit while that thread is inside a JAX call.
            stop_flag.set()
            while t.is_alive():
                while not q.empty():
                    q.get_nowait()
                t.join(0.05)
            while not q.empty():
                q.get_nowait()
            if executor is not None:
                executor.shutdown(wait=True)


def read_rows(
    raw, rows: np.ndarray, executor: concurrent.futures.Executor | None = None, workers: int = 1
) -> np.ndarray:
    """raw[rows] as a new (len(rows), ...) array, reading a memmap in file order, each row copied once
    (fancy indexing would copy twice: into a temporary, then into batch order).

    With an ``executor`` of ``workers`` threads, the file-ordered rows are split into that many contiguous runs
    copied in parallel (numpy releases the GIL while it copies). One thread gathered 2.2-3.3 GB/s (18-27k ECG/s)
    from the page cache on a 2-core VM, a fraction of what one GPU's step consumes (bench/bench_read_rows.py).
    """
    out = np.empty((len(rows),) + tuple(raw.shape[1:]), raw.dtype)
    order = np.argsort(rows, kind="stable")

    def copy(part):
        for i in part:
            out[i] = raw[rows[i]]

    if executor is None or workers < 2 or len(rows) < 2 * workers:
        copy(order)
    else:
        for f in [executor.submit(copy, part) for part in np.array_split(order, workers)]:
            f.result()
    return out


def patient_codes(patient_ids, records) -> np.ndarray:
    """(N,) int64 codes, equal for records of the same patient (``splits.patient_keys``: a record without a
    patient id is its own patient)."""
    _, inv = np.unique(splits.patient_keys(patient_ids, records).astype(str), return_inverse=True)
    return inv.astype(np.int64)


def resident_limit(devices) -> int:
    """Largest int16 pool in bytes that data.resident=auto keeps on the devices (replicated on each)."""
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # backends without memory statistics
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return min(limits) // 4 if limits else RESIDENT_AUTO_LIMIT


def pool_nbytes(dataset, pool: np.ndarray) -> int:
    """Bytes of the pool's int16 rows."""
    return len(pool) * int(np.prod(dataset.raw.shape[1:])) * 2


def reader_threads(setting: int) -> int:
    """data.reader_threads -> threads gathering a streamed batch: the setting, or for 0 (auto) 1 on the CPU backend
    (the step needs the cores, and consumes a few hundred ECG/s) and min(8, CPU count) on accelerators."""
    if setting > 0:
        return int(setting)
    return 1 if jax.default_backend() == "cpu" else min(8, ecgcl_jax.available_cpus())


def choose_resident(setting: str, dataset, pool: np.ndarray, devices) -> bool:
    """data.resident (auto | yes | no) -> whether the pool's int16 rows live on the devices."""
    if setting == "yes":
        return True
    if setting == "no":
        return False
    return pool_nbytes(dataset, pool) <= resident_limit(devices)
