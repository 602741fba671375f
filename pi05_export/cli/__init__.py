"""Command-line interface: ``pi05-export <command>``. One module per command; errors handled in :func:`run`."""

from __future__ import annotations

import os
import sys
import traceback

import click

from pi05_export.cli._app import app, err_console
from pi05_export.cli import bench as _bench  # noqa: F401
from pi05_export.cli import build as _build  # noqa: F401
from pi05_export.cli import convert as _convert  # noqa: F401
from pi05_export.cli import info as _info  # noqa: F401  (registers commands)
from pi05_export.cli import infer as _infer  # noqa: F401
from pi05_export.cli import onnx as _onnx  # noqa: F401
from pi05_export.cli import quantize as _quantize  # noqa: F401
from pi05_export.cli import validate as _validate  # noqa: F401
from pi05_export.errors import Pi05ExportError

USAGE_EXIT = 2


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 1 failure / user error, 2 usage or setup error."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="pi05-export")
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted", style="red", markup=False)
        return 130
    except click.ClickException as e:
        e.show(file=sys.stderr)
        return USAGE_EXIT
    except Pi05ExportError as e:
        if os.environ.get("PI05_DEBUG") == "1":
            traceback.print_exc()
        line = f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else "")
        err_console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())
