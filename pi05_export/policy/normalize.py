"""Norm stats: openpi's ``norm_stats.json`` and lerobot's saved normalizer, and their formulas.

openpi (``src/openpi/transforms.py`` L141-181, ``shared/normalize.py``; spec section 4): pi05 uses
quantile normalization, in float64, with the stats cut to the data's last dimension::

    normalize:    y = (x - q01) / (q99 - q01 + 1e-6) * 2 - 1          (not clipped)
    unnormalize:  x = (y + 1) / 2 * (q99 - q01 + 1e-6) + q01          (only the first d dims the
                                                                       stats cover; the rest pass)

lerobot (``processor/normalize_processor.py`` L349-418 at lerobot@7427f31, v0.4-0.6): the mode is
chosen per feature type in ``policy_preprocessor.json``; the stats live in the normalizer step's
``state_file`` (safetensors, keys ``<feature>.<stat>``). Supported modes: ``QUANTILES``
(``2 (x - q01) / d - 1`` with ``d = q99 - q01``, a zero ``d`` replaced by eps), ``QUANTILE10``
(q10/q90), ``MEAN_STD`` (``(x - mean) / (std + eps)``, un-normalized as ``y * std + mean``),
``MIN_MAX`` (like QUANTILES with min/max) and ``IDENTITY``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.artifacts import resolve_inside
from pi05_export.errors import InputError

OPENPI_QUANTILE_EPS = 1e-6  # openpi transforms.py L141-145, L175-181
NORM_STATS_NAME = "norm_stats.json"
LEROBOT_PREPROCESSOR = "policy_preprocessor.json"
LEROBOT_KEYS = {"state": "observation.state", "actions": "action"}  # lerobot utils/constants.py
MODES = ("openpi_quantile", "quantiles", "quantile10", "mean_std", "min_max", "identity")
_MODE_STATS = {"openpi_quantile": ("q01", "q99"), "quantiles": ("q01", "q99"), "quantile10": ("q10", "q90"),
               "mean_std": ("mean", "std"), "min_max": ("min", "max"), "identity": ()}


@dataclass(frozen=True)
class FeatureNorm:
    """How one feature (``state`` or ``actions``) is normalized: a mode, its stats (float64 [d]) and eps."""

    mode: str
    stats: dict[str, np.ndarray]
    eps: float = OPENPI_QUANTILE_EPS

    @property
    def dim(self) -> int:
        return min((len(v) for v in self.stats.values()), default=0)

    def _pair(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = (self.stats[k][:n] for k in _MODE_STATS[self.mode])
        return a, b

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """float64 [..., n] -> float64 [..., n]. Raises InputError when the stats cover fewer than n dims."""
        x = np.asarray(x, dtype=np.float64)
        if self.mode == "identity":
            return x
        n = x.shape[-1]
        if self.dim < n:
            raise InputError(f"the norm stats cover {self.dim} dims but the state has {n}",
                             hint="use the norm stats of this robot's dataset (assets/<asset_id>/norm_stats.json)")
        a, b = self._pair(n)
        if self.mode == "openpi_quantile":
            return (x - a) / (b - a + self.eps) * 2.0 - 1.0
        if self.mode == "mean_std":
            return (x - a) / (b + self.eps)
        d = np.where(b - a == 0, self.eps, b - a)
        return 2.0 * (x - a) / d - 1.0

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        """float [..., n] -> float64 [..., n]; dims beyond the stats' pass through (openpi L175-181)."""
        y = np.asarray(y, dtype=np.float64)
        if self.mode == "identity":
            return y
        d = min(self.dim, y.shape[-1])
        a, b = self._pair(d)
        head = y[..., :d]
        if self.mode == "openpi_quantile":
            head = (head + 1.0) / 2.0 * (b - a + self.eps) + a
        elif self.mode == "mean_std":
            head = head * b + a
        else:
            head = (head + 1.0) * np.where(b - a == 0, self.eps, b - a) / 2.0 + a
        return np.concatenate([head, y[..., d:]], axis=-1)


