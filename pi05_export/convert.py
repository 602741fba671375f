"""openpi JAX (orbax) checkpoints -> PyTorch safetensors in openpi's (or lerobot's) key layout.

``convert_checkpoint(jax_ckpt, out_dir)`` reads ``<jax_ckpt>/params`` (an orbax PyTree checkpoint whose
top-level item is ``params``; leaves with or without nnx's trailing ``/value``) one leaf at a time
through TensorStore, maps every leaf with :data:`KEY_MAP` (one declarative table: JAX leaf, its
symbolic shape, PyTorch key, named transform) and streams the tensors straight into safetensors
files, so peak memory is about one block of one stacked leaf, never the whole tree.

Rules (``pi05_model_spec.md`` section 4.3) are the named :data:`TRANSFORMS`; stacked leaves (SigLIP
``encoderblock``, Gemma ``layers``) are split along axis 0, ``kv_einsum``/``gating_einsum`` along
their part axis. The architecture comes from the leaf shapes (the symbols in :data:`KEY_MAP`), so
tiny and full-size checkpoints both convert; ``config`` only cross-checks and supplies the
fields weights cannot tell (horizon, token length, views, steps). pi05 is recognised from the tree
(adaRMS ``Dense_0`` norms, ``time_mlp_*``), never from the path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi05_export.artifacts import CHECKPOINT_STAGE, Manifest, staging_dir
from pi05_export.checkpoint.io import (
    CONFIG_NAME,
    EMBED_KEY,
    EXPERT_LM_HEAD_KEY,
    INDEX_NAME,
    LEROBOT_PREFIX,
    LM_HEAD_KEY,
    WEIGHTS_NAME,
    Layout,
    checkpoint_config_json,
    known_horizons,
)
from pi05_export.checkpoint.stored import check_finite
from pi05_export.config import PRESETS, GemmaConfig, Pi05Config, SiglipConfig
from pi05_export.errors import CheckpointError, ConfigError, DependencyError, first_line

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
PRECISIONS = ("fp32", "bf16")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DEFAULT_MAX_BLOCK_BYTES = 2 * 1024**3  # most bytes of one stacked leaf held in memory at once

# -- the key map ----------------------------------------------------------------------------------
VIS = "paligemma_with_expert.paligemma.model.vision_tower.vision_model"
PROJ = "paligemma_with_expert.paligemma.model.multi_modal_projector"
LM = "paligemma_with_expert.paligemma.model.language_model"
EXP = "paligemma_with_expert.gemma_expert.model"
IMG = "PaliGemma/img"
BLK = "PaliGemma/img/Transformer/encoderblock"
MHA = "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0"
LYR = "PaliGemma/llm/layers"


def _heads_in(a: np.ndarray) -> np.ndarray:
    """Gemma ``q_einsum`` / one half of ``kv_einsum``: (N, D, H) -> Linear (N*H, D)."""
    n, d, h = a.shape
    return a.transpose(0, 2, 1).reshape(n * h, d)


def _dense_general_in(a: np.ndarray) -> np.ndarray:
    """SigLIP query/key/value ``DenseGeneral`` kernel: (D, N, H) -> Linear (N*H, D)."""
    return a.reshape(a.shape[0], -1).T


def _heads_out(a: np.ndarray) -> np.ndarray:
    """Gemma ``attn_vec_einsum`` / SigLIP ``out`` kernel: (N, H, D) -> Linear (D, N*H) (general rule)."""
    return a.reshape(-1, a.shape[-1]).T


# Named transforms, applied to one layer (and one part) of a leaf. All are pure numpy views/copies.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "T": lambda a: a.T,  # flax Dense kernel (in, out) -> Linear weight (out, in)
    "hwio_to_oihw": lambda a: a.transpose(3, 2, 0, 1),  # flax Conv kernel -> torch Conv2d weight
    "rows": lambda a: a.reshape(-1, a.shape[-1]),  # (1, N, W) position embedding -> (N, W)
    "flatten": lambda a: a.reshape(-1),  # SigLIP q/k/v bias (N, H) -> (N*H,)
    "heads_in": _heads_in,
    "dense_general_in": _dense_general_in,
    "heads_out": _heads_out,
}


@dataclass(frozen=True)
class Rule:
    """One output tensor: JAX ``leaf`` (symbolic ``shape``) -> PyTorch ``key`` via ``transform``.

    A key containing ``{i}`` marks a stacked leaf: axis 0 is the layer axis and the rule yields one
    tensor per layer. ``part`` selects an index of the next axis (``kv_einsum`` k/v, gate/up).
    Shape symbols: vision Vd/Vw/Vm/Vn/Vh/P/Np, Gemma L/N/K/H/D/F/V (prefix LLM), E/G (expert), A
    (action dim); ``"3*E"`` is three times E (adaRMS scale|shift|gate).
    """

    leaf: str
    shape: tuple[int | str, ...]
    key: str
    transform: str
    part: int | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key


def _gemma(sfx: str, out: str, d: str, f: str) -> tuple[Rule, ...]:
    """The rules shared by the prefix LLM (``sfx=""``) and the action expert (``sfx="_1"``)."""
    layer = f"{out}.layers.{{i}}"
    return (
        Rule(f"{LYR}/attn/q_einsum{sfx}/w", ("L", "N", d, "H"), f"{layer}.self_attn.q_proj.weight", "heads_in"),
        Rule(f"{LYR}/attn/kv_einsum{sfx}/w", ("L", 2, "K", d, "H"), f"{layer}.self_attn.k_proj.weight", "heads_in", 0),
        Rule(f"{LYR}/attn/kv_einsum{sfx}/w", ("L", 2, "K", d, "H"), f"{layer}.self_attn.v_proj.weight", "heads_in", 1),
        Rule(f"{LYR}/attn/attn_vec_einsum{sfx}/w", ("L", "N", "H", d), f"{layer}.self_attn.o_proj.weight", "heads_out"),
        Rule(f"{LYR}/mlp{sfx}/gating_einsum", ("L", 2, d, f), f"{layer}.mlp.gate_proj.weight", "T", 0),
        Rule(f"{LYR}/mlp{sfx}/gating_einsum", ("L", 2, d, f), f"{layer}.mlp.up_proj.weight", "T", 1),
        Rule(f"{LYR}/mlp{sfx}/linear", ("L", f, d), f"{layer}.mlp.down_proj.weight", "T"),
    )


def _linear(leaf: str, key: str, d_in: str, d_out: str, stack: str | None = None) -> tuple[Rule, ...]:
    """A flax ``Dense`` (kernel ``(in, out)``, bias ``(out,)``), optionally stacked."""
    s: tuple[str, ...] = (stack,) if stack else ()
    return (Rule(f"{leaf}/kernel", (*s, d_in, d_out), f"{key}.weight", "T"),
            Rule(f"{leaf}/bias", (*s, d_out), f"{key}.bias", "copy"))


def _norm(leaf: str, key: str, dim: str, stack: str | None = None) -> tuple[Rule, ...]:
    """A flax ``LayerNorm`` (scale, bias)."""
    s: tuple[str, ...] = (stack,) if stack else ()
    return (Rule(f"{leaf}/scale", (*s, dim), f"{key}.weight", "copy"),
            Rule(f"{leaf}/bias", (*s, dim), f"{key}.bias", "copy"))


_VL = f"{VIS}.encoder.layers.{{i}}"
KEY_MAP: tuple[Rule, ...] = (
    # SigLIP vision tower
    Rule(f"{IMG}/embedding/kernel", ("P", "P", 3, "Vw"), f"{VIS}.embeddings.patch_embedding.weight", "hwio_to_oihw"),
    Rule(f"{IMG}/embedding/bias", ("Vw",), f"{VIS}.embeddings.patch_embedding.bias", "copy"),
    Rule(f"{IMG}/pos_embedding", (1, "Np", "Vw"), f"{VIS}.embeddings.position_embedding.weight", "rows"),
    *_norm(f"{BLK}/LayerNorm_0", f"{_VL}.layer_norm1", "Vw", "Vd"),
    *_norm(f"{BLK}/LayerNorm_1", f"{_VL}.layer_norm2", "Vw", "Vd"),
    *_linear(f"{BLK}/MlpBlock_0/Dense_0", f"{_VL}.mlp.fc1", "Vw", "Vm", "Vd"),
    *_linear(f"{BLK}/MlpBlock_0/Dense_1", f"{_VL}.mlp.fc2", "Vm", "Vw", "Vd"),
    *(r for qkv, t in (("query", "q"), ("key", "k"), ("value", "v")) for r in (
        Rule(f"{MHA}/{qkv}/kernel", ("Vd", "Vw", "Vn", "Vh"), f"{_VL}.self_attn.{t}_proj.weight", "dense_general_in"),
        Rule(f"{MHA}/{qkv}/bias", ("Vd", "Vn", "Vh"), f"{_VL}.self_attn.{t}_proj.bias", "flatten"),
    )),
    Rule(f"{MHA}/out/kernel", ("Vd", "Vn", "Vh", "Vw"), f"{_VL}.self_attn.out_proj.weight", "heads_out"),
    Rule(f"{MHA}/out/bias", ("Vd", "Vw"), f"{_VL}.self_attn.out_proj.bias", "copy"),
    *_norm(f"{IMG}/Transformer/encoder_norm", f"{VIS}.post_layernorm", "Vw"),
    *_linear(f"{IMG}/head", f"{PROJ}.linear", "Vw", "D"),
    # PaliGemma Gemma (prefix LLM)
    Rule("PaliGemma/llm/embedder/input_embedding", ("V", "D"), EMBED_KEY, "copy"),
    *_gemma("", LM, "D", "F"),
    Rule(f"{LYR}/pre_attention_norm/scale", ("L", "D"), f"{LM}.layers.{{i}}.input_layernorm.weight", "copy"),
    Rule(f"{LYR}/pre_ffw_norm/scale", ("L", "D"), f"{LM}.layers.{{i}}.post_attention_layernorm.weight", "copy"),
    Rule("PaliGemma/llm/final_norm/scale", ("D",), f"{LM}.norm.weight", "copy"),
    # action expert (Gemma 300M) with adaRMS norms: pi05 has Dense_0 and no scale
    *_gemma("_1", EXP, "E", "G"),
    *_linear(f"{LYR}/pre_attention_norm_1/Dense_0", f"{EXP}.layers.{{i}}.input_layernorm.dense", "E", "3*E", "L"),
    *_linear(f"{LYR}/pre_ffw_norm_1/Dense_0", f"{EXP}.layers.{{i}}.post_attention_layernorm.dense", "E", "3*E", "L"),
    *_linear("PaliGemma/llm/final_norm_1/Dense_0", f"{EXP}.norm.dense", "E", "3*E"),
    # action / time projections
    *_linear("action_in_proj", "action_in_proj", "A", "E"),
    *_linear("action_out_proj", "action_out_proj", "E", "A"),
    *_linear("time_mlp_in", "time_mlp_in", "E", "E"),
    *_linear("time_mlp_out", "time_mlp_out", "E", "E"),
)

# Leaves that identify the model family (the path is never consulted).
PI05_MARKERS = (f"{LYR}/pre_attention_norm_1/Dense_0/kernel", "time_mlp_in/kernel")
PI0_MARKERS = ("state_proj/kernel", "action_time_mlp_in/kernel", f"{LYR}/pre_attention_norm_1/scale")


# -- reading the orbax tree -----------------------------------------------------------------------
@dataclass
class _Leaf:
    path: str  # '/'-joined, relative to the "params" item, without a trailing /value
    name: str  # TensorStore parameter name inside the checkpoint
    shape: tuple[int, ...]
    dtype: str


@dataclass
class _Source:
    params_dir: Path
    assets_dir: Path | None
    leaves: dict[str, _Leaf]
    use_ocdbt: bool
    use_zarr3: bool


def _import_orbax() -> tuple[Any, Any]:
    try:
        import orbax.checkpoint as ocp
        import tensorstore as ts
    except ImportError as e:
        raise DependencyError(
            f"converting JAX checkpoints needs orbax-checkpoint and tensorstore ({e.name or e} is not installed)",
            hint="pip install 'pi05-export[jax]'",
        ) from None
    return ocp, ts


def _locate(ckpt: Path) -> tuple[Path, Path | None]:
    """``<ckpt>/params`` (or ``ckpt`` itself when it is the params directory) and the assets dir."""
    if not ckpt.exists():
        raise CheckpointError(f"checkpoint {ckpt} does not exist", hint="check the path")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a directory", hint="pass the openpi checkpoint directory (it holds params/)")
    if (ckpt / "params").is_dir():
        params = ckpt / "params"
    elif ckpt.name == "params" and any((ckpt / n).exists() for n in ("_METADATA", "manifest.ocdbt", "checkpoint")):
        params = ckpt
    elif (ckpt / WEIGHTS_NAME).is_file() or (ckpt / INDEX_NAME).is_file():
        raise CheckpointError(
            f"{ckpt} is already a PyTorch safetensors checkpoint", hint="use it directly (pi05-export info/onnx)"
        )
    else:
        raise CheckpointError(
            f"{ckpt} is not an openpi JAX checkpoint: no params/ directory",
            hint="pass the directory that holds params/ and assets/ (e.g. .../pi05_base)",
        )
    assets = params.parent / "assets"
    return params, (assets if assets.is_dir() else None)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """orbax logs expected conditions as absl warnings; our errors say what matters, in one line."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def _read_tree(ckpt: Path) -> _Source:
    ocp, _ = _import_orbax()
    params_dir, assets_dir = _locate(ckpt)
    if not any((params_dir / n).exists() for n in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")):
        raise CheckpointError(
            f"{params_dir} is not an orbax checkpoint (no _METADATA, manifest.ocdbt or checkpoint file)",
            hint="pass an openpi JAX checkpoint directory written by orbax (params/ with _METADATA)",
        )
    try:
        with _quiet_absl(), ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir.absolute())
    except Exception as e:  # orbax raises many types for "not a checkpoint"
        first = first_line(e)
        raise CheckpointError(
            f"{params_dir} is not a readable orbax checkpoint ({first})",
            hint="pass an openpi JAX checkpoint directory written by orbax (params/ with _METADATA)",
        ) from None
    item = getattr(meta, "item_metadata", meta)  # orbax >= 0.11: StepMetadata; older: the tree itself
    tree = getattr(item, "tree", item)
    if tree is None:
        raise CheckpointError(
            f"{params_dir} is not a readable orbax checkpoint (no tree metadata)",
            hint="pass an openpi JAX checkpoint directory written by orbax (params/ with _METADATA)",
        )
    if not isinstance(tree, dict) or "params" not in tree:
        top = ", ".join(sorted(map(str, tree))) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(
            f"orbax checkpoint {params_dir} has no 'params' item (top level: {top or 'empty'})",
            hint="openpi checkpoints save the weights as {'params': ...}; is this a train_state or another item?",
        )
    leaves: dict[str, _Leaf] = {}
    for keys, md in _flatten(tree["params"]):
        if keys and keys[-1] == "value":  # nnx save_state adds /value to every leaf
            keys = keys[:-1]
        path = "/".join(keys)
        shape = getattr(md, "shape", None)
        if shape is None:
            raise CheckpointError(f"leaf {path} is not an array ({type(md).__name__})", hint="is this a pi05 params tree?")
        name = getattr(md, "name", None) or ".".join(("params", *keys))
        leaves[path] = _Leaf(path, name, tuple(int(s) for s in shape), str(np.dtype(getattr(md, "dtype", "float32"))))
    use_ocdbt = bool(ocp.type_handlers.is_ocdbt_checkpoint(params_dir.absolute()))
    return _Source(params_dir, assets_dir, leaves, use_ocdbt, bool(getattr(item, "use_zarr3", False)))


