"""Trainable parameters, seconds per training iteration and peak memory of each samnnu trainer's network.

    python benchmarks/trainer_costs.py [--encoder litemedsam] [--input 64] [--batch 10] [--classes 3]
                                       [--device cpu] [--threads N]

Each trainer is measured in its own subprocess (so peak RSS is its own): the network is built from a
plans dict the way the trainer builds it (``build_network_architecture``; the nnSAM U-Net from a
2D PlainConvUNet of nnU-Net's default layout for a 64x64 patch), then forward + loss + backward +
optimiser step on random (batch, 1, input, input) data is timed: one warm-up iteration, then the
median of 5. Peak RSS is the process's maximum resident set (``ru_maxrss``), build included; on CUDA
the peak allocated GPU memory is reported too. Pretrained weights are not loaded (costs do not
depend on them).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

TRAINERS = ["SAMedLoRATrainer", "SAMMed2DAdapterTrainer", "SAMUNetTrainer", "nnSAMTrainer"]


def unet_architecture(input_size: int) -> dict:
    """nnU-Net's default 2D PlainConvUNet layout for a square patch (32 features doubling to 512, 4x4 bottleneck)."""
    n_stages = 1
    while input_size // 2 ** n_stages >= 4 and n_stages < 7:
        n_stages += 1
    feats = [min(32 * 2 ** i, 512) for i in range(n_stages)]
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n_stages, "features_per_stage": feats,
                            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * n_stages,
                            "strides": [[1, 1]] + [[2, 2]] * (n_stages - 1), "n_conv_per_stage": [2] * n_stages,
                            "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def measure(trainer: str, encoder: str, input_size: int, batch: int, classes: int, device: str) -> dict:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samnnu.pipeline.training import get_trainer_class

    plans = {"dataset_name": "Dataset999_Cost", "plans_name": "samnnuPlans", "configurations": {"2d": {
        "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch,
        "patch_size": [input_size, input_size], "spacing": [1.0, 1.0], "architecture": unet_architecture(input_size),
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False], "batch_dice": True,
        "sam": {"encoder": encoder, "input_size": input_size, "intensity_windows": [[-2.0, 2.0]],
                "batch_size": batch}}}}
    pm = PlansManager(plans)
    cls = get_trainer_class(trainer)
    deep_supervision = trainer == "nnSAMTrainer"
    net = cls.build_network_architecture(pm, pm.get_configuration("2d"), 1, classes, deep_supervision).to(device)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 1, input_size, input_size, device=device)
    y = torch.randint(0, classes, (batch, input_size, input_size), device=device)

    def step():
        out = net(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = torch.nn.functional.cross_entropy(outs[0], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"trainer": trainer, "trainable": sum(p.numel() for p in params),
              "total": sum(p.numel() for p in net.parameters()), "s_per_iter": statistics.median(times),
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}
    if device == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="litemedsam")
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--trainers", nargs="+", default=TRAINERS)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one trainer, print JSON
    args = p.parse_args()
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.one, args.encoder, args.input, args.batch, args.classes, args.device)))
        return
    print(f"encoder {args.encoder}, input {args.input}x{args.input}, batch {args.batch}, {args.classes} classes, "
          f"device {args.device}; median of 5 iterations after 1 warm-up")
    print(f"{'trainer':24s} {'trainable':>11s} {'total':>11s} {'s/iter':>8s} {'peak RSS GB':>12s}"
          + (f" {'peak CUDA GB':>13s}" if args.device == "cuda" else ""))
    for trainer in args.trainers:
        cmd = [sys.executable, __file__, "--one", trainer] + sys.argv[1:]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(f"{trainer:24s} failed: {run.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{r['trainer']:24s} {r['trainable']:11,d} {r['total']:11,d} {r['s_per_iter']:8.3f} "
              f"{r['peak_rss_gb']:12.2f}" + (f" {r['peak_cuda_gb']:13.2f}" if "peak_cuda_gb" in r else ""))


if __name__ == "__main__":
    main()
