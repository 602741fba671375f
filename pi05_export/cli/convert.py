"""``pi05-export convert``: openpi JAX (orbax) checkpoint -> PyTorch safetensors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from pi05_export.checkpoint import Layout
from pi05_export.cli._app import app, err_console, progress_bar


@app.command()
def convert(
    jax_ckpt: Annotated[Path, typer.Argument(help="openpi JAX checkpoint dir (holds params/ and assets/).")],
    out: Annotated[Path, typer.Option("--out", help="Output checkpoint directory (replaced atomically).")] = ...,  # type: ignore[assignment]
    precision: Annotated[str, typer.Option("--precision", help="fp32 (exact) | bf16 (openpi's keep-fp32 policy).")] = "fp32",
    layout: Annotated[Layout, typer.Option("--layout", help="Key layout of the output.")] = Layout.openpi,
    preset: Annotated[str | None, typer.Option(
        "--preset", help="Cross-check the dims against a preset (tiny | pi05); it also sets horizon/tokens/views/steps.",
    )] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Same as --preset, from a config file (JSON/YAML).",
    )] = None,
    action_horizon: Annotated[int | None, typer.Option(
        "--action-horizon", min=1, help="Actions per chunk (openpi pi05_droid 15, pi05_libero 10, pi05_aloha 50); "
                                        "required without --preset/--config: the checkpoint does not record it.",
    )] = None,
    max_shard_gb: Annotated[float, typer.Option("--max-shard-gb", help="Shard (with an index) past this size.")] = 5.0,
) -> None:
    """Convert a pi05 JAX checkpoint leaf by leaf (dimensions come from the checkpoint; the horizon from you)."""
    from pi05_export.convert import convert_checkpoint

    if preset is not None and config is not None:
        raise typer.BadParameter("give --preset or --config, not both")
    with contextlib.ExitStack() as stack:
        bar: list[Callable[[str, int, int], None]] = []

        def progress(key: str, i: int, n: int) -> None:  # the bar opens once the input has been validated
            if not bar:
                bar.append(stack.enter_context(progress_bar("convert", n)))
            bar[0](key.removeprefix("paligemma_with_expert."), i, n)

        manifest = convert_checkpoint(
            jax_ckpt, out, precision=precision, layout=layout, config=config or preset,
            max_shard_bytes=int(max_shard_gb * 1024**3), action_horizon=action_horizon, progress=progress,
        )
    extra, cfg = manifest.extra, manifest.config
    err_console.print(
        f"config: action_horizon {cfg['action_horizon']} ({extra['config_from']['action_horizon']}); max_token_len "
        f"{cfg['max_token_len']}, num_views {cfg['num_views']}, num_steps {cfg['num_steps']} "
        f"({extra['config_from']['max_token_len, num_views, num_steps']})"
        + (f"; merged LoRA into {len(extra['lora_merged'])} weight(s)" if extra["lora_merged"] else ""),
        markup=False, highlight=False, soft_wrap=True,
    )
    err_console.print(
        f"wrote {out}: {extra['tensors']} tensors, {extra['bytes'] / 1e9:.2f} GB in {len(extra['files'])} file(s), "
        f"{precision}, {layout.value} layout, {extra['seconds']:.1f}s"
        + ("" if extra["assets"] else " (no assets/ in the source)")
    )
