"""The policy transforms against openpi's formulas (shared/reference/openpi_policy_serving_spec.md).

Every expected value here is derived by hand from the spec (sections 1.9, 3.3-3.5, 4.3, 5.2, 6):
literal numbers, or a few lines of numpy that restate the spec's formula independently of the
package. The functions under test are never used to produce an expected value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pi05_export.config import TINY
from pi05_export.errors import ConfigError, InputError
from pi05_export.policy import images as img_mod
from pi05_export.policy.normalize import (
    FeatureNorm,
    NormStats,
    load_lerobot_norm_stats,
    load_norm_stats,
    load_openpi_norm_stats,
)
from pi05_export.policy.policy import Policy, load_policy, postprocess, preprocess
from pi05_export.policy.profiles import load_profile
from pi05_export.policy.tokenizer import PromptTokenizer, check_vocab, clean_prompt, discretize_state, state_prompt
from pi05_export.testing.tiny_policy import tiny_tokenizer_bytes

CFG = TINY.replace(max_token_len=96)  # image_size 56, 3 views; room for ALOHA's 14-value state prompt
SIZE = CFG.vision.image_size
ROBOTS = ("libero", "droid", "aloha")

# ---------------------------------------------------------------------------------------------
# Hand restatements of the spec's formulas (independent of the package).
# ---------------------------------------------------------------------------------------------


def hand_bins(y) -> list[int]:
    """Spec 5.2: for finite x the bin is floor((x + 1) * 128) clamped to [-1, 255]."""
    return [int(min(255, max(-1, math.floor((float(v) + 1.0) * 128.0)))) for v in y]


def hand_quantile_norm(x, q01, q99):
    """Spec 4.3: y = (x - q01) / (q99 - q01 + 1e-6) * 2 - 1, float64, not clipped."""
    x, q01, q99 = (np.asarray(v, np.float64) for v in (x, q01, q99))
    return (x - q01) / (q99 - q01 + 1e-6) * 2 - 1


def hand_quantile_unnorm(y, q01, q99):
    """Spec 4.3: x = (y + 1) / 2 * (q99 - q01 + 1e-6) + q01 on the first d dims."""
    y, q01, q99 = (np.asarray(v, np.float64) for v in (y, q01, q99))
    return (y + 1) / 2 * (q99 - q01 + 1e-6) + q01


FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], np.float64)  # spec 3.5 step 1


def hand_aloha_gripper_in(v):
    """Spec 3.5 step 2: [0,1] -> linear [0.01844, 0.05800] -> radians (L 0.036, r 0.022) -> [0.5476, 1.6296] -> [0,1]."""
    x = v * (0.05800 - 0.01844) + 0.01844
    rad = np.arcsin(np.clip((0.022**2 + x**2 - 0.036**2) / (2 * 0.022 * x), -1.0, 1.0))
    return (rad - 0.5476) / (1.6296 - 0.5476)


def hand_aloha_state_in(state):
    s = np.asarray(state, np.float64) * FLIP
    s[6] = hand_aloha_gripper_in(s[6])
    s[13] = hand_aloha_gripper_in(s[13])
    return s


def hand_pixels(frame_hwc: np.ndarray, size: int) -> np.ndarray:
    """Spec 1.9 + 6: PIL bilinear to (int(w/ratio), int(h/ratio)), centred on black, x/255*2-1, HWC->CHW."""
    h, w = frame_hwc.shape[:2]
    if (h, w) == (size, size):
        canvas = frame_hwc
    else:
        ratio = max(w / size, h / size)
        nw, nh = int(w / ratio), int(h / ratio)
        content = np.asarray(Image.fromarray(np.ascontiguousarray(frame_hwc)).resize((nw, nh), Image.BILINEAR))
        canvas = np.zeros((size, size, 3), np.uint8)
        top, left = int((size - nh) / 2), int((size - nw) / 2)
        canvas[top : top + nh, left : left + nw] = content
    pix = canvas.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
    return pix.transpose(2, 0, 1)


def padded(ids: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.array(ids + [0] * (n - len(ids)))
    mask = np.array([True] * len(ids) + [False] * (n - len(ids)))
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny_tokenizer.model"
    path.write_bytes(tiny_tokenizer_bytes())
    return path


@pytest.fixture(scope="session")
def sp(sp_path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_path))


@pytest.fixture(scope="session")
def tok(sp_path):
    return PromptTokenizer(sp_path)


HF_WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "Task", ":", "pick", "up", "the", "fork", ",", "State",
            "128", "192", "255", "-", "1", ";", "\n", "Action"]


def _write_hf_tokenizer(path, words):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # words, runs of punctuation, and "\n" as its own token (so the newline is visible in the ids)
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    # a BOS-adding post-processor: the package must add BOS itself exactly once (no special tokens)
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    t.save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_path(tmp_path_factory):
    return _write_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tokenizer.json", HF_WORDS)


@pytest.fixture(scope="session")
def profiles():
    return {name: load_profile(name) for name in ROBOTS}


# Hand-picked quantiles per robot: state dims = profile.state_dim, action dims = profile.action_dim.
def _stats(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    d_state = {"libero": 8, "droid": 8, "aloha": 14}[name]
    d_act = {"libero": 7, "droid": 8, "aloha": 14}[name]
    s_q01 = -1.0 - 0.25 * np.arange(d_state)
    s_q99 = 1.0 + 0.5 * np.arange(d_state)
    a_q01 = -2.0 + 0.125 * np.arange(d_act)
    a_q99 = 3.0 - 0.0625 * np.arange(d_act)
    return {"q01": s_q01, "q99": s_q99}, {"q01": a_q01, "q99": a_q99}


def make_norm(name: str) -> NormStats:
    s, a = _stats(name)
    return NormStats(state=FeatureNorm("openpi_quantile", s), actions=FeatureNorm("openpi_quantile", a), source="test")


def _frame(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_obs(name: str) -> dict:
    """A raw observation in the robot's keys, with different frame sizes and layouts per camera."""
    if name == "libero":
        return {"observation/image": _frame(480, 640, 1),
                "observation/wrist_image": np.ascontiguousarray(_frame(120, 160, 2).transpose(2, 0, 1)),  # CHW
                "observation/state": np.array([0.1, -0.2, 0.3, 0.05, -0.4, 0.6, 0.02, -0.02]),
                "prompt": "pick_up the fork"}
    if name == "droid":
        return {"observation/exterior_image_1_left": _frame(480, 640, 3),
                "observation/wrist_image_left": _frame(SIZE, SIZE, 4),  # already the model's size
                "observation/joint_position": np.array([0.3, -0.7, 0.1, -2.1, 0.05, 1.9, 0.8]),
                "observation/gripper_position": np.float64(0.35),  # 0-d: promoted to [1]
                "prompt": " pick up the fork\n"}
    assert name == "aloha"
    return {"images": {"cam_high": np.ascontiguousarray(_frame(480, 640, 5).transpose(2, 0, 1)),
                       "cam_low": np.ascontiguousarray(_frame(480, 640, 6).transpose(2, 0, 1)),
                       "cam_left_wrist": np.ascontiguousarray(_frame(240, 320, 7).transpose(2, 0, 1))},
            "state": np.array([0.1, -0.5, 0.9, 0.2, -0.3, 0.4, 0.3, -0.1, 0.6, -0.8, 0.05, 0.25, -0.15, 0.7]),
            "prompt": "uncap_the_pen"}


