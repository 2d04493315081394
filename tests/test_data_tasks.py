"""Tasks: PTB-XL tasks from scp_codes, `# Labels` and `#Dx` header tasks, resolve_task, the embedded set."""

import ast
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from data_fixtures import write_record

from ecgcl_jax.data import PrepareOptions, open_dataset, prepare
from ecgcl_jax.data.__main__ import main
from ecgcl_jax.data.tasks import (
    derive_tasks,
    load_scp_statements,
    parse_label_words,
    task_column,
)
from ecgcl_jax.errors import UserError

N = np.nan

# A few statements of PTB-XL's scp_statements.csv, in its layout (first column unnamed = the statement), with
# their real flags and classes.
STATEMENTS = """,description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass,Statement Category
NORM,normal ECG,1.0,,,NORM,NORM,Normal/abnormal
IMI,inferior myocardial infarction,1.0,,,MI,IMI,Myocardial Infarction
1AVB,first degree AV block,1.0,,,CD,_AVB,conduction
NDT,non-diagnostic T abnormalities,1.0,1.0,,STTC,STTC,other ST-T
LVOLT,low QRS voltages,,1.0,,,,other
SR,sinus rhythm,,,1.0,,,rhythm
STACH,sinus tachycardia,,,1.0,,,rhythm
"""

# Hand-worked records: scp_codes and what each task gives (classes sorted by name; NaN rows = unknown)
SCP = [
    "{'NORM': 100.0, 'SR': 0.0}",  # likelihood 0 counts: rhythm SR; no form statement -> form unknown
    "{'IMI': 35.0, 'NDT': 100.0, 'LVOLT': 0.0, 'STACH': 100.0}",
    "{'SR': 100.0, 'XYZ': 50.0}",  # no diagnostic statement -> the three diagnostic tasks unknown
    "",  # no scp_codes: unknown everywhere
    "{'NORM': 100",  # malformed: unknown everywhere
]
EXPECT = {
    "ptbxl_superdiagnostic": (
        ("MI", "NORM", "STTC"),
        [[0, 1, 0], [1, 0, 1], [N, N, N], [N, N, N], [N, N, N]],
    ),
    "ptbxl_subdiagnostic": (
        ("IMI", "NORM", "STTC"),
        [[0, 1, 0], [1, 0, 1], [N, N, N], [N, N, N], [N, N, N]],
    ),
    "ptbxl_diagnostic": (
        ("IMI", "NDT", "NORM"),
        [[0, 0, 1], [1, 1, 0], [N, N, N], [N, N, N], [N, N, N]],
    ),
    "ptbxl_form": (("LVOLT", "NDT"), [[N, N], [1, 1], [N, N], [N, N], [N, N]]),
    "ptbxl_rhythm": (("SR", "STACH"), [[1, 0], [0, 1], [1, 0], [N, N], [N, N]]),
    "ptbxl_all": (
        ("IMI", "LVOLT", "NDT", "NORM", "SR", "STACH", "XYZ"),
        [
            [0, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 0],
            [0, 0, 0, 0, 1, 0, 1],
            [N] * 7,
            [N] * 7,
        ],
    ),
}


def _statements(tmp_path):
    p = tmp_path / "scp_statements.csv"
    p.write_text(STATEMENTS)
    return str(p)


def test_ptbxl_tasks_from_a_hand_worked_scp_codes_table(tmp_path):
    st = load_scp_statements(_statements(tmp_path))
    tasks, stats = derive_tasks(scp_codes=SCP, statements=st)
    assert [t.name for t in tasks] == list(EXPECT)
    for t in tasks:
        classes, y = EXPECT[t.name]
        assert t.classes == classes, t.name
        np.testing.assert_array_equal(t.labels, np.array(y, np.float32), err_msg=t.name)
        assert t.labels.dtype == np.float32
    assert stats["scp_codes_records"] == 3 and stats["scp_codes_malformed"] == 1
    by = {t.name: t for t in tasks}
    assert by["ptbxl_superdiagnostic"].columns == (
        "superdiagnostic:MI",
        "superdiagnostic:NORM",
        "superdiagnostic:STTC",
    )
    assert task_column("dx", "164934002") == "dx:164934002"


