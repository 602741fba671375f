"""Validation thresholds per precision: the one table ``validate`` (and the CI job) gates on.

Each gate has a PASS and a WARN level; below WARN is FAIL. fp32 gates on max abs difference (the
graphs compute the same math; per component relative to the tensor's scale, max abs / max(1, max|ref|),
since fp32 rounding grows with magnitude: at full size the prefix KV cache, |kv| <= 5.5, differs by up to
3.7e-4 after 18 layers of 2048-wide matmuls summed in another order); reduced precisions gate on cosine
similarity, with the goals from
the validation issue for end-to-end actions (fp16/bf16 >= 0.9999, fp8 >= 0.999, fp4/fp8 >= 0.995).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True)
class Gate:
    metric: Literal["max_abs", "max_rel", "cosine"]
    passing: float
    warning: float

    def judge(self, value: float) -> Status:
        if value != value:  # NaN
            return "FAIL"
        if self.metric != "cosine":  # differences: lower is better
            return "PASS" if value <= self.passing else "WARN" if value <= self.warning else "FAIL"
        return "PASS" if value >= self.passing else "WARN" if value >= self.warning else "FAIL"

    def describe(self) -> str:
        op = ">=" if self.metric == "cosine" else "<="
        name = "max abs / max(1, max|ref|)" if self.metric == "max_rel" else self.metric
        return f"{name} {op} {self.passing:g} (warn {self.warning:g})"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Thresholds:
    component: Gate
    actions: Gate


TABLE: dict[str, Thresholds] = {
    "fp32": Thresholds(component=Gate("max_rel", 1e-4, 1e-3), actions=Gate("max_abs", 1e-4, 1e-3)),
    "fp16": Thresholds(component=Gate("cosine", 0.9999, 0.999), actions=Gate("cosine", 0.9999, 0.999)),
    "bf16": Thresholds(component=Gate("cosine", 0.999, 0.995), actions=Gate("cosine", 0.9999, 0.999)),
    "fp8": Thresholds(component=Gate("cosine", 0.99, 0.98), actions=Gate("cosine", 0.999, 0.995)),
    "mixed_fp4_fp8": Thresholds(component=Gate("cosine", 0.98, 0.95), actions=Gate("cosine", 0.995, 0.99)),
}


def thresholds_for(precision: str, formats: list[str] | None = None) -> tuple[str, Thresholds]:
    """The row for an artifact: its precision, or for quantized graphs the lowest format it uses."""
    formats = [f.lower() for f in (formats or [])]
    if any(f in ("fp4", "nvfp4") for f in formats):
        return "mixed_fp4_fp8", TABLE["mixed_fp4_fp8"]
    if "fp8" in formats:
        return "fp8", TABLE["fp8"]
    key = precision if precision in TABLE else "fp32"
    return key, TABLE[key]


def worst(statuses: list[Status]) -> Status:
    return "FAIL" if "FAIL" in statuses else "WARN" if "WARN" in statuses else "PASS"