def run_pre(name, tok, obs=None, **kw):
    return preprocess(make_obs(name) if obs is None else obs, profile=load_profile(name), norm_stats=make_norm(name),
                      tokenizer=tok, config=CFG, **kw)


# =============================================================================================
# 1. Prompt strings (spec 5.2)
# =============================================================================================


@pytest.mark.parametrize(("raw", "cleaned"), [
    ("pick_up_the_fork", "pick up the fork"),
    ("  pick up the fork  ", "pick up the fork"),
    ("pick up\nthe fork", "pick up the fork"),
    ("\tpick\n\nup  ", "pick  up"),  # strip first, then each "\n" -> one space
    ("_pick_", " pick "),  # strip happens before "_" -> " ", so these spaces stay
    (" \nPick Up_The Fork\n ", "Pick Up The Fork"),  # no lower-casing
])
def test_clean_prompt(raw, cleaned):
    assert clean_prompt(raw) == cleaned


def test_discretize_state_spec_examples():
    values = [-1.5, -1.0, -0.99, 0.0, 0.5, 0.99, 0.9921875, 1.0, 1.7]
    bins = discretize_state(np.array(values))
    assert bins.tolist() == [-1, 0, 1, 128, 192, 254, 255, 255, 255]
    # the same numbers from the closed form: floor((x+1)*128) clamped to [-1, 255]
    assert hand_bins(values) == [-1, 0, 1, 128, 192, 254, 255, 255, 255]
    assert discretize_state(np.array([np.nan])).tolist() == [255]  # spec: NaN -> 255


def test_discretize_state_matches_closed_form_on_a_grid():
    edges = -1.0 + np.arange(256) / 128.0  # every left edge exactly, plus just below it and a grid
    xs = np.concatenate([edges, edges - 1e-9, np.linspace(-1.3, 1.3, 2001)])
    assert discretize_state(xs).tolist() == hand_bins(xs)


def test_state_prompt_exact_string():
    s = state_prompt("pick up the fork", np.array([0.0, 0.5, 1.0, -1.5]))
    assert s == "Task: pick up the fork, State: 128 192 255 -1;\nAction: "
    assert s.endswith("Action: ")
    # the task text is cleaned inside the wrapper
    assert state_prompt("  pick_up_the\nfork ", np.array([0.0, 0.5, 1.0, -1.5])) == s
    assert state_prompt("x", np.array([-0.99, 0.99])) == "Task: x, State: 1 254;\nAction: "


# =============================================================================================
# 2. Token ids (SentencePiece and a HF tokenizer.json)
# =============================================================================================


def test_sentencepiece_special_ids(tok, sp):
    assert (tok.bos_id, sp.bos_id(), sp.pad_id(), sp.eos_id()) == (2, 2, 0, 1)
    assert sp.encode("\n") == [sp.piece_to_id("\n")]


def test_state_form_ids(tok, sp):
    full = "Task: pick up the fork, State: 128 192 255 -1;\nAction: "
    expected = [2] + sp.encode(full)
    state = np.array([0.0, 0.5, 1.0, -1.5])
    assert tok.prompt_ids("pick_up the fork ", state) == expected
    assert expected != [2] + sp.encode(full[:-1])  # the trailing space is part of the encoded string
    tokens, mask, cut = tok.tokenize("pick_up the fork ", state, 64)
    want_t, want_m = padded(expected, 64)
    np.testing.assert_array_equal(tokens, want_t)
    np.testing.assert_array_equal(mask, want_m)
    assert cut == 0 and tokens.dtype.kind == "i" and mask.dtype == bool
    assert 1 not in tokens.tolist()  # no EOS


