"""Issue 14, kind 3: weights are what they claim, or the load stops with one line.

Each case builds a tiny checkpoint here (the ``tiny`` preset saved with :func:`save_checkpoint`, then
edited with safetensors), runs the real CLI or loader, and checks the exit code, the one-line message
and that nothing outside ``--out`` (or the checkpoint) changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pi05_export.checkpoint import load_checkpoint, save_checkpoint
from pi05_export.cli import run
from pi05_export.errors import CheckpointError
from tests.cli_checks import assert_refused, snapshot

Q = "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj"
GATE = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.gate_proj"


def _checkpoint(tiny_model, root: Path, edit: Callable[[dict[str, torch.Tensor]], None], **save) -> Path:  # type: ignore[no-untyped-def]
    """The tiny model saved as an openpi checkpoint, with ``edit`` applied to its single weight file."""
    ckpt = save_checkpoint(tiny_model, root / "ck", "openpi", **save)
    path = ckpt / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})
    return ckpt




def _refused(capsys: pytest.CaptureFixture[str], root: Path, ckpt: Path, fragment: str) -> str:
    """``pi05-export onnx CKPT --out OUT`` is refused in one line and writes nothing."""
    err = assert_refused(capsys, root, ["onnx", str(ckpt), "--out", str(root / "out")], fragment)
    assert not (root / "out").exists()
    return err


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = value(state[key])

    return edit


@pytest.mark.parametrize(("dtype", "shown"), [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.int8, "I8")])
def test_integer_and_bool_weights_are_refused(tiny_model, tmp_path, capsys, dtype, shown):
    ckpt = _checkpoint(tiny_model, tmp_path, _set("action_out_proj.bias", lambda t: (t * 100).to(dtype)))
    _refused(capsys, tmp_path, ckpt, f"action_out_proj.bias is stored as {shown}; a floating-point parameter is expected")


@pytest.mark.parametrize(("value", "shown"), [(float("nan"), "(1 NaN, 0 inf)"), (float("inf"), "(0 NaN, 1 inf)")])
def test_non_finite_weights_are_refused(tiny_model, tmp_path, capsys, value, shown):
    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t

    ckpt = _checkpoint(tiny_model, tmp_path, _set(f"{Q}.weight", poison))
    _refused(capsys, tmp_path, ckpt, f"{Q}.weight has 1 non-finite value(s) of 8192 {shown}")


def test_fp16_overflow_on_load_is_refused(tiny_model, tmp_path):
    ckpt = _checkpoint(tiny_model, tmp_path, _set(f"{Q}.weight", lambda t: t * 1e6))
    with pytest.raises(CheckpointError, match=r"q_proj.weight has \d+ non-finite value.* as float16 \(stored F32\)"):
        load_checkpoint(ckpt, dtype="float16")


def _fp8(scale_shape: tuple[int, ...], suffix: str = "_scale") -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        w = state[f"{GATE}.weight"]
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0 if scale_shape != (1,) else w.abs().amax().reshape(1) / 448.0
        state[f"{GATE}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        state[f"{GATE}.weight{suffix}"] = scale.reshape(scale_shape).contiguous()
        state[f"{GATE}.input_scale"] = torch.ones(1)

    return edit


@pytest.mark.parametrize(("scale_shape", "suffix"), [((1,), "_scale"), ((96, 1), "_scale"), ((96,), "_scale_inv")])
def test_fp8_weights_are_dequantized_with_their_scale(tiny_model, tmp_path, scale_shape, suffix):
    ckpt = _checkpoint(tiny_model, tmp_path, _fp8(scale_shape, suffix))
    stored = load_file(str(ckpt / "model.safetensors"))
    model, _ = load_checkpoint(ckpt)
    fp8, scale = stored[f"{GATE}.weight"], stored[f"{GATE}.weight{suffix}"]
    want = fp8.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)
    got = model.state_dict()[f"{GATE}.weight"]
    assert torch.equal(got, want)
    ref = tiny_model.state_dict()[f"{GATE}.weight"]
    assert (got - ref).abs().max() <= 0.07 * ref.abs().max()  # an E4M3 rounding of the original, not the raw codes


def test_fp8_without_scale_or_with_block_scales_is_refused(tiny_model, tmp_path, capsys):
    def no_scale(state: dict[str, torch.Tensor]) -> None:
        _fp8((1,))(state)
        del state[f"{GATE}.weight_scale"]

    ckpt = _checkpoint(tiny_model, tmp_path / "a", no_scale)
    _refused(capsys, tmp_path / "a", ckpt, f"{GATE}.weight is stored as F8_E4M3 with no scale")

    def block(state: dict[str, torch.Tensor]) -> None:
        _fp8((1,))(state)
        state[f"{GATE}.weight_scale"] = torch.ones(2, 1)  # [out/48, in/48] blocks: layout unknown without the block size

    ckpt = _checkpoint(tiny_model, tmp_path / "b", block)
    _refused(capsys, tmp_path / "b", ckpt, f"FP8 scale {GATE}.weight_scale is F32 [2, 1] for weight [96, 48]")


def _lora(state: dict[str, torch.Tensor], rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(rank, 64, generator=gen) * 0.1
    b = torch.randn(128, rank, generator=gen) * 0.1  # q_proj.weight is [N*H = 128, D = 64]: B [128, r], A [r, 64]
    state[f"{Q}.lora_A.weight"], state[f"{Q}.lora_B.weight"] = a, b
    return a, b


def test_unmerged_peft_lora_without_its_config_is_refused(tiny_model, tmp_path, capsys):
    ckpt = _checkpoint(tiny_model, tmp_path, _lora)
    _refused(capsys, tmp_path, ckpt, f"checkpoint holds 1 unmerged LoRA adapter(s) (e.g. {Q}.lora_A.weight) and no "
                                     "adapter_config.json")


@pytest.mark.parametrize("rslora", [False, True])
def test_unmerged_peft_lora_is_merged_with_peft_scaling(tiny_model, tmp_path, rslora):
    """W' = W + scaling * B @ A with scaling = lora_alpha / r (or / sqrt(r) with use_rslora): PEFT's
    ``LoraLayer.update_layer`` and ``Linear.get_delta_weight`` (peft/tuners/lora/layer.py)."""
    factors: list[torch.Tensor] = []
    ckpt = _checkpoint(tiny_model, tmp_path, lambda s: factors.extend(_lora(s)))
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": rslora}))
    a, b = factors
    scaling = 8 / 2 if rslora else 8 / 4
    model, _ = load_checkpoint(ckpt)
    want = tiny_model.state_dict()[f"{Q}.weight"] + scaling * (b @ a)
    assert torch.allclose(model.state_dict()[f"{Q}.weight"], want, atol=1e-6, rtol=0)
    others = {k: v for k, v in model.state_dict().items() if k != f"{Q}.weight"}
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in others.items())


def test_sharded_checkpoint_reads_the_shard_the_index_names(tiny_model, tmp_path, caplog):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", "openpi", max_shard_bytes=100_000)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    owner = index[f"{Q}.weight"]
    other = next(n for n in sorted(set(index.values())) if n != owner)
    state = load_file(str(ckpt / other))
    state[f"{Q}.weight"] = torch.zeros(128, 64)  # a stale copy under the same name, in the shard the index does not name
    save_file(state, str(ckpt / other), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        model, _ = load_checkpoint(ckpt)
    assert torch.equal(model.state_dict()[f"{Q}.weight"], tiny_model.state_dict()[f"{Q}.weight"])
    assert f"{Q}.weight in {other} (the index names {owner})" in caplog.text


@pytest.mark.parametrize(("name", "fragment"), [
    ("/etc/passwd", "which is outside"), ("../elsewhere.safetensors", "which is outside"),
    ("link.safetensors", "leads outside"),
])
def test_shard_names_stay_inside_the_checkpoint(tiny_model, tmp_path, capsys, name, fragment):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", "openpi", max_shard_bytes=100_000)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "elsewhere.safetensors").write_bytes((ckpt / first).read_bytes())
    (ckpt / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    err = _refused(capsys, tmp_path, ckpt, "model.safetensors.index.json entry")
    assert fragment in err and repr(name) in err, err


def test_index_naming_a_shard_without_the_tensor_is_refused(tiny_model, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", "openpi", max_shard_bytes=100_000)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    names = sorted(set(index["weight_map"].values()))
    wrong = names[1] if index["weight_map"]["action_out_proj.bias"] == names[0] else names[0]
    index["weight_map"]["action_out_proj.bias"] = wrong
    index_path.write_text(json.dumps(index))
    _refused(capsys, tmp_path, ckpt, f"model.safetensors.index.json assigns action_out_proj.bias to {wrong}, which does not hold it")


# -- openpi JAX LoRA: convert merges it exactly ----------------------------------------------------
LYR = "PaliGemma/llm/layers"


def _jax_lora_params(rank_llm: int = 16, rank_expert: int = 32):  # type: ignore[no-untyped-def]
    """Tiny openpi params with LoRA leaves on every Gemma attention and MLP weight (openpi's names and
    shapes: ``lora.Einsum`` ``lora_a``/``lora_b``, ``lora.FeedForward`` ``*_lora_a``/``*_lora_b``)."""
    from pi05_export.config import Pi05Config
    from pi05_export.testing.orbax_ckpt import random_jax_params

    params = random_jax_params(Pi05Config.from_name("tiny"), seed=0)
    rng = np.random.default_rng(7)
    for sfx, rank in (("", rank_llm), ("_1", rank_expert)):
        bases = {f"{LYR}/attn/{e}{sfx}/w": (f"{LYR}/attn/{e}{sfx}/lora_a", f"{LYR}/attn/{e}{sfx}/lora_b")
                 for e in ("q_einsum", "kv_einsum", "attn_vec_einsum")}
        bases.update({f"{LYR}/mlp{sfx}/{w}": (f"{LYR}/mlp{sfx}/{w}_lora_a", f"{LYR}/mlp{sfx}/{w}_lora_b")
                      for w in ("gating_einsum", "linear")})
        for base, (a, b) in bases.items():
            shape = params[base].shape
            params[a] = (rng.standard_normal((*shape[:-1], rank)) * 0.05).astype(np.float32)
            params[b] = (rng.standard_normal((*shape[:-2], rank, shape[-1])) * 0.05).astype(np.float32)
    return params


def test_convert_merges_openpi_lora_exactly(tmp_path, capsys):
    """The converted Linear layers reproduce openpi's LoRA forward (``src/openpi/models/lora.py``):
    ``Einsum``: ``einsum(eqn, x, w) + einsum(eqn_b, einsum(eqn_a, x, lora_a), lora_b) * alpha / rank``
    with the equations of ``_make_lora_eqns``; ``FeedForward._dot``: ``x @ w + x @ lora_a @ lora_b``.
    Ranks 16 and 32 are openpi's gemma_2b_lora (alpha 16) and gemma_300m_lora (alpha 32)."""
    pytest.importorskip("orbax.checkpoint", reason="needs the [jax] extra (orbax-checkpoint)")
    from pi05_export.testing.orbax_ckpt import write_orbax_checkpoint

    p = _jax_lora_params()
    jax = write_orbax_checkpoint(tmp_path / "jax", p)
    before = snapshot(tmp_path)
    assert run(["convert", str(jax), "--out", str(tmp_path / "pt"), "--action-horizon", "10"]) == 0
    err = capsys.readouterr().err
    assert "merged LoRA into 10 weight(s)" in err and "action_horizon 10 (--action-horizon)" in err, err
    assert {k: v for k, v in snapshot(tmp_path).items() if k.split("/")[0] != "pt"} == before
    sd = load_file(str(tmp_path / "pt" / "model.safetensors"))
    rng = np.random.default_rng(3)
    for sfx, prefix, width, mlp, scale in (("", "paligemma_with_expert.paligemma.model.language_model", 64, 128, 16 / 16),
                                           ("_1", "paligemma_with_expert.gemma_expert.model", 48, 96, 32 / 32)):
        layer = 1
        lin = {n: sd[f"{prefix}.layers.{layer}.{n}.weight"].double().numpy()
               for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}

        def leaf(name: str, layer: int = layer) -> np.ndarray:
            return p[name][layer].astype(np.float64)

        x = rng.standard_normal((2, 5, width))
        att, ffn = f"{LYR}/attn", f"{LYR}/mlp{sfx}"
        q = np.einsum("BTD,NDH->BTNH", x, leaf(f"{att}/q_einsum{sfx}/w")) + scale * np.einsum(
            "BTNL,NLH->BTNH", np.einsum("BTD,NDL->BTNL", x, leaf(f"{att}/q_einsum{sfx}/lora_a")), leaf(f"{att}/q_einsum{sfx}/lora_b"))
        assert np.allclose(x @ lin["self_attn.q_proj"].T, q.reshape(2, 5, -1), atol=1e-5)
        kv = np.einsum("BSD,CKDH->CBSKH", x, leaf(f"{att}/kv_einsum{sfx}/w")) + scale * np.einsum(
            "CBSKL,CKLH->CBSKH", np.einsum("BSD,CKDL->CBSKL", x, leaf(f"{att}/kv_einsum{sfx}/lora_a")), leaf(f"{att}/kv_einsum{sfx}/lora_b"))
        assert np.allclose(x @ lin["self_attn.k_proj"].T, kv[0].reshape(2, 5, -1), atol=1e-5)
        enc = rng.standard_normal((2, 5, 8, 16))
        o = np.einsum("BTNH,NHD->BTD", enc, leaf(f"{att}/attn_vec_einsum{sfx}/w")) + scale * np.einsum(
            "BTL,NLD->BTD", np.einsum("BTNH,NHL->BTL", enc, leaf(f"{att}/attn_vec_einsum{sfx}/lora_a")),
            leaf(f"{att}/attn_vec_einsum{sfx}/lora_b"))
        assert np.allclose(enc.reshape(2, 5, -1) @ lin["self_attn.o_proj"].T, o, atol=1e-5)
        gate = x @ leaf(f"{ffn}/gating_einsum")[0] + x @ leaf(f"{ffn}/gating_einsum_lora_a")[0] @ leaf(f"{ffn}/gating_einsum_lora_b")[0]
        assert np.allclose(x @ lin["mlp.gate_proj"].T, gate, atol=1e-5)
        h = rng.standard_normal((2, 5, mlp))
        down = h @ leaf(f"{ffn}/linear") + h @ leaf(f"{ffn}/linear_lora_a") @ leaf(f"{ffn}/linear_lora_b")
        assert np.allclose(h @ lin["mlp.down_proj"].T, down, atol=1e-5)


