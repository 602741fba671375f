"""The observation ``.npz`` contract shared by ``infer``, ``validate``, ``bench`` and calibration.

Inputs (``obs.npz``):
- ``images``      float32 [B, V, 3, H, W] in [-1, 1] (V cameras in openpi order, H = W = image size)
- ``image_mask``  bool    [B, V]  (False = camera missing; its pixels are ignored)
- ``tokens``      int64   [B, L]  (tokenized prompt, right-padded to L = max_token_len)
- ``token_mask``  bool    [B, L]  (True for real tokens)
- ``noise``       float32 [B, horizon, action_dim]  optional; drawn from ``--seed`` when absent
Output (``actions.npz``): ``actions`` float32 [B, horizon, action_dim].
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pi05_export.config import Pi05Config
from pi05_export.errors import InputError

_REQUIRED = ("images", "image_mask", "tokens", "token_mask")


@dataclass
class Observation:
    images: np.ndarray
    image_mask: np.ndarray
    tokens: np.ndarray
    token_mask: np.ndarray
    noise: np.ndarray | None = None

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def torch(self) -> dict[str, object]:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays().items()}

    def with_noise(self, cfg: Pi05Config, seed: int) -> Observation:
        if self.noise is not None:
            return self
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((self.batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        return Observation(self.images, self.image_mask, self.tokens, self.token_mask, noise)

    def validate(self, cfg: Pi05Config, source: str = "observation") -> Observation:
        b = self.batch
        v, s, L = cfg.num_views, cfg.vision.image_size, cfg.max_token_len
        _check(source, "images", self.images, (b, v, 3, s, s), np.float32)
        _check(source, "image_mask", self.image_mask, (b, v), np.bool_)
        _check(source, "tokens", self.tokens, (b, L), np.int64)
        _check(source, "token_mask", self.token_mask, (b, L), np.bool_)
        if self.noise is not None:
            _check(source, "noise", self.noise, (b, cfg.action_horizon, cfg.action_dim), np.float32)
        if not np.isfinite(self.images).all() or np.abs(self.images).max(initial=0) > 1.0 + 1e-3:
            raise InputError(f"{source}: images must be finite and in [-1, 1]", hint="scale uint8 pixels as x/255*2-1")
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= cfg.llm.vocab_size):
            raise InputError(
                f"{source}: token ids must be in [0, {cfg.llm.vocab_size})", hint="tokenize with the checkpoint's tokenizer"
            )
        return self


def _check(source: str, name: str, arr: np.ndarray, shape: tuple[int, ...], dtype: type) -> None:
    if tuple(arr.shape) != shape:
        raise InputError(
            f"{source}: '{name}' has shape {list(arr.shape)}, expected {list(shape)}",
            hint="see README 'Observation files' (shapes follow the model config)",
        )
    if arr.dtype != dtype:
        raise InputError(f"{source}: '{name}' has dtype {arr.dtype}, expected {np.dtype(dtype)}", hint="cast it before saving")


def load_npz(path: str | Path, missing_hint: str = "pass an .npz written per README 'Observation files'") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickles). Raises :class:`InputError` for a missing or unreadable file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"inputs file {path} does not exist", hint=missing_hint) from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable .npz file ({str(e).splitlines()[0] if str(e) else e!r})",
                         hint="write it with numpy.savez") from None


def load_observation(path: str | Path, cfg: Pi05Config) -> Observation:
    path = Path(path)
    arrays = load_npz(path)
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise InputError(f"{path} lacks array(s): {', '.join(missing)}", hint="see README 'Observation files'")
    if arrays["tokens"].dtype == np.int32:  # openpi's tokenizer emits int32; widen losslessly
        arrays["tokens"] = arrays["tokens"].astype(np.int64)
    obs = Observation(**{k: arrays[k] for k in (*_REQUIRED, "noise") if k in arrays})
    return obs.validate(cfg, str(path))


def random_observation(cfg: Pi05Config, batch: int = 1, seed: int = 0) -> Observation:
    """A valid synthetic observation: random images, last camera missing, ragged prompts, noise."""
    rng = np.random.default_rng(seed)
    v, s, L = cfg.num_views, cfg.vision.image_size, cfg.max_token_len
    images = rng.uniform(-1, 1, (batch, v, 3, s, s)).astype(np.float32)
    image_mask = np.ones((batch, v), dtype=bool)
    if v > 1:
        image_mask[:, -1] = False
        images[:, -1] = 0.0
    lengths = rng.integers(max(1, L // 3), L + 1, batch)
    token_mask = np.arange(L)[None, :] < lengths[:, None]
    tokens = np.where(token_mask, rng.integers(1, cfg.llm.vocab_size, (batch, L)), 0).astype(np.int64)
    noise = rng.standard_normal((batch, cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    return Observation(images, image_mask, tokens, token_mask, noise)


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Atomically write an .npz."""
    import io

    from pi05_export.artifacts import atomic_write

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(path, buf.getvalue())
