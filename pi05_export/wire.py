"""openpi's websocket message encoding: msgpack with its own numpy convention.

openpi-client ``msgpack_numpy.py`` (identical in PyPI 0.1.2 and openpi@15a9616; spec section 1.4):
an ndarray is a 4-entry map with **bin** keys ``__ndarray__`` (true), ``data`` (C-order bytes),
``dtype`` (``dtype.str``, e.g. ``"<f4"``) and ``shape``; a numpy scalar that is not a Python builtin
subclass is ``{__npgeneric__: true, data: item(), dtype}``. Void, object and complex dtypes are
refused. Ordinary keys are msgpack str. Decoding also accepts str marker keys (robustness), checks
that ``data`` holds exactly ``prod(shape) * itemsize`` bytes, and returns read-only arrays, like
openpi's. The msgpack library does the encoding; only the array hooks are ours.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from pi05_export.errors import first_line

_REFUSED_KINDS = "VOc"  # structured, object, complex (openpi_client msgpack_numpy.py L21-40)


class WireError(ValueError):
    """A message that is not a valid openpi msgpack observation."""


def _pack(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in _REFUSED_KINDS:
            raise WireError(f"unsupported dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind in _REFUSED_KINDS:
            raise WireError(f"unsupported dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _field(obj: dict[Any, Any], name: str) -> Any:
    for key in (name.encode(), name):
        if key in obj:
            return obj[key]
    raise WireError(f"array map lacks '{name}'")


def _dtype(name: Any, what: str) -> np.dtype[Any]:
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None:
        raise WireError(f"unknown {what} dtype {name!r}")
    if dtype.kind in _REFUSED_KINDS:
        raise WireError(f"unsupported {what} dtype {name!r}")
    return dtype


def _unpack(obj: dict[Any, Any]) -> Any:
    if b"__ndarray__" in obj or "__ndarray__" in obj:
        data, dtype_s, shape = _field(obj, "data"), _field(obj, "dtype"), _field(obj, "shape")
        if not isinstance(data, bytes) or not isinstance(dtype_s, str) or not isinstance(shape, list | tuple):
            raise WireError("array map has the wrong field types (data bin, dtype str, shape list)")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise WireError(f"array shape {list(shape)[:8]} is not a list of non-negative ints")
        dtype = _dtype(dtype_s, "array")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise WireError(f"array data has {len(data)} bytes, shape {list(shape)[:8]} of {dtype.str} needs {math.prod(shape) * dtype.itemsize}")
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))
    if b"__npgeneric__" in obj or "__npgeneric__" in obj:
        return _dtype(_field(obj, "dtype"), "scalar").type(_field(obj, "data"))
    return obj


def packb(obj: Any) -> bytes:
    """Encode a message (dicts, lists, str, numbers, ndarrays, numpy scalars) as openpi does."""
    return msgpack.packb(obj, default=_pack, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode a message; raises :class:`WireError` (one line) for anything malformed."""
    try:
        return msgpack.unpackb(data, object_hook=_unpack, raw=False)
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001  (msgpack raises many types for garbage: ExtraData, FormatError, ...)
        raise WireError(f"not a msgpack message ({type(e).__name__}: {first_line(e, '')[:120]})") from None
