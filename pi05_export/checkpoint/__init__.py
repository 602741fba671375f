"""Loading and saving Pi0.5 checkpoints: openpi PyTorch, lerobot ``pi05`` policies, sharded safetensors.

Public API: :func:`load_checkpoint`, :func:`save_checkpoint`, :func:`inspect_checkpoint`,
:func:`random_model`, :func:`resolve_model`.
"""

from pi05_export.checkpoint.io import (
    CheckpointInfo,
    Layout,
    inspect_checkpoint,
    load_checkpoint,
    random_model,
    reference_model,
    resolve_model,
    save_checkpoint,
)

__all__ = [
    "CheckpointInfo",
    "Layout",
    "inspect_checkpoint",
    "load_checkpoint",
    "random_model",
    "reference_model",
    "resolve_model",
    "save_checkpoint",
]
