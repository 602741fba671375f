"""Directory snapshots for the safety tests: prove a run touched nothing outside the paths it may write."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[str, int, int]]:
    """Every entry under ``root`` (links not followed), except those under ``skip``: relative path ->
    (kind, size, mtime in ns). Two equal snapshots mean nothing was created, removed or written."""
    out: dict[str, tuple[str, int, int]] = {}
    skipped = {p.absolute() for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).absolute() not in skipped]
        for name in dirnames + filenames:
            p = here / name
            if p.absolute() in skipped:
                continue
            st = p.lstat()
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns if kind == "file" else 0)
    return out


def last_line(err: str) -> str:
    """The last non-empty stderr line (the CLI's one-line error), after checking there is no traceback."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip()][-1]
