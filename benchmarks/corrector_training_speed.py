"""Seconds per training round of the 3D click corrector, float32 against bfloat16 autocast.

    python benchmarks/corrector_training_speed.py [--features 8 16 32 64] [--features 16 32 64 128]
                                                  [--batch-size 4] [--repeats 9] [-o OUT.json]
    python benchmarks/corrector_training_speed.py --steps-on 4 --data-root ROOT [--steps 20]   # whole steps too

One round is what :func:`samnnu.interactive.corrector_training.train_corrector` does per click: a forward
pass of the corrector's U-Net on a batch of crops (``CROP``, 4 channels), the loss, and the backward pass.
Both precisions are timed alternately, after a warm-up, and the median of ``--repeats`` is reported; the
two variants start from the same weights and input. The largest difference of their logits on that input
is reported too (bfloat16 keeps about 3 significant digits).

``--steps-on DATASET``: also whole training steps (:func:`~samnnu.interactive.corrector_training.train_corrector`
with its simulated clicks on fold 0's training cases, starting from imperfect copies of the labels), ``--steps``
of them in each precision, one after the other; seconds per step from the run's own clock.

torch's threads are set to the available cores (``samnnu.config.configure_threads``); run it alone on the
machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from samnnu.config import configure_threads
from samnnu.interactive.click_corrector import CROP, FEATURES, build_network
from samnnu.interactive.corrector_training import (
    CorrectorSettings,
    _loss,
    corrector_logits,
    default_precision,
    fold_volumes,
    train_corrector,
)


def one_round(network: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, bf16: bool) -> float:
    network.zero_grad(set_to_none=True)
    start = time.perf_counter()
    _loss(corrector_logits(network, x, "bf16" if bf16 else "fp32"), target).backward()
    return time.perf_counter() - start


def measure(features: tuple[int, ...], batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    network = build_network(features).train()
    x = torch.rand(batch_size, 4, *CROP)
    x[:, 1] = (x[:, 1] > 0.5).float()  # the mask channel is binary
    target = (torch.rand(batch_size, 1, *CROP) > 0.5).float()
    with torch.no_grad():
        fp32, bf16 = (corrector_logits(network, x, precision) for precision in ("fp32", "bf16"))
    times = {"fp32": [], "bf16": []}
    for name in times:  # warm-up
        one_round(network, x, target, name == "bf16")
    for _ in range(repeats):
        for name in times:
            times[name].append(one_round(network, x, target, name == "bf16"))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"features": list(features), "batch_size": batch_size, "crop": list(CROP),
            "seconds_per_round_fp32": round(med["fp32"], 4), "seconds_per_round_bf16": round(med["bf16"], 4),
            "speedup": round(med["fp32"] / med["bf16"], 2),
            "max_abs_logit_difference": round(float((fp32 - bf16).abs().max()), 4),
            "all_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()}}


def whole_steps(dataset: str, steps: int, batch_size: int) -> dict:
    """Seconds per training step of the real training loop on fold 0's training cases, in each precision."""
    import tempfile

    from samnnu.datasets import dataset_name

    name = dataset_name(dataset)
    images, labels, _ = fold_volumes(name, "0")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            settings = CorrectorSettings(name, "0", steps, batch_size, 5, 1e-3, 0, precision=precision)
            record = train_corrector(images, labels, settings, f"{tmp}/{precision}.pth", progress=False)
            out[precision] = round(record["seconds_this_run"] / steps, 3)
    return {"cases": len(labels), "steps": steps, "rounds": 5, "seconds_per_step": out,
            "speedup": round(out["fp32"] / out["bf16"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=int, nargs="+", action="append", default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps-on", default=None, metavar="DATASET",
                   help="also time whole training steps on this dataset's fold 0 training cases")
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args()
    if args.steps_on:
        from samnnu.config import setup_environment

        setup_environment(args.data_root, quiet=True)
    threads = configure_threads()
    rows = [measure(tuple(f), args.batch_size, args.repeats) for f in (args.features or [FEATURES])]
    result = {"machine": platform.processor() or platform.machine(), "threads": threads,
              "default_precision_here": default_precision(), "rows": rows}
    if args.steps_on:
        result["whole_steps"] = steps = whole_steps(args.steps_on, args.steps, args.batch_size)
        print(f"whole training steps ({steps['steps']} each, batch {args.batch_size}, 5 clicks): fp32 "
              f"{steps['seconds_per_step']['fp32']:.2f} s, bf16 {steps['seconds_per_step']['bf16']:.2f} s per step "
              f"({steps['speedup']:.2f}x)")
    for r in rows:
        print(f"features {r['features']}, batch {r['batch_size']}: fp32 {r['seconds_per_round_fp32']:.3f} s, "
              f"bf16 {r['seconds_per_round_bf16']:.3f} s per round ({r['speedup']:.2f}x); logits differ by at "
              f"most {r['max_abs_logit_difference']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
