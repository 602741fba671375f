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

from pi05_export.artifacts import external_data_path, load_graph
from pi05_export.components import Component, ComponentSpec, TensorSpec
from pi05_export.errors import ArtifactError, first_line

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


ROUNDED_SUFFIX = "__lowp"  # the low-precision value each emulated op's fp32 result is rounded through
EMULATED_PRECISIONS = ("bf16", "fp16")


def emulation_copy(src: Path, dst: Path, precision: str) -> Path:
    """A bf16- or fp16-typed graph rewritten so ONNX Runtime's CPU provider computes it with true
    low-precision semantics: every op runs on fp32 carriers and each value the graph types bf16/fp16
    is rounded through that type right after the op that produced it (``Cast`` there and back), as
    an engine stores it. Weights keep their values exactly; accumulation inside a MatMul is fp32, as
    on the GPU.

    bf16: ONNX Runtime has no CPU bf16 MatMul at all, and numpy no bfloat16, so the copy's inputs and
    outputs become fp32 carriers (inputs are rounded to bf16 first). fp16: the interface keeps its
    fp16 types (the feeds are the same as for the original graph), but ONNX Runtime's CPU kernels
    would evaluate chains of fp16 ops in fp32 and hide overflow: here a value beyond 65504 becomes
    inf at the op that produced it and propagates, as on the GPU.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in EMULATED_PRECISIONS:
        raise ValueError(f"no emulation for {precision!r}")
    low = TensorProto.BFLOAT16 if precision == "bf16" else TensorProto.FLOAT16
    typed_interface = precision == "fp16"
    model = load_graph(src)  # shape inference on the proto alone (graphs > 2 GB)
    inferred = onnx.shape_inference.infer_shapes(model)
    low_values = {vi.name for vi in (*inferred.graph.value_info, *inferred.graph.output) if vi.type.tensor_type.elem_type == low}
    low_inputs = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == low]
    low_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == low}
    onnx.load_external_data_for_model(model, str(src.parent))
    g = model.graph
    for init in g.initializer:
        if init.data_type == low:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for vi in (g.value_info if typed_interface else (*g.input, *g.output, *g.value_info)):
        if vi.type.tensor_type.elem_type == low:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = []
    rename = {name: f"{name}__rounded" for name in low_inputs}  # consumers read fp32 carriers
    for name in low_inputs:
        if typed_interface:  # the fp16 feed is already rounded
            nodes.append(helper.make_node("Cast", [name], [rename[name]], to=TensorProto.FLOAT))
        else:  # an engine input rounds its feed: do the same here
            nodes.append(helper.make_node("Cast", [name], [name + ROUNDED_SUFFIX], to=low))
            nodes.append(helper.make_node("Cast", [name + ROUNDED_SUFFIX], [rename[name]], to=TensorProto.FLOAT))
    if typed_interface:  # a typed graph output keeps its name and type; consumers inside read a carrier
        rename.update({o: f"{o}__carrier" for o in low_outputs})
    for node in g.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        for attr in node.attribute:
            if attr.name == "to" and attr.i == low:
                attr.i = TensorProto.FLOAT
            if attr.name == "value" and attr.t.data_type == low:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        rounded = [o for o in node.output if o in low_values]
        node.output[:] = [f"{o}__fp32" if o in low_values else o for o in node.output]
        nodes.append(node)
        for o in rounded:
            lowp = o if typed_interface and o in low_outputs else o + ROUNDED_SUFFIX
            carrier = rename.get(o, o)
            nodes.append(helper.make_node("Cast", [f"{o}__fp32"], [lowp], to=low))
            nodes.append(helper.make_node("Cast", [lowp], [carrier], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.save(model, str(dst), save_as_external_data=True, location=external_data_path(dst).name)
    return dst


def first_overflow(emulated: Path, feed: dict[str, np.ndarray]) -> str | None:
    """The first rounded value (in node order) of an :func:`emulation_copy` graph that is inf/NaN
    while everything before it is finite, for ``feed``: where a graph overflows its precision.
    Runs the graph once with every rounded value as an extra output (memory: all of them at once)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(emulated), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    probes = [out for node in model.graph.node if node.op_type == "Cast" for out in node.output
              if out.endswith(ROUNDED_SUFFIX) or out in outputs]
    low = {n.output[0]: next(a.i for a in n.attribute if a.name == "to") for n in model.graph.node if n.op_type == "Cast"}
    for name in probes:
        if name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, low[name], None))
    onnx.load_external_data_for_model(model, str(emulated.parent))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feed), strict=True))
    for name in probes:
        if not np.isfinite(np.asarray(values[name], np.float32)).all():
            value = name.removesuffix(ROUNDED_SUFFIX)
            module = _module_of(model, f"{value}__fp32")
            return f"{value} ({module})" if module else value
    return None


def _module_of(model: Any, output: str) -> str | None:
    """The ``Pi05Model.named_modules()`` name of the layer that produced ``output`` (see :func:`pi05_export.lint.node_module`)."""
    from pi05_export.lint import node_module

    return next((node_module(n) for n in model.graph.node if output in n.output), None)


class OnnxRuntimeBackend:
    """ONNX Runtime sessions per component (CUDA provider when present, else CPU)."""

    name = "onnxruntime"

    def __init__(self, graphs: dict[Component, Path], specs: dict[Component, ComponentSpec], *, emulate: str | None = None) -> None:
        """``emulate``: ``"bf16"``/``"fp16"`` runs :func:`emulation_copy` of each graph (true low-precision
        rounding and overflow on the CPU)."""
        self.graphs, self.specs = graphs, specs
        self.emulate = emulate
        self.emulated: dict[Component, Path] = {}
        self._sessions: dict[Component, Any] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _session(self, component: Component) -> Any:
        if component not in self._sessions:
            import onnxruntime as ort

            path = self.graphs.get(component)
            if path is None:
                raise ArtifactError(f"no {component.value} graph in the artifacts", hint=f"export it: --components {component.value}")
            if self.emulate:
                self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix=f"pi05-{self.emulate}-")
                path = self.emulated[component] = emulation_copy(path, Path(self._tmp.name) / path.name, self.emulate)
            else:
                load_graph(path)  # a garbage/truncated .onnx or a short .onnx.data: one line, not an ORT traceback
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            try:
                self._sessions[component] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:
                if not type(e).__module__.startswith("onnxruntime"):
                    raise
                raise ArtifactError(f"ONNX Runtime cannot load {path}: {first_line(e)}",
                                    hint="re-export it with `pi05-export onnx`") from None
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
