"""``pi05-export serve``: openpi's websocket policy protocol, so robots using ``openpi-client`` work unchanged.

Wire protocol (openpi ``serving/websocket_policy_server.py`` and ``openpi_client``; spec section 1):
one websocket per robot, no compression, no message size limit; on connect the server sends the
policy metadata (msgpack map; ``{}`` or ALOHA's ``reset_pose``); then each binary frame is an
observation and gets one binary reply ``{"actions", "policy_timing", "server_timing"}``; a failing
request gets one **text** frame (here a one-line message, never a traceback) and a close with 1011
and openpi's reason; ``GET /healthz`` answers ``200 OK``.

Unlike openpi's server:

- inference runs off the event loop (one model thread), so pings are answered, ``/healthz``
  responds and other robots' frames are decoded and preprocessed while a request runs;
- the model is loaded and warmed up (including any compilation and CUDA-graph capture) before the
  port opens;
- requests waiting while the model is busy are batched into one model call, up to ``max_batch``
  (each keeps its own noise, drawn in arrival order);
- ``policy_timing.infer_ms`` is model time with the GPU work finished (the actions are on the
  host); ``server_timing.infer_ms`` is the whole request, frame received to reply encoded;
  ``server_timing.prev_total_ms`` (absent on a connection's first reply) is openpi's previous
  loop time, including the client's think and upload time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.errors import ConfigError, Pi05ExportError, first_line
from pi05_export.policy.policy import Policy, PolicyInputs
from pi05_export.wire import WireError, packb, unpackb

log = logging.getLogger(__name__)

CLOSE_REASON = "Internal server error. Traceback included in previous frame."  # openpi's, verbatim
HEALTH_PATH = "/healthz"


@dataclass
class _Pending:
    inputs: PolicyInputs
    future: asyncio.Future[dict[str, Any]]
    request: dict[str, Any]
    noise: np.ndarray | None = None


@dataclass
class ServerStats:
    requests: int = 0
    errors: int = 0
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class PolicyServer:
    """An asyncio websocket server around a :class:`Policy` (see the module docstring).

    ``ping_interval``/``ping_timeout`` are websockets' keepalive (openpi: library defaults, 20 s).
    ``record`` writes every request and reply to ``record/step_NNNNNN.npz`` (the raw request under
    ``request.<key>``, the model inputs in the observation ``.npz`` contract, the noise and the
    actions), which ``pi05-export calibration-build`` accepts as a calibration source.
    """

    def __init__(self, policy: Policy, *, host: str = "0.0.0.0", port: int = 8000, max_batch: int | None = None,
                 record: str | Path | None = None, ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0) -> None:
        self.policy, self.host, self.port = policy, host, port
        self.max_batch = max_batch or policy.runner.max_batch
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.record = Path(record) if record is not None else None
        self.stats = ServerStats()
        self._io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pi05-io")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._steps = itertools.count()
        self._metadata = packb(policy.metadata)
        if self.record is not None:
            prepare_record_dir(self.record)
            self._steps = itertools.count(_next_step(self.record))

    # -- websocket handling ----------------------------------------------------------------------
    def _health(self, connection: Any, request: Any) -> Any:
        if request.path == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    async def _handle(self, ws: Any) -> None:
        peer = getattr(ws, "remote_address", None)
        log.info("client connected: %s", peer)
        await ws.send(self._metadata)
        prev_total_ms: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            start = time.perf_counter()
            try:
                message = await ws.recv()
            except Exception:  # noqa: BLE001  (closed by the client: normal end)
                log.info("client disconnected: %s", peer)
                return
            t_recv = time.perf_counter()
            try:
                if isinstance(message, str):
                    raise WireError("got a text frame; send the observation as a binary msgpack frame (openpi-client does)")
                request, inputs = await loop.run_in_executor(self._io, self._decode, message)
                del message
                future: asyncio.Future[dict[str, Any]] = loop.create_future()
                assert self._queue is not None
                await self._queue.put(_Pending(inputs, future, request))
                closed = asyncio.ensure_future(ws.wait_closed())  # a robot that leaves (or a shutdown) ends the wait
                try:
                    done, _ = await asyncio.wait({future, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                if future not in done:
                    future.cancel()  # the batcher skips it if still queued
                    log.info("client went away while its request waited: %s", peer)
                    return
                reply = future.result()
            except Exception as e:  # noqa: BLE001  (every failure: one line to the client, detail in the log)
                await self._fail(ws, e, peer)
                return
            reply["server_timing"] = {"infer_ms": (time.perf_counter() - t_recv) * 1e3}
            if prev_total_ms is not None:
                reply["server_timing"]["prev_total_ms"] = prev_total_ms
            try:
                await ws.send(packb(reply))
            except Exception:  # noqa: BLE001
                log.info("client went away before its reply: %s", peer)
                return
            prev_total_ms = (time.perf_counter() - start) * 1e3

    def _decode(self, message: bytes) -> tuple[dict[str, Any], PolicyInputs]:
        request = unpackb(message)
        if not isinstance(request, dict):
            raise WireError(f"the observation must be a msgpack map, got {type(request).__name__}")
        return request, self.policy.preprocess(request)

    async def _fail(self, ws: Any, e: Exception, peer: Any) -> None:
        self.stats.errors += 1
        if isinstance(e, Pi05ExportError | WireError):
            line = str(e)
            log.warning("bad request from %s: %s", peer, line)
        else:
            line = f"internal error: {type(e).__name__}: {first_line(e, '')}"
            log.exception("request from %s failed", peer)
        with contextlib.suppress(Exception):
            await ws.send(line)
            await ws.close(1011, CLOSE_REASON)

    # -- batching and the model thread -------------------------------------------------------------
    async def _batcher(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            try:
                results = await asyncio.wrap_future(self.policy.submit(self._run_batch, batch))
            except Exception as e:  # noqa: BLE001  (a model failure fails this batch's requests, not the server)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
            for p, r in zip(batch, results, strict=True):
                if p.future.done():  # its robot left while the model ran
                    continue
                self.stats.requests += 1
                p.future.set_result(r)
                if self.record is not None:
                    self._io.submit(self._record, next(self._steps), p, r)

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, Any]]:
        noise = self.policy.draw_noise(len(batch))
        actions, infer_ms = self.policy.sample([p.inputs for p in batch], noise)
        out = []
        for i, p in enumerate(batch):
            p.noise = noise[i]
            t0 = time.perf_counter()
            robot = self.policy.postprocess(actions[i], p.inputs)
            out.append({"actions": robot, "policy_timing": {"infer_ms": infer_ms, "postprocess_ms": (time.perf_counter() - t0) * 1e3,
                                                            "batch_size": len(batch)}})
        return out

    def _record(self, step: int, pending: _Pending, reply: dict[str, Any]) -> None:
        from pi05_export.observation import save_npz

        assert self.record is not None
        arrays: dict[str, Any] = {f"request.{k}": v for k, v in _flatten(pending.request).items()}
        arrays.update(pending.inputs.model_arrays())
        if pending.noise is not None:
            arrays["noise"] = pending.noise[None]
        arrays["actions"] = reply["actions"]
        arrays["prompt"] = np.asarray(pending.inputs.prompt)
        try:
            save_npz(self.record / f"step_{step:06d}.npz", arrays)
        except Exception:  # noqa: BLE001  (recording must never take the server down; the log says why)
            log.exception("could not record step %d", step)

    # -- lifecycle ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        """Bind and serve inside the ``async with``; yields the websockets server (``.sockets``)."""
        from websockets.asyncio.server import serve

        self._queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        try:
            async with serve(self._handle, self.host, self.port, compression=None, max_size=None,
                             process_request=self._health, ping_interval=self.ping_interval,
                             ping_timeout=self.ping_timeout) as server:
                yield server
        finally:
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        async with self.running() as server:
            port = server.sockets[0].getsockname()[1]
            log.info("serving robot %s on ws://%s:%d (health: http://%s:%d%s)", self.policy.profile.name, self.host, port,
                     self.host, port, HEALTH_PATH)
            await stop.wait()

    def close(self) -> None:
        self._io.shutdown(wait=True)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, np.ndarray | np.generic | str | int | float | bool | bytes):
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def prepare_record_dir(directory: str | Path) -> Path:
    """Create the ``--record`` directory (or accept an existing one) and check it is writable.
    Raises :class:`ConfigError` with the fix; called before the model loads."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the --record directory {directory}: {e.strerror or e}",
                          hint="pass a writable directory path") from None
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"the --record directory {directory} is not writable", hint="pass a writable directory path")
    return directory


