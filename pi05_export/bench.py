"""Benchmark: latency per component and end to end, with a steps sweep (``pi05-export bench``).

What is timed, on one fixed set of inputs (B x V views at the config's image size, ``max_token_len``
tokens of which 60% valid, horizon x action_dim noise):

- ``vision``: SigLIP + projector over all B*V views;
- ``llm``: the prefix pass that writes the KV cache;
- ``denoise``: one Euler velocity evaluation on the cache;
- end to end for every step count: vision -> llm -> N x (denoise + Euler update), the exact
  ``Pi05Model.sample_actions`` chain.

Timing: warm-up calls first (excluded), then each timed call is bracketed by CUDA events and
synchronized (or ``perf_counter`` on the CPU and for runtimes that return host arrays), so every
number is a latency, launch overhead included. Medians and p90 are reported.

Next to each measurement sits its arithmetic floor: FLOPs the code performs (counted by
``torch.utils.flop_counter`` on a meta-device copy of the model, so no real compute) over the matmul
rate measured in the same run, and bytes it must read (weights, KV cache) over the measured copy
bandwidth; the floor is the larger of the two.

The pipelined estimate assumes two stages on separate streams, ``vision`` of frame n+1 overlapped
with ``llm + N x denoise`` of frame n: period = max(vision, llm + N x denoise), latency unchanged.
It is arithmetic on the measured medians, not a measurement.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pi05_export.config import Pi05Config
from pi05_export.dtypes import PRECISIONS, torch_dtype
from pi05_export.errors import ConfigError, DependencyError, HardwareError, first_line

if TYPE_CHECKING:
    from pi05_export.runtime.sampler import Sampler

log = logging.getLogger(__name__)

TORCH_BACKENDS = ("torch", "torch-compile", "torch-cudagraph", "torch-compile-cudagraph")
RUNTIME_BACKENDS = ("onnxruntime", "tensorrt")
BACKENDS = TORCH_BACKENDS + RUNTIME_BACKENDS
DTYPES = PRECISIONS
BENCH_COMPONENTS = ("vision", "llm", "denoise")
DEFAULT_STEPS = (1, 2, 3, 5, 10)
VALID_TOKEN_FRACTION = 0.6  # 120 of 200 tokens at full size
_WEIGHT_PREFIXES = {
    "vision": ("paligemma_with_expert.paligemma.model.vision_tower.", "paligemma_with_expert.paligemma.model.multi_modal_projector."),
    "llm": ("paligemma_with_expert.paligemma.model.language_model.",),
    "denoise": ("paligemma_with_expert.gemma_expert.", "action_in_proj.", "action_out_proj.", "time_mlp_in.", "time_mlp_out."),
}


# ---------------------------------------------------------------------------------------------
# Small pure helpers (tested on their own)
# ---------------------------------------------------------------------------------------------
def parse_steps(steps: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,2,3,5,10"`` (or a sequence) -> sorted unique positive step counts."""
    hint = "give positive integers separated by commas, e.g. --steps 10,5,3"
    items = [s.strip() for s in steps.split(",")] if isinstance(steps, str) else list(steps)
    if not items or any(s == "" for s in items):
        raise ConfigError(f"invalid --steps {steps!r}: empty entry", hint=hint)
    try:
        values = [int(s) for s in items]
    except (TypeError, ValueError):
        raise ConfigError(f"invalid --steps {steps!r}: not an integer list", hint=hint) from None
    if any(v <= 0 for v in values):
        raise ConfigError(f"invalid --steps {steps!r}: step counts must be >= 1", hint=hint)
    return tuple(sorted(set(values)))


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90, mean and min of a list of latencies in ms."""
    a = np.asarray(times_ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min()), "n": int(a.size)}


def pipelined_estimate(vision_ms: float, llm_ms: float, denoise_ms: float, steps: int) -> dict[str, float]:
    """Two stages: vision of frame n+1 overlapped with llm + ``steps`` x denoise of frame n.

    ``latency_ms`` (observation to actions) is unchanged by pipelining; ``period_ms`` is the time
    between consecutive action chunks in steady state and ``hz`` its inverse.
    """
    tail = llm_ms + steps * denoise_ms
    period = max(vision_ms, tail)
    return {"latency_ms": vision_ms + tail, "period_ms": period, "hz": 1000.0 / period if period > 0 else math.inf}


def floor_ms(flops: float, nbytes: float, tflops: float, gbps: float) -> dict[str, float]:
    """Arithmetic floor: max(FLOPs / matmul rate, bytes / bandwidth), in ms."""
    compute = flops / (tflops * 1e12) * 1e3
    memory = nbytes / (gbps * 1e9) * 1e3
    return {"compute_floor_ms": compute, "memory_floor_ms": memory, "floor_ms": max(compute, memory)}


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    """Everything one ``bench`` run measured; ``to_json()`` is the one JSON line on stdout."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    ceilings: dict[str, Any]
    components: dict[str, dict[str, Any]]
    end_to_end: list[dict[str, Any]]
    memory: dict[str, Any]
    stages: dict[str, str] = field(default_factory=dict)  # how each component ran (compiled, fallback, ...)
    check: dict[str, Any] | None = None
    #: per step count: MSE / max abs vs this backend at 10 steps and vs fp32 eager at 10 steps (metrics.steps_table)
    steps_table: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(_round(self.to_dict()), sort_keys=True, separators=(",", ":"))


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Model and inputs
# ---------------------------------------------------------------------------------------------
def resolve_device(device: str, backend: str | None = None) -> torch.device:
    """``device`` as a torch device, checked against this machine and ``backend`` (CUDA-graph backends
    need CUDA). Raises :class:`ConfigError` / :class:`HardwareError` with the whole fix in the hint."""
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}", hint="use --device cuda or --device cpu")
    graphs = backend is not None and backend.endswith("cudagraph")
    if graphs and (device == "cpu" or not torch.cuda.is_available()):
        raise HardwareError(f"backend {backend!r} captures CUDA graphs and needs a CUDA GPU"
                            + ("" if torch.cuda.is_available() else ", which this machine lacks"),
                            hint="on the CPU use --device cpu with --backend torch or torch-compile")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HardwareError("CUDA is not available on this machine", hint="pass --device cpu (or run on a GPU machine)")
    return torch.device(device)


