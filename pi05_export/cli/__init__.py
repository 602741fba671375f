"""Command-line interface: ``pi05-export <command>``. One module per command; errors handled in :func:`run`."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from pi05_export.cli._app import app, err_console
from pi05_export.errors import Pi05ExportError
from pi05_export.signals import Interrupted, raise_on_signals, received

# Commands register on import, one module each; this order (the pipeline's) is the order `--help` lists them in.
for _command_module in ("convert", "info", "onnx", "quantize", "build", "validate", "infer", "bench", "serve"):
    importlib.import_module(f"pi05_export.cli.{_command_module}")

USAGE_EXIT = 2
# Modules of the optional extras (pyproject.toml): the base install is the robot-side runtime.
OPTIONAL_MODULES = {"onnx": "export", "onnxscript": "export", "polygraphy": "export", "matplotlib": "export",
                    "onnx_graphsurgeon": "quant", "modelopt": "quant", "skimage": "quant", "jax": "jax",
                    "orbax": "jax", "tensorstore": "jax", "ml_dtypes": "jax", "tensorrt": "trt"}


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 1 a FAIL verdict, 2 usage / input / setup error,
    130 / 143 interrupted by SIGINT / SIGTERM (partial outputs removed, one line on stderr).

    Typer's standalone mode reports usage errors itself (exit 2) whichever click it bundles; our
    user errors propagate out of it and are printed here as one line.
    """
    try:
        with raise_on_signals():
            code = _dispatch(argv)
            if (signum := received()) is not None:  # raised inside some cleanup code that swallowed it
                raise Interrupted(signum)
            return code
    except Interrupted as e:
        _error_line(f"error: {e}; no partial output was left (hint: run the command again)")
        return e.exit_code
    except KeyboardInterrupt:  # before the handler was installed
        _error_line("error: interrupted by SIGINT; no partial output was left (hint: run the command again)")
        return 130


def _error_line(line: str) -> None:
    err_console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)


def _dispatch(argv: list[str] | None) -> int:
    try:
        app(args=argv, prog_name="pi05-export")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else USAGE_EXIT)
    except Pi05ExportError as e:
        if os.environ.get("PI05_DEBUG") == "1":
            traceback.print_exc()
        _error_line(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""))
        return e.exit_code
    except ModuleNotFoundError as e:
        extra = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        if os.environ.get("PI05_DEBUG") == "1":
            traceback.print_exc()
        _error_line(f"error: this command needs the '{e.name}' module, which the base install leaves out "
                    f"(hint: pip install 'pi05-export[{extra}]')")
        return USAGE_EXIT
    return 0


def main() -> None:
    sys.exit(run())