@dataclass(frozen=True)
class NormStats:
    """Norm stats for the robot state and the actions (either may be None = not normalized)."""

    state: FeatureNorm | None
    actions: FeatureNorm | None
    source: str

    def describe(self) -> str:
        parts = [f"{k} {f.mode} ({f.dim} dims)" for k, f in (("state", self.state), ("actions", self.actions)) if f]
        return f"{self.source}: " + ", ".join(parts)


def _vector(value: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where} is not a list of numbers", hint="regenerate the norm stats") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"{where} must be a non-empty 1-D list, got shape {list(arr.shape)}", hint="regenerate the norm stats")
    if not np.isfinite(arr).all():
        raise InputError(f"{where} holds NaN or inf", hint="regenerate the norm stats")
    return arr


def load_openpi_norm_stats(path: str | Path) -> NormStats:
    """openpi ``norm_stats.json``: ``{"norm_stats": {"state": {mean, std, q01, q99}, "actions": {...}}}``.

    Values are read as float64 (openpi's numpydantic arrays). Raises :class:`InputError` for an
    unreadable file, a missing ``q01``/``q99`` or non-finite values.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read norm stats {path}: {e.strerror}", hint="pass --norm-stats FILE") from None
    except ValueError as e:
        raise InputError(f"norm stats {path} is not valid JSON ({e})", hint="regenerate it with openpi's compute_norm_stats") from None
    stats = data.get("norm_stats") if isinstance(data, dict) else None
    if not isinstance(stats, dict):
        raise InputError(f"norm stats {path} has no 'norm_stats' mapping", hint="expected openpi's norm_stats.json format")
    out: dict[str, FeatureNorm | None] = {}
    for key in ("state", "actions"):
        entry = stats.get(key)
        if entry is None:
            out[key] = None
            continue
        if not isinstance(entry, dict) or entry.get("q01") is None or entry.get("q99") is None:
            raise InputError(f"norm stats {path}: '{key}' lacks q01/q99 (pi05 normalizes with quantiles)",
                             hint="recompute the stats with openpi's compute_norm_stats")
        vecs = {k: _vector(entry[k], f"{path}: {key}.{k}") for k in ("mean", "std", "q01", "q99") if entry.get(k) is not None}
        out[key] = FeatureNorm("openpi_quantile", vecs, OPENPI_QUANTILE_EPS)
    return NormStats(out["state"], out["actions"], str(path))


def load_lerobot_norm_stats(directory: str | Path) -> NormStats:
    """lerobot's saved normalizer: ``policy_preprocessor.json`` -> the ``normalizer_processor`` step's
    ``config.norm_map`` and ``state_file`` (safetensors ``observation.state.<stat>``, ``action.<stat>``).

    Raises :class:`InputError` when the step, its state file or a needed stat is missing, or the
    state file lies outside ``directory``.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    pipe_path = directory / LEROBOT_PREPROCESSOR
    try:
        pipe = json.loads(pipe_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {pipe_path} ({e})", hint="pass --norm-stats with openpi's norm_stats.json instead") from None
    steps = pipe.get("steps") if isinstance(pipe, dict) else None
    steps = steps if isinstance(steps, list) else []
    step = next((s for s in steps if isinstance(s, dict) and s.get("registry_name") == "normalizer_processor"), None)
    if step is None or not isinstance(step.get("state_file"), str):
        raise InputError(f"{pipe_path} has no normalizer step with saved stats", hint="pass --norm-stats FILE")
    config, bad = step.get("config") or {}, "re-save the policy's processors with lerobot"
    if not isinstance(config, dict) or not isinstance(config.get("norm_map") or {}, dict) or not isinstance(config.get("features") or {}, dict):
        raise InputError(f"{pipe_path}: the normalizer step's config is malformed", hint=bad)
    try:
        eps = float(config.get("eps", 1e-8))
    except (TypeError, ValueError):
        raise InputError(f"{pipe_path}: eps {config.get('eps')!r} is not a number", hint=bad) from None
    norm_map = config.get("norm_map") or {}
    features = config.get("features") or {}
    state_file = resolve_inside(directory, step["state_file"], f"{pipe_path} state_file", error=InputError)
    try:
        tensors = load_file(str(state_file))
    except FileNotFoundError:
        raise InputError(f"{pipe_path} names {step['state_file']!r}, which does not exist", hint=bad) from None
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for corrupt files)
        raise InputError(f"{state_file} is not a readable safetensors file ({type(e).__name__})", hint=bad) from None
    out: dict[str, FeatureNorm | None] = {}
    for ours, key in LEROBOT_KEYS.items():
        feature = features.get(key)
        ftype = feature.get("type", "STATE" if ours == "state" else "ACTION") if isinstance(feature, dict) else (
            "STATE" if ours == "state" else "ACTION")
        mode = str(norm_map.get(ftype, "IDENTITY")).lower()
        if mode not in _MODE_STATS or mode == "openpi_quantile":
            raise InputError(f"{pipe_path}: normalization mode {mode.upper()} for {key} is not supported",
                             hint="supported lerobot modes: QUANTILES, QUANTILE10, MEAN_STD, MIN_MAX, IDENTITY")
        if mode == "identity":
            out[ours] = None
            continue
        stats = {}
        for stat in _MODE_STATS[mode]:
            arr = tensors.get(f"{key}.{stat}")
            if arr is None:
                raise InputError(f"{pipe_path}: the saved stats lack {key}.{stat} (needed by {mode.upper()})",
                                 hint="re-save the policy's processors with lerobot")
            if arr.dtype.kind != "f":
                raise InputError(f"{pipe_path}: {key}.{stat} has dtype {arr.dtype}, expected a float", hint="re-save the processors")
            stats[stat] = _vector(arr.reshape(-1), f"{pipe_path}: {key}.{stat}")
        out[ours] = FeatureNorm(mode, stats, eps)
    return NormStats(out["state"], out["actions"], str(pipe_path))


