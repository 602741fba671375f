"""Write synthetic openpi JAX (orbax) checkpoints with random weights, for tests and benchmarks.

The tree is written straight from openpi's module definitions (``pi05_model_spec.md`` section 4.2),
independently of :mod:`pi05_export.convert`'s key map, so converting it is a real check of that map:

    <ckpt>/params/                       orbax PyTree checkpoint, top-level item "params"
    <ckpt>/assets/<asset_id>/norm_stats.json

``value_suffix=True`` adds the trailing ``/value`` that nnx ``save_state`` (openpi training) puts on
every leaf. Needs the ``[jax]`` extra (orbax-checkpoint).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.config import Pi05Config

IMG = "PaliGemma/img"
BLOCK = "PaliGemma/img/Transformer/encoderblock"
LLM = "PaliGemma/llm"


def jax_param_shapes(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    """Every leaf of openpi's pi05 ``params`` tree ('/'-joined path -> shape) for ``cfg``."""
    v, g, e = cfg.vision, cfg.llm, cfg.expert
    vd, p = v.depth, v.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        f"{IMG}/embedding/kernel": (p, p, 3, v.width),  # HWIO
        f"{IMG}/embedding/bias": (v.width,),
        f"{IMG}/pos_embedding": (1, v.num_patches, v.width),
        f"{IMG}/Transformer/encoder_norm/scale": (v.width,),
        f"{IMG}/Transformer/encoder_norm/bias": (v.width,),
        f"{IMG}/head/kernel": (v.width, g.width),
        f"{IMG}/head/bias": (g.width,),
        f"{LLM}/embedder/input_embedding": (g.vocab_size, g.width),
        f"{LLM}/final_norm/scale": (g.width,),
        f"{LLM}/final_norm_1/Dense_0/kernel": (e.width, 3 * e.width),
        f"{LLM}/final_norm_1/Dense_0/bias": (3 * e.width,),
        "action_in_proj/kernel": (cfg.action_dim, e.width),
        "action_in_proj/bias": (e.width,),
        "action_out_proj/kernel": (e.width, cfg.action_dim),
        "action_out_proj/bias": (cfg.action_dim,),
        "time_mlp_in/kernel": (e.width, e.width),
        "time_mlp_in/bias": (e.width,),
        "time_mlp_out/kernel": (e.width, e.width),
        "time_mlp_out/bias": (e.width,),
    }
    for ln in ("LayerNorm_0", "LayerNorm_1"):
        shapes[f"{BLOCK}/{ln}/scale"] = (vd, v.width)
        shapes[f"{BLOCK}/{ln}/bias"] = (vd, v.width)
    shapes[f"{BLOCK}/MlpBlock_0/Dense_0/kernel"] = (vd, v.width, v.mlp_dim)
    shapes[f"{BLOCK}/MlpBlock_0/Dense_0/bias"] = (vd, v.mlp_dim)
    shapes[f"{BLOCK}/MlpBlock_0/Dense_1/kernel"] = (vd, v.mlp_dim, v.width)
    shapes[f"{BLOCK}/MlpBlock_0/Dense_1/bias"] = (vd, v.width)
    mha = f"{BLOCK}/MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):
        shapes[f"{mha}/{name}/kernel"] = (vd, v.width, v.num_heads, v.head_dim)
        shapes[f"{mha}/{name}/bias"] = (vd, v.num_heads, v.head_dim)
    shapes[f"{mha}/out/kernel"] = (vd, v.num_heads, v.head_dim, v.width)
    shapes[f"{mha}/out/bias"] = (vd, v.width)
    for sfx, m in (("", g), ("_1", e)):
        n, k, h, d, f, L = m.num_heads, m.num_kv_heads, m.head_dim, m.width, m.mlp_dim, m.depth
        shapes[f"{LLM}/layers/attn/q_einsum{sfx}/w"] = (L, n, d, h)  # BTD,NDH->BTNH
        shapes[f"{LLM}/layers/attn/kv_einsum{sfx}/w"] = (L, 2, k, d, h)  # BSD,2KDH->2BSKH
        shapes[f"{LLM}/layers/attn/attn_vec_einsum{sfx}/w"] = (L, n, h, d)  # BTNH,NHD->BTD
        shapes[f"{LLM}/layers/mlp{sfx}/gating_einsum"] = (L, 2, d, f)
        shapes[f"{LLM}/layers/mlp{sfx}/linear"] = (L, f, d)
    for norm in ("pre_attention_norm", "pre_ffw_norm"):
        shapes[f"{LLM}/layers/{norm}/scale"] = (g.depth, g.width)
        shapes[f"{LLM}/layers/{norm}_1/Dense_0/kernel"] = (e.depth, e.width, 3 * e.width)  # adaRMS, pi05
        shapes[f"{LLM}/layers/{norm}_1/Dense_0/bias"] = (e.depth, 3 * e.width)
    return shapes


