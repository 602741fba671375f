"""Robot profiles: which keys a robot sends, how they map onto the model, and what goes back.

A profile is data (``robots/<name>.yaml`` here, or a user's YAML file), never a code branch. The
shipped ones reproduce openpi's ``pi05_libero``, ``pi05_droid`` and ``pi05_aloha`` configs
(``src/openpi/training/config.py`` and ``src/openpi/policies/{libero,droid,aloha}_policy.py`` at
openpi@15a9616; ``shared/reference/openpi_policy_serving_spec.md`` sections 3.1-3.5).

YAML fields (unknown keys are errors):

=====================  =====================================================================
``name``               profile name (``--robot NAME``)
``description``        one line
``asset_id``           ``<checkpoint>/assets/<asset_id>/norm_stats.json`` holds its norm stats
``action_horizon``     the horizon the openpi config trains with (a mismatch with the model warns)
``action_dim``         robot action dims returned (the first ``action_dim`` of the model's 32)
``state_dim``          optional: the state's dimension, checked on every request
``state_in_prompt``    openpi ``discrete_state_input``: the 256-bin state goes into the prompt
``image_layout``       ``auto`` (CHW when ``shape[0] == 3``, openpi ``_parse_image``), ``hwc`` or
                       ``chw`` (ALOHA's ``convert_image`` always rearranges CHW -> HWC)
``cameras``            one entry per camera slot, in the model's order: ``{slot, key, optional}``;
                       no ``key`` = always a black image with mask False; ``optional`` = black and
                       masked when the robot does not send it
``allowed_keys``       optional ``{group: [names]}``: a nested dict (e.g. ALOHA's ``images``) may
                       only hold these names (openpi raises on others)
``state``              keys whose values are concatenated (a 0-d value counts as one element)
``delta_action_mask``  optional, openpi ``make_bool_mask`` notation (``[6, -1, 6, -1]`` = 6 True,
                       1 False, ...): those action dims are deltas; the state is added back
``adapt``              optional named state/action space conversion (``aloha_pi``)
``default_prompt``     optional prompt used when a request has none (``--default-prompt`` wins)
``metadata``           the dict sent to clients on connect (ALOHA: ``reset_pose``)
=====================  =====================================================================

A key is a string (a top-level key, which may itself contain ``/`` as openpi's do) or a list of
strings (a path into nested dicts, e.g. ``[images, cam_high]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.config import load_yaml
from pi05_export.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent / "robots"
# openpi's camera slot names, in the order the model's views are laid out (model.py IMAGE_KEYS).
CAMERA_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
IMAGE_LAYOUTS = ("auto", "hwc", "chw")

KeyPath = tuple[str, ...]


def key_name(key: KeyPath) -> str:
    """How a key is written in messages: ``observation/image`` or ``images.cam_high``."""
    return ".".join(key)


@dataclass(frozen=True)
class CameraSlot:
    slot: str
    key: KeyPath | None = None
    optional: bool = False


@dataclass(frozen=True, kw_only=True)
class RobotProfile:
    name: str
    description: str = ""
    asset_id: str | None = None
    action_horizon: int | None = None
    action_dim: int
    state_dim: int | None = None
    state_in_prompt: bool = True
    image_layout: str = "auto"
    cameras: tuple[CameraSlot, ...]
    allowed_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    state: tuple[KeyPath, ...]
    delta_action_mask: tuple[bool, ...] | None = None
    adapt: str | None = None
    default_prompt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def expected_keys(self) -> list[str]:
        """Every key a request must (or may) carry, for error messages."""
        keys = [key_name(c.key) + (" (optional)" if c.optional else "") for c in self.cameras if c.key]
        return keys + [key_name(k) for k in self.state] + ["prompt"]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "asset_id": self.asset_id,
                "action_horizon": self.action_horizon, "action_dim": self.action_dim, "state_dim": self.state_dim,
                "state_in_prompt": self.state_in_prompt, "keys": self.expected_keys, "source": self.source}


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """openpi ``transforms.make_bool_mask``: ``(6, -1, 6, -1)`` -> 6 True, 1 False, 6 True, 1 False."""
    out: list[bool] = []
    for d in dims:
        out.extend([d > 0] * abs(d))
    return tuple(out)


def _key(value: Any, where: str) -> KeyPath:
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: a key must be a string or a list of strings, got {value!r}", hint="see `pi05-export robots --help`")


def profile_from_dict(data: Any, source: str) -> RobotProfile:
    """Validate a profile mapping (from YAML). Raises :class:`ConfigError` naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"robot profile {source} must be a mapping, got {type(data).__name__}", hint="see README 'Robot profiles'")
    allowed = {f.name for f in dataclasses.fields(RobotProfile)} - {"source"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"robot profile {source}: unknown field(s) {', '.join(unknown)}", hint=f"valid fields: {', '.join(sorted(allowed))}")
    for req in ("name", "action_dim", "cameras", "state"):
        if req not in data:
            raise ConfigError(f"robot profile {source}: missing field '{req}'", hint="see README 'Robot profiles'")
    d = dict(data)
    try:
        cams = []
        for i, c in enumerate(d["cameras"]):
            if not isinstance(c, dict) or "slot" not in c or set(c) - {"slot", "key", "optional"}:
                raise ConfigError(f"robot profile {source}: cameras[{i}] must be {{slot, key, optional}}", hint="see README 'Robot profiles'")
            cams.append(CameraSlot(str(c["slot"]), _key(c["key"], f"{source} cameras[{i}]") if c.get("key") is not None else None,
                                   c.get("optional", False)))
        d["cameras"] = tuple(cams)
        if not isinstance(d["state"], list) or not d["state"]:
            raise ConfigError(f"robot profile {source}: 'state' must be a non-empty list of keys", hint="e.g. state: [observation/state]")
        d["state"] = tuple(_key(k, f"{source} state") for k in d["state"])
        groups = d.get("allowed_keys") or {}
        if not isinstance(groups, dict):
            raise ConfigError(f"robot profile {source}: 'allowed_keys' must be a mapping", hint="e.g. allowed_keys: {images: [cam_high]}")
        d["allowed_keys"] = {str(k): tuple(str(x) for x in v) for k, v in groups.items()}
        if d.get("delta_action_mask") is not None:
            d["delta_action_mask"] = make_bool_mask(*(int(x) for x in d["delta_action_mask"]))
        d["metadata"] = dict(d.get("metadata") or {})
        profile = RobotProfile(**d, source=source)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"robot profile {source} is invalid: {e}", hint="see README 'Robot profiles'") from None
    _check(profile)
    return profile


