"""``pi05-export quantize``, ``pi05-export recipes`` and ``pi05-export calibration-build``."""

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
    out_console,
    progress_bar,
)
from pi05_export.errors import ConfigError, InputError


@app.command()
def quantize(
    checkpoint: CheckpointArg = None,
    recipe: Annotated[str, typer.Option("--recipe", help="Shipped recipe name (see `pi05-export recipes`) or a .yaml path.")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option("--out", help="The `pi05-export onnx` output dir; graphs go to OUT/<recipe>/.")] = ...,  # type: ignore[assignment]
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Calibration set dir (`calibration-build`); "
                                                     "required for a checkpoint, default for --random-init: the photo set.")] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Use the first N calibration samples.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Denoising steps per calibration sample (default: config).")] = None,
    components: Annotated[str | None, typer.Option("--components", help="Comma list: vision,llm,expert,projections,denoise.")] = None,
    allow_unmatched: Annotated[bool, typer.Option("--allow-unmatched", help="Warn instead of failing on rules matching nothing.")] = False,
    accuracy_samples: Annotated[int, typer.Option("--accuracy-samples", min=0, help="Samples to re-run fake-quantized for the action cosine.")] = 2,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="Type of the graphs (everything unquantized and the Q/DQ high-precision side): bf16 | fp16 | "
                            "fp32 (default: the recipe's base; bf16 for the shipped FP8/NVFP4 recipes).")] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Quantize with a precision recipe (ModelOpt PTQ), calibrate over the sampling loop, export Q/DQ ONNX."""
    from pi05_export.calibration import load_calibration_set
    from pi05_export.export import parse_components
    from pi05_export.quantize import quantize_model
    from pi05_export.recipe import load_recipe, resolve_recipe

    rec = load_recipe(recipe)  # fail on a bad recipe before loading anything
    typed = rec.with_base(precision) if precision is not None else rec
    selected = parse_components(components)
    if checkpoint is not None and calibration is None and rec.quantizes:
        raise InputError(
            "quantizing a checkpoint needs --calibration DIR: the built-in set is stock photos with stand-in byte "
            "tokens, not your robot's observations or tokenizer",
            hint=f"build one: pi05-export calibration-build OBS.npz|RECORD_DIR --config {checkpoint}/config.json --out "
                 "CALIB (add --photos to use the photo set knowingly)",
        )
    model, source = load_model(checkpoint, preset, config, random_init, seed)
    resolve_recipe(typed, model, allow_unmatched=allow_unmatched)  # recipe errors before any progress output
    obs, info = load_calibration_set(calibration, model.config, samples) if rec.quantizes else ([], {})
    with progress_bar(f"quantize {rec.name}", len(selected)) as progress:
        report = quantize_model(model, rec, out, source=source, calibration=obs, calibration_info=info, steps=steps,
                                components=[c.value for c in selected], allow_unmatched=allow_unmatched,
                                accuracy_samples=accuracy_samples, precision=precision, progress=progress)
    extra = report.manifest.extra
    for comp, counts in report.coverage.items():
        err_console.print(f"  coverage {comp:<12} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    for name, entry in report.manifest.components.items():
        err_console.print(f"  {name:<12} {entry['bytes'] / 1e6:9.1f} MB  {report.seconds.get(name, 0):6.1f}s  {entry['path']}")
    if extra.get("fake_quant_action_cosine"):
        err_console.print(f"  fake-quant action cosine vs unquantized: {extra['fake_quant_action_cosine']}")
    gate = f"needs sm{extra['min_compute_capability'].replace('.', '')}+" if extra["min_compute_capability"] else "any GPU"
    err_console.print(f"wrote {report.out_dir}/manifest.json ({rec.name}: {', '.join(extra['formats']) or typed.base} on "
                      f"{typed.base} graphs; {gate})")


@app.command()
def recipes() -> None:
    """List the shipped precision recipes."""
    from pi05_export.recipe import list_recipes

    for name, description in list_recipes().items():
        out_console.print(f"{name:<16} {description}", markup=False, highlight=False, soft_wrap=True)


@app.command("calibration-build")
def calibration_build(
    observations: Annotated[list[Path] | None, typer.Argument(help="Observation .npz files (already tokenized), or `serve --record` directories.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output calibration directory (replaced atomically).")] = ...,  # type: ignore[assignment]
    photos: Annotated[bool, typer.Option("--photos", help="Render the built-in photo set (scikit-image samples) instead.")] = False,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Build a calibration set from recorded observations (or the built-in photos) for a model config."""
    from pi05_export.calibration import build_calibration_set
    from pi05_export.config import Pi05Config

    if (preset is None) == (config is None):
        raise ConfigError(
            "calibration-build needs exactly one of --config or --preset: a set fits one image size, view count, token "
            "length and action horizon",
            hint="pass --config CHECKPOINT/config.json (the model you will quantize), or --preset tiny|pi05",
        )
    cfg = Pi05Config.from_file(config) if config is not None else Pi05Config.from_name(preset or "")
    path = build_calibration_set(observations or [], out, cfg, photos=photos, seed=seed)
    n = len(list(path.glob("calib_*.npz")))
    err_console.print(f"wrote {n} calibration sample(s) to {path} (image size {cfg.vision.image_size}, {cfg.num_views} views, "
                      f"{cfg.max_token_len} tokens, action horizon {cfg.action_horizon})")
