"""Model runners for the policy: batched model inputs in, normalized actions out, per backend.

Every runner takes host arrays (images float32 [B, V, 3, S, S] in [-1, 1], image_mask bool [B, V],
tokens int64 [B, L], token_mask bool [B, L], noise float32 [B, H, A]) and returns actions float32
[B, H, A] plus the model time in ms. On a GPU the inputs go to the device once, vision -> prefix ->
KV cache -> every Euler step stay on the device, and only the actions come back; the copy back
synchronizes, so the time is GPU work finished (not dispatch, unlike openpi's ``infer_ms``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pi05_export.config import Pi05Config
from pi05_export.errors import ConfigError, HardwareError

log = logging.getLogger(__name__)

TORCH_BACKENDS = ("torch", "torch-compile", "torch-cudagraph", "torch-compile-cudagraph")
ARTIFACT_BACKENDS = ("onnxruntime", "tensorrt")
POLICY_BACKENDS = TORCH_BACKENDS + ARTIFACT_BACKENDS


class ModelRunner(Protocol):
    backend: str
    config: Pi05Config
    device: str
    #: the largest batch one call takes (requests beyond it are split by the caller)
    max_batch: int
    #: batch sizes worth warming up before serving (compiled backends: every static batch)
    warmup_batches: tuple[int, ...]

    def sample(self, images: np.ndarray, image_mask: np.ndarray, tokens: np.ndarray, token_mask: np.ndarray,
               noise: np.ndarray, steps: int) -> tuple[np.ndarray, float]: ...

    def close(self) -> None: ...


class TorchRunner:
    """The PyTorch model on one device: eager, or (``torch-compile``/``-cudagraph`` backends) the
    stages of :mod:`pi05_export.bench` compiled and/or captured in CUDA graphs at static batch
    sizes 1 and ``max_batch`` (a batch in between runs padded to ``max_batch`` by repeating its last
    row, then sliced), so a lone request never pays for a full batch."""

    def __init__(self, model: Any, backend: str = "torch", *, max_batch: int = 1) -> None:
        import torch

        if backend not in TORCH_BACKENDS:
            raise ConfigError(f"unknown torch backend {backend!r}", hint=f"use one of: {', '.join(TORCH_BACKENDS)}")
        self.model, self.backend, self.max_batch = model, backend, max_batch
        self.config: Pi05Config = model.config
        self._device = next(model.parameters()).device
        self.device = str(self._device)
        self._cuda = self._device.type == "cuda"
        if backend.endswith("cudagraph") and not self._cuda:
            raise HardwareError(f"backend {backend!r} needs a CUDA GPU", hint="use --backend torch on the CPU")
        self._staged: dict[int, tuple[Any, dict[str, Any]]] = {}  # static batch -> (stages, static inputs)
        if backend != "torch":
            from pi05_export.bench import _torch_stages, bench_inputs

            for b in sorted({1, max_batch}):
                static = bench_inputs(self.config, b, seed=0, device=self._device)
                with torch.inference_mode():  # as every call runs: no recompile on a guard mismatch
                    self._staged[b] = (_torch_stages(model, backend, static, self._cuda, component_graphs=False), static)
                log.info("%s stages at batch %d: %s", backend, b, self._staged[b][0].notes)
        self._torch = torch

    @property
    def warmup_batches(self) -> tuple[int, ...]:
        """The batch sizes to warm up (every static batch of the compiled backends)."""
        return tuple(sorted({1, self.max_batch}))

    def close(self) -> None:
        self._staged.clear()

    def _to_device(self, arr: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(arr)).to(self._device, non_blocking=True)

    def sample(self, images: np.ndarray, image_mask: np.ndarray, tokens: np.ndarray, token_mask: np.ndarray,
               noise: np.ndarray, steps: int) -> tuple[np.ndarray, float]:
        torch = self._torch
        b = images.shape[0]
        t0 = time.perf_counter()
        with torch.inference_mode():
            if not self._staged:
                x = self.model.sample_actions(self._to_device(images), self._to_device(image_mask), self._to_device(tokens),
                                              self._to_device(token_mask), noise=self._to_device(noise), num_steps=steps)
            else:
                x = self._sample_staged(images, image_mask, tokens, token_mask, noise, steps)[:b]
            actions = x.float().cpu().numpy()  # the one device -> host copy; it waits for the GPU
        return actions, (time.perf_counter() - t0) * 1e3

    def _sample_staged(self, images: np.ndarray, image_mask: np.ndarray, tokens: np.ndarray, token_mask: np.ndarray,
                       noise: np.ndarray, steps: int) -> Any:
        fits = [b for b in self._staged if b >= images.shape[0]]
        if not fits:
            raise ConfigError(f"batch {images.shape[0]} exceeds the compiled batch {self.max_batch}", hint="raise --max-batch")
        static_b = min(fits)
        stages, s = self._staged[static_b]
        pad = static_b - images.shape[0]

        def padded(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a

        s["pixel_values"].copy_(self._to_device(padded(images)).flatten(0, 1), non_blocking=True)
        s["image_mask"].copy_(self._to_device(padded(image_mask)))
        s["tokens"].copy_(self._to_device(padded(tokens)))
        s["token_mask"].copy_(self._to_device(padded(token_mask)))
        s["noise"].copy_(self._to_device(padded(noise)))
        return stages.sampler.sample(s, steps)  # whole inference: on CUDA graphs, two launches


class PipelineRunner:
    """Exported graphs (ONNX Runtime) or engines (TensorRT) through :mod:`pi05_export.runtime`.

    With TensorRT on CUDA the stages chain on torch CUDA tensors (no host copy between engines or
    steps); ONNX Runtime's CPU provider runs on host arrays."""

    def __init__(self, backend: str, artifacts: Path, *, engines: str | None = None, max_batch: int = 1,
                 full_hash: bool = False) -> None:
        from pi05_export.runtime import open_pipeline

        self.backend, self.max_batch = backend, max_batch
        self.pipeline = open_pipeline(backend, artifacts, engines=engines, full_hash=full_hash)
        self.config = self.pipeline.config
        self.device = "cuda" if backend == "tensorrt" else "cpu"
        self._graphed_engines: dict[int, Any] = {}
        self._loaded_engines: dict[str, Any] = {}

    @property
    def warmup_batches(self) -> tuple[int, ...]:
        return tuple(sorted({1, self.max_batch}))

    def close(self) -> None:
        self.pipeline.close()

    def sample(self, images: np.ndarray, image_mask: np.ndarray, tokens: np.ndarray, token_mask: np.ndarray,
               noise: np.ndarray, steps: int) -> tuple[np.ndarray, float]:
        from pi05_export.observation import Observation

        t0 = time.perf_counter()
        if self.backend == "tensorrt":
            actions = self._sample_on_device(images, image_mask, tokens, token_mask, noise, steps)
        else:
            obs = Observation(images, image_mask, tokens, token_mask, noise)
            actions = self.pipeline.sample_actions(obs, steps=steps).actions
        return actions, (time.perf_counter() - t0) * 1e3

    def _graphed(self, batch: int) -> Any:
        """:class:`pi05_export.trt.GraphedEngines` for static ``batch`` (cached; the engines themselves are
        loaded once and shared by every batch's contexts), or None when the engine set has no fused denoise
        engine (then the engines run one by one; logged once)."""
        from pi05_export.components import Component

        if batch in self._graphed_engines:
            return self._graphed_engines[batch]
        engines = getattr(self.pipeline.backend, "engines", {})
        graphed = None
        parts = (Component.vision, Component.llm, Component.denoise)
        if all(c in engines for c in parts):
            from pi05_export.trt import GraphedEngines, load_engine

            if not self._loaded_engines:
                self._loaded_engines = {c.value: (engines[c], load_engine(engines[c])) for c in parts}
            cfg = self.config
            graphed = GraphedEngines(self._loaded_engines,
                                     batch=batch, views=cfg.num_views, num_patches=cfg.vision.num_patches,
                                     width=cfg.llm.width, tokens=cfg.max_token_len, horizon=cfg.action_horizon,
                                     action_dim=cfg.action_dim)
        else:
            log.warning("no fused denoise engine: TensorRT engines run one call at a time, without CUDA graphs "
                        "(build with --components including denoise)")
        self._graphed_engines[batch] = graphed
        return graphed

    def _sample_on_device(self, images: np.ndarray, image_mask: np.ndarray, tokens: np.ndarray, token_mask: np.ndarray,
                          noise: np.ndarray, steps: int) -> np.ndarray:
        """Never executed here (no TensorRT): engines chained on CUDA tensors, fp32 Euler update; through
        :class:`~pi05_export.trt.GraphedEngines` (CUDA graphs) when the set has a fused denoise engine."""
        import torch

        dev = torch.device("cuda")
        up = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in
              {"images": images, "image_mask": image_mask, "tokens": tokens, "token_mask": token_mask, "noise": noise}.items()}
        b, v = images.shape[:2]
        static_b = 1 if b == 1 else self.max_batch  # contexts and graphs exist for these two batches only
        graphed = self._graphed(static_b) if b <= static_b else None
        if graphed is not None:
            pad = static_b - b
            padded = {k: torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) if pad else t for k, t in up.items()}
            actions = graphed.sample(padded["images"], padded["image_mask"], padded["tokens"], padded["token_mask"],
                                     padded["noise"], steps)
            return actions[:b].cpu().numpy()  # type: ignore[no-any-return]
        emb = self.pipeline.vision(up["images"].flatten(0, 1))
        kv, pm = self.pipeline.prefix(emb.reshape(b, -1, emb.shape[-1]), up["image_mask"], up["tokens"], up["token_mask"])
        x = up["noise"].float()
        dt = torch.tensor(-1.0 / steps, dtype=torch.float32, device=dev)
        t = torch.tensor(1.0, dtype=torch.float32, device=dev)
        for _ in range(steps):
            x = x + dt * self.pipeline.denoise(x, t.expand(b), kv, pm).float()
            t = t + dt
        return x.cpu().numpy()