def test_scp_statements_table_checked(tmp_path):
    p = tmp_path / "scp_statements.csv"
    p.write_text(",description,diagnostic\nNORM,normal,1.0\n")
    with pytest.raises(UserError, match=r"scp_statements.csv: not PTB-XL's statement table"):
        load_scp_statements(str(p))


def test_label_words_parsed():
    assert parse_label_words("Old MI, CD, TACHY") == ({"MI", "CD"}, {"TACHY"})
    assert parse_label_words("Acute MI,norm") == ({"MI", "NORM"}, set())
    assert parse_label_words("") is None and parse_label_words(None) is None
    words = ["NORM", "Old MI, Acute MI, PVC", "TACHY", "", "STTC"]
    # record 4 also has scp_codes (NORM): scp_codes win there and the disagreement is counted
    scp = ["", "", "", "", "{'NORM': 100.0}"]
    st = load_scp_statements(io.StringIO(STATEMENTS))
    tasks, stats = derive_tasks(scp_codes=scp, statements=st, label_words=words)
    by = {t.name: t for t in tasks}
    sup = by["ptbxl_superdiagnostic"]
    assert sup.classes == ("MI", "NORM")  # no superclass word in record 2 -> unknown, not all-zero
    np.testing.assert_array_equal(sup.labels, [[0, 1], [1, 0], [N, N], [N, N], [0, 1]])
    other = by["labels_other"]  # known for every record with a `# Labels` line
    assert other.classes == ("PVC", "TACHY")
    np.testing.assert_array_equal(other.labels, [[0, 0], [1, 0], [0, 1], [N, N], [0, 0]])
    assert stats["superdiagnostic_from_labels"] == 2
    assert stats["labels_disagreeing_with_scp_codes"] == 1
    # without a statement table the superdiagnostic task comes from the words alone
    tasks, _ = derive_tasks(label_words=words)
    assert [t.name for t in tasks] == ["ptbxl_superdiagnostic", "labels_other"]
    np.testing.assert_array_equal(
        tasks[0].labels, [[0, 1, 0], [1, 0, 0], [N, N, N], [N, N, N], [0, 0, 1]]
    )


def test_dx_codes_with_min_count():
    dx = ["426783006,164934002", "426783006", "", "59118001 426783006", "164934002"]
    (t,), st = derive_tasks(dx=dx, dx_min_count=2)
    assert t.name == "dx" and t.classes == ("164934002", "426783006")  # 59118001: one record
    np.testing.assert_array_equal(t.labels, [[1, 1], [0, 1], [N, N], [0, 1], [1, 0]])
    assert st["dx_codes"] == 3 and st["dx_codes_below_min_count"] == 1 and st["dx_records"] == 4
    (t,), _ = derive_tasks(dx=dx)
    assert t.classes == ("59118001", "164934002", "426783006")  # numeric order
    assert t.columns[0] == "dx:59118001"
    assert derive_tasks(dx=dx, dx_min_count=9)[0] == []


def _ptbxl_folder(tmp_path):
    """A PTB-XL-like SRC: 4 records with ptbxl_database.csv and scp_statements.csv beside them, two
    PhysioNet-2024 `# Labels` headers, one CinC `#Dx` header; short 500 Hz records."""
    src = tmp_path / "src"
    recs = src / "records500"
    write_record(str(recs), "00001_hr", seconds=2, seed=1, comments=["Labels: NORM"])
    write_record(str(recs), "00002_hr", seconds=2, seed=2)
    write_record(str(recs), "00003_hr", seconds=2, seed=3, comments=["Labels: Old MI, PAC"])
    write_record(str(recs), "00004_hr", seconds=2, seed=4)
    write_record(str(src / "cinc"), "HR09001", seconds=2, seed=5, comments=["Dx: 164934002,1"])
    db = pd.DataFrame(
        {
            "ecg_id": ["1", "2", "4"],
            "patient_id": ["11.0", "12.0", "14.0"],
            "scp_codes": [SCP[0], SCP[1], SCP[2]],
            "strat_fold": ["1", "9", "10"],
        }
    )
    db.to_csv(src / "ptbxl_database.csv", index=False)
    (src / "scp_statements.csv").write_text(STATEMENTS)
    return src


