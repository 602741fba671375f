"""Command-line interface: ``pi05-export <command>``. One module per command; errors handled in :func:`run`."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

import typer

from pi05_export.cli._app import app, err_console
from pi05_export.errors import Pi05ExportError, path_error
from pi05_export.signals import Interrupted, raise_on_signals, received

# Commands register on import, one module each; this order (the pipeline's) is the order `--help` lists them in.
for _command_module in ("convert", "info", "onnx", "quantize", "build", "validate", "infer", "bench", "serve"):
    importlib.import_module(f"pi05_export.cli.{_command_module}")

USAGE_EXIT = 2
# click's base exception, found through typer (Typer >= 0.20 bundles its own copy of click, older ones use click).
_CLICK_ERROR: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
# Modules of the optional extras (pyproject.toml): the base install is the robot-side runtime.
OPTIONAL_MODULES = {"onnxscript": "export", "polygraphy": "export", "matplotlib": "export",
                    "onnx_graphsurgeon": "quant", "modelopt": "quant", "skimage": "quant", "jax": "jax",
                    "orbax": "jax", "tensorstore": "jax", "ml_dtypes": "jax", "tensorrt": "trt"}


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 1 a FAIL verdict, 2 usage / input / setup error,
    130 / 143 interrupted by SIGINT / SIGTERM (partial outputs removed, one line on stderr).

    Typer runs outside its standalone mode, so every failure comes here and is printed as one line
    ``error: <message> (hint: <fix>)`` on stderr: our user errors, click's usage errors (an unknown
    option, a missing argument, a value out of range: exit 2, the hint names the command's ``--help``)
    and OS errors on a path (disk full, read-only, permission: exit 2). ``--help`` still exits 0.
    """
    try:
        with raise_on_signals():
            code = _dispatch(argv)
            if (signum := received()) is not None:  # raised inside some cleanup code that swallowed it
                raise Interrupted(signum)
            return code
    except Interrupted as e:
        return _error(f"{e}; no partial output was left", "run the command again", e.exit_code, trace=False)
    except KeyboardInterrupt:  # before the handler was installed
        return _error("interrupted by SIGINT; no partial output was left", "run the command again", 130, trace=False)


def _dispatch(argv: list[str] | None) -> int:
    try:
        code = app(args=argv, prog_name="pi05-export", standalone_mode=False)
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else USAGE_EXIT)
    except Pi05ExportError as e:
        return _error(e.message, e.hint, e.exit_code)
    except _CLICK_ERROR as e:
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "pi05-export"
        message = " ".join(e.format_message().split())  # click wraps long messages over lines
        code = e.exit_code  # 2 for usage errors
        if not message:  # `pi05-export` alone: click printed the help already
            return code  # type: ignore[no-any-return]
        return _error(message, f"see `{command} --help`", code)
    except typer.Abort:  # click's answer to a KeyboardInterrupt it caught (no signal handler of ours installed)
        return _error("interrupted by SIGINT; no partial output was left", "run the command again", 130, trace=False)
    except OSError as e:  # whichever writer met it: torch.onnx's external data, safetensors, ONNX Runtime, reports
        error = path_error(e, action="")
        if error is None:
            raise
        return _error(error.message, error.hint, error.exit_code)
    except ModuleNotFoundError as e:
        extra = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        return _error(f"this command needs the '{e.name}' module, which the base install leaves out",
                      f"pip install 'pi05-export[{extra}]'", USAGE_EXIT)
    return code if isinstance(code, int) else 0


def _error(message: str, hint: str | None, code: int, *, trace: bool = True) -> int:
    """Print ``error: <message> (hint: <hint>)`` as one line on stderr (the traceback too with PI05_DEBUG=1)."""
    if trace and os.environ.get("PI05_DEBUG") == "1":
        traceback.print_exc()
    line = f"error: {message}" + (f" (hint: {hint})" if hint else "")
    err_console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)
    return code


def main() -> None:
    sys.exit(run())
