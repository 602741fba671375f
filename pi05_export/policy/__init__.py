"""The policy runtime: a robot's raw observation (camera frames, joint state, instruction) in, robot
actions out, exactly as openpi's ``Policy.infer`` (see ``policy.py``), on torch / ONNX Runtime /
TensorRT. ``pi05-export serve`` puts it behind openpi's websocket protocol.
"""

from pi05_export.policy.normalize import FeatureNorm, NormStats, load_norm_stats
from pi05_export.policy.policy import Policy, PolicyInputs, load_policy, postprocess, preprocess
from pi05_export.policy.profiles import RobotProfile, load_profile, shipped_profiles
from pi05_export.policy.tokenizer import PromptTokenizer

__all__ = [
    "FeatureNorm",
    "NormStats",
    "Policy",
    "PolicyInputs",
    "PromptTokenizer",
    "RobotProfile",
    "load_norm_stats",
    "load_policy",
    "load_profile",
    "postprocess",
    "preprocess",
    "shipped_profiles",
]
