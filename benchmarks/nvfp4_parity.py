"""NVFP4 parity: ModelOpt's CUDA kernels vs the project's CPU emulation (pi05_export.nvfp4).

Run on a CUDA machine with nvidia-modelopt installed:  python benchmarks/nvfp4_parity.py [OUT.json]
1. Synthetic tensors (several shapes, scales and a heavy-tailed case) through a ModelOpt NVFP4
   TensorQuantizer on CUDA vs ``nvfp4_fake_quant`` on CPU: max abs diff and mismatching elements.
2. The tiny model quantized with ``mixed_fp4_fp8`` on CUDA (ModelOpt kernels): every NVFP4 quantizer's
   real input tensor during one calibration sample, re-quantized by the emulation on CPU.
3. Actions: the same recipe calibrated on CUDA (ModelOpt kernels) and on CPU (emulation backend).
Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def main() -> None:
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from pi05_export import nvfp4
    from pi05_export.calibration import load_calibration_set
    from pi05_export.checkpoint import random_model
    from pi05_export.quantize import action_cosine, calibration_loop, insert_quantizers
    from pi05_export.recipe import NVFP4_QUANTIZER, load_recipe, resolve_recipe

    assert torch.cuda.is_available(), "needs CUDA"
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "synthetic": [], "activations": []}
    import modelopt

    result["modelopt"] = modelopt.__version__
    gen = torch.Generator().manual_seed(0)
    cases = [("normal", (64, 128), 1.0), ("normal", (4, 50, 1024), 0.02), ("normal", (968, 2048), 3.0),
             ("normal", (256, 4304), 1e-3), ("student_t3", (512, 1152), 1.0), ("normal", (16, 16384), 100.0)]
    for dist, shape, scale in cases:
        x = torch.randn(shape, generator=gen) * scale
        if dist == "student_t3":
            x = torch.distributions.StudentT(3.0).sample(shape) * scale
        q = TensorQuantizer(QuantizerAttributeConfig(**copy.deepcopy(NVFP4_QUANTIZER))).cuda()
        amax = x.abs().amax()
        q.amax = amax.cuda()
        mo = q(x.cuda()).cpu()
        em = nvfp4.nvfp4_fake_quant(x, amax)
        diff = (mo - em).abs()
        result["synthetic"].append({"case": f"{dist} {list(shape)} x{scale}", "max_abs_diff": float(diff.max()),
                                    "mismatches": int((diff > 0).sum()), "numel": x.numel(),
                                    "max_abs_value": float(x.abs().max())})

    # 2 + 3: the tiny model, mixed_fp4_fp8
    recipe = load_recipe("mixed_fp4_fp8")
    obs, _ = load_calibration_set(None, random_model("tiny", 0).config)
    loop = calibration_loop(obs, 10)
    ref_model = random_model("tiny", 0)
    check = obs[0].with_noise(ref_model.config, 0).torch()
    args = [check[k] for k in ("images", "image_mask", "tokens", "token_mask")]
    ref = ref_model.sample_actions(*args, noise=check["noise"], num_steps=10)

    gpu = random_model("tiny", 0).cuda()
    insert_quantizers(gpu, resolve_recipe(recipe, gpu), loop)
    captured: list = []
    hooks = []
    for name, mod in gpu.named_modules():
        if name.endswith("input_quantizer") and mod.is_enabled and tuple(mod.num_bits) == (2, 1):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: captured.append((n, i[0].detach().cpu(), o.detach().cpu(), m.amax.detach().cpu()))))
    gpu_actions = gpu.sample_actions(*(a.cuda() for a in args), noise=check["noise"].cuda(), num_steps=10).cpu()
    for h in hooks:
        h.remove()
    worst: dict[str, dict] = {}
    for name, x, y, amax in captured:
        d = float((nvfp4.nvfp4_fake_quant(x, amax) - y).abs().max())
        w = worst.setdefault(name, {"layer": name.removesuffix(".input_quantizer"), "calls": 0, "max_abs_diff": 0.0,
                                    "max_abs_value": 0.0})
        w["calls"] += 1
        w["max_abs_diff"] = max(w["max_abs_diff"], d)
        w["max_abs_value"] = max(w["max_abs_value"], float(x.abs().max()))
    result["activations"] = list(worst.values())
    # weights through the calibrated weight quantizers
    result["weights"] = []
    for name, mod in gpu.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and wq.is_enabled and tuple(wq.num_bits) == (2, 1):
            mo = wq(mod.weight.detach()).cpu()
            em = nvfp4.nvfp4_fake_quant(mod.weight.detach().cpu(), wq.amax.cpu())
            result["weights"].append({"layer": name, "max_abs_diff": float((mo - em).abs().max())})

    cpu = random_model("tiny", 0)
    insert_quantizers(cpu, resolve_recipe(recipe, cpu), loop)
    cpu_actions = cpu.sample_actions(*args, noise=check["noise"], num_steps=10)
    result["actions"] = {
        "gpu_modelopt_vs_cpu_emulation_max_abs_diff": float((gpu_actions - cpu_actions).abs().max()),
        "gpu_modelopt_vs_cpu_emulation_cosine": action_cosine(gpu_actions, cpu_actions),
        "gpu_modelopt_vs_fp32_cosine": action_cosine(gpu_actions, ref),
        "cpu_emulation_vs_fp32_cosine": action_cosine(cpu_actions, ref),
    }
    for row in result["synthetic"]:
        print(f"{row['case']:<34} max|diff| {row['max_abs_diff']:.3g}  mismatches {row['mismatches']}/{row['numel']}", file=sys.stderr)
    for row in result["activations"] + result["weights"]:
        print(f"{row['layer'][-60:]:<62} max|diff| {row['max_abs_diff']:.3g}", file=sys.stderr)
    print(json.dumps(result["actions"]), file=sys.stderr)
    line = json.dumps(result)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
