"""Building blocks shared by SigLIP and both Gemma stacks.

Numerics rules (DESIGN.md): norm statistics, softmax and RoPE run in fp32 whatever the weights'
dtype; masks are additive with a finite large negative (never -inf, which turns into NaN in fp16).
Everything here is plain tensor code so that ``torch.onnx.export`` sees static control flow.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
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

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """``dense(cond)``: the condition [B, cond_dim] -> ``[scale | shift | gate]`` float32 [B, 3 * dim]."""
        return self.dense(cond.to(self.dense.weight.dtype)).float()

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                modulation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim] and either ``cond`` [B, cond_dim] or its precomputed :meth:`modulation` [B, 3 * dim]
        -> (normed x [B, T, dim] in x's dtype, gate [B, 1, dim] in x's dtype). Raises ValueError with neither."""
        if modulation is None:
            if cond is None:
                raise ValueError("AdaRMSNorm needs its condition or its precomputed modulation")
            modulation = self.modulation(cond)
        scale, shift, gate = modulation[:, None, :].chunk(3, dim=-1)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * (1.0 + scale) + shift
        return y.to(x.dtype), gate.to(x.dtype)


#: the non-persistent buffers holding a module's fused projection (see :func:`fuse_linear_group`)
FUSED_WEIGHT, FUSED_BIAS = "fused_weight", "fused_bias"


def fuse_linear_group(owner: nn.Module, names: Sequence[str]) -> int:
    """Concatenate the ``nn.Linear`` children ``names`` of ``owner`` (same input, e.g. q/k/v) into one
    matrix (and bias), held as non-persistent buffers of ``owner``; each child's weight and bias are
    re-pointed at their row block of it, so no memory is added, the ``state_dict`` is unchanged and the
    unfused code path reads the same values. :func:`fused_linear` then computes all of them in one GEMM.

    Left unfused (returns 0): already fused, not plain ``nn.Linear``, mixed dtype/device/bias, or forward
    hooks (the ``--keep-fp32`` input casts, which one fused GEMM would skip). Returns 1 when fused.
    A runtime step: call it with the model on its final device and dtype (``.to()`` afterwards moves the
    buffers and the parameters separately; the next eager :func:`fused_linear` call sees that they no longer
    alias and unfuses).
    """
    mods = [getattr(owner, n) for n in names]
    w0 = mods[0].weight
    if getattr(owner, FUSED_WEIGHT, None) is not None or not all(
            type(m) is nn.Linear and not m._forward_pre_hooks and not m._forward_hooks and (m.bias is None) == (mods[0].bias is None)
            and m.weight.dtype == w0.dtype and m.weight.device == w0.device for m in mods):
        return 0
    with torch.no_grad(), torch.inference_mode(False):  # plain tensors, also when called under inference_mode
        for attr, buffer in ((FUSED_WEIGHT, "weight"), (FUSED_BIAS, "bias")):
            parts = [getattr(m, buffer) for m in mods]
            if parts[0] is None:
                continue
            fused = torch.cat([p.detach() for p in parts], dim=0)
            start = 0
            for p in parts:
                p.data = fused[start:start + p.shape[0]]
                start += p.shape[0]
            owner.register_buffer(attr, fused, persistent=False)
    owner._pi05_fused_names = tuple(names)  # type: ignore[assignment]
    return 1


def unfuse_linear_group(owner: nn.Module) -> int:
    """Drop ``owner``'s fused buffers (the children keep their values); returns 1 when it was fused. For code
    that replaces parameters (a dtype cast, a quantizer): afterwards the fused matrix would be stale."""
    return 1 if pop_fused(owner) else 0


def pop_fused(owner: nn.Module) -> dict[str, torch.Tensor]:
    """Remove and return ``owner``'s fused buffers (empty when it is not fused); ``owner._buffers.update``
    of the result puts them back."""
    return {a: owner._buffers.pop(a) for a in (FUSED_WEIGHT, FUSED_BIAS) if owner._buffers.get(a) is not None}


