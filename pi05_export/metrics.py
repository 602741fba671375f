"""Comparison metrics used by tests, ``validate`` and quantization reports."""

from __future__ import annotations

from typing import Any

import numpy as np


def _f64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (bf16 included)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def compare(actual: Any, reference: Any) -> dict[str, float]:
    """cosine similarity, max abs, mean abs, relative L2 of ``actual`` vs ``reference``, and
    ``max_rel`` = max abs / max(1, max |reference|) (fp32 rounding grows with magnitude)."""
    a, r = _f64(actual), _f64(reference)
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {r.shape}")
    d = np.abs(a - r)
    na, nr = np.linalg.norm(a), np.linalg.norm(r)
    if a.size == 0:
        return {"cosine": 1.0, "max_abs": 0.0, "mean_abs": 0.0, "rel_l2": 0.0, "max_rel": 0.0}
    if na == 0 and nr == 0:
        cos = 1.0
    else:
        cos = float(a.ravel() @ r.ravel() / max(na * nr, 1e-300))
    finite = bool(np.isfinite(a).all())
    return {
        "cosine": cos if finite else float("nan"),
        "max_abs": float(d.max()) if finite else float("inf"),
        "mean_abs": float(d.mean()) if finite else float("inf"),
        "rel_l2": float(np.linalg.norm(a - r) / max(nr, 1e-300)) if finite else float("inf"),
        "max_rel": float(d.max() / max(1.0, float(np.abs(r).max()))) if finite else float("inf"),
    }


def describe(m: dict[str, float]) -> str:
    return f"max abs {m['max_abs']:.3e}, mean abs {m['mean_abs']:.3e}, cosine {m['cosine']:.7f}, rel L2 {m['rel_l2']:.3e}"


BASELINE_STEPS = 10  # openpi's default step count: the steps-vs-accuracy table compares against it


def steps_table(actions: dict[int, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, float]]:
    """Per step count: MSE and max abs of the artifact's actions against its own ``BASELINE_STEPS``-step
    actions (what cutting steps costs on this backend) and against the fp32 PyTorch ``BASELINE_STEPS``-step
    actions (what it costs in all), same noise. ``actions``: steps -> (artifact, reference) arrays."""
    own, ref = (a.astype(np.float64) for a in actions[BASELINE_STEPS])
    rows = []
    for n in sorted(actions, reverse=True):
        a = actions[n][0].astype(np.float64)
        rows.append({"steps": n, "mse_vs_own": float(np.mean((a - own) ** 2)), "max_abs_vs_own": float(np.abs(a - own).max()),
                     "mse_vs_reference": float(np.mean((a - ref) ** 2)), "max_abs_vs_reference": float(np.abs(a - ref).max())})
    return rows
