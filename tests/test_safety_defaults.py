"""Issue 14, kind 4: no silent defaults that change the actions.

Each case builds its input here (a tiny checkpoint, a tiny orbax tree, a calibration set), runs the real
CLI and checks the exit code, the one-line message, and that nothing outside ``--out`` changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi05_export.checkpoint import load_checkpoint, save_checkpoint
from pi05_export.cli import run
from pi05_export.config import Pi05Config
from pi05_export.errors import ConfigError
from tests.cli_checks import assert_refused, snapshot

TINY = Pi05Config.from_name("tiny")
HORIZONS = "presets pi05 50, tiny 10; openpi pi05_aloha 50, pi05_droid 15, pi05_libero 10"




# -- convert: the horizon is required, and the values taken are printed ------------------------------
@pytest.fixture(scope="module")
def jax_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("orbax.checkpoint", reason="needs the [jax] extra (orbax-checkpoint)")
    from pi05_export.testing.orbax_ckpt import random_jax_params, write_orbax_checkpoint

    return write_orbax_checkpoint(tmp_path_factory.mktemp("jax") / "pi05_x", random_jax_params(TINY, seed=0))


def test_convert_without_a_horizon_is_refused(jax_ckpt, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["convert", str(jax_ckpt), "--out", str(tmp_path / "pt")],
             f"an openpi JAX checkpoint does not record its action horizon, and the horizon changes the actions (hint: pass --action-horizon N or "
             f"--preset/--config ({HORIZONS}))")
    assert not (tmp_path / "pt").exists()


@pytest.mark.parametrize(("extra", "horizon", "said"), [
    (["--action-horizon", "15"], 15, "action_horizon 15 (--action-horizon); max_token_len 200, num_views 3, num_steps 10 "
                                     "(openpi pi05 defaults)"),
    (["--preset", "tiny"], 10, "action_horizon 10 (preset tiny); max_token_len 16, num_views 3, num_steps 10 (preset tiny)"),
    (["--preset", "tiny", "--action-horizon", "15"], 15, "action_horizon 15 (--action-horizon); max_token_len 16"),
])
def test_convert_prints_the_values_it_takes(jax_ckpt, tmp_path, capsys, extra, horizon, said):
    before = snapshot(jax_ckpt)
    assert run(["convert", str(jax_ckpt), "--out", str(tmp_path / "pt"), *extra]) == 0
    err = capsys.readouterr().err
    assert f"config: {said}" in err, err
    assert json.loads((tmp_path / "pt" / "config.json").read_text())["action_horizon"] == horizon
    assert snapshot(jax_ckpt) == before


def test_validate_on_a_converted_checkpoint_names_it(jax_ckpt, tmp_path, capsys):
    """The converted directory's own manifest is named, not the JAX checkpoint it came from."""
    assert run(["convert", str(jax_ckpt), "--out", str(tmp_path / "pt"), "--preset", "tiny"]) == 0
    capsys.readouterr()
    err = assert_refused(capsys, tmp_path, ["validate", str(tmp_path / "pt")],
                   f"{tmp_path / 'pt'} is a checkpoint written by `pi05-export convert`, not an export directory "
                   f"(hint: export it first: pi05-export onnx {tmp_path / 'pt'} --out OUT, then pass OUT)")
    assert str(jax_ckpt) not in err
    model, _ = load_checkpoint(tmp_path / "pt")  # and it still loads as the checkpoint it is
    assert model.config == TINY


# -- checkpoints whose config does not say the horizon ------------------------------------------------
def test_checkpoint_without_config_json_is_refused(tiny_model, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    (ckpt / "config.json").unlink()
    assert_refused(capsys, tmp_path, ["onnx", str(ckpt), "--out", str(tmp_path / "out")],
             f"no config.json next to the checkpoint {ckpt}: its action horizon and token length are unknown")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY.to_dict()))
    model, info = load_checkpoint(ckpt, tmp_path / "tiny.json")
    assert model.config == TINY and info.config_source == str(tmp_path / "tiny.json")


