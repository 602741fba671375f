"""Issue 14, kind 2: what a manifest records (sizes, fingerprints, sha256) is checked when it is read.

Every read checks each listed file's size and sampled fingerprint (milliseconds); ``validate`` and
``build`` hash every byte. Cases: a weights file swapped in from another export, a flipped byte, a
truncated file, an old manifest without per-file records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pi05_export.artifacts import SAMPLE_BLOCK, Manifest, file_record, sampled_sha256, verify_files
from pi05_export.cli import run
from pi05_export.errors import ArtifactError
from tests.snapshot import last_line, snapshot

SOURCE = {"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}


@pytest.fixture(scope="module")
def other_denoise(tmp_path_factory) -> Path:
    """The denoise graph of another export (seed 1): same shapes, same file sizes, other weights."""
    from pi05_export.checkpoint import random_model
    from pi05_export.export import export_onnx

    out = tmp_path_factory.mktemp("other") / "out"
    export_onnx(random_model("tiny", seed=1), out, source={**SOURCE, "seed": 1}, components="denoise")
    return out


@pytest.fixture
def export(tmp_path, tiny_export) -> Path:
    out = tmp_path / "out"
    shutil.copytree(tiny_export("fp32"), out)
    return out


@pytest.fixture
def obs_file(tmp_path) -> Path:
    from pi05_export.config import Pi05Config
    from pi05_export.observation import random_observation, save_npz

    obs = random_observation(Pi05Config.from_name("tiny"), batch=1, seed=0)
    path = tmp_path / "obs.npz"
    save_npz(path, {"images": obs.images, "image_mask": obs.image_mask, "tokens": obs.tokens, "token_mask": obs.token_mask})
    return path


def _infer(out: Path, obs: Path, actions: Path) -> int:
    return run(["infer", "--backend", "onnxruntime", "--artifacts", str(out), "--inputs", str(obs), "--out", str(actions),
                "--steps", "2"])


def test_manifest_records_every_file(export):
    entry = Manifest.read(export).components["denoise"]
    assert set(entry["files"]) == {"onnx/denoise.onnx", "onnx/denoise.onnx.data"}
    for rel, record in entry["files"].items():
        assert record == file_record(export / rel)


def test_swapped_weights_from_another_export_are_refused(export, other_denoise, obs_file, tmp_path, capsys):
    data = export / "onnx" / "denoise.onnx.data"
    swapped = other_denoise / "onnx" / "denoise.onnx.data"
    assert swapped.stat().st_size == data.stat().st_size  # a size check alone would not see it
    shutil.copyfile(swapped, data)
    before = snapshot(tmp_path)
    assert _infer(export, obs_file, tmp_path / "actions.npz") == 2
    line = last_line(capsys.readouterr().err)
    assert "denoise.onnx.data does not match the fingerprint" in line and "component 'denoise'" in line, line
    assert "hint: the file changed after it was written" in line
    assert snapshot(tmp_path) == before  # no actions written
    assert run(["validate", str(export), "--steps", "1"]) == 2
    assert "denoise.onnx.data does not match the sha256" in last_line(capsys.readouterr().err)
    assert run(["infer", "--backend", "onnxruntime", "--artifacts", str(export), "--inputs", str(obs_file),
                "--out", str(tmp_path / "actions.npz"), "--verify"]) == 2  # every byte, as validate does
    assert "denoise.onnx.data does not match the sha256" in last_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before  # no report, no actions


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "missing"])
def test_damaged_graph_is_refused_by_every_reader(export, obs_file, tmp_path, capsys, damage):
    graph = export / "onnx" / "vision.onnx.data"
    raw = bytearray(graph.read_bytes())
    if damage == "truncated":
        graph.write_bytes(raw[:-4])
    elif damage == "flipped_byte":
        raw[len(raw) // 2] ^= 0xFF
        graph.write_bytes(raw)
    else:
        graph.unlink()
    want = {"truncated": "bytes, ", "flipped_byte": "does not match", "missing": "is missing"}[damage]
    before = snapshot(tmp_path)
    for argv in (["inspect", str(export)], ["validate", str(export), "--steps", "1"]):
        assert run(argv) == 2
        assert want in last_line(capsys.readouterr().err)
    assert _infer(export, obs_file, tmp_path / "actions.npz") == 2
    assert want in last_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_old_manifest_without_file_records_still_loads(export, obs_file, tmp_path, capsys):
    data = json.loads((export / "manifest.json").read_text())
    for entry in data["components"].values():
        del entry["files"]
    (export / "manifest.json").write_text(json.dumps(data))
    assert _infer(export, obs_file, tmp_path / "actions.npz") == 0
    assert np.load(tmp_path / "actions.npz")["actions"].shape[0] == 1
    graph = export / "onnx" / "llm.onnx.data"  # the recorded total size is still checked
    graph.write_bytes(graph.read_bytes()[:-8])
    assert _infer(export, obs_file, tmp_path / "actions2.npz") == 2
    assert "component 'llm'" in last_line(capsys.readouterr().err)
    assert not (tmp_path / "actions2.npz").exists()


def test_fast_check_samples_large_files_and_full_check_reads_every_byte(tmp_path):
    """Over 1 MiB the per-read check hashes 16 blocks of 64 KiB; `validate`/`build` hash every byte."""
    rng = np.random.default_rng(0)
    big = tmp_path / "w.onnx.data"
    big.write_bytes(rng.integers(0, 256, 40 * SAMPLE_BLOCK, dtype=np.uint8).tobytes())
    files = {"w.onnx.data": file_record(big)}
    raw = bytearray(big.read_bytes())
    raw[SAMPLE_BLOCK + 7] ^= 1  # inside the second block: between the sampled blocks 0 and 1 (offset 0 and ~2.5 blocks)
    big.write_bytes(raw)
    verify_files(tmp_path, files, "test manifest")  # not sampled: the fast check cannot see it
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        verify_files(tmp_path, files, "test manifest", full=True)
    raw[0] ^= 1  # a sampled byte
    big.write_bytes(raw)
    with pytest.raises(ArtifactError, match="fingerprint"):
        verify_files(tmp_path, files, "test manifest")
    assert sampled_sha256(big) != files["w.onnx.data"]["sampled_sha256"]
