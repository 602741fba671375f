"""Building blocks shared by SigLIP and both Gemma stacks.

Numerics rules (DESIGN.md): norm statistics, softmax and RoPE run in fp32 whatever the weights'
dtype; masks are additive with a finite large negative (never -inf, which turns into NaN in fp16).
Everything here is plain tensor code so that ``torch.onnx.export`` sees static control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# openpi's mask value (pi0_pytorch.py _prepare_attention_masks_4d). Finite in fp32; the softmax
# always runs in fp32, so it never has to be represented in fp16/bf16.
MASK_VALUE = -2.3819763e38


class GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class AdaRMSNorm(nn.Module):
    """Adaptive RMSNorm of the pi0.5 action expert.

    ``dense(cond)`` is split into ``[scale | shift | gate]``; the output is
    ``rmsnorm(x) * (1 + scale) + shift`` and the gate multiplies the residual branch that follows.
    The parameter is named ``dense`` exactly as in openpi (there is no ``weight``).
    """

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim, bias=True)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mod = self.dense(cond.to(self.dense.weight.dtype)).float()[:, None, :]
        scale, shift, gate = mod.chunk(3, dim=-1)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * (1.0 + scale) + shift
        return y.to(x.dtype), gate.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, head_dim/2] in fp32 for integer positions [B, T]."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, heads, T, D] in fp32, cast back to x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Grouped-query attention without repeating K/V.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; bias [B, T, S] additive fp32 (or None).
    Returns [B, T, Hq*D]. QK^T and PV run in the input dtype, q pre-scaled; mask and softmax in fp32.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * t, d) * scale  # scale before QK^T (as JAX does): no fp16 overflow of raw logits
    logits = torch.matmul(qg, k.transpose(-1, -2)).float()  # [B, Hkv, G*T, S]
    logits = logits.reshape(b, hkv, g, t, -1)
    if bias is not None:
        logits = logits + bias[:, None, None]
    probs = torch.softmax(logits, dim=-1).to(v.dtype).reshape(b, hkv, g * t, -1)
    out = torch.matmul(probs, v).reshape(b, hq, t, d)
    return out.transpose(1, 2).reshape(b, t, hq * d)


def mask_to_bias(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' [B, T, S] -> additive fp32 bias with a finite large negative."""
    zero = torch.zeros((), dtype=torch.float32, device=allowed.device)
    neg = torch.full((), MASK_VALUE, dtype=torch.float32, device=allowed.device)
    return torch.where(allowed, zero, neg)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """openpi's ``posemb_sincos``: [B] -> [B, dim] = [sin(2*pi*t/p) | cos(2*pi*t/p)], in fp32.

    openpi evaluates this in float64; fp32 differs by <= ~1e-4 in the argument for t in [0, 1]
    (fp64 is not an option inside TensorRT engines). The reference and every graph use fp32.
    """
    if dim % 2:
        raise ValueError(f"time embedding dim must be even, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    freq = (2.0 * math.pi / period).to(torch.float32).to(t.device)  # fp64-exact constants
    angles = t.to(torch.float32)[:, None] * freq[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
