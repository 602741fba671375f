"""Model configuration: frozen dataclasses, named presets and openpi variant names.

A config fully determines every parameter shape. It can come from a preset (``pi05``, ``tiny``),
from a JSON/YAML file with explicit dimensions or openpi variant names, or from a checkpoint's
``config.json`` (openpi or lerobot flavour, see :mod:`pi05_export.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pi05_export.errors import ConfigError


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(
                f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}",
                hint="fix the value in the config file",
            )


@dataclass(frozen=True, kw_only=True)
class SiglipConfig:
    """SigLIP vision tower (So400m/14 at full size)."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    eps: float = 1e-6
    head_dim: int = field(init=False)
    num_patches: int = field(init=False)

    def __post_init__(self) -> None:
        _check_positive(self, "width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size")
        if self.width % self.num_heads:
            raise ConfigError(
                f"vision.width {self.width} is not divisible by vision.num_heads {self.num_heads}",
                hint="pick num_heads dividing width",
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}",
                hint="use an image size that is a whole number of patches",
            )
        object.__setattr__(self, "head_dim", self.width // self.num_heads)
        object.__setattr__(self, "num_patches", (self.image_size // self.patch_size) ** 2)


@dataclass(frozen=True, kw_only=True)
class GemmaConfig:
    """A Gemma decoder stack: the PaliGemma LLM (prefix) or the action expert.

    ``vocab_size`` is 0 for the expert, which has no token embedding.
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 0
    eps: float = 1e-6
    rope_theta: float = 10_000.0
    q_width: int = field(init=False)
    kv_width: int = field(init=False)

    def __post_init__(self) -> None:
        _check_positive(self, "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}",
                hint="grouped-query attention needs num_heads = k * num_kv_heads",
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE", hint="use an even head_dim")
        object.__setattr__(self, "q_width", self.num_heads * self.head_dim)
        object.__setattr__(self, "kv_width", self.num_kv_heads * self.head_dim)


# The block of explicit dimensions this tool adds to a checkpoint's config.json (openpi/lerobot ignore it).
CHECKPOINT_CONFIG_KEY = "pi05_export"

# openpi's variant names (src/openpi/models/gemma.py get_config).
PALIGEMMA_VOCAB_SIZE = 257_152
GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, vocab_size=PALIGEMMA_VOCAB_SIZE),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096),
}


@dataclass(frozen=True, kw_only=True)
class Pi05Config:
    """The whole Pi0.5 model: vision tower, prefix LLM, action expert and I/O sizes."""

    vision: SiglipConfig = field(default_factory=SiglipConfig)
    llm: GemmaConfig = field(default_factory=lambda: GEMMA_VARIANTS["gemma_2b"])
    expert: GemmaConfig = field(default_factory=lambda: GEMMA_VARIANTS["gemma_300m"])
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 200
    num_views: int = 3
    num_steps: int = 10
    prefix_len: int = field(init=False)

    def __post_init__(self) -> None:
        _check_positive(self, "action_dim", "action_horizon", "max_token_len", "num_views", "num_steps")
        if self.llm.vocab_size <= 0:
            raise ConfigError("llm.vocab_size must be positive (the prefix LLM embeds tokens)", hint="set llm.vocab_size")
        if self.llm.depth != self.expert.depth:
            raise ConfigError(
                f"llm.depth {self.llm.depth} != expert.depth {self.expert.depth}",
                hint="the expert attends the LLM's KV cache layer by layer, so both must have the same depth",
            )
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self.llm, name) != getattr(self.expert, name):
                raise ConfigError(
                    f"llm.{name} {getattr(self.llm, name)} != expert.{name} {getattr(self.expert, name)}",
                    hint="the expert shares attention with the LLM; both need the same heads and head_dim",
                )
        object.__setattr__(self, "prefix_len", self.num_views * self.vision.num_patches + self.max_token_len)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> Pi05Config:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}", hint=f"valid presets: {', '.join(sorted(PRESETS))}"
            ) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pi05Config:
        """Build from a dict; sub-configs may be dicts or openpi variant names. Unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}", hint="see README 'Config files'")
        data = dict(data)
        data.pop("prefix_len", None)  # derived; present in configs we wrote ourselves
        kwargs: dict[str, Any] = {}
        sub_types = {"vision": SiglipConfig, "llm": GemmaConfig, "expert": GemmaConfig}
        for key, value in data.items():
            if key in sub_types:
                kwargs[key] = _sub_config(key, value, sub_types[key])
            elif key in _init_fields(cls):
                kwargs[key] = value
            else:
                raise ConfigError(
                    f"unknown config key {key!r}", hint=f"valid keys: {', '.join(sorted(_init_fields(cls)))}"
                )
        try:
            return cls(**kwargs)
        except TypeError as e:  # wrong value types inside dataclass checks
            raise ConfigError(f"invalid config: {e}", hint="see README 'Config files'") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Pi05Config:
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}", hint="pass an existing file") from None
        try:  # JSON first: YAML 1.1 reads JSON's 1e-06 as the string "1e-06"
            data = json.loads(text)
        except ValueError:
            data = None
        try:
            data = yaml.safe_load(text) if data is None else data  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid JSON/YAML: {e}".splitlines()[0], hint="fix the syntax") from None
        if isinstance(data, dict) and isinstance(data.get(CHECKPOINT_CONFIG_KEY), dict):  # a config.json this tool wrote
            return cls.from_dict(data[CHECKPOINT_CONFIG_KEY])
        if isinstance(data, dict) and ("paligemma_variant" in data or data.get("type") == "pi05"):
            from pi05_export.checkpoint.io import config_from_json  # an openpi-converter or lerobot config.json

            return config_from_json(data, str(path))
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {
            name: (dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
            for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> Pi05Config:
        return dataclasses.replace(self, **changes)


def _init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _sub_config(key: str, value: Any, typ: type) -> Any:
    if isinstance(value, str):
        if typ is not GemmaConfig or value not in GEMMA_VARIANTS:
            valid = ", ".join(sorted(GEMMA_VARIANTS)) if typ is GemmaConfig else "(none; give dimensions)"
            raise ConfigError(f"unknown {key} variant {value!r}", hint=f"valid variants: {valid}")
        return GEMMA_VARIANTS[value]
    if not isinstance(value, dict):
        raise ConfigError(f"config '{key}' must be a mapping or a variant name", hint="see README 'Config files'")
    derived = {k: v for k, v in value.items() if k in {f.name for f in dataclasses.fields(typ)} - _init_fields(typ)}
    value = {k: v for k, v in value.items() if k not in derived}  # e.g. head_dim written by to_dict()
    unknown = set(value) - _init_fields(typ)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in '{key}': {', '.join(sorted(unknown))}",
            hint=f"valid keys: {', '.join(sorted(_init_fields(typ)))}",
        )
    try:
        built = typ(**value)
    except TypeError as e:
        raise ConfigError(f"invalid '{key}' config: {e}", hint="see README 'Config files'") from None
    for name, given in derived.items():  # derived values may be written out, but must agree
        if getattr(built, name) != given:
            raise ConfigError(
                f"{key}.{name} is {given} but the other dimensions give {getattr(built, name)}",
                hint=f"fix or drop {key}.{name} (it is derived)",
            )
    return built


# Tiny model for tests: runs in seconds on a CPU. 8 query heads of 16 dims, so the q width (128)
# differs from both model widths (64 / 48) exactly as in the full model (2048 vs 1024).
TINY = Pi05Config(
    vision=SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=14, image_size=56),
    llm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16, vocab_size=1024),
    expert=GemmaConfig(width=48, depth=2, mlp_dim=96, num_heads=8, num_kv_heads=1, head_dim=16),
    action_dim=32,
    action_horizon=10,
    max_token_len=16,
    num_views=3,
)

PRESETS: dict[str, Pi05Config] = {"pi05": Pi05Config(), "tiny": TINY}
