"""Input pipeline: batch order, batch size, normaliser, patient codes, resident or streamed batches, reader threads."""

import concurrent.futures
import threading
from types import SimpleNamespace

import numpy as np

from ecgcl_jax import data, input_pipeline, parallel, pretrain
from ecgcl_jax.input_pipeline import (
    RESIDENT_AUTO_LIMIT,
    BatchOrder,
    choose_resident,
    effective_batch_size,
    normalize,
    patient_codes,
    read_rows,
    resident_limit,
)
from tests.conftest import read_metrics, small_config


def test_batch_order_is_pure_and_never_repeats_in_a_batch():
    a, b = BatchOrder(52, 8, seed=3), BatchOrder(52, 8, seed=3)
    for step in [0, 5, 6, 7, 40, 13]:  # out of order: a pure function of (seed, step)
        np.testing.assert_array_equal(a(step), b(step))
        assert len(set(a(step).tolist())) == 8
    # within an epoch the 6 batches are disjoint
    seen = np.concatenate([a(s) for s in range(6)])
    assert len(set(seen.tolist())) == 48
    assert not np.array_equal(a(0), a(6))  # fresh permutation next epoch


def test_effective_batch_size_shrinks_with_note():
    assert effective_batch_size(8, 52, 8) == (8, "")
    b, note = effective_batch_size(128, 52, 8)
    assert b == 48 and "52 records" in note


def test_normalize_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 100, 12)) + 2.0
    y = normalize(x, 4.0)
    ref = x / 4.0 - (x / 4.0).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    np.testing.assert_allclose(y.mean(axis=1), 0, atol=1e-12)


def test_streamed_equals_resident(tmp_path):
    """The two input paths (rows gathered on the device from the resident pool, or int16 batches read from the
    memmap by the prefetch thread) feed the step the same batches: the same losses."""

    losses = {}
    for resident in ("yes", "no"):
        pretrain.run(
            small_config(num_steps=4, **{"data.resident": resident}), str(tmp_path / resident)
        )
        losses[resident] = [m["loss"] for m in read_metrics(str(tmp_path / resident))]
    assert len(losses["yes"]) == 4
    np.testing.assert_allclose(losses["no"], losses["yes"], rtol=1e-5)


def test_resident_auto_follows_the_devices_memory():
    class Dev:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    gpu80, gpu16 = Dev({"bytes_limit": 80 << 30}), Dev({"bytes_limit": 16 << 30})
    assert resident_limit([gpu80]) == 20 << 30
    # the pool is replicated: the smallest device decides
    assert resident_limit([gpu80, gpu16]) == 4 << 30
    # CPU reports no memory statistics
    assert resident_limit([Dev(None)]) == RESIDENT_AUTO_LIMIT
    assert resident_limit([Dev(RuntimeError("unsupported"))]) == RESIDENT_AUTO_LIMIT
    ds = SimpleNamespace(raw=np.zeros((0, 5000, 12), np.int16))  # 120,000 bytes a record
    pool = np.arange(100_000)  # 12 GB of int16
    assert choose_resident("auto", ds, pool, [gpu80]) and not choose_resident(
        "auto", ds, pool, [gpu16]
    )
    assert not choose_resident("auto", ds, pool, [Dev(None)])
    assert choose_resident("yes", ds, pool, [gpu16]) and not choose_resident(
        "no", ds, pool[:1], [gpu80]
    )


def test_read_rows_equals_fancy_indexing(tmp_path):
    a = np.lib.format.open_memmap(str(tmp_path / "a.npy"), "w+", np.int16, (20, 7, 3))
    a[:] = np.arange(20 * 7 * 3).reshape(20, 7, 3)
    a.flush()
    mm = np.load(str(tmp_path / "a.npy"), mmap_mode="r")

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        for rows in ([5, 1, 19, 0, 7], [3], [4, 4, 2], list(range(19, -1, -1)) + [6, 6]):
            # one reader, or three copying file-ordered runs in parallel
            for executor, workers in (
                (None, 1),
                (ex, 3),
            ):
                got = read_rows(mm, np.asarray(rows), executor, workers)
                assert got.dtype == np.int16 and got.shape == (len(rows), 7, 3)
                np.testing.assert_array_equal(got, np.asarray(a)[rows])


def test_streamed_batches_are_the_same_with_several_reader_threads(monkeypatch):
    ds = data.open_dataset("")
    mesh = parallel.make_mesh()
    pool = np.arange(3, len(ds))
    used, real = [], input_pipeline.read_rows
    monkeypatch.setattr(
        input_pipeline,
        "read_rows",
        lambda raw, rows, ex=None, w=1: used.append((ex is not None, w)) or real(raw, rows, ex, w),
    )
    readers_alive = lambda: [t for t in threading.enumerate() if t.name.startswith("ecgcl-read")]  # noqa: E731
    batches = {}
    for readers in (1, 3):
        source = input_pipeline.BatchSource(
            ds, pool, input_pipeline.BatchOrder(len(pool), 16, 7), mesh, False, 2, readers
        )
        batches[readers] = [np.asarray(b["raw"]) for _, b in source.iterate(0, 4)]
        assert not readers_alive()  # the reader threads end with the iteration
    assert set(used[:4]) == {(False, 1)} and set(used[4:]) == {
        (True, 3)
    }  # the second source read in parallel
    for a, b in zip(batches[1], batches[3]):
        np.testing.assert_array_equal(a, b)
    # an iteration abandoned after one batch also ends its reader threads
    it = input_pipeline.BatchSource(
        ds, pool, input_pipeline.BatchOrder(len(pool), 16, 7), mesh, False, 2, 3
    ).iterate(0, 100)
    next(it)
    assert readers_alive()
    it.close()
    assert not readers_alive()
    # auto on CPU: 1
    assert input_pipeline.reader_threads(0) == 1 and input_pipeline.reader_threads(5) == 5


def test_patient_codes_follow_patient_keys():
    codes = patient_codes(["p1", "", " p1 ", "p2", ""], ["a", "b", "c", "d", "e"])
    # same patient (whitespace ignored, as splits.patient_keys) -> same code; each missing id is its own patient
    assert codes[0] == codes[2] and len({codes[0], codes[1], codes[3], codes[4]}) == 4
