"""The exported-pipeline runtime: vision -> llm -> N x denoise -> actions, on a chosen backend.

``open_pipeline("onnxruntime", OUT)`` runs the graphs of an export directory; ``open_pipeline("torch",
OUT)`` (or ``pipeline_for_model``) runs the PyTorch reference with the same I/O contract, so every
backend is interchangeable in ``infer``, ``validate`` and ``bench``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.artifacts import MANIFEST_NAME, Manifest, resolve_inside, sha256_file
from pi05_export.components import Component, ComponentSpec, TensorSpec
from pi05_export.config import Pi05Config
from pi05_export.errors import ArtifactError, ConfigError
from pi05_export.observation import Observation
from pi05_export.runtime.backends import Backend, OnnxRuntimeBackend, TensorRTBackend, TorchBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def specs_from_manifest(manifest: Manifest) -> dict[Component, ComponentSpec]:
    """Component I/O exactly as recorded at export time (never re-derived)."""
    from pi05_export.components import component_specs

    cfg = Pi05Config.from_dict(manifest.config)
    wrappers = component_specs(cfg)
    specs = {}
    for name, entry in manifest.components.items():
        comp = Component(name)
        specs[comp] = ComponentSpec(
            comp, entry.get("description", ""),
            tuple(TensorSpec.from_dict(t) for t in entry["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in entry["outputs"]),
            wrappers[comp].wrap,
        )
    return specs


@dataclass
class Trace:
    """What one sampling run produced: actions plus every step's velocity (for drift reports)."""

    actions: np.ndarray
    velocities: list[np.ndarray] = field(default_factory=list)


