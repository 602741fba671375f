"""A self-contained ``tiny`` policy checkpoint for tests, demos and the serving benchmark.

Nothing can be downloaded here, so this writes what a real openpi checkpoint directory holds, at
tiny size: ``model.safetensors`` + ``config.json`` (seeded random ``tiny`` weights),
``assets/<asset_id>/norm_stats.json`` for every shipped robot profile (openpi's format, seeded), a
SentencePiece tokenizer trained on the fly with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) at
``assets/paligemma_tokenizer.model``, and one raw example observation per robot in ``examples/``.

    python -m pi05_export.testing.tiny_policy out/tiny-policy
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

# Sentences the tiny tokenizer is trained on: robot tasks plus the pi05 prompt scaffolding and digits.
_TASKS = (
    "pick up the black bowl and place it on the plate", "open the top drawer of the cabinet",
    "put the cream cheese in the bowl", "turn on the stove", "push the plate to the front of the stove",
    "put both the alphabet soup and the tomato sauce in the basket", "uncap the pen", "fold the towel",
    "stack the red block on the blue block", "close the microwave door", "pick up the fork",
)
TOKENIZER_VOCAB = 400  # <= the tiny model's 1024 embeddings
MAX_TOKEN_LEN = 96  # the tiny preset's 16 tokens cut every state prompt; ALOHA's is about 70 here


def tiny_tokenizer_bytes(vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    """Train a SentencePiece BPE model with Gemma's special ids; deterministic (one thread)."""
    import sentencepiece as spm

    lines = [f"Task: {t}, State: {' '.join(str((i * 37 + j * 11) % 256 - (j == 0)) for j in range(8))};\nAction: "
             for i, t in enumerate(_TASKS)]
    lines += [t.replace(" ", "_") for t in _TASKS] + [t.upper() for t in _TASKS] + list(_TASKS)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=["\n"], num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    return buf.getvalue()


def norm_stats_dict(state_dim: int, action_dim: int, seed: int) -> dict[str, object]:
    """openpi ``norm_stats.json`` content with seeded, plausible quantiles (q01 < q99)."""
    rng = np.random.default_rng(seed)

    def entry(d: int) -> dict[str, list[float]]:
        mean = rng.normal(0.0, 0.5, d)
        std = rng.uniform(0.1, 1.0, d)
        return {"mean": mean.tolist(), "std": std.tolist(), "q01": (mean - 2 * std).tolist(), "q99": (mean + 2 * std).tolist()}

    return {"norm_stats": {"state": entry(state_dim), "actions": entry(action_dim)}}


def example_observation(profile_name: str, seed: int = 0) -> dict[str, object]:
    """A raw observation in the robot's own keys: 480x640 uint8 frames, a state, a prompt."""
    from pi05_export.policy.profiles import load_profile

    rng = np.random.default_rng(seed)
    profile = load_profile(profile_name)
    obs: dict[str, object] = {}
    for cam in profile.cameras:
        if cam.key is None:
            continue
        frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        if profile.image_layout == "chw":
            frame = np.ascontiguousarray(frame.transpose(2, 0, 1))
        node = obs
        for part in cam.key[:-1]:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[cam.key[-1]] = frame  # type: ignore[index]
    dim = profile.state_dim or 8
    sizes = [dim] if len(profile.state) == 1 else [dim - len(profile.state) + 1] + [1] * (len(profile.state) - 1)
    for key, n in zip(profile.state, sizes, strict=True):
        value = rng.uniform(-0.5, 0.5, n)
        obs[key[0]] = value
    if profile.adapt == "aloha_pi":  # grippers are normalized [0, 1]
        state = obs["state"]
        state[[6, 13]] = rng.uniform(0.2, 0.8, 2)  # type: ignore[index]
    obs["prompt"] = "pick up the black bowl"
    return obs


def _tiny_policy_config():  # type: ignore[no-untyped-def]
    from pi05_export.config import TINY

    return TINY.replace(max_token_len=MAX_TOKEN_LEN)


def build_tiny_policy(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny policy checkpoint directory (see the module docstring) and return it."""
    from pi05_export.checkpoint import random_model, save_checkpoint
    from pi05_export.policy.profiles import shipped_profiles

    out = Path(out_dir)
    save_checkpoint(random_model(_tiny_policy_config(), seed=seed), out)
    assets = out / "assets"
    assets.mkdir(exist_ok=True)
    (assets / "paligemma_tokenizer.model").write_bytes(tiny_tokenizer_bytes())
    for i, profile in enumerate(shipped_profiles().values()):
        d = assets / str(profile.asset_id)
        d.mkdir(parents=True, exist_ok=True)
        stats = norm_stats_dict(profile.state_dim or 8, profile.action_dim, seed + i)
        (d / "norm_stats.json").write_text(json.dumps(stats, indent=2))
        examples = out / "examples"
        examples.mkdir(exist_ok=True)
        np.savez(examples / f"{profile.name}.npz", **flatten(example_observation(profile.name, seed)))
    return out


def flatten(obs: dict[str, object], prefix: str = "") -> dict[str, object]:
    """Nested observation dicts -> ``.npz`` names (``images.cam_high``), the inverse of the CLI loader."""
    flat: dict[str, object] = {}
    for k, v in obs.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


if __name__ == "__main__":
    print(build_tiny_policy(sys.argv[1] if len(sys.argv) > 1 else "out/tiny-policy"))
