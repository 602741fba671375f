"""Issue 14, kind 5: bad values are refused before they reach the math.

Each case builds a small input here (an observation .npz, a config, a recipe or profile YAML), runs the
real command, and checks exit code 2, exactly one ``error: ... (hint: ...)`` line naming the problem,
and (by snapshot of the parent directory) that nothing was written, ``--out`` included.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pi05_export.config import Pi05Config
from pi05_export.observation import random_observation, save_npz
from tests.cli_checks import assert_refused

TINY = Pi05Config.from_name("tiny")


def _refused(capsys, root: Path, argv: list[str], fragment: str) -> str:
    err = assert_refused(capsys, root, ["-q", *argv], fragment)
    assert "(hint: " in err, err
    return err


def _set(name, fn):
    def mutate(a):
        a[name] = fn(a[name])
    return mutate


def _noise_at(value):
    def mutate(a):
        a["noise"][0, 3, 5] = value
    return mutate


def _mask_off(name, sample):
    def mutate(a):
        a[name][sample] = False
    return mutate


# name -> (mutation of a valid batch-2 observation, fragment of the one-line error)
OBSERVATIONS = {
    "noise_nan": (_noise_at(np.nan), "'noise' has 1 NaN/inf value(s) (first at index [0, 3, 5])"),
    "noise_inf": (_noise_at(np.inf), "'noise' has 1 NaN/inf value(s)"),
    "images_nan": (_set("images", lambda x: np.where(x > 0.9, np.nan, x).astype(np.float32)), "'images' has"),
    "token_mask_all_false": (_mask_off("token_mask", 1), "'token_mask' is all False for sample 1 (no prompt token"),
    "image_mask_all_false": (_mask_off("image_mask", 0), "'image_mask' is all False for sample 0 (no camera"),
    "batch_of_0": (lambda a: a.update({k: v[:0] for k, v in a.items()}), "'images' holds a batch of 0 observations"),
    "uint8_images": (_set("images", lambda x: ((x + 1) * 127.5).astype(np.uint8)),
                     "'images' is uint8 [2, 3, 3, 56, 56] (uint8 pixels)"),
    "hwc_images": (_set("images", lambda x: x.transpose(0, 1, 3, 4, 2).copy()), "(HWC frames)"),
    "images_without_batch_axis": (lambda a: a.update({k: v[:1] for k, v in a.items()}, images=a["images"][0]),
                                  "'images' is float32 [3, 3, 56, 56] (no batch axis)"),
    "raw_camera_frames": (_set("images", lambda x: np.zeros((3, 56, 56, 3), np.uint8)),
                          "(uint8 pixels, no batch axis, HWC frames)"),
    "float64_images": (_set("images", lambda x: x.astype(np.float64)), "'images' is float64"),
    "tokens_without_batch_axis": (lambda a: a.update({k: v[:1] for k, v in a.items()}, tokens=a["tokens"][0]),
                                  "'tokens' has shape [16], expected [1, 16]: the batch axis is missing"),
    "batches_disagree": (_set("token_mask", lambda x: x[:1]), "'token_mask' has shape [1, 16], expected [2, 16]"),
    "int_mask": (_set("image_mask", lambda x: x.astype(np.uint8)), "'image_mask' has dtype uint8, expected bool"),
}


@pytest.mark.parametrize("case", sorted(OBSERVATIONS))
def test_bad_observation_is_one_line(tmp_path, capsys, case):
    mutate, fragment = OBSERVATIONS[case]
    arrays = random_observation(TINY, batch=2, seed=0).arrays()
    mutate(arrays)
    save_npz(tmp_path / "obs.npz", arrays)
    _refused(capsys, tmp_path, ["infer", "--preset", "tiny", "--random-init", "--inputs", str(tmp_path / "obs.npz"),
                                "--out", str(tmp_path / "out" / "actions.npz")], fragment)


def test_uint8_hint_is_the_whole_fix(tmp_path, capsys):
    """Applying the hint's expressions, in order, to raw camera frames gives a file `infer` accepts."""
    arrays = random_observation(TINY, batch=1, seed=0).arrays()
    frames = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)  # [V, H, W, C], no batch
    save_npz(tmp_path / "obs.npz", {**arrays, "images": frames})
    err = _refused(capsys, tmp_path, ["infer", "--preset", "tiny", "--random-init", "--inputs", str(tmp_path / "obs.npz"),
                                      "--out", str(tmp_path / "a.npz")], "uint8 pixels")
    hint = err.split("(hint: ", 1)[1].rsplit(", then save)", 1)[0]
    images = frames
    for step in hint.split("; "):
        images = eval(step.split(" = ", 1)[1], {"np": np, "images": images})  # the hint's own expressions
    save_npz(tmp_path / "obs.npz", {**arrays, "images": images})
    from pi05_export.cli import run

    assert run(["-q", "infer", "--preset", "tiny", "--random-init", "--inputs", str(tmp_path / "obs.npz"),
                "--out", str(tmp_path / "a.npz"), "--steps", "1"]) == 0
    assert images.dtype == np.float32
    assert np.array_equal(images, (frames.astype(np.float32) / 255 * 2 - 1).transpose(0, 3, 1, 2)[None])


