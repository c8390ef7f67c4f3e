"""The whole chain on one GPU: nnU-Net 3d_fullres and samnnu's default trained side by side for the same
minutes, then validated, tested and compared through samnnu's chain (docs/gpu.md).

Steps, each skipped when its output already exists (a second run resumes):

1. convert the hippocampus cases in ``--data`` (``images/`` + ``labels/``), holding out the cases whose
   number ends in 7 as the external test set;
2. plan and preprocess for ``--device`` (samnnu's plans, and nnU-Net's own for every configuration);
3. train the two models at the same time, each in its own ``samnnu_benchmark`` process (so each is
   stopped by the benchmark's wall-clock budget on its normal schedule, with its learning curve), the
   CPU cores split between their data loaders;
4. measure the encoder's throughput (slices per second at the planned input size, fp32 and bf16);
5. write ``results.json``, ``results.md``, ``learning_curves.png`` and each model's
   ``budget_curve.json`` to ``--output``.

On the GPU machine (after ``bash benchmarks/gpu/run.sh install``)::

    bash benchmarks/gpu/run.sh run --minutes 5 -o OUTPUT_FOLDER

On a CPU, as a smoke run (1-minute budget, a few cases)::

    python benchmarks/gpu/run.py --device cpu --minutes 1 --max-cases 20 -o /tmp/gpu_smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATASET = "Dataset004_Hippocampus"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO / ".gpu_data" / "hippocampus"),
                   help="hippocampus source folder (images/ + labels/); default .gpu_data/hippocampus")
    p.add_argument("--work", default="/tmp/samnnu_gpu_work", help="data root for the run (raw, preprocessed, runs)")
    p.add_argument("-o", "--output", default="gpu_results", help="results folder (default ./gpu_results)")
    p.add_argument("--minutes", type=float, default=5.0, help="training minutes per model (wall clock)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--encoder", default=None, help="SAM encoder for samnnu's plans (default: the planner's)")
    p.add_argument("--models", nargs="+", default=None,
                   help="trainer:configuration (default: samnnu's default and nnUNetTrainer:3d_fullres)")
    p.add_argument("--max-cases", type=int, default=None, help="use only the first N cases (smoke runs)")
    p.add_argument("--hold-out", default="*7", help="case-id pattern of the external test set (default '*7')")
    p.add_argument("--timing-cases", type=int, default=3, help="validation volumes timed for inference")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(args, device: str) -> None:
    """Convert (with the held-out set) and plan + preprocess, unless done by an earlier run."""
    from samnnu.config import current_paths, setup_environment
    from samnnu.dataset_conversion.hippocampus import convert_hippocampus
    from samnnu.pipeline.planning import plan_and_preprocess

    paths = setup_environment(args.work, quiet=True)
    if not (paths.raw / DATASET / "dataset.json").is_file():
        src = Path(args.data)
        if args.max_cases:
            subset = Path(args.work) / "source_subset"
            shutil.rmtree(subset, ignore_errors=True)
            cases = sorted(p.name for p in (src / "images").glob("*.nii.gz"))[: args.max_cases]
            for sub in ("images", "labels"):
                (subset / sub).mkdir(parents=True)
                for name in cases:
                    shutil.copy2(src / sub / name, subset / sub / name)
            src = subset
        result = convert_hippocampus(src, 4, raw_root=paths.raw, hold_out=args.hold_out)
        log(f"converted {len(result.converted)} cases, {len(result.held_out)} held out")
    pre = current_paths().preprocessed / DATASET
    if not (pre / "nnUNetPlans.json").is_file():
        start = time.time()
        plan_and_preprocess(4, encoder=args.encoder, device_type=device, nnunet_baseline_plans=True,
                            processes=max(1, (os.cpu_count() or 2) - 1))
        log(f"planned and preprocessed in {time.time() - start:.0f} s")


def train_side_by_side(args, device: str, models: list[str], bench: Path) -> list[Path]:
    """One ``samnnu_benchmark`` process per model, all at once; returns their output folders."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    share = max(1, cores // len(models))
    outs, procs = [], []
    for model in models:
        out = bench / model.replace(":", "__")
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SAMNNU_NUM_THREADS": str(max(1, share // 2)),
               "nnUNet_n_proc_DA": str(max(1, share - max(1, share // 2))), "nnUNet_def_n_proc": str(share),
               "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-c", "import sys; from samnnu.cli import benchmark_main; "
                                     "sys.exit(benchmark_main(sys.argv[1:]))",
               "-d", "4", "-m", model, "--budget-minutes", f"{args.minutes:g}", "--clock", "wall",
               "--device", device, "--timing-cases", str(args.timing_cases), "-o", str(out),
               "--data-root", args.work]
        fh = open(out / "process.log", "a")
        # started outside the repository: its samnnu/ folder (without trainers/, plans/, ...) must not shadow
        # the installed package
        procs.append((model, subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=out), fh))
        outs.append(out)
    log(f"training {', '.join(models)} side by side for {args.minutes:g} minutes each ({share} cores each)")
    failed = []
    for model, proc, fh in procs:
        if proc.wait():
            failed.append(f"{model} (exit {proc.returncode}, see {fh.name})")
        fh.close()
    if failed:
        raise SystemExit("gpu run: failed: " + "; ".join(failed))
    return outs


def encoder_throughput(encoder: str, size: int, device: str, batch: int, repeats: int = 5) -> dict:
    """Slices per second through the image encoder at ``size`` (3 x size x size inputs, inference mode),
    fp32 and bf16 autocast; median of ``repeats`` timed passes after one warm-up, synchronised."""
    import torch

    from samnnu.modeling.encoders import build_sam_parts

    enc = build_sam_parts(encoder, input_size=size, num_mask_tokens=4).image_encoder.eval().to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"encoder": encoder, "input_size": size, "batch": batch, "device": device}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def step():
            with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                enc(x)
            sync()
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out[f"slices_per_second_{name}"] = batch / statistics.median(times)
    return out


