"""What makes the denoise loop fast: the action expert's Euler steps at batch 1 are many small kernels
(50 action tokens each), so launch structure is solved by CUDA graphs and what is left is the kernels
themselves. For each model form (``--variants``) and TorchInductor setting (``--settings``): compile the
denoise step, capture the ``--steps``-step loop in one CUDA graph (:class:`pi05_export.runtime.sampler.SampleSlot`'s
structure), time it with CUDA events, compare its actions with the plain eager loop, and count the step's
kernels and their summed GPU time (torch.profiler over the compiled loop outside the graph).

Model forms: ``plain`` (the model as exported), ``modulations`` (the adaRMS modulations made once per step
count, :meth:`Pi05Model.time_modulations`), ``fused`` (:func:`fuse_projections` on the expert), ``runtime``
(both: what the torch runtime runs for the expert), ``sdpa`` (both, and the expert's attention through torch's
SDPA, :func:`use_sdpa`; measured slower on the H200, so the runtime keeps it for SigLIP only). The last three fuse the model in place, so list them last.

    python benchmarks/bench_denoise_inductor.py --preset pi05 --steps 10 --variants plain,modulations,fused,runtime

Prints a table on stderr and one JSON line on stdout. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pi05_export.bench import bench_inputs, load_bench_model, summarize, time_grid
from pi05_export.model.pi05 import fuse_projections, use_sdpa
from pi05_export.runtime.sampler import GraphedCall, denoise_loop

VARIANTS = ("plain", "modulations", "fused", "runtime", "sdpa")


def kernel_stats(fn, steps: int) -> dict:
    """Kernels per step and their summed GPU time per step (ms), from torch.profiler over one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:60], []).append(e.device_time / 1e3)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {"kernels_per_step": len(kernels) / steps, "kernel_ms_per_step": sum(e.device_time for e in kernels) / 1e3 / steps,
            "top": [{"kernel": k, "count_per_step": len(v) / steps, "ms_per_step": sum(v) / steps} for k, v in top]}

#: name -> (inductor config overrides, torch.compile mode)
SETTINGS = {
    "default": ({}, None),
    "freezing": ({"freezing": True}, None),
    "autotune": ({}, "max-autotune-no-cudagraphs"),
    "freezing+autotune": ({"freezing": True}, "max-autotune-no-cudagraphs"),
    "coordinate": ({"coordinate_descent_tuning": True}, None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pi05")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--settings", default="default")
    ap.add_argument("--variants", default="plain,runtime", help=f"comma list of {', '.join(VARIANTS)}, in this order")
    args = ap.parse_args()
    model, _ = load_bench_model(None, preset=args.preset, random_init=True, dtype="bf16", device="cuda")
    inp = bench_inputs(model.config, 1, seed=0, device="cuda")
    freq = torch.tensor(model.time_freq, dtype=torch.float32, device="cuda")
    grid = [t.cuda() for t in time_grid(args.steps, 1)]
    rows = []
    with torch.no_grad():
        emb = model.embed_images(inp["pixel_values"])
        kv, pm = model.prefix_kv_cache(emb.reshape(1, -1, emb.shape[-1]), inp["image_mask"], inp["tokens"], inp["token_mask"])
        eager = denoise_loop(lambda x, t, k, p: model.denoise_step(x, t, k, p, freq), inp["noise"], grid, kv, pm)
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")
            if variant in ("fused", "runtime", "sdpa"):
                fuse_projections(model.expert)
            use_sdpa(model.expert, variant == "sdpa")
            if variant in ("modulations", "runtime", "sdpa"):
                steps_in = [model.time_modulations(t, freq) for t in grid]

                def step(x, m, k, p):
                    return model.denoise_step_modulated(x, m, k, p)
            else:
                steps_in = grid

                def step(x, t, k, p):
                    return model.denoise_step(x, t, k, p, freq)
            for name in args.settings.split(","):
                rows.append(run_setting(variant, name, step, steps_in, inp, kv, pm, eager, args))
    print(json.dumps({"benchmark": "denoise_inductor", "preset": args.preset, "steps": args.steps, "dtype": "bf16", "batch": 1,
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}))


def run_setting(variant, name, step, steps_in, inp, kv, pm, eager, args) -> dict:
    import torch._inductor.config as inductor_config

    overrides, mode = SETTINGS[name]
    torch._dynamo.reset()
    with inductor_config.patch(overrides):
        fn = torch.compile(step, mode=mode)
        t0 = time.perf_counter()
        fn(inp["noise"], steps_in[0], kv, pm)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        stats = kernel_stats(lambda: denoise_loop(fn, inp["noise"], steps_in, kv, pm), args.steps)
        g = GraphedCall(lambda *a, fn=fn: denoise_loop(fn, *a), [inp["noise"], steps_in, kv, pm])
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(args.iters + 5):
        start.record()
        out = g(inp["noise"], steps_in, kv, pm)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    diff = (out.float() - eager.float()).abs()
    r = {"variant": variant, "setting": name, "compile_s": compile_s, **summarize(times),
         "per_step_ms": summarize(times)["median_ms"] / args.steps, **stats,
         "max_abs_vs_eager": float(diff.max()), "mean_abs_vs_eager": float(diff.mean())}
    print(f"{variant:<12}{name:<12}{r['median_ms']:>9.3f} ms{r['per_step_ms']:>9.3f} ms/step  "
          f"{r['kernels_per_step']:>6.0f} kernels/step ({r['kernel_ms_per_step']:.3f} ms of kernels)  "
          f"compile {compile_s:5.1f} s  max abs vs eager {r['max_abs_vs_eager']:.3g}", file=sys.stderr, flush=True)
    for k in r["top"]:
        print(f"    {k['count_per_step']:>5.0f} x {k['ms_per_step']:.3f} ms  {k['kernel']}", file=sys.stderr)
    return r


if __name__ == "__main__":
    main()
