"""Shared checks for CLI user errors: exit code 2, one ``error:`` line, and no file changed under a root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.snapshot import snapshot

__all__ = ["assert_refused", "snapshot"]


def assert_refused(capsys: pytest.CaptureFixture[str], root: Path, argv: list[str], fragment: str) -> str:
    """``pi05-export argv`` exits 2 with exactly one stderr line, ``error: ...`` holding ``fragment``, and no
    file under ``root`` is added, removed or rewritten. Returns stderr."""
    from pi05_export.cli import run

    before = snapshot(root)
    code = run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in err, err
    assert snapshot(root) == before
    return err