def test_no_state_form_ids(tok, sp):
    expected = [2] + sp.encode("pick up the fork") + sp.encode("\n")
    assert tok.prompt_ids("  pick_up_the_fork\n", None) == expected
    tokens, mask, cut = tok.tokenize("  pick_up_the_fork\n", None, 40)
    want_t, want_m = padded(expected, 40)
    np.testing.assert_array_equal(tokens, want_t)
    np.testing.assert_array_equal(mask, want_m)
    assert cut == 0


def test_truncation_cuts_and_warns(tok, sp, caplog):
    state = np.linspace(-0.9, 0.9, 14)
    full = f"Task: uncap the pen, State: {' '.join(map(str, hand_bins(state)))};\nAction: "
    ids = [2] + sp.encode(full)
    n = len(ids)
    max_len = 12
    assert n > max_len
    with caplog.at_level(logging.WARNING):
        tokens, mask, cut = tok.tokenize("uncap_the_pen", state, max_len)
    assert cut == n - max_len
    np.testing.assert_array_equal(tokens, np.array(ids[:max_len]))  # BOS stays, the tail is lost
    assert mask.all() and mask.shape == (max_len,)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"cut {n - max_len} token" in r.getMessage() for r in warnings), [r.getMessage() for r in warnings]

    # exactly max_len tokens: nothing cut, no warning, mask all True
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokens, mask, cut = tok.tokenize("uncap_the_pen", state, n)
    assert cut == 0 and mask.all() and tokens.tolist() == ids
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_hf_tokenizer_json(hf_path):
    t = PromptTokenizer(hf_path)
    assert t.bos_id == 2 and t.vocab_size == len(HF_WORDS)
    # Task : pick up the fork , State : 128 192 255 - 1 ; \n Action :   (BOS added once, by the package)
    assert t.prompt_ids("pick_up the fork", np.array([0.0, 0.5, 1.0, -1.5])) == [
        2, 4, 5, 6, 7, 8, 9, 10, 11, 5, 12, 13, 14, 15, 16, 17, 18, 19, 5]
    # no-state form: BOS + "pick up the fork" + "\n" (encoded separately); unknown words -> <unk> 3
    assert t.prompt_ids(" pick_up_the_fork ", None) == [2, 6, 7, 8, 9, 18]
    assert t.prompt_ids("pick up the spoon", None) == [2, 6, 7, 8, 3, 18]
    tokens, mask, cut = t.tokenize("pick up the fork", None, 8)
    assert tokens.tolist() == [2, 6, 7, 8, 9, 18, 0, 0] and mask.tolist() == [True] * 6 + [False] * 2 and cut == 0


def test_vocab_larger_than_model_is_refused(tok, hf_path):
    check_vocab(tok, 400)  # equal is fine
    with pytest.raises(ConfigError, match="400"):
        check_vocab(tok, 100)
    hf = PromptTokenizer(hf_path)
    check_vocab(hf, len(HF_WORDS))
    with pytest.raises(ConfigError):
        check_vocab(hf, len(HF_WORDS) - 1)


def test_policy_refuses_a_larger_vocab(tok):
    small = TINY.replace(llm=dataclasses.replace(TINY.llm, vocab_size=100))
    runner = SimpleNamespace(config=small, backend="stub", device="cpu", max_batch=1)
    with pytest.raises(ConfigError, match="100"):
        Policy(runner, load_profile("libero"), make_norm("libero"), tok)


def test_load_policy_refuses_a_larger_vocab(tmp_path, tiny_model):
    assert tiny_model.config.llm.vocab_size == 1024
    words = HF_WORDS[:4] + [f"w{i}" for i in range(1100)]
    path = _write_hf_tokenizer(tmp_path / "tokenizer.json", words)
    with pytest.raises(ConfigError, match="1104"):
        load_policy(None, robot="libero", model=tiny_model, tokenizer=path, norm_stats=make_norm("libero"))


# =============================================================================================
# 3. Images (spec 1.9, 6)
# =============================================================================================


def test_resize_480x640_to_224():
    frame = _frame(480, 640, 10)
    out = img_mod.resize_with_pad(frame, 224, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # ratio = max(640/224, 480/224) = 640/224 -> (224, 168); top = int((224-168)/2) = 28 -> rows 28..195
    assert not out[:28].any() and not out[196:].any()
    ref = np.asarray(Image.fromarray(frame).resize((224, 168), Image.BILINEAR))
    np.testing.assert_array_equal(out[28:196], ref)


def test_resize_same_size_is_same_object():
    frame = _frame(224, 224, 11)
    assert img_mod.resize_with_pad(frame, 224, 224) is frame


# (h, w) -> content (new_h, new_w) at (top, left), by hand:
#   101x37: ratio = max(37/224, 101/224) = 101/224 -> w' = int(37*224/101) = int(82.06) = 82, h' = 224;
#           left = int((224-82)/2) = 71
#   37x101: the transpose: h' = 82, w' = 224, top = 71
#   50x37:  ratio = 50/224 -> w' = int(37*224/50) = int(165.76) = 165; left = int(59/2) = 29 (odd column right)
#   30x200 -> 56: ratio = 200/56 -> h' = int(30*56/200) = int(8.4) = 8; top = int(48/2) = 24
@pytest.mark.parametrize(("h", "w", "size", "nh", "nw", "top", "left"), [
    (101, 37, 224, 224, 82, 0, 71),
    (37, 101, 224, 82, 224, 71, 0),
    (50, 37, 224, 224, 165, 0, 29),
    (30, 200, 56, 8, 56, 24, 0),
])
def test_resize_odd_sizes(h, w, size, nh, nw, top, left):
    frame = _frame(h, w, h * 1000 + w)
    out = img_mod.resize_with_pad(frame, size, size)
    assert out.shape == (size, size, 3)
    ref = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BILINEAR))
    np.testing.assert_array_equal(out[top : top + nh, left : left + nw], ref)
    outside = np.ones((size, size), bool)
    outside[top : top + nh, left : left + nw] = False
    assert not out[outside].any()

    # a constant colour stays exactly that colour inside the content region
    colour = np.array([200, 17, 93], np.uint8)
    const = np.broadcast_to(colour, (h, w, 3)).copy()
    out = img_mod.resize_with_pad(const, size, size)
    assert (out[top : top + nh, left : left + nw] == colour).all()
    assert not out[outside].any()


