"""SigLIP vision tower (So400m/14 at full size) + the PaliGemma projector, openpi key names."""

from __future__ import annotations

import torch
from torch import nn

from pi05_export.config import SiglipConfig
from pi05_export.model.common import attend, fused_linear, gelu_tanh


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Patch and position embeddings stay fp32 (openpi keeps these weights fp32).
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # [N, C, h, w]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        return x + self.position_embedding.weight.to(x.dtype)[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        self.sdpa = False  # torch's fused SDPA kernels (pi05_export.model.pi05.use_sdpa); the export keeps False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)

        fused = fused_linear(self, x)  # fuse_projections: one GEMM for q, k and v
        q, k, v = fused.chunk(3, dim=-1) if fused is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        out = attend(heads(q), heads(k), heads(v), None, self.head_dim**-0.5, sdpa=self.sdpa)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(_layer_norm(self.layer_norm1, x))
        return x + self.mlp(_layer_norm(self.layer_norm2, x))


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with fp32 statistics, result in x's dtype."""
    w = norm.weight.float()
    b = norm.bias.float()
    return torch.nn.functional.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps).to(x.dtype)


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.depth))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        x = x.to(self.encoder.layers[0].self_attn.q_proj.weight.dtype)  # enter the encoder's dtype
        for layer in self.encoder.layers:
            x = layer(x)
        return _layer_norm(self.post_layernorm, x)


class VisionTower(nn.Module):
    """Holds ``vision_model`` so the key path matches HF's ``SiglipVisionModel``."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)


class Projector(nn.Module):
    def __init__(self, vision_width: int, llm_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_width, llm_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No 1/sqrt(width) scaling: openpi's patched PaliGemma removed it.
        return self.linear(x.to(self.linear.weight.dtype))
