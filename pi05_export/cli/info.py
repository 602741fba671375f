"""``pi05-export info``: what a checkpoint is, from its headers alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pi05_export.cli._app import ConfigOpt, app, out_console


@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint dir or model.safetensors.")],
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show layout, every dimension, dtypes and parameter counts per component (reads headers only)."""
    from pi05_export.checkpoint import inspect_checkpoint

    ck = inspect_checkpoint(checkpoint, config)
    counts = ck.parameter_counts()
    if as_json:
        out_console.print_json(json.dumps({
            "path": str(ck.path), "layout": ck.layout.value, "files": [str(f) for f in ck.files],
            "config_source": ck.config_source, "config": ck.config.to_dict(),
            "parameters": counts, "dtypes": ck.dtype_counts(), "tensors": len(ck.tensors),
        }))
        return
    out_console.print(f"[bold]{ck.path}[/]  layout=[cyan]{ck.layout.value}[/]  files={len(ck.files)}  "
                      f"tensors={len(ck.tensors)}  config from {ck.config_source}")
    dims = Table("part", "dimensions", title="architecture")
    for part, sub in ck.config.to_dict().items():
        if isinstance(sub, dict):
            dims.add_row(part, ", ".join(f"{k}={v}" for k, v in sub.items()))
    dims.add_row("io", ", ".join(f"{k}={v}" for k, v in ck.config.to_dict().items() if not isinstance(v, dict)))
    out_console.print(dims)
    params = Table("component", "parameters", title="parameters")
    for part, n in sorted(counts.items()):
        params.add_row(part, f"{n:,} ({n / 1e6:.1f}M)")
    used = sum(n for p, n in counts.items() if not p.startswith("unused"))
    params.add_row("[bold]total used[/]", f"{used:,} ({used / 1e9:.3f}B)")
    out_console.print(params)
    out_console.print("dtypes on disk: " + ", ".join(f"{d}: {n}" for d, n in sorted(ck.dtype_counts().items())))