def test_openpi_config_json_without_horizon_is_refused(tiny_model, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    data = json.loads((ckpt / "config.json").read_text())
    del data["pi05_export"], data["action_horizon"]  # what openpi's own converter may leave
    (ckpt / "config.json").write_text(json.dumps(data))
    assert_refused(capsys, tmp_path, ["info", str(ckpt)], f"{ckpt / 'config.json'} has no action_horizon (or chunk_size)")


# -- calibration: built for a stated model, mismatches named, required for checkpoints ---------------
def _obs(path: Path, cfg: Pi05Config = TINY) -> Path:
    from pi05_export.observation import random_observation, save_npz

    save_npz(path, random_observation(cfg, batch=2, seed=1).arrays())
    return path


def test_calibration_build_needs_a_config(tmp_path, capsys):
    obs = _obs(tmp_path / "obs.npz")
    assert_refused(capsys, tmp_path, ["calibration-build", str(obs), "--out", str(tmp_path / "cal")],
             "calibration-build needs exactly one of --config or --preset")
    assert not (tmp_path / "cal").exists()


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
def test_calibration_build_takes_a_checkpoint_config_json(tiny_model, tmp_path, capsys, layout):
    """``--config CHECKPOINT/config.json``: the file this tool wrote, and lerobot's fields without our block."""
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", layout)
    if layout == "lerobot":
        data = json.loads((ckpt / "config.json").read_text())
        del data["pi05_export"]
        (ckpt / "config.json").write_text(json.dumps(data))
    obs = _obs(tmp_path / "obs.npz")
    assert run(["calibration-build", str(obs), "--config", str(ckpt / "config.json"), "--out", str(tmp_path / "cal")]) == 0
    assert "action horizon 10" in capsys.readouterr().err
    meta = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert (meta["action_horizon"], meta["max_token_len"], meta["image_size"]) == (10, 16, 56)


def test_calibration_mismatch_names_every_field_that_differs(tmp_path):
    from pi05_export.calibration import build_calibration_set, load_calibration_set
    from pi05_export.errors import InputError

    build_calibration_set([_obs(tmp_path / "obs.npz")], tmp_path / "cal", TINY)
    with pytest.raises(InputError) as e:
        load_calibration_set(tmp_path / "cal", TINY.replace(action_horizon=15))
    assert e.value.message.endswith("does not fit the model: action_horizon: set 10, model 15"), e.value.message
    with pytest.raises(InputError, match="max_token_len: set 16, model 20; action_horizon: set 10, model 15"):
        load_calibration_set(tmp_path / "cal", TINY.replace(action_horizon=15, max_token_len=20))


def test_quantize_a_checkpoint_without_calibration_is_refused(tiny_model, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    assert_refused(capsys, tmp_path, ["quantize", str(ckpt), "--recipe", "fp8", "--out", str(tmp_path / "out")],
             "quantizing a checkpoint needs --calibration DIR: the built-in set is stock photos with stand-in byte tokens")
    assert not (tmp_path / "out").exists()


def test_config_file_is_read_through_the_block_this_tool_wrote(tiny_model, tmp_path):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ck", "openpi")
    assert Pi05Config.from_file(ckpt / "config.json") == TINY
    (tmp_path / "bad.json").write_text(json.dumps({"paligemma_variant": "gemma_2b"}))
    with pytest.raises(ConfigError, match="has no action_horizon"):
        Pi05Config.from_file(tmp_path / "bad.json")


def test_a_converted_checkpoint_runs_as_a_checkpoint(tiny_policy_dir, tmp_path):
    """``convert`` writes a manifest too; the policy runtime must still load the directory as weights, not as
    an export (whose manifest would send it to the JAX checkpoint the weights came from)."""
    import shutil

    from pi05_export.artifacts import CHECKPOINT_STAGE, Manifest
    from pi05_export.policy import load_policy
    from pi05_export.testing.tiny_policy import example_observation

    ckpt = tmp_path / "pt"
    shutil.copytree(tiny_policy_dir, ckpt)
    Manifest(stage=CHECKPOINT_STAGE, config=TINY.to_dict(), source={"kind": "orbax", "path": str(tmp_path / "gone")},
             precision="fp32").write(ckpt)
    result = load_policy(ckpt, robot="libero", device="cpu", seed=0).infer(example_observation("libero"))
    want = load_policy(tiny_policy_dir, robot="libero", device="cpu", seed=0).infer(example_observation("libero"))
    assert result["actions"].shape == (10, 7) and (result["actions"] == want["actions"]).all()
