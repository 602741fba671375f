"""The Pi0.5 model: export-friendly, parameter names identical to openpi's PyTorch checkpoint.

Every method takes and returns explicit tensors; the methods are exactly the exported components
(see :mod:`pi05_export.components`), and ``sample_actions`` chains them the way the runtime does.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pi05_export.config import Pi05Config
from pi05_export.errors import ConfigError
from pi05_export.model.common import (
    attend,
    fuse_linear_group,
    mask_to_bias,
    pop_fused,
    sinusoidal_time_embedding,
    time_frequencies,
    unfuse_linear_group,
)
from pi05_export.model.gemma import GemmaAttention, GemmaMLP, GemmaModel
from pi05_export.model.siglip import Projector, SiglipAttention, VisionTower


class PaliGemmaModel(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.width, cfg.llm.width)
        self.language_model = GemmaModel(cfg.llm)


class PaliGemma(nn.Module):
    """``lm_head`` is tied to ``embed_tokens`` and unused for actions, so it is not held here."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.model = PaliGemmaModel(cfg)


class GemmaExpert(nn.Module):
    """The action expert. openpi's unused, never-trained ``lm_head`` is deliberately omitted."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.model = GemmaModel(cfg.expert, cond_dim=cfg.expert.width)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.paligemma = PaliGemma(cfg)
        self.gemma_expert = GemmaExpert(cfg)


class Pi05Model(nn.Module):
    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.config = config
        w = config.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        self.action_in_proj = nn.Linear(config.action_dim, w)
        self.action_out_proj = nn.Linear(w, config.action_dim)
        self.time_mlp_in = nn.Linear(w, w)
        self.time_mlp_out = nn.Linear(w, w)
        # The time embedding's frequencies: one definition (openpi's float32 arithmetic), a constant of
        # the model that the graphs bake bit for bit. Plain floats, not a buffer: no state_dict entry.
        self.time_freq: tuple[float, ...] = tuple(time_frequencies(w).tolist())

    # -- sub-module shortcuts ---------------------------------------------------------------
    @property
    def vision(self) -> nn.Module:
        return self.paligemma_with_expert.paligemma.model.vision_tower.vision_model

    @property
    def projector(self) -> Projector:
        return self.paligemma_with_expert.paligemma.model.multi_modal_projector

    @property
    def llm(self) -> GemmaModel:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.paligemma_with_expert.gemma_expert.model

    # -- components ---------------------------------------------------------------------------
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, num_patches, llm.width] (SigLIP + projector)."""
        return self.projector(self.vision(pixel_values))

    def embed_prefix(
        self, image_embeds: torch.Tensor, image_mask: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate image and scaled token embeddings; build the prefix validity mask [B, P]."""
        n_img = self.config.vision.num_patches
        tok = self.llm.embed_tokens(tokens)
        tok = tok * math.sqrt(tok.shape[-1])
        embeds = torch.cat([image_embeds.to(tok.dtype), tok], dim=1)
        image_tokens_mask = image_mask[:, :, None].expand(-1, -1, n_img).reshape(image_mask.shape[0], -1)
        return embeds, torch.cat([image_tokens_mask, token_mask], dim=1)

    def prefix_kv_cache(
        self, image_embeds: torch.Tensor, image_mask: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeds [B, V*N, D], masks, tokens -> (KV cache [depth, 2, B, Hkv, P, D], prefix_mask [B, P])."""
        embeds, prefix_mask = self.embed_prefix(image_embeds, image_mask, tokens, token_mask)
        return self.llm.prefix_kv_cache(embeds, prefix_mask), prefix_mask

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor,
                     time_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy actions [B, H, A] and time [B] -> (suffix_embeds [B, H, W], adarms_cond [B, W]), fp32.

        ``time_freq``: :attr:`time_freq` already on the device (float32 [W/2]), for CUDA graph capture."""
        return self.action_in_proj(x_t.float()), self.time_condition(t, time_freq)

    def time_condition(self, t: torch.Tensor, time_freq: torch.Tensor | None = None) -> torch.Tensor:
        """Time [B] -> the expert's adaRMS condition [B, W] fp32: sin-cos embedding, then
        ``silu(time_mlp_out(silu(time_mlp_in(.))))`` (openpi ``pi0.py`` ``embed_suffix``, pi05 branch)."""
        emb = sinusoidal_time_embedding(t, self.time_freq if time_freq is None else time_freq)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))

    def time_modulations(self, t: torch.Tensor, time_freq: torch.Tensor | None = None) -> torch.Tensor:
        """Time [B] -> every adaRMS modulation of the expert, float32 [2 * depth + 1, B, 3 * W]
        (:meth:`GemmaModel.time_modulations` of :meth:`time_condition`).

        They depend on the time alone, and the Euler steps' times are fixed by the step count, so a
        runtime computes them once per step count and each step skips the time MLP and the 2 * depth + 1
        adaRMS ``dense`` layers (fp32 [W, 3W] each: about 40% of the expert's weight bytes per step).
        """
        return self.expert.time_modulations(self.time_condition(t, time_freq))

    def expert_hidden(
        self, suffix_embeds: torch.Tensor, adarms_cond: torch.Tensor, kv_cache: torch.Tensor, prefix_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.expert.suffix_hidden(suffix_embeds, adarms_cond, kv_cache, prefix_mask)

    def project_velocity(self, suffix_hidden: torch.Tensor) -> torch.Tensor:
        return self.action_out_proj(suffix_hidden.float())

    def denoise_step(self, x_t: torch.Tensor, t: torch.Tensor, kv_cache: torch.Tensor, prefix_mask: torch.Tensor,
                     time_freq: torch.Tensor | None = None) -> torch.Tensor:
        """One flow-matching velocity evaluation v_t [B, H, A] (fp32); ``time_freq`` as in :meth:`embed_suffix`."""
        suffix, cond = self.embed_suffix(x_t, t, time_freq)
        return self.project_velocity(self.expert_hidden(suffix, cond, kv_cache, prefix_mask))

    def denoise_step_modulated(self, x_t: torch.Tensor, modulations: torch.Tensor, kv_cache: torch.Tensor,
                               prefix_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`denoise_step` with the step's :meth:`time_modulations` [2 * depth + 1, B, 3W] computed
        beforehand: the same v_t [B, H, A] fp32, by the same operations on the same values."""
        hidden = self.expert.suffix_hidden(self.action_in_proj(x_t.float()), None, kv_cache, prefix_mask, modulations)
        return self.project_velocity(hidden)

    # -- full pipeline --------------------------------------------------------------------------
    def encode_observation(
        self, images: torch.Tensor, image_mask: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, v = images.shape[:2]
        image_embeds = self.embed_images(images.flatten(0, 1)).reshape(b, v * self.config.vision.num_patches, -1)
        return self.prefix_kv_cache(image_embeds, image_mask, tokens, token_mask)

    @torch.no_grad()
    def sample_actions(
        self,
        images: torch.Tensor,
        image_mask: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prefix once, then ``num_steps`` Euler steps from t=1 (noise) to t=0 (actions), in fp32.

        Time is accumulated in fp32 exactly as openpi does (``t += dt``).
        """
        num_steps = self.config.num_steps if num_steps is None else num_steps
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        b = images.shape[0]
        if noise is None:
            shape = (b, self.config.action_horizon, self.config.action_dim)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=images.device)
        kv_cache, prefix_mask = self.encode_observation(images, image_mask, tokens, token_mask)
        x = noise.float()
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32, device=x.device)
        t = torch.tensor(1.0, dtype=torch.float32, device=x.device)
        for _ in range(num_steps):
            x = x + dt * self.denoise_step(x, t.expand(b), kv_cache, prefix_mask)
            t = t + dt
        return x

    def velocity_uncached(
        self,
        images: torch.Tensor,
        image_mask: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """Reference: one joint prefix+suffix pass (openpi's training forward), no KV cache.

        Independent of the cache path: the 2-D mask comes from openpi's cumulative ``ar`` rule and
        positions from ``cumsum(pad) - 1`` over the whole sequence.
        """
        b, v = images.shape[:2]
        image_embeds = self.embed_images(images.flatten(0, 1)).reshape(b, v * self.config.vision.num_patches, -1)
        xp, prefix_mask = self.embed_prefix(image_embeds, image_mask, tokens, token_mask)
        suffix, cond = self.embed_suffix(x_t, t)
        xp, xs = xp.to(self.llm.dtype), suffix.to(self.expert.dtype)
        p, h = xp.shape[1], xs.shape[1]
        pad = torch.cat([prefix_mask, torch.ones(b, h, dtype=torch.bool, device=xp.device)], dim=1)
        ar = torch.zeros(p + h, dtype=torch.int64, device=xp.device)
        ar[p] = 1
        cum = torch.cumsum(ar, 0)
        allowed = (cum[None, :] <= cum[:, None])[None] & pad[:, None, :] & pad[:, :, None]
        bias = mask_to_bias(allowed)
        cos, sin = self.llm.rope(torch.cumsum(pad.to(torch.int64), dim=1) - 1)
        scale = self.config.llm.head_dim**-0.5
        for lp, ls in zip(self.llm.layers, self.expert.layers, strict=True):
            hp, _ = lp.pre_attention(xp, None)
            hs, gs = ls.pre_attention(xs, cond)
            qp, kp, vp = lp.qkv(hp, cos[:, :p], sin[:, :p])
            qs, ks, vs = ls.qkv(hs, cos[:, p:], sin[:, p:])
            out = attend(torch.cat([qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), bias, scale)
            xp = lp.post_attention(xp, out[:, :p], None, None)
            xs = ls.post_attention(xs, out[:, p:], gs, cond)
        hidden, _ = self.expert.norm(xs, cond)
        return self.project_velocity(hidden)


#: the projections that read the same input, per module type: one GEMM each after fuse_projections
FUSABLE: dict[type[nn.Module], tuple[str, ...]] = {
    GemmaAttention: ("q_proj", "k_proj", "v_proj"),
    GemmaMLP: ("gate_proj", "up_proj"),
    SiglipAttention: ("q_proj", "k_proj", "v_proj"),
}


def fuse_projections(model: nn.Module) -> int:
    """The torch runtime's GEMM fusion: in every module of ``model`` (a :class:`Pi05Model` or any part of
    it), q/k/v (SigLIP and both Gemma stacks) and gate/up (Gemma MLPs) become one GEMM each
    (:func:`~pi05_export.model.common.fuse_linear_group`: no extra memory, same ``state_dict``). A layer
    runs two or three GEMMs where it ran five; at batch 1 the action expert's small GEMMs are bound by
    launches and tile counts, not bytes. Each output element is the same dot product (bitwise equal where
    the GEMM accumulates in the same order; otherwise reordering noise). Idempotent. Returns the number of
    groups fused; layers with ``--keep-fp32`` casts stay unfused.
    """
    return sum(fuse_linear_group(m, FUSABLE[type(m)]) for m in model.modules() if type(m) in FUSABLE)


def use_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Route every attention of ``model`` (SigLIP, the prefix LLM, the expert) through torch's
    ``scaled_dot_product_attention`` (see :func:`~pi05_export.model.common.attend`): a torch runtime step,
    the exported graphs keep the explicit form. Returns the number of modules switched.

    The runtime switches SigLIP only (``use_sdpa(model.vision)``): on the H200 its unmasked attention got faster
    (vision 2.91 -> 2.51 ms), while the Gemma stacks' masked attention at head_dim 256 (cuDNN's SDPA kernel, plus
    a mask cast per layer) was slower than the explicit form (prefix 7.01 -> 7.79 ms, a denoise step 1.36 ->
    2.14 ms; ``benchmarks/bench_denoise_inductor.py --variants runtime,sdpa`` reproduces it)."""
    mods = [m for m in model.modules() if isinstance(m, (GemmaModel, SiglipAttention))]
    for m in mods:
        m.sdpa = enabled
    return len(mods)


@contextlib.contextmanager
def plain_form(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes exactly as exported and as openpi does: fused matrices set aside
    (kept alive, so CUDA graphs captured over them stay valid) and explicit attention; both are restored on
    exit. For references next to a runtime-form model, and for every graph export."""
    fused = [(m, pop_fused(m)) for m in model.modules() if type(m) in FUSABLE]
    sdpa = [(m, m.sdpa) for m in model.modules() if isinstance(m, (GemmaModel, SiglipAttention))]
    for m, _ in sdpa:
        m.sdpa = False
    try:
        yield model
    finally:
        for m, buffers in fused:
            m._buffers.update(buffers)
        for m, flag in sdpa:
            m.sdpa = flag


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections` (drop the fused matrices; values unchanged). Returns the groups unfused."""
    return sum(unfuse_linear_group(m) for m in model.modules() if type(m) in FUSABLE)


# Parameters openpi keeps in fp32 under its bf16 policy (gemma_pytorch.py
# to_bfloat16_for_selected_params, plus PI0Pytorch's own projections which are never cast).
FP32_KEEP = (
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.bias",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
    "action_in_proj",
    "action_out_proj",
    "time_mlp_in",
    "time_mlp_out",
)


def keeps_fp32(name: str, keep: Sequence[str] = ()) -> bool:
    """Whether parameter or module ``name`` stays fp32 under the dtype policy: openpi's keep-list
    (:data:`FP32_KEEP`), or at/below a module whose ``Pi05Model.named_modules()`` name matches one of the
    ``keep`` globs (``fnmatch``; the ``--keep-fp32`` / recipe ``format: fp32`` guards)."""
    if any(k in name for k in FP32_KEEP):
        return True
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, glob) for glob in keep for p in prefixes)


def policy_dtype(name: str, dtype: torch.dtype, keep: Sequence[str] = ()) -> torch.dtype:
    """The dtype parameter ``name`` gets when the model is cast to ``dtype`` under openpi's policy
    (plus the ``keep`` globs of :func:`keeps_fp32`)."""
    return torch.float32 if dtype == torch.float32 or keeps_fp32(name, keep) else dtype


def check_keep_globs(model: nn.Module, keep: Sequence[str]) -> None:
    """ConfigError for a ``keep`` glob that matches no module name (a typo would silently keep nothing)."""
    names = [n for n, _ in model.named_modules() if n]
    for glob in keep:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise ConfigError(f"--keep-fp32 {glob!r} matches no module",
                              hint="use Pi05Model.named_modules() names, e.g. '*.language_model.layers.0.mlp.down_proj' "
                                   "(validate's report names the layers that overflow fp16)")


_INPUT_CASTS = "_pi05_input_casts"


def apply_dtype_policy(model: Pi05Model, dtype: torch.dtype, keep_fp32: Sequence[str] = ()) -> Pi05Model:
    """Cast to ``dtype`` (fp16/bf16) except openpi's fp32 keep-list; ``float32`` casts everything to fp32.

    ``keep_fp32``: module globs (:func:`keeps_fp32`) that also stay fp32, e.g. a layer whose fp16
    output would pass 65504. A kept layer returns fp32, so the residual stream it adds into is fp32
    from there on (torch type promotion); then every Linear-like layer (``nn.Linear`` and the quantized
    ``QdqLinear``: anything with ``in_features`` and ``weight``) casts its input to its own weight dtype
    (a forward pre-hook; a no-op where the dtypes already agree), so layers after it still run in ``dtype``.
    """
    check_keep_globs(model, keep_fp32)
    unfuse_projections(model)  # the casts below replace parameters: a fused matrix would go stale
    for name, param in model.named_parameters():
        target = policy_dtype(name, dtype, keep_fp32)
        if param.dtype != target:
            param.data = param.data.to(target)
    for handle in getattr(model, _INPUT_CASTS, []):
        handle.remove()
    handles = []
    if keep_fp32 and dtype != torch.float32:
        for _, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "in_features") and isinstance(weight, torch.Tensor):
                handles.append(module.register_forward_pre_hook(_cast_input_to(weight.dtype)))
    setattr(model, _INPUT_CASTS, handles)
    return model


def _cast_input_to(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0].to(dtype), *args[1:])

    return hook
