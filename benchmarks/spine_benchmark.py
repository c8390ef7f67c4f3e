"""SAMedLoRATrainer vs nnU-Net's own nnUNetTrainer on one fold at the same number of iterations.

Each model is trained in its own process through ``samnnu_train`` (so peak memory is that process's
alone, read with /usr/bin/time -v), then validated, postprocessed and evaluated by the same chain
and the same evaluator. Writes ``results.json`` and ``results.md`` into ``--output``; a model whose
result is already there is not run again.

    python benchmarks/spine_benchmark.py -d 4 --data-root /work/bench_data --epochs 5 --iters 50 \
        --output docs/bench_spine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

MODELS = [
    # (trainer, plans)
    ("SAMedLoRATrainer", "samnnuPlans"),
    ("nnUNetTrainer", "nnUNetPlans"),
]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except Exception:  # noqa: BLE001 - informational only
        return platform.processor() or "unknown"


def run_model(trainer: str, plans: str, args) -> dict:
    cmd = ["/usr/bin/time", "-v", "samnnu_train", str(args.dataset), str(args.fold), "-tr", trainer, "-p", plans,
           "-c", args.configuration, "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters),
           "--data-root", args.data_root, "--no-mirroring", "--device", args.device]
    log = Path(args.output) / f"{trainer}.log"
    start = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - start
    text = log.read_text(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{trainer} failed (exit {proc.returncode}); see {log}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    fold_dir = Path(args.data_root) / "nnUNet_results" / f"Dataset{int(args.dataset):03d}_Hippocampus" / \
        f"{trainer}__{plans}__{args.configuration}" / f"fold_{args.fold}"
    report = json.loads((fold_dir / "report.json").read_text())
    evaluation = json.loads((fold_dir / "evaluation.json").read_text())
    extra = report.get("extra", {})
    plans_summary = report.get("plans_summary", {})
    iterations = args.epochs * args.iters
    return {
        "trainer": trainer, "plans": plans, "configuration": args.configuration, "fold": args.fold,
        "iterations": iterations, "batch_size": plans_summary.get("batch_size"),
        "dice": {k: v["dice"] for k, v in evaluation["mean"].items()},
        "hd95_mm": {k: v["hd95"] for k, v in evaluation["mean"].items()},
        "n_validation_cases": evaluation["n_cases"],
        "training_seconds": extra.get("training_seconds"),
        "seconds_per_iteration_incl_epoch_validation": (extra.get("training_seconds") or 0) / iterations,
        "inference_seconds_per_volume_no_mirroring": extra.get("inference_seconds_per_case"),
        "peak_rss_gb": rss_kb / 1024 ** 2,
        "trainable_parameters": plans_summary.get("trainable_parameters"),
        "process_wall_seconds": wall,
    }


def _mm(value) -> str:
    """HD95 in mm, or '-' where the class was never predicted (no distance exists)."""
    return "-" if value is None else f"{value:.2f}"


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Machine: {meta['cpu']}, {meta['cores']} cores, device {meta['device']}; dataset {meta['dataset']}, "
             f"fold {meta['fold']}, {meta['iterations']} training iterations per model "
             f"({meta['epochs']} epochs x {meta['iters']}).", "",
             "| model | batch | Dice anterior | Dice posterior | HD95 mm (ant/post) | train s | s/iter | "
             "inference s/volume | peak RSS GB | trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d, h = list(r["dice"].values()), list(r["hd95_mm"].values())
        lines.append(f"| {r['trainer']} ({r['plans']} {r['configuration']}) | {r['batch_size']} | {d[0]:.3f} | "
                     f"{d[1]:.3f} | {_mm(h[0])} / {_mm(h[1])} | {r['training_seconds']:.0f} | "
                     f"{r['seconds_per_iteration_incl_epoch_validation']:.2f} | "
                     f"{r['inference_seconds_per_volume_no_mirroring']:.2f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['trainable_parameters']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", "--dataset", default="4")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--data-root", required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True)
    p.add_argument("--models", nargs="+", default=[f"{t}:{pl}" for t, pl in MODELS],
                   help="trainer:plans pairs (default: SAMedLoRATrainer and nnU-Net's nnUNetTrainer)")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    done = json.loads(results_file.read_text())["results"] if results_file.is_file() else []
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "device": args.device, "dataset": args.dataset,
            "fold": args.fold, "epochs": args.epochs, "iters": args.iters, "iterations": args.epochs * args.iters,
            "command": " ".join([sys.executable] + sys.argv)}
    for trainer, plans in (m.split(":") for m in args.models):
        if any(r["trainer"] == trainer and r["plans"] == plans and r["iterations"] == args.epochs * args.iters
               for r in done):
            continue
        print(f"running {trainer} ...", flush=True)
        done.append(run_model(trainer, plans, args))
        tmp = results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": done}, indent=2))
        os.replace(tmp, results_file)
    (out / "results.md").write_text(to_markdown(done, meta))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