class Pipeline:
    def __init__(self, backend: Backend, config: Pi05Config, specs: dict[Component, ComponentSpec]) -> None:
        self.backend, self.config, self.specs = backend, config, specs
        self.recorder: Callable[[Component, dict[str, np.ndarray]], None] | None = None

    def close(self) -> None:
        """Release backend resources (TensorRT execution contexts)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, component: Component, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.recorder is not None:
            self.recorder(component, feed)
        return self.backend.run(component, feed)

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run(Component.vision, {"pixel_values": pixel_values})["image_embeds"]

    def prefix(self, image_embeds, image_mask, tokens, token_mask) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
        out = self._run(Component.llm, {"image_embeds": image_embeds, "image_mask": image_mask, "tokens": tokens,
                                        "token_mask": token_mask})
        return out["kv_cache"], out["prefix_mask"]

    def denoise(self, x_t: np.ndarray, t: np.ndarray, kv_cache: np.ndarray, prefix_mask: np.ndarray) -> np.ndarray:
        if Component.denoise in self.specs:
            return self._run(Component.denoise, {"x_t": x_t, "t": t, "kv_cache": kv_cache, "prefix_mask": prefix_mask})["v_t"]
        return self.denoise_split(x_t, t, kv_cache, prefix_mask)

    def denoise_split(self, x_t: np.ndarray, t: np.ndarray, kv_cache: np.ndarray, prefix_mask: np.ndarray) -> np.ndarray:
        """The same step through the separate graphs: projections (action_in + time MLP) -> expert ->
        projections (action_out). The projections graph holds both halves, so it runs twice; the
        first run's v_t (from a zero hidden state) is unused."""
        shape = (*x_t.shape[:2], self.config.expert.width)
        zeros = x_t.new_zeros(shape) if hasattr(x_t, "new_zeros") else np.zeros(shape, np.float32)  # torch or numpy
        proj = self.backend.run(Component.projections, {"x_t": x_t, "t": t, "suffix_hidden": zeros})
        hidden = self._run(Component.expert, {"suffix_embeds": proj["suffix_embeds"], "adarms_cond": proj["adarms_cond"],
                                              "kv_cache": kv_cache, "prefix_mask": prefix_mask})["suffix_hidden"]
        return self._run(Component.projections, {"x_t": x_t, "t": t, "suffix_hidden": hidden})["v_t"]

    def encode(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        b, v = obs.images.shape[:2]
        embeds = self.vision(obs.images.reshape(b * v, *obs.images.shape[2:]))
        return self.prefix(embeds.reshape(b, v * embeds.shape[1], -1), obs.image_mask, obs.tokens, obs.token_mask)

    def sample_actions(self, obs: Observation, steps: int = 10, seed: int = 0) -> Trace:
        """Euler integration from t=1 to 0 in fp32, time accumulated exactly like the PyTorch model."""
        obs = obs.validate(self.config).with_noise(self.config, seed)
        kv, prefix_mask = self.encode(obs)
        x = obs.noise.astype(np.float32)
        dt = np.float32(-1.0 / steps)
        t = np.float32(1.0)
        trace = Trace(actions=x)
        for _ in range(steps):
            v = self.denoise(x, np.full((obs.batch,), t, np.float32), kv, prefix_mask).astype(np.float32)
            trace.velocities.append(v)
            x = (x + dt * v).astype(np.float32)
            t = np.float32(t + dt)
        trace.actions = x
        return trace


def pipeline_for_model(model: Any, compute_dtype: str = "float32") -> Pipeline:
    from pi05_export.components import component_specs

    specs = component_specs(model.config, compute_dtype)
    return Pipeline(TorchBackend(model, specs), model.config, specs)


def _artifact_graphs(artifacts: Path, manifest: Manifest, full_hash: bool) -> dict[Component, Path]:
    graphs = {Component(n): manifest.component_path(artifacts, n, full_hash=full_hash) for n in manifest.components}
    if manifest.stage == "quantize":  # FP4 graphs: ONNX Runtime runs their emulation copy (checked with the graph)
        from pi05_export.quantize import runnable_onnx

        for c in graphs:
            emulated = manifest.components[c.value].get("runnable_path")
            graphs[c] = (resolve_inside(artifacts, emulated, f"{artifacts / MANIFEST_NAME} component {c.value!r}")
                         if emulated else runnable_onnx(graphs[c]))  # manifests from before runnable_path: made here
    return graphs


def open_pipeline(
    backend: str, artifacts: str | Path, *, model: Any = None, engines: str | None = None, full_hash: bool = False
) -> Pipeline:
    """A pipeline over an export directory (``pi05-export onnx`` / ``quantize`` output).

    ``torch`` needs ``model`` (the reference; the manifest's config must match it). ``tensorrt``
    reads engines from ``artifacts/engines/<engines>/`` (``pi05-export build``). Every graph or engine
    is checked against its manifest first (:meth:`Manifest.component_path`: path inside, size and sampled
    fingerprint; every byte's sha256 with ``full_hash``); a mismatch raises :class:`ArtifactError`.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", hint=f"use one of: {', '.join(BACKENDS)}")
    artifacts = Path(artifacts)
    manifest = Manifest.read(artifacts)
    specs = specs_from_manifest(manifest)
    cfg = Pi05Config.from_dict(manifest.config)
    if backend == "torch":
        if model is None:
            raise ConfigError("the torch backend needs the model", hint="pass the checkpoint (or --preset --random-init)")
        if model.config != cfg:
            raise ArtifactError(f"{artifacts} was exported from a different config", hint="re-export from this checkpoint")
        return Pipeline(TorchBackend(model, specs), cfg, specs)
    if backend == "onnxruntime":
        graphs = _artifact_graphs(artifacts, manifest, full_hash)
        from pi05_export.runtime.backends import EMULATED_PRECISIONS

        emulate = manifest.precision if manifest.precision in EMULATED_PRECISIONS else None  # true bf16/fp16 on the CPU
        return Pipeline(OnnxRuntimeBackend(graphs, specs, emulate=emulate), cfg, specs)
    engine_dir, build_cmd = _engine_location(artifacts, manifest, engines)
    engine_manifest = Manifest.read(engine_dir, stage="build", hint=f"build engines first: {build_cmd}")
    built_from = (engine_manifest.inputs or {}).get("sha256")
    if built_from != sha256_file(artifacts / MANIFEST_NAME):
        raise ArtifactError(
            f"the engines in {engine_dir} were built from other graphs than {artifacts}",
            hint=f"rebuild them: {build_cmd}",
        )
    paths = {Component(n): engine_manifest.component_path(engine_dir, n, full_hash=full_hash) for n in engine_manifest.components}
    specs = {c: s for c, s in specs.items() if c in paths}  # only what was built (e.g. no fused denoise)
    return Pipeline(TensorRTBackend(paths, specs), cfg, specs)


def _engine_location(artifacts: Path, manifest: Manifest, engines: str | None) -> tuple[Path, str]:
    """Where ``pi05-export build`` put the engines of these graphs, and the command that builds them."""
    if manifest.stage == "quantize":  # OUT/<recipe>/ -> OUT/engines/<recipe>/
        name = engines or artifacts.name
        return artifacts.parent / "engines" / name, f"pi05-export build {artifacts.parent} --recipe {artifacts.name}"
    name = engines or manifest.precision
    if manifest.precision not in ("fp16", "bf16"):
        return artifacts / "engines" / name, (f"{manifest.precision} graphs are not built into engines: export with "
                                              "--precision fp16|bf16 (or quantize) and build those")
    return artifacts / "engines" / name, f"pi05-export build {artifacts} --{manifest.precision}"
