"""Load test of ``pi05-export serve`` with real ``openpi-client`` clients (``make bench-serve``).

    python benchmarks/bench_serve.py                                   # tiny policy, CPU
    python benchmarks/bench_serve.py --preset pi05 --device cuda --max-batch 1,8   # full size, GPU

For each ``--max-batch`` value a server process is started (the policy warmed up before the port
opens) and measured in four phases:

1. direct: ``Policy.infer`` p50 inside the server process (no websocket), the baseline;
2. one client, sequential requests: round-trip p50/p99 and the server overhead (round trip minus
   direct ``Policy.infer``, p50);
3. ``--clients`` concurrent clients x ``--requests`` each: every reply accounted for, p50/p99,
   throughput, batch sizes the server formed;
4. ``--bad`` bad requests (text frames, garbage, missing keys, NaN states, plus a few 50 MB
   garbage frames): each must get a one-line text error and a 1011 close; the server's RSS
   before/after, and a good request afterwards.

The observation is LIBERO's (two 224x224 uint8 frames as openpi's clients send, an 8-dim state, a
prompt). Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _pct(ms: list[float], q: float) -> float:
    s = sorted(ms)
    return round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 3)


def _timed(call, iters: int, warmup: int = 5) -> list[float]:  # type: ignore[no-untyped-def]
    """Wall ms of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _observation(robot: str, size: int, seed: int = 0) -> dict:
    from PIL import Image

    from pi05_export.testing.tiny_policy import example_observation

    obs = example_observation(robot, seed)
    for k, v in list(obs.items()):
        if isinstance(v, np.ndarray) and v.ndim == 3:  # robots resize on their side (openpi examples)
            obs[k] = np.asarray(Image.fromarray(v).resize((size, size)))
    return obs


# ---------------------------------------------------------------------------------------------
# server process
# ---------------------------------------------------------------------------------------------
def run_server(args: argparse.Namespace) -> int:
    import logging

    from pi05_export.policy import load_policy
    from pi05_export.serve import serve_policy

    logging.basicConfig(level=logging.WARNING)
    model = None
    if args.preset:
        from pi05_export.checkpoint import resolve_model

        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        model = resolve_model(None, preset=args.preset, random_init=True, dtype=dtype, device=args.device)[0].to(args.device).eval()
    policy = load_policy(None if args.preset else args.checkpoint, robot=args.robot, backend=args.backend, model=model,
                         tokenizer=args.tokenizer, norm_stats=args.norm_stats, max_batch=args.serve_batch, device=args.device)
    obs = _observation(args.robot, args.frame)
    policy.warmup()
    direct = _timed(lambda: policy.infer(obs), args.direct_iters)
    Path(args.direct_out).write_text(json.dumps({"p50_ms": _pct(direct, 0.5), "p99_ms": _pct(direct, 0.99)}))
    serve_policy(policy, host="127.0.0.1", port=args.port, max_batch=args.serve_batch, warmup=False)
    return 0


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# client side
# ---------------------------------------------------------------------------------------------
def _bad_frames(obs: dict) -> list[tuple[str, object]]:
    from pi05_export.wire import packb

    missing = {k: v for k, v in obs.items() if k != "observation/wrist_image"}
    nan_state = {**obs, "observation/state": np.full(8, np.nan)}
    return [("text", "hello"), ("garbage", os.urandom(1024)), ("missing key", packb(missing)),
            ("nan state", packb(nan_state)), ("list image", packb({**obs, "observation/image": [1, 2, 3]}))]


def _send_bad(port: int, frame: object) -> str:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=30) as ws:
        ws.recv(timeout=30)
        ws.send(frame)
        text = ws.recv(timeout=60)
        try:
            ws.recv(timeout=10)
            code = None
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
    if not isinstance(text, str) or "\n" in text or code != 1011:
        raise AssertionError(f"bad frame not answered with one line + 1011: {text!r} {code}")
    return text


