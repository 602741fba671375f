"""Shared fixtures and hardware skips.

Markers (registered in pyproject.toml): ``gpu`` skips without CUDA, ``tensorrt`` skips when the
``tensorrt`` module cannot be imported; both say why.
"""

from __future__ import annotations

import pytest
import torch

from pi05_export.checkpoint import random_model


def _tensorrt_importable() -> tuple[bool, str]:
    from pi05_export.errors import DependencyError
    from pi05_export.trt import require_tensorrt

    try:
        require_tensorrt()
    except DependencyError as e:
        return False, f"{e.message} (TensorRT cannot be installed on this machine; see README 'TensorRT')"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    trt_ok, trt_reason = _tensorrt_importable()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)"))
        if "tensorrt" in item.keywords and not trt_ok:
            item.add_marker(pytest.mark.skip(reason=trt_reason))


@pytest.fixture(scope="session")
def tiny_model():
    """The ``tiny`` preset with seeded random weights (fp32). Do not mutate: use ``fresh_tiny_model``."""
    torch.manual_seed(0)
    return random_model("tiny", seed=0)


@pytest.fixture
def fresh_tiny_model():
    return random_model("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_obs(tiny_model):
    from pi05_export.observation import random_observation

    return random_observation(tiny_model.config, batch=2, seed=0)



@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """``pi05-export onnx --preset tiny --random-init`` per precision, exported once per session."""
    from pi05_export.export import export_onnx

    cache: dict[str, object] = {}

    def get(precision: str = "fp32"):
        if precision not in cache:
            out = tmp_path_factory.mktemp(f"export-{precision}") / "out"
            source = {"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}
            export_onnx(random_model("tiny", seed=0), out, source=source, precision=precision)
            cache[precision] = out
        return cache[precision]

    return get


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A tiny openpi-style checkpoint dir: weights, config, assets/<asset_id>/norm_stats.json for every
    shipped robot, a SentencePiece tokenizer trained on the fly, and examples/<robot>.npz."""
    from pi05_export.testing.tiny_policy import build_tiny_policy

    return build_tiny_policy(tmp_path_factory.mktemp("tiny-policy") / "ckpt")


@pytest.fixture(scope="session")
def tiny_policy_export(tiny_policy_dir, tmp_path_factory):
    """``pi05-export onnx`` of the tiny policy checkpoint (fp32)."""
    from pi05_export.checkpoint import resolve_model
    from pi05_export.export import export_onnx

    model, source = resolve_model(tiny_policy_dir)
    out = tmp_path_factory.mktemp("tiny-policy-onnx") / "out"
    export_onnx(model, out, source=source, precision="fp32")
    return out
