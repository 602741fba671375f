"""``pi05-export onnx`` and ``pi05-export inspect``."""

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
from pi05_export.export import DEFAULT_OPSET


@app.command()
def onnx(
    checkpoint: CheckpointArg = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory (replaced atomically).")] = ...,  # type: ignore[assignment]
    components: Annotated[str | None, typer.Option("--components", help="Comma list: vision,llm,expert,projections,denoise.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | bf16 (typed graphs for strong typing).")] = "fp32",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (19 parses on TensorRT 10.13 and 11.x).")] = DEFAULT_OPSET,
    keep_fp32: Annotated[list[str] | None, typer.Option(
        "--keep-fp32", help="Module glob (Pi05Model.named_modules() names) kept fp32 in fp16/bf16 graphs, e.g. a layer whose "
                            "output passes 65504; the residual stream it adds into stays fp32 from there. Repeatable.")] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Export every component to ONNX with a manifest."""
    from pi05_export.dtypes import graph_dtype
    from pi05_export.export import check_export_options, export_onnx, parse_components

    selected = parse_components(components)  # fail on a typo before loading anything
    check_export_options(precision, opset)
    # load straight into the export precision (a full-size fp32 copy would double peak memory); kept
    # layers need their fp32 weights, so --keep-fp32 loads fp32 and the export casts the rest
    dtype = "float32" if keep_fp32 else graph_dtype(precision)
    model, source = load_model(checkpoint, preset, config, random_init, seed, dtype=dtype)
    with progress_bar("export", len(selected)) as progress:
        manifest = export_onnx(model, out, source=source, components=[c.value for c in selected],
                               precision=precision, opset=opset, keep_fp32=keep_fp32 or (), progress=progress)
    for name, entry in manifest.components.items():
        err_console.print(f"  {name:<12} {entry['bytes'] / 1e6:9.1f} MB  {entry['export_seconds']:6.1f}s  {entry['path']}")
    err_console.print(f"wrote {out}/manifest.json ({precision}, opset {opset})")


@app.command("inspect")
def inspect_cmd(
    out: Annotated[Path, typer.Argument(help="Directory written by `pi05-export onnx` (or a .onnx file).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="Observation .npz: also run the fp32 reference on it and print each layer's largest activation "
                         "against fp16's 65504 (informational; validate gives the verdict).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="With --inputs: the reference checkpoint (default: manifest source).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Lint exported graphs: ops, opset, dtype census (ops per output dtype, MatMul/Gemm input dtypes, fp32
    MatMuls outside the fp32 islands of a typed graph), casts, initializer bytes, -inf constants. Exit 1 on a problem."""
    import json
    import re

    from pi05_export.lint import lint_graphs

    reports = lint_graphs(out)
    activations = _activations(out, inputs, checkpoint, config) if inputs is not None else None
    if as_json:
        out_console.print_json(json.dumps(reports if activations is None else {**reports, "activations": activations}))
    else:
        for name, r in reports.items():
            out_console.print(f"[bold]{name}[/] opset={r['opset']} nodes={r['nodes']} casts={r['casts']} "
                              f"init_bytes={r['initializer_bytes']}")
            out_console.print("  ops: " + ", ".join(f"{k}={v}" for k, v in sorted(r["ops"].items())))
            out_console.print("  ops by output dtype: " + ", ".join(f"{k}={v}" for k, v in sorted(r["op_output_dtypes"].items())))
            inside = [m for m in r["fp32_matmuls"] if m["island"]]
            groups: dict[str, set[str]] = {}  # layers.0/layers.1/... -> layers.* where several share a name
            for m in inside:
                short = m["module"].removeprefix("paligemma_with_expert.")
                groups.setdefault(re.sub(r"\.\d+\.", ".*.", short), set()).add(short)
            layers = sorted(pattern if len(names) > 1 else next(iter(names)) for pattern, names in groups.items())
            outside = len(r["fp32_matmuls"]) - len(inside)
            fp32 = f"; float32 ones: {len(inside)} in fp32 islands ({', '.join(layers)}), {outside} outside" \
                if r["typed"] and r["fp32_matmuls"] else ""
            out_console.print("  MatMul/Gemm inputs: " + ", ".join(f"{k}={v}" for k, v in sorted(r["matmul_input_dtypes"].items())) + fp32,
                              highlight=False)
            for problem in r["problems"]:
                out_console.print(f"  [red]problem:[/] {problem}")
        if activations is not None:
            from pi05_export.validate import FP16_MAX, fp16_overflow_advice

            out_console.print(f"[bold]largest activations[/] (fp32 reference on {inputs}; |value| a layer reads or writes) "
                              f"vs fp16's {FP16_MAX:.0f}:")
            for row in activations:
                flag = "  [red]overflows fp16[/]" if row["max_abs"] > FP16_MAX else ""
                out_console.print(f"  {row['max_abs']:10.4g}  {row['vs_fp16']:9.3g}x  {row['layer']}{flag}", highlight=False)
            advice = fp16_overflow_advice(activations)
            if advice:
                out_console.print(f"  note: {advice}", highlight=False)
    if any(r["problems"] for r in reports.values()):
        raise typer.Exit(1)


def _activations(out: Path, inputs: Path, checkpoint: Path | None, config: Path | None) -> list[dict[str, object]]:
    """The per-layer activation table of the reference these graphs came from, on ``inputs``."""
    from pi05_export.artifacts import Manifest
    from pi05_export.checkpoint import reference_model
    from pi05_export.errors import ConfigError
    from pi05_export.observation import load_observation
    from pi05_export.validate import measure_activations

    if not out.is_dir():
        raise ConfigError("--inputs needs an export directory (its manifest names the reference checkpoint)",
                          hint=f"pass the directory holding {out.name}")
    model = reference_model(Manifest.read(out).source, checkpoint, config)
    return measure_activations(model, load_observation(inputs, model.config))
