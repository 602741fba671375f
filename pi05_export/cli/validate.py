"""``pi05-export validate``: every artifact vs the PyTorch reference (exit 0 pass, 1 FAIL, 2 setup)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pi05_export.cli._app import ConfigOpt, SeedOpt, app, err_console, out_console, progress_bar


def parse_steps(value: str) -> list[int]:
    try:
        steps = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma list of integers (e.g. 10,3)") from None
    if not steps or min(steps) < 1:
        raise typer.BadParameter("steps must be positive integers, e.g. 10,3")
    return steps


@app.command()
def validate(
    artifacts: Annotated[Path, typer.Argument(help="Directory written by `pi05-export onnx` or `quantize`.")],
    backend: Annotated[str, typer.Option("--backend", help="onnxruntime | tensorrt")] = "onnxruntime",
    steps: Annotated[str, typer.Option("--steps", help="End-to-end step counts, comma list.")] = "10,3",
    inputs: Annotated[Path | None, typer.Option("--inputs", help="Observation .npz (default: seeded random).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Reference checkpoint (default: manifest source).")] = None,
    engines: Annotated[str | None, typer.Option("--engines", help="Engine set under OUT/engines/ (tensorrt).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch of the random observation.")] = 2,
    config: ConfigOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Compare components and end-to-end actions against PyTorch; write OUT/reports/validation.{json,md} + drift.png."""
    from pi05_export.artifacts import Manifest
    from pi05_export.checkpoint import reference_model
    from pi05_export.errors import ConfigError
    from pi05_export.validate import validate_artifacts

    step_list = parse_steps(steps)
    if backend not in ("onnxruntime", "tensorrt"):
        raise ConfigError(f"unknown backend {backend!r}", hint="use onnxruntime or tensorrt")
    if backend == "tensorrt":
        from pi05_export.trt import require_tensorrt

        require_tensorrt()
    manifest = Manifest.read(artifacts)
    model = reference_model(manifest.source, checkpoint, config)
    with progress_bar("validate", len(manifest.components) + len(step_list)) as progress:
        report = validate_artifacts(artifacts, backend=backend, model=model, steps=step_list, inputs=inputs, seed=seed,
                                    batch=batch, engines=engines, progress=progress)
    for c in report.checks:
        style = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}[c.status]
        m = c.metrics
        err_console.print(f"  [{style}]{c.status}[/] {c.name:<28} cos {m['cosine']:.7f}  max abs {m['max_abs']:.2e}  "
                          f"mean abs {m['mean_abs']:.2e}  ({c.gate})")
    out_console.print(f"{report.status}: {artifacts}/reports/validation.md")
    if report.status == "FAIL":
        raise typer.Exit(1)
