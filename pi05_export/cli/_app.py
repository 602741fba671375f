"""The Typer app, global options and shared CLI helpers (console, progress, model options)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="pi05-export",
    help="Pi0.5 checkpoints -> ONNX -> TensorRT engines, validated against PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped into a file or a log collector, rich would wrap at 80 columns; lines stay whole instead.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
out_console = Console(width=None if sys.stdout.isatty() else 200)


def _version(value: bool) -> None:
    if value:
        from pi05_export import __version__

        typer.echo(f"pi05-export {__version__}")
        raise typer.Exit()


@app.callback()
def _callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    root = logging.getLogger("pi05_export")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# Options shared by every command that needs a model (one definition, one helper).
CheckpointArg = Annotated[
    Path | None, typer.Argument(help="Checkpoint dir or model.safetensors (openpi or lerobot layout).", show_default=False)
]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Preset instead of a checkpoint: tiny | pi05.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Config file (JSON/YAML) with explicit dimensions.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Seeded random weights (with --preset/--config).")]
# numpy's legacy seeding (and so every seeded library) takes 0 <= seed < 2**32; torch.manual_seed more.
SEED_MAX = 2**32 - 1
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed for random weights / noise (0 to 2**32-1).")]

# Options shared by `serve` and `infer --robot` (one definition each).
RobotOpt = Annotated[str, typer.Option("--robot", help="Robot profile: libero | droid | aloha | a profile YAML file.")]
TokenizerOpt = Annotated[Path | None, typer.Option(
    "--tokenizer", help="PaliGemma SentencePiece .model or tokenizer.json (default: the checkpoint's assets/, then "
                        "~/.cache/openpi/big_vision/paligemma_tokenizer.model).")]
NormStatsOpt = Annotated[Path | None, typer.Option(
    "--norm-stats", help="norm_stats.json or a lerobot policy dir (default: <checkpoint>/assets/<asset_id>/).")]
DefaultPromptOpt = Annotated[str | None, typer.Option("--default-prompt", help="Prompt for requests that send none.")]
PolicyBackendOpt = Annotated[str | None, typer.Option(
    "--backend", help="torch | torch-compile | torch-cudagraph | torch-compile-cudagraph | onnxruntime | tensorrt "
                      "(default: torch for a checkpoint, onnxruntime for an export dir).")]
EnginesOpt = Annotated[str | None, typer.Option("--engines", help="Engine set under OUT/engines/ (tensorrt).")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Euler steps (default: the config's, 10).")]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify", help="Hash every byte of the graphs/engines against the manifest first (default: sizes and a sampled fingerprint).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="torch backends: cuda | cpu (default: cuda when present).")]


def load_model(checkpoint: Path | None, preset: str | None, config: Path | None, random_init: bool, seed: int,
               dtype: str = "float32"):  # type: ignore[no-untyped-def]
    from pi05_export.checkpoint import resolve_model

    with status(f"loading {'checkpoint ' + str(checkpoint) if checkpoint else 'preset ' + str(preset or config)}"):
        return resolve_model(checkpoint, preset=preset, config=config, random_init=random_init, seed=seed, dtype=dtype)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    with err_console.status(message):
        yield


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr, exposed as the library's ``progress(name, i, n)`` callback.

    Only on a terminal: piped to a file or a log, stderr gets nothing from it (no stray blank line
    before an ``error:`` line)."""
    if not err_console.is_terminal:
        yield lambda name, i, n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as prog:
        task = prog.add_task(description, total=total)

        def update(name: str, i: int, n: int) -> None:
            prog.update(task, completed=i, total=n, description=f"{description}: {name}")

        yield update
