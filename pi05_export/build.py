"""ONNX -> TensorRT engines: ``OUT/engines/<name>/<component>.engine`` + sidecar JSON + manifest.

This module is the *plan*: which graphs, which optimization profiles, which hardware gate, which
trtexec line. It is pure Python and never imports TensorRT; everything that touches TensorRT lives
in :mod:`pi05_export.trt` and is called only from :func:`build_engines` after the plan is made and
the GPU has passed the format gate.

Precision lives in the graph (TensorRT 11 has no precision builder flags): ``--fp16``/``--bf16``
select fp16/bf16-typed graphs, ``--recipe NAME`` selects the quantized graphs written by
``pi05-export quantize`` into ``OUT/<NAME>/``. Every network is built strongly typed.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pi05_export import __version__
from pi05_export.artifacts import (
    MANIFEST_NAME,
    Manifest,
    atomic_write,
    load_graph,
    resolve_inside,
    sampled_sha256,
    sha256_file,
    staging_dir,
    tool_versions,
)
from pi05_export.components import BATCH, NUM_IMAGES, TensorSpec
from pi05_export.errors import ArtifactError, ConfigError, HardwareError
from pi05_export.recipe import RECIPE_NAME

log = logging.getLogger(__name__)

ENGINES_SUBDIR = "engines"
TIMING_CACHE_NAME = "timing.cache"
SIDECAR_SCHEMA_VERSION = 1
DEFAULT_OPT_LEVEL = 4
DEFAULT_BATCH = (1, 1, 4)
TYPED_PRECISIONS = ("fp16", "bf16")

# Lowest compute capability that has tensor-core support for each format (None: every GPU that
# TensorRT 10/11 supports). NVFP4 covers sm100/103 (B200/B300), sm110 (Jetson Thor), sm120/121.
MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int] | None] = {
    "fp32": None,
    "fp16": None,
    "int8": None,
    "bf16": (8, 0),
    "fp8": (8, 9),
    "nvfp4": (10, 0),
    "fp4": (10, 0),  # alias: TensorRT's FP4 is NVFP4
}
_FORMAT_GPUS = {
    "bf16": "Ampere (sm80) or newer",
    "fp8": "Ada (sm89), Hopper (sm90), Blackwell or Jetson Thor",
    "nvfp4": "Blackwell (sm100/sm120) or Jetson Thor (sm110); Hopper and Ada have no FP4 tensor cores",
}
_FORMAT_GPUS["fp4"] = _FORMAT_GPUS["nvfp4"]


# -- settings, GPU ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class BuildSettings:
    """Everything that changes an engine besides the graph (recorded in every sidecar)."""

    opt_level: int = DEFAULT_OPT_LEVEL
    batch: tuple[int, int, int] = DEFAULT_BATCH
    workspace_gib: float | None = None  # None: TensorRT's default (all device memory)
    timing_cache: Path | None = None  # None: OUT/engines/timing.cache

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ConfigError(f"--opt-level {self.opt_level} is out of range", hint="TensorRT builder optimization levels are 0-5 (default 4)")
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise ConfigError(f"--batch {lo},{opt},{hi} is not 1 <= min <= opt <= max", hint="e.g. --batch 1,1,4")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise ConfigError(f"--workspace {self.workspace_gib} GiB must be positive", hint="e.g. --workspace 8")

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gib is None else int(self.workspace_gib * (1 << 30))


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"1,1,4"`` -> (1, 1, 4); a single ``"2"`` means min = opt = max = 2."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ConfigError(f"--batch {text!r} is not min,opt,max", hint="e.g. --batch 1,1,4 (or one number for a static batch)")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "compute_capability": "{}.{}".format(*self.compute_capability), "sm": self.sm}


def detect_gpu() -> GpuInfo | None:
    """GPU 0 via torch.cuda (honours CUDA_VISIBLE_DEVICES), else NVML; None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(torch.cuda.get_device_name(0), (major, minor))
    except ImportError:
        pass
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return GpuInfo(name.decode() if isinstance(name, bytes) else str(name), (int(major), int(minor)))


