"""Forward GFLOP of each registered image encoder, and the share of the machine's matmul peak it reaches.

    python benchmarks/encoder_flops.py [--size N]                 # counted GFLOP of every encoder
    python benchmarks/encoder_flops.py --peak litemedsam --size 64 --batches 1 8 32 [-o OUT.json]
    python benchmarks/encoder_flops.py --peak litemedsam --size 56 64 --batches 1    # sizes against one peak

``--peak``: in one run, the median of 5 timings of a 2048 x 2048 fp32 matmul (the machine's peak,
2 x 2048^3 FLOP each), and the median of ``--repeats`` timings of the encoder's forward pass at the given
input size and batches, both as the module is built and as the inference copy that frozen encoders run,
timed alternately (see ``achieved``; under ``torch.inference_mode``, after a warm-up); achieved GFLOP/s =
counted GFLOP / seconds, and its share of the peak. torch's threads are set to the available cores (``samnnu.config.configure_threads``).

torch.utils.flop_counter counts matmul/conv FLOPs (2 per multiply-add) without running real math,
so even vit_h at 1024 costs nothing to count (TinyViTs are built on the CPU). Elementwise ops, softmax and norms are not counted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from samnnu.modeling.encoders import ENCODERS, build_sam_parts, inference_encoder


def encoder_gflop(name: str, size: int) -> float:
    # TinyViT's constructor calls .item(): build it on the CPU (it is small); ViTs on the meta device
    with torch.device("meta" if name.startswith("vit_") else "cpu"):
        parts = build_sam_parts(name, input_size=size, num_mask_tokens=4)
        x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        parts.image_encoder(x)
    return counter.get_total_flops() / 1e9


def median_seconds(fn, repeats: int = 5) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(calls: dict, repeats: int) -> dict:
    """{name: median wall time} of ``repeats`` rounds that call every function once, after one warm-up round."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_seconds(lambda: a @ b) / 1e9


def achieved(name: str, size: int, batches: list[int], repeats: int = 15) -> dict:
    """{variant: {batch: (GFLOP per image, seconds per image, GFLOP/s)}} of the encoder's forward pass.

    Variants: ``module``, the encoder as built (eval mode, contiguous input); ``inference_copy``, what a
    frozen encoder runs without autograd (:func:`samnnu.modeling.encoders.inference_encoder`: BatchNorm
    folded, channels-last weights and input). The two are timed alternately, call by call, and each gets
    the median of ``repeats`` timings: on a machine whose speed drifts, both see the same drift.
    """
    gflop = encoder_gflop(name, size)
    encoder = build_sam_parts(name, input_size=size, num_mask_tokens=4).image_encoder.eval()
    variants = {"module": (encoder, torch.contiguous_format),
                "inference_copy": (inference_encoder(encoder), torch.channels_last)}
    out = {v: {} for v in variants}
    for batch in batches:
        calls = {}
        for variant, (module, memory_format) in variants.items():
            x = torch.rand(batch, 3, size, size).contiguous(memory_format=memory_format)
            calls[variant] = lambda module=module, x=x: module(x)
        with torch.inference_mode():
            seconds = interleaved_median_seconds(calls, repeats)
        for variant, sec in seconds.items():
            out[variant][batch] = {"gflop_per_image": gflop, "seconds_per_image": sec / batch,
                                   "gflops": gflop * batch / sec}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="input size(s) (default: each encoder's native size)")
    p.add_argument("--peak", default=None, metavar="ENCODER", help="time ENCODER against the matmul peak")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batches timed with --peak")
    p.add_argument("--repeats", type=int, default=15, help="timings per variant and batch with --peak (median)")
    p.add_argument("-o", "--output", default=None, help="with --peak: write the figures to this JSON file")
    args = p.parse_args()
    if args.peak:
        from samnnu.config import configure_threads
        from samnnu.safe_io import write_json_atomic

        threads = configure_threads()
        sizes = args.size or [ENCODERS[args.peak].native_size]
        peak = matmul_peak_gflops()
        print(f"matmul peak ({threads} threads): {peak:.1f} GFLOP/s")
        result = {"encoder": args.peak, "threads": threads, "repeats": args.repeats, "matmul_peak_gflops": peak, "sizes": {}}
        for size in sizes:
            variants = result["sizes"][size] = achieved(args.peak, size, args.batches, args.repeats)
            for variant, rows in variants.items():
                for batch, r in rows.items():
                    r["share_of_peak"] = r["gflops"] / peak
                    print(f"{args.peak} ({variant}) input {size} batch {batch:3d}: {r['gflop_per_image']:5.2f} GFLOP, "
                          f"{r['seconds_per_image'] * 1e3:7.2f} ms/image, "
                          f"{r['gflops']:6.1f} GFLOP/s = {100 * r['share_of_peak']:5.1f} % of peak")
        if args.output:
            write_json_atomic(args.output, result)
        return
    for name, spec in ENCODERS.items():
        for size in args.size or [spec.native_size]:
            print(f"{name:11s} input {size:5d}: {encoder_gflop(name, size):9.1f} GFLOP")


if __name__ == "__main__":
    main()
