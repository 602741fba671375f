"""`validate`: passes on a correct export, catches a corrupted one, reports, and exit codes."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pi05_export.artifacts import Manifest, graph_files
from pi05_export.cli import run
from pi05_export.config import Pi05Config
from pi05_export.observation import random_observation, save_npz
from pi05_export.tolerances import TABLE, Gate
from pi05_export.validate import validate_artifacts
from tests.tolerances import ONNX_FP32_ATOL


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_validate_passes_on_correct_export(tiny_model, tiny_export, tmp_path, precision):
    out = tmp_path / "out"
    shutil.copytree(tiny_export(precision), out)
    report = validate_artifacts(out, model=tiny_model, steps=(10, 3))
    assert report.status == "PASS", [(c.name, c.status, c.metrics) for c in report.checks]
    names = [c.name for c in report.checks]
    assert "denoise/v_t" in names and "llm/kv_cache" in names and "actions@10" in names and "actions@3" in names
    assert len(report.drift["10"]) == 10 and len(report.drift["3"]) == 3
    data = json.loads((out / "reports" / "validation.json").read_text())
    assert data["status"] == "PASS" and data["environment"]["tools"]["onnxruntime"]
    md = (out / "reports" / "validation.md").read_text()
    assert md.startswith("# Validation: PASS") and "| actions@10 | PASS |" in md
    png = (out / "reports" / "drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1100, 418)
    assert (out / "reports" / "inputs_denoise.json").is_file()  # recorded inputs saved with the report
    table = data["steps_table"]  # steps vs accuracy against the 10-step actions, own and reference
    assert [r["steps"] for r in table] == [10, 3]
    assert table[0]["mse_vs_own"] == 0.0 and table[1]["mse_vs_own"] > 0.0
    assert set(table[1]) == {"steps", "mse_vs_own", "max_abs_vs_own", "mse_vs_reference", "max_abs_vs_reference"}
    assert "Steps vs accuracy" in md


def _perturb_one_weight(path, scale=1.05):
    """Scale the largest initializer of a graph (external data rewritten in place)."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init) * scale
    init.CopyFrom(numpy_helper.from_array(arr.astype(arr.dtype), init.name))
    data = path.with_name(path.name + ".data")
    data.unlink()
    onnx.save(model, str(path), save_as_external_data=True, location=data.name)


def test_corrupted_artifact_fails_with_exit_1(tiny_export, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_export("fp32"), out)
    _perturb_one_weight(out / "onnx" / "denoise.onnx")
    manifest = Manifest.read(out)  # a faithful record of wrong weights (an exporter bug), not a file changed afterwards
    manifest.components["denoise"]["files"] = graph_files(out / "onnx" / "denoise.onnx", "onnx")
    manifest.write(out)
    assert run(["validate", str(out), "--steps", "3"]) == 1
    captured = capsys.readouterr()
    assert "FAIL denoise/v_t" in captured.err and "FAIL actions@3" in captured.err  # split path still passes
    assert "PASS expert/suffix_hidden" in captured.err
    assert json.loads((out / "reports" / "validation.json").read_text())["status"] == "FAIL"


def test_missing_artifacts_name_the_command(tmp_path, capsys):
    assert run(["validate", str(tmp_path)]) == 2
    assert "run `pi05-export onnx` first" in capsys.readouterr().err


