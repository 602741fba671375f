"""Calibration sets for ``quantize``: a directory of observation ``.npz`` files plus ``calibration.json``.

Each ``calib_NNNN.npz`` follows the observation contract of :mod:`pi05_export.observation` (images
float32 [B, V, 3, H, W] in [-1, 1], image_mask, tokens int64, token_mask, optional noise), sized for
one model config; ``calibration.json`` records that config's sizes, how the set was made and (for
the built-in photo set) the recipe to regenerate it at any image size.

The built-in set is made from the photographs bundled with scikit-image, with robot-task prompts
tokenized by a deterministic byte-level stand-in (no tokenizer can be downloaded here). It
exercises real image statistics, but for a real checkpoint build the set from your own recorded,
already-tokenized observations with :func:`build_calibration_set` (``pi05-export calibration-build``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.config import Pi05Config
from pi05_export.errors import InputError, first_line
from pi05_export.observation import Observation, load_observation, save_npz

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "calibration_sets"  # package data: in every install
META_NAME = "calibration.json"
TOKENIZER_FALLBACK = "byte-fallback-v1: ids = [2 (BOS)] + [3 + utf8 byte], 0 = pad"

# The photo set: (views as (image, crop) pairs, prompt). Crops are fractions (top, left, size) of the
# shorter side; a missing third view (image None) is masked out, as on two-camera robots.
PHOTO_SAMPLES: tuple[tuple[tuple[tuple[str | None, tuple[float, float, float]], ...], str], ...] = (
    ((("coffee", (0.0, 0.25, 1.0)), ("coffee", (0.3, 0.6, 0.6)), (None, (0, 0, 1))), "pick up the coffee cup and place it on the saucer"),
    ((("astronaut", (0.0, 0.0, 1.0)), ("astronaut", (0.05, 0.3, 0.5)), ("rocket", (0.0, 0.2, 1.0))), "hand the flag to the person on the left"),
    ((("chelsea", (0.0, 0.2, 1.0)), ("cat", (0.2, 0.35, 0.6)), (None, (0, 0, 1))), "gently push the cat toy off the table"),
    ((("rocket", (0.0, 0.3, 1.0)), ("hubble_deep_field", (0.1, 0.1, 0.7)), ("coffee", (0.0, 0.0, 0.8))), "close the lid of the box"),
    ((("immunohistochemistry", (0.0, 0.0, 1.0)), ("retina", (0.2, 0.2, 0.5)), (None, (0, 0, 1))), "move the slide under the microscope"),
    ((("colorwheel", (0.0, 0.0, 1.0)), ("astronaut", (0.4, 0.1, 0.5)), ("chelsea", (0.0, 0.0, 1.0))), "stack the red block on the blue block"),
)


def tokenize_fallback(prompt: str, max_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic byte-level tokens (NOT the PaliGemma tokenizer): [2] + [3 + byte], right-padded with 0."""
    ids = [2] + [3 + b for b in prompt.encode("utf-8")]
    if max(ids) >= vocab_size:
        ids = [i % vocab_size for i in ids]
    ids = ids[:max_len]
    tokens = np.zeros(max_len, dtype=np.int64)
    tokens[: len(ids)] = ids
    mask = np.zeros(max_len, dtype=bool)
    mask[: len(ids)] = True
    return tokens, mask


def _photo(name: str, crop: tuple[float, float, float], size: int) -> np.ndarray:
    import skimage.data
    from skimage.color import gray2rgb, rgba2rgb
    from skimage.transform import resize

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = gray2rgb(img)
    elif img.shape[-1] == 4:
        img = (rgba2rgb(img) * 255).astype(np.uint8)
    h, w = img.shape[:2]
    side = int(min(h, w) * crop[2])
    top, left = int(min(h - side, crop[0] * h)), int(min(w - side, crop[1] * w))
    patch = img[top : top + side, left : left + side].astype(np.float32) / 255.0
    out = resize(patch, (size, size), anti_aliasing=True, preserve_range=True)
    return (out.transpose(2, 0, 1) * 2.0 - 1.0).clip(-1.0, 1.0).astype(np.float32)