def unsupported_formats(formats: Sequence[str], compute_capability: tuple[int, int]) -> list[str]:
    """The formats (in the given order) this compute capability cannot run. Pure; unknown format -> error."""
    unknown = [f for f in formats if f not in MIN_COMPUTE_CAPABILITY]
    if unknown:
        raise ArtifactError(
            f"unknown number format(s) {', '.join(unknown)}",
            hint=f"formats this build knows: {', '.join(MIN_COMPUTE_CAPABILITY)}",
        )
    return [f for f in formats if (need := MIN_COMPUTE_CAPABILITY[f]) is not None and compute_capability < need]


def check_hardware(formats: Sequence[str], gpu: GpuInfo, *, what: str) -> None:
    """Raise one HardwareError naming the GPU, its compute capability and ``what`` (recipe/precision)."""
    missing = unsupported_formats(formats, gpu.compute_capability)
    if not missing:
        return
    needs = "; ".join(f"{f} needs sm{''.join(map(str, MIN_COMPUTE_CAPABILITY[f] or ()))}+ ({_FORMAT_GPUS[f]})" for f in missing)
    cc = "{}.{}".format(*gpu.compute_capability)
    raise HardwareError(
        f"{what} uses {', '.join(missing)}, which {gpu.name} (compute capability {cc}, {gpu.sm}) cannot run: {needs}",
        hint="build on a GPU that has these formats, or choose a recipe/precision without them (e.g. --fp16)",
    )


# -- graph selection: where the typed / quantized graphs live -----------------------------------
@dataclass(frozen=True)
class GraphSource:
    """A manifest whose components are the graphs to build, and the formats they use."""

    directory: Path  # component paths are relative to this
    manifest: Manifest = field(compare=False)
    name: str  # engines go to OUT/engines/<name>/
    formats: tuple[str, ...]
    what: str  # for messages: "--fp16", "recipe 'fp8'"


def read_quantized_graphs(out: Path, recipe: str) -> GraphSource:
    """The quantize stage's contract, in one place: ``OUT/<recipe>/manifest.json`` (stage
    ``quantize``), component paths relative to ``OUT/<recipe>/``, ``extra["formats"]`` listing
    the formats used (e.g. ``["fp8", "nvfp4"]``); the base precision is ``manifest.precision``."""
    if not RECIPE_NAME.fullmatch(recipe):
        raise ConfigError(f"recipe name {recipe!r} is not a plain name", hint="use the recipe name given to `pi05-export quantize`, e.g. fp8")
    directory = out / recipe
    manifest = Manifest.read(directory, stage="quantize", hint=f"run `pi05-export quantize` with recipe {recipe} on {out} first")
    formats = manifest.extra.get("formats")
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise ArtifactError(f"{directory / MANIFEST_NAME} has no extra.formats list", hint="re-run `pi05-export quantize` with this version")
    return GraphSource(directory, manifest, recipe, _ordered({manifest.precision, *formats}), f"recipe {recipe!r}")


def select_graphs(out: str | Path, *, precision: str | None = None, recipe: str | None = None) -> GraphSource:
    """Graphs for ``--fp16``/``--bf16`` (typed graphs in OUT/onnx or OUT/<precision>/) or ``--recipe``."""
    out = Path(out)
    if (precision is None) == (recipe is None):
        raise ConfigError("choose exactly one of --fp16, --bf16, --recipe NAME", hint="e.g. `pi05-export build OUT --fp16`")
    if recipe is not None:
        return read_quantized_graphs(out, recipe)
    if precision not in TYPED_PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint=f"use one of: {', '.join(TYPED_PRECISIONS)}")
    manifest = Manifest.read(out, stage="onnx")
    if manifest.precision == precision:
        return GraphSource(out, manifest, precision, (precision,), f"--{precision}")
    if (out / precision / MANIFEST_NAME).is_file():  # typed graphs made by `quantize` with recipe fp16/bf16
        return read_quantized_graphs(out, precision)
    raise ArtifactError(
        f"{out / MANIFEST_NAME} holds {manifest.precision} graphs, but --{precision} builds {precision}-typed graphs "
        "(TensorRT strong typing takes precision from the graph)",
        hint=f"export them first: `pi05-export onnx <checkpoint> --precision {precision} --out <dir>`, then `pi05-export build <dir> --{precision}`",
    )