def _next_step(directory: Path) -> int:
    """Continue numbering after the steps already recorded (a restarted server appends)."""
    steps = [int(p.stem.split("_")[1]) for p in directory.glob("step_*.npz") if p.stem.split("_")[1].isdigit()]
    return max(steps, default=-1) + 1


def serve_policy(policy: Policy, *, host: str = "0.0.0.0", port: int = 8000, max_batch: int | None = None,
                 record: str | Path | None = None, warmup: bool = True) -> None:
    """Warm the policy up, then serve until SIGINT/SIGTERM (the ``pi05-export serve`` entry point)."""
    import signal

    if warmup:
        log.info("warm-up: %.0f ms (first call), %.0f ms (second)", policy.warmup(), policy.warmup())
    server = PolicyServer(policy, host=host, port=port, max_batch=max_batch, record=record)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            if stop.is_set():  # a second Ctrl-C / SIGTERM: leave now, without waiting for running requests
                os._exit(128 + sig)
            log.info("stopping: closing connections (send the signal again to exit at once)")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await server.serve_forever(stop)

    try:
        asyncio.run(main())
    except OSError as e:  # bind failures: address in use, no permission, unknown host
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                          hint="pick another --port (or --host), or stop the server already using it") from None
    finally:
        server.close()
    log.info("server stopped after %d request(s), %d error(s)", server.stats.requests, server.stats.errors)


@contextlib.contextmanager
def serve_in_background(policy: Policy, *, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> Iterator[tuple[PolicyServer, int]]:
    """Serve from a daemon thread (tests, benchmarks, notebooks); yields (server, bound port)."""
    server = PolicyServer(policy, host=host, port=port, **kwargs)
    ready: concurrent.futures.Future[int] = concurrent.futures.Future()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            async with server.running() as ws_server:
                ready.set_result(ws_server.sockets[0].getsockname()[1])
                await stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True, name="pi05-serve")
    thread.start()
    try:
        yield server, ready.result(timeout=60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        server.close()
        loop.close()
