"""The pretraining benchmark (bench/bench_pretrain.py) end to end, tiny: it must keep running from its documented
command, time the real step on both data paths, and compute its project/torch ratios from what both sides measured.

The torch side is a stand-in script that speaks torch_reference.py's command line and JSON lines (torch is a
benchmark-only dependency, absent in CI); it reports a different rate in each round, so the ratios and their median
are checked against a recomputation from the records.
"""

import glob
import json
import os
import statistics
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_augment  # noqa: E402
import bench_pretrain  # noqa: E402
import bench_read_rows  # noqa: E402

# after jax: profile_step adds an XLA flag on import only when jax is not imported yet
import profile_step  # noqa: E402

from ecgcl_jax import augment  # noqa: E402

# short timing windows, no warm-up, a 16-record dataset: enough to exercise a benchmark's paths
QUICK_TIMING = ["--windows", "3", "--warmup", "0", "--records", "16"]

TORCH_STUB = textwrap.dedent("""\
    import argparse, json, os, sys
    ap = argparse.ArgumentParser()
    for a in ("--device", "--encoder", "--batch", "--aug1", "--aug2", "--precision", "--seconds", "--windows",
              "--warmup", "--json", "--layout"):
        ap.add_argument(a)
    args = ap.parse_args()
    calls = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")
    n = sum(1 for _ in open(calls)) if os.path.exists(calls) else 0
    with open(calls, "a") as f:
        f.write(json.dumps(vars(args)) + "\\n")
    with open(args.json, "a") as f:
        for b in args.batch.split(","):
            rate = 10.0 * (n + 1)  # round 1: 10 ECG/s, round 2: 20 ECG/s
            f.write(json.dumps({"batch": int(b), "ecg_per_s_median": rate, "ecg_per_s_min": rate,
                                "ecg_per_s_max": rate}) + "\\n")
    print("stub torch", args.batch)
""")


