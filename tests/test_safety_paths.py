"""Issue 14, kind 1: every path read from a file stays inside its directory, or the command refuses.

Each case tampers with a small export built here, runs the real command, and checks the exit code,
the one-line message, and (by snapshot) that nothing outside the output was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pi05_export.artifacts import Manifest, sha256_file
from pi05_export.cli import run
from pi05_export.errors import ArtifactError
from tests.snapshot import last_line, snapshot

SOURCE = {"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A one-component (projections) tiny export: seconds to build, enough for every command here."""
    from pi05_export.checkpoint import random_model
    from pi05_export.export import export_onnx

    out = tmp_path_factory.mktemp("pristine") / "out"
    export_onnx(random_model("tiny", seed=0), out, source=SOURCE, components="projections")
    return out


def _tamper(out: Path, **changes) -> None:
    data = json.loads((out / "manifest.json").read_text())
    data["components"]["projections"].update(changes.pop("entry", {}))
    data.update(changes)
    (out / "manifest.json").write_text(json.dumps(data))


@pytest.fixture
def tree(tmp_path, pristine):
    """tmp_path/out (a copy of the export) next to tmp_path/elsewhere (a valid graph outside it)."""
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    shutil.copytree(pristine / "onnx", tmp_path / "elsewhere")
    return out


OUTSIDE = {
    "dotdot": lambda out: "../../../../../../../../etc/passwd",
    "absolute": lambda out: str(out.parent / "elsewhere" / "projections.onnx"),
    "valid_graph_outside": lambda out: "../elsewhere/projections.onnx",
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
@pytest.mark.parametrize("command", ["validate", "inspect", "build", "infer"])
def test_component_path_outside_out_is_refused(tree, tmp_path, capsys, case, command):
    _tamper(tree, entry={"path": OUTSIDE[case](tree)}, **({"precision": "fp16"} if command == "build" else {}))
    before = snapshot(tmp_path)
    argv = {"validate": ["validate", str(tree), "--steps", "1"], "inspect": ["inspect", str(tree)],
            "build": ["build", str(tree), "--fp16", "--print-trtexec"],
            "infer": ["infer", "--backend", "onnxruntime", "--artifacts", str(tree), "--inputs", str(tmp_path / "obs.npz"),
                      "--out", str(tmp_path / "actions.npz")]}[command]
    if command == "infer":
        from pi05_export.config import Pi05Config
        from pi05_export.observation import random_observation, save_npz

        obs = random_observation(Pi05Config.from_name("tiny"), batch=1, seed=0)
        save_npz(tmp_path / "obs.npz", {"images": obs.images, "image_mask": obs.image_mask, "tokens": obs.tokens,
                                        "token_mask": obs.token_mask})
        before = snapshot(tmp_path)
    assert run(argv) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("error: ") and "component 'projections'" in line and "outside" in line, line
    assert f"the file must live in {tree}" in line
    assert snapshot(tmp_path) == before  # nothing written anywhere (no report, no .emulated.onnx, no engine plan)


def test_symlink_inside_out_leading_out_is_refused(tree, tmp_path, capsys):
    (tree / "onnx" / "link.onnx").symlink_to(tmp_path / "elsewhere" / "projections.onnx")
    _tamper(tree, entry={"path": "onnx/link.onnx"})
    before = snapshot(tmp_path)
    assert run(["validate", str(tree), "--steps", "1"]) == 2
    assert "leads outside" in last_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_quantized_set_outside_graph_gets_no_emulation_copy(tree, tmp_path, capsys):
    """A quantize-stage manifest naming a graph outside OUT: refused before any `.emulated.onnx` is written."""
    _tamper(tree, stage="quantize", recipe={"name": "q"}, extra={"formats": ["nvfp4"]},
            entry={"path": "../elsewhere/projections.onnx"})
    before = snapshot(tmp_path)
    assert run(["validate", str(tree), "--steps", "1"]) == 2
    assert "outside" in last_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before
    assert not list((tmp_path / "elsewhere").glob("*.emulated.onnx*"))


@pytest.mark.parametrize("name", ["../escaped", "/tmp/pi05-escaped", "a/b", ".hidden"])
def test_recipe_name_cannot_leave_out(tmp_path, capsys, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": name, "base": "fp32", "rules": [{"match": "*", "format": "fp32"}]}))
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    assert run(["quantize", "--preset", "tiny", "--random-init", "--recipe", str(recipe), "--out", str(out)]) == 2
    line = last_line(capsys.readouterr().err)
    assert f"name {name!r} is not a plain name" in line and "hint: set name:" in line
    assert snapshot(tmp_path) == before
    assert not Path("/tmp/pi05-escaped").exists()


def test_engine_paths_are_checked_too(tree, tmp_path):
    """The TensorRT backend opens engines named by OUT/engines/<name>/manifest.json: same check, before TensorRT."""
    from pi05_export.runtime import open_pipeline

    engines = tree / "engines" / "fp32"
    engines.mkdir(parents=True)
    (tmp_path / "stolen.engine").write_bytes(b"x")
    manifest = Manifest.read(tree)
    manifest.stage, manifest.inputs = "build", {"manifest": "manifest.json", "sha256": sha256_file(tree / "manifest.json")}
    manifest.components = {"projections": {"path": "../../../stolen.engine", "bytes": 1}}
    manifest.write(engines)
    with pytest.raises(ArtifactError, match="outside"):
        open_pipeline("tensorrt", tree, engines="fp32")
