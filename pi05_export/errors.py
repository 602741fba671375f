"""User-facing errors. Each carries a one-line message and a hint naming the fix.

Bugs raise ordinary exceptions; only mistakes a user can fix raise these. The CLI prints one line,
``error: <message> (hint: <hint>)``, on stderr and exits with ``exit_code``.

Exit codes across the CLI: 0 success; 1 the command ran and its verdict is FAIL (``validate``,
``inspect``); 2 bad input, missing artifacts, missing dependencies or unsupported hardware; 130 / 143
interrupted by SIGINT / SIGTERM (:mod:`pi05_export.signals`).
"""

from __future__ import annotations

import errno
import os


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first non-empty line of ``e``'s message, for one-line errors that quote a library's exception;
    ``default`` (else the exception's type name) when the message is empty."""
    line = next((s for s in str(e).splitlines() if s.strip()), "")
    return line or (type(e).__name__ if default is None else default)


class Pi05ExportError(Exception):
    """A mistake the user can fix (bad input, missing artifact, unsupported hardware)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(Pi05ExportError):
    """A configuration file or preset is invalid."""


class CheckpointError(Pi05ExportError):
    """A checkpoint is missing, corrupt, or does not match the configuration."""


class ArtifactError(Pi05ExportError):
    """An upstream artifact (manifest, graph, engine) is missing or does not match."""


class InputError(Pi05ExportError):
    """An observation / inputs file violates the .npz contract."""


class RecipeError(Pi05ExportError):
    """A precision recipe is malformed or does not apply to the model."""


class DependencyError(Pi05ExportError):
    """An optional dependency (TensorRT, JAX, ...) is not installed."""


class HardwareError(Pi05ExportError):
    """The GPU cannot run what was asked (e.g. NVFP4 on Hopper)."""


# OS errors a user fixes by choosing another path or freeing space, with the fix for each.
PATH_ERRNO_HINTS: dict[int, str] = {
    errno.ENOSPC: "free disk space or write elsewhere", errno.EDQUOT: "free disk space or write elsewhere",
    errno.EFBIG: "free disk space or write elsewhere; the file exceeds a size limit",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "choose a path you may read and write", errno.EPERM: "choose a path you may read and write",
    errno.EISDIR: "name a file, not a directory", errno.ENOTDIR: "a parent of the path is a file; choose another path",
    errno.ENOENT: "create the directory first or choose an existing one", errno.ENAMETOOLONG: "use a shorter path",
}


def path_error(e: OSError, path: object = None, action: str = "cannot write") -> ArtifactError | None:
    """One-line :class:`ArtifactError` naming the path for an ``OSError`` in :data:`PATH_ERRNO_HINTS`
    (disk full, read-only, permission, missing directory, ...), else None (a bug: let it raise)."""
    if e.errno not in PATH_ERRNO_HINTS:
        return None
    where = path if path is not None else e.filename
    message = f"{action} {where}: ".lstrip() if where is not None else ""
    return ArtifactError(message + (e.strerror or os.strerror(e.errno)), hint=PATH_ERRNO_HINTS[e.errno])
