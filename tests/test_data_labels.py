"""A user label table attached to the shipped PTB-XL sample."""

import io
import os

import numpy as np
import pandas as pd
import pytest
from data_fixtures import prepare_cli, write_record

from ecgcl_jax.data import PrepareOptions, open_dataset, prepare
from ecgcl_jax.data.labels import parse_binary
from ecgcl_jax.errors import UserError

SAMPLE = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ptbxl_sample")
)
HR = "sara-es__PhysionetChallenge2024/tiny_testset/hr_gt"

# record key -> (how it should match, lvh, other, patient_id)
ROWS = [
    ("00841_hr", "HR/00841_hr", "1", "no", ""),  # by name
    # by path relative to SRC (without extension)
    (
        f"{HR}/01612_hr",
        "HR/01612_hr",
        "0",
        "yes",
        "",
    ),
    (f"./{HR}/02132_hr.hea", "HR/02132_hr", "TRUE", "", ""),  # same, with ./ and extension
    ("6001", "HR06001", "Yes", "1", ""),  # by PTB-XL ecg_id (CinC copy HR06001)
    ("00002", "HR00002", "false", "0", ""),  # ecg_id with leading zeros
    ("3403", "03403_hr", "", "1", ""),  # ecg_id of a PTB-XL 500 Hz record; empty = unknown
    # trailing part of the path; patient id from the table
    (
        "hr_gt/04482_hr",
        "04482_hr",
        "1",
        "",
        "PX",
    ),
    ("06381_hr", "06381_hr", "0", "", "PX"),  # same patient, other label -> conflict
    ("7189", "07189_hr", "0", "", ""),  # id row ...
    ("07189_hr", "07189_hr", "1", "", ""),  # ... and name row for the same record: the name wins
    ("no_such_record", None, "1", "", ""),
    ("99999", None, "0", "", ""),
]


def _table(path, rows=ROWS, extra=None):
    df = pd.DataFrame(
        {
            "record": [r[0] for r in rows],
            "lvh": [r[2] for r in rows],
            "other": [r[3] for r in rows],
            "patient_id": [r[4] for r in rows],
        }
    )
    if extra:
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    df.to_csv(path, index=False)
    return str(path)


def _prepare_quietly(srcs, out, options):
    """prepare() with one worker, its console output discarded; its summary."""
    return prepare(srcs, out, options, workers=1, stream=io.StringIO())


def _two_records_and_table(folder, **columns):
    """Writes records r1 and r2 into folder and, beside them, records.csv with a record column and the given
    columns (name -> the two values)."""
    write_record(str(folder), "r1", seed=1)
    write_record(str(folder), "r2", seed=2)
    pd.DataFrame({"record": ["r1", "r2"], **columns}).to_csv(folder / "records.csv", index=False)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    table = _table(d / "labels.csv")
    s = _prepare_quietly([SAMPLE], str(d / "out"), PrepareOptions(labels=table, label_column="lvh"))
    return open_dataset(str(d / "out")), s


def test_matching_by_name_path_and_ecg_id(labelled):
    ds, s = labelled
    assert len(ds) == 52  # every record kept, labelled or not
    by = dict(zip(ds.names, ds.labels))
    expected = {
        "00841_hr": 1,
        "01612_hr": 0,
        "02132_hr": 1,
        "HR06001": 1,
        "HR00002": 0,
        "04482_hr": 1,
        "06381_hr": 0,
        "07189_hr": 1,
    }
    for name, y in expected.items():
        assert by[name] == y, name
    assert np.isnan(by["03403_hr"])  # matched, empty value -> unknown
    assert np.isnan(by["HR06002"])  # no row -> unknown, still kept for pretraining
    assert int(np.isfinite(ds.labels).sum()) == len(expected)
    t = s["label_table"]
    assert t["records_matched"] == 9 and t["table_rows"] == len(ROWS)
    assert t["table_rows_overridden"] == 1 and t["overridden_examples"] == [
        "7189"
    ]  # the name row won
    assert t["table_rows_unmatched"] == 2 and set(t["unmatched_examples"]) == {
        "no_such_record",
        "99999",
    }
    assert s["labels"] == {"positive": 5, "negative": 3, "unknown": 52 - 8}


