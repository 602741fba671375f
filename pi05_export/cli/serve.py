"""``pi05-export robots`` and ``pi05-export serve``: robot profiles, and the openpi-compatible policy server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pi05_export.cli._app import (
    DefaultPromptOpt,
    DeviceOpt,
    EnginesOpt,
    NormStatsOpt,
    PolicyBackendOpt,
    RobotOpt,
    SeedOpt,
    StepsOpt,
    TokenizerOpt,
    VerifyOpt,
    app,
    err_console,
    out_console,
    status,
)


@app.command()
def robots(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the robot profiles (openpi's pi05_libero, pi05_droid, pi05_aloha): keys, dims, horizon, prompt form."""
    from pi05_export.policy.profiles import shipped_profiles

    profiles = shipped_profiles()
    if as_json:
        out_console.print_json(json.dumps({n: p.summary() for n, p in profiles.items()}))
        return
    table = Table("robot", "state", "actions", "horizon", "state in prompt", "norm stats asset", "keys the robot sends")
    for column in table.columns:
        column.overflow = "fold"  # keys are the point of this table: never cut them
    for p in profiles.values():
        table.add_row(p.name, str(p.state_dim or "any"), str(p.action_dim), str(p.action_horizon or "model"),
                      "yes" if p.state_in_prompt else "no", str(p.asset_id), "\n".join(p.expected_keys))
    out_console.print(table)
    out_console.print("Your own robot: a YAML file in the same format (README 'Robot profiles'), passed as --robot FILE.")


@app.command()
def serve(
    artifacts: Annotated[Path, typer.Argument(help="Checkpoint dir (torch backends) or export dir (onnxruntime, tensorrt).")],
    robot: RobotOpt = ...,  # type: ignore[assignment]
    backend: PolicyBackendOpt = None,
    host: Annotated[str, typer.Option("--host", help="Interface to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (openpi's default 8000).")] = 8000,
    default_prompt: DefaultPromptOpt = None,
    record: Annotated[Path | None, typer.Option("--record", help="Save every request and reply as DIR/step_N.npz.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Batch concurrent robots' requests (1 = off).")] = 1,
    tokenizer: TokenizerOpt = None,
    norm_stats: NormStatsOpt = None,
    steps: StepsOpt = None,
    engines: EnginesOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    verify: VerifyOpt = False,
) -> None:
    """Serve a policy over openpi's websocket protocol: robots using openpi-client connect unchanged."""
    from pi05_export.policy import load_policy
    from pi05_export.serve import prepare_record_dir, serve_policy

    if record is not None:
        prepare_record_dir(record)
    with status(f"loading the {robot} policy from {artifacts}"):
        policy = load_policy(artifacts, robot=robot, backend=backend, tokenizer=tokenizer, norm_stats=norm_stats,
                             default_prompt=default_prompt, num_steps=steps, seed=seed, max_batch=max_batch,
                             engines=engines, device=device, full_hash=verify)
    err_console.print(" ".join(f"{k}={v}" for k, v in policy.describe().items()), markup=False, highlight=False, soft_wrap=True)
    with status("warming up (compilation, CUDA graphs) before the port opens"):
        first, second = policy.warmup(), policy.warmup()
    err_console.print(f"warm-up {first:.0f} ms, then {second:.1f} ms per call (Ctrl-C stops the server)", soft_wrap=True)
    serve_policy(policy, host=host, port=port, max_batch=max_batch, record=record, warmup=False)
