"""Graph lint for exported ONNX (``pi05-export inspect``): what TensorRT will see, at a glance.

Besides op counts and constants, a dtype census per graph: how many ops produce each dtype, the input
dtypes of every MatMul/Gemm, and, for fp16/bf16-typed graphs (strongly typed TensorRT runs each op in
the type the graph gives it), every fp32 MatMul/Gemm outside the declared fp32 islands is a problem.
The islands are the layers the dtype policy keeps fp32 (:func:`pi05_export.model.pi05.keeps_fp32`:
openpi's keep-list, i.e. the adaRMS modulation and the four action/time projections, plus the
manifest's ``keep_fp32`` globs); a MatMul is attributed to its layer through the exporter's
``pkg.torch.onnx.name_scopes`` metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.artifacts import load_graph
from pi05_export.errors import ArtifactError

_SMALL = 1 << 20  # scan initializers below 1 MiB for inf/NaN (masks and constants live there)
# Ops whose TensorRT support starts later than TensorRT 10.13 (JetPack 7 on Jetson Thor).
_NEWER_THAN_TRT_10_13 = {"Attention": "10.14", "RMSNormalization": "10.15"}


TYPED = ("float16", "bfloat16")
# Output types of TensorRT plugin ops, which ONNX shape inference cannot know.
_PLUGIN_OUTPUTS = {"TRT_FP4DynamicQuantize": "float4_e2m1fn"}


def node_module(node: Any) -> str | None:
    """The ``Pi05Model.named_modules()`` name of the layer that produced ``node`` (the dynamo exporter's
    ``pkg.torch.onnx.name_scopes`` metadata, innermost module), or None (e.g. attention matmuls, which
    run in the stack's own method). The recipe and ``--keep-fp32`` vocabulary."""
    props = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = json.loads(props.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"'))
    except ValueError:
        return None
    modules = [sc for sc in scopes[:-1] if sc]
    return modules[-1].removeprefix("model.") if modules else None


def _upstream_layers(nodes: Sequence[Any]) -> dict[str, str | None]:
    """Per node name: its own layer (:func:`node_module`), else the layer of the node producing its first
    input, recursively: the attention matmuls, which run in the stack's method (no layer of their own),
    belong to the attention whose q_proj feeds them. Nodes in topological order (as ONNX requires)."""
    producer: dict[str, str] = {o: n.name for n in nodes for o in n.output}
    layer: dict[str, str | None] = {}
    for n in nodes:
        own = node_module(n)
        first = producer.get(n.input[0]) if n.input else None
        layer[n.name] = own if own is not None else (layer.get(first) if first is not None else None)
    return layer


def _graph_paths(path: Path) -> tuple[dict[str, Path], str | None, list[str]]:
    """Graphs, their precision (None for a bare .onnx file) and the manifest's extra fp32 islands."""
    if path.is_file() and path.suffix == ".onnx":
        return {path.stem: path}, None, []
    from pi05_export.artifacts import Manifest

    manifest = Manifest.read(path)
    keep = list((manifest.extra or {}).get("keep_fp32", []))
    return {name: manifest.component_path(path, name) for name in manifest.components}, manifest.precision, keep


def lint_graph(path: Path, precision: str | None = None, keep_fp32: Sequence[str] = ()) -> dict[str, Any]:
    """Lint one graph. ``precision``: the graph's declared type (``fp16``/``bf16`` turns on the island
    check; None: typed if any tensor is fp16/bf16); ``keep_fp32``: extra fp32 island globs."""
    import onnx
    from onnx import numpy_helper

    model = load_graph(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    dtypes: dict[str, str] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        dtypes[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name if vi.type.tensor_type.elem_type else "?"
    init_bytes: Counter[str] = Counter()
    problems: list[str] = []
    for init in g.initializer:
        name = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
        dtypes[init.name] = name
        n = int(np.prod(init.dims)) if init.dims else 1
        init_bytes[name] += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if n * 4 < _SMALL:
            arr = numpy_helper.to_array(init, str(path.parent))
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr.astype(np.float32)).all():
                problems.append(f"initializer {init.name} holds inf/NaN")
    from pi05_export.model.pi05 import keeps_fp32

    ops: Counter[str] = Counter()
    casts: Counter[str] = Counter()
    matmul: Counter[str] = Counter()
    op_dtypes: Counter[str] = Counter()
    fp32_matmuls: list[dict[str, Any]] = []
    upstream = _upstream_layers(g.node)
    for node in g.node:
        ops[node.op_type] += 1
        op_dtypes[_PLUGIN_OUTPUTS.get(node.op_type) or next((dtypes.get(o, "?") for o in node.output if o), "?")] += 1
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            casts[f"{dtypes.get(node.input[0], '?')}->{onnx.helper.tensor_dtype_to_np_dtype(to).name}"] += 1
        elif node.op_type in ("MatMul", "Gemm"):
            ins = [dtypes.get(i, "?") for i in node.input[:2]]
            matmul["x".join(ins)] += 1
            if "float32" in ins:
                module = upstream[node.name]  # its layer, or for attention the layer feeding it
                fp32_matmuls.append({"node": node.name, "module": module, "own_layer": node_module(node) is not None,
                                     "island": module is not None and keeps_fp32(module, keep_fp32)})
        elif node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    arr = numpy_helper.to_array(a.t)
                    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr.astype(np.float32)).all():
                        problems.append(f"constant {node.output[0]} holds inf/NaN")
        if node.op_type in _NEWER_THAN_TRT_10_13:
            problems.append(f"{node.op_type} needs TensorRT >= {_NEWER_THAN_TRT_10_13[node.op_type]} (not JetPack 7's 10.13)")
    typed = precision in ("fp16", "bf16") if precision is not None else any(d in TYPED for d in dtypes.values())
    if typed:
        for m in fp32_matmuls:
            if not m["island"]:
                where = f"layer {m['module']}" if m["own_layer"] else f"fed by layer {m['module']}" if m["module"] else "no layer"
                problems.append(f"{m['node']} ({where}) runs in float32 in a typed graph, outside the fp32 islands")
    return {
        "path": str(path),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "nodes": len(g.node),
        "ops": dict(ops),
        "casts": dict(casts),
        "matmul_input_dtypes": dict(matmul),
        "op_output_dtypes": dict(op_dtypes),
        "typed": typed,
        "fp32_matmuls": fp32_matmuls,
        "initializer_bytes": dict(init_bytes),
        "io": {
            "inputs": {i.name: dtypes.get(i.name) for i in g.input},
            "outputs": {o.name: dtypes.get(o.name) for o in g.output},
        },
        "problems": sorted(set(problems)),
    }


def lint_graphs(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist", hint="run `pi05-export onnx --out DIR` first")
    graphs, precision, keep = _graph_paths(path)
    return {name: lint_graph(p, precision, keep) for name, p in graphs.items()}