# -- the plan -----------------------------------------------------------------------------------
Shape = tuple[int, ...]


@dataclass(frozen=True)
class EnginePlan:
    component: str
    onnx: Path
    engine: Path  # final location, OUT/engines/<name>/<component>.engine
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[Shape, Shape, Shape]]  # only inputs with a dynamic dim
    onnx_sha256: str | None

    @property
    def sidecar(self) -> Path:
        return self.engine.with_suffix(".json")


@dataclass(frozen=True)
class BuildPlan:
    out: Path
    source: GraphSource
    settings: BuildSettings
    engines: tuple[EnginePlan, ...]

    @property
    def engine_dir(self) -> Path:
        return self.out / ENGINES_SUBDIR / self.source.name

    @property
    def timing_cache(self) -> Path:
        return self.settings.timing_cache or self.out / ENGINES_SUBDIR / TIMING_CACHE_NAME

    def trtexec(self, engine: EnginePlan, *, tensorrt_major: int | None = None, relative_to: Path | None = None) -> str:
        return trtexec_command(engine, self.settings, self.timing_cache, tensorrt_major=tensorrt_major, relative_to=relative_to)

    def to_dict(self, *, tensorrt_major: int | None = None) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "engine_dir": str(self.engine_dir),
            "name": self.source.name,
            "graphs": str(self.source.directory / MANIFEST_NAME),
            "precision": self.source.manifest.precision,
            "formats": list(self.source.formats),
            "settings": settings_dict(self.settings, self.timing_cache),
            "engines": [
                {
                    "component": e.component,
                    "onnx": str(e.onnx),
                    "engine": str(e.engine),
                    "profile": profile_dict(e.profile),
                    "trtexec": self.trtexec(e, tensorrt_major=tensorrt_major),
                }
                for e in self.engines
            ],
        }


def dim_ranges(batch: tuple[int, int, int], num_views: int) -> dict[str, tuple[int, int, int]]:
    """min/opt/max for every named dynamic dim the manifest may declare."""
    return {BATCH: batch, NUM_IMAGES: (batch[0] * num_views, batch[1] * num_views, batch[2] * num_views)}


