"""quantize on `tiny`: ModelOpt PTQ calibrated over the sampling loop, Q/DQ ONNX on ONNX Runtime, NVFP4 emulation.

The action-cosine targets (fp8 >= 0.999, mixed_fp4_fp8 >= 0.995 vs fp32 at 10 steps) are checked
twice: for the fake-quantized PyTorch model (recorded by ``quantize_model``) and for the exported
bf16-typed graphs chained on ONNX Runtime (vision -> llm -> 10 x denoise, true-bf16 emulation).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pi05_export import nvfp4
from pi05_export.calibration import load_calibration_set, tokenize_fallback
from pi05_export.checkpoint import random_model
from pi05_export.errors import RecipeError
from pi05_export.quantize import calibration_loop, insert_quantizers, quantize_model, runnable_onnx
from pi05_export.recipe import load_recipe, resolve_recipe

MIN_ACTION_COSINE = {"fp8": 0.999, "mixed_fp4_fp8": 0.995}
COMPONENTS = "vision,llm,denoise"
STEPS = 10
CALIB_SAMPLES = 2  # of the 6 shipped; keeps the file near a minute on 2 cores


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def calib():
    obs, info = load_calibration_set(None, random_model("tiny", 0).config)
    return obs, info


@pytest.fixture(scope="module", params=["fp8", "mixed_fp4_fp8"])
def quantized(request, tmp_path_factory, calib):
    obs, info = calib
    out = tmp_path_factory.mktemp("q")
    report = quantize_model(random_model("tiny", 0), load_recipe(request.param), out, source={"kind": "random"},
                            calibration=obs[:CALIB_SAMPLES], calibration_info=info, steps=STEPS, components=COMPONENTS,
                            accuracy_samples=CALIB_SAMPLES)
    return request.param, report


def test_shipped_calibration_set_is_real_photos(calib):
    obs, info = calib
    assert info["kind"] == "photos" and len(obs) == 6
    img = obs[0].images[0, 0]
    assert img.std() > 0.1 and np.abs(np.diff(img, axis=-1)).mean() < 0.3  # natural image statistics, not noise
    tokens, mask = tokenize_fallback("pick", 8, 1024)
    assert tokens.tolist() == [2, 3 + ord("p"), 3 + ord("i"), 3 + ord("c"), 3 + ord("k"), 0, 0, 0] and mask.sum() == 5


def test_manifest_records_recipe_coverage_formats_and_gating(quantized):
    name, report = quantized
    m = json.loads((report.out_dir / "manifest.json").read_text())
    assert report.out_dir.name == name and m["stage"] == "quantize"
    assert len(m["recipe"]["sha256"]) == 64 and m["recipe"]["rules"]
    assert m["extra"]["coverage"] == resolve_recipe(load_recipe(name), random_model("tiny", 0)).coverage()
    assert m["extra"]["formats"] == (["fp8"] if name == "fp8" else ["fp8", "nvfp4"])
    assert m["extra"]["min_compute_capability"] == ("8.9" if name == "fp8" else "10.0")
    assert m["opset"] == (19 if name == "fp8" else 23)
    for comp in COMPONENTS.split(","):
        assert (report.out_dir / m["components"][comp]["path"]).is_file()


def test_weights_stored_low_precision(quantized):
    import onnx

    name, report = quantized
    model = onnx.load(str(report.out_dir / "onnx" / "llm.onnx"), load_external_data=False)
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT8E4M3FN in types
    assert (onnx.TensorProto.FLOAT4E2M1 in types) == (name == "mixed_fp4_fp8")
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert ("TRT_FP4DynamicQuantize" in ops) == (name == "mixed_fp4_fp8")


def test_fake_quant_action_cosine(quantized):
    name, report = quantized
    cos = report.manifest.extra["fake_quant_action_cosine"]
    assert min(cos) >= MIN_ACTION_COSINE[name], f"{name}: fake-quant action cosine {cos}"


def test_onnx_runtime_sampling_loop_action_cosine(quantized, calib):
    """The runtime ``validate`` uses: FP4 graphs through their emulation copy, bf16 rounded like an engine."""
    from pi05_export.runtime import open_pipeline

    name, report = quantized
    obs, _ = calib
    model = random_model("tiny", 0)
    for comp in COMPONENTS.split(","):
        path = runnable_onnx(report.out_dir / "onnx" / f"{comp}.onnx")
        assert path.name.endswith(".emulated.onnx") == (name == "mixed_fp4_fp8" and comp != "vision")
    pipe = open_pipeline("onnxruntime", report.out_dir)
    assert pipe.backend.emulate == "bf16"  # type: ignore[attr-defined]
    cosines, max_abs = [], []
    for o in obs[:CALIB_SAMPLES]:
        t = o.torch()
        ref = model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t["noise"], num_steps=STEPS).numpy()
        x = pipe.sample_actions(o, steps=STEPS).actions
        cosines.append(_cos(ref, x))
        max_abs.append(float(np.abs(ref - x).max()))
    assert min(cosines) >= MIN_ACTION_COSINE[name], f"{name}: ORT action cosine {cosines}, max abs {max_abs}"


def test_graphs_are_typed_bf16_with_the_export_islands(quantized, tiny_export):
    """Q/DQ high-precision side bf16, every MatMul/Gemm bf16 x bf16 except the typed export's fp32 islands,
    the NVFP4 quantizer fed bf16; FP8 graphs have exactly the fp32 ops of `onnx --precision bf16`."""
    import onnx

    from pi05_export.lint import lint_graphs

    name, report = quantized
    assert report.manifest.precision == "bf16" and report.manifest.recipe["base"] == "bf16"
    reports, typed_export = lint_graphs(report.out_dir), lint_graphs(tiny_export("bf16"))
    for comp, r in reports.items():
        assert not r["problems"], (comp, r["problems"])
        assert r["matmul_input_dtypes"] == typed_export[comp]["matmul_input_dtypes"], comp
        assert all(m["island"] for m in r["fp32_matmuls"]), comp
        if name == "fp8":  # NVFP4 adds fp32 dequantized scales/blocks, cast to bf16 before the MatMul (ModelOpt's layout)
            assert r["op_output_dtypes"]["float32"] == typed_export[comp]["op_output_dtypes"]["float32"], comp
    assert reports["llm"]["matmul_input_dtypes"] == {"bfloat16xbfloat16": 11}  # 2 layers x 7 minus the last o_proj/MLP + 2 attention
    assert {m["module"] for m in reports["denoise"]["fp32_matmuls"]} >= {"action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"}
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(report.out_dir / "onnx" / "llm.onnx"), load_external_data=False)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    quantizers = [n for n in graph.node if n.op_type in ("QuantizeLinear", "TRT_FP4DynamicQuantize")]
    assert quantizers and {types[n.input[0]] for n in quantizers} == {onnx.TensorProto.BFLOAT16}
    assert ("TRT_FP4DynamicQuantize" in {n.op_type for n in quantizers}) == (name == "mixed_fp4_fp8")


def test_coverage_check_catches_modelopt_default_exclusions(calib):
    """Editing a ModelOpt preset (default exclusions last) silently skips SigLIP: quantize must refuse."""
    from pi05_export.quantize import measure_coverage

    obs, _ = calib
    model = random_model("tiny", 0)
    resolved = resolve_recipe(load_recipe("fp8"), model)
    insert_quantizers(model, resolved, calibration_loop(obs[:1], 1), defaults_last=True)
    with pytest.raises(RecipeError, match=r"vision_tower"):
        measure_coverage(model, resolved)


# -- NVFP4 emulation ---------------------------------------------------------------------------
def test_nvfp4_weight_packing_bit_exact_with_modelopt_qtensor():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    q, scale, scale2 = NVFP4QTensor.quantize(w, nvfp4.BLOCK)
    packed, s8, gs = nvfp4.quantize_weight(w, w.abs().amax())
    assert torch.equal(packed, q._quantized_data)
    assert torch.equal(s8.view(torch.uint8), scale.view(torch.uint8))
    torch.testing.assert_close(gs.reshape(()), scale2.reshape(()).float(), rtol=0, atol=0)
    assert torch.equal(nvfp4.dequantize_weight(packed, s8, gs), nvfp4.nvfp4_fake_quant(w, w.abs().amax()))


def test_e2m1_rounding_is_nearest_ties_to_even():
    m = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 1.9, 7.0])
    assert nvfp4.round_e2m1(m).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 2.0, 6.0]


def test_calibration_build_from_recorded_observations(tmp_path, capsys):
    from pi05_export.cli import run
    from pi05_export.config import Pi05Config
    from pi05_export.observation import random_observation, save_npz

    cfg = Pi05Config.from_name("tiny")
    save_npz(tmp_path / "obs.npz", random_observation(cfg, batch=3, seed=1).arrays())
    assert run(["calibration-build", str(tmp_path / "obs.npz"), "--preset", "tiny", "--out", str(tmp_path / "cal")]) == 0
    obs, info = load_calibration_set(tmp_path / "cal", cfg)
    assert len(obs) == 3 and info["kind"] == "recorded" and obs[2].batch == 1
    import dataclasses
    import json

    other = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=28))
    (tmp_path / "cfg.json").write_text(json.dumps(other.to_dict()))
    capsys.readouterr()
    assert run(["quantize", "--config", str(tmp_path / "cfg.json"), "--random-init", "--recipe", "fp8", "--out", str(tmp_path / "o"),
                "--calibration", str(tmp_path / "cal"), "--components", "projections"]) != 0
    err = capsys.readouterr().err.strip()
    assert "does not fit the model: image_size: set 56, model 28" in err and len(err.splitlines()) == 1


def test_quantized_set_records_and_checks_every_file(quantized):
    """The per-file records cover the emulation copy, and the runtime opens the recorded copy once every byte matches."""
    from pi05_export.runtime import open_pipeline

    _, report = quantized
    for entry in report.manifest.components.values():
        emulated = entry.get("runnable_path")
        assert {entry["path"], *([emulated, emulated + ".data"] if emulated else [])} <= set(entry["files"])
    open_pipeline("onnxruntime", report.out_dir, full_hash=True).close()
