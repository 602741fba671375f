"""Issue 14, kind 6: every failure a user can fix is one line ``error: ... (hint: ...)``, exit 2.

Garbage or truncated graphs and external data, malformed manifests and calibration sets, unwritable
or missing output paths, a full disk, out-of-range options and every Typer usage error. Each case
builds its input here, runs the real command, and checks the exit code, exactly one stderr line, and
(by snapshot of the parent directory) that nothing outside ``--out`` was touched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pi05_export.cli import run
from pi05_export.config import Pi05Config
from pi05_export.observation import random_observation, save_npz
from tests.cli_checks import assert_refused

SOURCE = {"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}


def _refused(capsys, root: Path, argv: list[str], fragment: str) -> str:
    err = assert_refused(capsys, root, ["-q", *argv], fragment)
    assert "(hint: " in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A projections-only tiny export (seconds): a graph with external data and a manifest."""
    from pi05_export.checkpoint import random_model
    from pi05_export.export import export_onnx

    out = tmp_path_factory.mktemp("pristine") / "out"
    export_onnx(random_model("tiny", seed=0), out, source=SOURCE, components="projections")
    return out


@pytest.fixture
def export(tmp_path, pristine) -> Path:
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    return out


# name -> (damage to onnx/projections.onnx(.data), fragment)
GRAPHS = {
    "garbage_onnx": (lambda g, d: g.write_bytes(os.urandom(4096)), "is not a readable ONNX graph"),
    "truncated_onnx": (lambda g, d: g.write_bytes(g.read_bytes()[: g.stat().st_size // 2]), "is not a readable ONNX graph"),
    "empty_onnx": (lambda g, d: g.write_bytes(b""), "is not an ONNX graph (no nodes or no opset)"),
    "text_onnx": (lambda g, d: g.write_text("not a graph\n"), "projections.onnx is not"),
    "missing_data": (lambda g, d: d.unlink(), "keeps its weights in"),
    "truncated_data": (lambda g, d: d.write_bytes(d.read_bytes()[:100]), "is truncated: 100 bytes"),
    "data_is_a_directory": (lambda g, d: (d.unlink(), d.mkdir()), "which is missing"),
}


@pytest.mark.parametrize("case", sorted(GRAPHS))
@pytest.mark.parametrize("command", ["inspect_graph", "inspect", "validate"])
def test_damaged_graph_is_one_line(export, capsys, case, command):
    """`inspect FILE.onnx` reads the graph with no manifest in between; through an export directory the
    manifest's own checks may see the damage first, so there the line must name the damaged file."""
    damage, fragment = GRAPHS[case]
    graph = export / "onnx" / "projections.onnx"
    damage(graph, graph.with_name("projections.onnx.data"))
    argv = ["inspect", str(graph)] if command == "inspect_graph" else [command, str(export)]
    _refused(capsys, export.parent, argv, fragment if command == "inspect_graph" else "projections.onnx")


def test_onnxruntime_session_failure_is_one_line(export):
    """A graph that parses but ONNX Runtime cannot load (an unknown op) is one ArtifactError too."""
    import onnx

    from pi05_export.components import Component, component_specs
    from pi05_export.errors import ArtifactError
    from pi05_export.runtime.backends import OnnxRuntimeBackend

    graph = export / "onnx" / "projections.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    model.graph.node[0].op_type = "NoSuchOp"
    graph.write_bytes(model.SerializeToString())
    backend = OnnxRuntimeBackend({Component.projections: graph}, component_specs(Pi05Config.from_name("tiny"), "float32"))
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load .*projections.onnx"):
        backend._session(Component.projections)


# name -> (change to manifest.json's dict, fragment)
MANIFESTS = {
    "components_list": (lambda m: m.update(components=["projections"]), "field 'components' is list"),
    "component_entry_string": (lambda m: m["components"].update(projections="onnx/projections.onnx"),
                               "component 'projections' is not a mapping"),
    "opset_string": (lambda m: m.update(opset="19"), "field 'opset' is str '19', expected int or null"),
    "config_list": (lambda m: m.update(config=[1, 2]), "field 'config' is list"),
    "stage_number": (lambda m: m.update(stage=3), "field 'stage' is int"),
    "schema_bool": (lambda m: m.update(schema_version=True), "field 'schema_version' is bool"),
    "unknown_field": (lambda m: m.update(colour="red"), "has unknown field(s) colour"),
    "missing_field": (lambda m: m.pop("source"), "lacks the manifest field(s) source"),
    "not_an_object": (lambda m: (m.clear(), m.update({"0": 1})), "lacks the manifest field(s) config, source, stage"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_malformed_manifest_field_is_one_line(export, capsys, case, command):
    change, fragment = MANIFESTS[case]
    data = json.loads((export / "manifest.json").read_text())
    change(data)
    (export / "manifest.json").write_text(json.dumps(data))
    _refused(capsys, export.parent, [command, str(export)], fragment)


@pytest.mark.parametrize("text", ["not json {", "[1, 2, 3]", ""])
def test_malformed_calibration_json_is_one_line(tmp_path, capsys, text):
    pytest.importorskip("modelopt")
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "calibration.json").write_text(text)
    save_npz(calib / "calib_0000.npz", random_observation(Pi05Config.from_name("tiny"), batch=1).arrays())
    _refused(capsys, tmp_path, ["quantize", "--preset", "tiny", "--random-init", "--recipe", "fp8", "--calibration",
                                str(calib), "--out", str(tmp_path / "out")], "calibration.json")


@pytest.fixture
def obs(tmp_path) -> Path:
    save_npz(tmp_path / "obs.npz", random_observation(Pi05Config.from_name("tiny"), batch=1, seed=0).arrays())
    return tmp_path / "obs.npz"


# name -> (--out relative to tmp_path, set-up, fragment)
OUTS = {
    "missing_directory": ("no/such/dir/a.npz", lambda t: None, "No such file or directory (hint: create the directory"),
    "directory_for_a_file": ("adir", lambda t: (t / "adir").mkdir(), "Is a directory (hint: name a file, not a directory)"),
    "parent_is_a_file": ("afile/a.npz", lambda t: (t / "afile").write_text("x"), "Not a directory"),
}


@pytest.mark.parametrize("case", sorted(OUTS))
def test_bad_out_path_is_one_line(tmp_path, capsys, obs, case):
    out, setup, fragment = OUTS[case]
    setup(tmp_path)
    _refused(capsys, tmp_path, ["infer", "--preset", "tiny", "--random-init", "--inputs", str(obs), "--out",
                                str(tmp_path / out), "--steps", "1"], fragment)


def test_onnx_out_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("precious")
    _refused(capsys, tmp_path, ["onnx", "--preset", "tiny", "--random-init", "--components", "projections", "--out",
                                str(tmp_path / "out")], "exists and is not a directory")
    assert (tmp_path / "out").read_text() == "precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_out_is_one_line(tmp_path, capsys, obs):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(capsys, tmp_path, ["infer", "--preset", "tiny", "--random-init", "--inputs", str(obs), "--out",
                                    str(ro / "a.npz"), "--steps", "1"], "Permission denied")
    finally:
        ro.chmod(0o755)


# A full disk, simulated with RLIMIT_FSIZE (writes past the limit fail like ENOSPC; EFBIG here), in a subprocess.
FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from pi05_export.cli import run
sys.exit(run(sys.argv[2:]))
"""


@pytest.mark.parametrize("limit,argv,fragment", [
    (1000, ["infer", "--preset", "tiny", "--random-init", "--inputs", "{obs}", "--out", "{tmp}/a.npz", "--steps", "1"],
     "cannot write {tmp}/a.npz: File too large"),
    (20_000, ["onnx", "--preset", "tiny", "--random-init", "--components", "projections", "--out", "{tmp}/new"],
     "projections.onnx"),
    (30_000, ["validate", "{tmp}/out"], "cannot write {tmp}/out/reports: File too large"),
])
def test_full_disk_is_one_line(tmp_path, obs, export, limit, argv, fragment):
    argv = [a.format(obs=obs, tmp=tmp_path) for a in argv]
    from tests.cli_checks import snapshot

    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), "-q", *argv], capture_output=True, text=True,
                          timeout=300, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment.format(tmp=tmp_path) in lines[0] and "(hint: free disk space" in lines[0]
    assert snapshot(tmp_path) == before  # the staging directory and temp files are gone


# Typer/click usage errors: argv -> fragment of click's message (one line, with the command's --help as hint)
USAGE = {
    "unknown_option": (["infer", "--bogus"], "No such option: --bogus"),
    "unknown_command": (["exprot"], "No such command 'exprot'"),
    "missing_argument": (["info"], "Missing argument"),
    "missing_option": (["infer", "--preset", "tiny"], "Missing option '--inputs'"),
    "not_an_int": (["validate", "x", "--batch", "two"], "Invalid value for '--batch'"),
    "batch_0": (["validate", "x", "--batch", "0"], "Invalid value for '--batch'"),
    "steps_0": (["infer", "--steps", "0", "--inputs", "a", "--out", "b"], "Invalid value for '--steps'"),
    "seed_negative": (["infer", "--seed", "-1", "--inputs", "a", "--out", "b"], "Invalid value for '--seed'"),
    "seed_2_32": (["onnx", "--seed", str(2**32), "--out", "b"], "less than or equal to 4294967295"),
    "seed_2_70": (["serve", "x", "--seed", str(2**70)], "Invalid value for '--seed'"),
    "port_range": (["serve", "x", "--port", "70000"], "Invalid value for '--port'"),
    "bad_enum": (["bench", "--backend", "tpu"], "Invalid value for '--backend'"),
    "bad_steps_list": (["validate", "x", "--steps", "ten"], "is not a comma list of integers"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_error_is_one_line(tmp_path, capsys, case):
    argv, fragment = USAGE[case]
    err = _refused(capsys, tmp_path, argv, fragment)
    command = argv[0] if case != "unknown_command" else None
    assert err.rstrip().endswith(f"(hint: see `pi05-export{' ' + command if command else ''} --help`)"), err


@pytest.mark.parametrize("argv", [["--help"], ["infer", "--help"], ["validate", "--help"]])
def test_help_still_exits_0(capsys, argv):
    assert run(argv) == 0
    assert "Usage" in capsys.readouterr().out


# name -> (writes tmp_path/"in.npz", fragment)
INPUT_FILES = {
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "not_a_zip": (lambda p: p.write_text("images,tokens\n"), "is not a readable .npz file (File is not a zip file)"),
    "npy_not_npz": (lambda p: p.write_bytes(_npy_bytes()), "is not a readable .npz file"),
    "truncated_zip": (lambda p: p.write_bytes(_npz_bytes()[:300]), "is not a readable .npz file"),
    "pickled_objects": (lambda p: p.write_bytes(_npz_bytes(np.array([{"a": 1}], dtype=object))), "holds Python objects"),
}


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, np.float32))
    return buf.getvalue()


def _npz_bytes(images=None) -> bytes:
    arrays = random_observation(Pi05Config.from_name("tiny"), batch=1).arrays()
    if images is not None:
        arrays["images"] = images
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(INPUT_FILES))
def test_unreadable_inputs_file_is_one_line(tmp_path, capsys, case):
    write, fragment = INPUT_FILES[case]
    write(tmp_path / "in.npz")
    _refused(capsys, tmp_path, ["infer", "--preset", "tiny", "--random-init", "--inputs", str(tmp_path / "in.npz"),
                                "--out", str(tmp_path / "a.npz")], fragment)
