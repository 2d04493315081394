"""Config differences: the changed fields a resume names."""

from ecgcl_jax import configdiff


def test_changed_fields_names_every_field():
    old = {f"f{i:02d}": i for i in range(11)}
    new = {k: v + 1 for k, v in old.items()}
    text = configdiff.changed_fields(old, new, allowed=("f00",))
    assert text.startswith("f01: 1 -> 2, ") and "f08: 8 -> 9" in text
    assert text.endswith("; and 2 more: f09, f10")
