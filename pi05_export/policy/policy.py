"""The policy: a robot's raw observation in, robot actions out (openpi ``Policy.infer``).

``preprocess`` and ``postprocess`` are plain functions of (observation, profile, norm stats,
tokenizer, config), so they can be tested and compared without a model; :class:`Policy` joins them
to a :class:`~pi05_export.policy.runners.ModelRunner` (torch, ONNX Runtime or TensorRT).

The order is openpi's (``policies/policy_config.py`` L75-89, ``policy.py`` L67-106; spec 2.3):
inputs: default prompt -> robot mapping (cameras to slots, state assembly, ALOHA adapt) ->
quantile-normalize the state (float64) -> resize-with-pad every slot -> tokenize (state in the
prompt at its raw dimension) -> model; outputs: un-normalize actions (first d dims) -> absolute
actions (delta mask + state) -> robot output transform -> first ``action_dim`` dims, float64.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pi05_export.config import Pi05Config
from pi05_export.errors import CheckpointError, ConfigError, InputError, first_line
from pi05_export.policy.images import camera_jobs
from pi05_export.policy.normalize import NormStats, check_finite, find_norm_stats, load_norm_stats
from pi05_export.policy.profiles import ADAPTERS, KeyPath, RobotProfile, key_name, load_profile
from pi05_export.policy.runners import ARTIFACT_BACKENDS, POLICY_BACKENDS, TORCH_BACKENDS, ModelRunner
from pi05_export.policy.tokenizer import PromptTokenizer, check_vocab, find_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PolicyInputs:
    """One observation after preprocessing (what the model sees, plus what postprocessing needs)."""

    images: np.ndarray  # float32 [V, 3, S, S] in [-1, 1]
    image_mask: np.ndarray  # bool [V]
    tokens: np.ndarray  # int64 [L]
    token_mask: np.ndarray  # bool [L]
    state: np.ndarray  # float64 [d], model space (after the robot's adapt), not normalized
    state_norm: np.ndarray  # float64 [d], normalized (what the prompt bins)
    prompt: str
    tokens_cut: int = 0

    def model_arrays(self) -> dict[str, np.ndarray]:
        """Batch-1 arrays in the observation ``.npz`` contract (README 'Observation files')."""
        return {"images": self.images[None], "image_mask": self.image_mask[None], "tokens": self.tokens[None],
                "token_mask": self.token_mask[None]}


def _missing(profile: RobotProfile, key: KeyPath) -> InputError:
    return InputError(f"missing key '{key_name(key)}' for robot {profile.name}",
                      hint=f"robot {profile.name} sends: {', '.join(profile.expected_keys)}")


def _lookup(obs: Mapping[str, Any], key: KeyPath) -> Any:
    node: Any = obs
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _prompt(obs: Mapping[str, Any], default: str | None, profile: RobotProfile) -> str:
    value = obs.get("prompt")
    if value is None:
        value = default
    if value is None:
        raise InputError(f"missing key 'prompt' for robot {profile.name}",
                         hint="send a 'prompt' string (infer: --prompt TEXT; serve: --default-prompt TEXT)")
    if isinstance(value, np.ndarray) and value.ndim == 0:  # openpi's InjectDefaultPrompt stores np.asarray(str)
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("'prompt' bytes are not UTF-8", hint="send the prompt as a string") from None
    if not isinstance(value, str):
        raise InputError(f"'prompt' is a {type(value).__name__}, not a string", hint="send the prompt as a string")
    return value


def _state(obs: Mapping[str, Any], profile: RobotProfile) -> np.ndarray:
    parts = []
    for key in profile.state:
        value = _lookup(obs, key)
        if value is None:
            raise _missing(profile, key)
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu" or arr.ndim > 1:
            raise InputError(f"'{key_name(key)}' has dtype {arr.dtype} and shape {list(arr.shape)}; expected a 1-D float array",
                             hint="send the state as a numpy float array")
        parts.append(np.atleast_1d(arr).astype(np.float64))  # DROID: a 0-d gripper becomes [1] (droid_policy L36-39)
    state = np.concatenate(parts)
    check_finite(f"state ({', '.join(key_name(k) for k in profile.state)})", state)
    if profile.state_dim is not None and state.shape[0] != profile.state_dim:
        raise InputError(f"state has {state.shape[0]} values, robot {profile.name} expects {profile.state_dim}",
                         hint=f"send {', '.join(key_name(k) for k in profile.state)} with {profile.state_dim} values in all")
    if profile.adapt:
        state = ADAPTERS[profile.adapt][0](state)
    return state


def preprocess(obs: Mapping[str, Any], *, profile: RobotProfile, norm_stats: NormStats, tokenizer: PromptTokenizer,
               config: Pi05Config, default_prompt: str | None = None, executor: Executor | None = None) -> PolicyInputs:
    """A robot's observation dict -> :class:`PolicyInputs` (one observation, no batch axis).

    ``obs`` holds the profile's keys: uint8 frames of any size (HWC, or CHW / float [0, 1] as openpi
    accepts), the state, and ``prompt`` (else ``default_prompt``, else the profile's). ``executor``
    converts the cameras in parallel. Raises
    :class:`InputError` naming the key or camera for anything missing or malformed, and for NaN/inf.
    """
    if not isinstance(obs, Mapping):
        raise InputError(f"an observation must be a dict, got {type(obs).__name__}", hint=f"send a dict with {', '.join(profile.expected_keys)}")
    for group, names in profile.allowed_keys.items():
        sub = obs.get(group)
        if sub is not None:
            if not isinstance(sub, Mapping):
                raise InputError(f"'{group}' must be a dict, got {type(sub).__name__}", hint=f"keys allowed: {', '.join(names)}")
            extra = sorted(set(sub) - set(names))
            if extra:
                raise InputError(f"unexpected key(s) {', '.join(map(str, extra))} in '{group}' for robot {profile.name}",
                                 hint=f"allowed: {', '.join(names)}")
    size = config.vision.image_size
    images = np.full((config.num_views, 3, size, size), -1.0, np.float32)  # black = -1 (x/255*2-1 of 0)
    image_mask = np.zeros(config.num_views, bool)
    jobs = []
    for i, cam in enumerate(profile.cameras):
        value = _lookup(obs, cam.key) if cam.key else None
        if value is None:
            if cam.key and not cam.optional:
                raise _missing(profile, cam.key)
            continue
        jobs += camera_jobs(value, key_name(cam.key) if cam.key else cam.slot, profile.image_layout, images[i])
        image_mask[i] = True
    if executor is not None and len(jobs) > 1:  # PIL releases the GIL: planes resize in parallel
        for future in [executor.submit(job) for job in jobs]:
            future.result()
    else:
        for job in jobs:
            job()
    state = _state(obs, profile)
    if state.shape[0] > config.action_dim:
        raise InputError(f"state has {state.shape[0]} values, more than the model's {config.action_dim}", hint="check the robot profile")
    state_norm = norm_stats.state.normalize(state) if norm_stats.state else state
    prompt = _prompt(obs, default_prompt or profile.default_prompt, profile)
    tokens, token_mask, cut = tokenizer.tokenize(prompt, state_norm if profile.state_in_prompt else None, config.max_token_len)
    if tokens.max(initial=0) >= config.llm.vocab_size:
        raise InputError(f"the prompt produced token id {int(tokens.max())}, beyond the model's {config.llm.vocab_size} embeddings",
                         hint="use the tokenizer the checkpoint was trained with")
    return PolicyInputs(images, image_mask, tokens, token_mask, state, state_norm, prompt, cut)


def postprocess(actions: np.ndarray, inputs: PolicyInputs, *, profile: RobotProfile, norm_stats: NormStats) -> np.ndarray:
    """Normalized model actions float32 [H, A] -> robot actions float64 [H, profile.action_dim].

    openpi's output chain: ``Unnormalize`` (first d dims, float64) -> ``AbsoluteActions`` (dims in the
    delta mask get the state added; the state is the model's float32 normalized state un-normalized
    again, as openpi carries it) -> the robot's output transform (ALOHA flips and grippers) -> slice.
    """
    out = norm_stats.actions.unnormalize(actions) if norm_stats.actions else np.asarray(actions, np.float64)
    if profile.delta_action_mask is not None:
        carried = inputs.state_norm.astype(np.float32)  # Observation.state is float32 (model.py)
        state = norm_stats.state.unnormalize(carried) if norm_stats.state else carried.astype(np.float64)
        n = len(profile.delta_action_mask)
        state = np.pad(state, (0, max(0, n - state.shape[0])))[:n]
        out = out.copy()
        out[..., :n] += np.where(np.asarray(profile.delta_action_mask), state, 0.0)
    if profile.adapt:
        out = ADAPTERS[profile.adapt][1](out)
    return np.ascontiguousarray(out[..., : profile.action_dim])


class Policy:
    """``Policy.infer(obs) -> {"actions": float64 [H, robot_action_dim], "policy_timing": {...}}``.

    ``policy_timing``: ``infer_ms`` = model time, inputs uploaded to the actions back on the host
    (GPU work finished); ``preprocess_ms`` and ``postprocess_ms`` the host-side transforms. Noise is
    fresh N(0, 1) per observation from a generator seeded with ``seed`` (or pass ``noise``).
    """

    def __init__(self, runner: ModelRunner, profile: RobotProfile, norm_stats: NormStats, tokenizer: PromptTokenizer,
                 *, default_prompt: str | None = None, num_steps: int | None = None, seed: int = 0) -> None:
        self.runner, self.profile, self.norm_stats, self.tokenizer = runner, profile, norm_stats, tokenizer
        self.config: Pi05Config = runner.config
        self.default_prompt = default_prompt
        self.num_steps = num_steps or self.config.num_steps
        self._rng = np.random.default_rng(seed)
        self._cameras = ThreadPoolExecutor(min(3 * len(profile.cameras), os.cpu_count() or 1), thread_name_prefix="pi05-camera")
        # Every model call runs on this one thread, whichever thread calls: CPU backends keep one
        # OpenMP team (a second calling thread's team spins against the first: 3x slower on 2 cores),
        # and CUDA graphs / TensorRT contexts are always driven from the same thread.
        self._model_ident: list[int] = []  # the model thread's id (the initializer must not hold the Policy)
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="pi05-model",
                                                initializer=lambda box=self._model_ident: box.append(threading.get_ident()))
        cfg = self.config
        check_vocab(tokenizer, cfg.llm.vocab_size)
        if len(profile.cameras) != cfg.num_views:
            raise ConfigError(f"robot {profile.name} has {len(profile.cameras)} camera slots, the model {cfg.num_views} views",
                              hint="list one camera entry per model view in the profile")
        if profile.action_dim > cfg.action_dim:
            raise ConfigError(f"robot {profile.name} wants {profile.action_dim} action dims, the model has {cfg.action_dim}",
                              hint="fix action_dim in the robot profile")
        if profile.action_horizon is not None and profile.action_horizon != cfg.action_horizon:
            log.warning("robot %s is trained with action_horizon %d in openpi, this model has %d: chunks have %d steps",
                        profile.name, profile.action_horizon, cfg.action_horizon, cfg.action_horizon)

    def close(self) -> None:
        """Release the threads and the runner (TensorRT contexts, CUDA graphs); the policy is unusable after."""
        self._model_thread.shutdown(wait=True)
        self._cameras.shutdown(wait=True)
        self.runner.close()

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the policy's model thread; returns a ``concurrent.futures.Future``."""
        return self._model_thread.submit(fn, *args)

    @property
    def metadata(self) -> dict[str, Any]:
        """What the server sends on connect (openpi ``policy_metadata``; ALOHA: ``reset_pose``)."""
        return dict(self.profile.metadata)

    def preprocess(self, obs: Mapping[str, Any]) -> PolicyInputs:
        return preprocess(obs, profile=self.profile, norm_stats=self.norm_stats, tokenizer=self.tokenizer,
                          config=self.config, default_prompt=self.default_prompt, executor=self._cameras)

    def postprocess(self, actions: np.ndarray, inputs: PolicyInputs) -> np.ndarray:
        return postprocess(actions, inputs, profile=self.profile, norm_stats=self.norm_stats)

    def draw_noise(self, batch: int) -> np.ndarray:
        cfg = self.config
        return self._rng.standard_normal((batch, cfg.action_horizon, cfg.action_dim), dtype=np.float32)

    def sample(self, inputs: Sequence[PolicyInputs], noise: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Normalized actions float32 [B, H, A] for preprocessed inputs (one model call per
        ``runner.max_batch``) and the model time in ms."""
        cfg = self.config
        if noise is None:
            noise = self.draw_noise(len(inputs))
        noise = np.asarray(noise, np.float32)
        if noise.shape != (len(inputs), cfg.action_horizon, cfg.action_dim):
            raise InputError(f"noise has shape {list(noise.shape)}, expected {[len(inputs), cfg.action_horizon, cfg.action_dim]}",
                             hint="pass noise [B, horizon, action_dim] float32")
        check_finite("noise", noise)
        if threading.get_ident() in self._model_ident:
            return self._sample(inputs, noise)
        return self._model_thread.submit(self._sample, inputs, noise).result()

    def _sample(self, inputs: Sequence[PolicyInputs], noise: np.ndarray) -> tuple[np.ndarray, float]:
        outs, total = [], 0.0
        for start in range(0, len(inputs), self.runner.max_batch):
            chunk = inputs[start : start + self.runner.max_batch]
            actions, ms = self.runner.sample(
                np.stack([i.images for i in chunk]), np.stack([i.image_mask for i in chunk]),
                np.stack([i.tokens for i in chunk]), np.stack([i.token_mask for i in chunk]),
                noise[start : start + len(chunk)], self.num_steps)
            outs.append(actions)
            total += ms
        return np.concatenate(outs), total

    def infer_batch(self, observations: Sequence[Mapping[str, Any]], noise: np.ndarray | None = None) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        inputs = [self.preprocess(o) for o in observations]
        pre_ms = (time.perf_counter() - t0) * 1e3
        actions, infer_ms = self.sample(inputs, noise)
        results = []
        for a, inp in zip(actions, inputs, strict=True):
            t1 = time.perf_counter()
            robot = self.postprocess(a, inp)
            results.append({"actions": robot, "policy_timing": {
                "infer_ms": infer_ms, "preprocess_ms": pre_ms / len(inputs), "postprocess_ms": (time.perf_counter() - t1) * 1e3}})
        return results

    def infer(self, obs: Mapping[str, Any], *, noise: np.ndarray | None = None) -> dict[str, Any]:
        """One observation (the profile's keys) -> ``{"actions", "policy_timing"}`` (openpi's keys).

        ``noise``: optional float32 [horizon, action_dim]. Raises :class:`InputError` for a bad observation.
        """
        return self.infer_batch([obs], None if noise is None else np.asarray(noise)[None])[0]

    def warmup(self) -> float:
        """One model call at every batch size the runner keeps (1 and ``max_batch``) on black images and
        a BOS-only prompt, on the model thread; returns the ms of the largest."""
        cfg, size, ms = self.config, self.config.vision.image_size, 0.0
        for b in self.runner.warmup_batches:
            images = np.full((b, cfg.num_views, 3, size, size), -1.0, np.float32)
            tokens = np.zeros((b, cfg.max_token_len), np.int64)
            tokens[:, 0] = self.tokenizer.bos_id
            noise = np.zeros((b, cfg.action_horizon, cfg.action_dim), np.float32)
            ms = self._model_thread.submit(self.runner.sample, images, np.ones((b, cfg.num_views), bool), tokens,
                                           tokens > 0, noise, self.num_steps).result()[1]
        return ms

    def describe(self) -> dict[str, Any]:
        return {"robot": self.profile.name, "backend": self.runner.backend, "device": self.runner.device,
                "max_batch": self.runner.max_batch, "num_steps": self.num_steps, "action_horizon": self.config.action_horizon,
                "tokenizer": str(self.tokenizer.path), "norm_stats": self.norm_stats.describe()}


def _is_export_dir(path: Path) -> bool:
    """An export (``onnx``/``quantize`` output), not a checkpoint (``convert`` also writes a manifest)."""
    import json

    from pi05_export.artifacts import CHECKPOINT_STAGE, MANIFEST_NAME

    if not (path.is_dir() and (path / MANIFEST_NAME).is_file()):
        return False
    try:
        return json.loads((path / MANIFEST_NAME).read_text()).get("stage") != CHECKPOINT_STAGE
    except (ValueError, AttributeError):
        return True  # Manifest.read names what is wrong with it


def load_policy(
    artifacts: str | Path | None,
    *,
    robot: str | Path | RobotProfile,
    backend: str | None = None,
    tokenizer: str | Path | None = None,
    norm_stats: str | Path | NormStats | None = None,
    default_prompt: str | None = None,
    num_steps: int | None = None,
    seed: int = 0,
    max_batch: int = 1,
    engines: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model: Any = None,
    full_hash: bool = False,
) -> Policy:
    """A :class:`Policy` over a PyTorch checkpoint (``torch*`` backends), an export directory
    (``onnxruntime``; ``torch`` runs its reference model) or its engines (``tensorrt``).

    Norm stats and the tokenizer are looked up in the checkpoint (``assets/<asset_id>/``), the
    export directory and the checkpoint it was exported from, unless given. ``model`` (a
    :class:`Pi05Model`) replaces loading weights (tests, random-weight presets). Exported graphs and
    engines are checked against their manifest (size and sampled fingerprint; every byte's sha256 with
    ``full_hash``) before they are loaded. Raises
    :class:`ConfigError` / :class:`InputError` / :class:`ArtifactError` with the fix.
    """
    from pi05_export.policy.runners import PipelineRunner, TorchRunner

    profile = robot if isinstance(robot, RobotProfile) else load_profile(robot)
    path = Path(artifacts).expanduser() if artifacts is not None else None
    if path is not None and not path.exists():  # before the asset search, which would look beside it
        raise CheckpointError(f"checkpoint {path} does not exist",
                              hint="pass a checkpoint directory (openpi PyTorch / lerobot) or an export directory")
    tokenizer = Path(tokenizer).expanduser() if tokenizer is not None else None
    if norm_stats is not None and not isinstance(norm_stats, NormStats):
        norm_stats = Path(norm_stats).expanduser()
    export = path is not None and _is_export_dir(path)
    backend = backend or ("onnxruntime" if export else "torch")
    if backend not in POLICY_BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", hint=f"use one of: {', '.join(POLICY_BACKENDS)}")
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}", hint="pass --max-batch 1 (no batching) or more")
    if path is None and model is None:
        raise ConfigError("no model given", hint="pass a checkpoint directory (or an export directory)")
    if backend in ARTIFACT_BACKENDS and not export:
        raise ConfigError(f"--backend {backend} runs exported graphs; {path} is not an export directory",
                          hint=f"export first: pi05-export onnx {path} --out OUT, then pass OUT")
    roots: list[Path] = []
    if path is not None:
        roots.append(path if path.is_dir() else path.parent)
        if export:
            roots += _source_roots(path)
    # Norm stats and tokenizer first: a missing file is reported in a second, not after loading (and
    # compiling) a 3.35 B-parameter model.
    stats = norm_stats if isinstance(norm_stats, NormStats) else (
        load_norm_stats(norm_stats) if norm_stats is not None else find_norm_stats(roots, profile.asset_id))
    tok = PromptTokenizer(find_tokenizer(tokenizer, roots))
    runner: ModelRunner
    if backend in ARTIFACT_BACKENDS:
        assert path is not None
        if backend == "tensorrt":  # say what to install before looking for engines
            from pi05_export.trt import require_tensorrt

            require_tensorrt()
        runner = PipelineRunner(backend, path, engines=engines, max_batch=max_batch, full_hash=full_hash)
    else:
        if model is None:
            model = _torch_model(path, export, device, dtype)
        elif device or dtype:
            model = _place(model, device, dtype)
        runner = TorchRunner(model, backend, max_batch=max_batch)
    return Policy(runner, profile, stats, tok, default_prompt=default_prompt, num_steps=num_steps, seed=seed)


def _source_roots(export_dir: Path) -> list[Path]:
    """The checkpoint an export came from (its manifest's source), and the export above a quantized set."""
    from pi05_export.artifacts import Manifest

    manifest = Manifest.read(export_dir)
    roots = []
    src = (manifest.source or {}).get("path")
    if src:
        p = Path(src)
        roots.append(p if p.is_dir() else p.parent)
    if manifest.stage == "quantize":
        roots.append(export_dir.parent)
    return roots


def _default_device(device: str | None) -> str:
    """``device`` checked (``cuda``, ``cuda:N`` or ``cpu``; CUDA must be present), else CUDA when present."""
    import torch

    from pi05_export.bench import resolve_device

    return str(resolve_device(device)) if device else ("cuda" if torch.cuda.is_available() else "cpu")


def _place(model: Any, device: str | None, dtype: str | None) -> Any:
    from pi05_export.dtypes import torch_dtype
    from pi05_export.model.pi05 import apply_dtype_policy

    model = model.to(_default_device(device))
    if dtype:
        apply_dtype_policy(model, torch_dtype(dtype))
    return model.eval()


def _torch_model(path: Path | None, export: bool, device: str | None, dtype: str | None) -> Any:
    """The checkpoint's model on ``device`` (default: CUDA when present), under openpi's dtype policy
    (default bf16 on a GPU, fp32 on the CPU)."""
    from pi05_export.checkpoint import load_checkpoint, reference_model

    assert path is not None  # load_policy refuses "no model" first
    dev = _default_device(device)
    dt = dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
    if export:
        from pi05_export.artifacts import Manifest

        model = reference_model(Manifest.read(path).source or {})
        return _place(model, dev, dt if dt != "float32" else None)
    model, _ = load_checkpoint(path, dtype=dt)
    return model.to(dev).eval()


__all__ = ["Policy", "PolicyInputs", "load_policy", "postprocess", "preprocess", "TORCH_BACKENDS"]


def load_robot_observation(path: str | Path, profile: RobotProfile) -> dict[str, Any]:
    """A raw observation file in the robot's own keys: ``.npz`` (nested keys written ``images.cam_high``;
    a 0-d string array for ``prompt``) or ``.json`` (lists become arrays; camera lists of 0-255
    integers become uint8). Raises :class:`InputError` for an unreadable file."""
    import json

    from pi05_export.observation import load_npz

    path = Path(path)
    nested_groups = {c.key[0] for c in profile.cameras if c.key and len(c.key) > 1} | {k[0] for k in profile.state if len(k) > 1}
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"inputs file {path} does not exist", hint="pass a .npz or .json in the robot's keys") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable JSON file ({first_line(e)})", hint="fix the JSON") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path} must hold a JSON object", hint=f"keys: {', '.join(profile.expected_keys)}")
    else:
        raw = load_npz(path, missing_hint="pass a .npz or .json in the robot's keys")
    cameras = {c.key for c in profile.cameras if c.key}

    def leaf(parts: tuple[str, ...], value: Any) -> Any:
        if isinstance(value, dict):  # JSON may nest directly: {"images": {"cam_high": [...]}}
            return {k: leaf((*parts, k), v) for k, v in value.items()}
        if isinstance(value, list):
            try:
                value = np.asarray(value)
            except ValueError:
                raise InputError(f"'{'.'.join(parts)}' in {path} is a ragged list", hint="send rectangular arrays") from None
            if parts in cameras and value.dtype.kind in "iu" and value.size and 0 <= value.min() and value.max() <= 255:
                value = value.astype(np.uint8)
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind == "U":
            value = str(value)
        return value

    obs: dict[str, Any] = {}
    for name, value in raw.items():
        parts = tuple(name.split(".")) if name.split(".")[0] in nested_groups else (name,)
        node = obs
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf(parts, value)
    return obs
