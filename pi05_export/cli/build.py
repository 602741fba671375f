"""``pi05-export build``: TensorRT engines (strongly typed, opt level 4) from exported graphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pi05_export.build import DEFAULT_BATCH, DEFAULT_OPT_LEVEL
from pi05_export.cli._app import app, err_console, out_console
from pi05_export.errors import ConfigError


@app.command()
def build(
    out: Annotated[Path, typer.Argument(help="Directory written by `pi05-export onnx` (engines go to OUT/engines/<name>/).")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Build the fp16-typed graphs.")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="Build the bf16-typed graphs (sm80+).")] = False,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Build the quantized graphs in OUT/<NAME>/.")] = None,
    components: Annotated[str | None, typer.Option("--components", help="Comma list (default: all in the manifest).")] = None,
    opt_level: Annotated[int, typer.Option("--opt-level", min=0, max=5, help="Builder optimization level.")] = DEFAULT_OPT_LEVEL,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Default OUT/engines/timing.cache.")] = None,
    workspace: Annotated[float | None, typer.Option("--workspace", help="Workspace limit in GiB (default: TensorRT's).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="min,opt,max batch of the optimization profile.")] = ",".join(map(str, DEFAULT_BATCH)),
    print_trtexec: Annotated[bool, typer.Option("--print-trtexec", help="Print the equivalent trtexec commands; build nothing.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (JSON on stdout); needs no TensorRT.")] = False,
) -> None:
    """Build TensorRT engines + sidecar JSON; the network is strongly typed (precision comes from the graph)."""
    from pi05_export import trt
    from pi05_export.build import BuildSettings, build_engines, check_hardware, detect_gpu, parse_batch, plan_build

    if fp16 + bf16 + (recipe is not None) != 1:
        raise ConfigError("choose exactly one of --fp16, --bf16, --recipe NAME", hint="e.g. `pi05-export build OUT --fp16`")
    precision = "fp16" if fp16 else "bf16" if bf16 else None
    settings = BuildSettings(opt_level=opt_level, batch=parse_batch(batch), workspace_gib=workspace, timing_cache=timing_cache)
    if print_trtexec or dry_run:
        plan = plan_build(out, precision=precision, recipe=recipe, components=components, settings=settings)
        gpu = detect_gpu()
        if gpu is not None:
            check_hardware(plan.source.formats, gpu, what=plan.source.what)
        gate = f"passes on {gpu.name} ({gpu.sm})" if gpu else "not checked (no GPU visible)"
        err_console.print(f"plan: {plan.source.what} -> {plan.engine_dir} formats={','.join(plan.source.formats)} gate {gate}")
        for e in plan.engines:
            err_console.print(f"  {e.component:<12} {e.onnx} profile={' '.join(f'{n}:{_x(s[0])}..{_x(s[2])}' for n, s in e.profile.items()) or 'static'}")
        major = trt.tensorrt_major() if trt.tensorrt_available() else None  # None: emit --stronglyTyped
        lines = [plan.trtexec(e, tensorrt_major=major) for e in plan.engines] if print_trtexec else [json.dumps(plan.to_dict(tensorrt_major=major))]
        for line in lines:
            out_console.print(line, soft_wrap=True, markup=False, highlight=False)
        return
    manifest = build_engines(out, precision=precision, recipe=recipe, components=components, settings=settings)
    for name, entry in manifest.components.items():
        err_console.print(f"  {name:<12} {entry['bytes'] / 1e6:9.1f} MB  {entry['build_seconds']:7.1f}s  {entry['path']}")
    err_console.print(f"wrote {out}/engines/{manifest.extra['name']}/manifest.json (TensorRT {manifest.extra['tensorrt']}, "
                      f"{manifest.extra['gpu']['name']})")


def _x(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
