"""The only module that imports ``tensorrt`` and ``polygraphy.backend.trt`` (lazily, inside functions).

Kept small on purpose: building goes through Polygraphy's loaders (``NetworkFromOnnxPath``,
``CreateConfig``, ``EngineBytesFromNetwork``), running through Polygraphy's ``TrtRunner``. Works on
TensorRT 10.x (JetPack 7 on Jetson Thor: the network is created with ``STRONGLY_TYPED``) and 11.x
(strong typing is always on and the flag is not passed). Type-checked against ``tensorrt-stubs``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from pi05_export.errors import ArtifactError, DependencyError

if TYPE_CHECKING:
    import tensorrt
    import torch

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "x86_64: `pip install tensorrt-cu12` or `pip install tensorrt-cu13` (match your CUDA; the libraries come from "
    "NVIDIA's index pypi.nvidia.com); Jetson: use JetPack's TensorRT (`sudo apt install python3-libnvinfer`) in a venv "
    "created with --system-site-packages"
)

Shape = tuple[int, ...]


def require_tensorrt() -> str:
    """TensorRT's version, or DependencyError (exit 2) saying what to install where.

    ``import tensorrt`` alone is not proof: the ``tensorrt-stubs`` package makes it import as an
    empty namespace package, so this also checks that the real bindings are there.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # bindings without libnvinfer raise ImportError/OSError
        raise DependencyError(f"TensorRT's Python package cannot be imported ({e})", hint=INSTALL_HINT) from None
    version = getattr(trt, "__version__", None)
    if not hasattr(trt, "Builder") or not isinstance(version, str):
        raise DependencyError("TensorRT's Python package is not installed (only type stubs were found)", hint=INSTALL_HINT)
    return version


def tensorrt_available() -> bool:
    """True when real TensorRT bindings import (what the ``tensorrt`` test marker keys on)."""
    try:
        require_tensorrt()
    except DependencyError:
        return False
    return True


def tensorrt_major() -> int:
    return int(require_tensorrt().split(".")[0])


@contextlib.contextmanager
def _polygraphy_quiet() -> Iterator[None]:
    """Polygraphy prints INFO to stdout; show it only when our logger is at DEBUG (-v)."""
    from polygraphy.logger import G_LOGGER

    level = G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.WARNING
    with G_LOGGER.verbosity(level):
        yield


@dataclass(frozen=True)
class BuiltEngine:
    path: Path
    timing_cache: bytes | None  # the config's cache after the build (loaded entries + new ones)
    layers: Any | None  # IEngineInspector JSON (per layer) when available


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    profile: Mapping[str, tuple[Shape, Shape, Shape]],
    opt_level: int,
    workspace_bytes: int | None,
    timing_cache: Path | None,
    layer_info: bool = True,
) -> BuiltEngine:
    """Parse ``onnx_path`` strongly typed, build with one optimization profile, write ``engine_path``.

    ``engine_path`` must be inside a staging directory: a failure leaves a partial file there,
    which the caller's staging dir removes. Raises ArtifactError when TensorRT cannot parse/build.
    """
    require_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    strongly_typed = True if tensorrt_major() < 11 else None  # 11.x: always strongly typed, no flag
    trt_profile = Profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    pools = {trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None
    cache = str(timing_cache) if timing_cache is not None and timing_cache.is_file() else None
    with _polygraphy_quiet():
        try:
            builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)()
            config: tensorrt.IBuilderConfig = CreateConfig(
                builder_optimization_level=opt_level,
                profiles=[trt_profile],
                load_timing_cache=cache,
                memory_pool_limits=pools,
                profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
            )(builder, network)
            serialized: tensorrt.IHostMemory = EngineBytesFromNetwork((builder, network, parser), config=config)()
        except PolygraphyException as e:
            raise ArtifactError(
                f"TensorRT {trt.__version__} could not build {onnx_path.name}: {_last_line(e)}",
                hint="re-run with -v for TensorRT's log; graphs for TensorRT < 10.14 need --opset 19 (no Attention op)",
            ) from None
    with open(engine_path, "wb") as f:
        f.write(serialized)
    timing = config.get_timing_cache()
    cache_bytes = bytes(timing.serialize()) if timing is not None else None
    layers = _layer_info(serialized) if layer_info else None
    return BuiltEngine(engine_path, cache_bytes, layers)


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def _layer_info(serialized: tensorrt.IHostMemory) -> Any | None:
    """Per-layer JSON from the engine inspector (the schema differs between 10.x and 11.x: stored as is)."""
    import tensorrt as trt
    from polygraphy.backend.trt import util as trt_util

    runtime = trt.Runtime(trt_util.get_trt_logger())
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        log.warning("could not deserialize the engine for per-layer info")
        return None
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_engine(path: str | Path) -> tensorrt.ICudaEngine:
    """Deserialize an engine file (built by this TensorRT version on this GPU architecture)."""
    require_tensorrt()
    from polygraphy.backend.trt import engine_from_path
    from polygraphy.exception import PolygraphyException

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"engine {path} does not exist", hint="run `pi05-export build` first")
    with _polygraphy_quiet():
        try:
            engine: tensorrt.ICudaEngine = engine_from_path(str(path))
        except PolygraphyException:
            raise ArtifactError(
                f"TensorRT could not load {path}",
                hint="engines only load on the TensorRT version and GPU architecture that built them: rebuild it here",
            ) from None
    return engine


