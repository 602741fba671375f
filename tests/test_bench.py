"""Bench machinery on the tiny preset (CPU): JSON shape, steps sweep, floors and the pipelined estimate.

Nothing here asserts on measured time; timing on the H200 lives in benchmarks/ and docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pi05_export.bench import (
    BENCH_COMPONENTS,
    _eager_stages,
    bench_inputs,
    component_costs,
    floor_ms,
    parse_steps,
    pipelined_estimate,
    run_benchmark,
    sample_with,
    time_grid,
)
from pi05_export.cli import run
from pi05_export.config import Pi05Config
from pi05_export.errors import ConfigError
from tests.tolerances import REF_ATOL

FAST = ["--device", "cpu", "--dtype", "fp32", "--warmup", "1", "--iters", "2"]


@pytest.mark.parametrize(("text", "expected"), [
    ("10", (10,)), ("1,2,3,5,10", (1, 2, 3, 5, 10)), ("10, 3,3 ,2", (2, 3, 10)), ([5, 1], (1, 5)),
])
def test_parse_steps(text, expected):
    assert parse_steps(text) == expected


@pytest.mark.parametrize("text", ["", "3,,5", "3,x", "0", "-1,2", "2.5"])
def test_parse_steps_rejects(text):
    with pytest.raises(ConfigError, match="--steps"):
        parse_steps(text)


def test_pipelined_estimate_arithmetic():
    # denoise-bound: vision hides behind llm + N x denoise
    est = pipelined_estimate(vision_ms=6.0, llm_ms=10.0, denoise_ms=4.0, steps=10)
    assert est["latency_ms"] == pytest.approx(56.0)
    assert est["period_ms"] == pytest.approx(50.0)
    assert est["hz"] == pytest.approx(20.0)
    # vision-bound: one step is shorter than the vision tower
    est = pipelined_estimate(vision_ms=30.0, llm_ms=5.0, denoise_ms=2.0, steps=1)
    assert (est["latency_ms"], est["period_ms"]) == (pytest.approx(37.0), pytest.approx(30.0))


def test_floor_is_the_larger_of_compute_and_memory():
    f = floor_ms(flops=1e12, nbytes=1e9, tflops=500.0, gbps=4000.0)  # 2 ms compute, 0.25 ms memory
    assert f["compute_floor_ms"] == pytest.approx(2.0)
    assert f["memory_floor_ms"] == pytest.approx(0.25)
    assert f["floor_ms"] == pytest.approx(2.0)


def test_full_size_flops_match_the_reference_arithmetic():
    """Counted on a meta-device model: ~4.8 TFLOP for 10 steps (toolchain notes), the prefix LLM dominating."""
    costs = component_costs(Pi05Config.from_name("pi05"), batch=1, dtype="bf16")
    total10 = costs["vision"]["flops"] + costs["llm"]["flops"] + 10 * costs["denoise"]["flops"]
    assert total10 == pytest.approx(4.8e12, rel=0.03)
    assert costs["llm"]["flops"] > costs["vision"]["flops"] > 10 * costs["denoise"]["flops"] * 0.5
    # bf16 weights: ~0.8 GB vision, ~4 GB llm (embedding excluded), ~0.6 GB expert + 0.47 GB of adaRMS
    # `dense` weights that openpi's policy keeps in fp32 (they live under *_layernorm)
    assert costs["vision"]["bytes"] == pytest.approx(0.83e9, rel=0.1)
    assert costs["llm"]["bytes"] == pytest.approx(3.98e9, rel=0.1)
    assert costs["denoise"]["bytes"] == pytest.approx(1.1e9, rel=0.05)


def test_benchmarked_chain_is_sample_actions(tiny_model):
    """The end-to-end loop that bench times computes exactly what Pi05Model.sample_actions computes."""
    cfg = tiny_model.config
    inp = bench_inputs(cfg, batch=2, seed=1)
    got = sample_with(_eager_stages(tiny_model, cuda=False), inp, time_grid(3, 2))
    images = inp["pixel_values"].reshape(2, cfg.num_views, *inp["pixel_values"].shape[1:])
    ref = tiny_model.sample_actions(images, inp["image_mask"], inp["tokens"], inp["token_mask"], noise=inp["noise"],
                                    num_steps=3)
    diff = (got - ref).abs()
    assert diff.max() <= REF_ATOL, f"max abs {diff.max():.3g}, mean abs {diff.mean():.3g}"


def test_cli_json_line_and_steps_sweep(capsys):
    code = run(["bench", "--preset", "tiny", "--random-init", "--steps", "3,1,2", "--pipelined", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])  # ONE JSON line, last on stdout
    assert "denoise (1 step)" in captured.err and "pipe ms" in captured.err and "MSE vs fp32 10" in captured.err
    table = {row["steps"]: row for row in result["steps_table"]}
    assert sorted(table) == [1, 2, 3, 10]
    assert table[10]["mse_vs_own"] == 0 and table[10]["max_abs_vs_own"] == 0
    assert table[1]["max_abs_vs_own"] > table[3]["max_abs_vs_own"] > 0  # fewer steps, further from 10 steps
    assert all(e["pipelined_period_ms"] > 0 and e["pipelined_hz"] > 0 for e in result["end_to_end"])
    assert set(result) >= {"settings", "environment", "ceilings", "components", "end_to_end", "memory", "stages"}
    assert result["settings"]["steps"] == [1, 2, 3]
    assert result["settings"]["shapes"]["views"] == 3
    assert result["environment"]["versions"]["torch"] == torch.__version__
    comps = result["components"]
    assert set(comps) == set(BENCH_COMPONENTS)
    for c in comps.values():
        assert c["median_ms"] > 0 and c["p90_ms"] >= c["min_ms"] and c["n"] == 2
        assert c["flops"] > 0 and c["floor_ms"] == max(c["compute_floor_ms"], c["memory_floor_ms"])
    med = {k: v["median_ms"] for k, v in comps.items()}
    assert [e["steps"] for e in result["end_to_end"]] == [1, 2, 3]
    for e in result["end_to_end"]:
        n = e["steps"]
        assert e["hz"] == pytest.approx(1000 / e["median_ms"], rel=1e-4)
        assert e["sum_of_parts_ms"] == pytest.approx(med["vision"] + med["llm"] + n * med["denoise"], rel=1e-4)
        assert e["pipelined_estimate_ms"] == pytest.approx(max(med["vision"], med["llm"] + n * med["denoise"]), rel=1e-4)
        assert e["flops"] == pytest.approx(comps["vision"]["flops"] + comps["llm"]["flops"] + n * comps["denoise"]["flops"],
                                          rel=1e-4)
    assert result["memory"]["peak_mib"] > 0


def test_compile_failure_falls_back_with_a_logged_reason(fresh_tiny_model, caplog):
    def broken_compiler(fn):
        def compiled(*args):
            raise RuntimeError("inductor exploded\nsecond line")
        return compiled

    with caplog.at_level(logging.WARNING, logger="pi05_export.bench"):
        result = run_benchmark(fresh_tiny_model, backend="torch-compile", steps="2", warmup=0, iters=1, dtype="fp32",
                               device="cpu", compiler=broken_compiler)
    for c in BENCH_COMPONENTS:
        assert result.stages[c].startswith("eager (torch.compile failed: RuntimeError: inductor exploded)")
        assert f"torch.compile failed for {c}" in caplog.text
    # the eager fallback still runs the runtime form (fused, modulations made once): vs the plain model,
    # reordering noise only
    assert result.check is not None and 0 <= result.check["max_abs"] <= REF_ATOL


def test_onnxruntime_backend_runs_exported_graphs(tmp_path, capsys):
    assert run(["onnx", "--preset", "tiny", "--random-init", "--components", "vision,llm,denoise", "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    code = run(["bench", "--backend", "onnxruntime", "--artifacts", str(tmp_path / "x"), "--steps", "2", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["settings"]["backend"] == "onnxruntime"
    assert "onnxruntime" in result["stages"]["denoise"]
    assert result["end_to_end"][0]["steps"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "tiny", "--random-init", "--steps", "3,x", "--device", "cpu"], "invalid --steps '3,x'"),
    (["--preset", "tiny", "--device", "cpu"], "needs --random-init"),
    (["--preset", "tiny", "--random-init", "--device", "cpu", "--backend", "torch-cudagraph"], "captures CUDA graphs and needs a CUDA GPU"),
    (["--backend", "onnxruntime", "--device", "cpu"], "needs --artifacts"),
    (["--preset", "tiny", "--random-init", "--device", "tpu"], "unknown device"),
])
def test_user_errors(args, message, capsys):
    assert run(["bench", *args]) != 0
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")


def test_cuda_requested_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run(["bench", "--preset", "tiny", "--random-init"]) != 0
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_artifacts_manifest(tmp_path, capsys):
    assert run(["bench", "--backend", "onnxruntime", "--artifacts", str(tmp_path), "--device", "cpu"]) != 0
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_real_torch_compile_on_cpu(fresh_tiny_model):
    result = run_benchmark(fresh_tiny_model, backend="torch-compile", steps="2", warmup=1, iters=2, dtype="fp32", device="cpu")
    assert all(result.stages[c].startswith("torch.compile") for c in BENCH_COMPONENTS), result.stages
    assert result.check["max_abs"] < 1e-4


def test_runtime_form_in_bf16_with_steps_table(fresh_tiny_model):
    """The compiled backends' runtime form (fused projections, precomputed modulations) in bf16 next to the
    steps table's fp32 copy of the same (fused) model: the copy's cast must not run a stale bf16 fused matrix."""
    result = run_benchmark(fresh_tiny_model, backend="torch-compile", steps="2,3", warmup=0, iters=1, dtype="bf16",
                           device="cpu", compiler=lambda fn: fn)
    assert "precomputed" in result.stages["denoise"] and "fused" in result.stages["vision"]
    assert result.check["cosine"] > 0.9999
    assert [r["steps"] for r in result.steps_table] == [10, 3, 2]
    assert result.steps_table[0]["mse_vs_reference"] < 1e-3