def _check(p: RobotProfile) -> None:
    where = f"robot profile {p.source}"
    for name, typ in (("name", str), ("description", str), ("asset_id", (str, type(None))), ("state_in_prompt", bool),
                      ("image_layout", str), ("adapt", (str, type(None))), ("default_prompt", (str, type(None)))):
        if not isinstance(getattr(p, name), typ):
            raise ConfigError(f"{where}: {name} must be a {'boolean' if typ is bool else 'string'}, got {getattr(p, name)!r}",
                              hint="fix the profile (YAML true/false for booleans)")
    if not all(isinstance(c.optional, bool) for c in p.cameras):
        raise ConfigError(f"{where}: a camera's 'optional' must be true or false", hint="fix the profile")
    try:
        from pi05_export.wire import packb

        packb(p.metadata)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: metadata cannot be sent to clients ({e})", hint="use numbers, strings, lists and maps") from None
    for name in ("action_dim", "action_horizon", "state_dim"):
        v = getattr(p, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"{where}: {name} must be a positive integer, got {v!r}", hint="fix the profile")
    slots = tuple(c.slot for c in p.cameras)
    if slots != CAMERA_SLOTS[: len(slots)] or not slots:
        raise ConfigError(f"{where}: cameras must list the slots in model order {list(CAMERA_SLOTS)}, got {list(slots)}",
                          hint="one entry per slot; leave 'key' out for a slot the robot does not have")
    if p.image_layout not in IMAGE_LAYOUTS:
        raise ConfigError(f"{where}: image_layout {p.image_layout!r}", hint=f"use one of: {', '.join(IMAGE_LAYOUTS)}")
    if p.delta_action_mask is not None and len(p.delta_action_mask) > p.action_dim:
        raise ConfigError(f"{where}: delta_action_mask covers {len(p.delta_action_mask)} dims, more than action_dim {p.action_dim}",
                          hint="shorten the mask")
    if p.adapt is not None and p.adapt not in ADAPTERS:
        raise ConfigError(f"{where}: unknown adapt {p.adapt!r}", hint=f"known: {', '.join(ADAPTERS)}")
    if p.adapt == "aloha_pi" and (p.action_dim < 14 or (p.state_dim or 14) != 14):
        raise ConfigError(f"{where}: adapt aloha_pi needs a 14-dim state and >= 14 action dims", hint="fix state_dim/action_dim")


