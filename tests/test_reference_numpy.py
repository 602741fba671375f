"""The action-expert path against a float64 numpy implementation written from the spec (§3.1, §3.3, §3.6).

The prefix is checked against transformers' Gemma and SigLIP elsewhere; the expert (adaRMS
[scale|shift|gate] order, gated residuals, sin|cos time embedding with its periods, the final swish,
suffix positions and masks) has no public implementation to compare with, so this one uses only the
state-dict tensors looked up by their openpi key names, nothing from ``pi05_export.model``.
"""

from __future__ import annotations

import numpy as np
import torch

from pi05_export.metrics import compare, describe
from tests.tolerances import REF_ATOL

EXPERT = "paligemma_with_expert.gemma_expert.model."


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _swish(x):
    return x / (1 + np.exp(-x))


def _rope(x, pos, theta=10_000.0):
    """x [B, heads, T, D]; rotate-half over all D dims; pos [B, T]."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None, :, None] * inv
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def numpy_velocity(sd, cfg, x_t, t, kv, prefix_mask):
    w = {k: v.double().numpy() for k, v in sd.items()}
    lin = lambda name, x: x @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)  # noqa: E731
    width, heads, hd = cfg.expert.width, cfg.expert.num_heads, cfg.expert.head_dim
    # time: sin|cos of 2*pi*t/period, periods 4e-3 .. 4.0 geometric; then swish(out(swish(in(.))))
    # the frequencies as openpi's JAX posemb_sincos computes them (float32 throughout), then float64
    f32 = np.float32
    frac = np.linspace(0.0, 1.0, width // 2, dtype=f32)
    period = f32(4e-3) * f32(4.0 / 4e-3) ** frac
    freq = (f32(1.0) / period * f32(2.0) * f32(np.pi)).astype(np.float64)
    arg = t[:, None].astype(np.float64) * freq[None]
    c = _swish(lin("time_mlp_out", _swish(lin("time_mlp_in", np.concatenate([np.sin(arg), np.cos(arg)], -1)))))
    x = lin("action_in_proj", x_t)
    b, h = x.shape[:2]
    pos = prefix_mask.sum(-1, keepdims=True) + np.arange(h)[None]
    allowed = np.concatenate([prefix_mask, np.ones((b, h), bool)], -1)[:, None, None, :]

    def ada(name, x):
        scale, shift, gate = np.split(lin(name + ".dense", c)[:, None, :], 3, axis=-1)
        y = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
        return y * (1 + scale) + shift, gate

    for layer in range(cfg.expert.depth):
        p = f"{EXPERT}layers.{layer}."
        y, gate = ada(p + "input_layernorm", x)
        q = lin(p + "self_attn.q_proj", y).reshape(b, h, heads, hd).transpose(0, 2, 1, 3)
        k = lin(p + "self_attn.k_proj", y).reshape(b, h, 1, hd).transpose(0, 2, 1, 3)
        v = lin(p + "self_attn.v_proj", y).reshape(b, h, 1, hd).transpose(0, 2, 1, 3)
        q, k = _rope(q, pos), _rope(k, pos)
        k = np.concatenate([kv[layer, 0], k], 2)
        v = np.concatenate([kv[layer, 1], v], 2)
        logits = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        att = (probs @ v).transpose(0, 2, 1, 3).reshape(b, h, heads * hd)
        x = x + lin(p + "self_attn.o_proj", att) * gate
        y, gate = ada(p + "post_attention_layernorm", x)
        x = x + lin(p + "mlp.down_proj", _gelu_tanh(lin(p + "mlp.gate_proj", y)) * lin(p + "mlp.up_proj", y)) * gate
    y, _ = ada(EXPERT + "norm", x)
    return lin("action_out_proj", y)


def test_expert_denoise_step_matches_numpy_spec(tiny_model, tiny_obs):
    t_obs = tiny_obs.torch()
    with torch.no_grad():
        kv, pm = tiny_model.encode_observation(t_obs["images"], t_obs["image_mask"], t_obs["tokens"], t_obs["token_mask"])
        for t in ([1.0, 1.0], [0.63, 0.1]):
            tt = torch.tensor(t)
            ours = tiny_model.denoise_step(t_obs["noise"], tt, kv, pm)
            ref = numpy_velocity(tiny_model.state_dict(), tiny_model.config, t_obs["noise"].double().numpy(),
                                 tt.double().numpy(), kv.double().numpy(), pm.numpy())
            m = compare(ours, ref)
            assert m["max_abs"] <= REF_ATOL, f"t={t}: {describe(m)}"  # fp32 model vs float64 spec
