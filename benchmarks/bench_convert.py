"""Benchmark ``convert``: peak RSS and wall time converting a full-size random openpi JAX checkpoint.

    python benchmarks/bench_convert.py [--workdir /tmp/pi05_bench_convert] [--stored-dtype bfloat16]
        [--precision fp32] [--preset pi05] [--reuse] [--keep]

1. Writes a random checkpoint for the preset (pi05: 3.35 B parameters) once with orbax in openpi's tree
   layout (``pi05_export.testing.orbax_ckpt``), in a child process whose RSS is guarded (orbax holds
   about three copies of each array while saving; ``--max-write-rss-gb``). Leaves are generated into
   memory-mapped files first, so the writer's anonymous memory stays small.
2. Converts it in a fresh child process and reports that process's peak RSS (``ru_maxrss``) and wall
   time against the target ``1.5 x largest stacked leaf + 2 GiB``.
3. Spot-checks the output (headers of every tensor, one tensor's values).

Human table on stderr, one JSON line on stdout. Needs disk for the checkpoint plus the output
(``--stored-dtype float32`` + fp32: about 28 GB); checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1024**3


def _anon_rss_bytes() -> int:
    """Anonymous resident memory (file-backed pages of the memory-mapped leaves are reclaimable)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _guard_rss(limit_gb: float) -> None:
    """Abort this process before it can push a shared machine into the OOM killer."""

    def watch() -> None:
        while True:
            if _anon_rss_bytes() > limit_gb * GIB:
                print(f"aborting: anonymous RSS above --max-write-rss-gb {limit_gb}", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _write_child(args: argparse.Namespace) -> dict:
    from pi05_export.config import Pi05Config
    from pi05_export.testing.orbax_ckpt import random_jax_params, write_orbax_checkpoint

    _guard_rss(args.max_write_rss_gb)
    cfg = Pi05Config.from_name(args.preset)
    memmap = Path(args.workdir) / "memmap"
    memmap.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    params = random_jax_params(cfg, seed=0, dtype=args.stored_dtype, memmap_dir=memmap)
    t1 = time.perf_counter()
    write_orbax_checkpoint(Path(args.workdir) / "jax", params, action_dim=cfg.action_dim,
                           chunk_byte_size=args.chunk_mb * 1024**2, save_concurrent_gb=1)
    t2 = time.perf_counter()
    del params
    shutil.rmtree(memmap)
    # ru_maxrss of the writer includes the resident pages of the memory-mapped source leaves.
    return {"generate_s": round(t1 - t0, 1), "write_s": round(t2 - t1, 1), "write_peak_rss": _peak_rss()}


def _convert_child(args: argparse.Namespace) -> dict:
    from pi05_export.convert import convert_checkpoint

    t0 = time.perf_counter()
    manifest = convert_checkpoint(Path(args.workdir) / "jax", Path(args.workdir) / "pt", precision=args.precision,
                                  config=args.preset)
    return {"convert_s": round(time.perf_counter() - t0, 1), "convert_peak_rss": _peak_rss(),
            "tensors": manifest.extra["tensors"], "out_bytes": manifest.extra["bytes"], "files": manifest.extra["files"]}


def _child(mode: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, f"--_child={mode}", f"--workdir={args.workdir}", f"--preset={args.preset}",
            f"--stored-dtype={args.stored_dtype}", f"--precision={args.precision}", f"--chunk-mb={args.chunk_mb}",
            f"--max-write-rss-gb={args.max_write_rss_gb}"]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} step failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spot_check(workdir: Path) -> dict:
    """Every header readable; time_mlp_in.weight == source kernel transposed (values exact)."""
    import numpy as np
    import orbax.checkpoint as ocp
    from safetensors import safe_open

    from pi05_export.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(workdir / "pt")
    with ocp.PyTreeCheckpointer() as ckptr:
        src = ckptr.restore((workdir / "jax" / "params").absolute(),
                            args=ocp.args.PyTreeRestore(partial_restore=True,
                                                        item={"params": {"time_mlp_in": {"kernel": np.zeros(0)}}}))
    kernel = np.asarray(src["params"]["time_mlp_in"]["kernel"], dtype=np.float32)
    key = "time_mlp_in.weight"
    file = next(f for f in info.files if key in safe_open(str(f), "np").keys())
    with safe_open(str(file), "np") as f:
        got = f.get_tensor(key)
    return {"tensors_in_headers": len(info.tensors), "spot_check_exact": bool(np.array_equal(got, kernel.T))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/pi05_bench_convert")
    ap.add_argument("--preset", default="pi05")
    ap.add_argument("--stored-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--chunk-mb", type=int, default=256, help="orbax storage chunk cap when writing the source")
    ap.add_argument("--max-write-rss-gb", type=float, default=14.0)
    ap.add_argument("--reuse", action="store_true", help="reuse an existing source checkpoint in --workdir")
    ap.add_argument("--keep", action="store_true", help="keep the source checkpoint and the output")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        result = _write_child(args) if args._child == "write" else _convert_child(args)
        print(json.dumps(result))
        return

    from pi05_export.config import Pi05Config
    from pi05_export.testing.orbax_ckpt import jax_param_shapes

    workdir = Path(args.workdir)
    cfg = Pi05Config.from_name(args.preset)
    shapes = jax_param_shapes(cfg)
    n_params = sum(math.prod(s) for s in shapes.values())
    stored_item = 2 if args.stored_dtype == "bfloat16" else 4
    stacked = {p: math.prod(s) * stored_item for p, s in shapes.items() if "/layers/" in p or "/encoderblock/" in p}
    largest_leaf, largest = max(stacked.items(), key=lambda kv: kv[1])
    out_item = 4 if args.precision == "fp32" else 3  # bf16 output: mostly 2 bytes, some fp32
    need = n_params * (stored_item + out_item + (0 if args.reuse else stored_item))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < need * 1.05:
        sys.exit(f"not enough disk in {workdir}: need about {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free")
    shutil.rmtree(workdir / "pt", ignore_errors=True)

    write = {}
    if not (args.reuse and (workdir / "jax" / "params").is_dir()):
        shutil.rmtree(workdir / "jax", ignore_errors=True)
        write = _child("write", args)
    conv = _child("convert", args)
    check = _spot_check(workdir)
    if not args.keep:
        shutil.rmtree(workdir / "pt", ignore_errors=True)
        shutil.rmtree(workdir / "jax", ignore_errors=True)

    target = 1.5 * largest + 2 * GIB
    result = {
        "bench": "convert", "preset": args.preset, "params": n_params, "stored_dtype": args.stored_dtype,
        "precision": args.precision, "largest_stacked_leaf": largest_leaf, "largest_stacked_leaf_bytes": largest,
        "target_peak_rss_bytes": int(target), **write, **conv, **check,
        "within_target": conv["convert_peak_rss"] <= target,
        "throughput_gb_s": round(conv["out_bytes"] / 1e9 / conv["convert_s"], 3),
    }
    rows = [
        ("parameters", f"{n_params / 1e9:.3f} B ({args.stored_dtype} stored -> {args.precision})"),
        ("largest stacked leaf", f"{largest_leaf} {largest / GIB:.2f} GiB"),
        ("write (orbax, once)", f"{write.get('write_s', 'reused')} s, peak RSS "
                                f"{write['write_peak_rss'] / GIB:.2f} GiB" if write else "reused"),
        ("convert wall time", f"{conv['convert_s']} s ({result['throughput_gb_s']} GB/s written)"),
        ("convert peak RSS", f"{conv['convert_peak_rss'] / GIB:.2f} GiB"),
        ("target", f"<= 1.5 x {largest / GIB:.2f} + 2 = {target / GIB:.2f} GiB -> "
                   f"{'OK' if result['within_target'] else 'OVER'}"),
        ("output", f"{conv['tensors']} tensors, {conv['out_bytes'] / 1e9:.2f} GB, {len(conv['files'])} file(s); "
                   f"spot check exact: {check['spot_check_exact']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
