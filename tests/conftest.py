"""Shared fixtures and hardware skips.

Markers (registered in pyproject.toml): ``gpu`` skips without CUDA, ``tensorrt`` skips when the
``tensorrt`` module cannot be imported; both say why.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pi05_export.checkpoint import random_model


def _tensorrt_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed (it cannot be installed on this machine; see README 'TensorRT')"
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # installed but libnvinfer missing
        return False, f"tensorrt does not import: {e}"
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