def run_bench(main, tmp_path, args):
    """Runs a benchmark's ``main(args)`` with its data under tmp_path/data and its JSON lines in
    tmp_path/bench.jsonl; checks that it returns 0 and returns the records it wrote."""
    out = tmp_path / "bench.jsonl"
    assert main([*args, "--workdir", str(tmp_path / "data"), "--json", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_bench_pretrain_times_both_data_paths_and_reports_ratios_from_the_records(tmp_path):
    stub = tmp_path / "torch_stub.py"
    stub.write_text(TORCH_STUB)
    recs = run_bench(
        bench_pretrain.main,
        tmp_path,
        [
            "--batch",
            "8",
            "--data",
            "resident,streamed",
            "--rounds",
            "2",
            "--seconds",
            "0.3",
            *QUICK_TIMING,
            "--torch-python",
            sys.executable,
            "--torch-ref",
            str(stub),
            "--torch-args=--layout nhwc",
        ],
    )

    project = [r for r in recs if r.get("framework") == "ecgcl-jax"]
    assert sorted((r["data"], r["round"]) for r in project) == [
        ("resident", 1),
        ("resident", 2),
        ("streamed", 1),
        ("streamed", 2),
    ]
    for r in project:
        assert "error" not in r, r.get("error")
        assert (
            r["encoder"] == "cnn"
            and r["batch"] == 8
            and r["aug_pair"] == bench_pretrain.DEFAULT_PAIR
        )
        assert (
            r["ecg_per_s_min"] <= r["ecg_per_s_median"] <= r["ecg_per_s_max"]
            and r["ecg_per_s_min"] > 0
        )
        assert r["step_ms"] == pytest.approx(1e3 * 8 / r["ecg_per_s_median"])
        assert r["loss_finite"] and np.isfinite(r["final_loss"])
        # one device by default, as torch_reference.py runs on one (the conftest gives this process 8)
        assert r["num_devices_used"] == 1 < jax.device_count() and r["compile_s"] > 0
    # the step counter advances across rounds: the same compiled case keeps training, it is not rebuilt
    for data in ("resident", "streamed"):
        steps = [
            r["steps_done"] for r in sorted(project, key=lambda r: r["round"]) if r["data"] == data
        ]
        assert steps[1] > steps[0] > 0

    # the torch side ran once per round with the same work, torch_reference.py's spelling
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2
    for c in calls:
        assert (c["device"], c["encoder"], c["batch"], c["precision"], c["layout"]) == (
            "cpu",
            "cnn",
            "8",
            "fp32",
            "nhwc",
        )
        assert (c["aug1"], c["aug2"]) == tuple(bench_pretrain.DEFAULT_PAIR.split("+"))
    torch_recs = [r for r in recs if r.get("framework") == "torch"]
    assert sorted(r["ecg_per_s_median"] for r in torch_recs) == [10.0, 20.0]

    summaries = {r["data"]: r for r in recs if r.get("kind") == "summary"}
    assert set(summaries) == {"resident", "streamed"}
    for data, s in summaries.items():
        by_round = {r["round"]: r["ecg_per_s_median"] for r in project if r["data"] == data}
        expect = [by_round[1] / 10.0, by_round[2] / 20.0]
        assert s["ratios"] == pytest.approx(expect)
        assert s["ratio_median"] == pytest.approx(statistics.median(expect))
        assert s["project_ecg_per_s"] == pytest.approx(statistics.median(by_round.values()))
        assert s["torch_ecg_per_s"] == pytest.approx(15.0) and s["torch_variant"] == "eager nhwc"


def test_bench_pretrain_scaling_mode(tmp_path):
    recs = run_bench(
        bench_pretrain.main,
        tmp_path,
        [
            "--scaling",
            "--scaling-devices",
            "1,4",
            "--no-torch",
            "--batch",
            "2",
            "--seconds",
            "0.2",
            *QUICK_TIMING,
        ],
    )
    assert [(r["num_devices_used"], r["batch"]) for r in recs] == [(1, 2), (4, 8)]
    base = recs[0]["ecg_per_s_median"]
    for r in recs:
        assert "error" not in r, r.get("error")
        assert r["kind"] == "scaling" and r["per_device_batch"] == 2 and r["loss_finite"]
        assert r["efficiency"] == pytest.approx(
            r["ecg_per_s_median"] / (r["num_devices_used"] * base)
        )


def test_bench_augment_alternatives_compute_the_library_results():
    """The formulations bench_augment.py times against the library's must do the same work."""
    x = jax.random.normal(jax.random.key(0), (1000, 3))
    k = jax.random.key(1)
    np.testing.assert_allclose(
        bench_augment.time_warp_two_stage(k, x, 4, 0.2), augment.time_warp(k, x, 4, 0.2), atol=2e-5
    )
    for select in (True, False):
        np.testing.assert_allclose(
            bench_augment.time_warp_time_major(k, x, 4, 0.2, select),
            augment.time_warp(k, x, 4, 0.2),
            atol=2e-5,
        )
    np.testing.assert_allclose(
        bench_augment.time_warp_jnp_interp(k, x, 4, 0.2), augment.time_warp(k, x, 4, 0.2), atol=2e-5
    )
    np.testing.assert_array_equal(
        bench_augment.permute_flat_gather(k, x, 5), augment.permute_segments(k, x, 5)
    )
    np.testing.assert_array_equal(
        bench_augment.dropout_feistel_fused(k, x, 0.1), augment.dropout_mask(k, x, 0.1)
    )
    for name, drop in bench_augment.DROPOUT_MASKS.items():
        np.testing.assert_array_equal(
            np.asarray(drop(k, 1000, 3, 100)).sum(axis=0), [100] * 3, err_msg=name
        )
    noisy = np.asarray(bench_augment.gaussian_noise_threefry(k, x, 0.05)) - np.asarray(x)
    np.testing.assert_allclose(
        noisy.std(axis=0) / np.asarray(x).std(axis=0, ddof=1), 0.05, rtol=0.15
    )


def test_bench_read_rows_runs(tmp_path):
    recs = run_bench(
        bench_read_rows.main,
        tmp_path,
        [
            "--records",
            "64",
            "--batch",
            "16,32",
            "--threads",
            "1,2",
            "--seconds",
            "0.1",
            "--rounds",
            "1",
        ],
    )
    assert [(r["batch"], r["threads"]) for r in recs] == [(16, 1), (16, 2), (32, 1), (32, 2)]
    for r in recs:
        assert r["ecg_per_s_median"] > 0 and r["gb_per_s"] == pytest.approx(
            r["ecg_per_s_median"] * 120_000 / 1e9
        )


def test_profile_step_scopes_by_hand():
    assert (
        profile_step.scope_of(
            "jit(step)/transpose(jvp(CNNEncoder))/trunk/layer_0/conv/conv_general_dilated"
        )
        == "CNNEncoder/trunk/layer_0 [bwd]"
    )
    assert (
        profile_step.scope_of(
            "jit(step)/jvp(CNNEncoder)/trunk/layer_1/Dropout_0/jit(_where)/select_n"
        )
        == "CNNEncoder/trunk/layer_1 [fwd]"
    )
    assert profile_step.scope_of("jit(step)/vmap()/add") == "vmap [fwd]"
    assert (
        profile_step.scope_of("jit(step)/jvp(LSTMEncoder)/lstm/layer_0/forward/dot", depth=2)
        == "LSTMEncoder/lstm [fwd]"
    )
    hlo = textwrap.dedent("""\
      %fused_computation.1 (p: f32[4]) -> f32[4] {
        %p = f32[4]{0} parameter(0)
        ROOT %neg.1 = f32[4]{0} negate(%p), metadata={op_name="jit(step)/jvp(M)/a/neg"}
      }
      ENTRY %main {
        %fusion.3 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step)/b/c"}
        %copy.2 = f32[4]{0} copy(%fusion.3)
        %while.7 = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body, metadata={op_name="jit(step)/scan"}
      }
      """)
    assert profile_step.parse_hlo(hlo) == {
        "p": ("parameter", ""),
        "neg.1": ("negate", "jit(step)/jvp(M)/a/neg"),
        "fusion.3": ("fusion", "jit(step)/b/c"),
        "copy.2": ("copy", ""),
        "while.7": ("while", "jit(step)/scan"),
    }


def test_profile_step_runs_and_counts_no_enclosing_op(tmp_path):
    # its own process: XLA:CPU's per-op events need a flag before jax starts
    out = tmp_path / "prof.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "profile_step.py"),
            "--batch",
            "8",
            "--steps",
            "2",
            "--top",
            "100000",
            "--json",
            str(out),
            "--trace-dir",
            str(tmp_path / "trace"),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["batch"] == 8 and rec["op_ms_per_step"] > 0 and rec["top_ops"]
    times = [t for _, t, _ in rec["top_ops"]]
    assert times == sorted(times, reverse=True) and times[0] <= rec["op_ms_per_step"]
    # the step has while loops (per-example keys); their enclosing events are not counted beside their bodies
    assert rec["control_ops_ms_left_out"] > 0
    assert not any(name.split(".")[0] in ("while", "call") for name, _, _ in rec["top_ops"])
    assert any(s.startswith("CNNEncoder/trunk/layer_0 [bwd]") for s in rec["scopes"])
    assert any(s.startswith("vmap [fwd]") for s in rec["scopes"])


def test_profile_step_outlines_a_trace_without_op_events(tmp_path):
    # a trace whose events name none of the step's HLO ops (as a GPU trace would if its layout were not the one
    # op_events reads) counts nothing, and the outline says what the trace holds instead
    f = jax.jit(lambda x: jnp.sin(x) * 2)
    f(jnp.ones(8)).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        f(jnp.ones(8)).block_until_ready()
    [path] = glob.glob(os.path.join(str(tmp_path), "**", "*.xplane.pb"), recursive=True)
    hlo = profile_step.parse_hlo(f.lower(jnp.ones(8)).compile().as_text())
    # the fused op's event is found by its name
    assert sum(profile_step.op_events(path, hlo)[0].values()) > 0
    assert not profile_step.op_events(path, {"other_fusion": ("fusion", "")})[0]
    outline = profile_step.trace_outline(path)
    assert "/host:CPU" in outline, outline
