"""Checkpoint loading/saving: openpi and lerobot layouts, shards, errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from pi05_export.checkpoint import inspect_checkpoint, load_checkpoint, save_checkpoint
from pi05_export.checkpoint.io import EMBED_KEY, EXPERT_LM_HEAD_KEY, LM_HEAD_KEY, Layout
from pi05_export.errors import CheckpointError, ConfigError
from pi05_export.observation import random_observation


def _actions(model, obs):
    t = obs.torch()
    return model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t["noise"], num_steps=3)


@pytest.mark.parametrize("layout,shard", [("openpi", None), ("lerobot", None), ("openpi", 100_000), ("lerobot", 100_000)])
def test_round_trip_gives_identical_actions(tiny_model, tmp_path, layout, shard):
    save_checkpoint(tiny_model, tmp_path / "ck", layout, max_shard_bytes=shard)
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert info.layout is Layout(layout)
    assert (len(info.files) > 1) == (shard is not None)
    obs = random_observation(tiny_model.config, batch=2, seed=0)
    assert torch.equal(_actions(loaded, obs), _actions(tiny_model, obs))


def test_openpi_file_stores_tied_embedding_as_lm_head(tiny_model, tmp_path):
    from safetensors import safe_open

    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert LM_HEAD_KEY in keys and EMBED_KEY not in keys and EXPERT_LM_HEAD_KEY in keys
    assert len(keys) == len(tiny_model.state_dict()) + 1  # 812 at full size, like openpi's files


def test_bf16_policy_on_load(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck", "openpi", dtype="bfloat16")
    model, _ = load_checkpoint(tmp_path / "ck", dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["action_in_proj.weight"] == torch.float32
    assert dtypes["paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight"] == torch.float32
    assert dtypes["paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj.weight"] == torch.bfloat16


def test_lerobot_config_fields_are_read(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck", "lerobot")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    del cfg["pi05_export"]  # a real lerobot config: only lerobot's own fields
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    info = inspect_checkpoint(tmp_path / "ck")
    assert info.config.action_horizon == tiny_model.config.action_horizon  # from chunk_size
    assert info.config.max_token_len == tiny_model.config.max_token_len  # from tokenizer_max_length
    with pytest.raises(CheckpointError, match="missing .* key.*config used: .*config.json"):
        load_checkpoint(tmp_path / "ck")  # full-size variants (18 layers) vs tiny tensors (2 layers)


def test_wrong_shape_names_key_and_shapes(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    cfg = tiny_model.config.to_dict()
    cfg["expert"]["mlp_dim"] = 80
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for .*mlp.gate_proj.weight: checkpoint has \[96, 48\], config expects \[80, 48\]"):
        load_checkpoint(tmp_path / "ck", tmp_path / "cfg.json")


def test_missing_keys_listed(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    path = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(path))
    del state["action_out_proj.bias"], state["time_mlp_in.weight"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="missing 2 key.*action_out_proj.bias.*time_mlp_in.weight"):
        load_checkpoint(tmp_path / "ck")


def test_extra_keys_warn(tiny_model, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    path = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(path))
    state["something.else"] = torch.zeros(2)
    save_file(state, str(path))
    with caplog.at_level("WARNING"):
        load_checkpoint(tmp_path / "ck")
    assert "something.else" in caplog.text


def test_truncated_file_is_an_error(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "ck")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        inspect_checkpoint(tmp_path)
    (tmp_path / "params").mkdir()
    with pytest.raises(CheckpointError, match="JAX .orbax. checkpoint"):
        inspect_checkpoint(tmp_path)


def test_bad_config_dims(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**tiny_model.config.to_dict(), "expert": {"width": 48, "depth": 3, "mlp_dim": 96, "head_dim": 16}}))
    with pytest.raises(ConfigError, match="llm.depth 2 != expert.depth 3"):
        load_checkpoint(tmp_path / "ck", bad)
    bad.write_text(json.dumps({"vision": {"widht": 3}}))
    with pytest.raises(ConfigError, match="unknown key.*widht"):
        load_checkpoint(tmp_path / "ck", bad)


def test_save_refuses_a_foreign_checkpoint_dir(tiny_model, tmp_path):
    from pi05_export.errors import ArtifactError

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "paligemma"}')
    (hf / "model-00001-of-00003.safetensors").write_bytes(b"weights")
    with pytest.raises(ArtifactError, match="refusing to replace"):
        save_checkpoint(tiny_model, hf, "openpi")
    assert (hf / "model-00001-of-00003.safetensors").read_bytes() == b"weights"
    save_checkpoint(tiny_model, tmp_path / "ours", "openpi")
    save_checkpoint(tiny_model, tmp_path / "ours", "lerobot")  # our own output may be replaced
