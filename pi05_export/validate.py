"""Validation: every exported artifact against the fp32 PyTorch reference, through Polygraphy.

Per component, Polygraphy's ``Comparator.run`` drives a custom PyTorch runner and the artifact's
runner (``OnnxrtRunner`` / ``TrtRunner``) on identical inputs recorded from the reference sampling
loop (saved with the report). End to end, both pipelines sample actions from the same noise for
each requested step count, and the per-step velocity drift is recorded. Thresholds come from
:mod:`pi05_export.tolerances`; the report is ``OUT/reports/validation.{json,md}`` + ``drift.png``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import platform
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.artifacts import REPORTS_SUBDIR, Manifest, staging_dir, tool_versions, writing
from pi05_export.components import Component, ComponentSpec
from pi05_export.errors import ArtifactError
from pi05_export.metrics import BASELINE_STEPS, compare, steps_table
from pi05_export.observation import Observation, load_observation, random_observation
from pi05_export.runtime import Pipeline, open_pipeline, pipeline_for_model
from pi05_export.runtime.backends import Backend, to_spec
from pi05_export.tolerances import Status, thresholds_for, worst

log = logging.getLogger(__name__)
REPORTS = REPORTS_SUBDIR
DENOISE_STEPS_SAMPLED = 3  # component checks use the first, middle and last Euler step's inputs
FP16_MAX = 65504.0  # the largest finite IEEE 754 binary16 value: beyond it fp16 holds inf
ACTIVATION_ROWS = 8  # the report lists the largest activations, plus every one past FP16_MAX


@dataclass
class Check:
    name: str  # e.g. "llm/kv_cache" or "actions@10"
    status: Status
    gate: str
    metrics: dict[str, float]


@dataclass
class Report:
    artifacts: str
    backend: str
    precision: str
    tolerance_row: str
    reference: str
    recipe: str | None = None
    formats: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    drift: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    component_gate: dict[str, Any] = field(default_factory=dict)
    steps_table: list[dict[str, float]] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def graphs(self) -> str:
        """What was validated, by name: ``fp16 graphs``, or ``recipe fp8 (FP8) on fp32`` for a quantized set."""
        if self.recipe:
            return f"recipe {self.recipe} ({', '.join(self.formats) or 'quantized'}) on {self.precision}"
        return f"{self.precision} graphs"

    @property
    def status(self) -> Status:
        return worst([c.status for c in self.checks])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "graphs": self.graphs, "status": self.status}


def _polygraphy_runner(backend: Backend, component: Component, artifact_spec: ComponentSpec) -> Any:
    """A Polygraphy runner over one of our backends: the PyTorch reference (Polygraphy's own torch
    runner breaks on bf16), or TensorRT engines through EngineRunner (bf16-safe casts)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=f"{backend.name}-{component.value}")

        def activate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for t in artifact_spec.inputs:  # the feed carries the artifact's dtypes; we cast inside
                meta.add(t.name, to_spec(np.zeros(0), t).dtype, [None if isinstance(d, str) else d for d in t.shape])
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
            start = time.perf_counter()
            out = backend.run(component, feed_dict)
            self.inference_time = time.perf_counter() - start
            return OrderedDict(out)

        def deactivate_impl(self) -> None:
            pass

    return TorchRunner()


def _artifact_runner(pipeline: Pipeline, component: Component) -> Any:
    backend = pipeline.backend
    if backend.name == "onnxruntime":
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(backend._session(component), name=f"onnxruntime-{component.value}")  # type: ignore[attr-defined]
    return _polygraphy_runner(backend, component, pipeline.specs[component])


