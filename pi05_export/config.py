"""Model configuration: frozen dataclasses, named presets and openpi variant names.

A config fully determines every parameter shape. It can come from a preset (``pi05``, ``tiny``),
from a JSON/YAML file with explicit dimensions or openpi variant names, or from a checkpoint's
``config.json`` (openpi or lerobot flavour, see :mod:`pi05_export.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pi05_export.errors import ConfigError, Pi05ExportError, first_line


def check_value(name: str, value: Any, kind: str, *, minimum: int = 1) -> int | float:
    """One typed check for a config value read from a file; returns it (an int given for a float as float).

    ``kind`` is ``"int"`` (an integer >= ``minimum``; bools and 1.5 refused, never rounded) or ``"float"``
    (a finite number > 0). Raises :class:`ConfigError` naming the field, the expected type and the value,
    e.g. ``config field vision.eps must be a positive number, got 'x' (str)``.
    """
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        expected = "a positive number"
    if not ok:
        raise ConfigError(f"config field {name} must be {expected}, got {value!r} ({type(value).__name__})",
                          hint=f"fix {name} in the config file (README 'Config files')")
    return float(value) if kind == "float" else value


def _minimum(field_name: str) -> int:
    """The least value of an int config field: 1, except ``vocab_size`` (0: the expert has no embedding)."""
    return 0 if field_name == "vocab_size" else 1


def _check_fields(obj: object, prefix: str) -> None:
    """Type-check every int/float init field of a config dataclass (ints positive; ``vocab_size`` may be 0)."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.init and f.type in ("int", "float"):
            value = check_value(prefix + f.name, getattr(obj, f.name), f.type, minimum=_minimum(f.name))
            object.__setattr__(obj, f.name, value)


# The largest YAML/JSON file read as a config, recipe or robot profile (they are a few KiB).
MAX_YAML_BYTES = 1 << 20


class _AliasError(yaml.composer.ComposerError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors/aliases: ``*ref`` (and ``<<: *ref`` merges) are refused while
    composing, before anything is built, so an alias bomb ("billion laughs") cannot exhaust memory."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasError(None, None, f"alias *{event.anchor} is not accepted", event.start_mark)
        return super().compose_node(parent, index)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads `eps: 1e-6` as the string "1e-6" (it wants "1.0e-6").
_NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | Path, what: str, error: type[Pi05ExportError] = ConfigError) -> tuple[Any, bytes]:
    """Parse a YAML (or JSON) file safely: (data, raw bytes). The one loader for configs, recipes and profiles.

    Refused with ``error`` (one line naming ``what`` and the path): an unreadable file, one over
    ``MAX_YAML_BYTES``, a syntax error (with line and column), or anchors/aliases.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise error(f"{what} {path} is {path.stat().st_size} bytes, over the {MAX_YAML_BYTES} byte limit",
                        hint="a config, recipe or profile is a few KiB; pass the right file")
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}", hint="pass an existing file") from None
    try:
        return json.loads(raw), raw  # JSON first: YAML 1.1 would read a JSON 1e-06 as a string
    except ValueError:
        pass
    try:
        return yaml.load(raw, Loader=_NoAliasLoader), raw  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or first_line(e)
        hint = "write the values out: anchors and aliases are refused" if isinstance(e, _AliasError) else "fix the syntax"
        raise error(f"{what} {path} is not valid YAML/JSON: {problem}{where}", hint=hint) from None


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
        _check_fields(self, "vision.")
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
        _check_fields(self, "")  # _sub_config checks a file's values first, naming llm./expert.
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
        _check_fields(self, "")
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
        data, _ = load_yaml(path, "config file")  # YAML is a superset of JSON
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
        raise ConfigError(f"config '{key}' must be a mapping or a variant name, got {value!r} ({type(value).__name__})",
                          hint="see README 'Config files'")
    derived = {k: v for k, v in value.items() if k in {f.name for f in dataclasses.fields(typ)} - _init_fields(typ)}
    value = {k: v for k, v in value.items() if k not in derived}  # e.g. head_dim written by to_dict()
    unknown = set(value) - _init_fields(typ)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in '{key}': {', '.join(sorted(unknown))}",
            hint=f"valid keys: {', '.join(sorted(_init_fields(typ)))}",
        )
    fields_ = {f.name: f for f in dataclasses.fields(typ)}
    for name, given in value.items():  # check a file's values naming the key (llm.width, expert.eps)
        kind = str(fields_[name].type)
        if kind in ("int", "float"):
            value[name] = check_value(f"{key}.{name}", given, kind, minimum=_minimum(name))
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
