"""Lead-name normalisation: map the many spellings seen in the wild onto `ecgcl_jax.LEADS`."""
from __future__ import annotations

import re

from ecgcl_jax import LEADS

_ALIASES = {
    "i": "I", "ii": "II", "iii": "III",
    "avr": "aVR", "avl": "aVL", "avf": "aVF",
    # Brazilian / CODE-style "DI, DII, DIII"
    "di": "I", "dii": "II", "diii": "III",
}
for _k in range(1, 7):
    _ALIASES[f"v{_k}"] = f"V{_k}"
    _ALIASES[f"c{_k}"] = f"V{_k}"  # European chest-lead naming C1..C6

_STRIP = re.compile(r"[\s_\-\.'\"]+")


def normalise_lead(name: str) -> str | None:
    """Return the standard lead name for `name` (any case, `AVR`, `lead_II`, `-aVR`...), or None if unknown."""
    key = _STRIP.sub("", str(name)).lower()
    if key.startswith("lead"):
        key = key[4:]
    return _ALIASES.get(key)


def lead_index(names: list[str]) -> tuple[dict[str, int], list[str], list[str]]:
    """Map standard lead -> column index in a record with channel `names`.

    Returns (mapping, unknown_names, duplicated_standard_leads). Channels whose name is not a
    standard lead (e.g. PTB's vx, vy, vz) are listed as unknown and not used.
    """
    mapping: dict[str, int] = {}
    unknown: list[str] = []
    dup: list[str] = []
    for j, n in enumerate(names):
        std = normalise_lead(n)
        if std is None:
            unknown.append(str(n))
        elif std in mapping:
            dup.append(std)
        else:
            mapping[std] = j
    return mapping, unknown, dup


def missing_leads(mapping: dict[str, int]) -> list[str]:
    return [l for l in LEADS if l not in mapping]