def test_parse_image_layouts():
    hwc = _frame(20, 30, 12)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    np.testing.assert_array_equal(img_mod.parse_image(hwc, "cam", "auto"), hwc)
    np.testing.assert_array_equal(img_mod.parse_image(chw, "cam", "auto"), hwc)  # shape[0] == 3 -> CHW
    np.testing.assert_array_equal(img_mod.parse_image(chw, "cam", "chw"), hwc)
    np.testing.assert_array_equal(img_mod.parse_image(hwc, "cam", "hwc"), hwc)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parse_image_float_truncates(dtype):
    values = np.array([0.0, 0.5, 0.999, 1.0, 0.25, 0.1], dtype)  # 255*x truncated: 0, 127, 254, 255, 63, 25
    frame = np.broadcast_to(values[:, None, None], (6, 4, 3)).copy()
    out = img_mod.parse_image(frame, "cam", "hwc")
    assert out.dtype == np.uint8
    assert out[:, 0, 0].tolist() == [0, 127, 254, 255, 63, 25]


def test_to_pixels():
    frame = np.zeros((2, 3, 3), np.uint8)
    frame[0, 0] = [0, 255, 128]
    frame[1, 2] = [255, 0, 1]
    out = img_mod.to_pixels(frame)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    f32 = np.float32
    mid = f32(128) / f32(255) * f32(2) - f32(1)
    one = f32(1) / f32(255) * f32(2) - f32(1)
    assert out[:, 0, 0].tolist() == [-1.0, 1.0, float(mid)]
    assert out[:, 1, 2].tolist() == [1.0, -1.0, float(one)]
    assert out[:, 0, 1].tolist() == [-1.0, -1.0, -1.0]


# =============================================================================================
# 4. Normalization (spec 4.3, 5.4)
# =============================================================================================


def test_openpi_quantile_normalize(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {
        "state": {"mean": [1, 0, 15], "std": [1, 1, 1], "q01": [0, -1, 10], "q99": [2, 1, 20]},
        "actions": {"mean": [0] * 7, "std": [1] * 7, "q01": [-1, -2, 0, 0, 0, 0, 0], "q99": [1, 2, 4, 1, 1, 1, 10]}}}))
    ns = load_openpi_norm_stats(path)
    assert ns.state.mode == "openpi_quantile"
    y = ns.state.normalize(np.array([1.0, 0.0, 15.0], np.float32))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, [(1 - 0) / (2 - 0 + 1e-6) * 2 - 1,
                                   (0 + 1) / (1 + 1 + 1e-6) * 2 - 1,
                                   (15 - 10) / (20 - 10 + 1e-6) * 2 - 1], rtol=0, atol=1e-15)
    # outside q01..q99: not clipped
    y = ns.state.normalize(np.array([-2.0, 3.0, 30.0]))
    np.testing.assert_allclose(y, [(-2) / 2.000001 * 2 - 1, 4 / 2.000001 * 2 - 1, 20 / 10.000001 * 2 - 1], rtol=0, atol=1e-14)
    assert y[0] < -1 and y[1] > 1 and y[2] > 1
    # load_norm_stats on the directory finds the same file
    np.testing.assert_array_equal(load_norm_stats(tmp_path).state.normalize(np.array([1.0, 0.0, 15.0])),
                                  ns.state.normalize(np.array([1.0, 0.0, 15.0])))

    # unnormalize a 32-wide vector with 7-dim stats: only the first 7 dims change
    yy = np.linspace(-1.5, 1.5, 32)
    x = ns.actions.unnormalize(yy)
    q01, q99 = np.array([-1, -2, 0, 0, 0, 0, 0.0]), np.array([1, 2, 4, 1, 1, 1, 10.0])
    np.testing.assert_allclose(x[:7], (yy[:7] + 1) / 2 * (q99 - q01 + 1e-6) + q01, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(x[7:], yy[7:])
    assert x.shape == (32,) and x.dtype == np.float64
    # [H, 32] the same per row
    x2 = ns.actions.unnormalize(np.stack([yy, -yy]).astype(np.float32))
    np.testing.assert_array_equal(x2[:, 7:], np.stack([yy, -yy]).astype(np.float32)[:, 7:].astype(np.float64))


def _write_lerobot(tmp_path, state_file="x.safetensors", eps=1e-8):
    from safetensors.numpy import save_file

    save_file({"observation.state.mean": np.array([1.0, 2.0, -0.5], np.float32),
               "observation.state.std": np.array([0.5, 2.0, 0.0], np.float32),
               "action.q01": np.array([0.0, -1.0, 5.0], np.float32),
               "action.q99": np.array([2.0, 1.0, 5.0], np.float32)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "normalizer_processor", "config": {
            "eps": eps, "norm_map": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "QUANTILES"},
            "features": {"observation.state": {"type": "STATE", "shape": [3]},
                         "action": {"type": "ACTION", "shape": [3]}}},
         "state_file": state_file}]}))


