"""Which TorchInductor settings make the denoise loop fast: the action expert's Euler steps at batch 1 are
many small kernels (50 action tokens each), so launch structure is solved by CUDA graphs and what is left
is the kernels themselves. For each setting: compile the denoise step, capture the ``--steps``-step loop in
one CUDA graph (:class:`pi05_export.runtime.sampler.SampleSlot`'s structure), time it with CUDA events, and
compare its actions with the eager loop.

    python benchmarks/bench_denoise_inductor.py --preset pi05 --steps 10 --settings default,freezing,autotune

Prints a table on stderr and one JSON line on stdout. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pi05_export.bench import bench_inputs, load_bench_model, summarize, time_grid
from pi05_export.runtime.sampler import GraphedCall, denoise_loop

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
    ap.add_argument("--settings", default="default,freezing,autotune")
    args = ap.parse_args()
    import torch._inductor.config as inductor_config

    model, _ = load_bench_model(None, preset=args.preset, random_init=True, dtype="bf16", device="cuda")
    inp = bench_inputs(model.config, 1, seed=0, device="cuda")
    freq = torch.tensor(model.time_freq, dtype=torch.float32, device="cuda")
    grid = [t.cuda() for t in time_grid(args.steps, 1)]
    rows = []
    with torch.no_grad():
        emb = model.embed_images(inp["pixel_values"])
        kv, pm = model.prefix_kv_cache(emb.reshape(1, -1, emb.shape[-1]), inp["image_mask"], inp["tokens"], inp["token_mask"])
        eager = denoise_loop(lambda x, t, k, p: model.denoise_step(x, t, k, p, freq), inp["noise"], grid, kv, pm)
        for name in args.settings.split(","):
            overrides, mode = SETTINGS[name]
            torch._dynamo.reset()
            with inductor_config.patch(overrides):
                fn = torch.compile(lambda x, t, k, p: model.denoise_step(x, t, k, p, freq), mode=mode)
                t0 = time.perf_counter()
                fn(inp["noise"], grid[0], kv, pm)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                g = GraphedCall(lambda *a, fn=fn: denoise_loop(fn, *a), [inp["noise"], grid, kv, pm])
            times = []
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for i in range(args.iters + 5):
                start.record()
                out = g(inp["noise"], grid, kv, pm)
                end.record()
                end.synchronize()
                if i >= 5:
                    times.append(start.elapsed_time(end))
            diff = (out.float() - eager.float()).abs()
            rows.append({"setting": name, "compile_s": compile_s, **summarize(times),
                         "per_step_ms": summarize(times)["median_ms"] / args.steps,
                         "max_abs_vs_eager": float(diff.max()), "mean_abs_vs_eager": float(diff.mean())})
            r = rows[-1]
            print(f"{name:<20}{r['median_ms']:>9.3f} ms{r['per_step_ms']:>9.3f} ms/step  compile {compile_s:6.1f} s  "
                  f"max abs vs eager {r['max_abs_vs_eager']:.3g}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "denoise_inductor", "preset": args.preset, "steps": args.steps,
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
