"""ONNX export: ONE generic loop over :data:`pi05_export.components` -> ``OUT/onnx/*.onnx``.

Precision lives in the graph: ``fp16``/``bf16`` exports a model cast with openpi's dtype policy, so
the ONNX carries fp16/bf16 tensors with fp32 islands (norm statistics, softmax, RoPE, the time
embedding and the four action/time projections) and TensorRT can build it strongly typed.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pi05_export.artifacts import (
    MANIFEST_NAME,
    REPORTS_SUBDIR,
    Manifest,
    external_data_path,
    graph_files,
    sha256_graph,
    staging_dir,
    writing,
)
from pi05_export.components import (
    ALL_COMPONENTS,
    BATCH,
    NUM_IMAGES,
    Component,
    ComponentSpec,
    component_specs,
    example_inputs,
)
from pi05_export.dtypes import PRECISIONS, graph_dtype
from pi05_export.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

# Opset 19: float8 QuantizeLinear/DequantizeLinear, parsed by TensorRT 10.13 (JetPack 7 on Jetson
# Thor) and 11.x. Attention stays explicit MatMul/Softmax (no opset-23 `Attention` node, which
# TensorRT parses only from 10.14), so one default serves both. NVFP4 graphs need opset 23.
DEFAULT_OPSET = 19
ONNX_SUBDIR = "onnx"
MAX_DYNAMIC = 4096
_ONNX_DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7, "bool": 9}  # onnx.TensorProto enums


def parse_components(names: Sequence[str] | str | None) -> list[Component]:
    """Component names (list or comma-separated) -> ordered unique Components; error lists valid ones."""
    if names is None:
        return list(ALL_COMPONENTS)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[Component] = []
    for raw in names:
        for n in str(raw).split(","):
            n = n.strip()
            try:
                c = Component(n)
            except ValueError:
                valid = ", ".join(c.value for c in ALL_COMPONENTS)
                raise ConfigError(f"unknown component {n!r}", hint=f"valid components: {valid}") from None
            if c not in out:
                out.append(c)
    if not out:
        raise ConfigError("no components given", hint="e.g. --components vision,llm,denoise")
    return out


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs per-op chatter (and torchvision notices) at WARNING; keep our output clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def export_component(model: Any, component: Component, path: Path, *, compute_dtype: str, opset: int) -> dict[str, Any]:
    """Export one component to ``path`` (+ ``path.data``); returns its manifest entry. The graph is traced
    from the model's plain form (:func:`pi05_export.model.pi05.plain_form`), also for a model the torch
    runtime has fused or switched to SDPA."""
    from pi05_export.model.pi05 import plain_form

    with plain_form(model):
        return _export_component(model, component, path, compute_dtype=compute_dtype, opset=opset)


def _export_component(model: Any, component: Component, path: Path, *, compute_dtype: str, opset: int) -> dict[str, Any]:
    import onnx

    cfg = model.config
    spec = component_specs(cfg, compute_dtype)[component]
    wrapper = spec.graph_module(model)
    example = example_inputs(spec, cfg, batch=2)
    args = tuple(example[t.name] for t in spec.inputs)
    start = time.perf_counter()
    with _quiet_exporter(), torch.no_grad(), writing(path):
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes(spec),
            opset_version=opset,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(path))  # by path: works for graphs over 2 GB
    proto = onnx.load(str(path), load_external_data=False)
    check_graph_io(proto, spec)
    return component_entry(path, spec, seconds)


def check_graph_io(proto: Any, spec: ComponentSpec) -> None:
    """The exported graph's input/output names and dtypes are the spec's (a mismatch is a bug, not a user error)."""
    from onnx import helper

    def io(values: Any) -> list[tuple[str, str]]:
        return [(v.name, helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in values]

    def want(tensors: Sequence[Any]) -> list[tuple[str, str]]:  # numpy has no bfloat16: onnx maps it to ml_dtypes'
        return [(t.name, helper.tensor_dtype_to_np_dtype(_ONNX_DTYPES[t.dtype]).name) for t in tensors]

    got, expected = (io(proto.graph.input), io(proto.graph.output)), (want(spec.inputs), want(spec.outputs))
    if got != expected:
        raise RuntimeError(f"{spec.name.value}: exported I/O {got} != spec {expected}")


def dynamic_shapes(spec: ComponentSpec) -> dict[str, Any]:
    """torch.export dynamic shapes: exactly the spec's named dims (batch, num_images) are dynamic."""
    dims = {d: torch.export.Dim(d, min=1, max=MAX_DYNAMIC) for d in (BATCH, NUM_IMAGES)}
    return {t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None for t in spec.inputs}