def test_prepare_writes_tasks_and_data_info_lists_them(tmp_path, capsys):
    src = _ptbxl_folder(tmp_path)
    out = str(tmp_path / "out")
    prepare([str(src)], out, PrepareOptions(short="pad"), workers=1, stream=io.StringIO())
    ds = open_dataset(out)
    order = np.argsort(ds.names)  # 00001_hr .. 00004_hr, HR09001
    tasks = ds.tasks()
    assert list(tasks)[:3] == ["ptbxl_superdiagnostic", "ptbxl_subdiagnostic", "ptbxl_diagnostic"]
    assert "labels_other" in tasks and "dx" in tasks
    sup = ds.task("ptbxl_superdiagnostic")
    assert sup.classes == ("MI", "NORM", "STTC")
    assert sup.columns == tuple(f"superdiagnostic:{c}" for c in sup.classes)
    # 00001: scp_codes NORM; 00002: MI+STTC; 00003: no scp_codes, `# Labels: Old MI` -> MI;
    # 00004: no diagnostic statement -> unknown; HR09001: neither
    np.testing.assert_array_equal(
        sup.labels[order], [[0, 1, 0], [1, 0, 1], [1, 0, 0], [N, N, N], [N, N, N]]
    )
    rh = ds.task("ptbxl_rhythm")
    np.testing.assert_array_equal(rh.labels[order], [[1, 0], [0, 1], [N, N], [1, 0], [N, N]])
    other = ds.task("labels_other")
    np.testing.assert_array_equal(other.labels[order], [[0], [N], [1], [N], [N]])
    dx = ds.task("dx")
    assert dx.classes == ("1", "164934002")
    np.testing.assert_array_equal(dx.labels[order], [[N, N]] * 4 + [[1, 1]])
    # the columns are plain meta.csv columns; the manifest lists each task's columns in order
    meta = pd.read_csv(os.path.join(out, "meta.csv"), dtype=str, keep_default_na=False)
    assert "superdiagnostic:MI" in meta.columns and "dx:164934002" in meta.columns
    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    assert man["tasks"]["ptbxl_form"]["columns"] == ["form:LVOLT", "form:NDT"]
    assert man["summary"]["tasks"]["tasks"]["dx"]["positives"] == {"1": 1, "164934002": 1}

    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "task ptbxl_superdiagnostic: 3 classes, 3 of 5 records known" in text
    assert "positives: MI 2, NORM 1, STTC 1" in text
    assert "task dx: 2 classes, 1 of 5 records known; positives: 1 1, 164934002 1" in text
    # each task once: the recorded summary's per-task lines are the same facts
    assert text.count("task ptbxl_superdiagnostic: 3 classes") == 1
    assert text.count("task dx: 2 classes") == 1


def test_dx_min_count_option(tmp_path):
    src = tmp_path / "src"
    write_record(str(src), "A1", seconds=2, seed=1, comments=["Dx: 426783006,164934002"])
    write_record(str(src), "A2", seconds=2, seed=2, comments=["Dx: 426783006"])
    out = str(tmp_path / "out")
    s = io.StringIO()
    prepare([str(src)], out, PrepareOptions(dx_min_count=2), workers=1, stream=s)
    assert open_dataset(out).tasks() == {"dx": ("dx:426783006",)}
    assert "task dx: 1 classes, 2 records known; positives: 426783006 2" in s.getvalue()
    assert "1 of 2 '#Dx' codes are in fewer records than --dx-min-count" in s.getvalue()
    with pytest.raises(UserError, match="--dx-min-count: must be an integer >= 1"):
        prepare([str(src)], out, PrepareOptions(dx_min_count=0), workers=1, stream=s)


