"""``convert``: openpi JAX (orbax) checkpoints -> PyTorch safetensors.

The source checkpoints are written with the real orbax-checkpoint library in openpi's tree layout
(:mod:`pi05_export.testing.orbax_ckpt`, written from the spec, not from the converter's key map).
Every rule is checked numerically against the JAX-layout einsum definitions computed with numpy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pi05_export.checkpoint import load_checkpoint
from pi05_export.config import Pi05Config
from pi05_export.convert import convert_checkpoint
from pi05_export.errors import DependencyError, Pi05ExportError
from pi05_export.model.pi05 import keeps_fp32

pytest.importorskip("orbax.checkpoint", reason="needs the [jax] extra (orbax-checkpoint)")

from pi05_export.testing.orbax_ckpt import random_jax_params, write_orbax_checkpoint  # noqa: E402

# fp32 numpy einsum (JAX layout) vs the converted torch Linear/Conv: only summation order differs.
from tests.tolerances import EINSUM_ATOL, EINSUM_RTOL

TINY = Pi05Config.from_name("tiny")
VIS = "paligemma_with_expert.paligemma.model.vision_tower.vision_model"
LM = "paligemma_with_expert.paligemma.model.language_model"
EXP = "paligemma_with_expert.gemma_expert.model"
BLK = "PaliGemma/img/Transformer/encoderblock"
MHA = f"{BLK}/MultiHeadDotProductAttention_0"
LYR = "PaliGemma/llm/layers"


def _report(got: torch.Tensor | np.ndarray, want: np.ndarray) -> str:
    g = np.asarray(got, dtype=np.float64).ravel()
    w = np.asarray(want, dtype=np.float64).ravel()
    d = np.abs(g - w)
    cos = float(g @ w / (np.linalg.norm(g) * np.linalg.norm(w) + 1e-30))
    return f"max abs diff {d.max():.3e}, mean abs diff {d.mean():.3e}, cosine {cos:.8f}"


def _close(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    got_np = got.detach().float().numpy()
    assert got_np.shape == want.shape, f"{what}: shape {got_np.shape} != {want.shape}"
    assert np.allclose(got_np, want, atol=EINSUM_ATOL, rtol=EINSUM_RTOL), f"{what}: {_report(got_np, want)}"


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def jax_params() -> dict[str, np.ndarray]:
    return random_jax_params(TINY, seed=0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, jax_params: dict[str, np.ndarray]) -> dict[str, Path]:
    """Plain and `/value`-suffixed checkpoints, converted once to fp32 and bf16."""
    root = tmp_path_factory.mktemp("convert")
    plain = write_orbax_checkpoint(root / "jax", jax_params, action_dim=TINY.action_dim)
    suffixed = write_orbax_checkpoint(root / "jax_value", jax_params, value_suffix=True)
    return {
        "jax": plain,
        "fp32": convert_checkpoint(plain, root / "fp32", config="tiny") and root / "fp32",
        "bf16": convert_checkpoint(plain, root / "bf16", precision="bf16", config="tiny") and root / "bf16",
        "value_fp32": convert_checkpoint(suffixed, root / "value_fp32", config="tiny") and root / "value_fp32",
    }


@pytest.fixture(scope="module")
def converted(ckpts: dict[str, Path]):  # type: ignore[no-untyped-def]
    model, _ = load_checkpoint(ckpts["fp32"])  # strict=True inside: every key present, every shape right
    return model


# -- every rule against the JAX einsum definitions -------------------------------------------------
def _rng_x(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _dense(leaf: str, module: str, stacked: str | None) -> Callable:  # type: ignore[type-arg]
    """flax Dense: y = x @ kernel + bias (kernel (in, out))."""

    def check(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
        for i in range(depth if stacked else 1):
            k = p[f"{leaf}/kernel"][i] if stacked else p[f"{leaf}/kernel"]
            b = p[f"{leaf}/bias"][i] if stacked else p[f"{leaf}/bias"]
            x = _rng_x(2, 5, k.shape[0])
            _close(model.get_submodule(module.format(i=i))(_t(x)), x @ k + b, f"{leaf}[{i}]")

    return check


def _siglip_qkv(name: str, t: str) -> Callable:  # type: ignore[type-arg]
    def check(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
        for i in range(depth):
            k, b = p[f"{MHA}/{name}/kernel"][i], p[f"{MHA}/{name}/bias"][i]
            x = _rng_x(2, 7, k.shape[0])
            want = np.einsum("btd,dnh->btnh", x, k) + b  # flax DenseGeneral(features=(N, H))
            got = model.get_submodule(f"{VIS}.encoder.layers.{i}.self_attn.{t}_proj")(_t(x))
            _close(got, want.reshape(2, 7, -1), f"siglip {name}[{i}]")

    return check


def _siglip_out(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
    for i in range(depth):
        k, b = p[f"{MHA}/out/kernel"][i], p[f"{MHA}/out/bias"][i]
        x = _rng_x(2, 7, k.shape[0], k.shape[1])
        want = np.einsum("btnh,nhd->btd", x, k) + b  # DenseGeneral(axis=(-2, -1))
        got = model.get_submodule(f"{VIS}.encoder.layers.{i}.self_attn.out_proj")(_t(x.reshape(2, 7, -1)))
        _close(got, want, f"siglip out[{i}]")


def _patch_conv(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
    k, b = p["PaliGemma/img/embedding/kernel"], p["PaliGemma/img/embedding/bias"]  # HWIO
    ps = k.shape[0]
    img = _rng_x(2, 2 * ps, 3 * ps, 3)  # NHWC, as JAX sees it
    patches = img.reshape(2, 2, ps, 3, ps, 3).transpose(0, 1, 3, 2, 4, 5)  # b, i, j, h, w, c
    want = np.einsum("bijhwc,hwco->bijo", patches, k) + b  # VALID conv, stride = patch
    conv = model.get_submodule(f"{VIS}.embeddings.patch_embedding")
    got = conv(_t(img.transpose(0, 3, 1, 2))).permute(0, 2, 3, 1)  # NCHW in, back to NHWC
    _close(got, want, "patch conv")


def _gemma_q(sfx: str, out: str) -> Callable:  # type: ignore[type-arg]
    def check(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
        for i in range(depth):
            w = p[f"{LYR}/attn/q_einsum{sfx}/w"][i]
            x = _rng_x(2, 5, w.shape[1])
            want = np.einsum("BTD,NDH->BTNH", x, w)
            got = model.get_submodule(f"{out}.layers.{i}.self_attn.q_proj")(_t(x))
            _close(got.reshape(want.shape), want, f"q_einsum{sfx}[{i}]")

    return check


def _gemma_kv(sfx: str, out: str) -> Callable:  # type: ignore[type-arg]
    def check(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
        for i in range(depth):
            w = p[f"{LYR}/attn/kv_einsum{sfx}/w"][i]
            x = _rng_x(2, 5, w.shape[2])
            k_want, v_want = np.einsum("BSD,CKDH->CBSKH", x, w)  # openpi: "BSD,2KDH->2BSKH"
            layer = f"{out}.layers.{i}.self_attn"
            _close(model.get_submodule(f"{layer}.k_proj")(_t(x)).reshape(k_want.shape), k_want, f"k{sfx}[{i}]")
            _close(model.get_submodule(f"{layer}.v_proj")(_t(x)).reshape(v_want.shape), v_want, f"v{sfx}[{i}]")

    return check


def _gemma_o(sfx: str, out: str) -> Callable:  # type: ignore[type-arg]
    def check(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
        for i in range(depth):
            w = p[f"{LYR}/attn/attn_vec_einsum{sfx}/w"][i]
            x = _rng_x(2, 5, w.shape[0], w.shape[1])
            want = np.einsum("BTNH,NHD->BTD", x, w)
            got = model.get_submodule(f"{out}.layers.{i}.self_attn.o_proj")(_t(x.reshape(2, 5, -1)))
            _close(got, want, f"attn_vec_einsum{sfx}[{i}]")

    return check


def _gemma_mlp(sfx: str, out: str) -> Callable:  # type: ignore[type-arg]
    def check(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
        for i in range(depth):
            gating, linear = p[f"{LYR}/mlp{sfx}/gating_einsum"][i], p[f"{LYR}/mlp{sfx}/linear"][i]
            x = _rng_x(2, 5, gating.shape[1])
            mlp = f"{out}.layers.{i}.mlp"
            _close(model.get_submodule(f"{mlp}.gate_proj")(_t(x)), x @ gating[0], f"gate{sfx}[{i}]")
            _close(model.get_submodule(f"{mlp}.up_proj")(_t(x)), x @ gating[1], f"up{sfx}[{i}]")
            h = _rng_x(2, 5, linear.shape[0])
            _close(model.get_submodule(f"{mlp}.down_proj")(_t(h)), h @ linear, f"linear{sfx}[{i}]")

    return check


def _copies(p: dict[str, np.ndarray], model: torch.nn.Module, depth: int) -> None:
    """Leaves that are copied (norm scales/biases, embeddings): bit-exact."""
    sd = model.state_dict()
    pairs = [("PaliGemma/llm/embedder/input_embedding", f"{LM}.embed_tokens.weight", None),
             ("PaliGemma/img/pos_embedding", f"{VIS}.embeddings.position_embedding.weight", None),
             ("PaliGemma/llm/final_norm/scale", f"{LM}.norm.weight", None),
             ("PaliGemma/img/Transformer/encoder_norm/scale", f"{VIS}.post_layernorm.weight", None),
             ("PaliGemma/img/Transformer/encoder_norm/bias", f"{VIS}.post_layernorm.bias", None),
             (f"{LYR}/pre_attention_norm/scale", f"{LM}.layers.{{i}}.input_layernorm.weight", "L"),
             (f"{LYR}/pre_ffw_norm/scale", f"{LM}.layers.{{i}}.post_attention_layernorm.weight", "L"),
             (f"{BLK}/LayerNorm_0/scale", f"{VIS}.encoder.layers.{{i}}.layer_norm1.weight", "V"),
             (f"{BLK}/LayerNorm_0/bias", f"{VIS}.encoder.layers.{{i}}.layer_norm1.bias", "V"),
             (f"{BLK}/LayerNorm_1/scale", f"{VIS}.encoder.layers.{{i}}.layer_norm2.weight", "V"),
             (f"{BLK}/LayerNorm_1/bias", f"{VIS}.encoder.layers.{{i}}.layer_norm2.bias", "V")]
    for leaf, key, stack in pairs:
        for i in range(TINY.vision.depth if stack == "V" else depth if stack else 1):
            want = p[leaf][i] if stack else p[leaf].reshape(sd[key].shape)
            assert torch.equal(sd[key.format(i=i)], _t(want)), f"{leaf}[{i}] -> {key.format(i=i)}"


RULES: dict[str, Callable] = {  # type: ignore[type-arg]
    "patch_conv": _patch_conv,
    "siglip_q": _siglip_qkv("query", "q"),
    "siglip_k": _siglip_qkv("key", "k"),
    "siglip_v": _siglip_qkv("value", "v"),
    "siglip_out": _siglip_out,
    "siglip_fc1": _dense(f"{BLK}/MlpBlock_0/Dense_0", f"{VIS}.encoder.layers.{{i}}.mlp.fc1", "V"),
    "siglip_fc2": _dense(f"{BLK}/MlpBlock_0/Dense_1", f"{VIS}.encoder.layers.{{i}}.mlp.fc2", "V"),
    "head": _dense("PaliGemma/img/head", "paligemma_with_expert.paligemma.model.multi_modal_projector.linear", None),
    "llm_q": _gemma_q("", LM),
    "llm_kv": _gemma_kv("", LM),
    "llm_o": _gemma_o("", LM),
    "llm_gating_linear": _gemma_mlp("", LM),
    "expert_q": _gemma_q("_1", EXP),
    "expert_kv": _gemma_kv("_1", EXP),
    "expert_o": _gemma_o("_1", EXP),
    "expert_gating_linear": _gemma_mlp("_1", EXP),
    "adarms_pre_attention": _dense(f"{LYR}/pre_attention_norm_1/Dense_0", f"{EXP}.layers.{{i}}.input_layernorm.dense", "L"),
    "adarms_pre_ffw": _dense(f"{LYR}/pre_ffw_norm_1/Dense_0", f"{EXP}.layers.{{i}}.post_attention_layernorm.dense", "L"),
    "adarms_final": _dense("PaliGemma/llm/final_norm_1/Dense_0", f"{EXP}.norm.dense", None),
    "action_in_proj": _dense("action_in_proj", "action_in_proj", None),
    "action_out_proj": _dense("action_out_proj", "action_out_proj", None),
    "time_mlp_in": _dense("time_mlp_in", "time_mlp_in", None),
    "time_mlp_out": _dense("time_mlp_out", "time_mlp_out", None),
    "copied_leaves": _copies,
}


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_matches_jax_einsum(rule: str, jax_params: dict[str, np.ndarray], converted) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        RULES[rule](jax_params, converted, TINY.llm.depth)


def _sample(model: torch.nn.Module) -> np.ndarray:
    from pi05_export.observation import random_observation

    t = random_observation(TINY, batch=2, seed=0).torch()
    with torch.no_grad():
        actions = model.sample_actions(t["images"], t["image_mask"], t["tokens"], t["token_mask"], noise=t["noise"],
                                       num_steps=3)
    return actions.float().numpy()


def test_converted_model_loads_strictly_and_runs(ckpts: dict[str, Path], converted) -> None:  # type: ignore[no-untyped-def]
    assert converted.config == TINY
    actions = _sample(converted)
    assert actions.shape == (2, TINY.action_horizon, TINY.action_dim) and np.isfinite(actions).all()
    bf16_model, _ = load_checkpoint(ckpts["bf16"], dtype="bfloat16")
    assert np.isfinite(_sample(bf16_model)).all()


def test_fp32_keeps_every_stored_value(ckpts: dict[str, Path], jax_params: dict[str, np.ndarray]) -> None:
    """fp32 output holds exactly the stored values (no bf16 rounding anywhere): a transform-free check."""
    tensors = _read_all(ckpts["fp32"])
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    got = np.sort(np.concatenate([t.numpy().ravel() for k, t in tensors.items() if "gemma_expert.lm_head" not in k]))
    want = np.sort(np.concatenate([a.ravel() for a in jax_params.values()]))
    assert np.array_equal(got, want)
    assert not tensors["paligemma_with_expert.gemma_expert.lm_head.weight"].any()  # openpi's unused leftover


def test_bf16_applies_openpi_keep_fp32_policy(ckpts: dict[str, Path]) -> None:
    fp32, bf16 = _read_all(ckpts["fp32"]), _read_all(ckpts["bf16"])
    assert fp32.keys() == bf16.keys()
    kept = [k for k in bf16 if keeps_fp32(k)]
    assert any("time_mlp_in" in k for k in kept) and any(".dense." in k for k in kept)
    for key, t in bf16.items():
        want = torch.float32 if keeps_fp32(key) else torch.bfloat16
        assert t.dtype == want, f"{key}: {t.dtype}, openpi's policy says {want}"
        assert torch.equal(t, fp32[key].to(want)), f"{key}: not the round-to-nearest-even of the fp32 value"
    config = json.loads((ckpts["bf16"] / "config.json").read_text())
    assert config["precision"] == "bfloat16"


def test_value_suffix_and_bf16_storage(tmp_path: Path, ckpts: dict[str, Path], jax_params: dict[str, np.ndarray]) -> None:
    """nnx `/value` leaves convert identically; bf16-stored leaves upcast exactly under --precision fp32."""
    ref = _read_all(ckpts["fp32"])
    suffixed = _read_all(ckpts["value_fp32"])
    assert suffixed.keys() == ref.keys() and all(torch.equal(ref[k], suffixed[k]) for k in ref)
    bf16_params = random_jax_params(TINY, seed=0, dtype="bfloat16")
    out = convert_checkpoint(write_orbax_checkpoint(tmp_path / "jax", bf16_params), tmp_path / "pt", config="tiny")
    assert out.source["stored_dtypes"] == ["bfloat16"]
    got = _read_all(tmp_path / "pt")
    assert {t.dtype for t in got.values()} == {torch.float32}
    key = f"{LM}.layers.1.mlp.gate_proj.weight"
    want = bf16_params[f"{LYR}/mlp/gating_einsum"][1, 0].astype(np.float32).T
    assert torch.equal(got[key], _t(want))


def test_lerobot_layout_and_sharding(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    convert_checkpoint(ckpts["jax"], tmp_path / "lr", layout="lerobot", config="tiny", max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "lr").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "lr" / "model.safetensors.index.json").is_file()
    lr = _read_all(tmp_path / "lr")
    assert all(k.startswith("model.") for k in lr)
    model, info = load_checkpoint(tmp_path / "lr")
    assert info.layout.value == "lerobot" and model.config == TINY
    ref, _ = load_checkpoint(ckpts["fp32"])
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())


def test_layer_by_layer_reads_give_identical_output(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    """A 1-byte read budget forces one read per layer (re-reading each storage chunk): same bytes out."""
    convert_checkpoint(ckpts["jax"], tmp_path / "pt", config="tiny", max_block_bytes=1)
    ref, got = _read_all(ckpts["fp32"]), _read_all(tmp_path / "pt")
    assert got.keys() == ref.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_config_comes_from_shapes_and_assets_are_copied(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    manifest = convert_checkpoint(ckpts["jax"], tmp_path / "pt", action_horizon=10)  # no config: dims from the leaves
    cfg = Pi05Config.from_dict(manifest.config)
    assert (cfg.vision, cfg.llm, cfg.expert, cfg.action_dim) == (TINY.vision, TINY.llm, TINY.expert, TINY.action_dim)
    src = ckpts["jax"] / "assets" / "synthetic" / "norm_stats.json"
    assert (tmp_path / "pt" / "assets" / "synthetic" / "norm_stats.json").read_bytes() == src.read_bytes()
    assert json.loads((tmp_path / "pt" / "manifest.json").read_text())["stage"] == "convert"


# -- user errors ---------------------------------------------------------------------------------------
def _drop(*leaves: str) -> Callable[[dict], dict]:  # type: ignore[type-arg]
    return lambda p: {k: v for k, v in p.items() if k not in leaves}


def _add(**leaves: tuple[int, ...]) -> Callable[[dict], dict]:  # type: ignore[type-arg]
    return lambda p: {**p, **{k.replace("__", "/"): np.zeros(s, np.float32) for k, s in leaves.items()}}


def _pi0(p: dict) -> dict:  # type: ignore[type-arg]
    p = _drop("time_mlp_in/kernel", "time_mlp_in/bias", "time_mlp_out/kernel", "time_mlp_out/bias")(p)
    return {**p, "state_proj/kernel": np.zeros((32, 48), np.float32), "state_proj/bias": np.zeros(48, np.float32)}


def _reshape(leaf: str, shape: tuple[int, ...]) -> Callable[[dict], dict]:  # type: ignore[type-arg]
    return lambda p: {**p, leaf: np.zeros(shape, np.float32)}


BAD_TREES = {
    "wrong_shape": (_reshape(f"{LYR}/attn/q_einsum_1/w", (2, 8, 40, 16)),
                    "leaf PaliGemma/llm/layers/attn/q_einsum_1/w has shape [2, 8, 40, 16], expected [L=2, N=8, E=48"),
    "unexpected_leaf": (_add(extra__kernel=(3, 4)), "unexpected leaf extra/kernel with shape [3, 4]"),
    "lora_unpaired": (_add(PaliGemma__llm__layers__attn__q_einsum__lora_a=(2, 8, 64, 16)),
                      "LoRA leaf PaliGemma/llm/layers/attn/q_einsum/lora_a has no lora_b partner"),
    "pi0": (_pi0, "this is a pi0 checkpoint, not pi05"),
    "missing_leaf": (_drop("action_out_proj/bias"), "missing 1 leaf/leaves: action_out_proj/bias"),
}


def _expect_user_error(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str, out: Path) -> None:
    from pi05_export.cli import run

    out.mkdir(parents=True, exist_ok=True)
    (out / "keep.txt").write_text("a good old artifact")
    code = run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == Pi05ExportError.exit_code and code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in err, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []  # no staging leftovers


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_tree_is_one_line_error(case: str, tmp_path: Path, jax_params: dict, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[type-arg]
    mutate, fragment = BAD_TREES[case]
    ckpt = write_orbax_checkpoint(tmp_path / "jax", mutate(dict(jax_params)))
    _expect_user_error(capsys, ["convert", str(ckpt), "--out", str(tmp_path / "out" / "pt")], fragment,
                       tmp_path / "out" / "pt")


def test_not_orbax_and_missing_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import orbax.checkpoint as ocp

    out = tmp_path / "out" / "pt"
    (tmp_path / "empty").mkdir()
    _expect_user_error(capsys, ["convert", str(tmp_path / "empty"), "--out", str(out)], "no params/ directory", out)
    (tmp_path / "junk" / "params").mkdir(parents=True)
    (tmp_path / "junk" / "params" / "weights.bin").write_bytes(b"\0" * 64)
    _expect_user_error(capsys, ["convert", str(tmp_path / "junk"), "--out", str(out)],
                       "is not an orbax checkpoint", out)
    with ocp.PyTreeCheckpointer() as ckptr:  # an orbax checkpoint whose item is not called "params"
        ckptr.save((tmp_path / "other" / "params").absolute(), {"weights": {"w": np.zeros(3, np.float32)}})
    _expect_user_error(capsys, ["convert", str(tmp_path / "other"), "--out", str(out)],
                       "has no 'params' item (top level: weights)", out)


def test_config_mismatch_is_an_error(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pt"
    _expect_user_error(capsys, ["convert", str(ckpts["jax"]), "--out", str(out), "--preset", "pi05"],
                       "vision.width: checkpoint 32, config 1152", out)


def test_missing_orbax_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pi05_export.cli import run

    monkeypatch.setitem(__import__("sys").modules, "orbax.checkpoint", None)
    code = run(["convert", str(tmp_path), "--out", str(tmp_path / "pt")])
    err = capsys.readouterr().err
    assert code == DependencyError.exit_code and code != 0 and "pip install 'pi05-export[jax]'" in err, err
    assert not (tmp_path / "pt").exists()


def test_cli_convert_then_info(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pi05_export.cli import run

    out = tmp_path / "pt"
    assert run(["convert", str(ckpts["jax"]), "--out", str(out), "--preset", "tiny", "--precision", "bf16"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert run(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == TINY.to_dict() and info["dtypes"]["BF16"] > 0
