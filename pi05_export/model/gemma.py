"""Gemma decoder stacks: the PaliGemma prefix LLM (plain RMSNorm) and the pi0.5 action expert
(adaptive RMSNorm with gated residuals). Multi-/grouped-query attention, RoPE, openpi key names.

The KV cache is a plain tensor ``[depth, 2, B, num_kv_heads, P, head_dim]`` holding post-RoPE K and
V of the prefix. The expert reads it and never writes it.
"""

from __future__ import annotations

import torch
from torch import nn

from pi05_export.config import GemmaConfig
from pi05_export.model.common import (
    AdaRMSNorm,
    GemmaRMSNorm,
    apply_rope,
    attend,
    fused_linear,
    gelu_tanh,
    mask_to_bias,
    rope_cos_sin,
)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.width, cfg.q_width, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.kv_width, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.kv_width, bias=False)
        self.o_proj = nn.Linear(cfg.q_width, cfg.width, bias=False)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_linear(self, x)
        if fused is not None:  # fuse_projections: one GEMM for gate and up
            gate, up = fused.chunk(2, dim=-1)
            return self.down_proj(gelu_tanh(gate) * up)  # type: ignore[no-any-return]
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


def _norm(norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None,
          modulation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(norm, AdaRMSNorm):
        return norm(x, cond, modulation=modulation)  # type: ignore[no-any-return]
    return norm(x), None


def _residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class GemmaDecoderLayer(nn.Module):
    """One decoder layer, split into the pieces a joint (prefix+suffix) pass needs."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm: nn.Module
        self.post_attention_layernorm: nn.Module
        if cond_dim is None:
            self.input_layernorm = GemmaRMSNorm(cfg.width, cfg.eps)
            self.post_attention_layernorm = GemmaRMSNorm(cfg.width, cfg.eps)
        else:
            self.input_layernorm = AdaRMSNorm(cfg.width, cond_dim, cfg.eps)
            self.post_attention_layernorm = AdaRMSNorm(cfg.width, cond_dim, cfg.eps)

    def pre_attention(self, x: torch.Tensor, cond: torch.Tensor | None,
                      modulation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _norm(self.input_layernorm, x, cond, modulation)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE q [B, Hq, T, D] and k, v [B, Hkv, T, D]."""
        b, t, _ = h.shape
        c, a = self.cfg, self.self_attn
        fused = fused_linear(a, h)
        if fused is not None:  # fuse_projections: one GEMM for q, k and v
            qf, kf, vf = fused.split([c.q_width, c.kv_width, c.kv_width], dim=-1)
        else:
            qf, kf, vf = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        q = qf.reshape(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = kf.reshape(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = vf.reshape(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def post_attention(
        self, x: torch.Tensor, attn: torch.Tensor, gate: torch.Tensor | None, cond: torch.Tensor | None,
        modulation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = _residual(x, self.self_attn.o_proj(attn), gate)
        h, gate = _norm(self.post_attention_layernorm, x, cond, modulation)
        return _residual(x, self.mlp(h), gate)


class GemmaModel(nn.Module):
    """A Gemma stack. ``cond_dim`` set -> adaRMS everywhere (the pi0.5 expert, no embedding)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width) if cfg.vocab_size else None
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm: nn.Module = GemmaRMSNorm(cfg.width, cfg.eps) if cond_dim is None else AdaRMSNorm(cfg.width, cond_dim, cfg.eps)
        #: attention through torch's fused SDPA kernels (:func:`pi05_export.model.pi05.use_sdpa`); the export keeps False
        self.sdpa = False

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].self_attn.q_proj.weight.dtype

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def prefix_kv_cache(self, embeds: torch.Tensor, prefix_mask: torch.Tensor) -> torch.Tensor:
        """Bidirectional prefix pass -> KV cache [depth, 2, B, Hkv, P, D].

        Padded tokens attend nothing and are attended by nothing; positions count valid tokens only.
        The last layer's attention output, MLP and the final norm are not needed for the cache and
        are skipped.
        """
        # int32 position arithmetic: TensorRT's int64 support is limited; counts never exceed 2^31
        positions = torch.cumsum(prefix_mask.to(torch.int32), dim=-1, dtype=torch.int32) - 1
        cos, sin = self.rope(positions)
        bias = mask_to_bias(prefix_mask[:, :, None] & prefix_mask[:, None, :])
        x = embeds.to(self.dtype)
        caches = []
        for i, layer in enumerate(self.layers):
            h, _ = layer.pre_attention(x, None)
            q, k, v = layer.qkv(h, cos, sin)
            caches.append(torch.stack([k, v]))
            if i + 1 < len(self.layers):
                x = layer.post_attention(x, attend(q, k, v, bias, self.cfg.head_dim**-0.5, sdpa=self.sdpa), None, None)
        return torch.stack(caches)

    def time_modulations(self, cond: torch.Tensor) -> torch.Tensor:
        """Every adaRMS norm's ``dense(cond)`` of this (expert) stack, stacked in the order the forward pass
        reads them: layer i's ``input_layernorm`` at 2i, its ``post_attention_layernorm`` at 2i+1, the final
        ``norm`` last. cond [B, cond_dim] -> float32 [2 * depth + 1, B, 3 * width]. Raises TypeError for a
        stack with plain RMSNorms (the prefix LLM)."""
        if not isinstance(self.norm, AdaRMSNorm):
            raise TypeError("time_modulations needs the adaRMS (expert) stack")
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        return torch.stack([n.modulation(cond) for n in [*norms, self.norm]])

    def suffix_hidden(
        self, embeds: torch.Tensor, cond: torch.Tensor | None, kv_cache: torch.Tensor, prefix_mask: torch.Tensor,
        modulations: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert pass over the H suffix tokens attending the prefix cache -> final-norm hidden [B, H, W].

        Either ``cond`` [B, cond_dim] (each adaRMS norm applies its dense) or ``modulations``, the
        :meth:`time_modulations` of that cond computed beforehand (then ``cond`` is not read)."""
        mods: list[torch.Tensor | None] = (  # without either, the first AdaRMSNorm raises ValueError
            [None] * (2 * len(self.layers) + 1) if modulations is None else list(modulations.unbind(0)))
        num_valid = prefix_mask.to(torch.int32).sum(-1, keepdim=True, dtype=torch.int32)  # [B, 1]
        h_len = embeds.shape[1]
        positions = num_valid + torch.arange(h_len, dtype=torch.int32, device=embeds.device)[None, :]
        cos, sin = self.rope(positions)
        suffix_valid = torch.ones_like(embeds[:, :, 0], dtype=torch.bool)
        bias = mask_to_bias(torch.cat([prefix_mask, suffix_valid], dim=-1))[:, None, :]  # [B, 1, P+H]
        x = embeds.to(self.dtype)
        kv_cache = kv_cache.to(self.dtype)
        for i, layer in enumerate(self.layers):
            h, gate = layer.pre_attention(x, cond, mods[2 * i])
            q, k, v = layer.qkv(h, cos, sin)
            k = torch.cat([kv_cache[i, 0], k], dim=2)
            v = torch.cat([kv_cache[i, 1], v], dim=2)
            attn = attend(q, k, v, bias, self.cfg.head_dim**-0.5, sdpa=self.sdpa)
            x = layer.post_attention(x, attn, gate, cond, mods[2 * i + 1])
        return _norm(self.norm, x, cond, mods[-1])[0]
