"""ONNX export: every component on ONNX Runtime vs PyTorch, typed graphs, manifest, atomicity, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pi05_export.artifacts import Manifest
from pi05_export.cli import run
from pi05_export.components import Component, component_specs, example_inputs
from pi05_export.lint import lint_graphs
from pi05_export.metrics import compare, describe
from pi05_export.observation import random_observation
from pi05_export.runtime import open_pipeline, pipeline_for_model
from pi05_export.runtime.backends import OnnxRuntimeBackend, TorchBackend
from tests.tolerances import ONNX_FP32_ATOL, TYPED_MIN_COSINE

PRECISIONS = ["fp32", "fp16", "bf16"]


def _feeds(cfg, spec, batch, seed):
    return {k: v.float().numpy() if v.dtype.is_floating_point else v.numpy() for k, v in example_inputs(spec, cfg, batch=batch, seed=seed).items()}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("component", list(Component), ids=lambda c: c.value)
def test_component_matches_pytorch(tiny_model, tiny_export, component, precision):
    """Batch 3 (export used 2): the dynamic batch dim works; numerics vs the fp32 reference."""
    out = tiny_export(precision)
    manifest = Manifest.read(out)
    graphs = {Component(n): out / e["path"] for n, e in manifest.components.items()}
    from pi05_export.runtime import specs_from_manifest

    specs = specs_from_manifest(manifest)
    ort_backend = OnnxRuntimeBackend(graphs, specs, emulate="bf16" if precision == "bf16" else None)
    ref_backend = TorchBackend(tiny_model, component_specs(tiny_model.config))
    feed = _feeds(tiny_model.config, specs[component], batch=3, seed=7)
    got, ref = ort_backend.run(component, feed), ref_backend.run(component, feed)
    for spec in specs[component].outputs:
        m = compare(got[spec.name], ref[spec.name])
        assert got[spec.name].shape[spec.shape.index("batch") if "batch" in spec.shape else 0] in (3, 9)
        if spec.dtype == "bool":
            assert np.array_equal(got[spec.name], ref[spec.name]), spec.name
        elif precision == "fp32":
            assert m["max_abs"] <= ONNX_FP32_ATOL, f"{component.value}/{spec.name}: {describe(m)}"
        else:
            assert m["cosine"] >= TYPED_MIN_COSINE[precision], f"{component.value}/{spec.name}: {describe(m)}"


def test_denoise_loop_reproduces_sample_actions(tiny_model, tiny_export):
    obs = random_observation(tiny_model.config, batch=2, seed=3)
    t = obs.torch()
    ref = tiny_model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t["noise"], num_steps=10)
    got = open_pipeline("onnxruntime", tiny_export("fp32")).sample_actions(obs, steps=10).actions
    m = compare(got, ref)
    assert m["max_abs"] <= ONNX_FP32_ATOL, describe(m)
    # and the numpy runtime on the torch backend is the model itself
    assert compare(pipeline_for_model(tiny_model).sample_actions(obs, steps=10).actions, ref)["max_abs"] <= 1e-6


def test_manifest_records_the_contract(tiny_export):
    out = tiny_export("fp16")
    manifest = Manifest.read(out, stage="onnx")
    assert set(manifest.components) == {c.value for c in Component}
    assert manifest.precision == "fp16" and manifest.opset == 19
    assert manifest.source == {"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}
    assert manifest.tools["torch"] and manifest.tools["onnx"]
    llm = manifest.components["llm"]
    assert [i["name"] for i in llm["inputs"]] == ["image_embeds", "image_mask", "tokens", "token_mask"]
    assert llm["outputs"][0] == {"name": "kv_cache", "dtype": "float16", "shape": [2, 2, "batch", 1, 64, 16]}
    assert manifest.components["vision"]["dynamic_dims"] == ["num_images"]
    for entry in manifest.components.values():
        assert (out / entry["path"]).is_file() and (out / entry["external_data"]).is_file()
        assert len(entry["sha256"]) == 64


@pytest.mark.parametrize("precision", PRECISIONS)
def test_typed_graphs_keep_fp32_islands(tiny_export, precision):
    reports = lint_graphs(tiny_export(precision))
    low = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    for name, r in reports.items():
        assert not r["problems"], (name, r["problems"])  # no inf/NaN constants, no TRT>10.13-only ops
        assert "Attention" not in r["ops"] and "RMSNormalization" not in r["ops"]
        assert r["io"]["outputs"].get("v_t", "float32") == "float32"  # Euler-facing outputs stay fp32
        assert r["typed"] == (precision != "fp32") and all(m["island"] for m in r["fp32_matmuls"] if r["typed"])
    big = reports["denoise"]["matmul_input_dtypes"]
    assert big.get(f"{low}x{low}", 0) >= 2 * 2 * 4, big  # q/k/v/o + mlp per expert layer in low precision
    assert reports["projections"]["matmul_input_dtypes"] == {"float32xfloat32": 4}  # action/time projections fp32
    if precision != "fp32":
        casts = reports["llm"]["casts"]
        assert casts.get(f"{low}->float32", 0) >= 1 and casts.get(f"float32->{low}", 0) >= 1  # norm/softmax islands


def test_cli_export_and_errors(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["onnx", "--preset", "tiny", "--random-init", "--out", str(out), "--components", "projections"]) == 0
    good = (out / "manifest.json").read_text()
    assert run(["onnx", "--preset", "tiny", "--random-init", "--out", str(out), "--components", "projections,nope"]) == 2
    assert "unknown component 'nope'" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == good  # the good export is untouched
    bad_cfg = tmp_path / "cfg.json"
    bad_cfg.write_text(json.dumps({"llm": "gemma_2b", "expert": {"width": 48, "depth": 2, "mlp_dim": 96}}))
    assert run(["onnx", "--config", str(bad_cfg), "--random-init", "--out", str(out)]) == 2
    assert "llm.depth 18 != expert.depth 2" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(["onnx", "--preset", "tiny", "--random-init", "--out", str(blocker / "sub"), "--components", "projections"]) == 2
    assert "cannot create output directory" in capsys.readouterr().err


def test_keep_fp32_glob_must_match_a_layer(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["onnx", "--preset", "tiny", "--random-init", "--precision", "fp16", "--out", str(out), "--components",
                "projections", "--keep-fp32", "*.layers.9.mlp"]) == 2
    err = capsys.readouterr().err
    assert "--keep-fp32 '*.layers.9.mlp' matches no module" in err and "named_modules" in err and not out.exists()


def test_inspect_flags_fp32_matmuls_outside_the_islands(tiny_export, tmp_path, capsys):
    """Graphs that say bf16 but compute fp32 (what TensorRT strong typing would run slowly): exit 1, layer named."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_export("fp32"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["precision"] = "bf16"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run(["inspect", str(out)]) == 1
    text = capsys.readouterr().out.replace("\n", "")
    assert "language_model.layers.0.self_attn.q_proj) runs in float32 in a typed graph, outside the fp32 islands" in text
    assert "action_in_proj" not in text.split("problem:")[1]  # the projections are a declared island
    assert run(["inspect", str(tiny_export("bf16"))]) == 0


