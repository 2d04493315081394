"""Embeddings of ECGs held in memory equal preparing the same arrays with `prepare` and embedding the dataset."""

import numpy as np
import pytest

import ecgcl_jax
from ecgcl_jax import embed
from ecgcl_jax.data import PrepareOptions, open_dataset, prepare
from ecgcl_jax.errors import UserError
from tests.test_evaluate import export_tiny_encoder

ORDER = ("V6", "I", "aVR", "II", "V1", "III", "V2", "aVL", "V3", "aVF", "V4", "V5")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = export_tiny_encoder(tmp_path_factory.mktemp("enc") / "encoder", [], max_amp=2.5, seed=1)
    return embed.load_encoder(path)


def _ecgs(n: int, length: int, fs: float) -> np.ndarray:
    """(n, length, 12) smooth signals in uV with per-lead amplitudes (distinct leads, so order matters)."""
    t = np.arange(length) / fs
    rng = np.random.default_rng(0)
    amp = rng.uniform(200, 1500, (n, 1, 12))
    freq = rng.uniform(0.8, 3.0, (n, 1, 12))
    return amp * np.sin(2 * np.pi * freq * t[None, :, None]) + rng.normal(0, 20, (n, length, 12))


def test_embed_arrays_equals_prepare_then_embed(tmp_path, encoder):
    fs, x = 250.0, _ecgs(3, 3100, 250.0)  # 12.4 s at 250 Hz: resampled to 500 Hz, first 10 s kept
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "batch.npy", x)
    opts = PrepareOptions(array_fs=fs, array_units="uV", array_leads=ORDER)
    prepare([str(src)], str(tmp_path / "prepared"), opts, workers=1)
    ds = open_dataset(str(tmp_path / "prepared"))
    # records are .../batch.npy#0, #1, ...
    order = np.argsort([int(str(r).rsplit("#", 1)[1]) for r in ds.records])
    want = embed.embed_dataset(encoder, ds, rows=order, batch_size=2)

    got = embed.embed_arrays(encoder, x, fs, leads=ORDER, units="uV", batch_size=2)
    assert got.shape == (3, encoder.model_config.emb_dim) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # the prepared rows themselves: the dataset's stored counts and scales
    raw, scales, source = embed.prepare_arrays(x, fs, ORDER, "uV", opts)
    np.testing.assert_array_equal(raw, np.asarray(ds.raw)[order])
    np.testing.assert_array_equal(scales, np.asarray(ds.scales, np.float32)[order])
    assert source.tolist() == [0, 1, 2]


def test_embed_arrays_windows_and_errors(encoder):
    x = _ecgs(2, 10500, 500.0) / 1000.0  # mV, 21 s: two 10 s windows each
    raw, _, source = embed.prepare_arrays(x, 500.0, options=PrepareOptions(length="windows"))
    assert raw.shape == (4, 5000, 12) and source.tolist() == [0, 0, 1, 1]
    # the second window starts 10 s in (no resampling at 500 Hz; int16 quantisation aside)
    scale = np.abs(x[0, 5000:10000]).max() / 32767
    np.testing.assert_allclose(raw[1] * scale, x[0, 5000:10000], atol=scale)
    with pytest.raises(UserError, match=r"x: shape \(2, 10500, 12\); expected \(N, length, 11\)"):
        embed.prepare_arrays(x, 500.0, leads=ecgcl_jax.LEADS[:11])
    with pytest.raises(UserError, match="leads: unknown lead names XX"):
        embed.prepare_arrays(x, 500.0, leads=("XX", *ecgcl_jax.LEADS[1:]))
    with pytest.raises(UserError, match=r"x\[0\]: too short"):
        embed.embed_arrays(encoder, x[:, :200], 500.0)