def _npz_with_header(shape: tuple[int, ...]) -> bytes:
    """A few-hundred-byte .npz whose 'images' header claims ``shape`` float32 (what a zip bomb inflates to)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", header.getvalue() + b"\0" * 64)
    return buf.getvalue()


def test_npz_bomb_is_refused_from_its_headers(tmp_path, capsys):
    (tmp_path / "obs.npz").write_bytes(_npz_with_header((64, 3, 3, 224, 224 * 100)))
    assert (tmp_path / "obs.npz").stat().st_size < 1000
    _refused(capsys, tmp_path, ["infer", "--preset", "tiny", "--random-init", "--inputs", str(tmp_path / "obs.npz"),
                                "--out", str(tmp_path / "a.npz")], "GiB once decompressed, over the 2.0 GiB limit")


def test_real_zip_bomb_is_refused_before_inflating(tmp_path):
    """A deflated member of 512 MiB of zeros (0.5 MB on disk) over a 64 MiB limit: refused, nothing inflated."""
    import tracemalloc

    from pi05_export.errors import InputError
    from pi05_export.observation import load_npz

    path = tmp_path / "bomb.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**27,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, z.open("noise.npy", "w", force_zip64=True) as f:
        f.write(header.getvalue())
        zeros = bytes(1 << 24)
        for _ in range(32):
            f.write(zeros)
    assert path.stat().st_size < 4 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="0.5 GiB once decompressed, over the 0.1 GiB limit"):
            load_npz(path, max_bytes=64 * 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


@pytest.mark.parametrize("argv_tail,fragment", [
    (["validate", "{export}", "--batch", "100000000"], "--batch 100000000 needs about"),
    (["bench", "--preset", "tiny", "--random-init", "--device", "cpu", "--backend", "torch", "--steps", "1", "--batch",
      "100000000"], "--batch 100000000 needs about"),
])
def test_batch_beyond_memory_is_refused_before_allocating(tmp_path, capsys, small_export, argv_tail, fragment):
    argv = [a.replace("{export}", str(small_export)) for a in argv_tail]
    err = _refused(capsys, small_export.parent, argv, fragment)
    assert "GiB is available" in err


# name -> (config file text, fragment)
CONFIGS = {
    "string_for_int": ('{"action_dim": "32"}', "config field action_dim must be a positive integer, got '32' (str)"),
    "bool_for_int": ('{"num_steps": true}', "config field num_steps must be a positive integer, got True (bool)"),
    "float_for_int": ('{"action_horizon": 1.5}', "config field action_horizon must be a positive integer, got 1.5"),
    "empty_list_for_int": ('{"expert": {"width": 48, "depth": [], "mlp_dim": 96}}',
                           "config field expert.depth must be a positive integer, got [] (list)"),
    "string_for_float": ('{"vision": {"eps": "tiny"}}', "config field vision.eps must be a positive number, got 'tiny'"),
    "nan_for_float": ('llm: {width: 64, depth: 2, mlp_dim: 128, vocab_size: 1024, rope_theta: .nan}',
                      "config field llm.rope_theta must be a positive number, got nan"),
    "list_instead_of_mapping": ('[{"action_dim": 32}]', "config must be a mapping, got list"),
    "list_for_sub_config": ('{"vision": []}', "config 'vision' must be a mapping or a variant name, got [] (list)"),
    "negative": ('{"num_views": -3}', "config field num_views must be a positive integer, got -3"),
    "alias_bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "alias *a is not accepted"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_malformed_config_value_is_one_line(tmp_path, capsys, case):
    text, fragment = CONFIGS[case]
    (tmp_path / "cfg.yaml").write_text(text)
    _refused(capsys, tmp_path, ["onnx", "--config", str(tmp_path / "cfg.yaml"), "--random-init",
                                "--out", str(tmp_path / "out")], fragment)


def test_yaml_floats_and_json_floats_read_as_numbers(tmp_path):
    """`eps: 1e-6` is a number in YAML 1.2 (PyYAML alone reads a string), and a JSON config stays JSON."""
    (tmp_path / "a.yaml").write_text("vision: {width: 32, depth: 2, mlp_dim: 64, num_heads: 4, image_size: 56, eps: 1e-5}\n")
    assert Pi05Config.from_file(tmp_path / "a.yaml").vision.eps == 1e-5
    (tmp_path / "b.json").write_text(TINY.to_json())
    assert Pi05Config.from_file(tmp_path / "b.json") == TINY


@pytest.mark.parametrize("field,value,fragment", [
    ("chunk_size", "50", "config field chunk_size must be a positive integer, got '50' (str)"),
    ("image_resolution", [], "config field image_resolution must be a positive integer, got []"),
    ("tokenizer_max_length", None, "config field tokenizer_max_length must be a positive integer, got None"),
])
def test_checkpoint_config_json_field_types(tiny_model, tmp_path, capsys, field, value, fragment):
    from pi05_export.checkpoint import save_checkpoint

    save_checkpoint(tiny_model, tmp_path / "ck", "lerobot")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg.pop("pi05_export")  # lerobot's own fields only
    cfg[field] = value
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, tmp_path, ["info", str(tmp_path / "ck")], fragment)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b]\n"


@pytest.mark.parametrize("kind", ["recipe", "robot_profile", "merge_key"])
def test_yaml_aliases_refused_for_recipes_and_profiles(tmp_path, capsys, kind):
    if kind == "recipe":
        (tmp_path / "r.yaml").write_text(BOMB)
        argv = ["quantize", "--preset", "tiny", "--random-init", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]
        fragment = "recipe"
    else:
        text = BOMB if kind == "robot_profile" else "base: &base {name: arm, action_dim: 7}\nrobot:\n  <<: *base\n"
        (tmp_path / "p.yaml").write_text(text)
        argv = ["infer", "--robot", str(tmp_path / "p.yaml"), "--preset", "tiny", "--random-init",
                "--inputs", str(tmp_path / "obs.npz"), "--out", str(tmp_path / "a.npz")]
        fragment = "robot profile"
    err = _refused(capsys, tmp_path, argv, "is not accepted")
    assert fragment in err and "anchors and aliases are refused" in err


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """A projections-only tiny export (seconds): enough for `validate` to reach its observation."""
    from pi05_export.checkpoint import random_model
    from pi05_export.export import export_onnx

    out = tmp_path_factory.mktemp("values") / "out"
    source = {"kind": "random", "preset": "tiny", "config_file": None, "seed": 0}
    export_onnx(random_model("tiny", seed=0), out, source=source, components="projections")
    return out


def test_validate_refuses_nan_noise_instead_of_blaming_the_graphs(tmp_path, capsys, small_export):
    arrays = random_observation(TINY, batch=1, seed=0).arrays()
    arrays["noise"][0, 0, 0] = np.nan
    save_npz(small_export.parent / "obs.npz", arrays)
    _refused(capsys, small_export.parent, ["validate", str(small_export), "--inputs", str(small_export.parent / "obs.npz")],
             "'noise' has 1 NaN/inf value(s)")
    assert not (small_export / "reports").exists()
