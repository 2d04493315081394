"""Metadata from WFDB header comments and from record names.

Understood comment spellings (case-insensitive, `#Key: value`, `# Key: value`, `<key>: value`, `key = value`):
- age: `Age`; sex: `Sex`/`Gender` (Male/Female/M/F/0=male/1=female as PTB-XL);
- patient id: `Patient`, `Patient ID`, `Patient_ID`, `PatientID`, `patient_id`, `Patient no`, `Subject`,
  `Subject ID`, `subject_id`, `PID`;
- diagnoses: `Dx` (SNOMED-CT codes, CinC 2020/21) -> `dx`; `normal` = 1 iff Dx is sinus rhythm 426783006 alone;
  `Labels` (PhysioNet 2024 PTB-XL headers) -> `labels`; `normal` = 1 iff the labels are exactly `NORM`;
- binary labels: `Label: v` -> column `label`; `<Name> label: v` (e.g. CODE-15%'s `Chagas label: True`) -> column
  `<name>` (lower case, spaces as `_`), values 0/1, true/false, yes/no.
"""

from __future__ import annotations

import math
import re

SINUS_RHYTHM = "426783006"

_KV = re.compile(r"^\s*<?\s*([A-Za-z][A-Za-z0-9 _\-/.]*?)\s*>?\s*[:=]\s*(.*?)\s*$")
_PATIENT_KEYS = {
    "patient",
    "patientid",
    "patientno",
    "patientnumber",
    "patientnr",
    "subject",
    "subjectid",
    "pid",
    "patid",
}
_SQUASH = re.compile(r"[\s_\-/.]+")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}
# 1.0 / 0.0, as pandas writes a 0/1 column that has empty cells
_FLOAT01 = re.compile(r"([01])\.0*")


def parse_binary(value) -> float | None:
    """'1'/'true'/'yes' -> 1.0, '0'/'false'/'no' -> 0.0 (any case; '1.0'/'0.0' too), '' -> NaN, anything else
    (e.g. 't', 'y', '2', '1e0', '-0') -> None (invalid)."""
    if value is None:
        return math.nan
    if isinstance(value, float) and math.isnan(value):
        return math.nan
    s = str(value).strip().lower()
    if s == "":
        return math.nan
    if s in _TRUE:
        return 1.0
    if s in _FALSE:
        return 0.0
    m = _FLOAT01.fullmatch(s)
    return float(m.group(1)) if m else None


def clean_id(v: str) -> str:
    """An id as written in a header or table -> its canonical string ('' for unknown; 15709.0 -> 15709)."""
    v = v.strip().strip("'\"")
    if v.lower() in ("", "unknown", "nan", "none", "n/a", "na"):
        return ""
    if re.fullmatch(r"\d+\.0+", v):  # 15709.0 as written by pandas
        v = v.split(".")[0]
    return v


def parse_comments(comments: list[str]) -> dict:
    """Header comment lines (without '#') -> metadata dict (only the keys found)."""
    out: dict = {}
    for c in comments:
        # several "key: value" pairs on one line (INCART-style "<age>: 65 <sex>: F")
        for part in re.split(r"\s{2,}|;|\s+(?=<[A-Za-z])", c) if c.count(":") > 1 else [c]:
            m = _KV.match(part)
            if not m:
                continue
            key_raw, val = m.group(1), m.group(2)
            key = _SQUASH.sub("", key_raw.lower())
            if key == "age":
                try:
                    a = float(val.split()[0]) if val else math.nan
                except ValueError:
                    a = math.nan
                out["age"] = a if math.isfinite(a) and 0 <= a < 150 else math.nan
            elif key in ("sex", "gender"):
                s = val.strip().lower()
                out["sex"] = (
                    "M" if s in ("m", "male", "0") else "F" if s in ("f", "female", "1") else ""
                )
            elif key in _PATIENT_KEYS:
                pid = clean_id(val)
                if pid:
                    out["patient_id"] = pid
            elif key == "dx":
                codes = [x.strip() for x in re.split(r"[,\s]+", val) if x.strip()]
                out["dx"] = ",".join(codes)
                if codes:
                    out["normal"] = 1.0 if set(codes) == {SINUS_RHYTHM} else 0.0
            elif key == "labels":
                labs = [x.strip() for x in val.split(",") if x.strip()]
                out["labels"] = ", ".join(labs)
                if labs:
                    out["normal"] = 1.0 if labs == ["NORM"] else 0.0
            elif key == "label" or key.endswith("label"):
                v = parse_binary(val)
                if v is not None:
                    name = (
                        "label"
                        if key == "label"
                        else _SQUASH.sub("_", key_raw.lower()[: -len("label")].strip()).strip("_")
                    )
                    out[name or "label"] = v
    return out


_PTBXL_NAME = re.compile(r"^(\d{5})_(hr|lr)$")
_CINC_PTBXL = re.compile(r"^HR(\d{5})$")


def source_id(name: str) -> str:
    """The id a record has in its source's own metadata: PTB-XL's ecg_id for `00841_hr`/`00841_lr` and for the
    CinC copies `HR00841`; else ''."""
    m = _PTBXL_NAME.match(name) or _CINC_PTBXL.match(name)
    return str(int(m.group(1))) if m else ""


def ptbxl_rate_tag(name: str) -> tuple[str, str] | None:
    """('00841', 'hr') for PTB-XL style names, else None."""
    m = _PTBXL_NAME.match(name)
    return (m.group(1), m.group(2)) if m else None