def test_lerobot_normalizer(tmp_path):
    _write_lerobot(tmp_path)
    ns = load_lerobot_norm_stats(tmp_path)
    assert load_norm_stats(tmp_path).state.mode == ns.state.mode == "mean_std"
    assert ns.actions.mode == "quantiles"
    # MEAN_STD: (x - mean) / (std + eps); a zero std gives (x - mean) / eps
    x = np.array([2.0, 0.0, -0.5 + 2**-30])  # 2**-30 keeps x - mean exact
    np.testing.assert_allclose(ns.state.normalize(x), [(2 - 1) / (0.5 + 1e-8), (0 - 2) / (2 + 1e-8), 2**-30 / 1e-8],
                               rtol=1e-9, atol=0)
    # lerobot's inverse: y * std + mean
    np.testing.assert_allclose(ns.state.unnormalize(np.array([2.0, -1.0, 3.0])), [2 * 0.5 + 1, -1 * 2 + 2, 3 * 0 - 0.5],
                               rtol=0, atol=1e-15)
    # QUANTILES: 2 (x - q01) / (q99 - q01) - 1, no 1e-6; a zero denominator replaced by eps
    a = np.array([1.5, 0.5, 5.0 + 2**-29])
    np.testing.assert_allclose(ns.actions.normalize(a), [2 * 1.5 / 2 - 1, 2 * 1.5 / 2 - 1, 2 * 2**-29 / 1e-8 - 1],
                               rtol=1e-9, atol=0)
    np.testing.assert_allclose(ns.actions.unnormalize(np.array([0.5, -1.0, 1.0])),
                               [(0.5 + 1) * 2 / 2 + 0, (-1 + 1) * 2 / 2 - 1, (1 + 1) * 1e-8 / 2 + 5], rtol=0, atol=1e-15)


def test_lerobot_state_file_outside_is_refused(tmp_path):
    inner = tmp_path / "policy"
    inner.mkdir()
    _write_lerobot(inner, state_file="../evil.safetensors")
    (tmp_path / "evil.safetensors").write_bytes((inner / "x.safetensors").read_bytes())  # exists, still refused
    with pytest.raises(InputError, match="evil.safetensors"):
        load_lerobot_norm_stats(inner)


# =============================================================================================
# 5. preprocess / postprocess per profile (spec 3.3-3.5)
# =============================================================================================


def _hand_state(name, obs):
    if name == "libero":
        return np.asarray(obs["observation/state"], np.float64)
    if name == "droid":
        return np.concatenate([obs["observation/joint_position"], [float(obs["observation/gripper_position"])]])
    return hand_aloha_state_in(obs["state"])


def _hand_frames(name, obs):
    """The robot's frames per slot in HWC (None = no frame: black, mask False)."""
    if name == "libero":
        return [obs["observation/image"], obs["observation/wrist_image"].transpose(1, 2, 0), None]
    if name == "droid":
        return [obs["observation/exterior_image_1_left"], obs["observation/wrist_image_left"], None]
    ims = obs["images"]
    return [ims["cam_high"].transpose(1, 2, 0), ims["cam_left_wrist"].transpose(1, 2, 0), None]


@pytest.mark.parametrize("name", ROBOTS)
def test_preprocess(name, tok, sp):
    obs = make_obs(name)
    inp = run_pre(name, tok, obs)
    # cameras -> slots
    assert inp.images.shape == (3, 3, SIZE, SIZE) and inp.images.dtype == np.float32
    frames = _hand_frames(name, obs)
    assert inp.image_mask.tolist() == [f is not None for f in frames] == [True, True, False]
    for i, f in enumerate(frames):
        if f is None:
            assert (inp.images[i] == -1.0).all()
        else:
            np.testing.assert_array_equal(inp.images[i], hand_pixels(f, SIZE))
    # state: model space, then quantile-normalized (float64)
    state = _hand_state(name, obs)
    s_stats, _ = _stats(name)
    np.testing.assert_allclose(inp.state, state, rtol=0, atol=1e-15)
    state_norm = hand_quantile_norm(state, s_stats["q01"], s_stats["q99"])
    np.testing.assert_allclose(inp.state_norm, state_norm, rtol=0, atol=1e-15)
    # tokens: the exact prompt of spec 5.2
    if name == "libero":
        expected = [2] + sp.encode("pick up the fork") + sp.encode("\n")
    else:
        text = {"droid": "pick up the fork", "aloha": "uncap the pen"}[name]
        bins = hand_bins(state_norm)
        assert len(bins) == {"droid": 8, "aloha": 14}[name]  # raw dimension, not 32
        expected = [2] + sp.encode(f"Task: {text}, State: {' '.join(map(str, bins))};\nAction: ")
    want_t, want_m = padded(expected, CFG.max_token_len)
    np.testing.assert_array_equal(inp.tokens, want_t)
    np.testing.assert_array_equal(inp.token_mask, want_m)
    assert inp.tokens_cut == 0


