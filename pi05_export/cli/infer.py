"""``pi05-export infer``: actions for recorded observations, from the model or from exported artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pi05_export.cli._app import (
    CheckpointArg,
    ConfigOpt,
    PresetOpt,
    RandomInitOpt,
    SeedOpt,
    app,
    err_console,
    load_model,
)


@app.command()
def infer(
    checkpoint: CheckpointArg = None,
    inputs: Annotated[Path, typer.Option("--inputs", help="Observation .npz (README 'Observation files').")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option("--out", help="Where to write actions .npz.")] = ...,  # type: ignore[assignment]
    steps: Annotated[int, typer.Option("--steps", min=1, help="Euler steps.")] = 10,
    backend: Annotated[str, typer.Option("--backend", help="torch | onnxruntime | tensorrt")] = "torch",
    artifacts: Annotated[Path | None, typer.Option("--artifacts", help="Export dir for onnxruntime/tensorrt.")] = None,
    engines: Annotated[str | None, typer.Option("--engines", help="Engine set under OUT/engines/ (tensorrt).")] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Sample actions for an observation .npz and write 'actions' [B, horizon, action_dim] (model or artifacts)."""
    from pi05_export.infer import infer_actions
    from pi05_export.observation import save_npz

    needs_model = backend == "torch"
    model = load_model(checkpoint, preset, config, random_init, seed)[0] if needs_model else None
    actions = infer_actions(inputs, model=model, backend=backend, artifacts=artifacts, engines=engines, steps=steps, seed=seed)
    save_npz(out, {"actions": actions})
    err_console.print(f"wrote {out}: actions {list(actions.shape)} via {backend} (mean |a| {abs(actions).mean():.4f})")
