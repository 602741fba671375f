"""Real TensorRT: build tiny engines (fp16, bf16 typed graphs; an FP8 Q/DQ graph) strongly typed at
opt level 4 and compare them with PyTorch. Marked ``tensorrt`` + ``gpu``: they run wherever real
TensorRT bindings import and a CUDA GPU is present, and skip elsewhere with the reason.

NOTE: written without access to TensorRT (none can be installed where this was written); the
first run on a GPU host is their first execution. The FP8 graph and its PyTorch reference are
checked here on ONNX Runtime (``test_fp8_graph_matches_reference_on_onnxruntime``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pi05_export import trt
from pi05_export.artifacts import Manifest
from pi05_export.build import GpuInfo, build_engines, detect_gpu, unsupported_formats
from pi05_export.checkpoint import random_model
from pi05_export.components import Component, TensorSpec, component_specs, example_inputs
from pi05_export.errors import ArtifactError
from pi05_export.export import export_onnx
from tests.tolerances import TYPED_MIN_COSINE

# `import tensorrt` succeeds on machines with only tensorrt-stubs (a namespace package): check the bindings.
real_trt = pytest.mark.skipif(not trt.tensorrt_available(), reason="real TensorRT bindings are not installed")
SOURCE = {"kind": "random", "preset": "tiny", "seed": 0, "config_file": None}
FP8_MIN_COSINE = 0.999  # TensorRT FP8 GEMM vs the same Q/DQ math in PyTorch (fp32 accumulate both sides)


def report(name: str, got: np.ndarray, want: np.ndarray) -> tuple[float, str]:
    g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    cos = float(g @ w / (np.linalg.norm(g) * np.linalg.norm(w) + 1e-30))
    diff = np.abs(g - w)
    return cos, f"{name}: cosine {cos:.6f}, max abs {diff.max():.3e}, mean abs {diff.mean():.3e}"


def _gpu() -> GpuInfo:
    gpu = detect_gpu()
    assert gpu is not None
    return gpu


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    precision = request.param
    missing = unsupported_formats([precision], _gpu().compute_capability)
    if missing:
        pytest.skip(f"{_gpu().name} has no {precision}")
    out = tmp_path_factory.mktemp(f"trt-{precision}")
    export_onnx(random_model("tiny", 0), out, source=SOURCE, precision=precision)
    build_engines(out, precision=precision)
    return precision, out


@pytest.mark.tensorrt
@pytest.mark.gpu
@real_trt
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("component", list(Component), ids=lambda c: c.value)
def test_typed_engine_matches_pytorch(built: tuple[str, Path], component: Component, batch: int) -> None:
    precision, out = built
    engine_dir = out / "engines" / precision
    manifest = Manifest.read(engine_dir, stage="build")
    cfg_model = random_model("tiny", 0).eval()  # fp32 reference
    compute = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    typed_spec = component_specs(cfg_model.config, compute)[component]
    inputs = example_inputs(typed_spec, cfg_model.config, batch=batch, seed=1)  # already rounded to the graph dtypes
    ref_spec = component_specs(cfg_model.config, "float32")[component]
    with torch.no_grad():
        ref = ref_spec.wrap(cfg_model).eval()(*[inputs[t.name].to(t.torch_dtype) for t in ref_spec.inputs])
    ref_outs = ref if isinstance(ref, tuple) else (ref,)
    feed = {name: (t.float() if t.is_floating_point() else t).numpy() for name, t in inputs.items()}
    with trt.EngineRunner(engine_dir / manifest.components[component.value]["path"]) as runner:
        got = runner.infer(feed)
    for spec, want in zip(ref_spec.outputs, ref_outs, strict=True):
        if spec.dtype == "bool":
            np.testing.assert_array_equal(got[spec.name], want.numpy(), err_msg=spec.name)
            continue
        cos, msg = report(f"{precision}/{component.value}/{spec.name}", got[spec.name], want.float().numpy())
        assert cos >= TYPED_MIN_COSINE[precision], msg


@pytest.mark.tensorrt
@pytest.mark.gpu
@real_trt
def test_sidecar_and_timing_cache_from_real_build(tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_onnx(random_model("tiny", 0), out, source=SOURCE, components=["projections"], precision="fp16")
    manifest = build_engines(out, precision="fp16")
    engine_dir = out / "engines" / "fp16"
    sidecar = json.loads((engine_dir / manifest.components["projections"]["sidecar"]).read_text())
    assert sidecar["tensorrt"] == trt.require_tensorrt() and sidecar["gpu"]["name"] == _gpu().name
    assert sidecar["layers"] is not None  # DETAILED profiling verbosity -> per-layer JSON
    assert (out / "engines" / "timing.cache").stat().st_size > 0
    io = trt.engine_io(engine_dir / "projections.engine")
    assert [n for n, _, _ in io["inputs"]] == [t["name"] for t in manifest.components["projections"]["inputs"]]
    with trt.EngineRunner(engine_dir / "projections.engine") as runner:  # torch in -> torch out, on the GPU
        feed = {t["name"]: torch.randn([1 if isinstance(d, str) else d for d in t["shape"]], device="cuda")
                for t in manifest.components["projections"]["inputs"]}
        outs = runner.infer(feed)
    assert all(isinstance(v, torch.Tensor) and v.is_cuda for v in outs.values())


@pytest.mark.tensorrt
@pytest.mark.gpu
@real_trt
def test_load_engine_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine")
    with pytest.raises(ArtifactError, match="could not load"):
        trt.load_engine(bad)


# -- FP8: a Q/DQ GEMM, the pattern ModelOpt exports --------------------------------------------
FP8_MAX = 448.0


def fp8_graph(path: Path, w: np.ndarray, x_scale: float, w_scale: float) -> Path:
    """y[batch, n] = DQ(Q(x)) @ DQ(Q(W)), FP8 E4M3 per-tensor scales, opset 19, batch dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "zp"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "w_scale"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(np.float32(x_scale), "x_scale"),
             numpy_helper.from_array(np.float32(w_scale), "w_scale"), zp]
    graph = helper.make_graph(nodes, "fp8_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)  # opset 19 = IR 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fp8_reference(x: np.ndarray, w: np.ndarray, x_scale: float, w_scale: float) -> np.ndarray:
    def qdq(a: np.ndarray, s: float) -> torch.Tensor:
        t = (torch.from_numpy(a).float() / s).clamp(-FP8_MAX, FP8_MAX)
        return t.to(torch.float8_e4m3fn).float() * s

    return (qdq(x, x_scale) @ qdq(w, w_scale)).numpy()


def _fp8_case(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x_scale, w_scale = float(np.abs(x).max() / FP8_MAX), float(np.abs(w).max() / FP8_MAX)
    path = fp8_graph(tmp_path / "fp8_gemm.onnx", w, x_scale, w_scale)
    return path, x, w, fp8_reference(x, w, x_scale, w_scale)


def test_fp8_graph_matches_reference_on_onnxruntime(tmp_path: Path) -> None:
    """The FP8 test graph and its PyTorch reference agree (checked without TensorRT)."""
    import onnxruntime as ort

    path, x, _, want = _fp8_case(tmp_path)
    opts = ort.SessionOptions()  # ORT 1.30's fusion into MatMulIntegerToFloat rejects fp8: check semantics unfused
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos, msg = report("fp8 onnxruntime", got, want)
    assert np.allclose(got, want, atol=1e-4, rtol=1e-4), msg


@pytest.mark.tensorrt
@pytest.mark.gpu
@real_trt
def test_fp8_engine_matches_pytorch(tmp_path: Path) -> None:
    if unsupported_formats(["fp8"], _gpu().compute_capability):
        pytest.skip(f"{_gpu().name} ({_gpu().sm}) has no FP8")
    path, x, _, want = _fp8_case(tmp_path)
    spec = TensorSpec("x", "float32", ("batch", 64))
    profile = {spec.name: ((1, 64), (3, 64), (8, 64))}
    built = trt.build_engine(path, tmp_path / "fp8.engine", profile=profile, opt_level=4, workspace_bytes=1 << 30,
                             timing_cache=None)
    assert built.timing_cache
    with trt.EngineRunner(built.path) as runner:
        got = runner.infer({"x": x})["y"]
    cos, msg = report("fp8 tensorrt", got, want)
    assert cos >= FP8_MIN_COSINE, msg
