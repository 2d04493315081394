"""Lead-name normalisation: map the many spellings seen in the wild onto `ecgcl_jax.LEADS`."""

from __future__ import annotations

import re

from ecgcl_jax import LEADS

_ALIASES = {
    "i": "I",
    "ii": "II",
    "iii": "III",
    "avr": "aVR",
    "avl": "aVL",
    "avf": "aVF",
    # Brazilian / CODE-style "DI, DII, DIII"
    "di": "I",
    "dii": "II",
    "diii": "III",
}
for _k in range(1, 7):
    _ALIASES[f"v{_k}"] = f"V{_k}"
    _ALIASES[f"c{_k}"] = f"V{_k}"  # European chest-lead naming C1..C6

_STRIP = re.compile(r"[\s_\-\.'\"]+")


_MINUS = ("-", "\u2212")


def parse_lead(name: str) -> tuple[str | None, bool]:
    """(standard lead name or None if unknown, inverted) for a channel name: any case, `AVR`, `lead_II`, ...; a
    leading minus sign marks an inverted lead, e.g. `-aVR` of the Cabrera display, which is -1 x aVR."""
    s = str(name).strip()
    if s[:4].lower() == "lead":  # `lead -aVR`, `lead_II`
        s = s[4:].lstrip(" _.")
    inverted = s[:1] in _MINUS
    key = _STRIP.sub("", s[1:] if inverted else s).lower()
    return _ALIASES.get(key), inverted


def normalise_lead(name: str) -> str | None:
    """The standard lead name for `name` (see parse_lead; `-aVR` gives aVR), or None if unknown."""
    return parse_lead(name)[0]


def lead_index(names: list[str]) -> tuple[dict[str, int], list[str], list[str], set[str]]:
    """Map standard lead -> column index in a record with channel `names`.

    Returns (mapping, unknown_names, duplicated_standard_leads, inverted): channels whose name is not a
    standard lead (e.g. PTB's vx, vy, vz) are listed as unknown and not used; `inverted` holds the standard
    leads whose mapped channel is stored with the opposite sign (`-aVR`), to be negated.
    """
    mapping: dict[str, int] = {}
    unknown: list[str] = []
    dup: list[str] = []
    inverted: set[str] = set()
    for j, n in enumerate(names):
        std, neg = parse_lead(n)
        if std is None:
            unknown.append(str(n))
        elif std in mapping:
            dup.append(std)
        else:
            mapping[std] = j
            if neg:
                inverted.add(std)
    return mapping, unknown, dup, inverted


def missing_leads(mapping: dict[str, int]) -> list[str]:
    return [l for l in LEADS if l not in mapping]
