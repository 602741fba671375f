"""NVFP4 math in plain PyTorch: the CPU path of ``quantize`` and the reference for exported graphs.

NVFP4 = FP4 E2M1 values in blocks of 16 along the last axis, one FP8-E4M3 scale per block, and one
fp32 global scale per tensor (``global_amax / (6 * 448)``). ModelOpt's dynamic block quantizer
asserts CUDA tensors, so on machines without a GPU :func:`register_emulation_backend` plugs this
emulation into ModelOpt as a quant backend; on a GPU ModelOpt's own kernels run and
``docs/nvfp4_parity.md`` records how closely the two agree.

The rounding follows ModelOpt's kernels: block scale ``fp8(min(block_amax / (6 * gs), 448)) * gs``
(a dequantized scale below 1e-5 is replaced by 1), magnitudes rounded to the nearest E2M1 value with
ties to the even mantissa.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16
EMULATION_BACKEND = "pi05_nvfp4_emulated"
MIN_SCALE = 1e-5  # ModelOpt's kernels use 1.0 instead of a dequantized block scale below this
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_e2m1(mag: torch.Tensor) -> torch.Tensor:
    """Round non-negative magnitudes to the E2M1 grid, ties to the even mantissa, saturating at 6.

    Written as ``round(m / step) * step`` with step 0.5 below 2, 1 below 4, else 2 (round-half-even),
    which is exactly what the ONNX emulation graph computes with Div/Round/Mul.
    """
    m = mag.clamp(max=E2M1_MAX)
    step = torch.where(m < 2.0, 0.5, torch.where(m < 4.0, 1.0, 2.0)).to(m.dtype)
    return torch.round(m / step) * step


def global_scale(global_amax: torch.Tensor) -> torch.Tensor:
    gs = global_amax.float().reshape(()) / (E2M1_MAX * E4M3_MAX)
    return torch.where(gs > 0, gs, torch.full_like(gs, 1e-12))


def block_scales(x: torch.Tensor, gs: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block FP8 scales: (scale_fp8 [..., n/block] as float8_e4m3fn, dequantized fp32 scale)."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xb.abs().amax(-1)
    s8 = (amax / (E2M1_MAX * gs)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    dq = s8.float() * gs
    return s8, dq


def nvfp4_fake_quant(x: torch.Tensor, global_amax: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize ``x`` to NVFP4 (blocks along the last axis); same shape and dtype as ``x``."""
    if x.shape[-1] % block:
        raise ValueError(f"NVFP4 needs the last dim ({x.shape[-1]}) to be a multiple of {block}")
    gs = global_scale(global_amax.to(x.device))
    _, dq = block_scales(x, gs, block)
    dq = torch.where(dq >= MIN_SCALE, dq, torch.ones_like(dq))[..., None]
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    q = round_e2m1(xb.abs() / dq) * dq
    return torch.where(xb >= 0, q, -q).reshape(x.shape).to(x.dtype)


def quantize_weight(w: torch.Tensor, global_amax: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real NVFP4 storage of a weight [out, in]: (packed uint8 [out, in/2], fp8 block scales [out, in/block], fp32 gs).

    Two E2M1 codes per byte, the first element in the low nibble (ONNX FLOAT4E2M1 packing).
    ``dequantize_weight`` of the result equals ``nvfp4_fake_quant(w)``.
    """
    gs = global_scale(global_amax)
    s8, dq = block_scales(w, gs, block)
    dq = torch.where(dq >= MIN_SCALE, dq, torch.ones_like(dq))[..., None]
    wb = w.float().reshape(*w.shape[:-1], w.shape[-1] // block, block)
    mag = round_e2m1(wb.abs() / dq)
    grid = torch.tensor(E2M1_VALUES, device=w.device)
    code = (mag[..., None] == grid).to(torch.uint8).argmax(-1).to(torch.uint8)
    code = code | (wb < 0).to(torch.uint8) << 3  # negative zero keeps its sign bit, as ModelOpt packs it
    code = code.reshape(w.shape)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    # A block whose dequantized scale is under MIN_SCALE has |w| < 6e-5, so all its codes are 0.
    return packed.contiguous(), s8, gs.reshape(1)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> float32 E2M1 values [..., n]."""
    lo, hi = packed & 0x0F, packed >> 4
    codes = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).long()
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=packed.device)
    return table[codes]


def dequantize_weight(packed: torch.Tensor, scale_fp8: torch.Tensor, gs: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    vals = unpack_e2m1(packed)
    scale = (scale_fp8.float() * gs.float().reshape(())).repeat_interleave(block, dim=-1)
    return vals * scale


def _backend_entrypoint(inputs: torch.Tensor, quantizer: object) -> torch.Tensor:
    amax = getattr(quantizer, "amax", None)
    if amax is None:  # not calibrated yet: pass through (ModelOpt disables quant while calibrating)
        return inputs
    return nvfp4_fake_quant(inputs, amax)


def register_emulation_backend() -> str:
    """Register the emulation as a ModelOpt quant backend (idempotent) and return its name."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    if not is_registered_quant_backend(EMULATION_BACKEND):
        register_quant_backend(EMULATION_BACKEND, _backend_entrypoint)
    return EMULATION_BACKEND