def shipped_profiles() -> dict[str, RobotProfile]:
    out = {}
    for f in sorted(PROFILE_DIR.glob("*.yaml")):
        p = profile_from_dict(load_yaml(f, "robot profile")[0], f.name)
        out[p.name] = p
    return out


def load_profile(name_or_path: str | Path) -> RobotProfile:
    """A shipped profile by name (``libero``, ``droid``, ``aloha``) or a user's YAML file.

    Raises :class:`ConfigError` for an unknown name (listing the known ones) or an invalid file.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or path.is_file():
        return profile_from_dict(load_yaml(path, "robot profile")[0], str(path))
    profiles = shipped_profiles()
    if text not in profiles:
        raise ConfigError(f"unknown robot {text!r}", hint=f"known robots: {', '.join(profiles)}; or pass a profile YAML file")
    return profiles[text]


# ---------------------------------------------------------------------------------------------
# Named state/action space conversions (openpi policies/aloha_policy.py, adapt_to_pi=True).
# ---------------------------------------------------------------------------------------------
# aloha_policy.py L104-106: joints whose sign differs between ALOHA and Pi's internal space.
ALOHA_JOINT_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], dtype=np.float64)
ALOHA_GRIPPER_DIMS = (6, 13)
# aloha_policy.py L117-150: ALOHA gripper constants.
_GRIPPER_LINEAR = (0.01844, 0.05800)  # normalized [0, 1] -> linear position (m)
_ARM_LENGTH, _HORN_RADIUS = 0.036, 0.022
_GRIPPER_ANGULAR = (0.5476, 1.6296)  # radians -> Pi's [0, 1]
_PUPPET_GRIPPER = (-0.6213, 1.4910)  # PUPPET_GRIPPER_JOINT_CLOSE, _OPEN (radians)


def aloha_gripper_to_angular(value: np.ndarray) -> np.ndarray:
    """ALOHA gripper [0, 1] -> Pi's gripper [0, 1] (openpi ``_gripper_to_angular``), float64."""
    lo, hi = _GRIPPER_LINEAR
    linear = value * (hi - lo) + lo
    cos_arg = (_HORN_RADIUS**2 + linear**2 - _ARM_LENGTH**2) / (2 * _HORN_RADIUS * linear)
    radians = np.arcsin(np.clip(cos_arg, -1.0, 1.0))
    lo, hi = _GRIPPER_ANGULAR
    return (radians - lo) / (hi - lo)


def aloha_gripper_from_angular(value: np.ndarray) -> np.ndarray:
    """Pi's gripper output -> ALOHA's puppet gripper command (openpi ``_gripper_from_angular``)."""
    lo, hi = _PUPPET_GRIPPER
    return ((value + _GRIPPER_ANGULAR[0]) - lo) / (hi - lo)


def aloha_state_in(state: np.ndarray) -> np.ndarray:
    """ALOHA state [14] -> Pi space (openpi ``_decode_state``): joint flips, gripper to angular."""
    out = state * ALOHA_JOINT_FLIP
    out[..., ALOHA_GRIPPER_DIMS] = aloha_gripper_to_angular(out[..., ALOHA_GRIPPER_DIMS])
    return out


def aloha_actions_out(actions: np.ndarray) -> np.ndarray:
    """Pi-space actions [H, 14] -> ALOHA (openpi ``_encode_actions``): joint flips, gripper from angular."""
    out = actions[..., :14] * ALOHA_JOINT_FLIP
    out[..., ALOHA_GRIPPER_DIMS] = aloha_gripper_from_angular(out[..., ALOHA_GRIPPER_DIMS])
    return out


ADAPTERS = {"aloha_pi": (aloha_state_in, aloha_actions_out)}
