"""One ``Policy.infer`` split into preprocessing, model and postprocessing, per torch backend.

    python benchmarks/bench_policy.py --preset pi05 --backends torch,torch-compile-cudagraph   # GPU
    python benchmarks/bench_policy.py --preset tiny --device cpu --backends torch              # dry run

Three 480x640 uint8 cameras (the ALOHA profile: cam_high + both wrists, CHW as ALOHA sends them),
a 14-dim state, a prompt; random full-size weights in bf16 on the GPU. Preprocessing (decode-free:
resize-with-pad, normalize, tokenize) and postprocessing run on the host CPU; the model part is
timed until the actions are on the host. The torch profiler counts the device->host copies inside
the model part (one is expected: the actions). Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3)}


def _count_copies(policy, inputs) -> dict[str, int]:  # type: ignore[no-untyped-def]
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        policy.sample([inputs])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return {"memcpy_dtoh": sum("Memcpy DtoH" in n for n in names), "memcpy_htod": sum("Memcpy HtoD" in n for n in names)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pi05")
    ap.add_argument("--backends", default="torch,torch-compile-cudagraph")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--robot", default="aloha")
    args = ap.parse_args()

    from pi05_export.checkpoint import resolve_model
    from pi05_export.policy import load_policy
    from pi05_export.policy.profiles import load_profile
    from pi05_export.testing.tiny_policy import example_observation, norm_stats_dict, tiny_tokenizer_bytes

    tmp = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    (tmp / "tok.model").write_bytes(tiny_tokenizer_bytes())
    profile = load_profile(args.robot)
    (tmp / "norm_stats.json").write_text(json.dumps(norm_stats_dict(profile.state_dim or 8, profile.action_dim, 0)))
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    t0 = time.perf_counter()
    model, _ = resolve_model(None, preset=args.preset, random_init=True, dtype=dtype, device=args.device)
    model = model.to(args.device).eval()
    load_s = time.perf_counter() - t0
    obs = example_observation(args.robot)
    results = []
    fixed_noise = np.random.default_rng(0).standard_normal((1, model.config.action_horizon, model.config.action_dim), dtype=np.float32)
    reference = None
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        policy = load_policy(None, robot=profile, backend=backend, model=model, tokenizer=tmp / "tok.model",
                             norm_stats=tmp / "norm_stats.json")
        build_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            policy.infer(obs)
        pre, model_ms, post, total = [], [], [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            inputs = policy.preprocess(obs)
            t1 = time.perf_counter()
            actions, _ = policy.sample([inputs])
            t2 = time.perf_counter()
            policy.postprocess(actions[0], inputs)
            t3 = time.perf_counter()
            pre.append((t1 - t0) * 1e3)
            model_ms.append((t2 - t1) * 1e3)
            post.append((t3 - t2) * 1e3)
            total.append((t3 - t0) * 1e3)
        row = {"backend": backend, "setup_s": round(build_s, 1), "preprocess": _summary(pre), "model": _summary(model_ms),
               "postprocess": _summary(post), "total": _summary(total),
               "pre_plus_post_median_ms": round(statistics.median(pre) + statistics.median(post), 3),
               "copies_in_model_part": _count_copies(policy, policy.preprocess(obs))}
        same_noise = policy.sample([policy.preprocess(obs)], fixed_noise)[0][0]
        if reference is None:
            reference = same_noise
        a, b = same_noise.ravel().astype(np.float64), reference.ravel().astype(np.float64)
        row["vs_first_backend"] = {"max_abs": float(np.abs(a - b).max()),
                                   "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))}
        results.append(row)
        print(f"{backend:26s} pre {row['preprocess']['median_ms']:7.2f}  model {row['model']['median_ms']:8.2f} "
              f"(p90 {row['model']['p90_ms']:.2f})  post {row['postprocess']['median_ms']:6.3f}  total "
              f"{row['total']['median_ms']:8.2f} ms  copies {row['copies_in_model_part']}", file=sys.stderr)
    import torch

    env = {"preset": args.preset, "robot": args.robot, "cameras": "3 x 480x640 uint8", "device": args.device,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
           "dtype": dtype, "steps": model.config.num_steps, "model_load_s": round(load_s, 1), "iters": args.iters}
    print(json.dumps({"bench": "policy", **env, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
