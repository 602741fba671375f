"""Recipes: schema, glob resolution (later rules win), coverage per shipped recipe, ModelOpt config, CLI errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pi05_export.cli import run
from pi05_export.config import TINY
from pi05_export.errors import RecipeError
from pi05_export.recipe import list_recipes, load_recipe, modelopt_config, parse_recipe, resolve_recipe

SHIPPED = ("bf16", "fp16", "fp8", "fp8_nvfp4_llm", "mixed_fp4_fp8")

# Linear layers per component on `tiny`: vision 2 layers x 6 + projector, llm/expert 2 x 7 (+5 adaRMS
# dense in the expert), projections 4 (action_in/out, time_mlp_in/out).
EXPECTED_COVERAGE = {
    "fp16": {"expert": {"fp16": 14, "fp32": 5}, "llm": {"fp16": 14}, "projections": {"fp32": 4}, "vision": {"fp16": 13}},
    "bf16": {"expert": {"bf16": 14, "fp32": 5}, "llm": {"bf16": 14}, "projections": {"fp32": 4}, "vision": {"bf16": 13}},
    "fp8": {"expert": {"fp32": 5, "fp8": 14}, "llm": {"fp8": 14}, "projections": {"fp32": 4}, "vision": {"fp8": 13}},
    "mixed_fp4_fp8": {"expert": {"fp32": 5, "fp8": 8, "nvfp4": 6}, "llm": {"fp8": 8, "nvfp4": 6}, "projections": {"fp32": 4},
                      "vision": {"fp8": 13}},
    "fp8_nvfp4_llm": {"expert": {"fp32": 5, "fp8": 14}, "llm": {"fp8": 8, "nvfp4": 6}, "projections": {"fp32": 4},
                      "vision": {"fp8": 13}},
}


def test_shipped_recipes_listed_with_descriptions():
    recipes = list_recipes()
    assert set(SHIPPED) <= set(recipes)
    assert all(d and "\n" not in d and not d.startswith("(invalid") for d in recipes.values())


@pytest.mark.parametrize("name", SHIPPED)
def test_coverage_of_shipped_recipes_on_tiny(name, tiny_model):
    resolved = resolve_recipe(load_recipe(name), tiny_model)
    assert resolved.coverage() == EXPECTED_COVERAGE[name]
    assert len(resolved.recipe.sha256) == 64


def test_mixed_recipe_puts_fp4_on_mlps_fp8_on_attention(tiny_model):
    f = resolve_recipe(load_recipe("mixed_fp4_fp8"), tiny_model).formats
    assert f["paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.down_proj"] == "fp4"
    assert f["paligemma_with_expert.gemma_expert.model.layers.1.mlp.gate_proj"] == "fp4"
    assert f["paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.o_proj"] == "fp8"
    assert f["paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense"] == "fp32"
    assert all(f[n] == "fp32" for n in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"))


def test_later_rules_win_and_denoise_means_expert_plus_projections(tiny_model):
    r = parse_recipe({"rules": [
        {"component": "all", "match": "*", "format": "fp8"},
        {"component": "denoise", "match": "*", "format": "none"},
        {"component": "llm", "match": "*.layers.0.mlp.up_proj", "format": "fp4"},
    ]})
    f = resolve_recipe(r, tiny_model).formats
    assert f["paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj"] == "fp4"
    assert f["paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.gate_proj"] == "fp8"
    assert f["paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj"] == "bf16"  # unquantized: base bf16
    assert f["action_out_proj"] == "fp32"


def test_unmatched_rule_is_an_error_or_a_recorded_warning(tiny_model):
    r = parse_recipe({"rules": [{"match": "*", "format": "none"}, {"component": "llm", "match": "*.nonexistent*", "format": "fp8"}]})
    with pytest.raises(RecipeError, match="matches no module"):
        resolve_recipe(r, tiny_model)
    resolved = resolve_recipe(r, tiny_model, allow_unmatched=True)
    assert len(resolved.unmatched) == 1 and "nonexistent" in resolved.unmatched[0]


def test_component_filter_restricts_matches(tiny_model):
    # vision has no `mlp.gate_proj`: the glob exists only in llm/expert
    r = parse_recipe({"rules": [{"component": "vision", "match": "*.mlp.gate_proj", "format": "fp8"}]})
    with pytest.raises(RecipeError, match="matches no module"):
        resolve_recipe(r, tiny_model)


def test_fp4_needs_in_features_multiple_of_16():
    from pi05_export.checkpoint import random_model

    model = random_model(TINY.replace(action_dim=7), seed=0)  # action_in_proj: in_features 7
    r = parse_recipe({"rules": [{"component": "projections", "match": "action_in_proj", "format": "fp4"}]})
    with pytest.raises(RecipeError, match="not a multiple of 16"):
        resolve_recipe(r, model)


def test_quantized_rule_must_reach_a_linear(tiny_model):
    r = parse_recipe({"rules": [{"component": "vision", "match": "*.post_layernorm", "format": "fp8"}]})
    with pytest.raises(RecipeError, match="reaches no Linear"):
        resolve_recipe(r, tiny_model)


def test_dtype_rule_contradicting_base_is_an_error(tiny_model):
    r = parse_recipe({"base": "fp16", "rules": [{"match": "*", "format": "fp16"}]})  # projections are kept fp32
    with pytest.raises(RecipeError, match="runs in fp32"):
        resolve_recipe(r, tiny_model)


def test_fp32_rule_keeps_a_layer_in_a_typed_graph_and_quantized_recipes_default_to_bf16(tiny_model):
    layer = "paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.down_proj"
    r = parse_recipe({"base": "fp16", "rules": [{"match": "*", "format": "none"}, {"match": layer, "format": "fp32"}]})
    assert resolve_recipe(r, tiny_model).keep_fp32() == [layer]  # the overflow guard; the keep-list is not repeated
    assert parse_recipe({"rules": [{"match": "*.mlp", "format": "fp8"}]}).base == "bf16"
    assert parse_recipe({"rules": [{"match": "*", "format": "none"}]}).base == "fp32"
    assert {n: load_recipe(n).base for n in ("fp8", "mixed_fp4_fp8", "fp8_nvfp4_llm")} == dict.fromkeys(
        ("fp8", "mixed_fp4_fp8", "fp8_nvfp4_llm"), "bf16")
    assert load_recipe("fp8").with_base("float16").base == "fp16"


@pytest.mark.parametrize("data, message", [
    ({"rules": []}, "has no rules"),
    ({"rules": [{"match": "*", "format": "int3"}]}, "format 'int3'"),
    ({"rules": [{"match": "*", "format": "fp8", "precision": "x"}]}, "unknown key"),
    ({"rules": [{"format": "fp8"}]}, "'match'"),
    ({"rules": [{"match": "*", "format": "fp8", "component": "lm_head"}]}, "component 'lm_head'"),
    ({"base": "fp64", "rules": [{"match": "*", "format": "none"}]}, "base 'fp64'"),
    ({"rulez": []}, "unknown key"),
    ("just a string", "must be a mapping"),
])
def test_schema_errors(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_malformed_yaml_and_unknown_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n  {match: '*', format: fp8\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="unknown recipe 'fp3'") as e:
        load_recipe("fp3")
    assert "mixed_fp4_fp8" in (e.value.hint or "")


def test_modelopt_config_is_list_form_and_does_not_touch_globals(tiny_model):
    from modelopt.torch.quantization import config as mcfg

    before = copy.deepcopy(mcfg._default_disabled_quantizer_cfg)
    cfg = modelopt_config(resolve_recipe(load_recipe("mixed_fp4_fp8"), tiny_model), nvfp4_backend="x")
    entries = cfg["quant_cfg"]
    assert isinstance(entries, list) and entries[0] == {"quantizer_name": "*", "enable": False}
    for e in entries:
        e.setdefault("cfg", {})["num_bits"] = 99  # mutate everything we got
    assert mcfg._default_disabled_quantizer_cfg == before
    fp4 = [e for e in modelopt_config(resolve_recipe(load_recipe("mixed_fp4_fp8"), tiny_model), nvfp4_backend="x")["quant_cfg"]
           if e.get("cfg", {}).get("num_bits") == (2, 1)]
    assert len(fp4) == 2 * 12 and all(e["cfg"]["backend"] == "x" and e["cfg"]["block_sizes"][-1] == 16 for e in fp4)


# -- CLI: one-line errors, exit != 0 -------------------------------------------------------------
def _cli_error(capsys, argv):
    code = run(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_cli_recipes_lists_shipped(capsys):
    assert run(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED)


def test_cli_unknown_recipe(capsys, tmp_path):
    err = _cli_error(capsys, ["quantize", "--preset", "tiny", "--random-init", "--recipe", "fp3", "--out", str(tmp_path)])
    assert "unknown recipe 'fp3'" in err


def test_cli_malformed_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: '*\n")
    err = _cli_error(capsys, ["quantize", "--preset", "tiny", "--random-init", "--recipe", str(bad), "--out", str(tmp_path)])
    assert "not valid YAML" in err


def test_cli_rule_matching_nothing(capsys, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("rules:\n  - {component: llm, match: '*.mlp.gate_prj', format: fp8, why: typo}\n")
    err = _cli_error(capsys, ["quantize", "--preset", "tiny", "--random-init", "--recipe", str(rec), "--out", str(tmp_path / "o")])
    assert "matches no module" in err and "--allow-unmatched" in err
    assert not (tmp_path / "o").exists()


def test_cli_fp4_on_width_not_multiple_of_16(capsys, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY.replace(action_dim=7).to_dict()))
    rec = tmp_path / "r.yaml"
    rec.write_text("rules:\n  - {component: projections, match: action_in_proj, format: fp4}\n")
    err = _cli_error(capsys, ["quantize", "--config", str(cfg), "--random-init", "--recipe", str(rec), "--out", str(tmp_path / "o")])
    assert "not a multiple of 16" in err


def test_shipped_recipes_and_calibration_sets_are_package_data():
    """A wheel (non-editable) install carries what the CLI ships: both live inside the package and
    pyproject.toml's package-data lists them (a fresh-user trial found `recipes` empty otherwise)."""
    import tomllib

    import pi05_export
    from pi05_export.calibration import SHIPPED_DIR
    from pi05_export.recipe import RECIPES_DIR

    package = Path(pi05_export.__file__).parent
    assert RECIPES_DIR.parent == package and SHIPPED_DIR.parent == package
    data = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pi05_export"]
    shipped = [p.relative_to(package) for p in [*RECIPES_DIR.glob("*.yaml"), *SHIPPED_DIR.rglob("*")] if p.is_file()]
    assert shipped and all(any(p.match(glob) for glob in data) for p in shipped), (shipped, data)
