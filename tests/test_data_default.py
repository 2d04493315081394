"""The embedded default dataset: 52 real PTB-XL ECGs, checked against wfdb and records.csv."""

import os

import numpy as np
import pandas as pd
import wfdb

from ecgcl_jax import LEADS
from ecgcl_jax.data import open_dataset

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ptbxl_sample")


def test_default_dataset_shape_and_contract():
    ds = open_dataset("")
    assert len(ds) == 52
    assert ds.signals.shape == (52, 5000, 12)
    assert ds.raw.dtype == np.int16 and ds.scales.dtype == np.float32
    x = ds.signals[3]
    assert x.dtype == np.float32 and x.shape == (5000, 12)
    np.testing.assert_array_equal(x, ds.raw[3].astype(np.float32) * ds.scales[3])
    assert ds.records.shape == ds.names.shape == ds.patient_ids.shape == ds.labels.shape == (52,)
    assert set(np.unique(ds.labels)) == {0.0, 1.0}
    assert int(ds.labels.sum()) == 30  # PROVENANCE: 30 normal, 22 abnormal
    assert len(set(ds.names)) == 52 and not any(n.endswith("_lr") for n in ds.names)
    assert ds.manifest["status"] == "complete"
    # the lazy view indexes as the float array does (mV = counts x scale), including `...`
    full = ds.raw.astype(np.float32) * ds.scales[:, None, None]
    for key in (
        np.s_[..., 0],
        np.s_[2, ..., 5],
        np.s_[1:4, :10, 2],
        np.s_[[0, 5], 7],
        np.s_[..., 3:5],
        np.s_[4],
        np.s_[4, 100],
        np.s_[:, 0],
    ):
        np.testing.assert_array_equal(ds.signals[key], full[key], err_msg=str(key))
    # the data files stay small enough to ship in the package
    size = sum(os.path.getsize(os.path.join(ds.path, f)) for f in os.listdir(ds.path))
    assert size < 5_000_000


def test_default_dataset_matches_wfdb_and_records_csv():
    ds = open_dataset("")
    table = pd.read_csv(os.path.join(SAMPLE, "records.csv"), dtype=str, keep_default_na=False)
    table["name"] = table["record"].str.rsplit("/", n=1).str[-1]
    table = table.set_index("name")
    for i in range(len(ds)):
        rel = ds.meta["relpath"].iloc[i]
        rec = wfdb.rdrecord(os.path.join(SAMPLE, rel))
        order = [rec.sig_name.index(l) for l in LEADS]
        ref = rec.p_signal[:5000, order]
        # within int16 quantisation (half a count) plus float32 rounding
        err = np.abs(ds.signals[i].astype(np.float64) - ref)
        assert err.max() <= ds.scales[i] / 2 + 1e-6 * np.abs(ref).max(), ds.names[i]
        row = table.loc[ds.names[i]]
        assert ds.patient_ids[i] == row["patient_id"]
        assert ds.labels[i] == float(row["normal"])
