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

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pi05_export.config import Pi05Config
from pi05_export.errors import InputError, first_line

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
        """Check the contract for ``cfg`` (module docstring); returns ``self``.

        Raises :class:`InputError`, one line naming the array, for: a wrong dtype, shape or layout
        (uint8 pixels, HWC frames, a missing batch axis each named with the whole fix), a batch of 0
        or batches that disagree, NaN/inf in ``images`` or ``noise``, pixels outside [-1, 1], token
        ids outside the vocabulary, a sample whose ``image_mask`` or ``token_mask`` is all False (no
        camera, no prompt), or a batch whose working memory (:func:`batch_bytes`) exceeds the RAM
        available.
        """
        v, s, L = cfg.num_views, cfg.vision.image_size, cfg.max_token_len
        _check_images(source, self.images, (v, 3, s, s))
        b = self.batch
        if b == 0:
            raise InputError(f"{source}: 'images' holds a batch of 0 observations", hint="save at least one observation")
        _check(source, "image_mask", self.image_mask, (b, v), np.bool_)
        _check(source, "tokens", self.tokens, (b, L), np.int64)
        _check(source, "token_mask", self.token_mask, (b, L), np.bool_)
        if self.noise is not None:
            _check(source, "noise", self.noise, (b, cfg.action_horizon, cfg.action_dim), np.float32)
            _check_finite(source, "noise", self.noise, "draw it from N(0, 1), or leave it out to draw it from --seed")
        _check_finite(source, "images", self.images, "save finite pixels; a camera without a frame is zeros with image_mask False")
        if np.abs(self.images).max(initial=0) > 1.0 + 1e-3:
            raise InputError(f"{source}: images must be finite and in [-1, 1] (max |x| is {np.abs(self.images).max():.4g})",
                             hint="scale uint8 pixels as images.astype(np.float32) / 255 * 2 - 1")
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= cfg.llm.vocab_size):
            raise InputError(
                f"{source}: token ids must be in [0, {cfg.llm.vocab_size})", hint="tokenize with the checkpoint's tokenizer"
            )
        for name, what, hint in (
            ("image_mask", "no camera", "set True for each camera the sample has (openpi order: base_0_rgb first)"),
            ("token_mask", "no prompt token", "set True for the prompt's tokens (a tokenized prompt starts with BOS)"),
        ):
            empty = np.flatnonzero(~getattr(self, name).any(axis=1))
            if empty.size:
                raise InputError(f"{source}: '{name}' is all False for sample {int(empty[0])} ({what}; "
                                 f"{empty.size} of {b} samples)", hint=hint)
        check_memory(batch_bytes(cfg, b), f"a batch of {b} observations")
        return self


