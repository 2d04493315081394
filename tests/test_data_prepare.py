"""prepare: generated WFDB records of many shapes, corrupt inputs, manifest behaviour, array sources."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from data_fixtures import (
    REPO,
    STD_LEADS,
    UPPER_LEADS,
    copy_record,
    ecg_like,
    prepare_cli,
    read_reference,
    write_record,
)

import ecgcl_jax.data.arrays as A
import ecgcl_jax.data.build as B
from ecgcl_jax import LEADS
from ecgcl_jax.data import PrepareOptions, open_dataset, prepare
from ecgcl_jax.data.leads import parse_lead
from ecgcl_jax.errors import UserError

SAMPLE = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ptbxl_sample")
)


def _sines(fs, seconds, n_leads, seed):
    """Band-limited test signal and its analytic form: (x (n, c), f(t) -> (len(t), c))."""
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.5, 20.0, (3, n_leads))
    amps = rng.uniform(0.2, 0.6, (3, n_leads))
    phases = rng.uniform(0, 2 * np.pi, (3, n_leads))

    def f(t):
        t = np.asarray(t)[:, None]
        return sum(amps[k] * np.sin(2 * np.pi * freqs[k] * t + phases[k]) for k in range(3))

    return f(np.arange(int(round(seconds * fs))) / fs), f


def _prep(src, out, **kw):
    workers = kw.pop("workers", 1)
    return prepare(
        [str(s) for s in (src if isinstance(src, list) else [src])],
        str(out),
        PrepareOptions(**kw),
        workers=workers,
        stream=open(os.devnull, "w"),
    )


# ------------------------------------------------------------------------------------------ shapes in the wild
def test_rates_lengths_lead_names_and_patient_ids(tmp_path):
    src = tmp_path / "src"
    cases = {  # name: (fs, seconds, leads, fmt, comments, expected patient id)
        "r400": (400, 7.0, UPPER_LEADS, "16", ["Age: 51", "Sex: Male", "patient_id: 1234"], "1234"),
        "r1000": (
            1000,
            115.0,
            [l.lower() for l in STD_LEADS] + ["vx", "vy", "vz"],
            "16",
            ["age: 60", "sex: female"],
            "",
        ),
        "r257": (257, 30.0, UPPER_LEADS, "212", ["Patient: P-7"], "P-7"),
        "r250": (250, 10.0, STD_LEADS, "24", ["#Patient ID: 55.0"], "55"),
        "r500": (
            500,
            12.0,
            STD_LEADS[::-1],
            "16",
            ["<subject_id>: s9", "Chagas label: True"],
            "s9",
        ),
        "r100": (100, 6.0, UPPER_LEADS, "16", ["PID = abc"], "abc"),
    }
    truth = {}
    for i, (name, (fs, sec, leads, fmt, com, _)) in enumerate(cases.items()):
        x, f = _sines(fs, sec, len(leads), seed=i)
        write_record(
            str(src / "sub" / name),
            name,
            fs=fs,
            seconds=sec,
            leads=leads,
            fmt=fmt,
            comments=com,
            signal=x,
        )
        truth[name] = (f, leads)
    # annotation and other files lying beside the records are ignored
    (src / "sub" / "r400" / "r400.atr").write_bytes(b"\x00\x01garbage")
    (src / "sub" / "r400" / "r400.i").write_text("not a record")
    summary = _prep(src, tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    assert summary["skipped"] == 0 and len(ds) == len(cases)
    assert ds.signals.shape == (len(cases), 5000, 12) and isinstance(ds.raw, np.memmap)
    assert np.isfinite(np.asarray(ds.signals)).all()
    for i, name in enumerate(ds.names):
        fs, sec, leads, _, _, pid = cases[name]
        assert ds.patient_ids[i] == pid
        f, leads = truth[name]
        order = [[l.lower() for l in leads].index(s.lower()) for s in LEADS]
        n_valid = min(5000, int(round(sec * 500)))
        assert ds.meta["valid_length"].iloc[i] == n_valid
        assert ds.meta["fs_original"].iloc[i] == fs
        # compare against the analytic signal sampled at 500 Hz, away from the record's edges
        t = np.arange(n_valid) / 500.0
        ref = f(t)[:, order]
        got = ds.signals[i][:n_valid]
        inner = slice(50, n_valid - 50 if sec * 500 <= 5000 + 50 else n_valid)
        tol = 0.02 if fs >= 100 else 0.05
        np.testing.assert_allclose(got[inner], ref[inner], atol=tol, err_msg=name)
        assert np.all(ds.signals[i][n_valid:] == 0)  # zero padding after the true length
    assert ds.meta.set_index("name").loc["r500", "chagas"] == 1.0
    assert ds.meta.set_index("name").loc["r400", "age"] == 51


def test_500hz_record_is_stored_as_wfdb_reads_it(tmp_path):
    hea = write_record(str(tmp_path / "src"), "rec", fs=500, seconds=10, leads=UPPER_LEADS, seed=3)
    ref, names, _ = read_reference(hea)
    _prep(tmp_path / "src", tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.scales[0] > 0
    err = np.abs(ds.signals[0].astype(np.float64) - ref)
    assert err.max() <= ds.scales[0] / 2 + 1e-6 * np.abs(ref).max()


def test_length_policies(tmp_path):
    src = tmp_path / "src"
    hea = write_record(str(src), "long", fs=500, seconds=25, seed=1)
    write_record(str(src), "short", fs=500, seconds=4, seed=2)
    write_record(str(src), "tiny", fs=500, seconds=0.5, seed=3)
    ref, _, _ = read_reference(hea)
    s = _prep(src, tmp_path / "win", length="windows")
    ds = open_dataset(str(tmp_path / "win"))
    m = ds.meta
    assert list(m.loc[m.name == "long", "window"]) == [0, 1]  # 25 s -> two full 10 s windows
    i1 = int(np.flatnonzero((m.name == "long") & (m.window == 1))[0])
    assert np.abs(ds.signals[i1] - ref[5000:10000]).max() <= ds.scales[i1] / 2 + 1e-5
    assert s["skipped_by_reason"] == {"too short": 1}  # 0.5 s < --min-seconds 1
    _prep(src, tmp_path / "drop", short="drop")
    ds = open_dataset(str(tmp_path / "drop"))
    assert list(ds.names) == ["long"]
    skipped = pd.read_csv(tmp_path / "drop" / "skipped.csv")
    assert sorted(os.path.basename(r) for r in skipped.record) == ["short.hea", "tiny.hea"]


def test_missing_lead_dropped_or_zero_filled(tmp_path):
    src = tmp_path / "src"
    leads = [l for l in STD_LEADS if l != "V4"]
    hea = write_record(str(src), "no_v4", fs=500, seconds=10, leads=leads, seed=4)
    ref, _, _ = read_reference(hea)
    with pytest.raises(UserError, match="no record could be prepared"):
        _prep(src, tmp_path / "drop")
    rep = pd.read_csv(tmp_path / "drop" / "skipped.csv")
    assert "missing leads V4" in rep.reason[0]
    _prep(src, tmp_path / "zero", missing_leads="zero")
    ds = open_dataset(str(tmp_path / "zero"))
    v4 = LEADS.index("V4")
    assert np.all(ds.signals[0][:, v4] == 0)
    other = [LEADS.index(l) for l in leads]
    np.testing.assert_allclose(ds.signals[0][:, other], ref, atol=float(ds.scales[0]))
    assert ds.meta["missing_leads"].iloc[0] == "V4"


def test_python_api_expands_the_home_folder(tmp_path, monkeypatch):
    # README: prepare(["~/data/ludb"], ...) from Python, where no shell expands ~
    monkeypatch.setenv("HOME", str(tmp_path))
    write_record(str(tmp_path / "src"), "r1", seed=1)
    prepare(["~/src"], "~/out", PrepareOptions(), workers=1, stream=open(os.devnull, "w"))
    assert len(open_dataset("~/out")) == 1 and (tmp_path / "out" / "manifest.json").exists()


def test_lead_names_and_inverted_leads_by_hand():
    cases = {
        "II": ("II", False),
        "AVR": ("aVR", False),
        "lead_II": ("II", False),
        "Lead V2": ("V2", False),
        "C3": ("V3", False),
        "-aVR": ("aVR", True),
        " -AVR": ("aVR", True),
        "lead -aVR": ("aVR", True),
        "lead_-aVR": ("aVR", True),
        "\u2212aVR": ("aVR", True),
        "-": (None, True),
        "vx": (None, False),
    }
    assert {n: parse_lead(n) for n in cases} == cases


def test_inverted_lead_is_negated(tmp_path):
    # a Cabrera-style record stores -aVR; what lands in the dataset is aVR itself, like the plain record's
    src = tmp_path / "src"
    x = ecg_like(5000, 12, 500, seed=9)
    plain = write_record(str(src / "plain"), "plain", signal=x)
    cabrera = x.copy()
    avr = LEADS.index("aVR")
    cabrera[:, avr] *= -1
    leads = ["-aVR" if l == "aVR" else l for l in STD_LEADS]
    cab = write_record(str(src / "cab"), "cab", leads=leads, signal=cabrera)
    _prep(src, tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    rows = {n: i for i, n in enumerate(ds.names)}
    ref_plain, _, _ = read_reference(plain)
    ref_cab, names, _ = read_reference(cab)  # as wfdb reads it: -aVR in column 3
    assert names[avr] == "-aVR"
    ref_cab[:, avr] *= -1
    for name, ref in (("plain", ref_plain), ("cab", ref_cab)):
        np.testing.assert_allclose(ds.signals[rows[name]], ref, atol=float(ds.scales[rows[name]]))
    # the two files quantise x and -x separately: equal to within their ADC steps
    np.testing.assert_allclose(ds.signals[rows["cab"]], ds.signals[rows["plain"]], atol=2e-4)
    assert ds.meta["leads_original"].iloc[rows["cab"]].split(",")[avr] == "-aVR"


def test_header_label_is_the_default_label_and_kept_when_another_is_picked(tmp_path):
    # the header states Label: 0 and a Dx of sinus rhythm alone (normal = 1)
    src = tmp_path / "src"
    write_record(str(src), "h1", comments=["Label: 0", "Dx: 426783006"], seed=1)
    write_record(str(src), "h2", comments=["Label: 1", "Dx: 164934002"], seed=2)
    _prep(src, tmp_path / "a")
    a = open_dataset(str(tmp_path / "a"))
    order = np.argsort(a.names)
    # the stated label, not one derived from Dx
    np.testing.assert_array_equal(a.labels[order], [0.0, 1.0])
    _prep(src, tmp_path / "b", label_column="normal")
    b = open_dataset(str(tmp_path / "b"))
    order = np.argsort(b.names)
    np.testing.assert_array_equal(b.labels[order], [1.0, 0.0])
    # not lost
    np.testing.assert_array_equal(b.with_label("source_label").labels[order], [0.0, 1.0])


# ------------------------------------------------------------------------------------------ bad input
def _corrupt_set(tmp_path):
    """Good generated records plus every kind of broken input; returns (src, expected bad -> reason word)."""
    src = tmp_path / "src"
    good = [
        write_record(str(src / "good"), f"g{i}", fs=500, seconds=10, seed=10 + i) for i in range(4)
    ]
    bad = {}
    h = copy_record(good[0], str(src / "bad" / "trunc"))  # truncated .dat
    dat = h[:-4] + ".dat"
    with open(dat, "r+b") as f:
        f.truncate(os.path.getsize(dat) // 2)
    bad[h] = "truncated"
    # truncated, read through wfdb
    h = write_record(str(src / "bad" / "trunc212"), "t212", fmt="212")
    with open(h[:-4] + ".dat", "r+b") as f:
        f.truncate(1000)
    bad[h] = "truncated"
    h = copy_record(good[1], str(src / "bad" / "garbage"))  # garbage header
    with open(h, "wb") as f:
        f.write(os.urandom(200))
    bad[h] = "header"
    h = copy_record(good[1], str(src / "bad" / "empty"))  # empty header
    open(h, "w").close()
    bad[h] = "empty header"
    h = copy_record(good[2], str(src / "bad" / "nodat"))  # missing signal file
    os.remove(h[:-4] + ".dat")
    bad[h] = "missing"
    x = ecg_like(5000, 12, 500, 0)
    x[100:110, 3] = np.nan
    bad[write_record(str(src / "bad" / "nan"), "nan", signal=x)] = "NaN"
    bad[write_record(str(src / "bad" / "eleven"), "eleven", leads=STD_LEADS[:11])] = (
        "missing leads V6"
    )
    bad[
        write_record(str(src / "bad" / "unknown"), "unknown", leads=[f"X{i}" for i in range(12)])
    ] = "unknown lead"
    # zero-length: header says 0 samples, empty file
    h = write_record(str(src / "bad" / "zero"), "zero")
    with open(h) as f:
        lines = f.read().splitlines()
    first = lines[0].split()
    first[3] = "0"
    with open(h, "w") as f:
        f.write("\n".join([" ".join(first)] + lines[1:]) + "\n")
    open(h[:-4] + ".dat", "w").close()
    bad[h] = "zero-length"
    h = copy_record(good[3], str(src / "bad" / "lines"))  # header declares 12 signals but lists 10
    with open(h) as f:
        lines = f.read().splitlines()
    with open(h, "w") as f:
        f.write("\n".join(lines[:11]) + "\n")
    bad[h] = "lists 10"
    return src, good, bad


def test_bad_inputs_are_reported_and_good_ones_kept(tmp_path, capsys):
    src, good, bad = _corrupt_set(tmp_path)
    s = prepare([str(src)], str(tmp_path / "out"), PrepareOptions(), workers=2)
    err = capsys.readouterr().err
    ds = open_dataset(str(tmp_path / "out"))
    assert sorted(ds.names) == ["g0", "g1", "g2", "g3"]
    for h in good:  # the good ones are intact
        ref, _, _ = read_reference(h)
        i = list(ds.names).index(os.path.basename(h)[:-4])
        assert np.abs(ds.signals[i] - ref).max() <= ds.scales[i] / 2 + 1e-5
    rep = pd.read_csv(tmp_path / "out" / "skipped.csv", keep_default_na=False)
    assert len(rep) == len(bad) == s["skipped"]
    got = dict(zip(rep.record, rep.reason))
    for h, word in bad.items():
        assert word.lower() in got[h].lower(), (h, got[h])
        assert f"skip {h}: " in err  # one console line per skipped input
    assert "Traceback" not in err
    assert sum(s["skipped_by_reason"].values()) == len(bad)
    assert "records/s" in err and "ETA" in err


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    src, good, bad = _corrupt_set(tmp_path)
    r = prepare_cli(str(src), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert sum(l.startswith("skip ") for l in r.stderr.splitlines()) == len(bad)
    # nothing preparable -> non-zero exit with a one-line error
    only_bad = tmp_path / "only_bad"
    shutil.copytree(src / "bad", only_bad)
    r = prepare_cli(str(only_bad), "--out", str(tmp_path / "o2"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("python -m ecgcl_jax.data prepare: error: ")
    r = prepare_cli(str(tmp_path / "nope"), "--out", str(tmp_path / "o3"))
    assert r.returncode != 0
    assert (
        r.stderr.strip()
        == f"python -m ecgcl_jax.data prepare: error: {tmp_path / 'nope'}: no such file or folder"
    )

    # an output folder that cannot be created: the path and the reason, one line
    (tmp_path / "a_file").write_text("")
    r = prepare_cli(str(src / "good"), "--out", str(tmp_path / "a_file" / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("python -m ecgcl_jax.data prepare: error: ")


def test_corrupt_copies_of_the_shipped_sample(tmp_path):
    """Copies of real records broken four ways (truncated .dat, garbage header, missing signal file, unreadable
    .mat): each reported, every other record kept."""
    src = tmp_path / "sample"
    shutil.copytree(SAMPLE, src)
    hr = src / "sara-es__PhysionetChallenge2024" / "tiny_testset" / "hr_gt"
    cinc = src / "DeepPSP__torch_ecg" / "sample-data" / "cinc2021"
    with open(hr / "00841_hr.dat", "r+b") as f:
        f.truncate(1000)
    (hr / "01612_hr.hea").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    os.remove(hr / "02132_hr.dat")
    (cinc / "HR06003.mat").write_bytes(os.urandom(os.path.getsize(cinc / "HR06003.mat")))
    (cinc / "HR06004.mat").write_bytes(b"MATLAB 5.0 MAT-file" + os.urandom(64))
    s = _prep(src, tmp_path / "out", dedupe=False)
    rep = pd.read_csv(tmp_path / "out" / "skipped.csv")
    names = {os.path.basename(r)[:-4]: why for r, why in zip(rep.record, rep.reason)}
    assert set(names) == {"00841_hr", "01612_hr", "02132_hr", "HR06003", "HR06004"}
    assert "truncated" in names["00841_hr"] and "header" in names["01612_hr"]
    assert (
        "missing" in names["02132_hr"] and ".mat" in names["HR06003"] and ".mat" in names["HR06004"]
    )
    assert s["rows"] == 82 - 5
    # with de-duplication, the 100 Hz twins of the three broken 500 Hz records stand in for them
    s = _prep(src, tmp_path / "dedup")
    ds = open_dataset(str(tmp_path / "dedup"))
    assert len(ds) == 52 - 2  # two CinC records have no twin
    assert {"00841_lr", "01612_lr", "02132_lr"} <= set(ds.names)
    i = list(ds.names).index("00841_lr")
    assert ds.meta["fs_original"].iloc[i] == 100


# ------------------------------------------------------------------------------------------ manifest
def test_rerun_is_noop_changed_options_rebuild(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        write_record(str(src), f"r{i}", fs=250, seconds=12, seed=i)
    out = tmp_path / "out"
    _prep(src, out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["options"]["length"] == "crop"
    assert man["versions"]["ecgcl_jax"] and man["sources"] == [str(src)]
    mtime = os.path.getmtime(out / "signals.npy")
    s = prepare([str(src)], str(out), PrepareOptions(), workers=1)
    assert s.get("up_to_date") and "up to date" in capsys.readouterr().err
    assert os.path.getmtime(out / "signals.npy") == mtime
    _prep(src, out, length="windows", short="drop")  # changed options -> fresh dataset
    man2 = json.loads((out / "manifest.json").read_text())
    assert man2["identity"] != man["identity"] and man2["options"]["short"] == "drop"
    assert len(open_dataset(str(out))) == 3  # 12 s -> one window each
    # new source file -> rebuilt, not a no-op
    write_record(str(src), "r_new", fs=250, seconds=12, seed=9)
    s = _prep(src, out, length="windows", short="drop")
    assert not s.get("up_to_date") and len(open_dataset(str(out))) == 4


def test_interrupted_run_continues(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for i in range(10):
        write_record(str(src), f"r{i:02d}", fs=500, seconds=10, seed=i)
    out = tmp_path / "out"
    real = B._process_chunk
    calls = []

    def dying(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(B, "_process_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        _prep(src, out)
    assert json.loads((out / "manifest.json").read_text())["status"] == "in_progress"
    with pytest.raises(UserError, match="did not finish"):
        open_dataset(str(out))
    done_before = list(calls)
    calls.clear()
    monkeypatch.setattr(B, "_process_chunk", lambda job: (calls.append(job[0]), real(job))[1])
    _prep(src, out)
    assert not set(calls) & set(done_before) and calls  # only the missing chunks ran
    ds = open_dataset(str(out))
    assert list(ds.names) == [f"r{i:02d}" for i in range(10)]
    # identical to an uninterrupted run
    _prep(src, tmp_path / "ref")
    np.testing.assert_array_equal(
        np.asarray(open_dataset(str(tmp_path / "ref")).raw), np.asarray(ds.raw)
    )


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's"
)
def test_sigterm_leaves_no_worker_behind_and_the_run_continues(tmp_path):
    src = tmp_path / "src"
    for i in range(240):
        write_record(str(src), f"r{i:03d}", fs=257, seconds=10, seed=i)
    out = tmp_path / "out_sigterm_marker"
    cmd = [
        sys.executable,
        "-m",
        "ecgcl_jax.data",
        "prepare",
        str(src),
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    deadline = time.monotonic() + 60
    while (
        not list((out / ".partial").glob("chunk_*.json"))
        and p.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    done = (
        len(list((out / ".partial").glob("chunk_*.json"))) if (out / ".partial").exists() else None
    )
    # mid-run
    assert p.returncode == -signal.SIGTERM and done is not None and done < 60, (
        p.returncode,
        done,
    )
    deadline = time.monotonic() + 10
    while _processes_with(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(str(out)) == []  # its workers went with it
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300
    )
    assert r.returncode == 0 and "continuing an interrupted run" in r.stderr
    assert len(open_dataset(str(out))) == 240


# ------------------------------------------------------------------------------------------ other formats
def test_npy_npz_with_csv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # smooth signals known in closed form, so the 250 -> 500 Hz resampling is checked against the function itself
    freq = 0.5 + 0.4 * np.arange(12)  # Hz per lead, far below the 125 Hz Nyquist of 250 Hz
    phase = np.linspace(0, 3, 12)

    def sines(t, n):  # (n, len(t), 12) mV; record i is scaled by (1 + i)/4
        return np.stack(
            [0.25 * (1 + i) * np.sin(2 * np.pi * freq * t[:, None] + phase) for i in range(n)]
        )

    a = sines(np.arange(2500) / 250.0, 3)  # 250 Hz, 10 s, (N, length, leads), uV below
    np.save(src / "batch.npy", a * 1000.0)
    pd.DataFrame(
        {"record": ["a", "b", "c"], "patient_id": ["p1", "p1", "p2"], "label": ["1", "0", ""]}
    ).to_csv(src / "batch.csv", index=False)
    # (N, leads, length), read at 250 Hz too
    b = sines(np.arange(5000) / 250.0, 2).transpose(0, 2, 1)
    np.savez(src / "more.npz", signals=b * 1000.0)
    _prep(src, tmp_path / "out", array_fs=250, array_units="uV", label_column="label")
    ds = open_dataset(str(tmp_path / "out"))
    # .npz is read at the same --array-fs: 5000 samples at 250 Hz = 20 s -> first 10 s
    assert list(ds.names) == ["a", "b", "c", "more_0", "more_1"]
    assert list(ds.patient_ids[:3]) == ["p1", "p1", "p2"]
    np.testing.assert_array_equal(ds.labels[:3], [1.0, 0.0, np.nan])
    assert np.isnan(ds.labels[3:]).all()
    # the same functions sampled at 500 Hz for the first 10 s; within the quantisation step plus 0.2% of the
    # amplitude away from the edges (the anti-aliasing filter's transient)
    want = sines(np.arange(5000) / 500.0, 3)
    inner = slice(100, 4900)
    for row, ref in ((0, want[0]), (2, want[2]), (4, want[1])):
        amp = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(
            ds.signals[row][inner], ref[inner], atol=float(ds.scales[row]) + 2e-3 * amp
        )
        assert np.max(np.abs(ds.signals[row] - ref)) < 0.05 * amp  # the edges too, more loosely


def test_array_csv_of_another_length_skips_the_file(tmp_path):
    # a CSV with more (or fewer) lines than the array has rows cannot say which line belongs to which row
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "x.npy", np.zeros((4, 5000, 12)) + 0.1)
    pd.DataFrame({"record": list("abcdef"), "label": ["1"] * 6}).to_csv(src / "x.csv", index=False)
    np.save(src / "y.npy", np.zeros((2, 5000, 12)) + 0.1)
    pd.DataFrame({"record": ["p", "q"], "label": ["1", "0"], "patient_id": ["3.0", "P7"]}).to_csv(
        src / "y.csv", index=False
    )
    s = _prep(src, tmp_path / "out", array_fs=500)
    ds = open_dataset(str(tmp_path / "out"))
    assert list(ds.names) == ["p", "q"]
    assert list(ds.patient_ids) == [
        "3",
        "P7",
    ]  # 3.0 as pandas writes an integer id: the id a header gives as 3
    rep = pd.read_csv(tmp_path / "out" / "skipped.csv")
    # the file is skipped once (one line, one count), not once per array row
    assert len(rep) == 1 and rep.record[0] == str(src / "x.npy")
    assert "x.csv has 6 lines for 4 array rows" in rep.reason[0]
    assert s["skipped"] == 1


def test_array_csv_is_parsed_once_per_file(tmp_path, monkeypatch):
    # a .npy is one input item per row; reading its CSV for every row made prepare quadratic in the rows
    np.save(tmp_path / "x.npy", np.zeros((6, 5000, 12)) + 0.1)
    pd.DataFrame({"record": list("abcdef"), "label": ["1", "0"] * 3}).to_csv(
        tmp_path / "x.csv", index=False
    )
    reads = []
    real = pd.read_csv
    monkeypatch.setattr(
        A.pd, "read_csv", lambda p, *a, **k: reads.append(str(p)) or real(p, *a, **k)
    )
    A._read_side_csv.cache_clear()
    _prep(tmp_path, tmp_path / "out", array_fs=500)
    assert reads.count(str(tmp_path / "x.csv")) == 1
    assert list(open_dataset(str(tmp_path / "out")).names) == list("abcdef")


def test_array_of_wrong_lead_count_is_counted_as_such(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 5000, 8)) + 0.1)
    write_record(str(tmp_path), "good", fs=500, seed=1)
    s = _prep(tmp_path, tmp_path / "out", array_fs=500)
    assert s["skipped_by_reason"] == {"wrong lead count": 2}


def test_parquet_without_pyarrow_is_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(A, "have_pyarrow", lambda: False)
    with pytest.raises(UserError) as e:
        _prep(tmp_path, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "x.parquet" in msg and "pip install 'ecgcl-jax[parquet]'" in msg


def test_parquet_reference_schema(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq  # deferred: pyarrow is optional (skipped above when absent)

    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.3, (3, 5000, 12))
    cols = {f"full_lead_{l}": [list(x[i, :, j]) for i in range(3)] for j, l in enumerate(LEADS)}
    # a float column, as pandas stores ids with gaps
    cols.update(patient_id=[3.0, 4.0, None], label=[1, 0, 1])
    pq.write_table(pa.table(cols), tmp_path / "ref.parquet")
    _prep(tmp_path, tmp_path / "out", label_column="label")
    ds = open_dataset(str(tmp_path / "out"))
    assert list(ds.patient_ids) == ["3", "4", ""] and list(ds.labels) == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(ds.signals[2], x[2], atol=float(ds.scales[2]))


def test_ptbxl_layout_with_database_csv(tmp_path):
    """records100/records500 layout: 500 Hz preferred; patient, scp_codes and NORM-100 label from the csv."""
    src = tmp_path / "ptbxl"
    for ecg_id in (1, 2):
        write_record(str(src / "records500" / "00000"), f"{ecg_id:05d}_hr", fs=500, seed=ecg_id)
        write_record(str(src / "records100" / "00000"), f"{ecg_id:05d}_lr", fs=100, seed=ecg_id)
    pd.DataFrame(
        {
            "ecg_id": [1, 2],
            "patient_id": [15709.0, 13243.0],
            "age": [56, 19],
            "sex": [1, 0],
            "scp_codes": ["{'NORM': 100.0, 'SR': 0.0}", "{'NORM': 80.0, 'SBRAD': 0.0}"],
            "strat_fold": [3, 2],
            "filename_lr": ["records100/00000/00001_lr", "records100/00000/00002_lr"],
            "filename_hr": ["records500/00000/00001_hr", "records500/00000/00002_hr"],
        }
    ).to_csv(src / "ptbxl_database.csv", index=False)
    s = _prep(src, tmp_path / "out")
    ds = open_dataset(str(tmp_path / "out"))
    assert list(ds.names) == ["00001_hr", "00002_hr"] and s["duplicates"] == 2
    assert list(ds.patient_ids) == ["15709", "13243"]
    assert list(ds.labels) == [1.0, 0.0]  # NORM at likelihood 100 only
    assert list(ds.meta["sex"]) == ["F", "M"] and list(ds.meta["strat_fold"].astype(int)) == [3, 2]
    assert "NORM" in ds.meta["scp_codes"].iloc[0]


def _ptbxl_pair(src, rows):
    for ecg_id in (1, 2):
        write_record(str(src / "records500" / "00000"), f"{ecg_id:05d}_hr", fs=500, seed=ecg_id)
    pd.DataFrame(rows, columns=["ecg_id", "patient_id", "scp_codes"]).to_csv(
        src / "ptbxl_database.csv", index=False
    )


def test_ptbxl_database_csv_problems(tmp_path, monkeypatch):
    # a scp_codes cell that is not a dict of numbers leaves `normal` unknown for that record only
    src = tmp_path / "a"
    _ptbxl_pair(src, [(1, 11, "{'NORM': None}"), (2, 12, "{'NORM': 100.0}")])
    _prep(src, tmp_path / "oa")
    ds = open_dataset(str(tmp_path / "oa"))
    assert np.isnan(ds.labels[0]) and ds.labels[1] == 1.0 and list(ds.patient_ids) == ["11", "12"]
    # an ecg_id on two rows (00001 and 1 are one id), or a file pandas cannot parse: one line, before any record
    # is read
    processed = []
    real = B._process_chunk
    monkeypatch.setattr(B, "_process_chunk", lambda job: processed.append(job) or real(job))
    for name, rows, expect in (
        ("b", [(1, 11, "{}"), ("00001", 11, "{}")], "ecg_id 1 appears in more than one row"),
        ("c", None, "cannot read as CSV"),
    ):
        src = tmp_path / name
        _ptbxl_pair(src, rows or [(1, 11, "{}")])
        if rows is None:
            (src / "ptbxl_database.csv").write_text('ecg_id,patient_id\n1,"11\n2,12,13,14\n')
        with pytest.raises(UserError) as e:
            _prep(src, tmp_path / f"o{name}")
        assert (
            "\n" not in str(e.value)
            and "ptbxl_database.csv" in str(e.value)
            and expect in str(e.value)
        )
    assert processed == []


def test_open_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_dataset(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not a prepared dataset"):
        open_dataset(str(tmp_path))
    # a truncated copy of signals.npy: one line naming it
    for i in range(2):
        write_record(str(tmp_path / "src"), f"r{i}", fs=500, seconds=10, seed=i)
    _prep(tmp_path / "src", tmp_path / "ds")
    sig = tmp_path / "ds" / "signals.npy"
    with open(sig, "r+b") as f:
        f.truncate(sig.stat().st_size // 2)
    with pytest.raises(UserError) as e:
        open_dataset(str(tmp_path / "ds"))
    assert str(e.value).startswith(f"{sig}: unreadable (ValueError") and "\n" not in str(e.value)


def test_output_folder_inside_source_is_not_read(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        write_record(str(src), f"r{i}", fs=500, seconds=10, seed=i)
    _prep(src, src / "prepared")
    _prep([src, src / "r0.hea"], tmp_path / "other")  # the same file through two SRCs is read once
    assert len(open_dataset(str(tmp_path / "other"))) == 2
    s = _prep(src, src / "prepared")
    assert s.get("up_to_date")  # its own output files did not change the source listing
    _prep(src, src / "prepared", length="windows")
    # another prepared dataset inside SRC is skipped too
    assert len(open_dataset(str(src / "prepared"))) == 2
