"""``build`` up to the TensorRT boundary: plan from manifest + flags, profiles, format gate,
trtexec lines, sidecar schema, atomic engine directories, and the error when TensorRT is absent.

Nothing here runs TensorRT (tests/test_trt.py does, where it is installed). The orchestration tests
replace only ``pi05_export.trt.build_engine``/``require_tensorrt`` (the TensorRT boundary) with a
stand-in that writes placeholder bytes, so that manifest, sidecars, keeping and atomicity are
exercised for real.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pi05_export import trt
from pi05_export.artifacts import Manifest
from pi05_export.build import (
    SIDECAR_KEYS,
    BuildSettings,
    GpuInfo,
    build_engines,
    check_hardware,
    engine_sidecar,
    parse_batch,
    plan_build,
    unsupported_formats,
)
from pi05_export.checkpoint import random_model
from pi05_export.cli import run
from pi05_export.components import BATCH, NUM_IMAGES
from pi05_export.errors import ArtifactError, ConfigError, DependencyError, HardwareError
from pi05_export.export import export_onnx

SOURCE = {"kind": "random", "preset": "tiny", "seed": 0, "config_file": None}
H200 = GpuInfo("NVIDIA H200", (9, 0))
no_tensorrt = pytest.mark.skipif(trt.tensorrt_available(), reason="TensorRT is installed here: this tests its absence")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real tiny exports: fp16 (vision + denoise) and fp32 (vision)."""
    root = tmp_path_factory.mktemp("build")
    export_onnx(random_model("tiny", 0), root / "fp16", source=SOURCE, components=["vision", "denoise"], precision="fp16")
    export_onnx(random_model("tiny", 0), root / "fp32", source=SOURCE, components=["vision"], precision="fp32")
    return {"fp16": root / "fp16", "fp32": root / "fp32"}


