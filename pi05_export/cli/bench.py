"""``pi05-export bench``: latency per component and end to end; table on stderr, one JSON line on stdout."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pi05_export.cli._app import CheckpointArg, ConfigOpt, PresetOpt, RandomInitOpt, SeedOpt, app, status


class Backend(str, enum.Enum):
    torch = "torch"
    torch_compile = "torch-compile"
    torch_cudagraph = "torch-cudagraph"
    torch_compile_cudagraph = "torch-compile-cudagraph"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class Dtype(str, enum.Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@app.command()
def bench(
    checkpoint: CheckpointArg = None,
    backend: Annotated[Backend, typer.Option("--backend", help="What runs the components.")] = Backend.torch,
    artifacts: Annotated[Optional[Path], typer.Option("--artifacts", help="Export dir (onnxruntime/tensorrt).")] = None,  # noqa: UP045
    steps: Annotated[str, typer.Option("--steps", help="Comma list of Euler step counts.")] = "1,2,3,5,10",
    batch: Annotated[int, typer.Option("--batch", min=1)] = 1,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed calls before timing.")] = 5,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Timed calls per measurement.")] = 30,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Compute dtype (openpi policy keeps norms/projections fp32).")] = Dtype.bf16,
    device: Annotated[str, typer.Option("--device", help="cuda | cpu")] = "cuda",
    pipelined: Annotated[bool, typer.Option("--pipelined", help="Also measure the two-stream pipeline's period per "
                                            "action chunk (torch backends).")] = False,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare with eager PyTorch and print the steps-vs-"
                                        "accuracy table (holds a temporary fp32 copy of the model).")] = True,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Time vision, llm (prefix) and one denoise step, then end to end for each step count."""
    from pi05_export.bench import (
        RUNTIME_BACKENDS,
        format_table,
        load_bench_model,
        parse_steps,
        resolve_device,
        run_benchmark,
    )

    steps_t = parse_steps(steps)  # fail on a typo (or a backend this machine cannot run) before loading a model
    resolve_device(device, backend.value)
    model, source = None, None
    if backend.value not in RUNTIME_BACKENDS:
        with status(f"loading {checkpoint or preset or config} on {device}"):
            model, source = load_bench_model(checkpoint, preset=preset, config=config, random_init=random_init,
                                             seed=seed, dtype=dtype.value, device=device)
    result = run_benchmark(model, backend=backend.value, artifacts=artifacts, steps=steps_t, batch=batch, warmup=warmup,
                           iters=iters, dtype=dtype.value, device=device, seed=seed, source=source,
                           check=check, pipelined=pipelined)
    typer.echo(format_table(result), err=True)
    typer.echo(result.to_json())