def batch_bytes(cfg: Pi05Config, batch: int) -> int:
    """Estimated working memory (bytes) to sample actions for ``batch`` observations with the fp32
    model, weights excluded: the inputs, the largest vision and prefix activations (one layer's
    attention scores [B, heads, P, P] and MLP hidden [B, P, mlp_dim]) and the prefix KV cache
    [depth, 2, B, kv_heads, P, head_dim]. A lower bound: the runtime holds a few such tensors at once."""
    vis, llm, P = cfg.vision, cfg.llm, cfg.prefix_len
    per_sample = (
        cfg.num_views * (3 * vis.image_size**2 + vis.num_patches * (vis.mlp_dim + vis.num_heads * vis.num_patches))
        + P * (2 * llm.mlp_dim + llm.num_heads * P)
        + llm.depth * 2 * llm.num_kv_heads * P * llm.head_dim
    )
    return 4 * batch * per_sample


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (psutil, else ``MemAvailable`` of /proc/meminfo); None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(nbytes: int, what: str) -> None:
    """Raise :class:`InputError` when ``nbytes`` (an estimate for ``what``) exceeds the RAM available."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise InputError(f"{what} needs about {nbytes / 2**30:.1f} GiB of memory; {avail / 2**30:.1f} GiB is available",
                         hint="use a smaller batch")


def _check_images(source: str, arr: np.ndarray, chw: tuple[int, int, int, int]) -> None:
    """'images' must be float32 [B, V, 3, H, W] in [-1, 1]. uint8 pixels, HWC frames and a missing batch
    axis are named as such, with the whole fix in the hint (every step, in the order to apply them)."""
    v, c, h, w = chw
    shape = tuple(arr.shape)
    hwc = (v, h, w, c)
    expected = f"float32 [B, {', '.join(map(str, chw))}] (batch, views, CHW, pixels in [-1, 1])"
    if shape[-4:] not in (chw, hwc) or len(shape) not in (4, 5):
        batch = str(shape[0]) if len(shape) == 5 else "B"
        raise InputError(f"{source}: 'images' has shape {list(shape)}, expected [{batch}, {', '.join(map(str, chw))}] "
                         "(batch, views, 3, image size, image size)",
                         hint="see README 'Observation files' (shapes follow the model config)")
    problems, fixes = [], []
    if arr.dtype == np.uint8:
        problems.append("uint8 pixels")
        fixes.append("images = images.astype(np.float32) / 255 * 2 - 1")
    elif arr.dtype != np.float32:
        problems.append(f"dtype {arr.dtype}")
        fixes.append("images = images.astype(np.float32)" + ("" if arr.dtype.kind == "f" else " / 255 * 2 - 1"))
    if len(shape) == 4:
        problems.append("no batch axis")
        fixes.append("images = images[None]")
    if shape[-4:] == hwc and hwc != chw:
        problems.append("HWC frames")
        fixes.append("images = images.transpose(0, 1, 4, 2, 3)")
    if problems:
        raise InputError(f"{source}: 'images' is {arr.dtype} {list(shape)} ({', '.join(problems)}); expected {expected}",
                         hint="; ".join(fixes) + ", then save")


def _check_finite(source: str, name: str, arr: np.ndarray, hint: str) -> None:
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(f"{source}: '{name}' has {bad} NaN/inf value(s) (first at index "
                         f"{list(map(int, np.argwhere(~np.isfinite(arr))[0]))})", hint=hint)


def _check(source: str, name: str, arr: np.ndarray, shape: tuple[int, ...], dtype: type) -> None:
    if tuple(arr.shape) == shape[1:]:
        raise InputError(f"{source}: '{name}' has shape {list(arr.shape)}, expected {list(shape)}: the batch axis is missing",
                         hint=f"save {name}[None] (np.expand_dims({name}, 0))")
    if tuple(arr.shape) != shape:
        raise InputError(
            f"{source}: '{name}' has shape {list(arr.shape)}, expected {list(shape)}",
            hint="see README 'Observation files' (shapes follow the model config)",
        )
    if arr.dtype != dtype:
        cast = "astype(bool)" if dtype is np.bool_ else f"astype(np.{np.dtype(dtype)})"
        raise InputError(f"{source}: '{name}' has dtype {arr.dtype}, expected {np.dtype(dtype)}", hint=f"save {name}.{cast}")


# The most an .npz may hold once decompressed (all arrays together), checked from the .npy headers before
# anything is inflated: a full-size pi05 observation is 1.8 MB per sample, a raw 480x640 frame 0.9 MB.
MAX_NPZ_BYTES = 2 * 2**30


def npz_array_bytes(path: str | Path, max_bytes: int = MAX_NPZ_BYTES) -> int:
    """Bytes the arrays of an ``.npz`` take once decompressed, read from each member's ``.npy`` header
    (``numpy.lib.format``) without inflating the data; nothing is allocated from the file's claims.

    Raises :class:`InputError` for a file that is not a zip of ``.npy`` arrays, an object (pickle) array,
    or a total above ``max_bytes`` (a small file that would inflate to gigabytes is refused here).
    """
    import zipfile

    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)  # OSError (missing file, a directory) goes to the caller
    except (zipfile.BadZipFile, ValueError) as e:
        raise InputError(f"{path} is not a readable .npz file ({e})", hint="write it with numpy.savez") from None
    total = 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):  # np.load returns other members as bytes
                total += info.file_size
                continue
            try:
                with archive.open(info) as f:
                    major, _ = np.lib.format.read_magic(f)
                    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, dtype = reader(f)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise InputError(f"{path}: member {info.filename!r} is not a readable .npy array ({e})",
                                 hint="write it with numpy.savez") from None
            if dtype.hasobject:
                raise InputError(f"{path}: array {info.filename[:-4]!r} holds Python objects (pickles are not loaded)",
                                 hint="save numeric or string arrays")
            total += math.prod(shape) * dtype.itemsize
    if total > max_bytes:
        raise InputError(f"{path} would take {total / 2**30:.1f} GiB once decompressed, over the {max_bytes / 2**30:.1f} GiB "
                         "limit for one .npz", hint="split it into several files (or smaller batches)")
    return total


def load_npz(path: str | Path, missing_hint: str = "pass an .npz written per README 'Observation files'",
             max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickles). Raises :class:`InputError` for a missing or unreadable
    file, or one whose arrays exceed ``max_bytes`` decompressed (checked first, :func:`npz_array_bytes`)."""
    path = Path(path)
    try:
        npz_array_bytes(path, max_bytes)
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"inputs file {path} does not exist", hint=missing_hint) from None
    except IsADirectoryError:
        raise InputError(f"inputs file {path} is a directory", hint=missing_hint) from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path} is not a readable .npz file ({first_line(e, repr(e))})",
                         hint="write it with numpy.savez") from None


def load_observation(path: str | Path, cfg: Pi05Config) -> Observation:
    """The observation in ``path`` for ``cfg``: size-checked before decompressing (:func:`load_npz`),
    int32 tokens widened, then :meth:`Observation.validate`. Raises :class:`InputError`."""
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
    """A valid synthetic observation: random images, last camera missing, ragged prompts, noise.

    Raises :class:`InputError` before allocating when ``batch`` < 1 or the batch would not fit in memory."""
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}", hint="pass --batch 1 or more")
    check_memory(batch_bytes(cfg, batch), f"--batch {batch}")
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
