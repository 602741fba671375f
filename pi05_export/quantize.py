"""ModelOpt PTQ driver: recipe -> ModelOpt quant config -> calibration over the sampling loop -> Q/DQ ONNX.

``quantize_model`` resolves a recipe against the model, inserts quantizers with ``mtq.quantize`` and
calibrates them by running :meth:`Pi05Model.sample_actions` (every denoising step, so the expert sees
every timestep) over calibration observations, checks coverage, then exports one ONNX graph per
component into ``OUT/<recipe>/``:

- FP8: standard ``QuantizeLinear``/``DequantizeLinear`` with float8e4m3fn (opset 19): the weights are
  stored as FP8 initializers, activations get a calibrated per-tensor scale. ONNX Runtime runs these
  graphs on CPU and TensorRT (10.x strongly typed, 11.x) parses them.
- NVFP4 (opset 23): weights stored as FLOAT4E2M1 initializers with FP8 block scales and an fp32
  global scale (two chained ``DequantizeLinear``, block 16); activations use TensorRT's
  ``trt::TRT_FP4DynamicQuantize`` followed by the same two ``DequantizeLinear`` (ModelOpt's layout).
  ONNX Runtime has no FP4, so :func:`runnable_onnx` writes an emulation copy (dequantized weights,
  activation quantization spelled out in standard ops) for CPU validation.

The export goes through ``torch.onnx.export(dynamo=True)`` with project custom ops for the quantized
Linear layers and a custom translation table; constant folding is told to leave Q/DQ nodes alone so
low-precision weights stay low precision.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pi05_export import nvfp4
from pi05_export.artifacts import (
    MANIFEST_NAME,
    Manifest,
    external_data_path,
    graph_files,
    load_graph,
    resolve_inside,
    sha256_file,
    staging_dir,
    writing,
)
from pi05_export.components import Component, component_specs, example_inputs
from pi05_export.dtypes import graph_dtype, torch_dtype
from pi05_export.errors import ArtifactError, ConfigError, RecipeError
from pi05_export.export import (
    DEFAULT_OPSET,
    ONNX_SUBDIR,
    _quiet_exporter,
    check_graph_io,
    component_entry,
    dynamic_shapes,
    export_component,
    parse_components,
)
from pi05_export.observation import Observation
from pi05_export.recipe import (
    FORMAT_LABEL,
    GPUS_FOR,
    MIN_COMPUTE_CAPABILITY,
    QUANT_FORMATS,
    Recipe,
    ResolvedRecipe,
    default_exclusion_hits,
    modelopt_config,
    resolve_recipe,
)

log = logging.getLogger(__name__)

DOMAIN = "pi05_export"
FP4_OPSET = 23  # FLOAT4E2M1 + blocked DequantizeLinear
FP8_MAX = 448.0
FLOAT8E4M3FN = 17
FLOAT4E2M1 = 23
EMULATED_SUFFIX = ".emulated.onnx"


# ---------------------------------------------------------------------------------------------
# Custom ops for export (eager kernels = the exact math the ONNX graphs compute)
# ---------------------------------------------------------------------------------------------
@functools.cache
def _register_ops() -> None:
    """Define the project's quantization ops and their ONNX schemas once per process."""
    import onnx
    from onnx.defs import OpSchema

    @torch.library.custom_op(f"{DOMAIN}::fp8_qdq", mutates_args=())
    def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return (q.float() * scale).to(x.dtype)

    @torch.library.custom_op(f"{DOMAIN}::fp8_dequantize", mutates_args=())
    def fp8_dequantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # DequantizeLinear: y has the scale's type
        return (w.float() * scale.float()).to(scale.dtype)

    @torch.library.custom_op(f"{DOMAIN}::nvfp4_qdq", mutates_args=())
    def nvfp4_qdq(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return nvfp4.nvfp4_fake_quant(x, amax)

    @torch.library.custom_op(f"{DOMAIN}::nvfp4_dequantize", mutates_args=())
    def nvfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        return nvfp4.dequantize_weight(packed, scale, gs)

    fp8_qdq.register_fake(lambda x, scale: torch.empty_like(x))
    fp8_dequantize.register_fake(lambda w, scale: torch.empty(w.shape, dtype=scale.dtype, device=w.device))
    nvfp4_qdq.register_fake(lambda x, amax: torch.empty_like(x))
    nvfp4_dequantize.register_fake(
        lambda p, s, g: torch.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=torch.float32, device=p.device))

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    for name, ins in (("NvFp4QDQ", [("x", "T"), ("amax", "tensor(float)")]),
                      ("NvFp4Weight", [("packed", "tensor(uint8)"), ("scale", "tensor(float8e4m3fn)"), ("gs", "tensor(float)")])):
        if not onnx.defs.has(name, DOMAIN):
            onnx.defs.register_schema(OpSchema(
                name, DOMAIN, 1, inputs=[OpSchema.FormalParameter(n, t) for n, t in ins],
                outputs=[OpSchema.FormalParameter("y", "T" if name == "NvFp4QDQ" else "tensor(float)")],
                type_constraints=[("T", floats, "")] if name == "NvFp4QDQ" else []))


