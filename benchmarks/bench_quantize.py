"""Peak RSS and wall time of `pi05-export quantize` (default: --recipe fp8 at full size, random weights).

    python benchmarks/bench_quantize.py [--preset pi05] [--recipe fp8] [--samples 1] [--steps 10]
                                        [--accuracy-samples 1] [--components ...] [--precision bf16] [--out DIR]

Runs the CLI in a subprocess under ``/usr/bin/time -v`` (whole-process peak RSS), then reads the
per-stage wall time and cumulative peak RSS that ``quantize`` records in its manifest. Prints a
table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pi05")
    ap.add_argument("--recipe", default="fp8")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--accuracy-samples", type=int, default=1)
    ap.add_argument("--components", default=None)
    ap.add_argument("--precision", default=None, help="the graphs' type (default: the recipe's base, bf16 for fp8)")
    ap.add_argument("--out", type=Path, default=None, help="keep the output here (default: a temp dir, removed)")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_quantize_"))
    cmd = [sys.executable, "-c", "import sys; from pi05_export.cli import run; sys.exit(run(sys.argv[1:]))",
           "-q", "quantize", "--preset", args.preset, "--random-init", "--recipe", args.recipe, "--out", str(out),
           "--samples", str(args.samples), "--steps", str(args.steps), "--accuracy-samples", str(args.accuracy_samples)]
    if args.components:
        cmd += ["--components", args.components]
    if args.precision:
        cmd += ["--precision", args.precision]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run(timer + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result: dict = {"preset": args.preset, "recipe": args.recipe, "samples": args.samples, "steps": args.steps,
                    "returncode": proc.returncode, "wall_s": round(wall, 1),
                    "peak_rss_gib": round(int(peak.group(1)) / 2**20, 2) if peak else None}
    manifest = out / args.recipe / "manifest.json"
    if proc.returncode == 0 and manifest.is_file():
        extra = json.loads(manifest.read_text())["extra"]
        result.update({"precision": json.loads(manifest.read_text())["precision"],"stage_seconds": extra.get("seconds"), "stage_peak_rss_gib": extra.get("peak_rss_gib"),
                       "coverage": extra.get("coverage"), "fake_quant_action_cosine": extra.get("fake_quant_action_cosine"),
                       "bytes": {k: v["bytes"] for k, v in json.loads(manifest.read_text())["components"].items()}})
    else:
        result["stderr_tail"] = proc.stderr[-2000:]
    print(f"quantize --recipe {args.recipe} --preset {args.preset}: rc={proc.returncode} wall {wall:.0f}s "
          f"peak RSS {result['peak_rss_gib']} GiB", file=sys.stderr)
    order = ["reference_actions", "calibrate", "fake_quant_actions", "lower", "vision", "llm", "expert", "projections", "denoise"]
    stages = result.get("stage_seconds") or {}
    for stage, secs in sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        rss = (result.get("stage_peak_rss_gib") or {}).get(stage)
        size = (result.get("bytes") or {}).get(stage)
        print(f"  {stage:<12} {secs:8.1f}s  peak RSS so far {rss} GiB" + (f"  {size / 1e9:.2f} GB" if size else ""), file=sys.stderr)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