def fused_linear(owner: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ fused_weight.T + fused_bias`` for an ``owner`` fused by :func:`fuse_linear_group` (the outputs
    of its children concatenated on the last axis), or None when ``owner`` is not fused or its children
    no longer match the fused matrix (replaced by another module type, or cast to another dtype/device
    without :func:`unfuse_linear_group`): then the caller's unfused path computes the right values."""
    weight = getattr(owner, FUSED_WEIGHT, None)
    if weight is None:
        return None
    bias = getattr(owner, FUSED_BIAS, None)
    children = [getattr(owner, name) for name in owner._pi05_fused_names]
    if any(type(c) is not nn.Linear or c.weight.dtype != weight.dtype or c.weight.device != weight.device for c in children):
        return None
    # Eager calls also check that every child still *is* its row block of the fused matrix: a deepcopy (which
    # clones parameters one by one) or load_state_dict(assign=True) replaces them, and the fused matrix would
    # be stale. Compiled code skips the check (data_ptr is not traceable): the torch runtime fuses right before
    # it compiles, and in-place weight loads (load_state_dict) write through the views into the fused matrix.
    if not torch.compiler.is_compiling() and not _aliases(children, weight, bias):
        unfuse_linear_group(owner)
        return None
    return F.linear(x, weight, bias)


def _aliases(children: Sequence[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    rows = 0
    for c in children:
        for fused, own in ((weight, c.weight), (bias, c.bias)):
            if fused is not None and (own is None or own.data_ptr() != fused[rows:rows + own.shape[0]].data_ptr()):
                return False
        rows += c.weight.shape[0]
    return True


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
           *, sdpa: bool = False) -> torch.Tensor:
    """Grouped-query attention without repeating K/V.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; bias [B, T, S] or [B, 1, S] additive fp32 (or None).
    Returns [B, T, Hq*D]. QK^T and PV run in the input dtype, q pre-scaled; mask and softmax in fp32.

    ``sdpa``: the same attention through ``torch.nn.functional.scaled_dot_product_attention`` (a fused
    kernel where the device has one: flash / memory-efficient attention, fp32 softmax inside, the scale
    applied in fp32), for the torch runtime (:func:`pi05_export.model.pi05.use_sdpa`). K/V heads are
    broadcast to the query heads (zero-stride views with one KV head, as in pi0.5; a copy otherwise), and the
    bias is passed as an additive mask in q's dtype, clamped to its finite range, so a fully masked row (a
    padded prefix token) stays finite rather than NaN (a uniform softmax in bf16/fp32; in fp16 the clamped
    mask no longer swamps the scores, which only that discarded row sees). The exported graphs keep the
    explicit form.
    """
    b, hq, t, d = q.shape
    k, v = k.to(q.dtype), v.to(q.dtype)  # a --keep-fp32 layer's K/V may meet other layers' (no-op otherwise)
    if sdpa:
        hkv = k.shape[1]
        if hkv != hq:
            k = k[:, :, None].expand(b, hkv, hq // hkv, *k.shape[2:]).reshape(b, hq, *k.shape[2:])
            v = v[:, :, None].expand(b, hkv, hq // hkv, *v.shape[2:]).reshape(b, hq, *v.shape[2:])
        mask = None
        if bias is not None:
            mask = bias.clamp_min(torch.finfo(q.dtype).min).to(q.dtype)[:, None]  # [B, 1, T or 1, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(b, t, hq * d)
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


TIME_MIN_PERIOD, TIME_MAX_PERIOD = 4e-3, 4.0  # openpi pi0.py embed_suffix: posemb_sincos(t, width, 4e-3, 4.0)


@functools.lru_cache(maxsize=8)
def time_frequencies(dim: int, min_period: float = TIME_MIN_PERIOD, max_period: float = TIME_MAX_PERIOD) -> np.ndarray:
    """The sin-cos time embedding's angular frequencies, float32 [dim // 2], computed once, exactly as
    openpi's JAX ``posemb_sincos`` does in float32 (models/pi0.py L48-63): ``fraction = linspace(0, 1,
    dim/2)``, ``period = min_period * (max_period / min_period) ** fraction``, ``freq = 1 / period * 2 * pi``
    (XLA's ``pow`` may round an element differently from numpy's by one ulp).

    The PyTorch model and every exported graph use these same values (the graphs bake them as an
    initializer), so the reference and the graphs agree bit for bit on this constant. Read-only array.
    """
    if dim % 2:
        raise ValueError(f"time embedding dim must be even, got {dim}")
    f32 = np.float32  # JAX (x64 off): the Python-float ratio is a weak scalar, everything else float32
    fraction = np.linspace(0.0, 1.0, dim // 2, dtype=f32)
    period = f32(min_period) * f32(max_period / min_period) ** fraction
    freq = (f32(1.0) / period * f32(2.0) * f32(np.pi)).astype(f32)
    freq.setflags(write=False)
    return freq


def sinusoidal_time_embedding(t: torch.Tensor, freq: tuple[float, ...] | torch.Tensor) -> torch.Tensor:
    """openpi's ``posemb_sincos``: time [B] -> [B, 2 * len(freq)] = [sin(t * freq) | cos(t * freq)], fp32.

    ``freq`` is :func:`time_frequencies`, either as the model's tuple of Python floats (exact in
    float32; torch.compile and the ONNX exporter see a plain constant and never trace its numpy math)
    or as the same values already on ``t``'s device (float32 [W/2]): a CUDA graph cannot capture the
    host-to-device copy the tuple form makes on every call.
    """
    if not isinstance(freq, torch.Tensor):
        freq = torch.tensor(freq, dtype=torch.float32, device=t.device)
    angles = t.to(torch.float32)[:, None] * freq[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
