"""The whole-inference sampler (pi05_export.runtime.sampler) on the CPU: the two-slot pipeline gives the
same actions as sequential sampling, in order, and the device-buffer time frequencies change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi05_export.bench import _torch_stages, bench_inputs
from pi05_export.runtime.sampler import INPUT_KEYS, Sampler, StageFns

from .tolerances import REF_ATOL


def _stream(cfg, n, batch):
    """``n`` different observations (inputs and noise), as bench_inputs dicts."""
    return [bench_inputs(cfg, batch, seed=10 + i) for i in range(n)]


def _sequential(model, inp, steps):
    cfg = model.config
    b = inp["tokens"].shape[0]
    images = inp["pixel_values"].reshape(b, cfg.num_views, *inp["pixel_values"].shape[1:])
    return model.sample_actions(images, inp["image_mask"], inp["tokens"], inp["token_mask"], noise=inp["noise"],
                                num_steps=steps).numpy()


@pytest.mark.parametrize("steps", [1, 3])
def test_pipelined_stream_equals_sequential(tiny_model, steps):
    """Encode of n+1 is issued before denoise of n, into the other slot: no slot is overwritten early."""
    cfg = tiny_model.config
    batches = _stream(cfg, 5, batch=2)
    stages = _torch_stages(tiny_model, "torch", bench_inputs(cfg, 2, seed=0), cuda=False)
    with torch.inference_mode():
        got = list(stages.sampler.sample_stream(batches, steps))
        want = [_sequential(tiny_model, b, steps) for b in batches]
    assert len(got) == len(want) == 5
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == (2, cfg.action_horizon, cfg.action_dim) and g.dtype == np.float32
        diff = np.abs(g - w)
        assert diff.max() <= REF_ATOL, f"observation {i}: max abs {diff.max():.3g}, mean abs {diff.mean():.3g}"
    # the observations differ, so a mix-up between slots could not pass the check above unnoticed
    assert np.abs(got[0] - got[1]).max() > 1e-3


def test_sequential_sample_copies_into_static_slot(tiny_model):
    cfg = tiny_model.config
    static = bench_inputs(cfg, 1, seed=0)
    sampler = _torch_stages(tiny_model, "torch", static, cuda=False).sampler
    other = bench_inputs(cfg, 1, seed=3)
    with torch.inference_mode():
        got = sampler.sample(other, 2).numpy()
        assert all(torch.equal(static[k], other[k]) for k in INPUT_KEYS)  # loaded into the static buffers
        np.testing.assert_allclose(got, _sequential(tiny_model, other, 2), atol=REF_ATOL, rtol=0)


def test_empty_stream_and_graphs_need_cuda(tiny_model):
    cfg = tiny_model.config
    inp = bench_inputs(cfg, 1, seed=0)
    fns = StageFns(tiny_model.embed_images, tiny_model.prefix_kv_cache, tiny_model.denoise_step)
    assert list(Sampler(fns, inp, graphs=False).sample_stream([], 3)) == []
    with pytest.raises(ValueError, match="CUDA"):
        Sampler(fns, inp, graphs=True)


def test_device_time_frequencies_are_the_model_constant(tiny_model):
    """The sampler's device buffer holds the model's time frequencies: same velocity, bit for bit."""
    cfg = tiny_model.config
    inp = bench_inputs(cfg, 2, seed=1)
    with torch.inference_mode():
        emb = tiny_model.embed_images(inp["pixel_values"])
        kv, pm = tiny_model.prefix_kv_cache(emb.reshape(2, -1, emb.shape[-1]), inp["image_mask"], inp["tokens"],
                                            inp["token_mask"])
        t = torch.full((2,), 0.7)
        freq = torch.tensor(tiny_model.time_freq, dtype=torch.float32)
        a = tiny_model.denoise_step(inp["noise"], t, kv, pm)
        b = tiny_model.denoise_step(inp["noise"], t, kv, pm, freq)
    assert torch.equal(a, b)


def test_runtime_form_stream_equals_plain_sequential(fresh_tiny_model):
    """The compiled backends' stages (here with an identity compiler: the runtime form, uncompiled) run the
    fused model with the adaRMS modulations made once per step count; their pipelined and sequential
    actions equal the plain model's sample_actions."""
    import copy

    plain = copy.deepcopy(fresh_tiny_model)
    cfg = plain.config
    batches = _stream(cfg, 3, batch=2)
    stages = _torch_stages(fresh_tiny_model, "torch-compile", bench_inputs(cfg, 2, seed=0), cuda=False,
                           compiler=lambda fn: fn)
    assert "precomputed" in stages.notes["denoise"] and stages.condition is not None
    with torch.inference_mode():
        got = list(stages.sampler.sample_stream(batches, 3))
        one = stages.sampler.sample(batches[2], 3).numpy()
        want = [_sequential(plain, b, 3) for b in batches]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        diff = np.abs(g - w)
        assert diff.max() <= REF_ATOL, f"observation {i}: max abs {diff.max():.3g}, mean abs {diff.mean():.3g}"
    np.testing.assert_allclose(one, want[2], atol=REF_ATOL, rtol=0)
    slot = stages.sampler.slots[0]  # one [2*depth+1, B, 3W] modulation tensor per step, made once
    assert [m.shape for m in slot.grid(3)] == [(2 * cfg.expert.depth + 1, 2, 3 * cfg.expert.width)] * 3
    assert slot.grid(3) is slot.grid(3)


def test_stream_runs_one_inference_per_observation(tiny_model):
    """Slots are prepared (captured / warmed up) once per step count: a later stream of n observations runs
    exactly n encodes and n denoise loops, not two extra inferences for the preparation."""
    cfg = tiny_model.config
    calls = {"encode": 0, "denoise": 0}

    def llm(*a):
        calls["encode"] += 1
        return tiny_model.prefix_kv_cache(*a)

    def denoise(x, t, kv, pm):
        calls["denoise"] += 1
        return tiny_model.denoise_step(x, t, kv, pm)

    sampler = Sampler(StageFns(tiny_model.embed_images, llm, denoise), bench_inputs(cfg, 1, seed=0), graphs=False)
    with torch.inference_mode():
        list(sampler.sample_stream(_stream(cfg, 2, batch=1), 2))
        calls.update(encode=0, denoise=0)
        assert len(list(sampler.sample_stream(_stream(cfg, 3, batch=1), 2))) == 3
    assert calls == {"encode": 3, "denoise": 3 * 2}
