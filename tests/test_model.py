"""The reference model: key names, independent implementations (transformers), cache vs joint pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pi05_export.checkpoint import random_model
from pi05_export.checkpoint.io import EXPERT_LM_HEAD_KEY, LM_HEAD_KEY
from pi05_export.config import Pi05Config
from pi05_export.metrics import compare, describe
from pi05_export.model.pi05 import Pi05Model, apply_dtype_policy
from pi05_export.observation import random_observation
from tests.tolerances import BATCH_ORDER_ATOL, REF_ATOL

KEYS_TSV = Path(__file__).parent / "data" / "pi05_state_dict_keys.tsv"


def _assert_close(actual, ref, atol, what=""):
    m = compare(actual, ref)
    assert m["max_abs"] <= atol, f"{what}: {describe(m)} (atol {atol})"


def test_full_size_keys_and_shapes_match_openpi():
    """All 813 openpi keys (minus the two lm_heads we do not hold) with identical shapes."""
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    ref = {k: tuple(int(d) for d in s.strip("[]").split(", ")) for k, s, _ in rows}
    with torch.device("meta"):
        model = Pi05Model(Pi05Config.from_name("pi05"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ref) == 813
    assert set(ref) - set(ours) == {LM_HEAD_KEY, EXPERT_LM_HEAD_KEY}
    assert set(ours) <= set(ref)
    assert {k: ref[k] for k in ours} == ours
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.353e9, rel=2e-3)


def test_dtype_policy_matches_openpi_tsv():
    """bf16 policy: exactly the parameters openpi keeps fp32 stay fp32."""
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    ref = {k: d for k, _, d in rows}
    with torch.device("meta"):
        model = apply_dtype_policy(Pi05Model(Pi05Config.from_name("pi05")), torch.bfloat16)
    for name, p in model.named_parameters():
        assert str(p.dtype).removeprefix("torch.") == ref[name], name


def test_siglip_matches_transformers(tiny_model):
    transformers = pytest.importorskip("transformers")
    v = tiny_model.config.vision
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.eps,
        vision_use_head=False, attn_implementation="eager",
    )
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    prefix = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
    sd = {k[len(prefix):]: t for k, t in tiny_model.state_dict().items() if k.startswith(prefix)}
    hf.load_state_dict(sd, strict=True)
    pixels = torch.rand(3, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state
        ours = tiny_model.vision(pixels)
    _assert_close(ours, ref, REF_ATOL, "SigLIP")


def test_prefix_kv_matches_transformers_gemma(tiny_model):
    """Our bidirectional prefix with padding vs HF GemmaModel given the same 4-D mask and positions."""
    transformers = pytest.importorskip("transformers")
    c = tiny_model.config.llm
    hf_cfg = transformers.GemmaConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=c.eps, rope_theta=c.rope_theta, attn_implementation="eager",
    )
    hf = transformers.GemmaModel(hf_cfg).eval()
    prefix = "paligemma_with_expert.paligemma.model.language_model."
    hf.load_state_dict({k[len(prefix):]: t for k, t in tiny_model.state_dict().items() if k.startswith(prefix)}, strict=True)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, c.vocab_size, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    embeds = tiny_model.llm.embed_tokens(tokens) * c.width**0.5
    bias = torch.where(mask[:, :, None] & mask[:, None, :], 0.0, -2.3819763e38)[:, None]
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=bias, position_ids=torch.cumsum(mask.long(), -1) - 1, use_cache=True)
        kv = tiny_model.llm.prefix_kv_cache(embeds, mask)
    cache = out.past_key_values
    for layer in range(c.depth):
        for b, n in ((0, 12), (1, 7)):  # padded positions are never attended; compare valid ones
            _assert_close(kv[layer, 0, b, :, :n], cache.layers[layer].keys[b, :, :n], REF_ATOL, f"K layer {layer}")
            _assert_close(kv[layer, 1, b, :, :n], cache.layers[layer].values[b, :, :n], REF_ATOL, f"V layer {layer}")


def _obs_tensors(cfg, batch=2, seed=0):
    return random_observation(cfg, batch=batch, seed=seed).torch()


def test_cached_denoise_equals_uncached_joint_pass(tiny_model):
    t_obs = _obs_tensors(tiny_model.config)
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, tiny_model.config.action_horizon, tiny_model.config.action_dim, generator=gen)
    t = torch.tensor([0.9, 0.2])
    with torch.no_grad():
        kv, pm = tiny_model.encode_observation(t_obs["images"], t_obs["image_mask"], t_obs["tokens"], t_obs["token_mask"])
        cached = tiny_model.denoise_step(x_t, t, kv, pm)
        joint = tiny_model.velocity_uncached(t_obs["images"], t_obs["image_mask"], t_obs["tokens"], t_obs["token_mask"], x_t, t)
    _assert_close(cached, joint, REF_ATOL, "cached vs joint")


def _sample(model, obs, **overrides):
    o = {**obs, **overrides}
    return model.sample_actions(o["images"], o["image_mask"], o["tokens"], o["token_mask"], noise=o["noise"], num_steps=4)


def test_masked_views_and_padded_tokens_change_nothing(tiny_model):
    obs = _obs_tensors(tiny_model.config)
    base = _sample(tiny_model, obs)
    images = obs["images"].clone()
    images[~obs["image_mask"]] = torch.rand_like(images[~obs["image_mask"]])  # garbage in masked cameras
    tokens = torch.where(obs["token_mask"], obs["tokens"], torch.randint_like(obs["tokens"], 1, 1000))  # garbage padding
    assert torch.equal(_sample(tiny_model, obs, images=images, tokens=tokens), base)


def test_cache_not_mutated_and_deterministic(tiny_model):
    obs = _obs_tensors(tiny_model.config)
    with torch.no_grad():
        kv, pm = tiny_model.encode_observation(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"])
        before = kv.clone()
        tiny_model.denoise_step(obs["noise"], torch.tensor([1.0, 1.0]), kv, pm)
    assert torch.equal(kv, before)
    assert torch.equal(_sample(tiny_model, obs), _sample(tiny_model, obs))


def test_time_and_every_view_change_the_output(tiny_model):
    obs = _obs_tensors(tiny_model.config)
    with torch.no_grad():
        kv, pm = tiny_model.encode_observation(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"])
        v1 = tiny_model.denoise_step(obs["noise"], torch.tensor([0.9, 0.9]), kv, pm)
        v2 = tiny_model.denoise_step(obs["noise"], torch.tensor([0.3, 0.3]), kv, pm)
    assert compare(v1, v2)["max_abs"] > 1e-3, "time conditioning has no effect"
    base = _sample(tiny_model, obs)
    all_views = {**obs, "image_mask": torch.ones_like(obs["image_mask"])}
    base_all = _sample(tiny_model, all_views)
    for view in range(tiny_model.config.num_views):
        images = all_views["images"].clone()
        images[:, view] = torch.rand_like(images[:, view]) * 2 - 1
        changed = _sample(tiny_model, {**all_views, "images": images})
        assert compare(changed, base_all)["max_abs"] > 1e-4, f"view {view} has no effect"
    assert not torch.equal(base, base_all), "image_mask has no effect"


def test_bf16_policy_stays_close_to_fp32(tiny_model):
    obs = _obs_tensors(tiny_model.config)
    ref = _sample(tiny_model, obs)
    bf16 = apply_dtype_policy(random_model("tiny", seed=0), torch.bfloat16)
    assert compare(_sample(bf16, obs), ref)["cosine"] > 0.999


def test_explicit_dims_config_from_issue():
    """8 query heads of 16 dims, widths 64/48, 2 layers, 56x56 images, vocab 1024, horizon 10."""
    cfg = Pi05Config.from_dict({
        "vision": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 4, "patch_size": 14, "image_size": 56},
        "llm": {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16, "vocab_size": 1024},
        "expert": {"width": 48, "depth": 2, "mlp_dim": 96, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16},
        "action_horizon": 10, "max_token_len": 16,
    })
    model = random_model(cfg, seed=1)
    obs = random_observation(cfg, batch=1, seed=1).torch()
    out = _sample(model, obs)
    assert out.shape == (1, 10, 32) and torch.isfinite(out).all()


def test_runtime_form_changes_no_value(fresh_tiny_model):
    """The torch runtime's form of the model (fused q/k/v and gate/up, adaRMS modulations computed once per
    step count) keeps the state_dict and gives the plain model's KV cache and v_t (reordering noise only)."""
    import copy

    from pi05_export.model.common import FUSED_BIAS, FUSED_WEIGHT
    from pi05_export.model.pi05 import fuse_projections, use_sdpa

    model, cfg = fresh_tiny_model, fresh_tiny_model.config
    plain = copy.deepcopy(model)
    assert fuse_projections(model) == 2 * (cfg.llm.depth + cfg.expert.depth) + cfg.vision.depth
    assert fuse_projections(model) == 0, "fusing twice must be a no-op"
    sd, ref_sd = model.state_dict(), plain.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    attn = model.expert.layers[0].self_attn  # parameters are row blocks of the fused matrix: no extra memory
    assert attn.k_proj.weight.untyped_storage().data_ptr() == getattr(attn, FUSED_WEIGHT).untyped_storage().data_ptr()
    siglip = model.vision.encoder.layers[0].self_attn  # with its biases
    assert siglip.v_proj.bias.untyped_storage().data_ptr() == getattr(siglip, FUSED_BIAS).untyped_storage().data_ptr()
    obs = _obs_tensors(cfg)
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        kv, pm = model.encode_observation(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"])
        kv_ref, pm_ref = plain.encode_observation(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"])
        _assert_close(kv, kv_ref, BATCH_ORDER_ATOL, "KV cache, fused vs plain")
        mods = model.time_modulations(t)
        assert mods.shape == (2 * cfg.expert.depth + 1, 2, 3 * cfg.expert.width) and mods.dtype == torch.float32
        v = model.denoise_step_modulated(obs["noise"], mods, kv, pm)
        _assert_close(v, plain.denoise_step(obs["noise"], t, kv_ref, pm_ref), BATCH_ORDER_ATOL, "v_t, runtime form vs plain")
        # the same values as the step computes for itself: bitwise on the same kernels
        assert torch.equal(v, model.denoise_step(obs["noise"], t, kv, pm))
        use_sdpa(model)  # and attention through torch's SDPA: padded prefix rows stay finite
        obs["token_mask"][1, 2:] = False
        kv, pm = model.encode_observation(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"])
        kv_ref, pm_ref = plain.encode_observation(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"])
        _assert_close(kv, kv_ref, BATCH_ORDER_ATOL, "KV cache, SDPA vs explicit")
        v = model.denoise_step_modulated(obs["noise"], model.time_modulations(t), kv, pm)
        _assert_close(v, plain.denoise_step(obs["noise"], t, kv_ref, pm_ref), BATCH_ORDER_ATOL, "v_t, SDPA vs explicit")
    with pytest.raises(TypeError, match="adaRMS"):
        model.llm.time_modulations(torch.zeros(2, cfg.expert.width))


def test_fused_model_survives_casts_and_replaced_layers(fresh_tiny_model):
    """A fused matrix is derived state: apply_dtype_policy (which replaces parameters) unfuses first, and a
    fused module whose children were cast or replaced behind its back computes unfused, never stale values."""
    import copy

    from pi05_export.model.common import FUSED_WEIGHT, fused_linear
    from pi05_export.model.pi05 import fuse_projections

    model = fresh_tiny_model
    fuse_projections(model)
    obs = _obs_tensors(model.config)
    with torch.no_grad():
        want = model.sample_actions(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"], noise=obs["noise"], num_steps=2)
        bf16 = apply_dtype_policy(copy.deepcopy(model), torch.bfloat16)
        assert getattr(bf16.expert.layers[0].self_attn, FUSED_WEIGHT, None) is None
        got = bf16.sample_actions(obs["images"], obs["image_mask"], obs["tokens"], obs["token_mask"], noise=obs["noise"], num_steps=2)
        assert compare(got, want)["cosine"] > 0.999
        attn = model.expert.layers[0].self_attn
        x = torch.randn(1, 3, model.config.expert.width)
        assert fused_linear(attn, x) is not None
        for p in attn.parameters():  # a cast that bypasses apply_dtype_policy
            p.data = p.data.double()
        assert fused_linear(attn, x.double()) is None
        h = torch.randn(1, 2, model.config.llm.width)
        mlp = model.llm.layers[0].mlp
        mlp.up_proj = torch.nn.Sequential(mlp.up_proj)  # another module type (as a quantizer's wrapper)
        assert fused_linear(mlp, h) is None
        # a copy whose parameters no longer alias the fused matrix (deepcopy clones them one by one) computes
        # unfused and drops its fused matrix; then fresh weights loaded into it are used
        mlp = copy.deepcopy(model.llm.layers[1].mlp)
        assert getattr(mlp, FUSED_WEIGHT, None) is not None and fused_linear(mlp, h) is None
        assert getattr(mlp, FUSED_WEIGHT, None) is None
        # in-place loads write through the views into the fused matrix: still fused, new values used
        fuse_projections(model.llm)
        mlp = model.llm.layers[-1].mlp
        new = {k: torch.randn_like(v) for k, v in mlp.state_dict().items()}
        mlp.load_state_dict(new)
        gate, up = fused_linear(mlp, h).chunk(2, dim=-1)
        torch.testing.assert_close(up, h @ new["up_proj.weight"].T)
        mlp.load_state_dict({k: v + 1 for k, v in new.items()}, assign=True)  # replaced parameters: unfused
        assert fused_linear(mlp, h) is None


def test_plain_form_is_the_export_form(fresh_tiny_model):
    """plain_form sets the runtime form aside (fused matrices kept alive, SDPA off) and restores it."""
    from pi05_export.model.common import FUSED_WEIGHT
    from pi05_export.model.pi05 import fuse_projections, plain_form, use_sdpa

    model = fresh_tiny_model
    fuse_projections(model)
    use_sdpa(model)
    attn = model.expert.layers[0].self_attn
    fused = getattr(attn, FUSED_WEIGHT)
    with plain_form(model):
        assert getattr(attn, FUSED_WEIGHT, None) is None and not model.expert.sdpa
        assert not any(k.endswith(FUSED_WEIGHT) for k, _ in model.named_buffers())
    assert getattr(attn, FUSED_WEIGHT) is fused and model.expert.sdpa


def test_fusion_leaves_guarded_layers_alone(fresh_tiny_model):
    """--keep-fp32 casts are forward hooks on every Linear: a fused GEMM would skip them, so nothing fuses."""
    from pi05_export.model.pi05 import fuse_projections

    model = apply_dtype_policy(fresh_tiny_model, torch.bfloat16, keep_fp32=["*.language_model.layers.0.mlp.down_proj"])
    assert fuse_projections(model) == 0