def record_component_inputs(reference: Pipeline, obs: Observation, steps: int, seed: int) -> dict[Component, list[dict[str, np.ndarray]]]:
    """Inputs every component sees in the reference sampling loop (denoise: first/middle/last step)."""
    feeds: dict[Component, list[dict[str, np.ndarray]]] = {c: [] for c in Component}
    reference.recorder = lambda comp, feed: feeds[comp].append({k: np.array(v) for k, v in feed.items()})
    try:
        reference.sample_actions(obs, steps=steps, seed=seed)
        picks = sorted({0, len(feeds[Component.denoise]) // 2, len(feeds[Component.denoise]) - 1})
        feeds[Component.denoise] = [feeds[Component.denoise][i] for i in picks]
        for feed in feeds[Component.denoise]:  # split-path inputs (expert, projections) at the same steps
            reference.denoise_split(feed["x_t"], feed["t"], feed["kv_cache"], feed["prefix_mask"])
    finally:
        reference.recorder = None
    return feeds


@contextlib.contextmanager
def activation_peaks(model: Any) -> Any:
    """Collect, while the block runs, the largest |value| each layer of ``model`` reads or writes (a
    forward hook on every module: inputs and outputs, floating tensors), keyed by its ``named_modules()``
    name in the order the layers first ran. Norm layers' inputs are the residual stream."""
    import torch

    peaks = Peaks()

    def largest(tensors: Any) -> float:
        values = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        return max((float(t.detach().abs().amax()) for t in values), default=0.0)

    def hook(name: str) -> Callable[..., None]:
        def record(module: Any, args: tuple[Any, ...], out: Any) -> None:
            read = largest(args)
            peak = max(read, largest(out if isinstance(out, tuple) else (out,)))
            if peak or name in peaks:
                peaks[name] = max(peaks.get(name, 0.0), peak)
                peaks.read[name] = max(peaks.read.get(name, 0.0), read)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        yield peaks
    finally:
        for h in handles:
            h.remove()


class Peaks(dict[str, float]):
    """Layer name -> the largest |value| it read or wrote; ``read``: the largest it read (its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.read: dict[str, float] = {}


def activation_rows(peaks: dict[str, float], rows: int = ACTIVATION_ROWS) -> list[dict[str, Any]]:
    """The report's activation table: the ``rows`` largest peaks and every one past :data:`FP16_MAX`
    (``max_abs``; ``vs_fp16`` = max_abs / 65504; ``order``: when the layer first ran, so the smallest
    ``order`` past 1.0 is where fp16 overflows first)."""
    order = {name: i for i, name in enumerate(peaks)}
    ranked = sorted(peaks, key=lambda n: -peaks[n])
    keep = [n for n in ranked if n in ranked[:rows] or peaks[n] > FP16_MAX]
    read = getattr(peaks, "read", {})
    return [{"layer": n, "max_abs": peaks[n], "vs_fp16": peaks[n] / FP16_MAX, "order": order[n],
             "reads_past_fp16": read.get(n, 0.0) > FP16_MAX} for n in keep]


def measure_activations(model: Any, obs: Observation, *, steps: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """:func:`activation_rows` of one fp32 reference sampling run (``steps`` Euler steps, default the
    config's) on ``obs``: the per-layer magnitudes ``inspect --inputs`` prints."""
    cfg = model.config
    with activation_peaks(model) as peaks:
        pipeline_for_model(model).sample_actions(obs.with_noise(cfg, seed), steps=steps or cfg.num_steps, seed=seed)
    return activation_rows(peaks)


def fp16_overflow_advice(rows: list[dict[str, Any]]) -> str | None:
    """One line naming the first layer whose activations pass 65504 and the two fixes, or None."""
    over = sorted((r for r in rows if r["max_abs"] > FP16_MAX), key=lambda r: r["order"])
    if not over:
        return None
    # A layer whose *input* is already past 65504 (e.g. down_proj reading gelu(gate) * up) cannot fix it by
    # staying fp32 itself: the value was made in fp16 before it. Keep the block that makes it instead.
    layer = over[0]["layer"]
    first = (layer.rpartition(".")[0] or layer) if over[0].get("reads_past_fp16") else layer
    return (f"in fp32 PyTorch on these inputs, {len(over)} layer(s) read or write values past fp16's 65504, first {first} "
            f"({over[0]['max_abs']:.3g}): fp16 graphs overflow there unless it stays fp32 (`onnx --precision fp16 --keep-fp32 "
            f"'{first}'`, or a recipe rule `format: fp32`); bf16 has fp32's range")


def _judge(name: str, gate: Any, actual: np.ndarray, ref: np.ndarray) -> Check:
    m = compare(actual, ref)
    if actual.dtype == np.bool_ or np.issubdtype(actual.dtype, np.integer):
        status: Status = "PASS" if m["max_abs"] == 0 else "FAIL"  # masks must match exactly
        return Check(name, status, "exact", m)
    return Check(name, gate.judge(m[gate.metric]), gate.describe(), m)


def validate_artifacts(
    artifacts: str | Path,
    *,
    backend: str = "onnxruntime",
    model: Any,
    steps: Sequence[int] = (10, 3),
    inputs: str | Path | None = None,
    seed: int = 0,
    batch: int = 2,
    engines: str | None = None,
    write_report: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> Report:
    """Compare every component and the end-to-end actions of ``artifacts`` against ``model`` (fp32)."""
    from polygraphy.logger import G_LOGGER

    quiet = G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.WARNING
    with G_LOGGER.verbosity(quiet):
        return _validate(artifacts, backend=backend, model=model, steps=steps, inputs=inputs, seed=seed, batch=batch,
                         engines=engines, write_report=write_report, progress=progress)


def _validate(artifacts: str | Path, *, backend: str, model: Any, steps: Sequence[int], inputs: str | Path | None, seed: int,
              batch: int, engines: str | None, write_report: bool, progress: Callable[[str, int, int], None] | None) -> Report:
    from polygraphy.comparator import Comparator

    artifacts = Path(artifacts)
    manifest = Manifest.read(artifacts)
    if manifest.config != model.config.to_dict():
        raise ArtifactError(
            f"{artifacts} was exported from a different model config than the reference",
            hint="pass the checkpoint the artifacts were exported from (--checkpoint)",
        )
    formats = (manifest.extra or {}).get("formats")
    row, gates = thresholds_for(manifest.precision, formats)
    cfg = model.config
    reference = pipeline_for_model(model)
    obs = load_observation(inputs, cfg) if inputs else random_observation(cfg, batch=batch, seed=seed)
    obs = obs.with_noise(cfg, seed)
    report = Report(
        artifacts=str(artifacts), backend=backend, precision=manifest.precision, tolerance_row=row,
        reference="PyTorch fp32 (pi05_export.model)", recipe=(manifest.recipe or {}).get("name"), formats=list(formats or []),
        component_gate=gates.component.to_dict(),
        environment={"tools": tool_versions(), "platform": platform.platform(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
                     "steps": list(steps), "batch": obs.batch, "seed": seed, "inputs": str(inputs) if inputs else "random"},
    )
    with contextlib.ExitStack() as stack:
        if write_report:  # replace OUT/reports only with a complete new report
            stack.enter_context(writing(artifacts / REPORTS))  # a full disk names the reports, not a polygraphy file
            tmp = stack.enter_context(staging_dir(artifacts / REPORTS, marker="validation.json", marker_keys=("checks", "status")))
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pi05-validate-")))
        target = open_pipeline(backend, artifacts, engines=engines, full_hash=True)  # a PASS must be about these exact bytes
        stack.callback(target.close)
        comps = [c for c in Component if c in target.specs]  # what this backend has (engines: what was built)
        total = len(comps) + len(steps)
        with activation_peaks(model) as peaks:
            feeds = record_component_inputs(reference, obs, max(steps), seed)
        report.activations = activation_rows(peaks)
        for i, comp in enumerate(comps):
            if progress:
                progress(comp.value, i, total)
            spec = target.specs[comp]
            loader = [OrderedDict((t.name, to_spec(f[t.name], t)) for t in spec.inputs) for f in feeds[comp]]
            runners = [_polygraphy_runner(reference.backend, comp, spec), _artifact_runner(target, comp)]
            results = Comparator.run(runners, data_loader=loader, save_inputs_path=str(tmp / f"inputs_{comp.value}.json"))
            results.save(str(tmp / f"outputs_{comp.value}.json"))
            (ref_name, ref_iters), (_, art_iters) = results.items()
            for out in spec.outputs:
                ref = np.concatenate([np.asarray(it[out.name], np.float64).ravel() for it in ref_iters])
                act = np.concatenate([np.asarray(it[out.name]).astype(np.float64).ravel() for it in art_iters])
                if out.dtype == "bool":
                    act, ref = act.astype(bool), ref.astype(bool)
                report.checks.append(_judge(f"{comp.value}/{out.name}", gates.component, act, ref))
                if not np.isfinite(act).all() and np.isfinite(ref).all():
                    report.notes.append(_overflow_note(target, comp, out.name, art_iters, loader, manifest.precision))
                    log.error(report.notes[-1])
        have = set(comps)
        end_to_end = {Component.vision, Component.llm} <= have and (
            Component.denoise in have or {Component.expert, Component.projections} <= have)
        if not end_to_end:
            report.notes.append("end to end skipped: it needs vision, llm and denoise (or expert + projections) graphs")
            log.warning(report.notes[-1])
        actions: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # steps -> (artifact, reference)
        for j, n in enumerate(steps if end_to_end else []):
            if progress:
                progress(f"end to end, {n} steps", len(comps) + j, total)
            ref_trace = reference.sample_actions(obs, steps=n, seed=seed)
            art_trace = target.sample_actions(obs, steps=n, seed=seed)
            actions[n] = (art_trace.actions, ref_trace.actions)
            report.checks.append(_judge(f"actions@{n}", gates.actions, art_trace.actions, ref_trace.actions))
            report.drift[str(n)] = [compare(a, r) for a, r in zip(art_trace.velocities, ref_trace.velocities, strict=True)]
        if actions:
            if BASELINE_STEPS not in actions:  # the table's baseline: both pipelines at 10 steps, same noise
                actions[BASELINE_STEPS] = (target.sample_actions(obs, steps=BASELINE_STEPS, seed=seed).actions,
                                           reference.sample_actions(obs, steps=BASELINE_STEPS, seed=seed).actions)
            report.steps_table = steps_table(actions)
        advice = fp16_overflow_advice(report.activations)
        if advice is not None and (manifest.precision != "fp16" or report.status == "FAIL"):  # not for guarded fp16 that passes
            report.notes.append(advice)
            log.warning(advice)
        if progress:
            progress("report", total, total)
        if write_report:
            (tmp / "validation.json").write_text(json.dumps(report.to_dict(), indent=2))
            (tmp / "validation.md").write_text(render_markdown(report))
            if report.drift:
                plot_drift(report, tmp / "drift.png")
    return report


def _overflow_note(target: Pipeline, comp: Component, output: str, art_iters: Any, loader: list[Any], precision: str) -> str:
    """Name the first value that overflowed (emulated bf16/fp16 graphs on ONNX Runtime) and the fix."""
    from pi05_export.runtime.backends import first_overflow

    emulated = getattr(target.backend, "emulated", {}).get(comp)
    bad = next((i for i, it in enumerate(art_iters) if not np.isfinite(np.asarray(it[output], np.float32)).all()), 0)
    where = first_overflow(emulated, dict(loader[bad])) if emulated is not None else None
    limit = "65504 (fp16's largest value)" if precision == "fp16" else "its precision's range"
    first = f"; the first value to overflow is '{where}'" if where else ""
    return (f"{comp.value}/{output} holds inf/NaN where the fp32 reference is finite: an activation exceeds {limit}{first}. "
            "Export bf16 (fp32's exponent range), or keep that layer in fp32")


def render_markdown(report: Report) -> str:
    icon = {"PASS": "PASS", "WARN": "WARN", "FAIL": "**FAIL**"}
    lines = [
        f"# Validation: {report.status}",
        "",
        f"`{report.artifacts}` on **{report.backend}** ({report.graphs}; tolerance row `{report.tolerance_row}`) "
        f"vs {report.reference}. {report.environment.get('date', '')}, batch {report.environment.get('batch')}, "
        f"inputs: {report.environment.get('inputs')}.",
        "",
        "| check | status | cosine | max abs | mean abs | rel L2 | gate |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report.checks:
        m = c.metrics
        lines.append(f"| {c.name} | {icon[c.status]} | {m['cosine']:.6f} | {m['max_abs']:.2e} | {m['mean_abs']:.2e} | "
                     f"{m['rel_l2']:.2e} | {c.gate} |")
    if report.steps_table:
        lines += ["", f"Steps vs accuracy (actions; baseline: {BASELINE_STEPS} steps, same noise):", "",
                  f"| steps | MSE vs own {BASELINE_STEPS} steps | max abs vs own {BASELINE_STEPS} steps | "
                  f"MSE vs PyTorch fp32 {BASELINE_STEPS} steps | max abs vs PyTorch fp32 {BASELINE_STEPS} steps |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['mse_vs_own']:.3e} | {r['max_abs_vs_own']:.3e} | {r['mse_vs_reference']:.3e} | "
                  f"{r['max_abs_vs_reference']:.3e} |" for r in report.steps_table]
    if report.activations:
        lines += ["", f"Largest activations vs fp16's largest value ({FP16_MAX:.0f}): |value| a layer reads or writes in the fp32 "
                  "PyTorch reference on these inputs (norm inputs are the residual stream):", "",
                  "| layer | max abs | / 65504 |", "|---|---|---|"]
        lines += [f"| {r['layer']} | {r['max_abs']:.3g} | {r['vs_fp16']:.3g}{' **overflows fp16**' if r['max_abs'] > FP16_MAX else ''} |"
                  for r in report.activations]
    lines += [f"\nNote: {n}" for n in report.notes]
    lines += ["", "Per-step velocity drift (artifact loop vs reference loop, same noise):", ""]
    for n, rows in report.drift.items():
        worst_cos = min(r["cosine"] for r in rows)
        worst_abs = max(r["max_abs"] for r in rows)
        lines.append(f"- {n} steps: worst cosine {worst_cos:.6f}, worst max abs {worst_abs:.2e} (see drift.png)")
    tools = report.environment.get("tools", {})
    lines += ["", "Tools: " + ", ".join(f"{k} {v}" for k, v in tools.items() if v), ""]
    return "\n".join(lines)


def plot_drift(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for n, rows in report.drift.items():
        x = np.arange(1, len(rows) + 1)
        axes[0].semilogy(x, [max(r["max_abs"], 1e-12) for r in rows], marker="o", label=f"{n} steps")
        axes[1].semilogy(x, [max(1 - r["cosine"], 1e-12) for r in rows], marker="o", label=f"{n} steps")
    gate = report.component_gate
    if gate.get("metric") == "cosine":  # the per-component gate, for scale (velocities are the denoise output)
        axes[1].axhline(1 - float(gate["passing"]), color="tab:red", ls="--", label=f"gate: cosine >= {gate['passing']:g}")
    elif gate.get("passing") is not None:
        axes[0].axhline(float(gate["passing"]), color="tab:red", ls="--", label=f"gate: {gate['metric']} <= {gate['passing']:g}")
    axes[0].set_title("velocity max abs diff per step")
    axes[1].set_title("velocity 1 - cosine per step")
    for ax in axes:
        ax.set_xlabel("Euler step (t = 1 -> 0)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report.backend}, {report.graphs} vs PyTorch fp32: {report.status}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
