"""Graph lint for exported ONNX (``pi05-export inspect``): what TensorRT will see, at a glance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.artifacts import load_graph
from pi05_export.errors import ArtifactError

_SMALL = 1 << 20  # scan initializers below 1 MiB for inf/NaN (masks and constants live there)
# Ops whose TensorRT support starts later than TensorRT 10.13 (JetPack 7 on Jetson Thor).
_NEWER_THAN_TRT_10_13 = {"Attention": "10.14", "RMSNormalization": "10.15"}


def _graph_paths(path: Path) -> dict[str, Path]:
    if path.is_file() and path.suffix == ".onnx":
        return {path.stem: path}
    from pi05_export.artifacts import Manifest

    manifest = Manifest.read(path)
    return {name: manifest.component_path(path, name) for name in manifest.components}


def lint_graph(path: Path) -> dict[str, Any]:
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
    ops: Counter[str] = Counter()
    casts: Counter[str] = Counter()
    matmul: Counter[str] = Counter()
    for node in g.node:
        ops[node.op_type] += 1
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            casts[f"{dtypes.get(node.input[0], '?')}->{onnx.helper.tensor_dtype_to_np_dtype(to).name}"] += 1
        elif node.op_type in ("MatMul", "Gemm"):
            matmul["x".join(dtypes.get(i, "?") for i in node.input[:2])] += 1
        elif node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    arr = numpy_helper.to_array(a.t)
                    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr.astype(np.float32)).all():
                        problems.append(f"constant {node.output[0]} holds inf/NaN")
        if node.op_type in _NEWER_THAN_TRT_10_13:
            problems.append(f"{node.op_type} needs TensorRT >= {_NEWER_THAN_TRT_10_13[node.op_type]} (not JetPack 7's 10.13)")
    return {
        "path": str(path),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "nodes": len(g.node),
        "ops": dict(ops),
        "casts": dict(casts),
        "matmul_input_dtypes": dict(matmul),
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
    return {name: lint_graph(p) for name, p in _graph_paths(path).items()}
