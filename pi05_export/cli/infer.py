"""``pi05-export infer``: actions for recorded observations (PyTorch reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pi05_export.cli._app import CheckpointArg, ConfigOpt, PresetOpt, RandomInitOpt, SeedOpt, app, err_console, load_model


@app.command()
def infer(
    checkpoint: CheckpointArg = None,
    inputs: Annotated[Path, typer.Option("--inputs", help="Observation .npz (README 'Observation files').")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option("--out", help="Where to write actions .npz.")] = ...,  # type: ignore[assignment]
    steps: Annotated[int, typer.Option("--steps", min=1, help="Euler steps.")] = 10,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Run sample_actions on an observation file and write ``actions`` [B, horizon, action_dim]."""
    from pi05_export.infer import infer_actions
    from pi05_export.observation import save_npz

    model, _ = load_model(checkpoint, preset, config, random_init, seed)
    actions = infer_actions(model, inputs, steps=steps, seed=seed)
    save_npz(out, {"actions": actions})
    err_console.print(f"wrote {out}: actions {list(actions.shape)} (mean |a| {abs(actions).mean():.4f})")