def test_convert_refuses_a_lora_rank_with_unknown_alpha(tmp_path, capsys):
    pytest.importorskip("orbax.checkpoint", reason="needs the [jax] extra (orbax-checkpoint)")
    from pi05_export.testing.orbax_ckpt import write_orbax_checkpoint

    jax = write_orbax_checkpoint(tmp_path / "jax", _jax_lora_params(rank_llm=8))
    before = snapshot(tmp_path)
    code = run(["convert", str(jax), "--out", str(tmp_path / "pt"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "LoRA rank 8 on PaliGemma/llm/layers/attn/attn_vec_einsum/w is not one of openpi's variants (gemma_2b_lora " \
           "rank 16 alpha 16, gemma_300m_lora rank 32 alpha 32), so its alpha is unknown" in err, err
    assert not (tmp_path / "pt").exists() and snapshot(tmp_path) == before


def test_convert_refuses_non_finite_leaves(tmp_path, capsys):
    pytest.importorskip("orbax.checkpoint", reason="needs the [jax] extra (orbax-checkpoint)")
    from pi05_export.config import Pi05Config
    from pi05_export.testing.orbax_ckpt import random_jax_params, write_orbax_checkpoint

    params = random_jax_params(Pi05Config.from_name("tiny"), seed=0)
    params["action_out_proj/bias"][2] = np.nan
    jax = write_orbax_checkpoint(tmp_path / "jax", params)
    before = snapshot(tmp_path)
    code = run(["convert", str(jax), "--out", str(tmp_path / "pt"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    assert "action_out_proj/bias -> action_out_proj.bias has 1 non-finite value(s) of 32 (1 NaN, 0 inf)" in err, err
    assert not (tmp_path / "pt").exists() and snapshot(tmp_path) == before


def test_finite_check_is_not_fooled_by_an_overflowing_sum():
    """The sum screen trips on large finite values (fp16 sum past 65504); the exact count then passes them."""
    from pi05_export.checkpoint.stored import check_finite

    big = torch.full((10,), 60000.0, dtype=torch.float16)
    assert check_finite("k", big) is big
    big[3] = float("-inf")
    with pytest.raises(CheckpointError, match=r"k has 1 non-finite value\(s\) of 10 \(0 NaN, 1 inf\)"):
        check_finite("k", big)