def measure(args: argparse.Namespace, max_batch: int) -> dict:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    port = _free_port()
    direct_out = Path(tempfile.mkdtemp()) / "direct.json"
    cmd = [sys.executable, __file__, "--serve-only", "--port", str(port), "--serve-batch", str(max_batch),
           "--direct-out", str(direct_out), "--robot", args.robot, "--backend", args.backend, "--device", args.device,
           "--frame", str(args.frame), "--direct-iters", str(args.requests)]
    for opt in ("checkpoint", "preset", "tokenizer", "norm_stats"):
        if getattr(args, opt):
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, env=env)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > args.start_timeout:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        startup_s = time.perf_counter() - t0
        direct = json.loads(direct_out.read_text())
        obs = _observation(args.robot, args.frame)

        client = WebsocketClientPolicy("127.0.0.1", port)
        seq = _timed(lambda: client.infer(obs), args.requests)

        lat: list[float] = []
        replies = {"ok": 0, "bad": 0}
        batch_sizes: dict[int, int] = {}
        lock = threading.Lock()

        def robot() -> None:
            c = WebsocketClientPolicy("127.0.0.1", port)
            for _ in range(args.requests):
                t = time.perf_counter()
                r = c.infer(obs)
                ms = (time.perf_counter() - t) * 1e3
                with lock:
                    lat.append(ms)
                    ok = r["actions"].shape[0] > 0 and np.isfinite(r["actions"]).all()
                    replies["ok" if ok else "bad"] += 1
                    b = int(r["policy_timing"].get("batch_size", 1))
                    batch_sizes[b] = batch_sizes.get(b, 0) + 1

        threads = [threading.Thread(target=robot) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0

        bad = _bad_frames(obs)
        big = os.urandom(50 * 2**20)
        for i in range(100):  # settle the allocator (one big frame included) before measuring RSS
            _send_bad(port, bad[i % len(bad)][1])
        _send_bad(port, big)
        rss0 = _rss_mib(proc.pid)
        for i in range(args.bad):
            _send_bad(port, bad[i % len(bad)][1])
        rss_small = _rss_mib(proc.pid)
        for _ in range(args.big):
            _send_bad(port, big)
        rss1 = _rss_mib(proc.pid)
        alive = WebsocketClientPolicy("127.0.0.1", port).infer(obs)["actions"].shape
        return {
            "max_batch": max_batch, "startup_s": round(startup_s, 1), "direct_p50_ms": direct["p50_ms"],
            "sequential": {"p50_ms": _pct(seq, 0.5), "p99_ms": _pct(seq, 0.99),
                           "overhead_p50_ms": round(_pct(seq, 0.5) - direct["p50_ms"], 3)},
            "concurrent": {"clients": args.clients, "requests": args.clients * args.requests, "replies_ok": replies["ok"],
                           "replies_bad": replies["bad"], "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
                           "throughput_rps": round(len(lat) / wall, 1), "batch_sizes": dict(sorted(batch_sizes.items()))},
            "bad_requests": {"count": args.bad + args.big, "rss_before_mib": round(rss0, 1), "rss_after_small_mib": round(rss_small, 1), "rss_after_mib": round(rss1, 1),
                             "rss_growth_mib": round(rss1 - rss0, 1), "served_after": list(alive)},
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="policy checkpoint dir (default: a tiny one built in a temp dir)")
    ap.add_argument("--preset", help="random weights of this preset instead (e.g. pi05, on --device cuda)")
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--norm-stats", type=Path)
    ap.add_argument("--robot", default="libero")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frame", type=int, default=224, help="camera frame size the clients send")
    ap.add_argument("--max-batch", default="1", help="comma list; one server per value")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--bad", type=int, default=1000)
    ap.add_argument("--big", type=int, default=5, help="50 MB garbage frames")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--serve-batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--direct-out", help=argparse.SUPPRESS)
    ap.add_argument("--direct-iters", type=int, default=100, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_only:
        return run_server(args)
    if args.checkpoint is None and args.preset is None:
        from pi05_export.testing.tiny_policy import build_tiny_policy

        args.checkpoint = build_tiny_policy(Path(tempfile.mkdtemp()) / "tiny-policy")
    if args.preset and (args.tokenizer is None or args.norm_stats is None):
        from pi05_export.policy.profiles import load_profile
        from pi05_export.testing.tiny_policy import norm_stats_dict, tiny_tokenizer_bytes

        tmp = Path(tempfile.mkdtemp())
        profile = load_profile(args.robot)
        args.tokenizer = args.tokenizer or tmp / "tok.model"
        args.tokenizer.write_bytes(tiny_tokenizer_bytes())
        args.norm_stats = args.norm_stats or tmp / "norm_stats.json"
        args.norm_stats.write_text(json.dumps(norm_stats_dict(profile.state_dim or 8, profile.action_dim, 0)))
    rows = [measure(args, int(b)) for b in args.max_batch.split(",")]
    for r in rows:
        c, s, b = r["concurrent"], r["sequential"], r["bad_requests"]
        print(f"max_batch {r['max_batch']}: direct Policy.infer p50 {r['direct_p50_ms']:.2f} ms | 1 client p50 {s['p50_ms']:.2f} "
              f"p99 {s['p99_ms']:.2f} ms, overhead p50 {s['overhead_p50_ms']:.2f} ms | {c['clients']} clients: "
              f"{c['replies_ok']}/{c['requests']} ok, p50 {c['p50_ms']:.1f} p99 {c['p99_ms']:.1f} ms, {c['throughput_rps']} req/s, "
              f"batches {c['batch_sizes']} | {b['count']} bad requests: RSS {b['rss_before_mib']} -> {b['rss_after_mib']} MiB",
              file=sys.stderr)
    import torch

    print(json.dumps({"bench": "serve", "robot": args.robot, "backend": args.backend, "device": args.device,
                      "model": args.preset or "tiny checkpoint", "frame": args.frame, "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
