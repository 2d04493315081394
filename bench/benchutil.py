"""What the bench scripts share: where their JSON lines go."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def json_path(given: str | None, name: str) -> str:
    """`given` (--json), else $OUT/bench_<name>.jsonl when $OUT is set, else bench/results_<name>.jsonl."""
    if given:
        return given
    out_dir = os.environ.get("OUT", "")
    return (
        os.path.join(out_dir, f"bench_{name}.jsonl")
        if out_dir
        else os.path.join(HERE, f"results_{name}.jsonl")
    )
