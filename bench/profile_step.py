"""Where the pretraining step's time goes: a profile of the real step, summed by XLA op and by model scope.

It builds the step exactly as bench_pretrain.py times it (`bench_pretrain.ProjectCase`), runs it under
`jax.profiler.trace` for --steps steps, and sums the trace's op events:
  GPU  the device plane's "XLA Ops" line (one event per HLO op executed) or, when the trace has none, the kernels
       and copies on its "Stream" lines, each summed under its hlo_op;
  CPU  XLA:CPU's per-op events, which need XLA_FLAGS=--xla_cpu_enable_xprof_traceme before jax starts (this script
       adds it when jax is not imported yet). On CPU the ops run on several threads, so the op times add up to
       thread-time, not wall time, and the work inside library calls (convolutions, dots) may not be traced.
Control-flow ops (while, call) are left out: their events enclose the ops they run. With several devices the
figures are means over them. Each op is named by its HLO instruction, and attributed to a scope from its metadata
op_name (e.g. "CNNEncoder/trunk/layer_0 [bwd]": forward or backward, model path). Prints the top ops and the
scopes, in ms per step, and appends one JSON line to --json. The trace itself stays in --trace-dir for
TensorBoard / xprof.

    python bench/profile_step.py                                          # CNN, gauss pair, float32, batch 64
    python bench/profile_step.py --batch 2048 --precision bfloat16        # on a GPU
    python bench/profile_step.py --encoder cnn_lstm --pair time_warp:4,0.2+dropout:0.1
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
import types

# XLA:CPU's per-op events need a flag before jax starts. Not on a GPU machine: the flag is part of the compilation
# cache key, so it would make this script recompile the step that run_gpu.sh's other parts have cached.
if (
    "jax" not in sys.modules
    and "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", "")
    and (
        not os.path.exists("/dev/nvidiactl")
        or os.environ.get("JAX_PLATFORMS", "").startswith("cpu")
    )
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme"
    ).strip()

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_pretrain as bp  # noqa: E402  (puts the repo on sys.path, imports jax)
import jax  # noqa: E402

_WRAPPER = re.compile(
    r"^(?:transpose|jvp|vmap|remat\d*|checkpoint|custom_jvp_call|custom_vjp_call)\((.*)\)$"
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r"op_name=\"([^\"]*)\"")
# ops whose trace event encloses the events of the ops they run (a scan's body, a called computation): counting them
# too would count that time twice
CONTROL_OPS = frozenset({"while", "call", "conditional"})


def parse_hlo(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (opcode, metadata op_name), from a compiled module's text; op_name is "" when the
    instruction has none (e.g. a layout copy)."""
    out: dict[str, tuple[str, str]] = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m and not (m.group(1) in out and out[m.group(1)][1]):
            opcode = _OPCODE.search(" " + m.group(2))
            meta = _OP_NAME.search(line)
            out[m.group(1)] = (opcode.group(1) if opcode else "", meta.group(1) if meta else "")
    return out


def scope_of(op_name: str, depth: int = 3) -> str:
    """'jit(step)/transpose(jvp(CNNEncoder))/trunk/layer_0/conv/conv_general_dilated' -> 'CNNEncoder/trunk/layer_0
    [bwd]': wrappers unwrapped, jit(...) levels and the primitive (last part) dropped, `depth` levels kept."""
    if not op_name:
        return "(no metadata: layout copies and the like)"
    parts = op_name.split("/")
    phase = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
    names = []
    for p in parts[:-1]:
        if p == "vmap()":  # the per-example augmentations
            names.append("vmap")
            continue
        while m := _WRAPPER.match(p):
            p = m.group(1)
        if p and not p.startswith("jit("):
            names.append(p)
    return f"{'/'.join(names[:depth]) or '(step)'} [{phase}]"


