"""Whole-inference sampling for the torch backends: CUDA graphs over the entire inference, and a
two-stream pipeline over a stream of observations.

One inference is two parts: **encode** (vision -> Gemma-2B prefix -> KV cache) and **denoise** (every
Euler step of the flow-matching loop: ``embed_suffix`` with the sinusoidal time embedding, the action
expert, ``action_out_proj`` and the fp32 update ``x += dt * v_t``, openpi ``pi0.py`` ``sample_actions``).
On CUDA each part is one CUDA graph (one denoise graph per step count), so an inference is two graph
launches with no host synchronization until the actions are read. The time grid and the time
embedding's frequencies live in device buffers, so nothing is copied from the host inside the loop.

A :class:`SampleSlot` owns the static buffers of one observation in flight (inputs, KV cache, actions)
and the graphs captured over them. :meth:`Sampler.sample_stream` alternates two slots on two CUDA
streams: the encode of observation n+1 runs on one stream while the denoise of observation n runs on the
other, so a stream of observations is served at a period near ``max(encode, denoise)`` rather than their
sum. On the CPU the same code runs in the same order without streams or graphs (tests check that the
pipelined actions equal the sequential ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: the model inputs of one observation, the keys of :func:`pi05_export.bench.bench_inputs`
INPUT_KEYS = ("pixel_values", "image_mask", "tokens", "token_mask", "noise")
ENCODE_KEYS = ("pixel_values", "image_mask", "tokens", "token_mask")


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are views of the same memory with the same layout (no copy needed)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class GraphedCall:
    """``fn`` captured in a CUDA graph over static input tensors. Inputs that are not the static
    tensors themselves are copied in before each replay; the output tensors are reused by every replay.

    Two warm-up calls run on the capture stream first (torch's recipe for capture: lazy initialisation
    and allocator state settle outside the graph). ``stream``: the stream to capture on. Graphs that may
    replay concurrently must be captured on different streams: cuBLAS keeps one workspace per stream,
    and a graph bakes the workspace of its capture stream in, so two graphs captured on one stream and
    replayed at once share split-K scratch (seen as a hang on the H200). Raises whatever ``fn`` or the
    capture raises.
    """

    def __init__(self, fn: Callable[..., Any], static_args: Sequence[Any], *, stream: torch.cuda.Stream | None = None) -> None:
        self.args = list(static_args)
        side = stream if stream is not None else torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.out = fn(*self.args)

    def __call__(self, *args: Any) -> Any:
        for static, a in zip(self.args, args, strict=True):
            if isinstance(static, torch.Tensor) and not same_tensor(static, a):
                static.copy_(a)
        self.graph.replay()
        return self.out


def denoise_loop(denoise: Callable[..., torch.Tensor], noise: torch.Tensor, grid: Sequence[Any],
                 kv_cache: torch.Tensor, prefix_mask: torch.Tensor) -> torch.Tensor:
    """``len(grid)`` Euler steps from t=1 (``noise`` [B, H, A]) to t=0, fp32: ``x += dt * v_t`` with
    ``dt = -1/len(grid)`` and ``grid`` the per-step times [B] (:func:`pi05_export.bench.time_grid`,
    accumulated in fp32 as openpi's ``sample_actions`` does) or what ``denoise`` takes in their place
    (:meth:`StageFns.step_inputs`). Returns actions float32 [B, H, A]; torch
    tensors or (exported graphs on ONNX Runtime) numpy float32 arrays alike."""
    x = noise.float() if isinstance(noise, torch.Tensor) else noise
    dt = -1.0 / len(grid)
    for t in grid:
        x = x + dt * denoise(x, t, kv_cache, prefix_mask)
    return x


@dataclass
class StageFns:
    """The model's parts as called by the sampler (eager or ``torch.compile``d, never graphed here).

    ``vision``: pixel_values [B*V, 3, S, S] -> image_embeds [B*V, N, D]; ``llm``: (image_embeds [B, V*N, D],
    image_mask, tokens, token_mask) -> (KV cache, prefix_mask); ``denoise``: (x_t, c, KV cache,
    prefix_mask) -> v_t [B, H, A] fp32, where ``c`` is the step's time [B] or, with ``condition``,
    ``condition(t)``: what the step needs of its time, computed once per step count outside the loop
    (the expert's adaRMS modulations, :meth:`pi05_export.model.pi05.Pi05Model.time_modulations`)."""

    vision: Callable[..., Any]
    llm: Callable[..., Any]
    denoise: Callable[..., torch.Tensor]
    condition: Callable[[torch.Tensor], Any] | None = None

    def step_inputs(self, grid: Sequence[Any]) -> list[Any]:
        """The per-step second argument of ``denoise`` for the times ``grid`` (:func:`denoise_loop`)."""
        return [self.condition(t) for t in grid] if self.condition is not None else list(grid)

    def encode(self, pixel_values: torch.Tensor, image_mask: torch.Tensor, tokens: torch.Tensor,
               token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.vision(pixel_values)
        b = tokens.shape[0]
        return self.llm(emb.reshape(b, -1, emb.shape[-1]), image_mask, tokens, token_mask)  # type: ignore[no-any-return]


class SampleSlot:
    """Static buffers for one observation in flight, and (``graphs``) the CUDA graphs captured over
    them: one encode graph and one denoise graph per step count, captured on first use."""

    def __init__(self, fns: StageFns, inputs: dict[str, torch.Tensor], *, graphs: bool) -> None:
        self.fns, self.inputs, self.graphs = fns, inputs, graphs
        self.device = inputs["noise"].device
        self.batch = int(inputs["tokens"].shape[0])
        self._encode: GraphedCall | None = None
        self._loops: dict[int, GraphedCall] = {}
        self._grids: dict[int, list[torch.Tensor]] = {}
        self.kv_cache: torch.Tensor | None = None
        self.prefix_mask: torch.Tensor | None = None
        self._prepared: set[int] = set()
        # one capture stream per slot: this slot's graphs get their own cuBLAS workspace (GraphedCall)
        self._capture = torch.cuda.Stream(self.device) if graphs else None

    def load(self, batch: dict[str, torch.Tensor]) -> None:
        """Copy one observation's inputs (same shapes and dtypes as the static ones) into this slot."""
        for k in INPUT_KEYS:
            if not same_tensor(self.inputs[k], batch[k]):
                self.inputs[k].copy_(batch[k], non_blocking=True)

    def grid(self, steps: int) -> list[Any]:
        """The ``steps`` Euler steps' denoise inputs (:meth:`StageFns.step_inputs`), made once per step count
        on this slot's device (static buffers of its denoise graph)."""
        if steps not in self._grids:
            from pi05_export.bench import time_grid

            self._grids[steps] = self.fns.step_inputs([t.to(self.device) for t in time_grid(steps, self.batch)])
        return self._grids[steps]

    def encode(self) -> None:
        """vision -> prefix -> KV cache, into this slot's KV buffers."""
        args = [self.inputs[k] for k in ENCODE_KEYS]
        if not self.graphs:
            self.kv_cache, self.prefix_mask = self.fns.encode(*args)
            return
        if self._encode is None:
            self._encode = GraphedCall(self.fns.encode, args, stream=self._capture)
        self.kv_cache, self.prefix_mask = self._encode(*args)

    def denoise(self, steps: int) -> torch.Tensor:
        """Every Euler step on this slot's KV cache; returns the actions tensor float32 [B, H, A] (a
        static buffer on CUDA: read or copy it before this slot's next denoise)."""
        if self.kv_cache is None or self.prefix_mask is None:
            raise RuntimeError("SampleSlot.denoise before encode")
        args = [self.inputs["noise"], self.grid(steps), self.kv_cache, self.prefix_mask]
        if not self.graphs:
            return denoise_loop(self.fns.denoise, *args)
        if steps not in self._loops:
            self._loops[steps] = GraphedCall(lambda *a: denoise_loop(self.fns.denoise, *a), args, stream=self._capture)
        return self._loops[steps](*args)  # type: ignore[no-any-return]

    def prepare(self, steps: int) -> None:
        """Capture (or, without graphs, warm up) encode and the ``steps`` denoise graph now, not mid-stream.
        Once per step count: a prepared slot runs nothing here (no extra inference per stream)."""
        if steps in self._prepared:
            return
        self.encode()
        self.denoise(steps)
        self._prepared.add(steps)


class Sampler:
    """Whole inferences over :class:`StageFns` on one device at one static batch.

    ``inputs``: the static input tensors (:data:`INPUT_KEYS`, shapes fixed for this sampler); slot 0 uses
    them in place, a second slot (for :meth:`sample_stream`) clones them. ``graphs`` needs CUDA.
    """

    def __init__(self, fns: StageFns, inputs: dict[str, torch.Tensor], *, graphs: bool) -> None:
        self.fns, self.graphs = fns, graphs
        self.cuda = inputs["noise"].is_cuda
        if graphs and not self.cuda:
            raise ValueError("CUDA graphs need CUDA tensors")
        self.slots = [SampleSlot(fns, inputs, graphs=graphs)]

    @property
    def launches_per_inference(self) -> str:
        return "2 CUDA graph launches (encode, denoise loop)" if self.graphs else "eager launches"

    def sample(self, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
        """One inference: actions float32 [B, H, A] on the device (slot 0's static buffer on CUDA graphs)."""
        slot = self.slots[0]
        slot.load(batch)
        slot.encode()
        return slot.denoise(steps)

    def _second_slot(self) -> SampleSlot:
        if len(self.slots) == 1:
            self.slots.append(SampleSlot(self.fns, {k: v.clone() for k, v in self.slots[0].inputs.items()},
                                         graphs=self.graphs))
        return self.slots[1]

    def sample_stream(self, batches: Iterable[dict[str, torch.Tensor]], steps: int) -> Iterator[np.ndarray]:
        """Pipelined inferences over a stream of observations, yielded in order as host arrays float32
        [B, H, A]. Encode of observation n+1 is issued before the denoise of observation n, on its own
        CUDA stream, so the two overlap on the GPU; events order each slot's reuse. Same actions as
        :meth:`sample` for the same inputs and noise.
        """
        slots = [self.slots[0], self._second_slot()]
        for s in slots:
            s.prepare(steps)
        if self.cuda:
            torch.cuda.synchronize(slots[0].device)
        enc_stream = torch.cuda.Stream(slots[0].device) if self.cuda else None
        # the denoise stream gets the higher priority: its small latency-bound kernels take SMs as soon as
        # they free up, and the encode of the next observation fills the rest
        den_stream = torch.cuda.Stream(slots[0].device, priority=-1) if self.cuda else None
        encoded = [torch.cuda.Event() if self.cuda else None for _ in slots]
        freed = [torch.cuda.Event() if self.cuda else None for _ in slots]
        host = [torch.empty(tuple(s.inputs["noise"].shape), dtype=torch.float32, pin_memory=self.cuda) for s in slots]
        producer = torch.cuda.current_stream(slots[0].device) if self.cuda else None

        def on(stream: Any) -> Any:
            return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

        def issue_encode(i: int, batch: dict[str, torch.Tensor]) -> None:
            k = i % 2
            with on(enc_stream):
                if enc_stream is not None:
                    enc_stream.wait_stream(producer)  # the batch's tensors were made on the caller's stream
                    enc_stream.wait_event(freed[k])  # the slot's previous denoise has read its noise and KV
                    for t in batch.values():  # read here, possibly after the caller dropped them: keep them alive
                        if t.is_cuda:
                            t.record_stream(enc_stream)
                slots[k].load(batch)
                slots[k].encode()
                if encoded[k] is not None:
                    encoded[k].record()

        def issue_denoise(i: int) -> None:
            k = i % 2
            with on(den_stream):
                if den_stream is not None:
                    den_stream.wait_event(encoded[k])
                    if not self.graphs:  # eager KV made on the encode stream, used here: keep it alive for us
                        for t in (slots[k].kv_cache, slots[k].prefix_mask):
                            t.record_stream(den_stream)  # type: ignore[union-attr]
                host[k].copy_(slots[k].denoise(steps), non_blocking=self.cuda)
                if freed[k] is not None:
                    freed[k].record()

        it = iter(batches)
        first = next(it, None)
        if first is None:
            return
        try:
            issue_encode(0, first)
            i = 0
            while True:
                nxt = next(it, None)
                if nxt is not None:
                    issue_encode(i + 1, nxt)
                issue_denoise(i)
                if freed[i % 2] is not None:
                    freed[i % 2].synchronize()
                yield host[i % 2].numpy().copy()
                if nxt is None:
                    return
                i += 1
        finally:  # a consumer that stops early leaves no encode in flight into a slot sample() reuses
            if enc_stream is not None and den_stream is not None:
                enc_stream.synchronize()
                den_stream.synchronize()