def _torch_dtype(dtype: tensorrt.DataType) -> torch.dtype:
    from polygraphy.datatype import DataType

    result: torch.dtype = DataType.to_dtype(DataType.from_dtype(dtype, source_module="tensorrt"), "torch")
    return result


class EngineRunner:
    """Runs one engine. ``with EngineRunner(path) as r: outputs = r.infer(feed)``.

    ``infer`` takes numpy arrays (returns numpy; bf16 outputs come back as float32, which is exact)
    or torch tensors (returns torch tensors on the inputs' device, for chaining engines on the GPU).
    Inputs are cast to the engine's input dtypes (e.g. float32 -> bfloat16 for a bf16 KV cache).
    Outputs are copies: the next call does not overwrite them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._runner: Any = None
        self.input_dtypes: dict[str, torch.dtype] = {}
        self.output_names: list[str] = []

    def __enter__(self) -> EngineRunner:
        import tensorrt as trt
        from polygraphy.backend.trt import TrtRunner

        engine = load_engine(self.path)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_dtypes[name] = _torch_dtype(engine.get_tensor_dtype(name))
            else:
                self.output_names.append(name)
        self._runner = TrtRunner(engine, name=self.path.stem)
        with _polygraphy_quiet():
            self._runner.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._runner is not None:
            with _polygraphy_quiet():
                self._runner.deactivate()
            self._runner = None

    def infer(self, feed: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, Any]:
        import torch

        if self._runner is None:
            raise RuntimeError("EngineRunner.infer called outside `with EngineRunner(path) as runner:`")
        missing = sorted(set(self.input_dtypes) - set(feed))
        if missing:
            raise ArtifactError(f"{self.path.name}: missing inputs {missing}", hint=f"the engine takes {sorted(self.input_dtypes)}")
        as_numpy = all(isinstance(v, np.ndarray) for v in feed.values())
        tensors = {name: _as_tensor(feed[name]) for name in self.input_dtypes}
        out_device = torch.device("cpu") if as_numpy else next(iter(tensors.values())).device
        on_gpu = torch.cuda.is_available()  # else Polygraphy copies host <-> device itself
        device = torch.device("cuda") if on_gpu else torch.device("cpu")
        tensors = {n: t.to(device=device, dtype=self.input_dtypes[n]).contiguous() for n, t in tensors.items()}
        with _polygraphy_quiet():
            raw = self._runner.infer(tensors, copy_outputs_to_host=not on_gpu)
        outputs = {n: raw[n].to(out_device, copy=True) for n in self.output_names}
        if not as_numpy:
            return outputs
        return {n: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for n, t in outputs.items()}


def _as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


def engine_io(path: str | Path) -> dict[str, list[tuple[str, str, Sequence[int]]]]:
    """``{"inputs"|"outputs": [(name, dtype, shape with -1 for dynamic dims)]}`` of an engine file."""
    import tensorrt as trt

    engine = load_engine(path)
    io: dict[str, list[tuple[str, str, Sequence[int]]]] = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        key = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
        dims = engine.get_tensor_shape(name)
        io[key].append((name, str(engine.get_tensor_dtype(name)), tuple(dims[i] for i in range(len(dims)))))
    return io


class _Context:
    """One engine's execution context at fixed input shapes over static torch CUDA buffers (TensorRT's
    ``set_tensor_address`` + ``execute_async_v3``: no Polygraphy, no copies). ``bind`` supplies input
    buffers made elsewhere (another engine's outputs, reshaped), so engines chain without copies."""

    def __init__(self, path: Path, engine: tensorrt.ICudaEngine, shapes: Mapping[str, Shape],
                 bind: Mapping[str, torch.Tensor] | None = None) -> None:
        import tensorrt as trt
        import torch

        self.path = path
        self.engine = engine  # shared: every context of one engine uses its one copy of the weights
        context = self.engine.create_execution_context()
        if context is None:
            raise ArtifactError(f"TensorRT could not create an execution context for {path}", hint="free GPU memory")
        self.context: tensorrt.IExecutionContext = context
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        for name in names:
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                continue
            shape = tuple(shapes[name])
            if not self.context.set_input_shape(name, shape):
                raise ArtifactError(f"{path.name}: input {name} of shape {shape} is outside the engine's optimization profile",
                                    hint="rebuild the engine with a profile that covers this batch, or lower --max-batch")
            given = (bind or {}).get(name)
            self.inputs[name] = given if given is not None else torch.empty(
                shape, dtype=_torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
        for name in names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                continue
            dims = self.context.get_tensor_shape(name)
            self.outputs[name] = torch.empty(tuple(dims[i] for i in range(len(dims))),
                                             dtype=_torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
        for name, buf in {**self.inputs, **self.outputs}.items():
            self.context.set_tensor_address(name, buf.data_ptr())

    def enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError(f"TensorRT could not enqueue {self.path.name}", hint="run with PI05_DEBUG=1 and check TensorRT's log")


class GraphedEngines:
    """The whole inference on TensorRT engines at one batch size, as few launches as the engines allow.

    vision -> llm (prefix) -> ``steps`` x (fused ``denoise`` engine + the fp32 Euler update ``x += dt * v_t``,
    ``t += dt``, openpi ``pi0.py`` ``sample_actions``) over static CUDA buffers, the engines chained by binding
    one engine's output buffer as the next one's input. Each part is captured in a CUDA graph (TensorRT
    supports stream capture of ``enqueueV3`` once the input shapes are set and one enqueue has run, see
    TensorRT's "CUDA Graphs" section of the developer guide): one encode graph and one denoise-loop graph per
    step count. Where capture fails (e.g. an engine with data-dependent shapes or a plugin that synchronizes),
    the same calls run uncaptured and the reason is logged.

    **Never executed here**: TensorRT cannot be installed on this project's machines.
    """

    def __init__(self, engines: Mapping[str, tuple[Path, tensorrt.ICudaEngine]], *, batch: int, views: int,
                 num_patches: int, width: int, tokens: int, horizon: int, action_dim: int) -> None:
        import torch

        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self.batch = batch
        vision = _Context(*engines["vision"], {"pixel_values": self._pixel_shape(engines["vision"][1], batch * views)})
        embeds = vision.outputs["image_embeds"].view(batch, views * num_patches, width)
        llm = _Context(*engines["llm"], {"image_embeds": tuple(embeds.shape), "image_mask": (batch, views),
                                         "tokens": (batch, tokens), "token_mask": (batch, tokens)},
                       bind={"image_embeds": embeds})
        kv, pm = llm.outputs["kv_cache"], llm.outputs["prefix_mask"]
        denoise = _Context(*engines["denoise"], {"x_t": (batch, horizon, action_dim), "t": (batch,),
                                                 "kv_cache": tuple(kv.shape), "prefix_mask": tuple(pm.shape)},
                           bind={"kv_cache": kv, "prefix_mask": pm})
        self.vision, self.llm, self.denoise = vision, llm, denoise
        self.noise = torch.empty_like(denoise.inputs["x_t"])  # the loop restarts from it: every replay is whole
        self.notes: dict[str, str] = {}
        self._graphs: dict[str, Any] = {}

    @staticmethod
    def _pixel_shape(engine: tensorrt.ICudaEngine, images: int) -> Shape:
        dims = engine.get_tensor_shape("pixel_values")  # [-1 (images), 3, S, S]
        return (images, int(dims[1]), int(dims[2]), int(dims[3]))

    def _run(self, key: str, body: Any) -> None:
        """Replay ``key``'s graph, capturing it on first use (after one uncaptured run); uncaptured on failure."""
        import torch

        graph = self._graphs.get(key)
        if graph is None and key not in self.notes:
            with torch.cuda.stream(self.stream):
                body()  # TensorRT's lazy setup happens on the first enqueue, outside any capture
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    body()
                self._graphs[key] = graph
                self.notes[key] = "CUDA graph"
            except Exception as e:  # noqa: BLE001  (any capture failure -> uncaptured enqueues, logged)
                self.notes[key] = f"uncaptured ({_last_line(e)})"
                log.warning("TensorRT %s could not be captured in a CUDA graph, enqueuing per call: %s", key, _last_line(e))
                graph = None
        with torch.cuda.stream(self.stream):
            if graph is not None:
                graph.replay()
            else:
                body()

    def sample(self, images: torch.Tensor, image_mask: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
               noise: torch.Tensor, steps: int) -> torch.Tensor:
        """Inputs on the GPU (images float32 [B, V, 3, S, S], masks bool, tokens int64, noise float32 [B, H, A]) ->
        actions float32 [B, H, A] (a static buffer: copy it before the next call)."""
        import torch

        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.vision.inputs["pixel_values"].copy_(images.flatten(0, 1))
            self.llm.inputs["image_mask"].copy_(image_mask)
            self.llm.inputs["tokens"].copy_(tokens)
            self.llm.inputs["token_mask"].copy_(token_mask)
            self.noise.copy_(noise)

        def encode() -> None:
            self.vision.enqueue(self.stream)
            self.llm.enqueue(self.stream)

        x, t, v = self.denoise.inputs["x_t"], self.denoise.inputs["t"], self.denoise.outputs["v_t"]
        dt = -1.0 / steps

        def loop() -> None:
            x.copy_(self.noise)
            t.fill_(1.0)
            for _ in range(steps):
                self.denoise.enqueue(self.stream)
                x.add_(v.float() * dt)  # fp32, rounded as the reference's x + dt * v
                t.add_(dt)

        self._run("encode", encode)
        self._run(f"denoise x{steps}", loop)
        torch.cuda.current_stream().wait_stream(self.stream)
        return x