def test_failed_export_leaves_nothing_and_keeps_old(tmp_path, monkeypatch, tiny_export):
    import shutil

    import pi05_export.export as export_mod
    from pi05_export.checkpoint import random_model

    out = tmp_path / "out"
    shutil.copytree(tiny_export("fp32"), out)
    before = sorted(p.name for p in (out / "onnx").iterdir())
    real = export_mod.export_component

    def flaky(model, component, path, **kw):
        if component is Component.expert:
            raise RuntimeError("simulated crash mid-export")
        return real(model, component, path, **kw)

    monkeypatch.setattr(export_mod, "export_component", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        export_mod.export_onnx(random_model("tiny"), out, source={"kind": "random"}, components="vision,expert")
    assert sorted(p.name for p in (out / "onnx").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


def test_refuses_to_replace_a_foreign_directory(tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert run(["onnx", "--preset", "tiny", "--random-init", "--out", str(precious), "--components", "projections"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_reexport_keeps_downstream_artifacts(tmp_path, tiny_export, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_export("fp32"), out)
    (out / "engines" / "fp16").mkdir(parents=True)
    (out / "engines" / "fp16" / "manifest.json").write_text("{}")
    assert run(["onnx", "--preset", "tiny", "--random-init", "--out", str(out), "--components", "projections"]) == 0
    assert (out / "engines" / "fp16" / "manifest.json").is_file()
    assert Manifest.read(out).components.keys() == {"projections"}
    assert "keeping engines" in capsys.readouterr().err


def test_graph_hash_covers_external_weights(tmp_path):
    from pi05_export.checkpoint import random_model
    from pi05_export.export import export_onnx

    hashes = []
    for seed in (0, 1):
        m = export_onnx(random_model("tiny", seed=seed), tmp_path / f"s{seed}", source={"kind": "random"}, components="projections")
        hashes.append(m.components["projections"]["sha256"])
    assert hashes[0] != hashes[1]


def test_refuses_a_directory_with_someone_elses_manifest(tmp_path, capsys):
    d = tmp_path / "app"
    d.mkdir()
    (d / "manifest.json").write_text('{"name": "app"}')
    (d / "precious.bin").write_bytes(b"x")
    assert run(["onnx", "--preset", "tiny", "--random-init", "--out", str(d), "--components", "projections"]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (d / "manifest.json").read_text() == '{"name": "app"}' and (d / "precious.bin").exists()


def test_bf16_emulation_rounds_bf16_inputs_like_an_engine(tiny_model, tiny_export):
    """A bf16 engine input rounds its fp32 feed to bf16; the ONNX Runtime emulation copy must too."""
    import torch

    from pi05_export.runtime import specs_from_manifest

    out = tiny_export("bf16")
    manifest = Manifest.read(out)
    specs = specs_from_manifest(manifest)
    backend = OnnxRuntimeBackend({Component.expert: out / manifest.components["expert"]["path"]}, specs, emulate="bf16")
    feed = _feeds(tiny_model.config, specs[Component.expert], batch=2, seed=5)
    feed["kv_cache"] = feed["kv_cache"] * 1.001  # values between bf16 steps
    rounded = dict(feed, kv_cache=torch.from_numpy(feed["kv_cache"]).to(torch.bfloat16).float().numpy())
    assert not np.array_equal(rounded["kv_cache"], feed["kv_cache"])
    a, b = backend.run(Component.expert, feed), backend.run(Component.expert, rounded)
    assert np.array_equal(a["suffix_hidden"], b["suffix_hidden"])


@pytest.mark.parametrize("component", ["projections", "denoise"])
def test_time_frequencies_baked_bit_for_bit(component, tiny_export):
    """The graphs carry the model's own time-embedding frequencies (one definition, openpi's float32
    arithmetic), so the reference and the graphs cannot disagree on this constant."""
    import onnx
    from onnx import numpy_helper

    from pi05_export.config import TINY
    from pi05_export.model.common import time_frequencies

    out = tiny_export("fp32")
    model = onnx.load(str(out / "onnx" / f"{component}.onnx"))
    arrays = [numpy_helper.to_array(i) for i in model.graph.initializer]
    arrays += [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    want = time_frequencies(TINY.expert.width)
    matches = [a for a in arrays if a.size == want.size and a.dtype == np.float32 and np.array_equal(a.ravel(), want)]
    assert matches, "the exported graph does not hold the model's time frequencies bit for bit"
