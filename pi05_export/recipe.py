"""Precision recipes: YAML schema, loading, glob matching against the model, the unmatched-rule check.

A recipe is an ordered list of rules; later rules win (like ModelOpt's ``quant_cfg`` list)::

    name: mixed_fp4_fp8
    description: one line shown by `pi05-export recipes`
    base: bf16            # the graphs' type: everything not quantized, and the high-precision side of
                          # every Q/DQ (fp32 | fp16 | bf16; default bf16 when a rule quantizes, else fp32)
    rules:
      - component: llm    # vision | llm | expert | projections | denoise (= expert + projections) | all
        match: "*.mlp.*"  # fnmatch glob over Pi05Model.named_modules() names (openpi key paths)
        format: fp4       # fp4 (NVFP4) | fp8 (E4M3) | fp16 | bf16 | fp32 | none (= unquantized)
        why: the 2B prefix MLPs are most of the weight bytes

A rule applies to every ``nn.Linear`` at or below each module it matches. Quantized formats apply
to Linear layers only; convolutions, embeddings and norms always stay in high precision. A rule
that matches no module is an error (a warning with ``allow_unmatched``), and so is an fp4/fp8 rule
that reaches no Linear layer. ``fp16``/``bf16`` rules state the dtype a layer runs in and must agree
with ``base`` and openpi's fp32 keep-list (norms, patch embedding, action/time projections); an ``fp32``
rule keeps its layers fp32 in an fp16/bf16 graph (the overflow guard, like ``onnx --keep-fp32``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pi05_export.config import load_yaml
from pi05_export.errors import RecipeError

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data: in every install
FORMATS = ("fp4", "fp8", "fp16", "bf16", "fp32", "none")
QUANT_FORMATS = ("fp4", "fp8")
BASES = ("fp32", "fp16", "bf16")
COMPONENT_CHOICES = ("all", "vision", "llm", "expert", "projections", "denoise")
NVFP4_BLOCK = 16
# Coverage / manifest names of the quantized formats.
FORMAT_LABEL = {"fp4": "nvfp4", "fp8": "fp8"}
# Oldest compute capability that can build a format (FP8: Ada sm89; NVFP4: Blackwell sm100).
MIN_COMPUTE_CAPABILITY = {"fp8": "8.9", "nvfp4": "10.0"}
GPUS_FOR = {
    "fp8": "Ada (sm89: L4, L40S, RTX 40xx), Hopper (sm90: H100, H200), Blackwell (sm100/103/110/120: B200, GB200, Jetson Thor, RTX 50xx)",
    "nvfp4": "Blackwell only (sm100/103: B200, GB200, B300; sm110: Jetson Thor; sm120: RTX 50xx, RTX PRO 6000); not Hopper",
}
_RULE_KEYS = {"component", "match", "format", "why"}
_TOP_KEYS = {"name", "description", "base", "rules"}
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # recipe names are directory names: OUT/<name>/, OUT/engines/<name>/


@dataclass(frozen=True)
class Rule:
    match: str
    format: str
    component: str = "all"
    why: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"component": self.component, "match": self.match, "format": self.format, "why": self.why}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    base: str
    rules: tuple[Rule, ...]
    sha256: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "base": self.base, "sha256": self.sha256,
            "source": self.source, "rules": [r.to_dict() for r in self.rules],
        }

    @property
    def quantizes(self) -> bool:
        return any(r.format in QUANT_FORMATS for r in self.rules)

    def with_base(self, base: str) -> Recipe:
        """This recipe typed in another base precision (``quantize --precision``)."""
        from dataclasses import replace

        from pi05_export.dtypes import precision_name

        return replace(self, base=precision_name(base))


@dataclass
class ResolvedRecipe:
    """The recipe applied to a model: the final format of every Linear layer and its component."""

    recipe: Recipe
    formats: dict[str, str]  # Linear module name -> fp4 | fp8 | fp16 | bf16 | fp32
    components: dict[str, str]  # Linear module name -> component
    unmatched: list[str] = field(default_factory=list)

    def layers(self, fmt: str) -> list[str]:
        return [n for n, f in self.formats.items() if f == fmt]

    def coverage(self) -> dict[str, dict[str, int]]:
        """Per component: how many Linear layers end up in each format (fp4 reported as nvfp4)."""
        out: dict[str, Counter[str]] = {}
        for name, fmt in self.formats.items():
            out.setdefault(self.components[name], Counter())[FORMAT_LABEL.get(fmt, fmt)] += 1
        return {c: dict(sorted(cnt.items())) for c, cnt in sorted(out.items())}

    def quant_formats(self) -> list[str]:
        return sorted({FORMAT_LABEL[f] for f in self.formats.values() if f in QUANT_FORMATS})

    def keep_fp32(self) -> list[str]:
        """Layers an ``fp32`` rule keeps fp32 in an fp16/bf16 graph, beyond openpi's keep-list (module names)."""
        from pi05_export.model.pi05 import keeps_fp32

        if self.recipe.base == "fp32":
            return []
        return [n for n, f in self.formats.items() if f == "fp32" and not keeps_fp32(f"{n}.weight")]

    def to_dict(self) -> dict[str, Any]:
        return {**self.recipe.to_dict(), "unmatched_rules": self.unmatched}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def list_recipes() -> dict[str, str]:
    """Shipped recipe name -> one-line description."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            out[path.stem] = load_recipe(path).description
        except RecipeError as e:  # a broken shipped recipe is a bug; still list it
            out[path.stem] = f"(invalid: {e.message})"
    return out


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``fp8``) or a YAML file by path; validates the schema."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
            raise RecipeError(f"unknown recipe {str(name_or_path)!r}", hint=f"shipped recipes: {shipped}; or pass a .yaml path")
    data, raw = load_yaml(path, "recipe", RecipeError)
    return parse_recipe(data, source=str(path), sha256=hashlib.sha256(raw).hexdigest(), default_name=path.stem)


def parse_recipe(data: Any, *, source: str = "<dict>", sha256: str = "", default_name: str = "recipe") -> Recipe:
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source} must be a mapping with 'rules' (or a list of rules)", hint="see pi05_export/recipes/fp8.yaml")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise RecipeError(f"recipe {source}: unknown key(s) {', '.join(sorted(unknown))}", hint=f"valid keys: {', '.join(sorted(_TOP_KEYS))}")
    rules_given = data.get("rules") if isinstance(data.get("rules"), list) else []
    quantizes = any(isinstance(r, dict) and r.get("format") in QUANT_FORMATS for r in rules_given)
    base = data.get("base", "bf16" if quantizes else "fp32")
    if base not in BASES:
        raise RecipeError(f"recipe {source}: base {base!r} is not one of {', '.join(BASES)}", hint="set base: fp32|fp16|bf16")
    rules_raw = data.get("rules")
    if not isinstance(rules_raw, list) or not rules_raw:
        raise RecipeError(f"recipe {source} has no rules", hint="add a non-empty 'rules:' list")
    rules = tuple(_parse_rule(r, i, source) for i, r in enumerate(rules_raw))
    if not sha256:
        import json

        sha256 = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    name = str(data.get("name") or default_name)
    if not RECIPE_NAME.fullmatch(name):  # it names the output directory OUT/<name>/
        raise RecipeError(f"recipe {source}: name {name!r} is not a plain name (letters, digits, '_', '.', '-')",
                          hint="set name: to a directory name such as my_fp8")
    return Recipe(name=name, description=str(data.get("description", "")).strip(), base=base, rules=rules,
                  sha256=sha256, source=source)


def _parse_rule(raw: Any, i: int, source: str) -> Rule:
    where = f"recipe {source} rule {i + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping {{component, match, format, why}}", hint="see pi05_export/recipes/fp8.yaml")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}", hint=f"valid keys: {', '.join(sorted(_RULE_KEYS))}")
    match, fmt = raw.get("match"), raw.get("format")
    if not isinstance(match, str) or not match:
        raise RecipeError(f"{where}: 'match' must be a non-empty glob string", hint='e.g. match: "*.mlp.*"')
    if fmt not in FORMATS:
        raise RecipeError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}", hint="fp4 means NVFP4, fp8 means E4M3")
    comp = raw.get("component", "all")
    if comp not in COMPONENT_CHOICES:
        raise RecipeError(f"{where}: component {comp!r} is not one of {', '.join(COMPONENT_CHOICES)}", hint="or leave it out (= all)")
    why = raw.get("why", "")
    if not isinstance(why, str):
        raise RecipeError(f"{where}: 'why' must be a string", hint="quote it")
    return Rule(match=match, format=fmt, component=comp, why=why)


# ---------------------------------------------------------------------------------------------
# Applying to a model
# ---------------------------------------------------------------------------------------------
def _in_component(rule_component: str, component: str) -> bool:
    if rule_component == "all":
        return True
    if rule_component == "denoise":
        return component in ("expert", "projections")
    return component == rule_component


def resolve_recipe(recipe: Recipe, model: Any, *, allow_unmatched: bool = False) -> ResolvedRecipe:
    """Apply the rules in order to every ``nn.Linear`` of ``model``; later rules win.

    Raises :class:`RecipeError` for a rule that matches nothing (unless ``allow_unmatched``), a
    quantized rule that reaches no Linear layer, FP4 on a layer whose in_features is not a multiple
    of 16, or a dtype rule that contradicts ``base`` / the fp32 keep-list.
    """
    from torch import nn

    from pi05_export.checkpoint.io import component_of
    from pi05_export.model.pi05 import keeps_fp32

    modules = dict(model.named_modules())
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    components = {n: component_of(f"{n}.weight") for n in linears}
    module_comp = {n: component_of(f"{n}.weight") for n in modules if n}
    formats: dict[str, str] = {n: "none" for n in linears}
    unmatched: list[str] = []
    for i, rule in enumerate(recipe.rules):
        hit = [n for n in modules if n and fnmatch.fnmatchcase(n, rule.match) and _in_component(rule.component, module_comp[n])]
        where = f"rule {i + 1} ({rule.component}: {rule.match!r} -> {rule.format})"
        if not hit:
            if allow_unmatched:
                log.warning("recipe %s: %s matches no module", recipe.name, where)
                unmatched.append(where)
                continue
            raise RecipeError(f"recipe {recipe.name}: {where} matches no module",
                              hint="fix the glob (names as in Pi05Model.named_modules()) or pass --allow-unmatched")
        reached = [n for n in linears if any(n == h or n.startswith(h + ".") for h in hit)
                   and _in_component(rule.component, components[n])]
        if rule.format in QUANT_FORMATS and not reached:
            raise RecipeError(f"recipe {recipe.name}: {where} reaches no Linear layer",
                              hint="quantized formats apply to nn.Linear layers only")
        for n in reached:
            formats[n] = rule.format
    for n, fmt in formats.items():
        kept = recipe.base == "fp32" or keeps_fp32(f"{n}.weight")
        runs_in = "fp32" if kept else recipe.base
        if fmt == "none":
            formats[n] = runs_in
        elif fmt in ("fp16", "bf16") and fmt != runs_in:
            raise RecipeError(
                f"recipe {recipe.name}: {n} is asked to run in {fmt} but runs in {runs_in} (base {recipe.base}"
                f"{', fp32 keep-list' if kept and recipe.base != 'fp32' else ''})",
                hint="layers run in the base precision or fp32 (an fp32 rule keeps a layer fp32); change 'base' or the rule's format",
            )
        elif fmt == "fp4" and linears[n].in_features % NVFP4_BLOCK:
            raise RecipeError(
                f"recipe {recipe.name}: {n} has in_features {linears[n].in_features}, not a multiple of {NVFP4_BLOCK}; NVFP4 needs blocks of 16",
                hint="use fp8 for this layer (add a later rule)",
            )
    return ResolvedRecipe(recipe=recipe, formats=formats, components=components, unmatched=unmatched)


# ---------------------------------------------------------------------------------------------
# ModelOpt config
# ---------------------------------------------------------------------------------------------
FP8_QUANTIZER: dict[str, Any] = {"num_bits": (4, 3), "axis": None}
NVFP4_QUANTIZER: dict[str, Any] = {"num_bits": (2, 1), "block_sizes": {-1: NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)}, "axis": None}


def modelopt_config(resolved: ResolvedRecipe, *, nvfp4_backend: str | None = None, defaults_last: bool = False) -> dict[str, Any]:
    """Compile to ModelOpt's list-form quant config (fresh dicts; ModelOpt's globals are deep-copied).

    Order: deny everything, then ModelOpt's default exclusions (BatchNorm, Embedding, ``*vision_tower*``,
    ...), then one entry per quantized layer; later entries win, so the recipe overrides the default
    exclusions exactly where it asks to (coverage is checked after ``mtq.quantize`` anyway).
    ``nvfp4_backend`` names a registered ModelOpt quant backend for the NVFP4 quantizers (the CPU emulation).
    ``defaults_last`` appends the default exclusions after the recipe instead (what editing a ModelOpt
    preset gives); the coverage check then catches the SigLIP/projector layers it silently skips.
    """
    import copy

    from modelopt.torch.quantization import config as mcfg

    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    defaults = copy.deepcopy(mcfg._default_disabled_quantizer_cfg)
    if not defaults_last:
        entries += defaults
    for name, fmt in resolved.formats.items():
        if fmt not in QUANT_FORMATS:
            continue
        attrs = copy.deepcopy(FP8_QUANTIZER if fmt == "fp8" else NVFP4_QUANTIZER)
        if fmt == "fp4" and nvfp4_backend:
            attrs["backend"] = nvfp4_backend
        for q in ("weight_quantizer", "input_quantizer"):
            entries.append({"quantizer_name": f"{name}.{q}", "cfg": copy.deepcopy(attrs), "enable": True})
    if defaults_last:
        entries += defaults
    return {"quant_cfg": entries, "algorithm": "max"}


def default_exclusion_hits(names: list[str]) -> dict[str, str]:
    """Which of ``names`` (Linear module names) ModelOpt's default exclusions would disable, and by which glob."""
    from modelopt.torch.quantization import config as mcfg

    out = {}
    for entry in mcfg._default_disabled_quantizer_cfg:
        glob = entry.get("quantizer_name", "")
        if entry.get("parent_class") or glob == "*":
            continue
        for n in names:
            if n not in out and fnmatch.fnmatchcase(f"{n}.weight_quantizer", glob):
                out[n] = glob
    return out
