"""Does the two-stream pipeline overlap? Kernel timeline of :meth:`Sampler.sample_stream` vs sequential
:meth:`Sampler.sample` on the torch-compile-cudagraph runtime (the stages ``bench``, ``infer`` and ``serve`` use).

For each mode, torch.profiler (CUPTI) records every kernel over ``--observations`` inferences, CUDA graph
kernels included; this script merges each stream's kernel intervals and reports per stream the kernel
count and busy time, the time both streams ran kernels at once, and the span, next to the period per
chunk measured without the profiler.

    python benchmarks/profile_pipeline.py --preset pi05 --steps 10 [--observations 6] [--trace OUT.json]

Prints a table on stderr and one JSON line on stdout. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pi05_export.bench import _measure_pipelined, _torch_stages, bench_inputs, load_bench_model


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def timeline(run, trace: Path) -> dict:
    """Per-stream kernel count/busy ms, two-stream overlap ms and span ms of ``run()`` from a CUPTI trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    streams: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        streams.setdefault(int(e["args"].get("stream", -1)), []).append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    unions = {s: _union(v) for s, v in streams.items()}
    out: dict = {"kernels": len(events), "streams": {}}
    if not events:
        return out
    span = max(b for v in unions.values() for _, b in v) - min(a for v in unions.values() for a, _ in v)
    out["span_ms"] = span / 1e3
    for s, u in unions.items():
        out["streams"][str(s)] = {"kernels": len(streams[s]), "busy_ms": _length(u) / 1e3}
    busiest = sorted(unions, key=lambda s: -_length(unions[s]))[:2]
    out["overlap_ms"] = _intersection(unions[busiest[0]], unions[busiest[1]]) / 1e3 if len(busiest) == 2 else 0.0
    out["gpu_busy_ms"] = _length(_union([iv for v in unions.values() for iv in v])) / 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pi05")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--observations", type=int, default=6)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--trace", type=Path, default=None, help="keep the pipelined chrome trace here")
    args = ap.parse_args()

    model, _ = load_bench_model(None, preset=args.preset, random_init=True, dtype="bf16", device="cuda")
    inp = bench_inputs(model.config, 1, seed=0, device="cuda")
    n = args.observations
    with torch.inference_mode():
        sampler = _torch_stages(model, "torch-compile-cudagraph", inp, True, component_graphs=False).sampler
        period_ms = _measure_pipelined(sampler, inp, args.steps, 3, args.iters)  # warm-up captures both slots' graphs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            sampler.sample(inp, args.steps).cpu()
        sequential_ms = (time.perf_counter() - t0) * 1e3 / args.iters
        with tempfile.TemporaryDirectory() as tmp:
            seq = timeline(lambda: [sampler.sample(inp, args.steps).cpu() for _ in range(n)], Path(tmp) / "seq.json")
            pipe_trace = args.trace or Path(tmp) / "pipe.json"
            pipe = timeline(lambda: list(sampler.sample_stream([inp] * n, args.steps)), pipe_trace)
    result = {"benchmark": "pipeline_timeline", "preset": args.preset, "steps": args.steps, "observations": n,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "sequential_ms": sequential_ms, "pipelined_period_ms": period_ms, "sequential": seq, "pipelined": pipe}
    for name, t in (("sequential", seq), ("pipelined", pipe)):
        print(f"{name}: {t['kernels']} kernels over {n} inferences, span {t.get('span_ms', 0):.2f} ms, GPU busy "
              f"{t.get('gpu_busy_ms', 0):.2f} ms, two-stream overlap {t.get('overlap_ms', 0):.2f} ms", file=sys.stderr)
        for s, v in t["streams"].items():
            print(f"    stream {s}: {v['kernels']} kernels, busy {v['busy_ms']:.2f} ms", file=sys.stderr)
    print(f"period per chunk (no profiler): sequential {sequential_ms:.2f} ms, pipelined {period_ms:.2f} ms",
          file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
