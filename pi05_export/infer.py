"""Inference on recorded observations: the PyTorch model, or exported artifacts through the runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.errors import ConfigError
from pi05_export.observation import Observation, load_observation


def infer_actions(
    inputs: str | Path | Observation,
    *,
    model: Any = None,
    backend: str = "torch",
    artifacts: str | Path | None = None,
    engines: str | None = None,
    steps: int = 10,
    seed: int = 0,
    full_hash: bool = False,
) -> np.ndarray:
    """Actions float32 [B, horizon, action_dim]; noise from the file, else drawn from ``seed``.

    ``backend="torch"`` without ``artifacts`` runs ``model.sample_actions`` directly; any other
    combination runs the exported pipeline (``onnxruntime``/``tensorrt`` need ``artifacts``), whose
    files are checked against their manifest first (``full_hash``: every byte's sha256; else size and a
    sampled fingerprint; :meth:`pi05_export.artifacts.Manifest.component_path`).
    """
    if backend == "torch" and artifacts is None:
        if model is None:
            raise ConfigError("the torch backend needs a model", hint="pass a CHECKPOINT or --preset tiny --random-init")
        cfg = model.config
        obs = inputs if isinstance(inputs, Observation) else load_observation(inputs, cfg)
        t = obs.validate(cfg).with_noise(cfg, seed).torch()
        actions = model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t["noise"], num_steps=steps)
        return actions.float().numpy()
    if artifacts is None:
        raise ConfigError(f"--backend {backend} runs exported artifacts", hint="pass --artifacts OUT (from `pi05-export onnx`)")
    from pi05_export.runtime import open_pipeline

    pipeline = open_pipeline(backend, artifacts, model=model, engines=engines, full_hash=full_hash)
    obs = inputs if isinstance(inputs, Observation) else load_observation(inputs, pipeline.config)
    return pipeline.sample_actions(obs, steps=steps, seed=seed).actions