def profile_shapes(inputs: Sequence[TensorSpec], ranges: dict[str, tuple[int, int, int]]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Optimization profile from TensorSpecs: static dims stay static; named dims get min/opt/max."""
    profile: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in inputs:
        named = [d for d in spec.shape if isinstance(d, str)]
        if not named:
            continue
        unknown = [d for d in named if d not in ranges]
        if unknown:
            raise ArtifactError(
                f"input {spec.name!r} has dynamic dim(s) {', '.join(unknown)} that build cannot range",
                hint=f"build knows {', '.join(ranges)}; re-export with this version of pi05-export",
            )
        profile[spec.name] = (
            spec.concrete_shape({d: r[0] for d, r in ranges.items()}),
            spec.concrete_shape({d: r[1] for d, r in ranges.items()}),
            spec.concrete_shape({d: r[2] for d, r in ranges.items()}),
        )
    return profile


def check_graph_inputs(onnx_path: Path, inputs: Sequence[TensorSpec]) -> None:
    """The graph's inputs must match the manifest, dim for dim: a profile on a dim the graph made
    static (or a static profile on a dim the graph left dynamic) fails inside TensorRT much later."""
    graph = load_graph(onnx_path).graph
    initializers = {i.name for i in graph.initializer}
    got = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input if i.name not in initializers}
    want = {t.name: list(t.shape) for t in inputs}
    if list(got) != list(want):
        raise ArtifactError(f"{onnx_path} has inputs {list(got)}, the manifest says {list(want)}", hint="re-run the stage that wrote the graphs")
    for name, dims in want.items():
        graph_dims = got[name]
        if len(graph_dims) != len(dims) or any(isinstance(w, str) != isinstance(g, str) or (isinstance(w, int) and w != g)
                                                for w, g in zip(dims, graph_dims, strict=False)):
            raise ArtifactError(
                f"{onnx_path}: input {name!r} has shape {graph_dims} in the graph but {dims} in the manifest",
                hint="re-run the stage that wrote the graphs (a dynamic dim was made static, or vice versa)",
            )


def plan_build(
    out: str | Path,
    *,
    precision: str | None = None,
    recipe: str | None = None,
    components: Sequence[str] | str | None = None,
    settings: BuildSettings | None = None,
    check_graphs: bool = True,
) -> BuildPlan:
    """Everything ``build`` will do, decided from manifests and flags alone (no TensorRT, no GPU)."""
    from pi05_export.export import parse_components

    out = Path(out)
    settings = settings or BuildSettings()
    source = select_graphs(out, precision=precision, recipe=recipe)
    manifest = source.manifest
    if components is None:
        names = list(manifest.components)
    else:
        names = [c.value for c in parse_components(components)]
        missing = [n for n in names if n not in manifest.components]
        if missing:
            raise ArtifactError(
                f"{source.directory / MANIFEST_NAME} has no {', '.join(missing)} graph (has: {', '.join(manifest.components)})",
                hint="re-export with --components including them, or drop them from --components",
            )
    if not names:
        raise ArtifactError(f"{source.directory / MANIFEST_NAME} lists no components", hint="re-run the export")
    ranges = dim_ranges(settings.batch, int(manifest.config.get("num_views", 1)))
    engine_dir = out / ENGINES_SUBDIR / source.name
    engines = []
    for name in names:
        entry = manifest.components[name]
        onnx_path = manifest.component_path(source.directory, name, full_hash=check_graphs)  # engines go to robots: every byte
        inputs = tuple(TensorSpec.from_dict(t) for t in entry["inputs"])
        outputs = tuple(TensorSpec.from_dict(t) for t in entry["outputs"])
        if check_graphs:
            check_graph_inputs(onnx_path, inputs)
        engines.append(EnginePlan(name, onnx_path, engine_dir / f"{name}.engine", inputs, outputs,
                                  profile_shapes(inputs, ranges), entry.get("sha256")))
    return BuildPlan(out, source, settings, tuple(engines))


# -- trtexec, sidecar ---------------------------------------------------------------------------
def _shape_arg(profile: dict[str, tuple[Shape, Shape, Shape]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile.items())


def trtexec_command(
    engine: EnginePlan,
    settings: BuildSettings,
    timing_cache: Path,
    *,
    tensorrt_major: int | None = None,
    relative_to: Path | None = None,
) -> str:
    """The equivalent ``trtexec`` line. ``--stronglyTyped`` is emitted unless TensorRT is known to be
    11+ (where it is always on); paths are made relative to ``relative_to`` when given."""

    def p(path: Path) -> str:
        if relative_to is not None:
            try:
                return shlex.quote(str(path.relative_to(relative_to)))
            except ValueError:
                pass
        return shlex.quote(str(path))

    args = ["trtexec", f"--onnx={p(engine.onnx)}", f"--saveEngine={p(engine.engine)}"]
    if tensorrt_major is None or tensorrt_major < 11:
        args.append("--stronglyTyped")
    args.append(f"--builderOptimizationLevel={settings.opt_level}")
    if engine.profile:
        args += [f"--minShapes={_shape_arg(engine.profile, 0)}", f"--optShapes={_shape_arg(engine.profile, 1)}",
                 f"--maxShapes={_shape_arg(engine.profile, 2)}"]
    args.append(f"--timingCacheFile={p(timing_cache)}")
    if settings.workspace_bytes is not None:
        args.append(f"--memPoolSize=workspace:{max(1, settings.workspace_bytes >> 20)}")  # MiB
    return " ".join(args)


def profile_dict(profile: dict[str, tuple[Shape, Shape, Shape]]) -> dict[str, dict[str, list[int]]]:
    return {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for name, s in profile.items()}


def settings_dict(settings: BuildSettings, timing_cache: Path) -> dict[str, Any]:
    return {
        "strongly_typed": True,
        "builder_optimization_level": settings.opt_level,
        "batch": {"min": settings.batch[0], "opt": settings.batch[1], "max": settings.batch[2]},
        "workspace_bytes": settings.workspace_bytes,
        "timing_cache": str(timing_cache),
        "profiling_verbosity": "DETAILED",
    }


SIDECAR_KEYS = (
    "schema_version", "pi05_export", "component", "engine", "engine_sha256", "engine_bytes", "onnx", "onnx_sha256",
    "name", "precision", "recipe", "formats", "gpu", "tensorrt", "settings", "profile", "inputs", "outputs",
    "build_seconds", "trtexec", "trtexec_cwd", "layers",
)


def engine_sidecar(
    plan: BuildPlan,
    engine: EnginePlan,
    *,
    engine_file: Path,
    gpu: GpuInfo,
    tensorrt_version: str,
    build_seconds: float,
    layers: Any | None,
) -> dict[str, Any]:
    """The ``<component>.json`` next to each engine (keys: :data:`SIDECAR_KEYS`).
    ``engine_file`` is where the bytes are now (the staging dir); ``engine.engine`` where they go."""
    major = int(tensorrt_version.split(".")[0])
    sidecar = {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "pi05_export": __version__,
        "component": engine.component,
        "engine": engine.engine.name,
        "engine_sha256": sha256_file(engine_file),
        "engine_bytes": engine_file.stat().st_size,
        "onnx": _rel(engine.onnx, plan.out),
        "onnx_sha256": engine.onnx_sha256,
        "name": plan.source.name,
        "precision": plan.source.manifest.precision,
        "recipe": plan.source.name if plan.source.directory != plan.out else None,
        "formats": list(plan.source.formats),
        "gpu": gpu.to_dict(),
        "tensorrt": tensorrt_version,
        "settings": settings_dict(plan.settings, plan.timing_cache),
        "profile": profile_dict(engine.profile),
        "inputs": [t.to_dict() for t in engine.inputs],
        "outputs": [t.to_dict() for t in engine.outputs],
        "build_seconds": round(build_seconds, 2),
        "trtexec": plan.trtexec(engine, tensorrt_major=major, relative_to=plan.out),
        "trtexec_cwd": "the export directory (OUT)",
        "layers": layers,
    }
    return sidecar


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _ordered(formats: set[str] | Sequence[str]) -> tuple[str, ...]:
    order = list(MIN_COMPUTE_CAPABILITY)
    return tuple(sorted(set(formats), key=lambda f: (order.index(f) if f in order else len(order), f)))


# -- the build ----------------------------------------------------------------------------------
def _kept_components(plan: BuildPlan, gpu: GpuInfo, tensorrt_version: str) -> dict[str, dict[str, Any]]:
    """Engines already in OUT/engines/<name>/ that this run does not rebuild and that are still valid
    (same graph hash, same TensorRT, same GPU architecture): carried into the new directory."""
    try:
        old = Manifest.read(plan.engine_dir, stage="build")
    except ArtifactError:
        return {}
    rebuilt = {e.component for e in plan.engines}
    kept: dict[str, dict[str, Any]] = {}
    for name, entry in old.components.items():
        if name in rebuilt:
            continue
        src = plan.source.manifest.components.get(name, {})
        valid = (entry.get("onnx_sha256") == src.get("sha256") and entry.get("tensorrt") == tensorrt_version
                 and entry.get("gpu", {}).get("sm") == gpu.sm and _engine_intact(old, plan.engine_dir, name))
        if valid:
            kept[name] = entry
        else:
            log.warning("dropping stale engine %s/%s (graph, TensorRT or GPU changed); rebuild it with --components %s",
                        plan.source.name, name, name)
    return kept


def _engine_intact(manifest: Manifest, engine_dir: Path, name: str) -> bool:
    """The engine and sidecar of ``name`` are inside ``engine_dir`` and match what the manifest recorded."""
    entry = manifest.components[name]
    try:
        manifest.component_path(engine_dir, name)
        resolve_inside(engine_dir, entry.get("sidecar"), f"{engine_dir / MANIFEST_NAME} component {name!r} sidecar")
    except ArtifactError as e:
        log.warning("%s", e.message)
        return False
    return True


def build_engines(
    out: str | Path,
    *,
    precision: str | None = None,
    recipe: str | None = None,
    components: Sequence[str] | str | None = None,
    settings: BuildSettings | None = None,
    gpu: GpuInfo | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Manifest:
    """Build TensorRT engines for the selected graphs into ``OUT/engines/<name>/`` (atomically).

    Order: plan from manifests -> format gate on the GPU -> TensorRT import -> build each engine
    into a staging dir (plus sidecar) -> manifest -> rename. ``gpu`` overrides detection.
    """
    from pi05_export import trt

    plan = plan_build(out, precision=precision, recipe=recipe, components=components, settings=settings)
    gpu = gpu or detect_gpu()
    if gpu is not None:
        check_hardware(plan.source.formats, gpu, what=plan.source.what)
    trt_version = trt.require_tensorrt()
    if gpu is None:
        raise HardwareError("no CUDA GPU is visible, TensorRT builds engines on the GPU that will run them",
                            hint="run build on the target GPU (check nvidia-smi / CUDA_VISIBLE_DEVICES)")
    kept = _kept_components(plan, gpu, trt_version)
    keep_files = tuple(name for entry in kept.values() for name in (entry["path"], entry["sidecar"]))
    plan.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    src_manifest = plan.source.directory / MANIFEST_NAME
    manifest = Manifest(
        stage="build",
        config=plan.source.manifest.config,
        source=plan.source.manifest.source,
        components=dict(kept),
        precision=plan.source.manifest.precision,
        opset=plan.source.manifest.opset,
        recipe=plan.source.manifest.recipe,
        inputs={"manifest": _rel(src_manifest, plan.out), "sha256": sha256_file(src_manifest)},
        extra={"name": plan.source.name, "formats": list(plan.source.formats), "gpu": gpu.to_dict(), "tensorrt": trt_version,
               "settings": settings_dict(plan.settings, plan.timing_cache)},
        tools={**tool_versions(), "tensorrt": trt_version},
    )
    with staging_dir(plan.engine_dir, stage="build", keep=keep_files) as tmp:
        for i, engine in enumerate(plan.engines):
            if progress:
                progress(engine.component, i, len(plan.engines))
            log.info("building %s/%s (opt level %d, profile %s)", plan.source.name, engine.component,
                     plan.settings.opt_level, profile_dict(engine.profile) or "static")
            start = time.perf_counter()
            built = trt.build_engine(
                engine.onnx, tmp / engine.engine.name, profile=engine.profile, opt_level=plan.settings.opt_level,
                workspace_bytes=plan.settings.workspace_bytes, timing_cache=plan.timing_cache,
            )
            seconds = time.perf_counter() - start
            if built.timing_cache is not None:  # persist after every engine: a later failure keeps the tactics
                atomic_write(plan.timing_cache, built.timing_cache)
            sidecar = engine_sidecar(plan, engine, engine_file=tmp / engine.engine.name, gpu=gpu, tensorrt_version=trt_version,
                                     build_seconds=seconds, layers=built.layers)
            atomic_write(tmp / engine.sidecar.name, json.dumps(sidecar, indent=2))
            manifest.components[engine.component] = {
                "path": engine.engine.name,
                "sidecar": engine.sidecar.name,
                "onnx": sidecar["onnx"],
                "onnx_sha256": engine.onnx_sha256,
                "inputs": sidecar["inputs"],
                "outputs": sidecar["outputs"],
                "dynamic_dims": sorted({d for t in engine.inputs for d in t.shape if isinstance(d, str)}),
                "profile": sidecar["profile"],
                "sha256": sidecar["engine_sha256"],
                "bytes": sidecar["engine_bytes"],
                "files": {engine.engine.name: {"bytes": sidecar["engine_bytes"], "sha256": sidecar["engine_sha256"],
                                               "sampled_sha256": sampled_sha256(tmp / engine.engine.name)}},
                "build_seconds": sidecar["build_seconds"],
                "tensorrt": trt_version,
                "gpu": gpu.to_dict(),
            }
            log.info("  %s: %.1f MB in %.1fs", engine.component, sidecar["engine_bytes"] / 1e6, seconds)
        if progress:
            progress("done", len(plan.engines), len(plan.engines))
        manifest.write(tmp)
    return manifest