def photo_observations(cfg: Pi05Config, seed: int = 0) -> list[Observation]:
    """The built-in calibration samples rendered for ``cfg`` (image size, views, token length)."""
    rng = np.random.default_rng(seed)
    out = []
    for views, prompt in PHOTO_SAMPLES:
        size, v = cfg.vision.image_size, cfg.num_views
        images = np.zeros((1, v, 3, size, size), dtype=np.float32)
        image_mask = np.zeros((1, v), dtype=bool)
        for i in range(v):
            name, crop = views[i % len(views)]
            if name is not None:
                images[0, i] = _photo(name, crop, size)
                image_mask[0, i] = True
        tokens, token_mask = tokenize_fallback(f"Task: {prompt}\nAction: ", cfg.max_token_len, cfg.llm.vocab_size)
        noise = rng.standard_normal((1, cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        out.append(Observation(images, image_mask, tokens[None], token_mask[None], noise).validate(cfg, f"photo sample {prompt!r}"))
    return out


def _meta(cfg: Pi05Config, kind: str, n: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "pi05-export calibration v1",
        "kind": kind,
        "samples": n,
        "image_size": cfg.vision.image_size,
        "num_views": cfg.num_views,
        "max_token_len": cfg.max_token_len,
        "vocab_size": cfg.llm.vocab_size,
        "action_horizon": cfg.action_horizon,
        "action_dim": cfg.action_dim,
        **extra,
    }


def write_calibration_set(observations: Sequence[Observation], out_dir: str | Path, cfg: Pi05Config, meta: dict[str, Any]) -> Path:
    """Write one ``calib_NNNN.npz`` per sample (batch split) and ``calibration.json``, atomically."""
    from pi05_export.artifacts import atomic_write, staging_dir

    samples = [Observation(o.images[i : i + 1], o.image_mask[i : i + 1], o.tokens[i : i + 1], o.token_mask[i : i + 1],
                           None if o.noise is None else o.noise[i : i + 1])
               for o in observations for i in range(o.batch)]
    if not samples:
        raise InputError("no calibration samples given", hint="pass at least one observation .npz")
    with staging_dir(out_dir, marker=META_NAME, marker_keys=("format", "samples")) as tmp:
        for i, s in enumerate(samples):
            import io

            buf = io.BytesIO()
            np.savez_compressed(buf, **s.arrays())  # type: ignore[arg-type]
            atomic_write(tmp / f"calib_{i:04d}.npz", buf.getvalue())
        atomic_write(tmp / META_NAME, json.dumps(_meta(cfg, meta.pop("kind", "recorded"), len(samples), meta), indent=2, sort_keys=True))
    return Path(out_dir)


def build_calibration_set(inputs: Sequence[str | Path], out_dir: str | Path, cfg: Pi05Config, *, photos: bool = False,
                          seed: int = 0) -> Path:
    """Build a calibration set from recorded observation ``.npz`` files (validated against ``cfg``),
    or (``photos=True``) render the built-in photo set at ``cfg``'s sizes."""
    if photos:
        meta = {"kind": "photos", "tokenizer": TOKENIZER_FALLBACK, "seed": seed,
                "recipe": [{"views": [list(v) for v in views], "prompt": p} for views, p in PHOTO_SAMPLES]}
        return write_calibration_set(photo_observations(cfg, seed), out_dir, cfg, meta)
    if not inputs:
        raise InputError("no observation files given", hint="pass OBS.npz files, or --photos for the built-in set")
    files = expand_recordings(inputs)
    observations = [load_observation(p, cfg) for p in files]
    meta = {"kind": "recorded", "tokenizer": "as recorded", "sources": [str(p) for p in inputs]}
    return write_calibration_set(observations, out_dir, cfg, meta)


def expand_recordings(inputs: Sequence[str | Path]) -> list[Path]:
    """Observation files, with each directory (``pi05-export serve --record DIR``) expanded to its
    ``step_*.npz`` files in step order. Raises :class:`InputError` for an empty directory."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            steps = sorted(p.glob("step_*.npz"), key=lambda f: (len(f.stem), f.stem))  # numeric order past step 999999
            if not steps:
                raise InputError(f"{p} holds no step_*.npz recordings", hint="record with `pi05-export serve --record DIR`")
            files.extend(steps)
        else:
            files.append(p)
    return files


def load_calibration_set(directory: str | Path | None, cfg: Pi05Config, samples: int | None = None) -> tuple[list[Observation], dict[str, Any]]:
    """Calibration samples for ``cfg``: from ``directory``, else the shipped set if it fits, else the
    photo set rendered in memory for ``cfg``. Returns (observations, description for the manifest)."""
    if directory is None:
        shipped = [d for d in sorted(SHIPPED_DIR.glob("*")) if (d / META_NAME).is_file()]
        for d in shipped:
            meta = _read_meta(d / META_NAME)
            if _fits(meta, cfg):
                directory = d
                break
        else:
            obs = photo_observations(cfg)[:samples]
            return obs, {"kind": "photos (rendered in memory)", "samples": len(obs), "tokenizer": TOKENIZER_FALLBACK}
    directory = Path(directory)
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        raise InputError(f"{directory} is not a calibration set (no {META_NAME})", hint="build one with `pi05-export calibration-build`")
    meta = _read_meta(meta_path)
    differ = mismatches(meta, cfg)
    if differ:
        raise InputError(
            f"calibration set {directory} does not fit the model: {'; '.join(differ)}",
            hint="rebuild it for this model: `pi05-export calibration-build ... --config CHECKPOINT/config.json`",
        )
    files = sorted(directory.glob("calib_*.npz"))[:samples]
    if not files:
        raise InputError(f"calibration set {directory} has no calib_*.npz files", hint="rebuild it with `pi05-export calibration-build`")
    return [load_observation(f, cfg) for f in files], {"kind": meta.get("kind"), "path": str(directory), "samples": len(files),
                                                       "tokenizer": meta.get("tokenizer")}


def _read_meta(path: Path) -> dict[str, Any]:
    """``calibration.json`` as a mapping; :class:`InputError` for one that is unreadable or not a JSON object."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable JSON file ({first_line(e)})",
                         hint="rebuild the set with `pi05-export calibration-build`") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(meta).__name__}",
                         hint="rebuild the set with `pi05-export calibration-build`")
    return meta


def mismatches(meta: dict[str, Any], cfg: Pi05Config) -> list[str]:
    """Every size a calibration set (its ``calibration.json``) was built for that differs from ``cfg``,
    as ``"action_horizon: set 50, model 10"``; empty when the set fits."""
    want = {"image_size": cfg.vision.image_size, "num_views": cfg.num_views, "max_token_len": cfg.max_token_len,
            "vocab_size": cfg.llm.vocab_size, "action_horizon": cfg.action_horizon, "action_dim": cfg.action_dim}
    return [f"{k}: set {meta.get(k)}, model {v}" for k, v in want.items() if meta.get(k) != v]


def _fits(meta: dict[str, Any], cfg: Pi05Config) -> bool:
    return not mismatches(meta, cfg)


__all__ = ["build_calibration_set", "load_calibration_set", "photo_observations", "tokenize_fallback", "save_npz"]