def load_norm_stats(path: str | Path) -> NormStats:
    """A ``norm_stats.json`` file, a directory holding one, or a lerobot policy directory."""
    path = Path(path)
    if path.is_dir():
        if (path / NORM_STATS_NAME).is_file():
            return load_openpi_norm_stats(path / NORM_STATS_NAME)
        if (path / LEROBOT_PREPROCESSOR).is_file():
            return load_lerobot_norm_stats(path)
        raise InputError(f"{path} holds neither {NORM_STATS_NAME} nor {LEROBOT_PREPROCESSOR}", hint="pass --norm-stats FILE")
    if not path.is_file():
        raise InputError(f"norm stats {path} do not exist", hint="pass --norm-stats FILE (openpi assets/<asset_id>/norm_stats.json)")
    return load_openpi_norm_stats(path)


def find_norm_stats(roots: list[Path], asset_id: str | None) -> NormStats:
    """Look up a checkpoint's norm stats: ``<root>/assets/<asset_id>/norm_stats.json`` (openpi),
    then ``<root>/policy_preprocessor.json`` (lerobot), for each root in order.

    Raises :class:`InputError` naming every place looked.
    """
    looked = []
    for root in roots:
        if asset_id:
            candidate = resolve_inside(root / "assets", f"{asset_id}/{NORM_STATS_NAME}", "the robot profile's asset_id", error=InputError)
            looked.append(str(candidate))
            if candidate.is_file():
                return load_openpi_norm_stats(candidate)
        looked.append(str(root / LEROBOT_PREPROCESSOR))
        if (root / LEROBOT_PREPROCESSOR).is_file():
            return load_lerobot_norm_stats(root)
    raise InputError(f"no norm stats found (looked in {', '.join(looked) or 'nowhere'})",
                     hint="pass --norm-stats PATH (openpi norm_stats.json or a lerobot policy dir)")


def check_finite(name: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise InputError(f"{name} holds {bad} NaN/inf value(s)", hint="send finite values")


__all__ = ["FeatureNorm", "NormStats", "find_norm_stats", "load_norm_stats", "load_openpi_norm_stats",
           "load_lerobot_norm_stats", "OPENPI_QUANTILE_EPS", "MODES"]