@pytest.fixture
def out(exports: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the fp16 export (tests write engines and quantize dirs into it)."""
    dst = tmp_path / "out"
    shutil.copytree(exports["fp16"], dst)
    return dst


def add_quantized(out: Path, recipe: str, formats: list[str]) -> Path:
    """What `pi05-export quantize` writes (its contract as this stage reads it): OUT/<recipe>/ with a
    stage-"quantize" manifest, component paths relative to that dir, extra.formats."""
    src = Manifest.read(out)
    qdir = out / recipe
    (qdir / "onnx").mkdir(parents=True)
    for f in (out / "onnx").iterdir():
        shutil.copy2(f, qdir / "onnx" / f.name)
    Manifest(stage="quantize", config=src.config, source=src.source, components=src.components, precision=src.precision,
             opset=src.opset, recipe={"name": recipe}, extra={"formats": formats}).write(qdir)
    return qdir


# -- plan: graphs, profiles -------------------------------------------------------------------
def test_plan_profiles_follow_manifest_specs(out: Path) -> None:
    settings = BuildSettings(batch=(1, 2, 4))
    plan = plan_build(out, precision="fp16", settings=settings)
    manifest = Manifest.read(out)
    views = manifest.config["num_views"]
    ranges = {BATCH: (1, 2, 4), NUM_IMAGES: (views, 2 * views, 4 * views)}
    assert plan.engine_dir == out / "engines" / "fp16"
    assert [e.component for e in plan.engines] == list(manifest.components)
    for engine in plan.engines:
        assert engine.onnx == out / manifest.components[engine.component]["path"]
        for spec in manifest.components[engine.component]["inputs"]:
            shape = spec["shape"]
            if all(isinstance(d, int) for d in shape):
                assert spec["name"] not in engine.profile  # fully static inputs need no profile entry
                continue
            for which in range(3):  # static dims stay static; named dims get min/opt/max
                want = tuple(ranges[d][which] if isinstance(d, str) else d for d in shape)
                assert engine.profile[spec["name"]][which] == want, (engine.component, spec["name"], which)
    vision = next(e for e in plan.engines if e.component == "vision")
    assert vision.profile["pixel_values"][2][0] == 4 * views  # num_images = batch * views
    denoise = next(e for e in plan.engines if e.component == "denoise")
    assert [s[2] for s in denoise.profile["kv_cache"]] == [1, 2, 4]  # batch is dim 2 of the KV cache


def test_plan_selects_components_and_reports_missing(out: Path) -> None:
    plan = plan_build(out, precision="fp16", components="vision")
    assert [e.component for e in plan.engines] == ["vision"]
    with pytest.raises(ArtifactError, match="no llm graph") as e:
        plan_build(out, precision="fp16", components="vision,llm")
    assert "--components" in (e.value.hint or "")
    with pytest.raises(ConfigError, match="unknown component"):
        plan_build(out, precision="fp16", components="visoin")


def test_typed_graphs_must_match_precision(exports: dict[str, Path]) -> None:
    with pytest.raises(ArtifactError, match="holds fp32 graphs") as e:
        plan_build(exports["fp32"], precision="fp16")
    assert "pi05-export onnx <checkpoint> --precision fp16" in (e.value.hint or "")
    with pytest.raises(ArtifactError, match="holds fp16 graphs"):
        plan_build(exports["fp16"], precision="bf16")


def test_typed_graphs_from_quantize_dir(exports: dict[str, Path], tmp_path: Path) -> None:
    """fp32 export + OUT/fp16/ written by `quantize` (recipe fp16): --fp16 builds those."""
    out = tmp_path / "out"
    shutil.copytree(exports["fp32"], out)
    qdir = add_quantized(out, "fp16", ["fp16"])
    plan = plan_build(out, precision="fp16")
    assert plan.engines[0].onnx.parent == qdir / "onnx"


def test_plan_recipe_reads_quantize_manifest(out: Path) -> None:
    qdir = add_quantized(out, "mixed_fp4_fp8", ["fp8", "nvfp4"])
    plan = plan_build(out, recipe="mixed_fp4_fp8")
    assert plan.source.formats == ("fp16", "fp8", "nvfp4")  # base precision + recipe formats
    assert plan.engine_dir == out / "engines" / "mixed_fp4_fp8"
    assert all(e.onnx.parent == qdir / "onnx" for e in plan.engines)


@pytest.mark.parametrize(
    ("recipe", "error", "message"),
    [("fp8", ArtifactError, "no manifest.json"), ("../x", ConfigError, "not a plain name")],
)
def test_plan_recipe_errors(out: Path, recipe: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        plan_build(out, recipe=recipe)


def test_plan_recipe_without_formats(out: Path) -> None:
    qdir = add_quantized(out, "fp8", ["fp8"])
    m = Manifest.read(qdir)
    m.extra = {}
    m.write(qdir)
    with pytest.raises(ArtifactError, match="extra.formats"):
        plan_build(out, recipe="fp8")


def test_graph_that_disagrees_with_manifest_is_caught(out: Path) -> None:
    """A static profile on a dim the graph left dynamic fails deep inside TensorRT: catch it here."""
    m = Manifest.read(out)
    m.components["vision"]["inputs"][0]["shape"] = [6, 3, 56, 56]
    m.write(out)
    with pytest.raises(ArtifactError, match="pixel_values.*in the graph"):
        plan_build(out, precision="fp16", components="vision")


def test_settings_validation() -> None:
    assert parse_batch("1,2,8") == (1, 2, 8)
    assert parse_batch("2") == (2, 2, 2)
    for bad in ("1,2", "a,b,c", ""):
        with pytest.raises(ConfigError, match="min,opt,max"):
            parse_batch(bad)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        BuildSettings(batch=(2, 1, 4))
    with pytest.raises(ConfigError, match="opt-level"):
        BuildSettings(opt_level=6)
    with pytest.raises(ConfigError, match="workspace"):
        BuildSettings(workspace_gib=0)
    assert BuildSettings().opt_level == 4
    assert BuildSettings(workspace_gib=1.5).workspace_bytes == 3 << 29


# -- hardware gate ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("formats", "cc", "missing"),
    [
        (["fp16"], (7, 5), []),  # Turing
        (["bf16"], (7, 5), ["bf16"]),
        (["bf16"], (8, 0), []),  # Ampere A100
        (["fp16", "fp8"], (8, 6), ["fp8"]),  # Ampere RTX 30 / Orin-class
        (["fp16", "fp8"], (8, 9), []),  # Ada
        (["fp16", "fp8", "nvfp4"], (9, 0), ["nvfp4"]),  # Hopper H100/H200: no FP4
        (["bf16", "fp8", "nvfp4"], (10, 0), []),  # Blackwell B200
        (["bf16", "fp8", "nvfp4"], (11, 0), []),  # Jetson Thor
        (["fp8", "fp4"], (12, 0), []),  # RTX 50 / RTX PRO Blackwell
    ],
)
def test_unsupported_formats(formats: list[str], cc: tuple[int, int], missing: list[str]) -> None:
    assert unsupported_formats(formats, cc) == missing


def test_hardware_error_names_gpu_cc_and_recipe() -> None:
    with pytest.raises(HardwareError) as e:
        check_hardware(("fp16", "fp8", "nvfp4"), H200, what="recipe 'mixed_fp4_fp8'")
    msg = str(e.value)
    assert "NVIDIA H200" in msg and "9.0" in msg and "sm90" in msg and "mixed_fp4_fp8" in msg and "nvfp4" in msg
    assert "fp8" not in e.value.message.split("uses ")[1].split(",")[0]  # only the missing format is blamed
    assert e.value.exit_code == 2
    check_hardware(("fp16", "fp8"), H200, what="recipe 'fp8'")  # passes
    with pytest.raises(ArtifactError, match="unknown number format"):
        unsupported_formats(["int3"], (9, 0))


# -- trtexec ----------------------------------------------------------------------------------
def test_trtexec_line(out: Path) -> None:
    plan = plan_build(out, precision="fp16", settings=BuildSettings(workspace_gib=8, batch=(1, 1, 2)))
    vision = next(e for e in plan.engines if e.component == "vision")
    views = Manifest.read(out).config["num_views"]
    args = shlex.split(plan.trtexec(vision))
    assert args[0] == "trtexec"
    assert f"--onnx={out / 'onnx' / 'vision.onnx'}" in args
    assert f"--saveEngine={out / 'engines' / 'fp16' / 'vision.engine'}" in args
    assert "--stronglyTyped" in args and "--builderOptimizationLevel=4" in args
    assert f"--minShapes=pixel_values:{views}x3x56x56" in args
    assert f"--maxShapes=pixel_values:{2 * views}x3x56x56" in args
    assert f"--timingCacheFile={out / 'engines' / 'timing.cache'}" in args
    assert "--memPoolSize=workspace:8192" in args  # MiB
    assert "--stronglyTyped" in plan.trtexec(vision, tensorrt_major=10)
    assert "--stronglyTyped" not in plan.trtexec(vision, tensorrt_major=11)  # always on in 11.x
    denoise = next(e for e in plan.engines if e.component == "denoise")
    opt = next(a for a in shlex.split(plan.trtexec(denoise)) if a.startswith("--optShapes="))
    assert opt.split("=", 1)[1].split(",") == [f"{n}:{'x'.join(map(str, s[1]))}" for n, s in denoise.profile.items()]
    rel = shlex.split(plan.trtexec(vision, relative_to=out))
    assert "--onnx=onnx/vision.onnx" in rel and "--saveEngine=engines/fp16/vision.engine" in rel


def test_trtexec_quotes_paths_with_spaces(exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "my export"
    shutil.copytree(exports["fp16"], out)
    plan = plan_build(out, precision="fp16", components="vision")
    assert f"--onnx={out / 'onnx' / 'vision.onnx'}" in shlex.split(plan.trtexec(plan.engines[0]))


def test_sidecar_schema(out: Path, tmp_path: Path) -> None:
    plan = plan_build(out, precision="fp16", components="vision")
    engine_file = tmp_path / "vision.engine"
    engine_file.write_bytes(b"placeholder")
    sidecar = engine_sidecar(plan, plan.engines[0], engine_file=engine_file, gpu=H200, tensorrt_version="10.13.3.9",
                             build_seconds=1.234, layers={"Layers": []})
    assert tuple(sidecar) == SIDECAR_KEYS
    assert sidecar["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0", "sm": "sm90"}
    assert sidecar["settings"]["strongly_typed"] is True and sidecar["settings"]["builder_optimization_level"] == 4
    assert sidecar["engine_bytes"] == len(b"placeholder") and sidecar["build_seconds"] == 1.23
    assert sidecar["onnx"] == "onnx/vision.onnx" and sidecar["recipe"] is None
    assert sidecar["profile"]["pixel_values"]["opt"][1:] == [3, 56, 56]
    assert sidecar["trtexec"].startswith("trtexec --onnx=onnx/vision.onnx --saveEngine=engines/fp16/vision.engine --stronglyTyped")
    assert json.loads(json.dumps(sidecar)) == sidecar


# -- orchestration with a stand-in at the TensorRT boundary -----------------------------------
def _fake_trt(monkeypatch: pytest.MonkeyPatch, *, fail_on: str | None = None) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = []

    def build_engine(onnx_path: Path, engine_path: Path, **kwargs: object) -> trt.BuiltEngine:
        calls.append({"onnx": onnx_path, "engine": engine_path, **kwargs})
        engine_path.write_bytes(b"engine-bytes:" + onnx_path.name.encode())
        if onnx_path.stem == fail_on:
            raise ArtifactError(f"TensorRT could not build {onnx_path.name}: stand-in failure")
        return trt.BuiltEngine(engine_path, b"timing-cache", {"Layers": ["a"]})

    monkeypatch.setattr(trt, "require_tensorrt", lambda: "10.13.3.9")
    monkeypatch.setattr(trt, "build_engine", build_engine)
    return calls


def test_build_writes_engines_sidecars_manifest(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_trt(monkeypatch)
    manifest = build_engines(out, precision="fp16", gpu=H200, settings=BuildSettings(workspace_gib=2))
    engine_dir = out / "engines" / "fp16"
    assert Manifest.read(engine_dir, stage="build").components.keys() == {"vision", "denoise"}
    assert manifest.extra["tensorrt"] == "10.13.3.9" and manifest.extra["gpu"]["sm"] == "sm90"
    assert manifest.inputs["manifest"] == "manifest.json"
    for name, entry in manifest.components.items():
        assert (engine_dir / entry["path"]).read_bytes() == f"engine-bytes:{name}.onnx".encode()
        sidecar = json.loads((engine_dir / entry["sidecar"]).read_text())
        assert tuple(sidecar) == SIDECAR_KEYS and sidecar["layers"] == {"Layers": ["a"]}
        assert entry["profile"] == sidecar["profile"]
    assert (out / "engines" / "timing.cache").read_bytes() == b"timing-cache"
    assert {c["opt_level"] for c in calls} == {4} and {c["workspace_bytes"] for c in calls} == {2 << 30}
    assert all(c["timing_cache"] == out / "engines" / "timing.cache" for c in calls)
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["fp16", "timing.cache"]  # no temp dirs left


def test_failed_build_leaves_previous_engines(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_trt(monkeypatch)
    build_engines(out, precision="fp16", gpu=H200)
    engine_dir = out / "engines" / "fp16"
    before = {p.name: p.read_bytes() for p in engine_dir.iterdir()}
    _fake_trt(monkeypatch, fail_on="vision")
    with pytest.raises(ArtifactError, match="stand-in failure"):
        build_engines(out, precision="fp16", gpu=H200)
    assert {p.name: p.read_bytes() for p in engine_dir.iterdir()} == before
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["fp16", "timing.cache"]


def test_rebuilding_one_component_keeps_valid_others(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_trt(monkeypatch)
    build_engines(out, precision="fp16", gpu=H200)
    calls = _fake_trt(monkeypatch)
    manifest = build_engines(out, precision="fp16", gpu=H200, components="vision")
    assert [Path(str(c["onnx"])).stem for c in calls] == ["vision"]
    assert manifest.components.keys() == {"vision", "denoise"}  # denoise carried over
    assert (out / "engines" / "fp16" / "denoise.engine").is_file()
    monkeypatch.setattr(trt, "require_tensorrt", lambda: "10.14.1.48")  # TensorRT changed: stale engines go
    manifest = build_engines(out, precision="fp16", gpu=H200, components="vision")
    assert manifest.components.keys() == {"vision"}
    assert not (out / "engines" / "fp16" / "denoise.engine").exists()


def test_gate_runs_before_tensorrt(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_trt(monkeypatch)
    add_quantized(out, "mixed_fp4_fp8", ["fp8", "nvfp4"])
    with pytest.raises(HardwareError, match="NVIDIA H200"):
        build_engines(out, recipe="mixed_fp4_fp8", gpu=H200)
    assert calls == [] and not (out / "engines").exists()


# -- TensorRT absent, CLI ---------------------------------------------------------------------
@no_tensorrt
def test_require_tensorrt_absent() -> None:
    with pytest.raises(DependencyError) as e:
        trt.require_tensorrt()
    assert e.value.exit_code == 2
    assert "tensorrt-cu12" in (e.value.hint or "") and "python3-libnvinfer" in (e.value.hint or "")


@no_tensorrt
def test_cli_build_without_tensorrt(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["build", str(out), "--fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TensorRT") and "pip install tensorrt-cu12" in err and "python3-libnvinfer" in err
    assert len(err.splitlines()) == 1
    assert not (out / "engines").exists()


def test_cli_dry_run_and_print_trtexec(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["build", str(out), "--fp16", "--dry-run", "--batch", "1,1,2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["name"] == "fp16" and plan["settings"]["builder_optimization_level"] == 4
    assert {e["component"] for e in plan["engines"]} == {"vision", "denoise"}
    assert run(["build", str(out), "--fp16", "--print-trtexec", "--opt-level", "5", "--components", "vision"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trtexec --onnx=") and "--builderOptimizationLevel=5" in lines[0]
    assert not (out / "engines").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "choose exactly one of --fp16, --bf16, --recipe NAME"),
        (["--fp16", "--bf16"], "choose exactly one"),
        (["--bf16", "--dry-run"], "--precision bf16"),
        (["--recipe", "fp8", "--dry-run"], "pi05-export quantize"),
        (["--fp16", "--batch", "4,1,1", "--dry-run"], "min <= opt <= max"),
        (["--fp16", "--components", "llm", "--dry-run"], "no llm graph"),
    ],
)
def test_cli_user_errors(out: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert run(["build", str(out), *args]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_missing_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["build", str(tmp_path), "--fp16", "--dry-run"]) != 0
    assert "run `pi05-export onnx` first" in capsys.readouterr().err


def test_help_without_tensorrt() -> None:
    code = "import sys; from pi05_export.cli import main; sys.argv = ['pi05-export', 'build', '--help']; main()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "--print-trtexec" in res.stdout and "--opt-level" in res.stdout


def test_plan_and_gate_on_real_quantize_output(exports: dict[str, Path], tmp_path: Path) -> None:
    """The quantize stage's real manifest (not a hand-made one) through plan + hardware gate."""
    out = tmp_path / "out"
    shutil.copytree(exports["fp32"], out)
    argv = ["quantize", "--preset", "tiny", "--random-init", "--recipe", "mixed_fp4_fp8", "--out", str(out),
            "--components", "vision", "--samples", "1", "--steps", "2", "--accuracy-samples", "0"]
    assert run(argv) == 0
    plan = plan_build(out, recipe="mixed_fp4_fp8")
    assert plan.engine_dir == out / "engines" / "mixed_fp4_fp8"
    assert set(plan.source.formats) >= {"fp8", "nvfp4"}
    with pytest.raises(HardwareError, match="nvfp4.*NVIDIA H200 .compute capability 9.0"):
        check_hardware(plan.source.formats, H200, what="recipe 'mixed_fp4_fp8'")
    check_hardware(plan.source.formats, GpuInfo("NVIDIA B200", (10, 0)), what="recipe 'mixed_fp4_fp8'")
