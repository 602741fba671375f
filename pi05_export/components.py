"""The component registry: the one place where every exported graph's I/O is defined.

Names, dtypes, shapes and dynamic dims are written here once and recorded in ``manifest.json``;
``build``, ``validate``, ``bench`` and the runtime read them from the manifest.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pi05_export.config import Pi05Config

BATCH = "batch"
NUM_IMAGES = "num_images"  # batch * views, for the vision graph


class Component(str, enum.Enum):
    vision = "vision"
    llm = "llm"
    expert = "expert"
    projections = "projections"
    denoise = "denoise"


ALL_COMPONENTS: tuple[Component, ...] = tuple(Component)

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bool": torch.bool,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # float32 | float16 | bfloat16 | int64 | bool
    shape: tuple[int | str, ...]  # str = named dynamic dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    def concrete_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class ComponentSpec:
    name: Component
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[[nn.Module], nn.Module]

    @property
    def dynamic_dims(self) -> set[str]:
        return {d for t in (*self.inputs, *self.outputs) for d in t.shape if isinstance(d, str)}

    def graph_module(self, model: nn.Module) -> nn.Module:
        """What gets exported: ``wrap(model)`` with each output cast to the dtype this spec declares, so
        the graph keeps its I/O contract whatever dtype the last layer ran in (e.g. a ``--keep-fp32``
        layer before an fp16 output). The cast is a no-op (no node) where the dtypes already agree."""
        dtypes = tuple(t.torch_dtype for t in self.outputs)

        def cast(module: nn.Module, args: Any, out: Any) -> Any:
            outs = tuple(o.to(d) for o, d in zip(out if isinstance(out, tuple) else (out,), dtypes, strict=True))
            return outs if isinstance(out, tuple) else outs[0]

        wrapper = self.wrap(model).eval()
        wrapper.register_forward_hook(cast)
        return wrapper


# -- wrappers: explicit tensors in, explicit tensors out ----------------------------------------
class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class VisionGraph(_Wrapper):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.embed_images(pixel_values)


class LlmGraph(_Wrapper):
    def forward(self, image_embeds, image_mask, tokens, token_mask):  # type: ignore[no-untyped-def]
        return self.model.prefix_kv_cache(image_embeds, image_mask, tokens, token_mask)


class ExpertGraph(_Wrapper):
    def forward(self, suffix_embeds, adarms_cond, kv_cache, prefix_mask):  # type: ignore[no-untyped-def]
        return self.model.expert_hidden(suffix_embeds, adarms_cond, kv_cache, prefix_mask)


class ProjectionsGraph(_Wrapper):
    """Both ends of the expert: action_in + time MLP, and action_out (two independent subgraphs)."""

    def forward(self, x_t, t, suffix_hidden):  # type: ignore[no-untyped-def]
        suffix_embeds, adarms_cond = self.model.embed_suffix(x_t, t)
        return suffix_embeds, adarms_cond, self.model.project_velocity(suffix_hidden)


class DenoiseGraph(_Wrapper):
    def forward(self, x_t, t, kv_cache, prefix_mask):  # type: ignore[no-untyped-def]
        return self.model.denoise_step(x_t, t, kv_cache, prefix_mask)


def component_specs(cfg: Pi05Config, compute_dtype: str = "float32") -> dict[Component, ComponentSpec]:
    """I/O of every component for a config; ``compute_dtype`` is the dtype of the big matmuls."""
    v, llm, ex = cfg.vision, cfg.llm, cfg.expert
    h, a, p = cfg.action_horizon, cfg.action_dim, cfg.prefix_len
    act = compute_dtype
    kv = TensorSpec("kv_cache", act, (llm.depth, 2, BATCH, llm.num_kv_heads, p, llm.head_dim))
    prefix_mask = TensorSpec("prefix_mask", "bool", (BATCH, p))
    x_t = TensorSpec("x_t", "float32", (BATCH, h, a))
    t = TensorSpec("t", "float32", (BATCH,))
    suffix_embeds = TensorSpec("suffix_embeds", "float32", (BATCH, h, ex.width))
    cond = TensorSpec("adarms_cond", "float32", (BATCH, ex.width))
    hidden = TensorSpec("suffix_hidden", act, (BATCH, h, ex.width))
    v_t = TensorSpec("v_t", "float32", (BATCH, h, a))
    specs = [
        ComponentSpec(
            Component.vision,
            "SigLIP + projector, views batched",
            (TensorSpec("pixel_values", "float32", (NUM_IMAGES, 3, v.image_size, v.image_size)),),
            (TensorSpec("image_embeds", act, (NUM_IMAGES, v.num_patches, llm.width)),),
            VisionGraph,
        ),
        ComponentSpec(
            Component.llm,
            "Gemma prefix -> KV cache",
            (
                TensorSpec("image_embeds", act, (BATCH, cfg.num_views * v.num_patches, llm.width)),
                TensorSpec("image_mask", "bool", (BATCH, cfg.num_views)),
                TensorSpec("tokens", "int64", (BATCH, cfg.max_token_len)),
                TensorSpec("token_mask", "bool", (BATCH, cfg.max_token_len)),
            ),
            (kv, prefix_mask),
            LlmGraph,
        ),
        ComponentSpec(
            Component.expert, "Gemma action expert (adaRMS) on the cache", (suffix_embeds, cond, kv, prefix_mask), (hidden,), ExpertGraph
        ),
        ComponentSpec(
            Component.projections, "action_in + time MLP; action_out", (x_t, t, hidden), (suffix_embeds, cond, v_t), ProjectionsGraph
        ),
        ComponentSpec(Component.denoise, "projections + expert fused: one Euler velocity", (x_t, t, kv, prefix_mask), (v_t,), DenoiseGraph),
    ]
    return {s.name: s for s in specs}


def example_inputs(spec: ComponentSpec, cfg: Pi05Config, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid random inputs for a component (masks partly False so masking paths are exercised)."""
    gen = torch.Generator().manual_seed(seed)
    dims = {BATCH: batch, NUM_IMAGES: batch * cfg.num_views}
    out: dict[str, torch.Tensor] = {}
    for ts in spec.inputs:
        shape = ts.concrete_shape(dims)
        if ts.name == "tokens":
            out[ts.name] = torch.randint(0, cfg.llm.vocab_size, shape, generator=gen)
        elif ts.name == "t":
            out[ts.name] = torch.rand(shape, generator=gen)
        elif ts.name == "pixel_values":
            out[ts.name] = torch.rand(shape, generator=gen) * 2 - 1
        elif ts.dtype == "bool":
            out[ts.name] = _example_mask(ts.name, shape, cfg, gen)
        else:
            out[ts.name] = torch.randn(shape, generator=gen).to(ts.torch_dtype)
    return out


def _example_mask(name: str, shape: tuple[int, ...], cfg: Pi05Config, gen: torch.Generator) -> torch.Tensor:
    b, n = shape
    if name == "image_mask":
        mask = torch.ones(shape, dtype=torch.bool)
        mask[:, -1] = False if n > 1 else True  # last camera missing, as on DROID
        return mask
    if name == "token_mask":
        lengths = torch.randint(max(1, n // 2), n + 1, (b,), generator=gen)
        return torch.arange(n)[None, :] < lengths[:, None]
    # prefix_mask: images valid except the last view, then a ragged prompt
    img = cfg.num_views * cfg.vision.num_patches
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, : img - (cfg.vision.num_patches if cfg.num_views > 1 else 0)] = True
    lengths = torch.randint(1, n - img + 1, (b,), generator=gen)
    mask[:, img:] = torch.arange(n - img)[None, :] < lengths[:, None]
    return mask
