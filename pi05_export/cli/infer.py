"""``pi05-export infer``: actions for one observation, from the model or from exported artifacts.

With ``--robot`` the input is a raw robot observation (the robot's own keys) and the output robot
actions, through the policy runtime; without it, the tensor-level ``.npz`` contract (validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pi05_export.cli._app import (
    CheckpointArg,
    ConfigOpt,
    DeviceOpt,
    NormStatsOpt,
    PresetOpt,
    RandomInitOpt,
    SeedOpt,
    TokenizerOpt,
    VerifyOpt,
    app,
    err_console,
    load_model,
)


@app.command()
def infer(
    checkpoint: CheckpointArg = None,
    inputs: Annotated[Path, typer.Option("--inputs", help="Observation .npz (README 'Observation files'); with --robot a raw "
                                                          "observation .npz/.json in the robot's keys.")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option("--out", help="Where to write actions .npz.")] = ...,  # type: ignore[assignment]
    robot: Annotated[str | None, typer.Option("--robot", help="Robot profile (libero | droid | aloha | YAML): raw "
                                                              "observation in, robot actions out.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Task instruction (with --robot; overrides the file's).")] = None,
    tokenizer: TokenizerOpt = None,
    norm_stats: NormStatsOpt = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Euler steps.")] = 10,
    backend: Annotated[str, typer.Option("--backend", help="torch | onnxruntime | tensorrt (with --robot also "
                                                           "torch-compile, torch-cudagraph, torch-compile-cudagraph)")] = "torch",
    artifacts: Annotated[Path | None, typer.Option("--artifacts", help="Export dir for onnxruntime/tensorrt.")] = None,
    engines: Annotated[str | None, typer.Option("--engines", help="Engine set under OUT/engines/ (tensorrt).")] = None,
    device: DeviceOpt = None,
    verify: VerifyOpt = False,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Sample actions for one observation file and write them (.npz 'actions').

    Tensor level: 'actions' float32 [B, horizon, action_dim], normalized. With --robot: 'actions'
    float64 [horizon, robot action dims] in robot units, plus the prompt and token ids used.
    """
    import numpy as np

    from pi05_export.observation import save_npz

    if robot is not None:
        from pi05_export.policy.policy import load_policy, load_robot_observation

        model = load_model(checkpoint, preset, config, random_init, seed)[0] if checkpoint is None and preset else None
        policy = load_policy(artifacts or checkpoint, robot=robot, backend=backend, tokenizer=tokenizer, norm_stats=norm_stats,
                             num_steps=steps, seed=seed, engines=engines, device=device, model=model, full_hash=verify)
        obs = load_robot_observation(inputs, policy.profile)
        if prompt is not None:
            obs["prompt"] = prompt
        inp = policy.preprocess(obs)
        normalized, model_ms = policy.sample([inp])
        actions = policy.postprocess(normalized[0], inp)
        save_npz(out, {"actions": actions, "prompt": np.asarray(inp.prompt), "tokens": inp.tokens, "token_mask": inp.token_mask})
        err_console.print(f"wrote {out}: actions {list(actions.shape)} for robot {policy.profile.name} via {backend} "
                          f"(model {model_ms:.1f} ms)", markup=False, soft_wrap=True)
        return
    from pi05_export.infer import infer_actions

    model = load_model(checkpoint, preset, config, random_init, seed)[0] if backend == "torch" else None
    actions = infer_actions(inputs, model=model, backend=backend, artifacts=artifacts, engines=engines, steps=steps, seed=seed,
                            full_hash=verify)
    save_npz(out, {"actions": actions})
    err_console.print(f"wrote {out}: actions {list(actions.shape)} via {backend} (mean |a| {abs(actions).mean():.4f})")
