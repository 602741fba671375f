"""Inference on recorded observations (the PyTorch reference backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi05_export.observation import Observation, load_observation


def infer_actions(model: Any, inputs: str | Path | Observation, *, steps: int = 10, seed: int = 0) -> np.ndarray:
    """Actions float32 [B, horizon, action_dim]; noise from the file, else drawn from ``seed``."""
    cfg = model.config
    obs = inputs if isinstance(inputs, Observation) else load_observation(inputs, cfg)
    obs = obs.validate(cfg).with_noise(cfg, seed)
    t = obs.torch()
    actions = model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t["noise"], num_steps=steps)
    return actions.float().numpy()
