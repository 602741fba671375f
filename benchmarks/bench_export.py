"""Benchmark: full-size `pi05-export onnx --preset pi05 --random-init` for all components.

Prints a table (stderr) and one JSON line (stdout, last): wall time per component (from the export
loop) and peak RSS per component (VmRSS sampled every 50 ms while that component exports), plus the
whole run's peak RSS from getrusage. Run it under `/usr/bin/time -v` for an external peak-RSS check:

    /usr/bin/time -v .venv/bin/python benchmarks/bench_export.py --precision fp16
Targets on a 2-core / 24 GiB machine: all components <= 10 min, peak RSS <= 12 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Peak RSS per labelled phase, sampled from /proc/self/status."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
            time.sleep(0.05)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--preset", default="pi05")
    ap.add_argument("--components", default=None)
    ap.add_argument("--out", default=None, help="output dir (default: a temp dir, deleted)")
    args = ap.parse_args()

    from pi05_export.checkpoint import resolve_model
    from pi05_export.dtypes import graph_dtype
    from pi05_export.export import export_onnx

    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-export-"))
    dtype = graph_dtype(args.precision)
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        sampler.phase = "init"
        model, source = resolve_model(None, preset=args.preset, random_init=True, seed=0, dtype=dtype)
        init_s = time.perf_counter() - t0

        def progress(name: str, i: int, n: int) -> None:
            sampler.phase = name

        manifest = export_onnx(model, out_root / "out", source=source, components=args.components,
                               precision=args.precision, progress=progress)
    total_s = time.perf_counter() - t0
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gib = 1024**3
    rows = [{"component": "init (random weights)", "seconds": round(init_s, 1), "peak_rss_gib": round(sampler.peaks.get("init", 0) / gib, 2), "gb_on_disk": None}]
    for name, entry in manifest.components.items():
        rows.append({"component": name, "seconds": entry["export_seconds"], "peak_rss_gib": round(sampler.peaks.get(name, 0) / gib, 2),
                     "gb_on_disk": round(entry["bytes"] / 1e9, 2)})
    print(f"{'component':<24}{'seconds':>10}{'peak RSS GiB':>14}{'GB on disk':>12}", file=sys.stderr)
    for r in rows:
        disk = "" if r["gb_on_disk"] is None else f"{r['gb_on_disk']:.2f}"
        print(f"{r['component']:<24}{r['seconds']:>10.1f}{r['peak_rss_gib']:>14.2f}{disk:>12}", file=sys.stderr)
    print(f"{'total':<24}{total_s:>10.1f}{ru_peak / gib:>14.2f}", file=sys.stderr)
    result = {"bench": "export", "preset": args.preset, "precision": args.precision, "total_seconds": round(total_s, 1),
              "peak_rss_gib": round(ru_peak / gib, 2), "components": rows,
              "targets": {"total_seconds": 600, "peak_rss_gib": 12}, "tools": manifest.tools}
    print(json.dumps(result))
    if not args.out:
        import shutil

        shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