def test_patient_ids_and_conflicts(labelled):
    ds, s = labelled
    pid = dict(zip(ds.names, ds.patient_ids))
    assert pid["04482_hr"] == pid["06381_hr"] == "PX"
    # headers carry none, the table gives none
    assert pid["HR00001"] == "" and pid["00841_hr"] == ""
    assert s["patients_with_conflicting_labels"] == 1 and s["conflict_examples"] == ["PX"]


def test_switch_label_column(labelled):
    ds, _ = labelled
    other = ds.with_label("other")
    by = dict(zip(other.names, other.labels))
    assert by["00841_hr"] == 0 and by["01612_hr"] == 1 and by["HR06001"] == 1 and by["HR00002"] == 0
    assert np.isnan(by["02132_hr"])
    # same data, other labels
    assert other.raw is ds.raw and np.array_equal(other.signals[3], ds.signals[3])
    assert "other" in ds.label_columns() and "lvh" in ds.label_columns()
    with pytest.raises(UserError, match="no label column 'nope'"):
        ds.with_label("nope")
    # the header-derived label is still there under its own name
    # (records.csv: 02132_hr has '# Labels: NORM' -> normal 1; 00841_hr 'STTC, HYP, PVC' -> 0)
    normal = dict(zip(ds.names, ds.with_label("normal").labels))
    assert normal["02132_hr"] == 1 and normal["00841_hr"] == 0


@pytest.mark.parametrize("bad", ["maybe", "2", "0.5", "ja", "t", "n", "Y", "1e0", "-0", "+01.000"])
def test_bad_value_is_one_line_error(tmp_path, bad):
    table = _table(tmp_path / "t.csv", ROWS[:3] + [("6001", None, bad, "", "")])
    with pytest.raises(UserError) as e:
        prepare(
            [SAMPLE],
            str(tmp_path / "out"),
            PrepareOptions(labels=table, label_column="lvh"),
            workers=1,
        )
    msg = str(e.value)
    assert "\n" not in msg and table in msg and "row 4" in msg and f"'{bad}'" in msg
    assert not os.path.exists(tmp_path / "out")  # checked before any work


