"""Camera frames -> model pixels, exactly as openpi does it (spec sections 1.9 and 6).

1. ``parse_image`` (openpi ``libero_policy._parse_image`` / ``aloha_policy.convert_image``): float
   images become uint8 as ``(255 * x).astype(uint8)`` (truncation), CHW becomes HWC;
2. ``resize_with_pad`` (``openpi_client.image_tools.resize_with_pad``, used by ``ResizeImages``):
   PIL bilinear (anti-aliased when downscaling) to fit, pasted centred on a black canvas;
3. ``to_pixels`` (``Observation.from_dict``, models/model.py L115-120): ``x / 255 * 2 - 1`` in
   float32, HWC -> CHW.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pi05_export.errors import InputError


def _uint8_frame(image: object, name: str, layout: str) -> tuple[np.ndarray, bool]:
    """Validate a frame and convert floats to uint8; returns (uint8 array, whether it is CHW)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"camera {name!r} is a {type(image).__name__}, not an image array",
                         hint="send a numpy uint8 array [H, W, 3]")
    if image.ndim != 3:
        raise InputError(f"camera {name!r} has shape {list(image.shape)}; expected [H, W, 3] (or [3, H, W])",
                         hint="send one frame per camera, without a batch axis")
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise InputError(f"camera {name!r} holds NaN/inf pixels", hint="send uint8 frames")
        if image.size and (image.min() < 0.0 or image.max() > 1.0):
            raise InputError(f"camera {name!r} is float with values outside [0, 1] ({image.min():.3g}..{image.max():.3g})",
                             hint="send uint8 frames, or floats scaled to [0, 1]")
        image = (255 * image).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"camera {name!r} has dtype {image.dtype}; expected uint8 (or float in [0, 1])",
                         hint="send uint8 frames, e.g. openpi_client.image_tools.convert_to_uint8(img)")
    chw = layout == "chw" or (layout == "auto" and image.shape[0] == 3)
    channels, h, w = (image.shape[0], *image.shape[1:]) if chw else (image.shape[2], *image.shape[:2])
    if channels != 3 or min(h, w) < 1:
        raise InputError(f"camera {name!r} has shape {list(image.shape)} (layout '{layout}'); expected [H, W, 3] RGB",
                         hint="send RGB frames as [H, W, 3] uint8")
    return image, chw


def parse_image(image: object, name: str, layout: str = "auto") -> np.ndarray:
    """A robot's frame -> uint8 [H, W, 3].

    Accepts uint8, or float in [0, 1] (openpi truncates ``255 * x``); HWC, or CHW (``layout="chw"``
    always; ``"auto"`` when ``shape[0] == 3`` as openpi). Raises :class:`InputError` naming the camera
    for any other shape or dtype, NaN/inf, or floats outside [0, 1] (which openpi would silently wrap).
    """
    frame, chw = _uint8_frame(image, name, layout)
    return np.transpose(frame, (1, 2, 0)) if chw else frame


def _fit(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """openpi_client resize_with_pad geometry: (new_h, new_w, top, left)."""
    ratio = max(w / width, h / height)
    new_w, new_h = int(w / ratio), int(h / ratio)
    return new_h, new_w, int((height - new_h) / 2), int((width - new_w) / 2)


# x / 255 * 2 - 1 in float32 for every uint8 value, computed with the same float32 ops as
# :func:`to_pixels` (so a table lookup gives bit-identical pixels in one pass).
_PIXEL_LUT = np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0 * 2.0 - 1.0


def camera_jobs(image: object, name: str, layout: str, out: np.ndarray) -> list[Callable[[], None]]:
    """Validate a robot's frame now and return the jobs that write its model pixels into ``out``
    (float32 [3, S, S], in [-1, 1]): :func:`parse_image` + :func:`resize_with_pad` + :func:`to_pixels`.

    One job per colour plane: PIL resizes each plane bit-identically to its RGB resize (its
    resampling is per band), the planes need no HWC <-> CHW transpose of the resized image, and
    the jobs are independent with PIL releasing the GIL, so a thread pool runs them in parallel.
    Raises :class:`InputError` like :func:`parse_image`.
    """
    frame, chw = _uint8_frame(image, name, layout)
    size = out.shape[-1]
    h, w = frame.shape[1:] if chw else frame.shape[:2]
    new_h, new_w, top, left = _fit(h, w, size, size)
    if min(new_h, new_w) < 1:
        raise InputError(f"camera {name!r} is {h}x{w}: too narrow to resize to {size}x{size} with padding",
                         hint="send frames with a sensible aspect ratio")

    def plane(c: int) -> None:
        from PIL import Image

        src = frame[c] if chw else frame[..., c]
        if (h, w) == (size, size):
            out[c] = _PIXEL_LUT[src]
            return
        resized = Image.fromarray(np.ascontiguousarray(src)).resize((new_w, new_h), resample=Image.BILINEAR)
        out[c] = -1.0  # black padding
        out[c, top : top + new_h, left : left + new_w] = _PIXEL_LUT[np.asarray(resized)]

    return [lambda c=c: plane(c) for c in range(3)]


def camera_pixels(image: object, name: str, layout: str, size: int) -> np.ndarray:
    """A robot's frame -> model pixels float32 [3, size, size] in [-1, 1] (the jobs of :func:`camera_jobs`, run here)."""
    out = np.empty((3, size, size), np.float32)
    for job in camera_jobs(image, name, layout, out):
        job()
    return out


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3], aspect kept, centred black padding.

    openpi_client ``image_tools.resize_with_pad`` (L15-58): ``ratio = max(w / W, h / H)``, size
    ``(int(w / ratio), int(h / ratio))`` with PIL ``BILINEAR``, pasted at
    ``(int((W - w') / 2), int((H - h') / 2))``. Returned unchanged when already (height, width).
    """
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    new_h, new_w, top, left = _fit(h, w, height, width)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), resample=Image.BILINEAR)
    canvas = Image.new(resized.mode, (width, height), 0)
    canvas.paste(resized, (left, top))
    return np.asarray(canvas)


def to_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] as ``x / 255 * 2 - 1`` (openpi model.py L115-120)."""
    return np.transpose(image.astype(np.float32) / 255.0 * 2.0 - 1.0, (2, 0, 1))
