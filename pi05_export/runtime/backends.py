"""Backends that run one component on numpy feeds: PyTorch (reference), ONNX Runtime, TensorRT.

Tensors typed bf16 in a graph travel as float32 numpy arrays (numpy has no bfloat16); every value
is exactly representable, and each backend converts at its boundary using the manifest's specs.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pi05_export.components import Component, ComponentSpec, TensorSpec
from pi05_export.errors import ArtifactError

log = logging.getLogger(__name__)

_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32, "int64": np.int64, "bool": np.bool_}


def to_spec(arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Cast a feed to the numpy dtype that carries ``spec`` (bf16 -> float32 carrier)."""
    return np.ascontiguousarray(arr, dtype=_NP[spec.dtype])


class Backend(Protocol):
    name: str

    def run(self, component: Component, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchBackend:
    """The PyTorch reference: the same wrappers that were exported, run eagerly."""

    name = "torch"

    def __init__(self, model: Any, specs: dict[Component, ComponentSpec]) -> None:
        self.model, self.specs = model, specs
        self._wrappers: dict[Component, Any] = {}

    def run(self, component: Component, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        spec = self.specs[component]
        wrapper = self._wrappers.setdefault(component, spec.wrap(self.model).eval())
        args = [torch.from_numpy(to_spec(feed[t.name], t)).to(t.torch_dtype) for t in spec.inputs]
        with torch.no_grad():
            out = wrapper(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {t.name: o.detach().float().numpy().astype(_NP[t.dtype]) if o.dtype == torch.bfloat16 else o.numpy()
                for t, o in zip(spec.outputs, outs, strict=True)}


def bf16_emulation_copy(src: Path, dst: Path) -> Path:
    """ONNX Runtime has no CPU bf16 MatMul: rewrite a bf16-typed graph to fp32 carriers that are
    rounded to bf16 after every op that produced bf16 (Cast to bf16 and back). Weights keep their
    bf16 values exactly. This validates the graph's structure and bf16 rounding points on CPU;
    accumulation inside a MatMul is fp32 here, as on the GPU.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src), load_external_data=False)  # shape inference on the proto alone (graphs > 2 GB)
    inferred = onnx.shape_inference.infer_shapes(model)
    bf16_values = {
        vi.name for vi in (*inferred.graph.value_info, *inferred.graph.output)
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16
    }
    bf16_inputs = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.BFLOAT16]
    onnx.load_external_data_for_model(model, str(src.parent))
    g = model.graph
    for init in g.initializer:
        if init.data_type == TensorProto.BFLOAT16:
            arr = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = []
    for name in bf16_inputs:  # a bf16 engine input rounds its feed to bf16: do the same here
        nodes.append(helper.make_node("Cast", [name], [f"{name}__bf16"], to=TensorProto.BFLOAT16))
        nodes.append(helper.make_node("Cast", [f"{name}__bf16"], [f"{name}__rounded"], to=TensorProto.FLOAT))
    rename_inputs = {name: f"{name}__rounded" for name in bf16_inputs}
    for node in g.node:
        node.input[:] = [rename_inputs.get(i, i) for i in node.input]
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
            if attr.name == "value" and attr.t.data_type == TensorProto.BFLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        rounded = [o for o in node.output if o in bf16_values]
        renames = {o: f"{o}__fp32" for o in rounded}
        node.output[:] = [renames.get(o, o) for o in node.output]
        nodes.append(node)
        for o in rounded:
            nodes.append(helper.make_node("Cast", [renames[o]], [f"{o}__bf16"], to=TensorProto.BFLOAT16))
            nodes.append(helper.make_node("Cast", [f"{o}__bf16"], [o], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return dst


class OnnxRuntimeBackend:
    """ONNX Runtime sessions per component (CUDA provider when present, else CPU)."""

    name = "onnxruntime"

    def __init__(self, graphs: dict[Component, Path], specs: dict[Component, ComponentSpec], *, emulate_bf16: bool) -> None:
        self.graphs, self.specs, self.emulate_bf16 = graphs, specs, emulate_bf16
        self._sessions: dict[Component, Any] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _session(self, component: Component) -> Any:
        if component not in self._sessions:
            import onnxruntime as ort

            path = self.graphs.get(component)
            if path is None:
                raise ArtifactError(f"no {component.value} graph in the artifacts", hint=f"export it: --components {component.value}")
            if self.emulate_bf16:
                self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="pi05-bf16-")
                path = bf16_emulation_copy(path, Path(self._tmp.name) / path.name)
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._sessions[component] = ort.InferenceSession(str(path), opts, providers=providers)
        return self._sessions[component]

    def run(self, component: Component, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        outs = self._session(component).run(None, {t.name: to_spec(feed[t.name], t) for t in spec.inputs})
        return {t.name: o for t, o in zip(spec.outputs, outs, strict=True)}


class TensorRTBackend:
    """Engines run through :class:`pi05_export.trt.EngineRunner` (Polygraphy's TrtRunner underneath),
    which casts the float32 carriers to the engine's input dtypes (bf16 included)."""

    name = "tensorrt"

    def __init__(self, engines: dict[Component, Path], specs: dict[Component, ComponentSpec]) -> None:
        from pi05_export.trt import require_tensorrt

        require_tensorrt()
        self.engines, self.specs = engines, specs
        self._runners: dict[Component, Any] = {}

    def _runner(self, component: Component) -> Any:
        if component not in self._runners:
            from pi05_export.trt import EngineRunner

            path = self.engines.get(component)
            if path is None:
                raise ArtifactError(f"no {component.value} engine", hint=f"build it: pi05-export build OUT --components {component.value}")
            self._runners[component] = EngineRunner(path).__enter__()
        return self._runners[component]

    def run(self, component: Component, feed: dict[str, Any]) -> dict[str, Any]:
        """numpy in -> numpy out; torch CUDA tensors in -> torch tensors out, on the device (no host
        copies between engines, which is what ``bench`` times)."""
        spec = self.specs[component]
        if all(hasattr(feed[t.name], "is_cuda") for t in spec.inputs):
            out = self._runner(component).infer({t.name: feed[t.name] for t in spec.inputs})
            return {t.name: out[t.name] for t in spec.outputs}
        out = self._runner(component).infer({t.name: to_spec(feed[t.name], t) for t in spec.inputs})
        return {t.name: np.asarray(out[t.name]) for t in spec.outputs}

    def close(self) -> None:
        for runner in self._runners.values():
            runner.__exit__(None, None, None)
        self._runners.clear()