@pytest.mark.parametrize(("h", "w"), [(101, 37), (37, 101), (50, 37), (120, 160), (SIZE, SIZE)])
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_preprocess_chw_and_hwc_frames_agree(h, w, kind, tok):
    """A CHW frame (layout auto, shape[0] == 3) gives the same pixels as its HWC transpose, both equal to
    PIL's RGB bilinear resize + centred black padding; float frames are truncated 255*x first."""
    if kind == "uint8":
        hwc_in = _frame(h, w, 7 * h + w)
        hwc_u8 = hwc_in
    else:
        hwc_in = np.random.default_rng(h + w).uniform(0.0, 1.0, (h, w, 3))
        hwc_u8 = np.floor(255 * hwc_in).astype(np.uint8)  # spec 1.9: truncation (255*x >= 0 here)
    chw_in = np.ascontiguousarray(hwc_in.transpose(2, 0, 1))
    want = hand_pixels(hwc_u8, SIZE)
    for frame in (hwc_in, chw_in):
        inp = run_pre("libero", tok, dict(make_obs("libero"), **{"observation/wrist_image": frame}))
        np.testing.assert_array_equal(inp.images[1], want)
    # ALOHA always reads CHW
    obs = make_obs("aloha")
    inp = run_pre("aloha", tok, dict(obs, images={"cam_high": chw_in}))
    np.testing.assert_array_equal(inp.images[0], want)


def test_droid_gripper_shapes_agree(tok):
    obs0 = make_obs("droid")
    obs1 = dict(obs0, **{"observation/gripper_position": np.array([0.35])})
    a, b = run_pre("droid", tok, obs0), run_pre("droid", tok, obs1)
    assert a.state.shape == (8,) and a.state[7] == 0.35
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.state_norm, b.state_norm)


def test_aloha_cameras(tok):
    obs = make_obs("aloha")
    full = run_pre("aloha", tok, obs)
    # cam_low is accepted and ignored: other cam_low content (or none) changes nothing
    other_low = dict(obs, images=dict(obs["images"], cam_low=np.zeros((3, 10, 10), np.uint8)))
    no_low = dict(obs, images={k: v for k, v in obs["images"].items() if k != "cam_low"})
    for o in (other_low, no_low):
        inp = run_pre("aloha", tok, o)
        np.testing.assert_array_equal(inp.images, full.images)
        assert inp.image_mask.tolist() == [True, True, False]
    # only cam_high: both wrist slots black and masked
    only_high = dict(obs, images={"cam_high": obs["images"]["cam_high"]})
    inp = run_pre("aloha", tok, only_high)
    assert inp.image_mask.tolist() == [True, False, False]
    assert (inp.images[1:] == -1.0).all()
    # the right wrist alone goes to the third slot
    right = dict(obs, images={"cam_high": obs["images"]["cam_high"], "cam_right_wrist": obs["images"]["cam_left_wrist"]})
    inp = run_pre("aloha", tok, right)
    assert inp.image_mask.tolist() == [True, False, True]
    np.testing.assert_array_equal(inp.images[2], full.images[1])
    # an unknown camera name is rejected, naming it
    bad = dict(obs, images=dict(obs["images"], cam_top=obs["images"]["cam_high"]))
    with pytest.raises(InputError, match="cam_top"):
        run_pre("aloha", tok, bad)


def _model_actions(seed=0):
    return np.random.default_rng(seed).uniform(-1.2, 1.2, (CFG.action_horizon, CFG.action_dim)).astype(np.float32)


@pytest.mark.parametrize(("name", "dims"), [("libero", 7), ("droid", 8)])
def test_postprocess_slices_after_unnormalizing(name, dims, tok):
    inp = run_pre(name, tok)
    actions = _model_actions()
    out = postprocess(actions, inp, profile=load_profile(name), norm_stats=make_norm(name))
    _, a = _stats(name)
    expected = hand_quantile_unnorm(actions[:, :dims].astype(np.float64), a["q01"][:dims], a["q99"][:dims])
    assert out.shape == (CFG.action_horizon, dims) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_postprocess_aloha(tok):
    obs = make_obs("aloha")
    inp = run_pre("aloha", tok, obs)
    actions = _model_actions(1)
    out = postprocess(actions, inp, profile=load_profile("aloha"), norm_stats=make_norm("aloha"))
    _, a = _stats("aloha")
    # 1. un-normalize the first 14 dims
    un = hand_quantile_unnorm(actions[:, :14].astype(np.float64), a["q01"], a["q99"])
    # 2. AbsoluteActions, mask (6, -1, 6, -1): joints += Pi-space state, grippers (6, 13) absolute
    pi_state = hand_aloha_state_in(obs["state"])
    for d in list(range(0, 6)) + list(range(7, 13)):
        un[:, d] += pi_state[d]
    # 3. AlohaOutputs: flip joints, grippers from angular
    exp = un * FLIP
    for g in (6, 13):
        exp[:, g] = ((exp[:, g] + 0.5476) - (-0.6213)) / (1.4910 - (-0.6213))
    assert out.shape == (CFG.action_horizon, 14) and out.dtype == np.float64
    # openpi carries the normalized state through float32, so allow ~1e-6
    np.testing.assert_allclose(out, exp, rtol=0, atol=1e-6)

    # tighter: restate the float32 carry itself (spec 4.4: the JAX path casts the normalized state to
    # float32; Unnormalize maps it back with float64 stats before AbsoluteActions)
    s, _ = _stats("aloha")
    carried = hand_quantile_norm(pi_state, s["q01"], s["q99"]).astype(np.float32).astype(np.float64)
    state_back = hand_quantile_unnorm(carried, s["q01"], s["q99"])
    un = hand_quantile_unnorm(actions[:, :14].astype(np.float64), a["q01"], a["q99"])
    for d in list(range(0, 6)) + list(range(7, 13)):
        un[:, d] += state_back[d]
    exp32 = un * FLIP
    for g in (6, 13):
        exp32[:, g] = ((exp32[:, g] + 0.5476) - (-0.6213)) / (1.4910 - (-0.6213))
    np.testing.assert_allclose(out, exp32, rtol=0, atol=1e-12)
    # the grippers did not get the state added
    assert abs(pi_state[6]) > 1e-3 and abs(pi_state[13]) > 1e-3