def component_entry(path: Path, spec: ComponentSpec, seconds: float) -> dict[str, Any]:
    """The manifest entry of one exported graph (shared by the onnx and quantize stages)."""
    data = external_data_path(path)
    files = graph_files(path, ONNX_SUBDIR)
    return {
        "path": f"{ONNX_SUBDIR}/{path.name}",
        "external_data": f"{ONNX_SUBDIR}/{data.name}" if data.exists() else None,
        "files": files,
        "description": spec.description,
        "inputs": [t.to_dict() for t in spec.inputs],
        "outputs": [t.to_dict() for t in spec.outputs],
        "dynamic_dims": sorted(spec.dynamic_dims),
        "sha256": sha256_graph(path, files),
        "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
        "export_seconds": round(seconds, 2),
    }


def check_export_options(precision: str, opset: int) -> None:
    """Validate options before any (possibly minutes-long) model loading."""
    if precision not in PRECISIONS:  # the short names only: they become the manifest's precision
        raise ConfigError(f"unknown precision {precision!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
    if not 17 <= opset <= 23:
        raise ConfigError(f"opset {opset} is not supported", hint="use an opset between 17 and 23 (default 19)")


def _downstream_entries(out: Path) -> list[str]:
    """What later stages wrote into a previous export (quantized sets, engines): kept, not deleted, since
    they are costly to remake and every reader checks them against the graphs' hashes. Validation reports
    are not kept: a PASS about graphs that no longer exist would mislead, and `validate` remakes them."""
    try:
        Manifest.read(out, stage="onnx")
    except ArtifactError:  # no previous export here (staging_dir decides whether out may be replaced)
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in (ONNX_SUBDIR, MANIFEST_NAME, REPORTS_SUBDIR))


def export_onnx(
    model: Any,
    out_dir: str | Path,
    *,
    source: dict[str, Any],
    components: Sequence[str] | str | None = None,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    keep_fp32: Sequence[str] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> Manifest:
    """Export ``components`` of ``model`` into ``out_dir`` (replaced atomically) and return the manifest.

    ``model`` is cast in place to ``precision`` with openpi's dtype policy; ``keep_fp32`` module globs
    stay fp32 too (:func:`pi05_export.model.pi05.apply_dtype_policy`; recorded as ``extra.keep_fp32``,
    which ``inspect`` reads as declared fp32 islands). ConfigError for a glob that matches no module.
    ``progress(component, index, total)`` is called before each component.
    """
    from pi05_export.model.pi05 import apply_dtype_policy

    check_export_options(precision, opset)
    selected = parse_components(components)
    apply_dtype_policy(model, PRECISIONS[precision], keep_fp32)
    compute_dtype = graph_dtype(precision)
    manifest = Manifest(
        stage="onnx",
        config=model.config.to_dict(),
        source=source,
        precision=precision,
        opset=opset,
        extra={"keep_fp32": list(keep_fp32)} if keep_fp32 else {},
    )
    downstream = _downstream_entries(Path(out_dir))
    if (Path(out_dir) / REPORTS_SUBDIR).is_dir() and (Path(out_dir) / MANIFEST_NAME).is_file():
        log.warning("the previous validation reports in %s go with the previous graphs: re-run `pi05-export validate`",
                    Path(out_dir) / REPORTS_SUBDIR)
    if downstream:
        log.warning("keeping %s from the previous export in %s: they were made from the previous graphs; "
                    "re-run quantize/build/validate (build and the TensorRT runtime refuse engines of other graphs)",
                    ", ".join(downstream), out_dir)
    with staging_dir(out_dir, stage="onnx", keep=downstream) as tmp:
        (tmp / ONNX_SUBDIR).mkdir()
        for i, comp in enumerate(selected):
            if progress:
                progress(comp.value, i, len(selected))
            log.info("exporting %s (%s, opset %d)", comp.value, precision, opset)
            entry = export_component(model, comp, tmp / ONNX_SUBDIR / f"{comp.value}.onnx", compute_dtype=compute_dtype, opset=opset)
            manifest.components[comp.value] = entry
            log.info("  %s: %.1f MB in %.1fs", comp.value, entry["bytes"] / 1e6, entry["export_seconds"])
        if progress:
            progress("done", len(selected), len(selected))
        manifest.write(tmp)
    return manifest
