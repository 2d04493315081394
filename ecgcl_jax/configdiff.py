"""Which config fields changed between a run's saved config and the one it is resumed with."""

from __future__ import annotations

import json


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_fields(saved: dict, current: dict, allowed=(), absent_as=None) -> str:
    """'field: old -> new, ...' for every differing field not in ``allowed`` ('' when none); past 8 fields, the rest
    by name only, so that every changed field is named. absent_as: {dotted field: value} that a saved config
    without the field ran with (a field added since it was saved)."""
    a, b = flatten(saved), flatten(current)
    for k, v in (absent_as or {}).items():
        if k in b:
            a.setdefault(k, v)
    changed = sorted(
        k
        for k in set(a) | set(b)
        if k not in allowed and json.dumps(a.get(k)) != json.dumps(b.get(k))
    )
    text = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:8])
    if len(changed) > 8:
        text += f"; and {len(changed) - 8} more: {', '.join(changed[8:])}"
    return text