def test_aloha_gripper_formula_values():
    """Spot values of the spec 3.5 gripper chain, computed by hand in the comments."""
    # v = 1: x = 0.058; (0.022^2 + 0.058^2 - 0.036^2) / (2*0.022*0.058) = (0.000484+0.003364-0.001296)/0.002552
    #      = 0.002552/0.002552 = 1 -> asin(1) = pi/2 -> (pi/2 - 0.5476)/1.082
    state = np.zeros(14)
    state[6], state[13] = 1.0, 1.0
    inp_state = hand_aloha_state_in(state)
    assert inp_state[6] == pytest.approx((math.pi / 2 - 0.5476) / 1.082, abs=1e-7)
    from pi05_export.policy.profiles import aloha_state_in

    np.testing.assert_allclose(aloha_state_in(state)[[6, 13]], [(math.pi / 2 - 0.5476) / 1.082] * 2, rtol=0, atol=1e-7)


# =============================================================================================
# 6. Bad input
# =============================================================================================


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


def _err(name, tok, obs) -> str:
    with pytest.raises(InputError) as info:
        run_pre(name, tok, obs)
    return str(info.value)


@pytest.mark.parametrize(("name", "key"), [
    ("libero", "observation/image"), ("libero", "observation/wrist_image"), ("libero", "observation/state"),
    ("droid", "observation/gripper_position"), ("droid", "observation/exterior_image_1_left"),
    ("aloha", "state"),
])
def test_missing_key_names_it_and_lists_expected(name, key, tok):
    msg = _err(name, tok, _drop(make_obs(name), key))
    assert f"'{key}'" in msg
    expected = {"libero": ["observation/image", "observation/wrist_image", "observation/state", "prompt"],
                "droid": ["observation/exterior_image_1_left", "observation/wrist_image_left",
                          "observation/joint_position", "observation/gripper_position", "prompt"],
                "aloha": ["images.cam_high", "images.cam_left_wrist", "images.cam_right_wrist", "state", "prompt"]}[name]
    for k in expected:
        assert k in msg, (k, msg)


@pytest.mark.parametrize("prompt", [b"pick_up the fork", np.asarray("pick_up the fork"), " pick up the fork "])
def test_prompt_forms(prompt, tok, sp):
    """bytes are decoded as UTF-8 (DroidInputs), a 0-d string array is unwrapped (InjectDefaultPrompt)."""
    inp = run_pre("libero", tok, dict(make_obs("libero"), prompt=prompt))
    want_t, _ = padded([2] + sp.encode("pick up the fork") + sp.encode("\n"), CFG.max_token_len)
    np.testing.assert_array_equal(inp.tokens, want_t)


def test_missing_aloha_cam_high_and_prompt(tok):
    obs = make_obs("aloha")
    assert "images.cam_high" in _err("aloha", tok, dict(obs, images=_drop(obs["images"], "cam_high")))
    assert "prompt" in _err("libero", tok, _drop(make_obs("libero"), "prompt"))
    # a default prompt fills in
    inp = run_pre("libero", tok, _drop(make_obs("libero"), "prompt"), default_prompt="pick up the fork")
    assert inp.prompt == "pick up the fork"


@pytest.mark.parametrize(("bad", "words"), [
    (np.zeros((480, 640), np.uint8), ["shape"]),
    (np.zeros((1, 480, 640, 3), np.uint8), ["shape"]),
    (np.zeros((48, 64, 3), np.int16), ["int16"]),
    (np.full((48, 64, 3), np.nan), ["NaN"]),
    (np.full((48, 64, 3), 1.5), ["outside"]),
    (np.full((48, 64, 3), -0.1, np.float32), ["outside"]),
    (np.zeros((48, 64, 4), np.uint8), ["shape"]),
    ([[0, 1, 2]], ["list"]),
])
def test_bad_image_names_the_camera(bad, words, tok):
    obs = dict(make_obs("libero"), **{"observation/wrist_image": bad})
    msg = _err("libero", tok, obs)
    assert "observation/wrist_image" in msg
    for w in words:
        assert w in msg, msg


def test_aloha_hwc_frame_is_refused(tok):
    """ALOHA always reads CHW; an HWC frame cannot be read and names the camera."""
    obs = make_obs("aloha")
    obs = dict(obs, images=dict(obs["images"], cam_left_wrist=_frame(240, 320, 0)))
    assert "images.cam_left_wrist" in _err("aloha", tok, obs)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_refused(value, tok):
    state = make_obs("libero")["observation/state"].copy()
    state[3] = value
    msg = _err("libero", tok, dict(make_obs("libero"), **{"observation/state": state}))
    assert "observation/state" in msg and "NaN/inf" in msg
    obs = make_obs("droid")
    obs["observation/gripper_position"] = np.float64(value)
    assert "NaN/inf" in _err("droid", tok, obs)


@pytest.mark.parametrize(("name", "key", "value", "n", "want"), [
    ("libero", "observation/state", np.zeros(7), 7, 8),
    ("libero", "observation/state", np.zeros(9), 9, 8),
    ("droid", "observation/joint_position", np.zeros(6), 7, 8),
    ("aloha", "state", np.full(16, 0.5), 16, 14),
])
def test_wrong_state_length(name, key, value, n, want, tok):
    msg = _err(name, tok, dict(make_obs(name), **{key: value}))
    assert f"state has {n} values" in msg and str(want) in msg


