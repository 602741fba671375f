"""The policy server on loopback with the real ``openpi-client`` (PyPI 0.1.2) as its client."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy as openpi_msgpack
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from pi05_export.policy import load_policy
from pi05_export.serve import CLOSE_REASON, serve_in_background
from pi05_export.testing.tiny_policy import example_observation
from pi05_export.wire import packb, unpackb
from tests.tolerances import BATCH_ORDER_ATOL


@pytest.fixture(scope="module")
def policies(tiny_policy_dir):
    cache = {}

    def get(robot: str, seed: int = 0, max_batch: int = 1):
        key = (robot, seed, max_batch)
        if key not in cache:
            cache[key] = load_policy(tiny_policy_dir, robot=robot, device="cpu", seed=seed, max_batch=max_batch)
        return cache[key]

    return get


def _health(port: int) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return r.status, r.read()


def test_metadata_actions_and_timing_match_policy_infer(tiny_policy_dir, policies):
    served = load_policy(tiny_policy_dir, robot="aloha", device="cpu", seed=11)
    direct = load_policy(tiny_policy_dir, robot="aloha", device="cpu", seed=11)
    obs = example_observation("aloha")
    with serve_in_background(served) as (_, port):
        client = WebsocketClientPolicy("127.0.0.1", port)
        assert client.get_server_metadata() == {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}
        replies = [client.infer(obs) for _ in range(2)]
        assert _health(port) == (200, b"OK\n")
    for reply in replies:  # the same noise stream: the second call draws the second noise
        expected = direct.infer(obs)["actions"]
        assert reply["actions"].shape == (10, 14) and reply["actions"].dtype == np.float64
        np.testing.assert_array_equal(reply["actions"], expected)
    assert "prev_total_ms" not in replies[0]["server_timing"] and "prev_total_ms" in replies[1]["server_timing"]
    assert replies[0]["server_timing"]["infer_ms"] >= replies[0]["policy_timing"]["infer_ms"] > 0


def test_libero_metadata_is_the_empty_map(policies):
    with serve_in_background(policies("libero")) as (_, port), connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
        assert ws.recv() == b"\x80"  # msgpack {} exactly as openpi sends it


def test_error_is_one_line_then_1011_and_server_keeps_serving(policies):
    obs = example_observation("libero")
    bad = {k: v for k, v in obs.items() if k != "observation/wrist_image"}
    with serve_in_background(policies("libero")) as (server, port):
        client = WebsocketClientPolicy("127.0.0.1", port)
        with pytest.raises(RuntimeError) as e:
            client.infer(bad)
        text = str(e.value).removeprefix("Error in inference server:\n")
        assert "\n" not in text and text.startswith("missing key 'observation/wrist_image' for robot libero")
        assert "Traceback" not in text
        with pytest.raises(ConnectionClosedError) as closed:
            client.infer(obs)
        assert closed.value.rcvd.code == 1011 and closed.value.rcvd.reason == CLOSE_REASON
        fresh = WebsocketClientPolicy("127.0.0.1", port)
        assert fresh.infer(obs)["actions"].shape == (10, 7)
        assert server.stats.errors == 1


class _SlowRunner:
    """Test-only: the real runner behind a fixed delay, standing in for a long first call."""

    def __init__(self, runner, delay_s: float) -> None:
        self.inner, self.delay_s = runner, delay_s
        self.backend, self.config, self.device, self.max_batch = runner.backend, runner.config, runner.device, runner.max_batch
        self.calls: list[int] = []

    def sample(self, *args, **kwargs):
        self.calls.append(args[0].shape[0])
        time.sleep(self.delay_s)
        return self.inner.sample(*args, **kwargs)


def test_pings_and_healthz_answered_during_a_slow_request(tiny_policy_dir):
    """A request longer than the keepalive (ping every 0.2 s, 1 s timeout here; 20 s in openpi) does
    not block the event loop: another client's ping and /healthz are answered meanwhile, and the slow
    client is not dropped."""
    policy = load_policy(tiny_policy_dir, robot="libero", device="cpu")
    policy.runner = _SlowRunner(policy.runner, delay_s=3.0)
    obs = example_observation("libero")
    result: dict = {}
    with serve_in_background(policy, ping_interval=0.2, ping_timeout=1.0) as (_, port):
        slow = WebsocketClientPolicy("127.0.0.1", port)
        worker = threading.Thread(target=lambda: result.setdefault("reply", slow.infer(obs)))
        worker.start()
        time.sleep(0.5)  # the slow request is inside the model now
        with connect(f"ws://127.0.0.1:{port}", compression=None) as other:
            assert unpackb(other.recv(timeout=2)) == {}
            t0 = time.perf_counter()
            assert other.ping().wait(timeout=1.0), "pong not received while a request was running"
            pong_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert _health(port) == (200, b"OK\n")
        health_s = time.perf_counter() - t0
        assert worker.is_alive(), "the slow request finished before the checks; make the delay longer"
        worker.join(timeout=30)
    assert result["reply"]["actions"].shape == (10, 7)
    assert pong_s < 1.0 and health_s < 1.0


def test_concurrent_requests_are_batched_without_changing_results(tiny_policy_dir, tmp_path):
    """4 robots at once with --max-batch 4: fewer model calls than requests, and every reply equals
    the model run alone on that request's recorded inputs and noise."""
    policy = load_policy(tiny_policy_dir, robot="droid", device="cpu", max_batch=4)
    slow = _SlowRunner(policy.runner, delay_s=0.3)
    policy.runner = slow
    record = tmp_path / "rec"
    replies: dict[int, list] = {}
    with serve_in_background(policy, record=record) as (server, port):
        def robot(i: int) -> None:
            client = WebsocketClientPolicy("127.0.0.1", port)
            replies[i] = [client.infer(example_observation("droid", seed=i))["actions"] for _ in range(3)]

        threads = [threading.Thread(target=robot, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert sum(len(r) for r in replies.values()) == 12
    assert max(slow.calls) > 1 and len(slow.calls) < 12, f"model calls per batch: {slow.calls}"
    assert server.stats.requests == 12
    deadline = time.time() + 10
    while len(list(record.glob("step_*.npz"))) < 12 and time.time() < deadline:
        time.sleep(0.05)
    recorded = sorted(record.glob("step_*.npz"))
    assert len(recorded) == 12
    all_replies = [a for r in replies.values() for a in r]
    for path in recorded:
        with np.load(path) as f:
            inputs = policy.preprocess({"observation/exterior_image_1_left": f["request.observation/exterior_image_1_left"],
                                        "observation/wrist_image_left": f["request.observation/wrist_image_left"],
                                        "observation/joint_position": f["request.observation/joint_position"],
                                        "observation/gripper_position": f["request.observation/gripper_position"],
                                        "prompt": str(f["request.prompt"])})
            np.testing.assert_array_equal(inputs.tokens, f["tokens"][0])
            alone, _ = policy.runner.inner.sample(f["images"], f["image_mask"], f["tokens"], f["token_mask"], f["noise"], 10)
            np.testing.assert_allclose(policy.postprocess(alone[0], inputs), f["actions"], atol=BATCH_ORDER_ATOL, rtol=0)
            assert any(np.array_equal(f["actions"], a) for a in all_replies)


def test_recording_is_a_calibration_source(tiny_policy_dir, policies, tmp_path):
    from pi05_export.calibration import build_calibration_set, load_calibration_set

    policy = policies("libero")
    record = tmp_path / "rec"
    with serve_in_background(policy, record=record) as (_, port):
        client = WebsocketClientPolicy("127.0.0.1", port)
        for s in range(3):
            client.infer(example_observation("libero", seed=s))
    deadline = time.time() + 10
    while len(list(record.glob("step_*.npz"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    out = build_calibration_set([record], tmp_path / "calib", policy.config)
    observations, meta = load_calibration_set(out, policy.config)
    assert len(observations) == 3 and meta["kind"] == "recorded"
    assert observations[0].tokens.shape == (1, policy.config.max_token_len)
    from pi05_export.cli import run  # the README's command: the checkpoint's own config.json gives the sizes

    assert run(["calibration-build", str(record), "--config", str(tiny_policy_dir / "config.json"), "--out",
                str(tmp_path / "calib-cli")]) == 0
    assert len(list((tmp_path / "calib-cli").glob("calib_*.npz"))) == 3


BAD_FRAMES = {
    "text frame": "hello",
    "not msgpack": b"\xc1" * 64,
    "image is not an array": None,
    "image of the wrong dtype": None,  # built in the test (needs the observation)
    "state with NaN": None,
    "50 MB of garbage": np.random.default_rng(0).integers(0, 256, 50 * 2**20, dtype=np.uint8).tobytes(),
    "array data shorter than its shape": msgpack.packb({"observation/image": {b"__ndarray__": True, b"data": b"\0" * 10,
                                                                             b"dtype": "|u1", b"shape": [224, 224, 3]}}),
}
EXPECTED = {
    "text frame": "got a text frame",
    "not msgpack": "not a msgpack message",
    "image is not an array": "camera 'observation/image' is a list",
    "image of the wrong dtype": "camera 'observation/image' has dtype int16",
    "state with NaN": "NaN/inf",
    "50 MB of garbage": "",
    "array data shorter than its shape": "array data has 10 bytes",
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frames_get_one_line_and_1011(case, policies):
    obs = example_observation("libero")
    frame = BAD_FRAMES[case]
    if case == "image of the wrong dtype":
        frame = packb({**obs, "observation/image": obs["observation/image"].astype(np.int16)})
    if case == "image is not an array":
        frame = packb({**obs, "observation/image": [1, 2, 3]})
    if case == "state with NaN":
        frame = packb({**obs, "observation/state": np.array([np.nan] * 8)})
    with serve_in_background(policies("libero")) as (_, port):
        with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            ws.recv()
            ws.send(frame)
            text = ws.recv(timeout=30)
            assert isinstance(text, str) and "\n" not in text and EXPECTED[case] in text, text
            with pytest.raises(ConnectionClosedError) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd.code == 1011
        client = WebsocketClientPolicy("127.0.0.1", port)  # the server keeps serving
        assert client.infer(obs)["actions"].shape == (10, 7)


def test_wire_encoding_round_trips_with_openpi_client():
    """Our encoder's bytes decode with openpi-client's unpacker and vice versa (bin keys, dtype.str)."""
    msg = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(1.5), "c": "text", "d": [1, 2.5],
           "e": {"f": np.zeros((0, 3), np.uint8)}, "g": np.array([True, False])}
    for decoded in (openpi_msgpack.unpackb(packb(msg)), unpackb(openpi_msgpack.packb(msg))):
        np.testing.assert_array_equal(decoded["a"], msg["a"])
        assert decoded["a"].dtype == np.float32 and decoded["b"] == np.float32(1.5) and decoded["c"] == "text"
        assert decoded["e"]["f"].shape == (0, 3) and decoded["g"].dtype == np.bool_
    assert packb(msg) == openpi_msgpack.packb(msg)


def test_healthz_only_on_its_path(policies):
    with serve_in_background(policies("libero")) as (_, port):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert e.value.code == 426


def test_request_of_a_departed_robot_is_dropped_and_shutdown_is_prompt(tiny_policy_dir):
    """A robot that disconnects while its request is queued costs no model call, and stopping the
    server does not wait for queued requests."""
    policy = load_policy(tiny_policy_dir, robot="libero", device="cpu")
    slow = _SlowRunner(policy.runner, delay_s=1.5)
    policy.runner = slow
    obs = example_observation("libero")
    frame = packb(obs)
    with serve_in_background(policy) as (server, port):
        busy = threading.Thread(target=lambda: WebsocketClientPolicy("127.0.0.1", port).infer(obs))
        busy.start()
        time.sleep(0.3)  # the first request occupies the model
        with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            ws.recv()
            ws.send(frame)  # queued behind the first, then the robot leaves
            time.sleep(0.2)
        busy.join(timeout=30)
        time.sleep(0.5)
        assert len(slow.calls) == 1 and server.stats.requests == 1
        with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:  # queued at shutdown
            ws.recv()
            def robot_cut_off_by_shutdown() -> None:
                with contextlib.suppress(Exception):  # closed (1001) or refused: either is expected here
                    WebsocketClientPolicy("127.0.0.1", port).infer(obs)

            threading.Thread(target=robot_cut_off_by_shutdown, daemon=True).start()
            time.sleep(0.3)
            ws.send(frame)
            time.sleep(0.2)
            t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 1.5 + 2.0, "shutdown waited for queued requests"
