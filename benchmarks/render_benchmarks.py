"""Markdown tables from `pi05-export bench` JSON lines (docs/benchmarks/*.jsonl -> docs/benchmarks.md body).

    python benchmarks/render_benchmarks.py docs/benchmarks/h200-2026-11-28.jsonl > /tmp/tables.md

Prints the tables on stdout; the surrounding prose in docs/benchmarks.md is written by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMPONENTS = (("vision", "vision (3 views)"), ("llm", "llm prefix"), ("denoise", "denoise, 1 step"))


def load(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        runs += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    return runs


def component_table(runs: list[dict]) -> str:
    head = "| backend | " + " | ".join(f"{label} ms (p90)" for _, label in COMPONENTS) + " | peak GPU MiB |"
    rows = [head, "|" + "---|" * (len(COMPONENTS) + 2)]
    for r in runs:
        cells = [f"{r['components'][c]['median_ms']:.2f} ({r['components'][c]['p90_ms']:.2f})" for c, _ in COMPONENTS]
        rows.append(f"| {r['settings']['backend']} | " + " | ".join(cells) + f" | {r['memory']['peak_mib']:.0f} |")
    f = runs[0]["components"]
    cells = [f"{f[c]['floor_ms']:.2f} ({f[c]['flops'] / 1e9:.0f} GFLOP, {f[c]['bytes'] / 1e9:.2f} GB)" for c, _ in COMPONENTS]
    rows.append("| **arithmetic floor** | " + " | ".join(cells) + " | |")
    return "\n".join(rows)


def e2e_table(runs: list[dict]) -> str:
    steps = runs[0]["settings"]["steps"]
    head = "| backend | " + " | ".join(f"{n} steps ms (Hz)" for n in steps) + " |"
    rows = [head, "|" + "---|" * (len(steps) + 1)]
    for r in runs:
        by = {e["steps"]: e for e in r["end_to_end"]}
        rows.append(f"| {r['settings']['backend']} | "
                    + " | ".join(f"{by[n]['median_ms']:.1f} ({by[n]['hz']:.0f})" for n in steps) + " |")
        measured = all("pipelined_hz" in by[n] and "pipelined_estimate_ms" in by[n] for n in steps)
        key = "pipelined_period_ms" if measured else "pipelined_estimate_ms" if "pipelined_estimate_ms" in by[steps[0]] else "pipelined_period_ms"
        label = "↳ pipelined, measured period" if measured else "↳ pipelined estimate"
        rows.append(f"| {label} | " + " | ".join(f"{by[n][key]:.1f} ({1000 / by[n][key]:.0f})" for n in steps) + " |")
    by = {e["steps"]: e for e in runs[0]["end_to_end"]}
    rows.append("| **arithmetic floor** | " + " | ".join(f"{by[n]['floor_ms']:.2f}" for n in steps) + " |")
    return "\n".join(rows)


def gap_table(runs: list[dict]) -> str:
    rows = ["| backend | vision × floor | llm × floor | denoise × floor | 10 steps × floor | 3 steps × floor | actions vs eager |",
            "|---|---|---|---|---|---|---|"]
    for r in runs:
        by = {e["steps"]: e for e in r["end_to_end"]}
        gaps = [f"{r['components'][c]['median_ms'] / r['components'][c]['floor_ms']:.1f}" for c, _ in COMPONENTS]
        gaps += [f"{by[n]['median_ms'] / by[n]['floor_ms']:.1f}" if n in by else "" for n in (10, 3)]
        ch = r.get("check")
        check = f"cos {ch['cosine']:.5f}, max abs {ch['max_abs']:.2g}" if ch else "(reference)"
        rows.append(f"| {r['settings']['backend']} | " + " | ".join(gaps) + f" | {check} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    runs = load(argv)
    env, ceil = runs[0]["environment"], runs[0]["ceilings"]
    print(f"{env.get('gpu')} (sm {env.get('compute_capability')}, driver {env.get('driver', '?')}), "
          f"torch {env['versions'].get('torch')} CUDA {env.get('torch_cuda')}, python {env['versions'].get('python')}, "
          f"{env['date']}")
    print(f"\nMeasured ceilings: matmul {ceil['matmul_tflops']:.0f} TFLOP/s ({ceil['matmul']}); "
          f"copy {ceil['copy_gbps']:.0f} GB/s ({ceil['copy']}).\n")
    print(component_table(runs), "\n")
    print(e2e_table(runs), "\n")
    print(gap_table(runs))
    for r in runs:
        print(f"\n- `{r['settings']['backend']}`: " + "; ".join(f"{k}: {v}" for k, v in r["stages"].items()))


if __name__ == "__main__":
    main(sys.argv[1:])
