"""Precision names, in one table: the CLI/recipe names (fp32, fp16, bf16), torch dtypes, and the dtype
names graphs and manifests use (float32, float16, bfloat16). Either spelling is accepted on input."""

from __future__ import annotations

import torch

from pi05_export.errors import ConfigError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_GRAPH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ALIASES = {v: k for k, v in _GRAPH_NAMES.items()}


def precision_name(name: str) -> str:
    """``fp16`` for ``fp16`` or ``float16`` (etc.); anything else is a ConfigError listing the valid names."""
    short = _ALIASES.get(name, name)
    if short not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
    return short


def torch_dtype(name: str) -> torch.dtype:
    return PRECISIONS[precision_name(name)]


def graph_dtype(name: str) -> str:
    """The dtype name a graph / manifest uses for this precision (``bf16`` -> ``bfloat16``)."""
    return _GRAPH_NAMES[precision_name(name)]