def op_events(
    xspace_path: str, hlo: dict[str, tuple[str, str]]
) -> tuple[collections.Counter, int, int, str]:
    """Summed duration (ns) per HLO op name from a trace; the duration (ns) of the control-flow ops (CONTROL_OPS) left
    out, since their events enclose those of the ops inside them; the number of devices summed over; the source."""
    pd = jax.profiler.ProfileData.from_file(xspace_path)
    totals: collections.Counter = collections.Counter()
    left_out = 0

    def add(name, ns):
        nonlocal left_out
        name = str(name).lstrip("%")
        if hlo.get(name, ("", ""))[0] in CONTROL_OPS:
            left_out += ns
        else:
            totals[name] += ns

    devices = [plane for plane in pd.planes if plane.name.startswith("/device:")]
    op_lines = [
        (plane, line) for plane in devices for line in plane.lines if line.name == "XLA Ops"
    ]
    if op_lines:
        for _, line in op_lines:
            for ev in line.events:
                add(ev.name, ev.duration_ns)
        return totals, left_out, len({p.name for p, _ in op_lines}), "device 'XLA Ops' lines"
    stream_lines = [
        (plane, line) for plane in devices for line in plane.lines if line.name.startswith("Stream")
    ]
    # raw GPU trace: kernels and copies per stream, each kernel tagged with its HLO op
    if stream_lines:
        for _, line in stream_lines:
            for ev in line.events:
                add(dict(ev.stats).get("hlo_op", ev.name), ev.duration_ns)
        return (
            totals,
            left_out,
            len({p.name for p, _ in stream_lines}),
            "device stream lines (kernels by hlo_op)",
        )
    for plane in pd.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name.lstrip("%") in hlo:
                    add(ev.name, ev.duration_ns)
    return totals, left_out, 1, "host op events (thread time)"