def merge(outs: list[Path], output: Path, command: str, throughput: dict | None) -> dict:
    """One results.json/results.md/learning_curves.png from the per-model benchmark folders."""
    from samnnu.benchmark.runner import CURVES_PNG, plot_learning_curves, to_markdown
    from samnnu.pipeline.budget import CURVE_FILE

    states = [json.loads((o / "results.json").read_text()) for o in outs]
    state = dict(states[0])
    state["setup"] = dict(state["setup"], command=command)
    output.mkdir(parents=True, exist_ok=True)
    for s, o in zip(states, outs):
        for run in s["runs"].values():
            run["training_iterations_per_second"] = run["iterations"] / run["training_seconds"]
            curve = next(o.glob(f"runs/*/nnUNet_results/{DATASET}/{run['trainer']}__*/fold_0/{CURVE_FILE}"))
            shutil.copy2(curve, output / f"curve_{run['trainer']}_{run['configuration']}.json")
    state["runs"] = {k: v for s in states for k, v in s["runs"].items()}
    if throughput:
        state["encoder_throughput"] = throughput
    (output / "results.json").write_text(json.dumps(state, indent=1))
    md = to_markdown(state)
    if throughput:
        md += (f"\nEncoder throughput ({throughput['encoder']}, input {throughput['input_size']}, batch "
               f"{throughput['batch']}, {throughput['device']}): {throughput['slices_per_second_fp32']:.0f} slices/s "
               f"fp32, {throughput['slices_per_second_bf16']:.0f} slices/s bf16 autocast.\n")
    md += "\nTraining iterations per second: " + ", ".join(
        f"{r['model']} {r['training_iterations_per_second']:.2f}" for r in state["runs"].values()) + "\n"
    (output / "results.md").write_text(md)
    plot_learning_curves(state, output / CURVES_PNG)
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work, args.output, args.data = (str(Path(p).resolve()) for p in (args.work, args.output, args.data))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu run: --device cuda, but torch sees no GPU")
    log(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    prepare(args, device)
    from samnnu.benchmark.runner import samnnu_default

    models = args.models or [samnnu_default(4), "nnUNetTrainer:3d_fullres"]
    outs = train_side_by_side(args, device, models, Path(args.work) / "bench")
    plans = json.loads((Path(args.work) / "nnUNet_preprocessed" / DATASET / "samnnuPlans.json").read_text())
    sam = plans["configurations"][models[0].split(":")[1]].get("sam") if models[0].split(":")[0] != "nnUNetTrainer" \
        else None
    throughput = encoder_throughput(sam["encoder"], sam["input_size"], device, 1024 if device == "cuda" else 8) \
        if sam else None
    state = merge(outs, Path(args.output), " ".join([sys.argv[0], *(argv or sys.argv[1:])]), throughput)
    for run in state["runs"].values():
        dice = run["dice"]
        log(f"{run['model']}: validation Dice {', '.join(f'{k} {v:.3f}' for k, v in dice.items())} after "
            f"{run['iterations']} iterations")
    log(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