def test_tensorrt_backend_without_tensorrt(tiny_export, capsys):
    assert run(["validate", str(tiny_export("fp32")), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TensorRT") and "pip install tensorrt" in err and len(err.splitlines()) == 1


def test_infer_backends_agree(tiny_export, tmp_path):
    obs = random_observation(Pi05Config.from_name("tiny"), 2, seed=11)
    save_npz(tmp_path / "obs.npz", obs.arrays())
    assert run(["infer", "--preset", "tiny", "--random-init", "--inputs", str(tmp_path / "obs.npz"), "--out", str(tmp_path / "t.npz")]) == 0
    assert run(["infer", "--backend", "onnxruntime", "--artifacts", str(tiny_export("fp32")), "--inputs", str(tmp_path / "obs.npz"),
                "--out", str(tmp_path / "o.npz")]) == 0
    a, b = np.load(tmp_path / "t.npz")["actions"], np.load(tmp_path / "o.npz")["actions"]
    assert a.shape == (2, 10, 32) and np.abs(a - b).max() <= ONNX_FP32_ATOL


def test_threshold_table_judges():
    gate = Gate("cosine", 0.999, 0.99)
    assert [gate.judge(v) for v in (0.9995, 0.995, 0.9, float("nan"))] == ["PASS", "WARN", "FAIL", "FAIL"]
    assert TABLE["fp32"].actions.judge(5e-5) == "PASS" and TABLE["fp32"].actions.judge(5e-3) == "FAIL"
    assert TABLE["mixed_fp4_fp8"].actions.passing == 0.995 and TABLE["fp8"].actions.passing == 0.999


def test_engines_built_from_other_graphs_are_refused(tiny_export, tmp_path):
    """The TensorRT runtime checks the engines' source-manifest hash before touching TensorRT."""
    from pi05_export.artifacts import Manifest
    from pi05_export.errors import ArtifactError
    from pi05_export.runtime import open_pipeline

    out = tmp_path / "out"
    shutil.copytree(tiny_export("fp16"), out)
    src = Manifest.read(out)
    engines = out / "engines" / "fp16"
    engines.mkdir(parents=True)
    Manifest(stage="build", config=src.config, source=src.source, precision="fp16",
             inputs={"manifest": "manifest.json", "sha256": "0" * 64}).write(engines)
    with pytest.raises(ArtifactError, match="built from other graphs.*hint: rebuild them: pi05-export build .* --fp16"):
        open_pipeline("tensorrt", out)
    with pytest.raises(ArtifactError, match="no manifest.json in .*engines/bf16.*pi05-export build"):
        open_pipeline("tensorrt", out, engines="bf16")


def test_reference_must_be_the_exported_checkpoint(tmp_path, capsys):
    from pi05_export.checkpoint import random_model, save_checkpoint

    save_checkpoint(random_model("tiny", seed=0), tmp_path / "ck0", "openpi")
    save_checkpoint(random_model("tiny", seed=1), tmp_path / "ck1", "openpi")
    out = tmp_path / "out"
    assert run(["onnx", str(tmp_path / "ck0"), "--out", str(out), "--components", "projections"]) == 0
    assert run(["validate", str(out), "--checkpoint", str(tmp_path / "ck1"), "--steps", "1"]) == 2
    assert "is not the checkpoint these artifacts were exported from (sha256 differs)" in capsys.readouterr().err


def test_partial_export_validates_components_and_skips_end_to_end(tiny_model, tmp_path):
    from pi05_export.checkpoint import random_model
    from pi05_export.export import export_onnx

    out = tmp_path / "out"
    export_onnx(random_model("tiny"), out,
                source={"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}, components="vision,projections")
    report = validate_artifacts(out, model=tiny_model, steps=(3,))
    assert report.status == "PASS" and [c.name for c in report.checks][0] == "vision/image_embeds"
    assert not any(c.name.startswith("actions") for c in report.checks) and "end to end skipped" in report.notes[0]


def test_fp16_overflow_fails_and_names_the_layer(tmp_path, capsys):
    """A checkpoint whose residual stream passes 65504 (layer-0 down_proj x 3e4, the known trained-Gemma
    problem): fp16 graphs FAIL on the CPU's true-fp16 emulation, naming the layer and the --keep-fp32 fix;
    bf16 graphs PASS, and so do fp16 graphs with that layer kept fp32 (the guard)."""
    from pi05_export.checkpoint import random_model, save_checkpoint
    from pi05_export.cli import run

    model = random_model("tiny", seed=0)
    layer = "paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.down_proj"
    dict(model.named_parameters())[f"{layer}.weight"].data *= 3e4
    save_checkpoint(model, tmp_path / "ckpt")
    verdicts = {}
    for name, precision, guard in (("fp16", "fp16", []), ("bf16", "bf16", []), ("guarded", "fp16", ["--keep-fp32", layer])):
        out = tmp_path / name
        assert run(["onnx", str(tmp_path / "ckpt"), "--precision", precision, "--out", str(out), "--components",
                    "vision,llm,denoise", *guard]) == 0
        verdicts[name] = run(["validate", str(out), "--steps", "3"])
    recipe = tmp_path / "guarded.yaml"  # the same guard as a recipe rule (typed fp16 graphs from `quantize`)
    recipe.write_text(json.dumps({"name": "fp16_guarded", "base": "fp16", "rules": [
        {"match": "*", "format": "none"}, {"match": layer, "format": "fp32", "why": "passes 65504"}]}))
    assert run(["quantize", str(tmp_path / "ckpt"), "--recipe", str(recipe), "--out", str(tmp_path / "q"),
                "--components", "vision,llm,denoise"]) == 0
    verdicts["recipe"] = run(["validate", str(tmp_path / "q" / "fp16_guarded"), "--steps", "3"])
    assert verdicts == {"fp16": 1, "bf16": 0, "guarded": 0, "recipe": 0}
    assert json.loads((tmp_path / "q" / "fp16_guarded" / "manifest.json").read_text())["extra"]["keep_fp32"] == [layer]
    report = (tmp_path / "fp16" / "reports" / "validation.md").read_text()
    assert "layers.0.mlp.down_proj" in report and "65504" in report and "Export bf16" in report
    assert f"--keep-fp32 '{layer}'" in report  # the guard, spelled out
    data = json.loads((tmp_path / "guarded" / "reports" / "validation.json").read_text())
    top = data["activations"][0]  # the activation table: where fp16 would overflow, on the fp32 reference
    assert top["max_abs"] > 65504 and top["vs_fp16"] > 1 and any(r["layer"] == layer for r in data["activations"])
    assert not any("keep-fp32" in n for n in data["notes"])  # guarded and passing: no advice
    capsys.readouterr()
    assert run(["inspect", str(tmp_path / "guarded")]) == 0  # the kept layer counts as an fp32 island
    assert "language_model.layers.0.mlp.down_proj), 0 outside" in capsys.readouterr().out.replace("\n", "")
    save_npz(tmp_path / "obs.npz", random_observation(model.config, 1, seed=5).arrays())
    assert run(["inspect", str(tmp_path / "bf16"), "--inputs", str(tmp_path / "obs.npz"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["activations"]  # the same table, from inspect
    assert min(r["order"] for r in rows if r["max_abs"] > 65504) == next(r["order"] for r in rows if r["layer"] == layer)


def test_overflow_advice_keeps_the_block_that_makes_a_value_only_read_past_fp16(fresh_tiny_model):
    """gate * up overflows inside the MLP before down_proj reads it: keeping down_proj fp32 would not help,
    so the advice names the MLP block (a layer whose own output overflows is named itself, see above)."""
    import torch

    from pi05_export.observation import random_observation
    from pi05_export.validate import fp16_overflow_advice, measure_activations

    mlp = "paligemma_with_expert.paligemma.model.language_model.layers.0.mlp"
    modules = dict(fresh_tiny_model.named_modules())
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            modules[f"{mlp}.{name}"].weight.mul_(300.0)
    rows = measure_activations(fresh_tiny_model, random_observation(fresh_tiny_model.config, batch=1, seed=0))
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer[f"{mlp}.down_proj"]["reads_past_fp16"]  # the product it reads was made in fp16 before it
    advice = fp16_overflow_advice(rows)
    assert advice is not None and f"--keep-fp32 '{mlp}'" in advice, advice
