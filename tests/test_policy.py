"""The policy on a tiny checkpoint: robot-shaped actions on torch and ONNX Runtime that agree, fresh
seeded noise, the CLI's raw-observation mode and its one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from pi05_export.cli import run
from pi05_export.cli._app import app
from pi05_export.policy import load_policy
from pi05_export.testing.tiny_policy import example_observation
from tests.tolerances import BATCH_ORDER_ATOL, ONNX_FP32_ATOL

ROBOTS = ("libero", "droid", "aloha")
ROBOT_DIMS = {"libero": 7, "droid": 8, "aloha": 14}


@pytest.mark.parametrize("robot", ROBOTS)
def test_torch_and_onnxruntime_policies_agree(robot, tiny_policy_dir, tiny_policy_export):
    torch_policy = load_policy(tiny_policy_dir, robot=robot, device="cpu")
    ort_policy = load_policy(tiny_policy_export, robot=robot)
    assert ort_policy.runner.backend == "onnxruntime"
    obs = example_observation(robot, seed=3)
    noise = np.random.default_rng(7).standard_normal((10, 32), dtype=np.float32)
    a = torch_policy.infer(obs, noise=noise)
    b = ort_policy.infer(obs, noise=noise)
    h = torch_policy.config.action_horizon
    assert a["actions"].shape == b["actions"].shape == (h, ROBOT_DIMS[robot])
    assert a["actions"].dtype == np.float64  # openpi un-normalizes with float64 stats
    diff = np.abs(a["actions"] - b["actions"])
    assert diff.max() <= ONNX_FP32_ATOL, f"torch vs onnxruntime: max abs {diff.max():.3g}, mean abs {diff.mean():.3g}"
    assert set(a["policy_timing"]) >= {"infer_ms", "preprocess_ms", "postprocess_ms"}


def test_noise_is_fresh_per_call_and_seedable(tiny_policy_dir):
    obs = example_observation("libero")
    p1 = load_policy(tiny_policy_dir, robot="libero", device="cpu", seed=5)
    first, second = p1.infer(obs)["actions"], p1.infer(obs)["actions"]
    assert not np.allclose(first, second), "two calls reused the same noise"
    p2 = load_policy(tiny_policy_dir, robot="libero", device="cpu", seed=5)
    np.testing.assert_array_equal(p2.infer(obs)["actions"], first)


def test_batched_call_equals_single_calls(tiny_policy_dir):
    """Batching changes nothing beyond batch-order numerics: same noise, same actions."""
    policy = load_policy(tiny_policy_dir, robot="droid", device="cpu", max_batch=3)
    observations = [example_observation("droid", seed=s) for s in range(3)]
    noise = np.random.default_rng(1).standard_normal((3, 10, 32), dtype=np.float32)
    batched = policy.infer_batch(observations, noise)
    for obs, n, got in zip(observations, noise, batched, strict=True):
        single = policy.infer(obs, noise=n)["actions"]
        np.testing.assert_allclose(got["actions"], single, atol=BATCH_ORDER_ATOL, rtol=0)


def test_model_part_needs_only_model_arrays(tiny_policy_dir):
    """preprocess -> arrays in the observation contract -> the tensor-level runtime gives the same actions."""
    from pi05_export.checkpoint import load_checkpoint
    from pi05_export.infer import infer_actions
    from pi05_export.observation import Observation

    policy = load_policy(tiny_policy_dir, robot="libero", device="cpu")
    inp = policy.preprocess(example_observation("libero"))
    noise = np.zeros((1, 10, 32), np.float32)
    arrays = inp.model_arrays()
    model = load_checkpoint(tiny_policy_dir)[0]
    ref = infer_actions(Observation(**arrays, noise=noise), model=model)
    got, _ = policy.sample([inp], noise)
    np.testing.assert_allclose(got, ref, atol=BATCH_ORDER_ATOL, rtol=0)


@pytest.mark.parametrize("robot", ROBOTS)
def test_cli_infer_raw_observation(robot, tiny_policy_dir, tmp_path):
    out = tmp_path / "actions.npz"
    code = run(["infer", str(tiny_policy_dir), "--robot", robot, "--inputs", str(tiny_policy_dir / "examples" / f"{robot}.npz"),
                "--out", str(out), "--device", "cpu", "--prompt", "fold_the towel"])
    assert code == 0
    with np.load(out) as f:
        assert f["actions"].shape == (10, ROBOT_DIMS[robot])
        assert "fold the towel" in str(f["prompt"]) or str(f["prompt"]) == "fold_the towel"


def test_cli_infer_json_observation(tiny_policy_dir, tmp_path):
    import json

    obs = example_observation("libero")
    doc = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obs.items()}
    path = tmp_path / "obs.json"
    path.write_text(json.dumps(doc))
    assert run(["infer", str(tiny_policy_dir), "--robot", "libero", "--inputs", str(path), "--out", str(tmp_path / "a.npz"),
                "--device", "cpu"]) == 0


@pytest.mark.parametrize(
    ("mutate", "robot", "message"),
    [
        (lambda o: o.pop("observation/wrist_image"), "libero", "missing key 'observation/wrist_image' for robot libero"),
        (lambda o: o.__setitem__("observation/image", np.zeros((4, 4), np.uint8)), "libero", "camera 'observation/image' has shape"),
        (lambda o: o.__setitem__("observation/image", np.zeros((8, 8, 3), np.int32)), "libero", "camera 'observation/image' has dtype int32"),
        (lambda o: o["observation/joint_position"].__setitem__(0, np.nan), "droid", "NaN/inf"),
        (lambda o: o["state"].__setitem__(3, np.inf), "aloha", "NaN/inf"),
    ],
)
def test_cli_bad_observation_is_one_line_exit_2(mutate, robot, message, tiny_policy_dir, tmp_path, capsys):
    from pi05_export.testing.tiny_policy import flatten

    obs = example_observation(robot)
    mutate(obs)
    src = tmp_path / "obs.npz"
    np.savez(src, **flatten(obs))
    out = tmp_path / "a.npz"
    code = run(["infer", str(tiny_policy_dir), "--robot", robot, "--inputs", str(src), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_unknown_robot_lists_known(tiny_policy_dir, tmp_path, capsys):
    code = run(["infer", str(tiny_policy_dir), "--robot", "ur5", "--inputs", str(tiny_policy_dir / "examples" / "libero.npz"),
                "--out", str(tmp_path / "a.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown robot 'ur5'" in err and "aloha, droid, libero" in err


def test_missing_tokenizer_names_both_places(tiny_policy_dir, tmp_path, monkeypatch):
    import shutil

    from pi05_export.errors import InputError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_policy_dir, ckpt)
    (ckpt / "assets" / "paligemma_tokenizer.model").unlink()
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "cache"))
    with pytest.raises(InputError) as e:
        load_policy(ckpt, robot="libero", device="cpu")
    assert str(ckpt / "assets") in str(e.value) and "big_vision/paligemma_tokenizer.model" in str(e.value)


def test_robots_command_lists_profiles():
    result = CliRunner().invoke(app, ["robots", "--json"])
    assert result.exit_code == 0
    for name in ROBOTS:
        assert f'"{name}"' in result.output


def test_close_releases_the_policy(tiny_policy_dir):
    import gc
    import weakref

    policy = load_policy(tiny_policy_dir, robot="libero", device="cpu")
    policy.infer(example_observation("libero"))
    ref = weakref.ref(policy)
    with policy:
        pass
    del policy
    gc.collect()
    assert ref() is None, "a thread still holds the Policy (and its model)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--out", "/dev/null/actions.npz"], "cannot write /dev/null/actions.npz"),
    ],
)
def test_cli_infer_setup_errors_are_one_line(argv, message, tiny_policy_dir, tmp_path, capsys):
    base = ["infer", str(tiny_policy_dir), "--robot", "libero", "--inputs", str(tiny_policy_dir / "examples" / "libero.npz"),
            "--out", str(tmp_path / "a.npz"), "--device", "cpu"]
    for i in range(0, len(argv), 2):  # later options win in click: override by replacing the value
        base[base.index(argv[i]) + 1] = argv[i + 1]
    code = run(base)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_json_observation_with_nested_cameras(tiny_policy_dir, tmp_path):
    import json

    obs = example_observation("aloha")
    doc = {"images": {k: v.tolist() for k, v in obs["images"].items()}, "state": obs["state"].tolist(), "prompt": "fold"}
    path = tmp_path / "obs.json"
    path.write_text(json.dumps(doc))
    assert run(["infer", str(tiny_policy_dir), "--robot", "aloha", "--inputs", str(path), "--out", str(tmp_path / "a.npz"),
                "--device", "cpu"]) == 0


def test_cli_serve_bad_record_dir_before_loading(tiny_policy_dir, capsys):
    code = run(["serve", str(tiny_policy_dir), "--robot", "libero", "--record", "/dev/null/rec", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create the --record directory" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["infer", "serve"])
def test_missing_checkpoint_is_named_before_the_asset_search(command, tiny_policy_dir, tmp_path, capsys):
    """A mistyped checkpoint path is reported as such, not as norm stats missing beside it (the asset
    search would otherwise look in its parent directory)."""
    missing = tmp_path / "no-such-ckpt"
    argv = [command, str(missing), "--robot", "libero", "--device", "cpu"]
    if command == "infer":
        argv += ["--inputs", str(tiny_policy_dir / "examples" / "libero.npz"), "--out", str(tmp_path / "a.npz")]
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {missing} does not exist" in err and "norm stats" not in err, err
    assert len(err.strip().splitlines()) == 1