def trace_outline(xspace_path: str, max_lines: int = 8) -> str:
    """'plane: line, line, ...; plane: ...' of a trace, for saying what a trace holds when no op events were found."""
    pd = jax.profiler.ProfileData.from_file(xspace_path)
    parts = []
    for plane in pd.planes:
        names = [line.name for line in plane.lines]
        more = f", ... ({len(names)} lines)" if len(names) > max_lines else ""
        parts.append(f"{plane.name}: {', '.join(names[:max_lines])}{more}")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--encoder", default="cnn")
    ap.add_argument(
        "--batch", type=int, default=None, help="global batch (default CPU 64, GPU 2048)"
    )
    ap.add_argument("--pair", default=bp.DEFAULT_PAIR, help="augmentation pair AUG1+AUG2")
    ap.add_argument(
        "--precision", default=None, help="float32 or bfloat16 (default CPU float32, GPU bfloat16)"
    )
    ap.add_argument("--data", default="resident", choices=["resident", "streamed"])
    ap.add_argument(
        "--steps", type=int, default=5, help="traced steps (after compilation and 3 warm-up steps)"
    )
    ap.add_argument("--top", type=int, default=25, help="ops to list")
    ap.add_argument("--depth", type=int, default=3, help="levels of the model path in a scope")
    ap.add_argument("--conv", choices=["auto", "paired", "strided"], default="auto")
    ap.add_argument("--compiler-options", default="auto", help="as bench_pretrain.py")
    ap.add_argument("--trace-dir", default=None, help="where the trace goes (default: a temp dir)")
    ap.add_argument(
        "--workdir", default=None, help="where the synthetic dataset goes (default: a temp dir)"
    )
    ap.add_argument(
        "--json",
        default=None,
        help="append the summary here (default $OUT/profile_step.jsonl if $OUT "
        "is set, else bench/results_profile.jsonl)",
    )
    args = ap.parse_args(argv)
    if jax.default_backend() == "cpu" and "--xla_cpu_enable_xprof_traceme" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        print(
            "profile_step.py: jax started without XLA_FLAGS=--xla_cpu_enable_xprof_traceme, so the CPU trace has no "
            "per-op events; run this script as its own process",
            file=sys.stderr,
        )

    from ecgcl_jax import models, parallel
    from ecgcl_jax.data import open_dataset

    on_gpu = jax.default_backend() != "cpu"
    batch = args.batch or (2048 if on_gpu else 64)
    precision = args.precision or ("bfloat16" if on_gpu else "float32")
    models.CONV_FORMULATION = args.conv
    out_dir = os.environ.get("OUT")
    json_path = args.json or (
        os.path.join(out_dir, "profile_step.jsonl")
        if out_dir
        else os.path.join(HERE, "results_profile.jsonl")
    )
    folder = args.workdir or os.path.join(tempfile.gettempdir(), "ecgcl_bench_data")
    mesh = parallel.make_mesh()
    n = max(256, 2 * batch)
    dataset = open_dataset(bp.write_synthetic_dataset(os.path.join(folder, f"synthetic_{n}"), n))
    case_args = types.SimpleNamespace(compiler_options=args.compiler_options, conv=args.conv)
    case = bp.ProjectCase(
        case_args, dataset, args.encoder, args.pair, precision, batch, args.data, mesh
    )
    try:
        case._run(4)  # first step + warm-up
        t0 = time.perf_counter()
        case._run(args.steps)
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
        trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="ecgcl_profile_")
        with jax.profiler.trace(trace_dir):
            case._run(args.steps)
    finally:
        case.close()
    files = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        print(f"profile_step.py: no trace written under {trace_dir}", file=sys.stderr)
        return 1
    hlo = parse_hlo(case.step.as_text())
    totals, left_out, n_devices, source = op_events(files[-1], hlo)
    if not totals:
        print(
            f"profile_step.py: no op events of the step in {files[-1]}; the trace holds {trace_outline(files[-1])}",
            file=sys.stderr,
        )
        return 1
    if n_devices > 1:
        source += f", mean over {n_devices} devices"
    per_step = {k: v / 1e6 / args.steps / n_devices for k, v in totals.items()}
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1])
    scope = {k: scope_of(hlo[k][1], args.depth) if k in hlo else "(unattributed)" for k in per_step}
    op_ms = sum(per_step.values())
    scopes: collections.Counter = collections.Counter()
    for k, v in per_step.items():
        scopes[scope[k]] += v

    info = bp.machine_info()
    print(
        f"# {info['device_kind']} x{mesh.size} | jax {info['jax']} | commit {info.get('git_commit', '?')} | "
        f"{args.encoder} {args.pair} {precision} {args.data} B={batch} | conv {models.conv_formulation()}"
    )
    print(
        f"# step {wall_ms:.1f} ms wall before tracing ({batch / wall_ms * 1e3:,.0f} ECG/s; on CPU the per-op events "
        f"themselves slow it); traced ops {op_ms:.1f} ms per step from {source}; trace in {trace_dir}"
    )
    print(f"{'ms/step':>9} {'%':>6}  op / scope")
    for k, v in ranked[: args.top]:
        print(f"{v:9.2f} {100 * v / op_ms:6.1f}  {k}  ({scope[k]})")
    print(f"\n{'ms/step':>9} {'%':>6}  scope")
    for k, v in scopes.most_common():
        print(f"{v:9.2f} {100 * v / op_ms:6.1f}  {k}")
    rec = dict(
        info,
        kind="profile_step",
        encoder=args.encoder,
        aug_pair=args.pair,
        precision=precision,
        data=args.data,
        batch=batch,
        num_devices_used=mesh.size,
        conv=models.conv_formulation(),
        steps=args.steps,
        step_ms_wall=round(wall_ms, 3),
        op_ms_per_step=round(op_ms, 3),
        source=source,
        control_ops_ms_left_out=round(left_out / 1e6 / args.steps / n_devices, 4),
        top_ops=[[k, round(v, 4), hlo.get(k, ("", ""))[1]] for k, v in ranked[: args.top]],
        scopes={k: round(v, 4) for k, v in scopes.most_common()},
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    with open(json_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"# JSON line appended to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