def _translation_table(opset: int) -> dict[Any, Callable[..., Any]]:
    import onnx
    import onnxscript
    from onnxscript.values import Op, Opset

    op = onnxscript.opset23 if opset >= 23 else onnxscript.opset19
    custom = Opset(DOMAIN, 1)

    def fp8_qdq(x, scale):  # type: ignore[no-untyped-def]
        zp = op.Cast(op.Constant(value_float=0.0), to=onnx.TensorProto.FLOAT8E4M3FN)
        y = op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)
        return y

    def fp8_dequantize(w, scale):  # type: ignore[no-untyped-def]
        return op.DequantizeLinear(w, scale)

    def nvfp4_qdq(x, amax):  # type: ignore[no-untyped-def]
        return Op(custom, "NvFp4QDQ")(x, amax)

    def nvfp4_dequantize(packed, scale, gs):  # type: ignore[no-untyped-def]
        return Op(custom, "NvFp4Weight")(packed, scale, gs)

    ops = getattr(torch.ops, DOMAIN)
    return {ops.fp8_qdq.default: fp8_qdq, ops.fp8_dequantize.default: fp8_dequantize,
            ops.nvfp4_qdq.default: nvfp4_qdq, ops.nvfp4_dequantize.default: nvfp4_dequantize}


class QdqLinear(nn.Module):
    """A calibrated quantized Linear in its deployable form: low-precision weight buffers + activation scale.

    ``dtype`` is the layer's high-precision type (the typed graph's fp16/bf16, or fp32 on the keep-list):
    its input and output, and the FP8 scales (so each ``DequantizeLinear`` yields ``dtype`` and feeds a
    ``dtype`` x ``dtype`` MatMul). The NVFP4 weight and activation dequantize in fp32 (fp32 global
    scale) and are cast to ``dtype`` before the MatMul, ModelOpt's NVFP4 ONNX layout.
    """

    def __init__(self, linear: Any, fmt: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _register_ops()
        self.fmt = fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().cpu()
        w_amax = _amax(linear.weight_quantizer, w)
        x_amax = _amax(linear.input_quantizer, None)
        if fmt == "fp8":
            scale = fp8_scale(w_amax, dtype)
            self.register_buffer("weight_fp8", (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
            self.register_buffer("weight_scale", scale)
            self.register_buffer("input_scale", fp8_scale(x_amax, dtype))
        else:
            packed, s8, gs = nvfp4.quantize_weight(w, w_amax)
            self.register_buffer("weight_fp4", packed)
            self.register_buffer("weight_block_scale", s8)
            self.register_buffer("weight_global_scale", gs.reshape(()))
            self.register_buffer("input_amax", x_amax.float().reshape(()))
        # The model reads ``<linear>.weight.dtype`` to pick its compute dtype; keep that answerable.
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = getattr(torch.ops, DOMAIN)
        if self.fmt == "fp8":
            w = ops.fp8_dequantize(self.weight_fp8, self.weight_scale)
            x = ops.fp8_qdq(x, self.input_scale)
        else:
            w = ops.nvfp4_dequantize(self.weight_fp4, self.weight_block_scale, self.weight_global_scale)
            x = ops.nvfp4_qdq(x, self.input_amax)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _amax(quantizer: Any, fallback: torch.Tensor | None) -> torch.Tensor:
    amax = getattr(quantizer, "amax", None)
    if amax is None:  # never reached by the sampling loop (e.g. the prefix LLM's last o_proj/MLP): unused
        amax = fallback.abs().amax() if fallback is not None else torch.tensor(FP8_MAX)
    return amax.detach().float().cpu().reshape(())


def _safe(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 1.0 / (1 << 24), amax, torch.ones_like(amax))


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-tensor FP8 scale ``amax / 448`` as a ``dtype`` scalar (the Q/DQ high-precision type):
    rounded up to the next ``dtype`` value, so values within amax never saturate, and at least ``dtype``'s
    smallest normal. Weights are quantized with this rounded scale, so they dequantize exactly to it."""
    exact = _safe(amax) / FP8_MAX
    scale = exact.to(dtype)
    if scale.float() < exact:
        scale = torch.nextafter(scale, torch.tensor(float("inf"), dtype=dtype))
    if not torch.isfinite(scale):
        raise RecipeError(f"an FP8 scale of {float(exact):.3g} does not fit the {dtype} Q/DQ type (amax {float(amax):.3g})",
                          hint="quantize with --precision bf16 (fp32's exponent range), or keep that layer out of FP8")
    return scale.clamp(min=torch.finfo(dtype).tiny)


# ---------------------------------------------------------------------------------------------
# Quantizer insertion, calibration, coverage
# ---------------------------------------------------------------------------------------------
def calibration_loop(observations: Sequence[Observation], steps: int | None, progress: Callable[[str, int, int], None] | None = None):  # type: ignore[no-untyped-def]
    """ModelOpt ``forward_loop``: the real sampling loop (all denoising steps) over every observation."""

    def loop(model: Any) -> None:
        device = next(model.parameters()).device
        for i, obs in enumerate(observations):
            if progress:
                progress("calibrate", i, len(observations))
            t: dict[str, Any] = {k: v.to(device) for k, v in obs.torch().items()}  # type: ignore[attr-defined]
            model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t.get("noise"), num_steps=steps)

    return loop


def insert_quantizers(model: Any, resolved: ResolvedRecipe, forward_loop: Callable[[Any], None], *,
                      defaults_last: bool = False) -> Any:
    """``mtq.quantize`` with the compiled recipe; NVFP4 uses the project emulation when CUDA is absent."""
    import modelopt.torch.quantization as mtq

    backend = None
    if resolved.layers("fp4") and not next(model.parameters()).is_cuda:
        backend = nvfp4.register_emulation_backend()
        log.info("no CUDA: NVFP4 quantizers use the project's emulation (%s)", backend)
    cfg = modelopt_config(resolved, nvfp4_backend=backend, defaults_last=defaults_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ModelOpt's deprecation/compat chatter
        return mtq.quantize(model, cfg, forward_loop)


def quantized_format(module: nn.Module) -> str | None:
    """'fp8' / 'nvfp4' if ModelOpt quantizes this module's weight and input, else None."""
    wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
    if wq is None or iq is None or not (wq.is_enabled and iq.is_enabled):
        return None
    bits = tuple(wq.num_bits) if isinstance(wq.num_bits, (tuple, list)) else wq.num_bits
    return {(4, 3): "fp8", (2, 1): "nvfp4"}.get(bits)  # type: ignore[arg-type]


def measure_coverage(model: Any, resolved: ResolvedRecipe) -> dict[str, dict[str, int]]:
    """Per component, Linear layers per format as actually quantized; RecipeError if ModelOpt skipped any."""
    modules = dict(model.named_modules())
    counts: dict[str, dict[str, int]] = {}
    skipped = []
    for name, fmt in resolved.formats.items():
        got = quantized_format(modules[name])
        want = FORMAT_LABEL.get(fmt)
        if want is not None and got != want:
            skipped.append(name)
        label = got or fmt
        comp = counts.setdefault(resolved.components[name], {})
        comp[label] = comp.get(label, 0) + 1
    if skipped:
        hits = default_exclusion_hits(skipped)
        why = f" (ModelOpt default exclusion {sorted(set(hits.values()))})" if hits else ""
        raise RecipeError(
            f"recipe {resolved.recipe.name} asked to quantize {len(skipped)} layer(s) that ModelOpt left unquantized{why}, "
            f"e.g. {skipped[0]}",
            hint="the recipe's rules must come after ModelOpt's default exclusions; check the quant config order",
        )
    return {c: dict(sorted(v.items())) for c, v in sorted(counts.items())}


def uncalibrated_layers(model: Any, resolved: ResolvedRecipe) -> list[str]:
    """Quantized layers whose input quantizer saw no data: not on any inference path (the prefix
    LLM's last layer only produces K/V, so its o_proj and MLP never run and are not exported)."""
    modules = dict(model.named_modules())
    return [n for n, f in resolved.formats.items()
            if f in QUANT_FORMATS and getattr(getattr(modules[n], "input_quantizer", None), "amax", None) is None]


def lower_quantized(model: Any, resolved: ResolvedRecipe, dtype: torch.dtype = torch.float32,
                    keep_fp32: Sequence[str] = ()) -> int:
    """Replace every quantized ModelOpt Linear by its deployable :class:`QdqLinear` (in place), typed
    ``dtype`` under the same policy as every other layer (:func:`pi05_export.model.pi05.policy_dtype`)."""
    from pi05_export.model.pi05 import policy_dtype

    n = 0
    for name, fmt in resolved.formats.items():
        if fmt not in QUANT_FORMATS:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        typed = policy_dtype(f"{name}.weight", dtype, keep_fp32)
        setattr(parent, child, QdqLinear(getattr(parent, child), fmt, typed).to(next(model.parameters()).device))
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export_quantized_component(model: Any, component: Component, path: Path, *, compute_dtype: str, opset: int) -> dict[str, Any]:
    """Dynamo export with the custom translation table; Q/DQ nodes are never constant-folded.
    ``compute_dtype``: the typed graph's activation dtype (``model`` already cast to it by the policy)."""
    import onnx
    import onnxscript.optimizer

    _register_ops()
    cfg = model.config
    spec = component_specs(cfg, compute_dtype)[component]
    wrapper = spec.graph_module(model)
    example = example_inputs(spec, cfg, batch=2)
    args = tuple(example[t.name] for t in spec.inputs)
    start = time.perf_counter()
    with _quiet_exporter(), torch.no_grad():
        prog = torch.onnx.export(
            wrapper, args, input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes(spec), opset_version=opset, dynamo=True, optimize=False, verbose=False,
            custom_translation_table=_translation_table(opset),
        )
        assert prog is not None  # dynamo export without a path returns the program
        keep = {"QuantizeLinear", "DequantizeLinear", "NvFp4QDQ", "NvFp4Weight"}
        onnxscript.optimizer.optimize_ir(prog.model, should_fold=lambda node: False if node.op_type in keep else None)
        with writing(path):
            prog.save(str(path), external_data=True)
    del prog
    gc.collect()
    fp4 = _finalize_fp4(path)
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(path)) if not fp4 else None  # trt:: ops have no schema in onnx
    check_graph_io(onnx.load(str(path), load_external_data=False), spec)
    entry = {**component_entry(path, spec, seconds), "opset": opset}
    if fp4:
        emulated = runnable_onnx(path)
        entry["runnable_path"] = f"{ONNX_SUBDIR}/{emulated.name}"
        entry["files"].update(graph_files(emulated, ONNX_SUBDIR))  # checked on every read like the graph
    return entry


def _finalize_fp4(path: Path) -> bool:
    """Rewrite the project placeholders into the NVFP4 layout TensorRT parses. Returns True if any."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    if not any(n.domain == DOMAIN for n in g.node):
        return False
    inits = {i.name: i for i in g.initializer}
    consts = _constant_values(model, path)
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    nodes = []
    for n in g.node:
        if n.domain != DOMAIN:
            nodes.append(n)
            continue
        tag = n.output[0]
        if n.op_type == "NvFp4Weight":
            packed, scale, gs = n.input
            w = inits[packed]
            w.data_type, w.dims[-1] = FLOAT4E2M1, w.dims[-1] * 2
            nodes.append(helper.make_node("DequantizeLinear", [scale, gs], [f"{tag}_scale"], name=f"{tag}_dq_scale"))
            nodes.append(helper.make_node("DequantizeLinear", [packed, f"{tag}_scale"], [tag], name=f"{tag}_dq",
                                          axis=-1, block_size=nvfp4.BLOCK))
        else:  # NvFp4QDQ(x, amax): TensorRT's dynamic FP4 activation quantization
            x, amax = n.input
            gs = float(nvfp4.global_scale(torch.tensor(consts[amax])))
            g.initializer.append(helper.make_tensor(f"{tag}_gs", TensorProto.FLOAT, [], [gs]))
            nodes.append(helper.make_node("TRT_FP4DynamicQuantize", [x, f"{tag}_gs"], [f"{tag}_x4", f"{tag}_s8"],
                                          name=f"{tag}_fp4q", domain="trt", axis=-1, block_size=nvfp4.BLOCK,
                                          scale_type=FLOAT8E4M3FN))
            nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_s8", f"{tag}_gs"], [f"{tag}_scale"], name=f"{tag}_dq_scale"))
            # the block DQ yields fp32 (its scale's type); a typed graph casts it back to x's fp16/bf16, as
            # ModelOpt's NVFP4 exporter does before the MatMul
            typed = types.get(tag, TensorProto.FLOAT) not in (TensorProto.FLOAT, TensorProto.UNDEFINED)
            dq_out = f"{tag}_f32" if typed else tag
            nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_x4", f"{tag}_scale"], [dq_out], name=f"{tag}_dq",
                                          axis=-1, block_size=nvfp4.BLOCK))
            if typed:
                nodes.append(helper.make_node("Cast", [dq_out], [tag], name=f"{tag}_cast", to=types[tag]))
    del g.node[:]
    g.node.extend(nodes)
    retyped = {i.name for i in g.initializer if i.data_type == FLOAT4E2M1}  # their uint8 value_info is stale
    kept_info = [v for v in g.value_info if v.name not in retyped]
    del g.value_info[:]
    g.value_info.extend(kept_info)
    _set_opsets(model, {DOMAIN: None, "trt": 1})
    with writing(path):
        onnx.save(model, str(path))
    return True


def _constant_values(model: Any, path: Path) -> dict[str, Any]:
    """Small initializers (scalars) as numpy arrays, external data resolved."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    out = {}
    for init in model.graph.initializer:
        if len(init.dims) == 0 and init.data_type == 1:
            t = type(init)()
            t.CopyFrom(init)
            if t.data_location == 1:
                load_external_data_for_tensor(t, str(path.parent))
            out[init.name] = numpy_helper.to_array(t)
    return out


def _set_opsets(model: Any, domains: dict[str, int | None]) -> None:
    from onnx import helper

    keep = [o for o in model.opset_import if o.domain not in domains]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in domains.items() if v is not None)


def runnable_onnx(path: str | Path) -> Path:
    """An ONNX Runtime-runnable variant of a quantized graph: ``path`` itself if it already runs (FP8
    Q/DQ), else a sibling ``<name>.emulated.onnx`` where FP4 weights are dequantized to fp32 and
    ``TRT_FP4DynamicQuantize`` is replaced by the same NVFP4 math in standard ONNX ops."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    if path.name.endswith(EMULATED_SUFFIX):
        return path
    model = load_graph(path)
    g = model.graph
    if not any(n.domain == "trt" for n in g.node):
        return path
    out = path.with_name(path.name[: -len(".onnx")] + EMULATED_SUFFIX)
    if out.exists() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    onnx.load_external_data_for_model(model, str(path.parent))
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    drop: set[int] = set()
    new_inits = []
    replace: dict[int, list[Any]] = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == FLOAT4E2M1:
            w4 = inits[n.input[0]]
            dq_scale = producers[n.input[1]]
            s8 = torch.from_numpy(numpy_helper.to_array(inits[dq_scale.input[0]]).view("uint8").copy()).view(torch.float8_e4m3fn)
            gs = torch.from_numpy(numpy_helper.to_array(inits[dq_scale.input[1]]).astype("float32"))
            packed = torch.frombuffer(bytearray(w4.raw_data), dtype=torch.uint8).reshape(*w4.dims[:-1], w4.dims[-1] // 2)
            w = nvfp4.dequantize_weight(packed, s8, gs)
            new_inits.append(numpy_helper.from_array(w.numpy(), n.output[0]))
            drop.update({id(n), id(dq_scale)})
        elif n.op_type == "TRT_FP4DynamicQuantize":
            x, gs_name = n.input
            tag = n.name
            dq_scale = next(m for m in g.node if m.op_type == "DequantizeLinear" and m.input[0] == n.output[1])
            dq = next(m for m in g.node if m.op_type == "DequantizeLinear" and m.input[0] == n.output[0])
            replace[id(n)] = _emulation_nodes(tag, x, gs_name, dq.output[0], new_inits)
            drop.update({id(dq_scale), id(dq)})
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes.extend(replace[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep_inits = [i for i in g.initializer if i.name in used and i.data_type != FLOAT4E2M1]
    del g.initializer[:]
    g.initializer.extend(keep_inits + [i for i in new_inits if i.name in used or i.name in {o for n in nodes for o in n.output}])
    # fp32 weights replace DQ outputs: they are initializers now, not node outputs
    _set_opsets(model, {"trt": None})
    data_name = external_data_path(out).name
    (out.parent / data_name).unlink(missing_ok=True)
    with writing(out):
        onnx.save(model, str(out), save_as_external_data=True, location=data_name, size_threshold=1024)
    del helper, TensorProto
    return out


def _emulation_nodes(tag: str, x: str, gs: str, y: str, inits: list[Any]) -> list[Any]:
    """NVFP4 quantize-dequantize of ``x`` (blocks of 16 on the last axis) in standard ONNX ops."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def c(name: str, value: Any, dtype: Any = np.float32) -> str:
        full = f"{tag}_{name}"
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), full))
        return full

    t = lambda s: f"{tag}_{s}"  # noqa: E731
    zp = f"{tag}_zp"
    inits.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    mk = helper.make_node
    return [
        mk("Cast", [x], [t("x32")], to=TensorProto.FLOAT),  # the math in fp32, whatever x's type (as TensorRT's kernel)
        mk("Shape", [x], [t("shape")]),
        mk("Reshape", [t("x32"), c("blk", [-1, nvfp4.BLOCK], np.int64)], [t("xb")]),
        mk("Abs", [t("xb")], [t("ab")]),
        mk("ReduceMax", [t("ab"), c("ax", [1], np.int64)], [t("bmax")], keepdims=1),
        mk("Mul", [gs, c("six", nvfp4.E2M1_MAX)], [t("gs6")]),
        mk("Div", [t("bmax"), t("gs6")], [t("s")]),
        mk("Min", [t("s"), c("fp8max", nvfp4.E4M3_MAX)], [t("ssat")]),
        mk("QuantizeLinear", [t("ssat"), c("one", 1.0), zp], [t("s8")]),
        mk("DequantizeLinear", [t("s8"), t("one"), zp], [t("s8f")]),
        mk("Mul", [t("s8f"), gs], [t("dq0")]),
        mk("GreaterOrEqual", [t("dq0"), c("minscale", nvfp4.MIN_SCALE)], [t("ok")]),
        mk("Where", [t("ok"), t("dq0"), t("one")], [t("dq")]),
        mk("Div", [t("ab"), t("dq")], [t("m0")]),
        mk("Min", [t("m0"), t("six")], [t("m")]),
        mk("Less", [t("m"), c("two", 2.0)], [t("lt2")]),
        mk("Less", [t("m"), c("four", 4.0)], [t("lt4")]),
        mk("Where", [t("lt4"), t("one"), t("two")], [t("step1")]),
        mk("Where", [t("lt2"), c("half", 0.5), t("step1")], [t("step")]),
        mk("Div", [t("m"), t("step")], [t("r0")]),
        mk("Round", [t("r0")], [t("r")]),
        mk("Mul", [t("r"), t("step")], [t("q")]),
        mk("Neg", [t("q")], [t("nq")]),
        mk("GreaterOrEqual", [t("xb"), c("zero", 0.0)], [t("pos")]),
        mk("Where", [t("pos"), t("q"), t("nq")], [t("qs")]),
        mk("Mul", [t("qs"), t("dq")], [t("yb")]),
        mk("Reshape", [t("yb"), t("shape")], [y]),
    ]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