def _std(path: str, shape: tuple[int, ...]) -> float:
    """Scale so a model built from these weights stays finite (fan-in scaling; small biases/norms)."""
    if path.endswith("input_embedding") or path.endswith("pos_embedding"):
        return 1.0 / math.sqrt(shape[-1])
    if path.endswith(("/scale", "/bias")):
        return 0.1
    # fan-in is the contracted dims: everything except the stacked axis and the output dims.
    if "kv_einsum" in path or "q_einsum" in path:
        fan_in = shape[-2]
    elif "attn_vec_einsum" in path or path.endswith("/out/kernel"):
        fan_in = shape[-3] * shape[-2]
    elif "embedding/kernel" in path:
        fan_in = shape[0] * shape[1] * shape[2]
    elif "/query/" in path or "/key/" in path or "/value/" in path:
        fan_in = shape[-3]
    else:
        fan_in = shape[-2]
    return (0.3 if "Dense_0" in path and "norm" in path else 1.0) / math.sqrt(fan_in)


def random_jax_params(
    cfg: Pi05Config, *, seed: int = 0, dtype: str = "float32", memmap_dir: str | Path | None = None
) -> dict[str, np.ndarray]:
    """Seeded random leaves (flat '/'-paths). ``memmap_dir`` backs each leaf by a file (full-size runs)."""
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype in ("bfloat16", "bf16") else np.dtype(dtype)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, (path, shape) in enumerate(jax_param_shapes(cfg).items()):
        if memmap_dir is not None:
            arr: np.ndarray = np.lib.format.open_memmap(
                Path(memmap_dir) / f"{i:03d}.npy", mode="w+", dtype=np_dtype, shape=shape
            )
        else:
            arr = np.empty(shape, np_dtype)
        flat = arr.reshape(-1)
        std = _std(path, shape)
        for start, stop in _blocks(flat.size, 1 << 26):
            flat[start:stop] = (rng.standard_normal(stop - start, dtype=np.float32) * std).astype(np_dtype)
        out[path] = np.asarray(arr)
    return out


def _map_leaves(tree: dict, fn: Callable[[np.ndarray], Any]) -> dict:  # type: ignore[type-arg]
    return {k: _map_leaves(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def write_orbax_checkpoint(
    ckpt_dir: str | Path,
    params: dict[str, np.ndarray],
    *,
    value_suffix: bool = False,
    asset_id: str | None = "synthetic",
    action_dim: int = 32,
    chunk_byte_size: int | None = None,
    save_concurrent_gb: int | None = None,
) -> Path:
    """Save ``params`` (flat '/'-paths) as ``<ckpt_dir>/params`` (item "params") plus norm-stats assets.

    ``chunk_byte_size`` caps orbax's storage chunks (training runs write one chunk per device shard);
    ``save_concurrent_gb`` caps the bytes orbax serialises at once (full-size writes on small hosts).
    """
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).absolute()
    tree: dict = {}
    for path, arr in params.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = {"value": arr} if value_suffix else arr
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    item = {"params": tree}
    save_args = {"params": _map_leaves(tree, lambda _: ocp.SaveArgs(chunk_byte_size=chunk_byte_size))}
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=save_concurrent_gb)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(ckpt_dir / "params", args=ocp.args.PyTreeSave(item, save_args=save_args))
    if asset_id is not None:
        stats = {
            name: {
                "mean": [0.0] * action_dim, "std": [1.0] * action_dim,
                "q01": [-1.0] * action_dim, "q99": [1.0] * action_dim,
            }
            for name in ("state", "actions")
        }
        assets = ckpt_dir / "assets" / asset_id
        assets.mkdir(parents=True, exist_ok=True)
        (assets / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}, indent=2))
    return ckpt_dir
