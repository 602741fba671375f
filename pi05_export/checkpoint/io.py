"""Checkpoint I/O.

Layouts (detected from the keys, never from the path):
- ``openpi``: keys as in openpi's ``PI0Pytorch.state_dict()``. The tied ``embed_tokens`` is stored as
  ``paligemma_with_expert.paligemma.lm_head.weight`` (safetensors keeps one name of a tied pair); the
  expert's ``lm_head`` is an unused leftover.
- ``lerobot``: the same keys under a ``model.`` prefix; ``config.json`` carries lerobot's field names.
Both may be one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pi05_export.checkpoint.stored import Stored, check_float_dtype, materialize, plan_parameters
from pi05_export.config import CHECKPOINT_CONFIG_KEY, Pi05Config, check_value
from pi05_export.dtypes import graph_dtype, torch_dtype
from pi05_export.errors import ArtifactError, CheckpointError, ConfigError, first_line

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
LEROBOT_PREFIX = "model."
EMBED_KEY = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "paligemma_with_expert.paligemma.lm_head.weight"
EXPERT_LM_HEAD_KEY = "paligemma_with_expert.gemma_expert.lm_head.weight"


class Layout(str, enum.Enum):
    openpi = "openpi"
    lerobot = "lerobot"


@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` learns from headers alone (no tensor data is read)."""

    path: Path
    layout: Layout
    files: list[Path]
    config: Pi05Config
    config_source: str
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(repr=False)  # canonical key -> (shape, dtype)
    stored: dict[str, Stored] = field(repr=False, default_factory=dict)  # canonical key -> where it is read from

    def parameter_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key, (shape, _) in self.tensors.items():
            part = component_of(key)
            if key == LM_HEAD_KEY and EMBED_KEY not in self.tensors:
                part = "llm"  # the tied token embedding, stored under the lm_head name
            counts[part] = counts.get(part, 0) + _numel(shape)
        return counts

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, dtype in self.tensors.values():
            counts[dtype] = counts.get(dtype, 0) + 1
        return counts


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def component_of(key: str) -> str:
    """Which exported component a parameter belongs to (for counts and recipes)."""
    if key in (LM_HEAD_KEY, EXPERT_LM_HEAD_KEY):
        return "unused (lm_head)"
    if ".vision_tower." in key or ".multi_modal_projector." in key:
        return "vision"
    if ".language_model." in key:
        return "llm"
    if ".gemma_expert." in key:
        return "expert"
    return "projections"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files, and for a sharded checkpoint the index's ``weight_map`` (raw key -> shard).

    Shard names come from a file, so each must stay inside the checkpoint directory
    (:func:`pi05_export.artifacts.resolve_inside`).
    """
    from pi05_export.artifacts import resolve_inside

    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a .safetensors file", hint="pass a checkpoint directory or its model.safetensors"
            )
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path")
    if (path / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                f"{path / INDEX_NAME} is not a valid safetensors index (needs a 'weight_map')",
                hint="re-create the index or remove it to use model.safetensors",
            ) from None
        shards = {name: resolve_inside(path, name, f"{INDEX_NAME} entry {key!r}", error=CheckpointError)
                  for key, name in weight_map.items()}
        files = [shards[n] for n in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}", hint="copy all shards")
        return files, {key: shards[name] for key, name in weight_map.items()}
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME], None
    if (path / "params").is_dir():
        raise CheckpointError(
            f"{path} is an openpi JAX (orbax) checkpoint, not PyTorch safetensors",
            hint=f"convert it first: pi05-export convert {path} --out DIR",
        )
    raise CheckpointError(
        f"{path} is not a checkpoint: no {WEIGHTS_NAME} or {INDEX_NAME}",
        hint="pass an openpi PyTorch or lerobot pi05 checkpoint directory",
    )


def _open(file: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({first_line(e)})",
            hint="the file is truncated or corrupt; copy or download it again",
        ) from None


def _iter_headers(files: list[Path]) -> Iterator[tuple[str, tuple[int, ...], str, Path]]:
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                yield key, tuple(sl.get_shape()), sl.get_dtype(), file


def _detect_layout(keys: list[str]) -> Layout:
    if any(k.startswith(LEROBOT_PREFIX + "paligemma_with_expert.") for k in keys):
        return Layout.lerobot
    if any(k.startswith("paligemma_with_expert.") for k in keys):
        return Layout.openpi
    sample = ", ".join(sorted(keys)[:3]) or "(no tensors)"
    raise CheckpointError(
        f"unrecognised checkpoint keys (e.g. {sample})", hint="expected openpi PyTorch or lerobot pi05 parameter names"
    )


def _canonical(key: str, layout: Layout) -> str:
    if layout is Layout.lerobot and key.startswith(LEROBOT_PREFIX):
        return key[len(LEROBOT_PREFIX) :]
    return key


def known_horizons() -> str:
    """The action horizons a user can pick from, for error hints: the presets' and openpi's per robot
    (``pi05_export/policy/robots/*.yaml``), e.g. ``"presets pi05 50, tiny 10; openpi pi05_droid 15, ..."``."""
    from pi05_export.config import PRESETS
    from pi05_export.policy.profiles import shipped_profiles

    robots = ", ".join(f"pi05_{name} {p.action_horizon}" for name, p in shipped_profiles().items() if p.action_horizon)
    return "presets " + ", ".join(f"{n} {c.action_horizon}" for n, c in PRESETS.items()) + f"; openpi {robots}"


def config_from_json(data: dict[str, Any], source: str = CONFIG_NAME) -> Pi05Config:
    """Config from an openpi-converter or lerobot ``config.json`` (plus our explicit-dims block).

    The action horizon changes the actions (not only their count), so a file without one
    (``action_horizon``, or lerobot's ``chunk_size``) is a :class:`ConfigError`, never a default.
    Raises :class:`ConfigError` naming the field for a value of the wrong type (``"chunk_size": "50"``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a JSON object, got {type(data).__name__}", hint="fix it or pass --config FILE")
    if CHECKPOINT_CONFIG_KEY in data:
        return Pi05Config.from_dict(data[CHECKPOINT_CONFIG_KEY])
    if "action_horizon" not in data and "chunk_size" not in data:
        raise ConfigError(f"{source} has no action_horizon (or chunk_size), and the horizon changes the actions",
                          hint=f"add \"action_horizon\": N to it or pass --config FILE ({known_horizons()})")
    changes: dict[str, Any] = {}
    base = Pi05Config.from_dict(
        {
            "llm": data.get("paligemma_variant", "gemma_2b"),
            "expert": data.get("action_expert_variant", "gemma_300m"),
        }
    )
    # openpi converter fields, then lerobot's names for the same things.
    for ours, names in {
        "action_dim": ("action_dim", "max_action_dim"),
        "action_horizon": ("action_horizon", "chunk_size"),
        "max_token_len": ("max_token_len", "tokenizer_max_length"),
        "num_steps": ("num_steps", "num_inference_steps"),
    }.items():
        for name in names:
            if name in data:
                changes[ours] = check_value(name, data[name], "int")
                break
    if "image_resolution" in data:
        res = data["image_resolution"]
        size = check_value("image_resolution", res[0] if isinstance(res, list) and res else res, "int")
        changes["vision"] = base.vision.__class__(**{**_vision_kwargs(base), "image_size": size})
    return base.replace(**changes)


def _vision_kwargs(cfg: Pi05Config) -> dict[str, Any]:
    v = cfg.vision
    return {k: getattr(v, k) for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size", "eps")}


def _resolve_config(ckpt_dir: Path, config: Pi05Config | str | Path | None) -> tuple[Pi05Config, str]:
    if isinstance(config, Pi05Config):
        return config, "given"
    if config is not None:
        return Pi05Config.from_file(config), str(config)
    cfg_file = ckpt_dir / CONFIG_NAME
    if cfg_file.is_file():
        try:
            data = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON ({e})", hint="fix it or pass --config FILE") from None
        return config_from_json(data, str(cfg_file)), str(cfg_file)
    raise ConfigError(f"no {CONFIG_NAME} next to the checkpoint {ckpt_dir}: its action horizon and token length are unknown",
                      hint=f"pass --config FILE (JSON/YAML with action_horizon; {known_horizons()})")


def inspect_checkpoint(path: str | Path, config: Pi05Config | str | Path | None = None) -> CheckpointInfo:
    """Read headers only: layout, config, every tensor's shape and dtype, and the file each is read from.

    In a sharded checkpoint each tensor is read from the shard ``model.safetensors.index.json`` assigns
    it to; a copy of the same name in another shard (a stale leftover) is ignored with a warning, and a
    tensor the index assigns to a shard that does not hold it is a :class:`CheckpointError`.
    """
    path = Path(path)
    files, assigned = _weight_files(path)
    raw: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    stale: list[str] = []
    for key, shape, dtype, file in _iter_headers(files):
        if assigned is not None and assigned.get(key) != file:
            owner = assigned.get(key)
            stale.append(f"{key} in {file.name} (the index names {owner.name if owner else 'no shard'})")
            continue
        raw[key] = (shape, dtype, file)
    if assigned is not None:
        absent = [k for k in assigned if k not in raw]
        if absent:
            raise CheckpointError(
                f"{INDEX_NAME} assigns {absent[0]} to {assigned[absent[0]].name}, which does not hold it"
                + (f" ({len(absent)} such tensors)" if len(absent) > 1 else ""),
                hint="the shards and the index are from different saves; copy the checkpoint again",
            )
    if stale:
        log.warning("ignoring %d tensor copy/copies outside the shard %s names: %s", len(stale), INDEX_NAME,
                    "; ".join(stale[:4]))
    layout = _detect_layout(list(raw))
    stored = {_canonical(k, layout): Stored(_canonical(k, layout), file, k, shape, dtype) for k, (shape, dtype, file) in raw.items()}
    tensors = {k: (s.shape, s.dtype) for k, s in stored.items()}
    cfg, source = _resolve_config(path if path.is_dir() else path.parent, config)
    return CheckpointInfo(path=path, layout=layout, files=files, config=cfg, config_source=source, tensors=tensors,
                          stored=stored)


def _expected_shapes(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    from pi05_export.model.pi05 import Pi05Model

    with torch.device("meta"):
        model = Pi05Model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_checkpoint(
    path: str | Path, config: Pi05Config | str | Path | None = None, dtype: str = "float32"
) -> tuple[Any, CheckpointInfo]:
    """Load a checkpoint into a :class:`Pi05Model`.

    ``dtype``: ``float32`` (everything fp32) or ``bfloat16``/``float16`` (openpi's policy: norms,
    patch/position embeddings and the four action/time projections stay fp32).
    Missing keys -> error listing them; a wrong shape -> error naming the key and both shapes;
    unexpected keys -> warning.
    """
    from pi05_export.model.pi05 import Pi05Model, policy_dtype

    target = torch_dtype(dtype)
    info = inspect_checkpoint(path, config)
    cfg = info.config
    expected = _expected_shapes(cfg)
    params, _ = plan_parameters(info.stored, info.path if info.path.is_dir() else info.path.parent)
    if EMBED_KEY not in params and LM_HEAD_KEY in params:
        params[EMBED_KEY] = params[LM_HEAD_KEY]  # tied weight stored under the lm_head name
    missing = sorted(set(expected) - set(params))
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} key(s): {shown}",
            hint=f"is this a pi05 checkpoint, and does its config match (config used: {info.config_source})?",
        )
    for key, shape in expected.items():
        got = params[key].weight.shape
        if tuple(got) != shape:
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint has {list(got)}, config expects {list(shape)}",
                hint=f"pass --config with the checkpoint's dimensions (config used: {info.config_source})",
            )
        check_float_dtype(params[key])
    extra = sorted(set(params) - set(expected) - {LM_HEAD_KEY, EXPERT_LM_HEAD_KEY})
    if extra:
        log.warning("ignoring %d unexpected key(s): %s", len(extra), ", ".join(extra[:8]))

    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open(file)) for file in info.files}

        def read(s: Stored) -> torch.Tensor:
            return handles[s.file].get_tensor(s.raw_key)

        for key in expected:
            state[key] = materialize(params[key], read, policy_dtype(key, target))
    with torch.device("meta"):
        model = Pi05Model(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), info


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def save_checkpoint(
    model: Any,
    out_dir: str | Path,
    layout: Layout | str = Layout.openpi,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    expert_lm_head: bool = True,
) -> Path:
    """Write ``model`` as an openpi or lerobot checkpoint directory (atomically).

    openpi layout stores the tied embedding under ``paligemma.lm_head.weight`` like openpi's own
    files and, with ``expert_lm_head``, a zero ``gemma_expert.lm_head.weight`` so openpi's strict
    loader accepts the file (openpi never uses it). Shards past ``max_shard_bytes`` with an index.
    """
    from safetensors.torch import save_file

    from pi05_export.artifacts import staging_dir

    layout = Layout(layout)
    cfg: Pi05Config = model.config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        target = torch_dtype(dtype)
        state = {k: v.to(target) for k, v in state.items()}
    if layout is Layout.openpi:
        state[LM_HEAD_KEY] = state.pop(EMBED_KEY)
        if expert_lm_head:
            ref = state[LM_HEAD_KEY]
            state[EXPERT_LM_HEAD_KEY] = torch.zeros(cfg.llm.vocab_size, cfg.expert.width, dtype=ref.dtype)
    else:
        state = {LEROBOT_PREFIX + k: v for k, v in state.items()}
    big = state[LM_HEAD_KEY if layout is Layout.openpi else LEROBOT_PREFIX + EMBED_KEY].dtype  # a policy-cast tensor
    config_json = checkpoint_config_json(cfg, layout, {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(big, "fp32"))

    shards = _shard(state, max_shard_bytes)
    with staging_dir(out_dir, marker=CONFIG_NAME, marker_keys=(CHECKPOINT_CONFIG_KEY,)) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True))
    return Path(out_dir)


def checkpoint_config_json(cfg: Pi05Config, layout: Layout | str, precision: str) -> dict[str, Any]:
    """``config.json`` for a checkpoint directory: openpi-converter or lerobot fields, plus our
    explicit-dimensions block (which openpi and lerobot ignore) so any size loads back."""
    layout = Layout(layout)
    if layout is Layout.openpi:
        data: dict[str, Any] = {
            "action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
            "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
            "precision": graph_dtype(precision),
        }
    else:
        data = {
            "type": "pi05", "chunk_size": cfg.action_horizon, "n_action_steps": cfg.action_horizon,
            "max_action_dim": cfg.action_dim, "max_state_dim": cfg.action_dim,
            "tokenizer_max_length": cfg.max_token_len, "num_inference_steps": cfg.num_steps,
            "image_resolution": [cfg.vision.image_size, cfg.vision.image_size],
            "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
        }
    data[CHECKPOINT_CONFIG_KEY] = cfg.to_dict()
    return data


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


# ---------------------------------------------------------------------------------------------
# Random weights (tests and full-size benchmarks: nothing can be downloaded here)
# ---------------------------------------------------------------------------------------------
def random_model(config: Pi05Config | str, seed: int = 0, *, dtype: str = "float32", device: str | torch.device = "cpu") -> Any:
    """A :class:`Pi05Model` with seeded random weights scaled so every path carries signal.

    Unlike openpi's init (zero adaRMS ``dense``, zero norm weights), every parameter is random, so
    the adaRMS gates, norms and time conditioning all affect the output and tests can see bugs.
    Each parameter is drawn in fp32 and cast straight to ``dtype`` under openpi's policy, so peak
    memory is the final model plus one fp32 tensor, and a bf16/fp16 draw equals the fp32 draw
    rounded. The same seed gives the same weights on a given device type (CPU and CUDA differ).
    """
    from pi05_export.model.pi05 import Pi05Model, policy_dtype

    cfg = Pi05Config.from_name(config) if isinstance(config, str) else config
    target = torch_dtype(dtype)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = Pi05Model(cfg)
    for name, p in list(model.named_parameters()):
        if p.ndim >= 2 and "embed" not in name:
            std = (0.3 if ".dense." in name else 1.0) / p[0].numel() ** 0.5
        elif "embed" in name:
            std = 0.5 if "position" in name else 1.0 / p.shape[-1] ** 0.5
        else:  # biases and norm weights
            std = 0.1
        value = torch.empty(p.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
        value = value.to(policy_dtype(name, target))
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(value, requires_grad=False))
    return model.eval()


def resolve_model(
    checkpoint: str | Path | None,
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
) -> tuple[Any, dict[str, Any]]:
    """The one way commands obtain a model: a checkpoint, or a preset with random weights.

    ``device`` is where random weights are drawn (on a GPU 3.35 B parameters take about a second
    instead of minutes; the values then differ from the CPU draw of the same seed, which the source
    records). Checkpoints always load on the host.

    Returns the model and a ``source`` dict for manifests.
    """
    if checkpoint is not None:
        if preset is not None or random_init:
            raise ConfigError("give either a CHECKPOINT or --preset/--random-init, not both", hint="drop one of them")
        model, info = load_checkpoint(checkpoint, config, dtype=dtype)
        return model, {"kind": "checkpoint", "path": str(info.path.absolute()), "layout": info.layout.value,
                       "config_file": str(Path(config).absolute()) if config else None, "sha256": _files_digest(info.files)}
    if preset is None and config is None:
        raise ConfigError("no model given", hint="pass a CHECKPOINT, or --preset tiny --random-init")
    if not random_init:
        raise ConfigError("--preset/--config without a checkpoint needs --random-init", hint="add --random-init --seed S")
    cfg = Pi05Config.from_file(config) if config is not None else Pi05Config.from_name(preset or "")
    source = {"kind": "random", "preset": preset, "config_file": str(Path(config).absolute()) if config else None, "seed": seed}
    device = torch.device(device)
    if device.type != "cpu":
        source["drawn_on"] = device.type
    return random_model(cfg, seed, dtype=dtype, device=device), source


def reference_model(source: dict[str, Any], checkpoint: str | Path | None = None, config: str | Path | None = None) -> Any:
    """The fp32 reference an artifact was made from (its manifest ``source``).

    ``checkpoint`` overrides where to find it (the export may have run elsewhere), but it must be
    the same weights: its sha256 is checked against the one recorded at export time.
    """
    config = config or source.get("config_file")
    if source.get("kind") == "random":
        if checkpoint is not None:
            raise ArtifactError("these artifacts were exported from random weights, not a checkpoint",
                                hint="drop --checkpoint (the reference is rebuilt from the recorded preset and seed)")
        return resolve_model(None, preset=source.get("preset"), config=config, random_init=True, seed=int(source.get("seed", 0)))[0]
    path = checkpoint or source.get("path")
    if not path or not Path(path).exists():
        raise CheckpointError(f"the checkpoint the artifacts came from ({path}) is not available", hint="pass it with --checkpoint PATH")
    # the weights' sha256 first: a wrong checkpoint is refused before minutes of loading
    if source.get("sha256") and _files_digest(_weight_files(Path(path))[0]) != source["sha256"]:
        raise ArtifactError(
            f"{path} is not the checkpoint these artifacts were exported from (sha256 differs)",
            hint="pass the exported checkpoint with --checkpoint, or re-export from this one",
        )
    return load_checkpoint(path, config)[0]


def _files_digest(files: list[Path]) -> str:
    """sha256 over the weight files (streamed)."""
    import hashlib

    from pi05_export.artifacts import sha256_file

    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()