def test_table_errors(tmp_path):
    t = _table(tmp_path / "t.csv")
    with pytest.raises(UserError, match="no label column 'x'"):
        prepare([SAMPLE], str(tmp_path / "o"), PrepareOptions(labels=t, label_column="x"))
    with pytest.raises(UserError, match="--label-column"):  # two candidate columns: must choose
        prepare([SAMPLE], str(tmp_path / "o"), PrepareOptions(labels=t))
    pd.DataFrame({"id": ["a"], "y": ["1"]}).to_csv(tmp_path / "norec.csv", index=False)
    with pytest.raises(UserError, match="no 'record' column"):
        prepare([SAMPLE], str(tmp_path / "o"), PrepareOptions(labels=str(tmp_path / "norec.csv")))
    pd.DataFrame({"record": ["a", "a"], "y": ["1", "0"]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(UserError, match="more than one row"):
        prepare([SAMPLE], str(tmp_path / "o"), PrepareOptions(labels=str(tmp_path / "dup.csv")))
    (tmp_path / "empty.csv").write_text("record,lvh\n")
    with pytest.raises(UserError, match="header but no rows"):
        prepare([SAMPLE], str(tmp_path / "o"), PrepareOptions(labels=str(tmp_path / "empty.csv")))
    # a column the dataset writes itself for each record (here the stored length) cannot come from a table
    pd.DataFrame({"record": ["00841_hr"], "lvh": ["1"], "valid_length": ["x"]}).to_csv(
        tmp_path / "res.csv", index=False
    )
    with pytest.raises(
        UserError, match="column 'valid_length' names a field prepare writes itself"
    ):
        prepare(
            [SAMPLE],
            str(tmp_path / "o"),
            PrepareOptions(labels=str(tmp_path / "res.csv"), label_column="lvh"),
        )
    assert not os.path.exists(tmp_path / "o")  # each refused before any work


def test_empty_table_found_in_src_is_one_line_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "rec.npy").write_bytes(b"")  # never read: the table is refused first
    (src / "labels.csv").write_text("record,lvh\n")
    with pytest.raises(UserError) as e:
        prepare([str(src)], str(tmp_path / "o"), PrepareOptions())
    assert "labels.csv: the table has a header but no rows (give --no-auto-labels" in str(e.value)


def test_accepted_values():
    for v, y in [
        ("1", 1),
        ("0", 0),
        ("true", 1),
        ("FALSE", 0),
        ("Yes", 1),
        ("no", 0),
        (" ", None),
        ("1.0", 1),
        ("0.00", 0),
    ]:
        got = parse_binary(v)
        assert np.isnan(got) if y is None else got == y, v
    assert parse_binary("maybe") is None


def test_cli_with_label_table(tmp_path):
    table = _table(tmp_path / "labels.csv")
    args = (SAMPLE, "--out", str(tmp_path / "o"), "--labels", table, "--label-column", "lvh")
    r = prepare_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "9 records matched" in r.stderr and "2 of 12 table rows matched nothing" in r.stderr
    assert "no_such_record" in r.stderr and "conflicting labels: 1" in r.stderr
    r = prepare_cli(*args)  # the same command again: nothing to redo
    assert r.returncode == 0 and "up to date" in r.stderr


def test_shipped_sample_prepares_completely_with_records_csv(tmp_path):
    """ptbxl_sample/records.csv lies at the top of the SRC: it is attached without --labels."""
    s = prepare(
        [SAMPLE], str(tmp_path / "out"), PrepareOptions(), workers=2, stream=open(os.devnull, "w")
    )
    ds = open_dataset(str(tmp_path / "out"))
    table = pd.read_csv(os.path.join(SAMPLE, "records.csv"), dtype=str, keep_default_na=False)
    assert len(table) == 82 and s["skipped"] == 0 and s["duplicates"] == 30
    # the 52 distinct ECGs: one row each, the 500 Hz copy where a 100 Hz one also exists
    hr = table[~table.record.str.endswith("_lr")].set_index("record")
    assert len(ds) == len(hr) == 52
    assert sorted(ds.meta["relpath"]) == sorted(hr.index)
    for i, rel in enumerate(ds.meta["relpath"]):
        assert ds.patient_ids[i] == hr.loc[rel, "patient_id"], rel
        assert ds.labels[i] == float(hr.loc[rel, "normal"]), rel
        assert ds.meta["fs_original"].iloc[i] == 500
    pos = int((hr["normal"].astype(float) == 1).sum())
    # known ids
    assert s["patients"] == hr.loc[hr["patient_id"] != "", "patient_id"].nunique() == 29
    assert s["labels"] == {"positive": pos, "negative": len(hr) - pos, "unknown": 0} and pos == 30
    assert np.isfinite(np.asarray(ds.signals)).all()
    _prepare_quietly([SAMPLE], str(tmp_path / "plain"), PrepareOptions(auto_labels=False))
    plain = open_dataset(str(tmp_path / "plain"))
    assert (plain.patient_ids == "").all()  # the headers carry no patient ids
    by = dict(zip(plain.names, plain.labels))
    # header #Dx has more than sinus rhythm; records.csv (PTB-XL NORM) says 1
    assert by["HR00001"] == 0.0


def test_two_rows_naming_one_record_by_the_same_kind_of_key_are_refused(tmp_path):
    # ids 841 and 00841 are one PTB-XL ecg_id: the table is ambiguous for record 00841_hr
    write_record(str(tmp_path / "src"), "00841_hr", seed=1)
    table = tmp_path / "t.csv"
    pd.DataFrame({"record": ["841", "00841"], "lvh": ["1", "0"]}).to_csv(table, index=False)
    with pytest.raises(UserError, match=r"rows '841' and '00841' both name record .*00841_hr"):
        _prepare_quietly(
            [str(tmp_path / "src")],
            str(tmp_path / "out"),
            PrepareOptions(labels=str(table), label_column="lvh"),
        )


def test_a_row_labelling_several_records_is_reported(tmp_path):
    for folder, seed in (("a", 1), ("b", 2)):
        write_record(str(tmp_path / "src" / folder), "same", seed=seed)
    write_record(str(tmp_path / "src" / "a"), "other", seed=3)
    table = tmp_path / "t.csv"
    pd.DataFrame({"record": ["same", "other"], "lvh": ["1", "0"]}).to_csv(table, index=False)
    s = _prepare_quietly(
        [str(tmp_path / "src")],
        str(tmp_path / "out"),
        PrepareOptions(labels=str(table), label_column="lvh"),
    )
    t = s["label_table"]
    assert t["records_matched"] == 3 and t["table_rows_matching_several_records"] == 1
    assert t["several_examples"] == ["same"]


def test_bad_value_in_a_label_column_of_a_table_found_in_src_stops_before_any_work(tmp_path):
    src = tmp_path / "src"
    _two_records_and_table(src, normal=["1", "2"])
    with pytest.raises(
        UserError,
        match=r"records.csv: column 'normal' .*row 2 \(record 'r2'\): invalid label value '2'",
    ):
        _prepare_quietly([str(src)], str(tmp_path / "out"), PrepareOptions())
    assert not (tmp_path / "out" / "meta.csv").exists()


def test_tables_not_applied_and_missing_patient_ids_are_said(tmp_path):
    sub = tmp_path / "src" / "sub"
    _two_records_and_table(sub, patient_id=["P1", "P1"], lvh=["1", "0"])

    def prep(src, out, **kw):
        text = io.StringIO()
        s = prepare([str(src)], str(tmp_path / out), PrepareOptions(**kw), workers=1, stream=text)
        return s, text.getvalue()

    # the parent folder: the table one level down is not applied, and the run says so
    s, text = prep(tmp_path / "src", "parent")
    assert [t["table"] for t in s["label_tables_not_used"]] == [str(sub / "records.csv")]
    assert f"note: label table {sub / 'records.csv'} was not used (in a subfolder of SRC" in text
    assert "note: no record has a patient id" in text
    # the folder itself: applied, patients known, nothing to say
    s, text = prep(sub, "sub")
    assert s["patients"] == 1 and not s["label_tables_not_used"] and "note:" not in text
    # --labels replaces the table found in SRC, patient ids included: said too
    other = tmp_path / "other.csv"
    pd.DataFrame({"record": ["r1"], "lvh": ["1"]}).to_csv(other, index=False)
    s, text = prep(sub, "given", labels=str(other), label_column="lvh")
    assert "(--labels was given; its patient ids are not applied either)" in text
    # the same table: applied
    s, text = prep(sub, "itself", labels=str(sub / "records.csv"), label_column="lvh")
    assert s["patients"] == 1 and "note:" not in text
    # a table that matches no record at all is a loud warning
    none = tmp_path / "none.csv"
    pd.DataFrame({"record": ["no_such"], "lvh": ["1"]}).to_csv(none, index=False)
    s, text = prep(sub, "nomatch", labels=str(none), label_column="lvh")
    assert f"WARNING: label table {none} matched no record" in text


def test_a_text_label_column_in_a_table_found_in_src_is_not_an_error_when_another_is_the_label(
    tmp_path,
):
    # records.csv with a diagnosis text in `label` and a 0/1 column: the 0/1 column is the label, `label` a note
    src = tmp_path / "src"
    _two_records_and_table(src, patient_id=["P1", "P2"], label=["MI", "NORM"], lvh=["1", "0"])
    for kw in ({}, {"label_column": "lvh"}):
        s = _prepare_quietly([str(src)], str(tmp_path / f"out{len(kw)}"), PrepareOptions(**kw))
        assert s["label_column"] == "lvh" and s["patients"] == 2 and s["labels"]["positive"] == 1