@dataclass
class QuantizeReport:
    manifest: Manifest
    out_dir: Path
    coverage: dict[str, dict[str, int]]
    seconds: dict[str, float]


def peak_rss_gib() -> float:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def action_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _sample(model: Any, observations: Sequence[Observation], steps: int | None) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for obs in observations:
        obs = obs.with_noise(model.config, seed=0)
        t = {k: v.to(device) for k, v in obs.torch().items()}  # type: ignore[attr-defined]
        out.append(model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"],
                                        noise=t.get("noise"), num_steps=steps).float().cpu())
    return out


def _free(module: nn.Module) -> None:
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
    for name, b in module.named_buffers():
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, torch.empty(0, dtype=b.dtype))
    gc.collect()


def quantize_model(
    model: Any,
    recipe: Recipe,
    out: str | Path,
    *,
    source: dict[str, Any],
    calibration: Sequence[Observation] = (),
    calibration_info: dict[str, Any] | None = None,
    steps: int | None = None,
    components: Sequence[str] | str | None = None,
    allow_unmatched: bool = False,
    accuracy_samples: int = 2,
    device: str | None = None,
    precision: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantizeReport:
    """Quantize ``model`` with ``recipe``, calibrate, export into ``out/<recipe.name>/`` (atomically).

    The graphs are typed in the recipe's ``base`` precision (``precision`` overrides it; the shipped FP8
    and NVFP4 recipes say bf16): calibration runs on the fp32 model, then the calibrated model is cast with
    the same dtype policy as ``pi05-export onnx --precision`` (:func:`pi05_export.model.pi05.apply_dtype_policy`:
    fp32 islands for norm statistics, softmax, RoPE, the time embedding, the four action/time projections,
    the Euler-facing outputs, plus the recipe's ``format: fp32`` layers) and exported, so every Q/DQ pair's
    high-precision side and every unquantized MatMul is fp16/bf16. ``manifest.precision`` records the base.

    ``out`` is normally a ``pi05-export onnx`` output directory (its manifest is recorded as input
    and must describe the same config); any other directory is created. ``model`` is modified in place.
    The first ``accuracy_samples`` calibration samples are sampled before and after quantization
    (fake-quant PyTorch, same noise and steps) and their action cosine goes into the manifest.
    Calibration runs on ``device`` (default: CUDA when present, where NVFP4 uses ModelOpt's kernels).
    """
    from pi05_export.model.pi05 import apply_dtype_policy

    out = Path(out)
    upstream = out / MANIFEST_NAME
    inputs: dict[str, Any] = {}
    if upstream.is_file():
        up = Manifest.read(out)
        if up.config != model.config.to_dict():
            raise ArtifactError(f"{upstream} describes a different model config than the one being quantized",
                                hint="pass the checkpoint/preset that `pi05-export onnx` exported, or another --out")
        inputs = {"manifest": str(upstream), "sha256": sha256_file(upstream), "stage": up.stage}
    selected = parse_components(components)
    base_from = "recipe" if precision is None or precision == recipe.base else "--precision"
    recipe = recipe.with_base(precision) if precision is not None else recipe
    resolved = resolve_recipe(recipe, model, allow_unmatched=allow_unmatched)
    quantized = bool(resolved.layers("fp8") or resolved.layers("fp4"))
    dtype, keep = torch_dtype(recipe.base), resolved.keep_fp32()
    seconds: dict[str, float] = {}
    rss: dict[str, float] = {"load": peak_rss_gib()}  # cumulative peak RSS (GiB) after each stage
    coverage = resolved.coverage()
    extra: dict[str, Any] = {"base_from": base_from, **({"keep_fp32": keep} if keep else {})}
    if quantized:
        apply_dtype_policy(model, torch.float32)  # calibrate in fp32; the typed cast comes after lowering
        if not calibration:
            raise ConfigError("quantized recipes need calibration samples", hint="pass --calibration DIR or leave it out for the built-in set")
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check = list(calibration[:accuracy_samples])
        start = time.perf_counter()
        reference = _sample(model, check, steps)
        seconds["reference_actions"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        insert_quantizers(model, resolved, calibration_loop(calibration, steps, progress))
        seconds["calibrate"] = round(time.perf_counter() - start, 2)
        rss["calibrate"] = peak_rss_gib()
        coverage = measure_coverage(model, resolved)
        if check:
            start = time.perf_counter()
            got = _sample(model, check, steps)
            seconds["fake_quant_actions"] = round(time.perf_counter() - start, 2)
            extra["fake_quant_action_cosine"] = [round(action_cosine(r, g), 6) for r, g in zip(reference, got, strict=True)]
            log.info("fake-quant action cosine vs unquantized: %s", extra["fake_quant_action_cosine"])
        extra["uncalibrated_layers"] = uncalibrated_layers(model, resolved)
        log.info("calibrated on %d sample(s) x %s steps in %.1fs", len(calibration), steps or model.config.num_steps, seconds["calibrate"])
        start = time.perf_counter()
        lower_quantized(model, resolved, dtype, keep)
        gc.collect()
        seconds["lower"] = round(time.perf_counter() - start, 2)
    apply_dtype_policy(model, dtype, keep)  # the typed export's policy and islands, quantized or not
    formats = resolved.quant_formats()
    opset = FP4_OPSET if "nvfp4" in formats else DEFAULT_OPSET
    compute = graph_dtype(recipe.base)
    manifest = Manifest(stage="quantize", config=model.config.to_dict(), source=source, precision=recipe.base,
                        opset=opset, recipe=resolved.to_dict(), inputs=inputs)
    min_cc = max((MIN_COMPUTE_CAPABILITY[f] for f in formats), key=float, default=None)
    extra.update({
        "coverage": coverage, "formats": formats, "min_compute_capability": min_cc,
        "buildable_on": {f: GPUS_FOR[f] for f in formats} or {"any": "any TensorRT GPU (typed graph, no quantization)"},
        "calibration": {**(calibration_info or {}), "steps": steps or model.config.num_steps} if quantized else None,
        "nvfp4_calibration_backend": ("modelopt" if next(model.parameters()).is_cuda else "emulation") if "nvfp4" in formats else None,
        "layout": "OUT/<recipe>/: onnx/<component>.onnx (+.data); FP4 graphs also onnx/<component>.emulated.onnx for ONNX Runtime",
    })
    dest = resolve_inside(out, recipe.name, f"recipe {recipe.name!r} name", error=RecipeError)
    model.cpu()
    with staging_dir(dest, stage="quantize") as tmp:
        (tmp / ONNX_SUBDIR).mkdir()
        done: set[Component] = set()
        for i, comp in enumerate(selected):
            if progress:
                progress(comp.value, i, len(selected))
            start = time.perf_counter()
            path = tmp / ONNX_SUBDIR / f"{comp.value}.onnx"
            if quantized:
                entry = export_quantized_component(model, comp, path, compute_dtype=compute, opset=opset)
            else:
                entry = export_component(model, comp, path, compute_dtype=compute, opset=opset)
            manifest.components[comp.value] = entry
            seconds[comp.value] = round(time.perf_counter() - start, 2)
            rss[comp.value] = peak_rss_gib()
            log.info("  %s: %.1f MB in %.1fs", comp.value, entry["bytes"] / 1e6, seconds[comp.value])
            done.add(comp)
            _free_unneeded(model, done, selected)
        extra["seconds"] = seconds
        extra["peak_rss_gib"] = rss
        manifest.extra = extra
        if progress:
            progress("done", len(selected), len(selected))
        manifest.write(tmp)
    return QuantizeReport(manifest=manifest, out_dir=dest, coverage=coverage, seconds=seconds)


def _free_unneeded(model: Any, done: set[Component], selected: Sequence[Component]) -> None:
    """Release weights no remaining component needs (full size does not fit twice in 24 GiB)."""
    left = set(selected) - done
    if not left & {Component.vision}:
        _free(model.paligemma_with_expert.paligemma.model.vision_tower)
        _free(model.paligemma_with_expert.paligemma.model.multi_modal_projector)
    if not left & {Component.llm}:
        _free(model.paligemma_with_expert.paligemma.model.language_model)