def load_bench_model(
    checkpoint: str | Path | None,
    *,
    preset: str | None = None,
    config: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    dtype: str = "bf16",
    device: str = "cuda",
) -> tuple[Any, dict[str, Any]]:
    """The model for a torch backend, on ``device`` under openpi's dtype policy for ``dtype``.

    Random weights are drawn on ``device`` itself (see :func:`pi05_export.checkpoint.resolve_model`).
    """
    from pi05_export.checkpoint import resolve_model

    dev = resolve_device(device)
    model, source = resolve_model(checkpoint, preset=preset, config=config, random_init=random_init, seed=seed,
                                  dtype=dtype, device=dev)
    return model.to(dev).eval(), source


def bench_inputs(cfg: Pi05Config, batch: int, seed: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Fixed benchmark inputs: all views valid, 60% of the prompt tokens valid, Gaussian noise.

    Raises :class:`InputError` before allocating when the batch would not fit in host memory."""
    from pi05_export.observation import batch_bytes, check_memory

    check_memory(batch_bytes(cfg, batch), f"--batch {batch}")
    gen = torch.Generator().manual_seed(seed)
    n_img, size, tokens = batch * cfg.num_views, cfg.vision.image_size, cfg.max_token_len
    valid = max(1, round(VALID_TOKEN_FRACTION * tokens))
    out = {
        "pixel_values": torch.rand(n_img, 3, size, size, generator=gen) * 2 - 1,
        "image_mask": torch.ones(batch, cfg.num_views, dtype=torch.bool),
        "tokens": torch.randint(0, cfg.llm.vocab_size, (batch, tokens), generator=gen),
        "token_mask": (torch.arange(tokens) < valid)[None].expand(batch, -1).contiguous(),
        "noise": torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=gen),
    }
    return {k: v.to(device) for k, v in out.items()}


def time_grid(steps: int, batch: int) -> list[torch.Tensor]:
    """t for each Euler step, accumulated in fp32 exactly as ``sample_actions`` does (t += dt)."""
    dt = torch.tensor(-1.0 / steps, dtype=torch.float32)
    t = torch.tensor(1.0, dtype=torch.float32)
    grid = []
    for _ in range(steps):
        grid.append(t.expand(batch).clone())
        t = t + dt
    return grid


# ---------------------------------------------------------------------------------------------
# Costs and ceilings
# ---------------------------------------------------------------------------------------------
def component_costs(cfg: Pi05Config, batch: int = 1, dtype: str = "bf16") -> dict[str, dict[str, float]]:
    """FLOPs and minimum bytes read per component, counted on a meta-device model (no compute).

    FLOPs are what ``torch.utils.flop_counter`` sees the code do (matmuls, convolution, attention
    matmuls). Bytes are the weights the component reads under the dtype policy, plus the KV cache
    it writes (llm) or reads (denoise), plus the token-embedding rows used; activations are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from pi05_export.model.pi05 import Pi05Model, apply_dtype_policy

    with torch.device("meta"):
        model = apply_dtype_policy(Pi05Model(cfg), torch_dtype(dtype))
    weight_bytes = {name: 0 for name in BENCH_COMPONENTS}
    for pname, p in model.named_parameters():
        for comp, prefixes in _WEIGHT_PREFIXES.items():
            if pname.startswith(prefixes) and "embed_tokens" not in pname:
                weight_bytes[comp] += p.numel() * p.element_size()
    inp = {k: v.to("meta") for k, v in bench_inputs(cfg, batch, 0).items()}
    flops: dict[str, float] = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            emb = model.embed_images(inp["pixel_values"])
        flops["vision"] = fc.get_total_flops()
        emb = emb.reshape(batch, -1, emb.shape[-1])
        with FlopCounterMode(display=False) as fc:
            kv, pm = model.prefix_kv_cache(emb, inp["image_mask"], inp["tokens"], inp["token_mask"])
        flops["llm"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.denoise_step(inp["noise"], torch.ones(batch, device="meta"), kv, pm)
        flops["denoise"] = fc.get_total_flops()
    kv_bytes = kv.numel() * kv.element_size()
    embed = model.llm.embed_tokens.weight  # type: ignore[union-attr]
    extra = {"vision": inp["pixel_values"].numel() * 4,
             "llm": kv_bytes + batch * cfg.max_token_len * embed.shape[1] * embed.element_size(),
             "denoise": kv_bytes}
    return {c: {"flops": float(flops[c]), "bytes": float(weight_bytes[c] + extra[c])} for c in BENCH_COMPONENTS}


def measure_ceilings(device: torch.device, dtype: str = "bf16", *, matmul_n: int | None = None,
                     copy_bytes: int | None = None) -> dict[str, Any]:
    """Measured matmul rate (TFLOP/s, n^3 product on random data) and copy bandwidth (GB/s, read+write)."""
    cuda = device.type == "cuda"
    n = matmul_n or (8192 if cuda else 512)
    tdtype = torch_dtype(dtype) if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    mm = _time_matmul(n, tdtype, device, gen)
    nbytes = copy_bytes or ((2 << 30) if cuda else (32 << 20))
    cp = _time_copy(nbytes, device, gen)
    return {
        "matmul_tflops": 2 * n**3 / (mm["median_ms"] * 1e-3) / 1e12,
        "matmul": f"{n}x{n}x{n} {dtype if cuda else 'fp32'} torch.mm, random data, median of 10",
        "copy_gbps": 2 * nbytes / (cp["median_ms"] * 1e-3) / 1e9,
        "copy": f"{nbytes / 2**30:.2f} GiB device copy, bytes read + written, median of 10",
    }


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict[str, float]:
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    return summarize(_time_calls(lambda: torch.mm(a, b), warmup=3, iters=10, cuda=device.type == "cuda"))


def _time_copy(nbytes: int, device: torch.device, gen: torch.Generator) -> dict[str, float]:
    src = torch.rand(nbytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    return summarize(_time_calls(lambda: dst.copy_(src), warmup=3, iters=10, cuda=device.type == "cuda"))


# ---------------------------------------------------------------------------------------------
# Stages per backend
# ---------------------------------------------------------------------------------------------
@dataclass
class _Stages:
    vision: Callable[..., Any]
    llm: Callable[..., Any]
    denoise: Callable[..., Any]
    cuda: bool
    notes: dict[str, str]
    #: whole inferences (compiled / graph backends); None: the stages are called one by one
    sampler: Sampler | None = None
    #: time [B] -> ``denoise``'s second argument (:attr:`StageFns.condition`); None: the time itself
    condition: Callable[[Any], Any] | None = None


def _time_calls(fn: Callable[[], Any], *, warmup: int, iters: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def sample_with(stages: _Stages, inp: dict[str, Any], grid: Sequence[Any]) -> Any:
    """vision -> llm -> len(grid) Euler steps, for torch tensors or numpy arrays alike; through the
    stages' :class:`Sampler` when they have one (``inp`` then holds torch tensors; ``grid`` gives the steps)."""
    from pi05_export.runtime.sampler import StageFns, denoise_loop

    if stages.sampler is not None:
        return stages.sampler.sample(inp, len(grid))
    fns = StageFns(stages.vision, stages.llm, stages.denoise, stages.condition)
    kv, pm = fns.encode(inp["pixel_values"], inp["image_mask"], inp["tokens"], inp["token_mask"])
    return denoise_loop(stages.denoise, inp["noise"], fns.step_inputs(grid), kv, pm)


def _eager_stages(model: Any, cuda: bool) -> _Stages:
    return _Stages(model.embed_images, model.prefix_kv_cache, model.denoise_step, cuda,
                   {c: "eager" for c in BENCH_COMPONENTS})


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def compile_stage(fn: Callable[..., Any], name: str, args: Sequence[Any], notes: dict[str, str], *, cuda: bool,
                  compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> Callable[..., Any]:
    """``torch.compile(fn)`` run once on ``args``; on any failure log the reason and return ``fn``."""
    compiler = compiler or torch.compile
    t0 = time.perf_counter()
    try:
        compiled = compiler(fn)
        compiled(*args)
        _sync(cuda)
    except Exception as e:  # noqa: BLE001  (any compiler failure -> eager, logged and recorded)
        reason = f"{type(e).__name__}: {first_line(e, '')}"[:300]
        log.warning("torch.compile failed for %s, running it eagerly: %s", name, reason)
        notes[name] = f"eager (torch.compile failed: {reason})"
        return fn
    notes[name] = f"torch.compile ({time.perf_counter() - t0:.1f} s to compile)"
    log.info("compiled %s in %.1f s", name, time.perf_counter() - t0)
    return compiled


def _torch_stages(model: Any, backend: str, inp: dict[str, torch.Tensor], cuda: bool,
                  compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None, *,
                  component_graphs: bool = True) -> _Stages:
    """Eager, compiled and/or CUDA-graph stages over the static inputs ``inp`` (:func:`bench_inputs`).

    Every backend but eager ``torch`` also gets a :class:`~pi05_export.runtime.sampler.Sampler` for whole
    inferences (on the graph backends: one encode graph and one denoise-loop graph, ``embed_suffix`` and
    the Euler update inside, the time frequencies in a device buffer), and runs the runtime's form of the
    model: :func:`~pi05_export.model.pi05.fuse_projections` and :func:`~pi05_export.model.pi05.use_sdpa`
    (these mutate ``model``; the same values up to reordering) and the expert's adaRMS modulations computed once per
    step count (:meth:`~pi05_export.model.pi05.Pi05Model.time_modulations`) instead of in every step."""
    from pi05_export.model.common import FUSED_WEIGHT
    from pi05_export.model.pi05 import fuse_projections, use_sdpa
    from pi05_export.runtime.sampler import GraphedCall, Sampler, StageFns

    stages = _eager_stages(model, cuda)
    compile_ = backend in ("torch-compile", "torch-compile-cudagraph")
    graph = backend.endswith("cudagraph")
    b = inp["tokens"].shape[0]
    t0 = time_grid(1, b)[0].to(inp["noise"].device)
    notes = stages.notes
    freq = torch.tensor(model.time_freq, dtype=torch.float32, device=inp["noise"].device)
    vision, llm = model.embed_images, model.prefix_kv_cache

    def denoise(x: torch.Tensor, t: torch.Tensor, kv: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
        return model.denoise_step(x, t, kv, pm, freq)  # type: ignore[no-any-return]

    if backend == "torch":
        stages.sampler = Sampler(StageFns(vision, llm, denoise), inp, graphs=False)
        return stages
    fuse_projections(model)
    use_sdpa(model.vision)  # unmasked SigLIP: flash attention; the masked Gemma stacks are faster explicit (H200)

    def condition(t: torch.Tensor) -> torch.Tensor:
        return model.time_modulations(t, freq)  # type: ignore[no-any-return]

    def denoise_modulated(x: torch.Tensor, mods: torch.Tensor, kv: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
        return model.denoise_step_modulated(x, mods, kv, pm)  # type: ignore[no-any-return]

    denoise = denoise_modulated
    emb = vision(inp["pixel_values"])
    llm_args = (emb.reshape(b, -1, emb.shape[-1]), inp["image_mask"], inp["tokens"], inp["token_mask"])
    kv, pm = llm(*llm_args)
    mods0 = condition(t0)
    if compile_:
        vision = compile_stage(vision, "vision", (inp["pixel_values"],), notes, cuda=cuda, compiler=compiler)
        llm = compile_stage(llm, "llm", llm_args, notes, cuda=cuda, compiler=compiler)
        denoise = compile_stage(denoise, "denoise", (inp["noise"], mods0, kv, pm), notes, cuda=cuda, compiler=compiler)
    fused = sum(getattr(m, FUSED_WEIGHT, None) is not None for m in model.modules())  # also fused by an earlier call
    fusion = f"fused q/k/v and gate/up ({fused} groups in the model)" if fused else "unfused (--keep-fp32 casts)"
    for c, what in (("vision", "fused q/k/v, SDPA" if fused else "SDPA"), ("llm", fusion), ("denoise", f"adaRMS modulations precomputed per step count, {fusion}")):
        notes[c] = f"{notes[c]} + {what}" if c in notes else what
    sampler = Sampler(StageFns(vision, llm, denoise, condition), inp, graphs=graph)
    if not graph or not component_graphs:  # the policy runtime only runs whole inferences (the sampler)
        return _Stages(vision, llm, denoise, cuda, notes, sampler, condition)
    # Per-component graphs, for the component timings only (whole inferences replay the sampler's graphs).
    g_vision = GraphedCall(vision, [inp["pixel_values"]])
    out = g_vision.out
    g_llm = GraphedCall(llm, [out.reshape(b, -1, out.shape[-1]), inp["image_mask"], inp["tokens"], inp["token_mask"]])
    g_denoise = GraphedCall(denoise, [inp["noise"].clone(), mods0, *g_llm.out])
    for c in BENCH_COMPONENTS:
        notes[c] = f"{notes[c]} + CUDA graph" if c in notes else "CUDA graph"
    notes["end_to_end"] = sampler.launches_per_inference
    return _Stages(g_vision, g_llm, g_denoise, cuda, notes, sampler, condition)


def _runtime_stages(backend: str, artifacts: Path) -> tuple[_Stages, Pi05Config, str]:
    """Exported components through :mod:`pi05_export.runtime` (numpy in, numpy out)."""
    from pi05_export.artifacts import Manifest

    manifest = Manifest.read(artifacts, hint="run `pi05-export onnx --out OUT` first (and `build` for tensorrt)")
    cfg = Pi05Config.from_dict(manifest.config)
    try:
        from pi05_export.runtime import open_pipeline  # type: ignore[attr-defined]
    except ImportError as e:
        raise DependencyError(f"backend {backend!r} needs pi05_export.runtime.open_pipeline, which is not available ({e})",
                              hint="use --backend torch / torch-compile until the runtime module is installed") from None
    pipe = open_pipeline(backend, Path(artifacts))
    io = "device tensors" if backend == "tensorrt" else "numpy in/out"
    notes = {c: f"{backend} ({manifest.precision} artifacts, {io})" for c in BENCH_COMPONENTS}
    return _Stages(pipe.vision, pipe.prefix, pipe.denoise, False, notes), cfg, manifest.precision


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _environment(device: torch.device) -> dict[str, Any]:
    from pi05_export.artifacts import tool_versions

    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {k: v for k, v in tool_versions().items() if v is not None},
        "torch_cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        try:
            import pynvml  # nvidia-ml-py, optional

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001  (driver version is optional metadata)
            pass
    else:
        env["gpu"] = None
    return env


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# The stage function
# ---------------------------------------------------------------------------------------------
def run_benchmark(
    model: Any | None = None,
    *,
    backend: str = "torch",
    artifacts: str | Path | None = None,
    steps: str | Sequence[int] = DEFAULT_STEPS,
    batch: int = 1,
    warmup: int = 5,
    iters: int = 30,
    dtype: str = "bf16",
    device: str = "cuda",
    seed: int = 0,
    source: dict[str, Any] | None = None,
    check: bool = True,
    pipelined: bool = False,
    compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
) -> BenchResult:
    """Time vision, llm, one denoise step and end to end for every step count in ``steps``.

    ``model`` (a :class:`Pi05Model`, see :func:`load_bench_model`) is needed for the torch backends;
    ``artifacts`` (an export directory) for ``onnxruntime`` / ``tensorrt``. With ``check`` the
    compiled/graph backends' actions are compared with eager PyTorch on the same inputs, and (torch
    backends) the steps-vs-accuracy table is computed: per step count, MSE and max abs against this
    backend's 10-step actions and against fp32 eager PyTorch at 10 steps, same inputs and noise (a
    temporary fp32 copy of the model). With ``pipelined`` (torch backends) the period per action chunk
    of the two-stream pipeline (:meth:`Sampler.sample_stream`) is measured over ``iters`` observations.

    Raises :class:`ConfigError` for bad settings and :class:`HardwareError` for CUDA backends without CUDA.
    """
    steps_t = parse_steps(steps)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
    if pipelined and backend in RUNTIME_BACKENDS:
        raise ConfigError(f"--pipelined runs the torch backends' two-stream pipeline; backend {backend!r} has none",
                          hint="drop --pipelined, or use a torch backend (torch / torch-compile; "
                               "torch-compile-cudagraph on a GPU)")
    if batch < 1 or warmup < 0 or iters < 1:
        raise ConfigError(f"need batch >= 1, warmup >= 0, iters >= 1 (got {batch}, {warmup}, {iters})",
                          hint="fix --batch/--warmup/--iters")
    dev = resolve_device(device, backend)
    cuda = dev.type == "cuda"
    if backend in RUNTIME_BACKENDS:
        if artifacts is None:
            raise ConfigError(f"backend {backend!r} runs exported graphs and needs --artifacts OUT",
                              hint="export first: pi05-export onnx ... --out OUT, then pass --artifacts OUT")
        stages, cfg, dtype = _runtime_stages(backend, Path(artifacts))
        if backend == "tensorrt" and cuda:  # engines chain on the device: no host copies in the timing
            inp: dict[str, Any] = bench_inputs(cfg, batch, seed, dev)
            grids: dict[int, list[Any]] = {n: [t.to(dev) for t in time_grid(n, batch)] for n in steps_t}
        else:
            inp = {k: v.numpy() for k, v in bench_inputs(cfg, batch, seed).items()}
            grids = {n: [t.numpy() for t in time_grid(n, batch)] for n in steps_t}
        dtype_name = dtype
    else:
        if model is None:
            raise ConfigError(f"backend {backend!r} needs a model", hint="pass a CHECKPOINT or --preset NAME --random-init")
        if artifacts is not None:
            raise ConfigError("--artifacts is only used by the onnxruntime and tensorrt backends", hint="drop --artifacts")
        from pi05_export.model.pi05 import apply_dtype_policy

        dtype_name = dtype
        model = apply_dtype_policy(model, torch_dtype(dtype)).to(dev).eval()
        cfg = model.config
        inp = bench_inputs(cfg, batch, seed, dev)
        grids = {n: [t.to(dev) for t in time_grid(n, batch)] for n in steps_t}

    log.info("bench %s on %s: measuring matmul rate and copy bandwidth", backend, dev)
    ceilings = measure_ceilings(dev, dtype_name if dtype_name in DTYPES else "bf16")
    costs = component_costs(cfg, batch, dtype_name if dtype_name in DTYPES else "bf16")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    resident = torch.cuda.memory_allocated(dev) / 2**20 if cuda else None

    with torch.no_grad():
        if backend in TORCH_BACKENDS:
            log.info("preparing %s stages", backend)
            stages = _torch_stages(model, backend, inp, cuda, compiler)
        results = _measure(stages, inp, grids, batch, warmup, iters)
        if pipelined and stages.sampler is not None:
            log.info("timing the two-stream pipeline")
            results["pipelined"] = {n: _measure_pipelined(stages.sampler, inp, n, warmup, iters) for n in steps_t}
        peak_mib = _memory_mib(dev)
        check_result, table = None, []
        if check and backend in TORCH_BACKENDS and backend != "torch":
            check_result = _check_against_eager(model, stages, inp, grids[max(steps_t)], cuda)
        if check and backend in TORCH_BACKENDS:
            log.info("steps-vs-accuracy table against an fp32 eager copy")
            table = _steps_table(model, stages, inp, steps_t)

    components = {}
    for c in BENCH_COMPONENTS:
        components[c] = {**results[c], **costs[c],
                         **floor_ms(costs[c]["flops"], costs[c]["bytes"], ceilings["matmul_tflops"], ceilings["copy_gbps"])}
    floors = {c: components[c]["floor_ms"] for c in BENCH_COMPONENTS}
    med = {c: components[c]["median_ms"] for c in BENCH_COMPONENTS}
    e2e = []
    for n in steps_t:
        r = results["e2e"][n]
        pipe = pipelined_estimate(med["vision"], med["llm"], med["denoise"], n)
        measured = results.get("pipelined", {}).get(n)
        e2e.append({"steps": n, **r, "hz": 1000.0 / r["median_ms"], "sum_of_parts_ms": pipe["latency_ms"],
                    "pipelined_estimate_ms": pipe["period_ms"],
                    **({"pipelined_period_ms": measured, "pipelined_hz": 1000.0 / measured} if measured else {}),
                    "flops": costs["vision"]["flops"] + costs["llm"]["flops"] + n * costs["denoise"]["flops"],
                    "floor_ms": floors["vision"] + floors["llm"] + n * floors["denoise"]})
    v = cfg.vision
    settings = {
        "backend": backend, "dtype": dtype_name, "device": str(dev), "batch": batch, "warmup": warmup, "iters": iters,
        "steps": list(steps_t), "pipelined": pipelined, "seed": seed, "source": source, "artifacts": str(artifacts) if artifacts else None,
        "shapes": {"views": cfg.num_views, "image_size": v.image_size, "image_tokens": cfg.num_views * v.num_patches,
                   "tokens": cfg.max_token_len, "valid_tokens": int(inp["token_mask"][0].sum()),
                   "prefix_len": cfg.prefix_len, "horizon": cfg.action_horizon, "action_dim": cfg.action_dim},
        "timing": "CUDA events around each synchronized call" if stages.cuda else "perf_counter around each call",
    }
    memory = {"peak_mib": peak_mib, "resident_before_mib": resident,
              "kind": "torch.cuda.max_memory_allocated" if cuda else "process max RSS (ru_maxrss)"}
    return BenchResult(settings=settings, environment=_environment(dev), ceilings=ceilings, components=components,
                       end_to_end=e2e, memory=memory, stages=dict(stages.notes), check=check_result, steps_table=table)


def _measure(stages: _Stages, inp: dict[str, Any], grids: dict[int, list[Any]], batch: int, warmup: int,
             iters: int) -> dict[str, Any]:
    cuda = stages.cuda
    emb = stages.vision(inp["pixel_values"])
    emb = emb.reshape(batch, -1, emb.shape[-1])
    llm_args = (emb, inp["image_mask"], inp["tokens"], inp["token_mask"])
    kv, pm = stages.llm(*llm_args)
    t = grids[max(grids)][0]
    if stages.condition is not None:  # the step's precomputed time inputs, as the denoise loop passes them
        t = stages.condition(t)
    out: dict[str, Any] = {}
    log.info("timing vision")
    out["vision"] = summarize(_time_calls(lambda: stages.vision(inp["pixel_values"]), warmup=warmup, iters=iters, cuda=cuda))
    log.info("timing llm")
    out["llm"] = summarize(_time_calls(lambda: stages.llm(*llm_args), warmup=warmup, iters=iters, cuda=cuda))
    kv, pm = stages.llm(*llm_args)
    log.info("timing denoise")
    out["denoise"] = summarize(_time_calls(lambda: stages.denoise(inp["noise"], t, kv, pm), warmup=warmup, iters=iters, cuda=cuda))
    out["e2e"] = {}
    for n, grid in grids.items():
        log.info("timing end to end, %d steps", n)
        out["e2e"][n] = summarize(_time_calls(functools.partial(sample_with, stages, inp, grid), warmup=warmup,
                                              iters=iters, cuda=cuda))
    return out


def _measure_pipelined(sampler: Sampler, inp: dict[str, Any], steps: int, warmup: int, iters: int) -> float:
    """Period per action chunk (ms) of the two-stream pipeline over ``iters`` observations, after
    ``warmup`` untimed ones: wall time from the first submission to the last chunk on the host, / iters."""
    list(sampler.sample_stream([inp] * max(warmup, 2), steps))
    t0 = time.perf_counter()
    for _ in sampler.sample_stream([inp] * iters, steps):
        pass
    return (time.perf_counter() - t0) * 1e3 / iters


def _steps_table(model: Any, stages: _Stages, inp: dict[str, Any], steps: Sequence[int]) -> list[dict[str, float]]:
    """:func:`~pi05_export.metrics.steps_table` for the benchmarked stages against an fp32 eager copy of the
    same weights (fp32 compute; for a checkpoint loaded in bf16 the weights are already bf16-rounded, so
    this is not `validate`'s fp32 reference, which keeps the checkpoint's own weights)."""
    import copy

    from pi05_export.metrics import BASELINE_STEPS, steps_table
    from pi05_export.model.pi05 import apply_dtype_policy, plain_form

    b = inp["tokens"].shape[0]
    dev = inp["noise"].device
    own = {n: sample_with(stages, inp, [t.to(dev) for t in time_grid(n, b)]).float().cpu().numpy()
           for n in sorted({*steps, BASELINE_STEPS})}
    with plain_form(model):  # the copy gets the plain model (no fused matrices to duplicate, explicit attention)
        reference = apply_dtype_policy(copy.deepcopy(model), torch.float32)
    ref = sample_with(_eager_stages(reference, stages.cuda), inp, [t.to(dev) for t in time_grid(BASELINE_STEPS, b)])
    ref_np = ref.float().cpu().numpy()
    del reference, ref
    return steps_table({n: (a, ref_np) for n, a in own.items()})


def _check_against_eager(model: Any, stages: _Stages, inp: dict[str, Any], grid: list[Any], cuda: bool) -> dict[str, Any]:
    """The stages' actions against the plain model run eagerly (as exported: unfused, explicit attention,
    time conditioning inside each step), same inputs and noise."""
    from pi05_export.model.pi05 import plain_form

    with plain_form(model):
        ref = sample_with(_eager_stages(model, cuda), inp, grid).float()
    got = sample_with(stages, inp, grid).float()
    diff = (got - ref).abs()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    return {"reference": "torch eager (plain model), same inputs", "steps": len(grid), "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()), "cosine": float(cos)}


# ---------------------------------------------------------------------------------------------
# Human table
# ---------------------------------------------------------------------------------------------
def format_table(result: BenchResult | dict[str, Any]) -> str:
    """The human-readable summary printed on stderr."""
    r = result.to_dict() if isinstance(result, BenchResult) else result
    s, env, ceil = r["settings"], r["environment"], r["ceilings"]
    where = f"{env.get('gpu')} (sm {env.get('compute_capability')})" if env.get("gpu") else f"CPU x{env.get('cpu_count')}"
    sh = s["shapes"]
    lines = [
        f"pi05-export bench  backend={s['backend']}  dtype={s['dtype']}  device={where}  batch={s['batch']}  "
        f"warmup={s['warmup']} iters={s['iters']}",
        f"inputs: {sh['views']} views {sh['image_size']}px, {sh['tokens']} tokens ({sh['valid_tokens']} valid), "
        f"horizon {sh['horizon']}; torch {env['versions'].get('torch')}",
        f"ceilings: matmul {ceil['matmul_tflops']:.3g} TFLOP/s ({ceil['matmul']}), copy {ceil['copy_gbps']:.0f} GB/s",
        f"{'component':<18}{'median ms':>10}{'p90 ms':>9}{'GFLOP':>10}{'MB read':>9}{'floor ms':>10}{'x floor':>9}  how",
    ]
    label = {"vision": f"vision ({sh['views']} views)", "llm": "llm (prefix)", "denoise": "denoise (1 step)"}
    for c in BENCH_COMPONENTS:
        m = r["components"][c]
        lines.append(f"{label[c]:<18}{m['median_ms']:>10.3f}{m['p90_ms']:>9.3f}{m['flops'] / 1e9:>10.1f}"
                     f"{m['bytes'] / 1e6:>9.1f}{m['floor_ms']:>10.3f}{m['median_ms'] / m['floor_ms']:>9.1f}  "
                     f"{r['stages'].get(c, '')}")
    lines.append(f"{'steps':<7}{'e2e ms':>9}{'p90 ms':>9}{'Hz':>8}{'sum parts':>11}{'pipe est ms':>13}"
                 f"{'pipe ms':>9}{'pipe Hz':>9}{'floor ms':>10}{'x floor':>9}")
    for e in r["end_to_end"]:
        measured = (f"{e['pipelined_period_ms']:>9.2f}{e['pipelined_hz']:>9.1f}" if "pipelined_period_ms" in e
                    else f"{'-':>9}{'-':>9}")
        lines.append(f"{e['steps']:<7}{e['median_ms']:>9.2f}{e['p90_ms']:>9.2f}{e['hz']:>8.1f}{e['sum_of_parts_ms']:>11.2f}"
                     f"{e['pipelined_estimate_ms']:>13.2f}{measured}{e['floor_ms']:>10.3f}"
                     f"{e['median_ms'] / e['floor_ms']:>9.1f}")
    if r["stages"].get("end_to_end"):
        lines.append(f"end to end: {r['stages']['end_to_end']}; pipe: measured period per chunk of the two-stream "
                     "pipeline (--pipelined); pipe est: max(vision, llm + steps x denoise) from the medians")
    if r.get("steps_table"):
        lines.append(f"{'steps':<7}{'MSE vs 10 own':>15}{'max abs':>10}{'MSE vs fp32 10':>16}{'max abs':>10}"
                     "  (fp32: fp32 compute of the same weights)")
        for row in r["steps_table"]:
            lines.append(f"{int(row['steps']):<7}{row['mse_vs_own']:>15.3g}{row['max_abs_vs_own']:>10.3g}"
                         f"{row['mse_vs_reference']:>16.3g}{row['max_abs_vs_reference']:>10.3g}")
    mem = r["memory"]
    lines.append(f"peak memory {mem['peak_mib']:.0f} MiB ({mem['kind']})")
    if r.get("check"):
        ch = r["check"]
        lines.append(f"actions vs eager ({ch['steps']} steps): max abs {ch['max_abs']:.3g}, cosine {ch['cosine']:.6f}")
    return "\n".join(lines)