def test_resolve_task_columns_and_errors(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        write_record(str(src), f"R{i}", seconds=2, seed=i)
    table = tmp_path / "labels.csv"
    table.write_text("record,a,b,c,note\nR0,1,0,,x\nR1,0,1,1,y\nR2,1,,0,z\n")
    out = str(tmp_path / "out")
    prepare(
        [str(src)],
        out,
        PrepareOptions(labels=str(table), label_column="a"),
        workers=1,
        stream=io.StringIO(),
    )
    ds = open_dataset(out)
    order = np.argsort(ds.names)
    t = ds.task("b, c")
    assert t.name == "b, c" and t.classes == t.columns == ("b", "c")
    np.testing.assert_array_equal(t.labels[order], [[0, N], [1, 1], [N, 0]])
    one = ds.task("a")
    assert one.labels.shape == (3, 1)
    np.testing.assert_array_equal(one.labels[:, 0], ds.labels)
    default = ds.task("")  # "" = the single column config.data.label
    assert default.columns == ("a",) and default.labels.shape == (3, 1)
    with pytest.raises(UserError) as e:
        ds.task("nope")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config.data.task: 'nope' is neither a task")
    assert out in msg and "tasks: none" in msg and "a, b, c" in msg
    with pytest.raises(UserError, match="config.eval.task: 'note' is neither"):
        ds.task("a,note", field="config.eval.task")  # not 0/1
    with pytest.raises(UserError, match="names a column twice"):
        ds.task("a,a")
    with pytest.raises(UserError, match="window"):
        ds.task("window")


def test_embedded_set_superdiagnostic_matches_its_scp_codes():
    ds = open_dataset("")
    assert "ptbxl_superdiagnostic" in ds.tasks()
    t = ds.task("ptbxl_superdiagnostic")
    assert t.classes == ("CD", "HYP", "MI", "NORM", "STTC") and t.labels.shape == (52, 5)
    # PTB-XL's diagnostic_class of every diagnostic statement in this set (scp_statements.csv), and its
    # statements that are form or rhythm only
    superclass = {
        "1AVB": "CD",
        "IRBBB": "CD",
        "ASMI": "MI",
        "IMI": "MI",
        "LAO/LAE": "HYP",
        "LVH": "HYP",
        "NDT": "STTC",
        "NST_": "STTC",
        "NORM": "NORM",
    }
    not_diagnostic = {
        "ABQRS",
        "LOWT",
        "LPR",
        "LVOLT",
        "NT_",
        "PVC",
        "VCLVH",
        "SBRAD",
        "SR",
        "STACH",
    }
    words = {
        "NORM": "NORM",
        "Old MI": "MI",
        "Acute MI": "MI",
        "STTC": "STTC",
        "CD": "CD",
        "HYP": "HYP",
    }
    n_scp = n_words = 0
    for i in range(len(ds)):
        codes = ds.meta["scp_codes"].iloc[i]
        want = None
        if codes:
            d = ast.literal_eval(codes)
            assert set(d) <= set(superclass) | not_diagnostic, d
            want = {superclass[k] for k in d if k in superclass}
            n_scp += 1
        elif not ds.meta["labels"].iloc[i].startswith("Dx:"):
            want = {
                words[w.strip()] for w in ds.meta["labels"].iloc[i].split(",") if w.strip() in words
            }
            n_words += 1
        row = t.labels[i]
        if not want:
            assert np.isnan(row).all(), ds.names[i]
        else:
            np.testing.assert_array_equal(row, [float(c in want) for c in t.classes], ds.names[i])
    assert (n_scp, n_words) == (29, 22)
    assert np.isfinite(t.labels).all(axis=1).sum() == 51
    folds = pd.to_numeric(ds.meta["strat_fold"], errors="coerce")
    assert folds.notna().sum() == 29 and set(folds.dropna()) <= set(range(1, 11))