# -- LoRA ------------------------------------------------------------------------------------------
# openpi's LoRA variants fix rank and alpha per variant name (openpi src/openpi/models/gemma.py,
# get_config): rank -> (variant, alpha). The rank is read from the lora_a leaves.
LORA_VARIANTS: dict[int, tuple[str, float]] = {16: ("gemma_2b_lora", 16.0), 32: ("gemma_300m_lora", 32.0)}


@dataclass(frozen=True)
class LoraPair:
    """The unmerged LoRA factors of one base leaf (stacked over layers like the base).

    openpi (``src/openpi/models/lora.py``): ``lora_a`` has the base shape with the last axis replaced
    by the rank, ``lora_b`` the base shape with the second-to-last replaced. ``scaling`` is
    ``alpha / rank`` for attention ``Einsum`` leaves (``LoRAConfig.scaling_value``, rslora off in every
    openpi variant) and 1 for the ``FeedForward`` leaves, whose ``_dot`` adds ``x @ a @ b`` unscaled.
    ``sum_b_heads``: ``attn_vec_einsum`` (``BTNH,NHD->BTD``) contracts the heads in its ``lora_a``
    einsum (``BTNH,NHL->BTL``), so its ``lora_b`` einsum (``BTL,NLD->BTD``) sums ``lora_b`` over heads.
    """

    a: str
    b: str
    scaling: float
    sum_b_heads: bool

    def delta(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The weight delta of one layer, float32, in the base leaf's (JAX) layout: the exact linear
        map of openpi's two LoRA einsums, so ``einsum(eqn, x, w + delta)`` equals openpi's output."""
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        if self.sum_b_heads:
            b32 = b32.sum(axis=0)
        return np.matmul(a32, b32) * np.float32(self.scaling)


def _lora_base(path: str) -> str | None:
    """The base leaf of a LoRA leaf: ``.../q_einsum/lora_a`` -> ``.../q_einsum/w``,
    ``.../mlp/gating_einsum_lora_b`` -> ``.../mlp/gating_einsum``; None for other leaves."""
    parent, _, name = path.rpartition("/")
    if name in ("lora_a", "lora_b"):
        return f"{parent}/w"
    for suffix in ("_lora_a", "_lora_b"):
        if name.endswith(suffix):
            return f"{parent}/{name.removesuffix(suffix)}"
    return None


def _lora_pairs(leaves: dict[str, _Leaf]) -> dict[str, LoraPair]:
    """Base leaf -> its LoRA pair, with every shape and rank checked; one-line errors otherwise."""
    known = {r.leaf for r in KEY_MAP}
    found: dict[str, dict[str, str]] = {}
    for path in leaves:
        if "lora" not in path.rsplit("/", 1)[-1].lower():
            continue
        base = _lora_base(path)
        if base is None or base not in known:
            raise CheckpointError(f"LoRA leaf {path} has no base weight this converter knows",
                                  hint="openpi puts LoRA on the Gemma attention and MLP weights only (gemma_*_lora variants)")
        found.setdefault(base, {})[path[-1]] = path
    pairs: dict[str, LoraPair] = {}
    for base, parts in sorted(found.items()):
        if set(parts) != {"a", "b"}:
            have = next(iter(parts.values()))
            raise CheckpointError(f"LoRA leaf {have} has no lora_{'b' if 'a' in parts else 'a'} partner",
                                  hint="the checkpoint is incomplete; save the whole params tree")
        shape, a, b = leaves[base].shape, leaves[parts["a"]].shape, leaves[parts["b"]].shape
        rank = a[-1] if a else 0
        if a != (*shape[:-1], rank) or b != (*shape[:-2], rank, shape[-1]):
            raise CheckpointError(f"LoRA leaves of {base} {list(shape)} have shapes {list(a)} and {list(b)}, not openpi's "
                                  f"[..., rank] / [..., rank, {shape[-1]}] layout", hint="the checkpoint is corrupt")
        if rank not in LORA_VARIANTS:
            known_ranks = ", ".join(f"{v} rank {r} alpha {al:g}" for r, (v, al) in LORA_VARIANTS.items())
            raise CheckpointError(f"LoRA rank {rank} on {base} is not one of openpi's variants ({known_ranks}), so its "
                                  "alpha is unknown", hint="merge the LoRA weights with your training code, then convert")
        attention = "/attn/" in base
        pairs[base] = LoraPair(parts["a"], parts["b"], LORA_VARIANTS[rank][1] / rank if attention else 1.0,
                               sum_b_heads="/attn_vec_einsum" in base)
    return pairs


def _check_tree(leaves: dict[str, _Leaf]) -> None:
    """pi0 and foreign trees are errors; so is any leaf the key map does not know (LoRA leaves: see
    :func:`_lora_pairs`)."""
    lora = set()
    for pair in _lora_pairs(leaves).values():
        lora |= {pair.a, pair.b}
    leaves = {k: v for k, v in leaves.items() if k not in lora}
    pi0 = [m for m in PI0_MARKERS if m in leaves]
    if pi0:
        raise CheckpointError(
            f"this is a pi0 checkpoint, not pi05 (has {pi0[0]})", hint="pi05-export converts pi05 checkpoints only"
        )
    missing_markers = [m for m in PI05_MARKERS if m not in leaves]
    if missing_markers:
        raise CheckpointError(
            f"not a pi05 params tree: no {missing_markers[0]} (pi05 has adaRMS Dense_0 norms and time_mlp_*)",
            hint="pass an openpi pi05 checkpoint",
        )
    known = {r.leaf for r in KEY_MAP}
    unexpected = [p for p in leaves if p not in known]
    if unexpected:
        leaf = leaves[unexpected[0]]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"unexpected leaf {leaf.path} with shape {list(leaf.shape)}{more}",
            hint="this converter knows openpi's pi05 params tree only (see pi05_model_spec.md section 4.2)",
        )
    missing = sorted(known - set(leaves))
    if missing:
        shown = ", ".join(missing[:4]) + (f" ... ({len(missing)} in all)" if len(missing) > 4 else "")
        raise CheckpointError(f"checkpoint is missing {len(missing)} leaf/leaves: {shown}", hint="is the checkpoint complete?")


# -- shapes -> config -------------------------------------------------------------------------------
def _bind_dims(leaves: dict[str, _Leaf]) -> dict[str, int]:
    """Unify the leaf shapes with the symbolic shapes of :data:`KEY_MAP`.

    Each symbol takes the value most leaves agree on, so one corrupt leaf is the one named in the
    error (with its shape and the shape the other leaves imply), not a healthy leaf read after it.
    """
    votes: dict[str, dict[int, int]] = {}
    for rule in KEY_MAP:
        shape = leaves[rule.leaf].shape
        if len(shape) != len(rule.shape):
            continue
        for sym, size in zip(rule.shape, shape, strict=True):
            if isinstance(sym, str):
                factor, _, name = sym.rpartition("*")
                k = int(factor) if factor else 1
                if size % k == 0:
                    counts = votes.setdefault(name, {})
                    counts[size // k] = counts.get(size // k, 0) + 1
    dims = {name: max(counts, key=lambda v: counts[v]) for name, counts in votes.items()}
    for rule in KEY_MAP:
        shape = leaves[rule.leaf].shape
        if len(shape) != len(rule.shape) or any(_size(sym, dims) != size for sym, size in zip(rule.shape, shape, strict=True)):
            expected = ", ".join(_show(sym, dims) for sym in rule.shape)
            raise CheckpointError(
                f"leaf {rule.leaf} has shape {list(shape)}, expected [{expected}] from the other leaves",
                hint="the checkpoint is corrupt or not openpi's pi05 layout",
            )
    return dims


def _size(sym: int | str, dims: dict[str, int]) -> int | None:
    if isinstance(sym, int):
        return sym
    factor, _, name = sym.rpartition("*")
    return int(factor or 1) * dims[name] if name in dims else None


def _show(sym: int | str, dims: dict[str, int]) -> str:
    if isinstance(sym, int):
        return str(sym)
    factor, _, name = sym.rpartition("*")
    return f"{sym}={int(factor or 1) * dims[name]}" if name in dims else sym


def _infer_config(dims: dict[str, int], base: Pi05Config) -> Pi05Config:
    side = math.isqrt(dims["Np"])
    if side * side != dims["Np"]:
        raise CheckpointError(f"pos_embedding has {dims['Np']} patches, not a square grid", hint="unsupported image layout")
    if dims["Vn"] * dims["Vh"] != dims["Vw"]:
        raise CheckpointError(
            f"SigLIP heads {dims['Vn']} x {dims['Vh']} != width {dims['Vw']}", hint="unsupported vision tower"
        )
    try:
        vision = SiglipConfig(width=dims["Vw"], depth=dims["Vd"], mlp_dim=dims["Vm"], num_heads=dims["Vn"],
                              patch_size=dims["P"], image_size=side * dims["P"], eps=base.vision.eps)
        heads = {"num_heads": dims["N"], "num_kv_heads": dims["K"], "head_dim": dims["H"]}
        llm = GemmaConfig(width=dims["D"], depth=dims["L"], mlp_dim=dims["F"], vocab_size=dims["V"], **heads,
                          eps=base.llm.eps, rope_theta=base.llm.rope_theta)
        expert = GemmaConfig(width=dims["E"], depth=dims["L"], mlp_dim=dims["G"], **heads,
                             eps=base.expert.eps, rope_theta=base.expert.rope_theta)
        return base.replace(vision=vision, llm=llm, expert=expert, action_dim=dims["A"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint dimensions are not a valid pi05 model: {e.message}", hint=e.hint) from None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict):
        return [d for k in a for d in _diff(a[k], b.get(k), f"{prefix}{k}.")]
    return [f"{prefix[:-1]}: checkpoint {a}, config {b}"] if a != b else []


def _resolve_base(config: Pi05Config | str | Path | None) -> Pi05Config | None:
    if config is None or isinstance(config, Pi05Config):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    return Pi05Config.from_file(config)


# -- safetensors, streamed -----------------------------------------------------------------------------
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass
class _Planned:
    key: str  # as written (layout applied)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _SafetensorsStream:
    """Writes a known list of tensors, in order, into safetensors shards without holding them.

    The header (names, dtypes, shapes, offsets) is computed from the plan up front; each tensor's
    bytes are appended as it arrives, so memory holds one tensor at a time. The result is byte-for-byte
    what the safetensors format specifies: u64 header length, JSON header padded to 8 bytes, raw data.
    """

    def __init__(self, directory: Path, plan: list[_Planned], max_shard_bytes: int) -> None:
        self.directory = directory
        self.shards: list[list[_Planned]] = [[]]
        size = 0
        for p in plan:
            if self.shards[-1] and max_shard_bytes and size + p.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(p)
            size += p.nbytes
        n = len(self.shards)
        self.names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard = -1
        self._pos = 0
        self._file: Any = None
        self._end = 0

    def _open_next(self) -> None:
        self._close_file()
        self._shard += 1
        self._pos = 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for p in self.shards[self._shard]:
            header[p.key] = {"dtype": _ST_DTYPES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.directory / self.names[self._shard], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._end = 8 + len(raw) + offset

    def _next_planned(self) -> _Planned:
        while self._shard < 0 or self._pos >= len(self.shards[self._shard]):
            self._open_next()
        planned = self.shards[self._shard][self._pos]
        self._pos += 1
        return planned

    def write(self, key: str, tensor: torch.Tensor | None) -> None:
        """Append ``tensor`` (``None``: zeros, written as a sparse hole) under ``key``, in plan order."""
        p = self._next_planned()
        if key != p.key or (tensor is not None and (tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype)):
            got = "zeros" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise RuntimeError(f"bug: wrote {key} {got}, planned {p.key} {p.shape} {p.dtype}")
        if tensor is None:
            self._file.seek(p.nbytes, 1)
            return
        t = tensor.contiguous()
        data = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        self._file.write(data.reshape(-1).view(np.uint8).data)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.truncate(self._end)  # materialises a trailing hole
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        if self._shard != len(self.shards) - 1 or self._pos != len(self.shards[-1]):
            raise RuntimeError("bug: not every planned tensor was written")
        self._close_file()
        if len(self.names) > 1:
            weight_map = {p.key: name for name, shard in zip(self.names, self.shards, strict=True) for p in shard}
            total = sum(p.nbytes for shard in self.shards for p in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        return list(self.names)


# -- conversion --------------------------------------------------------------------------------------
def _target_dtype(key: str, precision: str) -> torch.dtype:
    from pi05_export.model.pi05 import policy_dtype

    return policy_dtype(key, torch.float32 if precision == "fp32" else torch.bfloat16)


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes: torch cannot wrap it directly
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t.to(dtype)


def _plan(leaves: dict[str, _Leaf], precision: str, layout: Layout, expert_lm_head: bool,
          cfg: Pi05Config) -> tuple[list[tuple[str, list[Rule]]], list[_Planned]]:
    """Leaf read order (each leaf once, with its rules) and every output tensor in write order."""
    by_leaf: dict[str, list[Rule]] = {}
    for rule in KEY_MAP:
        by_leaf.setdefault(rule.leaf, []).append(rule)
    order = list(by_leaf.items())
    plan: list[_Planned] = []
    for path, rules in order:
        shape = leaves[path].shape
        stacked = rules[0].stacked
        # Output shapes from a zero-stride stand-in of one layer (no data is read or allocated).
        stand_in = np.broadcast_to(np.zeros((), np.bool_), shape[1:] if stacked else shape)
        out_shapes = [tuple(_apply(rule, stand_in).shape) for rule in rules]
        for i in range(shape[0]) if stacked else [None]:
            for rule, out_shape in zip(rules, out_shapes, strict=True):
                key = rule.key.format(i=i)
                plan.append(_Planned(_out_key(key, layout), out_shape, _target_dtype(key, precision)))
    if layout is Layout.openpi and expert_lm_head:
        plan.append(_Planned(EXPERT_LM_HEAD_KEY, (cfg.llm.vocab_size, cfg.expert.width),
                             _target_dtype(EXPERT_LM_HEAD_KEY, precision)))
    return order, plan


def _apply(rule: Rule, a: np.ndarray) -> np.ndarray:
    """One output tensor from one layer (or an unstacked leaf): select the part, apply the transform."""
    if rule.part is not None:
        a = a[rule.part]
    return TRANSFORMS[rule.transform](a)


def _out_key(key: str, layout: Layout) -> str:
    if layout is Layout.lerobot:
        return LEROBOT_PREFIX + key
    return LM_HEAD_KEY if key == EMBED_KEY else key  # openpi files keep the tied weight under lm_head


def _check_plan(plan: list[_Planned], cfg: Pi05Config, layout: Layout) -> None:
    """Every key and shape of the model, exactly (a mismatch here is a bug in KEY_MAP)."""
    from pi05_export.model.pi05 import Pi05Model

    with torch.device("meta"):
        model = Pi05Model(cfg)
    expected = {_out_key(k, layout): tuple(v.shape) for k, v in model.state_dict().items()}
    got = {p.key: p.shape for p in plan if p.key != EXPERT_LM_HEAD_KEY}
    if got != expected:
        bad = sorted(set(got) ^ set(expected)) or [k for k in got if got[k] != expected[k]]
        raise RuntimeError(f"bug: KEY_MAP does not produce the model's state dict (e.g. {bad[:3]})")


def _block_layers(array: Any, depth: int, layer_bytes: int, max_block_bytes: int) -> int:
    """Layers per read: whole storage chunks along the layer axis when they fit the budget."""
    budget = max(1, max_block_bytes // max(1, layer_bytes))
    try:
        chunk = int(array.chunk_layout.read_chunk.shape[0] or depth)
    except (AttributeError, TypeError, IndexError):
        chunk = 1
    if chunk <= budget:
        return min(depth, chunk * (budget // chunk))
    return min(depth, budget)  # a chunk is larger than the budget: re-read it rather than hold it


def convert_checkpoint(
    jax_ckpt: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    layout: Layout | str = Layout.openpi,
    config: Pi05Config | str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    expert_lm_head: bool = True,
    action_horizon: int | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Convert an openpi JAX (orbax) pi05 checkpoint into a PyTorch checkpoint directory.

    ``precision``: ``fp32`` (every tensor fp32, values exactly as stored) or ``bf16`` (openpi's
    policy: bf16 except the keep-fp32 list of :func:`pi05_export.model.pi05.keeps_fp32`).
    ``config``: a Pi05Config, preset name or config file; its weight dimensions must match the
    checkpoint's, and it supplies horizon/token length/views/steps. ``action_horizon`` sets (or
    overrides) the horizon. An orbax params tree does not record the horizon, and the horizon changes
    the actions, so one of the two is required (:class:`ConfigError` otherwise); token length, views
    and steps default to openpi's pi05 values (200, 3, 10). ``manifest.extra["config_from"]`` says
    where each of those fields came from. Unmerged LoRA leaves of openpi's ``gemma_2b_lora`` /
    ``gemma_300m_lora`` variants are merged exactly (:class:`LoraPair`); NaN/inf weights are refused.
    ``max_shard_bytes``: shard with an index past this size. ``max_block_bytes``: most bytes of one
    stacked leaf read at once. ``expert_lm_head``: write openpi's unused expert ``lm_head`` as zeros
    (openpi layout only) so openpi's strict loader accepts the file. ``progress(key, i, n)`` is
    called after each tensor. Writes ``out_dir`` atomically: model.safetensors (or shards + index),
    config.json, assets/ (copied unchanged) and manifest.json.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
    try:
        layout = Layout(layout)
    except ValueError:
        raise ConfigError(f"unknown layout {layout!r}", hint="use openpi or lerobot") from None
    ocp, ts = _import_orbax()
    t0 = time.perf_counter()
    src = _read_tree(Path(jax_ckpt))
    _check_tree(src.leaves)
    lora = _lora_pairs(src.leaves)
    for leaf in src.leaves.values():
        if leaf.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise CheckpointError(f"leaf {leaf.path} has dtype {leaf.dtype}", hint="expected floating-point weights")
    dims = _bind_dims(src.leaves)
    base = _resolve_base(config)
    if base is None and action_horizon is None:
        raise ConfigError("an openpi JAX checkpoint does not record its action horizon, and the horizon changes the actions",
                          hint=f"pass --action-horizon N or --preset/--config ({known_horizons()})")
    if action_horizon is not None and base is not None:
        base = base.replace(action_horizon=action_horizon)
    fields = base or Pi05Config().replace(action_horizon=action_horizon)
    given = "given config" if isinstance(config, Pi05Config) else f"preset {config}" if config in PRESETS else f"config {config}"
    config_from = {"action_horizon": "--action-horizon" if action_horizon is not None else given,
                   "max_token_len, num_views, num_steps": given if base is not None else "openpi pi05 defaults"}
    cfg = _infer_config(dims, fields)
    if base is not None:
        diffs = _diff(cfg.to_dict(), base.to_dict())
        if diffs:
            raise ConfigError(f"checkpoint does not match the given config: {'; '.join(diffs[:4])}",
                              hint="drop --config/--preset to take the dimensions from the checkpoint")
    order, plan = _plan(src.leaves, precision, layout, expert_lm_head, cfg)
    _check_plan(plan, cfg, layout)
    log.info("pi05 checkpoint %s: %d leaves -> %d tensors, %.1fM parameters, %s", src.params_dir, len(src.leaves),
             len(plan), sum(math.prod(p.shape) for p in plan if p.key != EXPERT_LM_HEAD_KEY) / 1e6, precision)
    if lora:
        log.info("merging %d LoRA leaf pair(s) into their base weights (openpi's %s)", len(lora),
                 ", ".join(sorted({LORA_VARIANTS[src.leaves[p.a].shape[-1]][0] for p in lora.values()})))

    context = ocp.type_handlers.get_ts_context(use_ocdbt=src.use_ocdbt)
    with staging_dir(out_dir, stage=CHECKPOINT_STAGE) as tmp:
        writer = _SafetensorsStream(tmp, plan, max_shard_bytes)
        done = 0
        for path, rules in order:
            array = _open_leaf(ocp, ts, src, src.leaves[path], context)
            pair = lora.get(path)
            factors = [_read(_open_leaf(ocp, ts, src, src.leaves[f], context), src.leaves[f]) for f in (pair.a, pair.b)] if pair else []
            for i, layer in _iter_layers(array, src.leaves[path], rules[0].stacked, max_block_bytes):
                if pair is not None:  # stacked like the base: layer i of each factor
                    layer = layer.astype(np.float32) + pair.delta(*(f if i is None else f[i] for f in factors))
                for rule in rules:
                    key = rule.key.format(i=i)
                    tensor = check_finite(f"{path} -> {key}", _to_torch(_apply(rule, layer), plan[done].dtype))
                    writer.write(_out_key(key, layout), tensor)
                    done += 1
                    if progress is not None:
                        progress(key, done, len(plan))
                del layer  # a view into the block: drop it before the next block is read
        if layout is Layout.openpi and expert_lm_head:
            writer.write(EXPERT_LM_HEAD_KEY, None)
            done += 1
            if progress is not None:
                progress(EXPERT_LM_HEAD_KEY, done, len(plan))
        files = writer.close()
        (tmp / CONFIG_NAME).write_text(json.dumps(checkpoint_config_json(cfg, layout, precision), indent=2, sort_keys=True))
        if src.assets_dir is not None:
            shutil.copytree(src.assets_dir, tmp / "assets")
        manifest = Manifest(
            stage=CHECKPOINT_STAGE,
            config=cfg.to_dict(),
            source={"kind": "orbax", "path": str(Path(jax_ckpt).absolute()), "leaves": len(src.leaves),
                    "stored_dtypes": sorted({leaf.dtype for leaf in src.leaves.values()})},
            precision=precision,
            extra={"layout": layout.value, "files": files, "tensors": len(plan), "config_from": config_from,
                   "lora_merged": sorted(lora),
                   "bytes": sum(p.nbytes for p in plan), "seconds": round(time.perf_counter() - t0, 2),
                   "assets": src.assets_dir is not None},
        )
        manifest.write(tmp)
    return manifest


def _open_leaf(ocp: Any, ts: Any, src: _Source, leaf: _Leaf, context: Any) -> Any:
    from etils import epath

    info = ocp.type_handlers.ParamInfo(
        name=leaf.name, parent_dir=epath.Path(src.params_dir.absolute()), is_ocdbt_checkpoint=src.use_ocdbt,
        use_zarr3=src.use_zarr3, ts_context=context,
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=src.use_ocdbt)
    try:
        array = ts.open(spec, context=context, read=True).result()
    except Exception as e:  # TensorStore raises ValueError/OSError subclasses with long texts
        raise CheckpointError(f"cannot open leaf {leaf.path}: {first_line(e)}",
                              hint="the checkpoint is incomplete or corrupt") from None
    if tuple(array.shape) != leaf.shape:
        raise CheckpointError(f"leaf {leaf.path}: stored array has shape {list(array.shape)}, metadata says "
                              f"{list(leaf.shape)}", hint="the checkpoint is corrupt")
    return array


def _iter_layers(array: Any, leaf: _Leaf, stacked: bool, max_block_bytes: int) -> Iterator[tuple[int | None, np.ndarray]]:
    """(layer index, layer) for a stacked leaf, read in chunk-aligned blocks; (None, leaf) otherwise."""
    if not stacked:
        yield None, _read(array, leaf)
        return
    depth = leaf.shape[0]
    layer_bytes = math.prod(leaf.shape[1:]) * array.dtype.numpy_dtype.itemsize
    step = _block_layers(array, depth, layer_bytes, max_block_bytes)
    for start in range(0, depth, step):
        block = _read(array[start : min(depth, start + step)], leaf)
        for j in range(block.shape[0]):
            yield start + j, block[j]
        del block


def _read(view: Any, leaf: _Leaf) -> np.ndarray:
    try:
        return np.asarray(view.read().result())
    except Exception as e:
        raise CheckpointError(f"cannot read leaf {leaf.path}: {first_line(e)}",
                              hint="the checkpoint is incomplete or corrupt") from None
