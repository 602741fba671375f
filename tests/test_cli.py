"""CLI: help, info, infer, option plumbing (stage functions patched at the CLI import site), errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from pi05_export.checkpoint import save_checkpoint
from pi05_export.cli import run
from pi05_export.cli._app import app
from pi05_export.observation import random_observation, save_npz


def test_help_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "pi05_export", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("onnx", "validate", "infer", "info", "inspect"):
        assert cmd in proc.stdout
    probe = "import sys, pi05_export.cli; print(sorted(m for m in ('tensorrt', 'modelopt', 'jax') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.strip()
    assert imported == "[]", f"importing the CLI imported {imported}"  # heavy/optional deps stay lazy


def test_info_reports_layout_dims_and_counts(tiny_model, tmp_path, capsys):
    save_checkpoint(tiny_model, tmp_path / "ck", "lerobot")
    assert run(["info", str(tmp_path / "ck"), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["layout"] == "lerobot" and data["config"]["llm"]["width"] == 64
    assert data["parameters"]["expert"] == sum(
        p.numel() for n, p in tiny_model.named_parameters() if ".gemma_expert." in n
    )
    assert run(["info", str(tmp_path / "ck")]) == 0
    text = capsys.readouterr().out
    assert "lerobot" in text and "total used" in text


def test_infer_writes_actions(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    obs = random_observation(tiny_model.config, batch=1, seed=2)
    save_npz(tmp_path / "obs.npz", obs.arrays())
    assert run(["infer", str(tmp_path / "ck"), "--inputs", str(tmp_path / "obs.npz"), "--out", str(tmp_path / "a.npz"), "--steps", "3"]) == 0
    t = obs.torch()
    ref = tiny_model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t["noise"], num_steps=3)
    assert np.array_equal(np.load(tmp_path / "a.npz")["actions"], ref.numpy())


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda a: a.pop("tokens"), "lacks array(s): tokens"),
        (lambda a: a.update(images=a["images"][:, :2]), "'images' has shape [1, 2, 3, 56, 56], expected [1, 3, 3, 56, 56]"),
        (lambda a: a.update(image_mask=a["image_mask"].astype(np.int8)), "'image_mask' has dtype int8, expected bool"),
        (lambda a: a.update(images=a["images"] * 300), "images must be finite and in [-1, 1]"),
        (lambda a: a.update(tokens=a["tokens"] + 5000), "token ids must be in [0, 1024)"),
    ],
)
def test_infer_bad_inputs_one_line_error(tmp_path, capsys, mutate, fragment):
    from pi05_export.config import Pi05Config

    arrays = random_observation(Pi05Config.from_name("tiny"), batch=1, seed=0).arrays()
    mutate(arrays)
    save_npz(tmp_path / "obs.npz", arrays)
    code = run(["infer", "--preset", "tiny", "--random-init", "--inputs", str(tmp_path / "obs.npz"), "--out", str(tmp_path / "a.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["info", "/nonexistent/ck"], "does not exist"),
        (["onnx", "--preset", "huge", "--random-init", "--out", "x"], "unknown preset 'huge' (hint: valid presets: pi05, tiny)"),
        (["onnx", "--preset", "tiny", "--out", "x"], "needs --random-init"),
        (["infer", "--backend", "onnxruntime", "--inputs", "x.npz", "--out", "y.npz"], "--artifacts OUT"),
    ],
)
def test_user_errors_exit_2(argv, fragment, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.startswith("error: ")


def test_debug_env_shows_traceback(monkeypatch, capsys):
    monkeypatch.setenv("PI05_DEBUG", "1")
    assert run(["info", "/nonexistent/ck"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_onnx_command_passes_options(monkeypatch, tmp_path):
    """Patch the stage function where the CLI imports it and check the kwargs."""
    import pi05_export.export as export_mod
    from pi05_export.artifacts import Manifest

    seen = {}

    def fake_export(model, out, **kwargs):
        seen.update(kwargs, out=out, model=model)
        return Manifest(stage="onnx", config={}, source={})

    monkeypatch.setattr(export_mod, "export_onnx", fake_export)
    result = CliRunner().invoke(app, ["onnx", "--preset", "tiny", "--random-init", "--seed", "3", "--out", str(tmp_path / "o"),
                                      "--components", "llm,denoise", "--precision", "bf16", "--opset", "21"])
    assert result.exit_code == 0, result.output
    assert seen["components"] == ["llm", "denoise"] and seen["precision"] == "bf16" and seen["opset"] == 21
    assert seen["source"] == {"kind": "random", "preset": "tiny", "config_file": None, "seed": 3}


def test_corrupt_checkpoint_and_bad_config_via_cli(tiny_model, tmp_path, capsys):
    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    bad_cfg = tmp_path / "cfg.yaml"
    bad_cfg.write_text("vision: {width: 30, num_heads: 4}\n")
    assert run(["info", str(tmp_path / "ck"), "--config", str(bad_cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "vision.width 30 is not divisible by vision.num_heads 4" in err and len(err.splitlines()) == 1
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run(["info", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable safetensors file" in err and "truncated or corrupt" in err and len(err.splitlines()) == 1