def test_state_of_wrong_rank_or_type(tok):
    assert "observation/joint_position" in _err("droid", tok, dict(make_obs("droid"), **{
        "observation/joint_position": np.zeros((1, 7))}))
    assert "observation/state" in _err("libero", tok, dict(make_obs("libero"), **{
        "observation/state": np.array(["a"] * 8)}))


def test_unknown_robot_lists_known():
    with pytest.raises(ConfigError) as info:
        load_profile("ur5")
    msg = str(info.value)
    assert "ur5" in msg
    for name in ROBOTS:
        assert name in msg


USER_YAML = """\
name: onecam
description: one fixed camera, a 6-dof arm
action_dim: 6
state_dim: 6
state_in_prompt: true
cameras:
  - {slot: base_0_rgb, key: observation/cam}
  - {slot: left_wrist_0_rgb}
  - {slot: right_wrist_0_rgb}
state: [observation/joints]
"""


def test_user_yaml_unknown_field_refused(tmp_path):
    path = tmp_path / "robot.yaml"
    path.write_text(USER_YAML + "wheels: 4\n")
    with pytest.raises(ConfigError, match="wheels"):
        load_profile(path)
    path.write_text(USER_YAML.replace("{slot: base_0_rgb, key: observation/cam}",
                                      "{slot: base_0_rgb, key: observation/cam, fps: 30}"))
    with pytest.raises(ConfigError, match="cameras"):
        load_profile(path)
    path.write_text(USER_YAML.replace("{slot: left_wrist_0_rgb}", "{slot: right_wrist_0_rgb}", 1))  # slots out of order
    with pytest.raises(ConfigError, match="slots"):
        load_profile(path)


def test_user_yaml_profile_works(tmp_path, tok, sp):
    path = tmp_path / "onecam.yaml"
    path.write_text(USER_YAML)
    profile = load_profile(path)
    assert profile.name == "onecam" and profile.action_dim == 6
    frame = _frame(300, 400, 21)
    joints = np.array([0.5, -0.25, 0.0, 1.0, 2.0, -1.0])
    q01, q99 = np.full(6, -1.0), np.full(6, 1.0)
    stats = NormStats(state=FeatureNorm("openpi_quantile", {"q01": q01, "q99": q99}),
                      actions=FeatureNorm("openpi_quantile", {"q01": np.zeros(6), "q99": np.full(6, 4.0)}), source="test")
    obs = {"observation/cam": frame, "observation/joints": joints, "prompt": "stack_the blocks"}
    inp = preprocess(obs, profile=profile, norm_stats=stats, tokenizer=tok, config=CFG)
    assert inp.image_mask.tolist() == [True, False, False]
    np.testing.assert_array_equal(inp.images[0], hand_pixels(frame, SIZE))
    assert (inp.images[1:] == -1.0).all()
    state_norm = hand_quantile_norm(joints, q01, q99)
    expected = [2] + sp.encode(f"Task: stack the blocks, State: {' '.join(map(str, hand_bins(state_norm)))};\nAction: ")
    want_t, want_m = padded(expected, CFG.max_token_len)
    np.testing.assert_array_equal(inp.tokens, want_t)
    np.testing.assert_array_equal(inp.token_mask, want_m)
    actions = _model_actions(2)
    out = postprocess(actions, inp, profile=profile, norm_stats=stats)
    np.testing.assert_allclose(out, hand_quantile_unnorm(actions[:, :6].astype(np.float64), np.zeros(6), np.full(6, 4.0)),
                               rtol=0, atol=1e-12)
    # a missing camera names the key
    with pytest.raises(InputError, match="observation/cam"):
        preprocess(_drop(obs, "observation/cam"), profile=profile, norm_stats=stats, tokenizer=tok, config=CFG)


def test_review_regressions(tmp_path):
    """Profile field types, sendable metadata, lerobot stats through a hub-style symlink, tiny frames."""
    from pathlib import Path

    import yaml
    from safetensors.numpy import save_file

    from pi05_export.errors import ConfigError, InputError
    from pi05_export.policy.images import camera_pixels
    from pi05_export.policy.normalize import load_lerobot_norm_stats
    from pi05_export.policy.profiles import profile_from_dict

    base = yaml.safe_load((Path(__file__).parents[1] / "pi05_export/policy/robots/libero.yaml").read_text())
    with pytest.raises(ConfigError, match="state_in_prompt must be a boolean"):
        profile_from_dict({**base, "state_in_prompt": "false"}, "t.yaml")
    import datetime

    with pytest.raises(ConfigError, match="metadata cannot be sent"):
        profile_from_dict({**base, "metadata": {"when": datetime.date(2024, 1, 1)}}, "t.yaml")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"observation.state.mean": np.zeros(2, np.float32), "observation.state.std": np.ones(2, np.float32)},
              str(blobs / "abc"))
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "stats.safetensors").symlink_to(blobs / "abc")
    (snap / "policy_preprocessor.json").write_text(json.dumps({"steps": [{"registry_name": "normalizer_processor",
        "config": {"eps": 1e-8, "norm_map": {"STATE": "MEAN_STD", "ACTION": "IDENTITY"}}, "state_file": "stats.safetensors"}]}))
    stats = load_lerobot_norm_stats(snap)
    assert stats.state is not None and stats.actions is None
    with pytest.raises(InputError, match="too narrow"):
        camera_pixels(np.zeros((1, 1000, 3), np.uint8), "cam", "hwc", 56)
