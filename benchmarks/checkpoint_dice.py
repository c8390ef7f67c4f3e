"""Dice of one checkpoint of a trained fold on the held-out test cases or the fold's validation cases.

The benchmark scores the held-out cases with each model's final checkpoint only. To compare two models
at an equal budget when one of them was trained longer (nnU-Net's 120-minute run has a checkpoint at 60
minutes, ``checkpoint_budget_50.pth``), this predicts with any checkpoint of a fold, without mirroring and
without postprocessing (as the benchmark's learning curve is measured), and scores the predictions with
samnnu's metrics:

    python benchmarks/checkpoint_dice.py --data-root DATA --results RESULTS -d 4 -f 0 \\
        -m nnUNetTrainer:3d_fullres --checkpoint checkpoint_budget_50.pth --cases test -o OUT

``RESULTS`` is the ``nnUNet_results`` folder the model was trained into (for a benchmark run,
``BENCH/runs/train_all/nnUNet_results``); ``--cases test`` takes ``imagesTs``/``labelsTs`` of the raw
dataset, ``--cases validation`` the fold's validation cases. Writes ``OUT/checkpoint_dice.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--results", required=True, help="the nnUNet_results folder the model was trained into")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("-m", "--model", required=True, help="TRAINER:CONFIGURATION")
    p.add_argument("-p", "--plans", help="default: samnnuPlans for samnnu trainers, nnUNetPlans otherwise")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--cases", choices=("test", "validation"), default="test")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)

    from samnnu.config import configure_threads, setup_environment

    paths = setup_environment(args.data_root, quiet=True)
    os.environ["nnUNet_results"] = str(Path(args.results).resolve())  # before nnU-Net is imported
    configure_threads()
    from samnnu.datasets import dataset_name
    from samnnu.evaluation.folders import evaluate_folders
    from samnnu.pipeline.prediction import predict
    from samnnu.pipeline.training import default_plans_name
    from samnnu.safe_io import read_json, write_json_atomic

    trainer, configuration = args.model.split(":")
    plans = default_plans_name(trainer, args.plans)
    name = dataset_name(args.dataset)
    dataset_json = read_json(paths.raw / name / "dataset.json", "dataset.json")
    ending = dataset_json["file_ending"]
    out = Path(args.output).resolve()
    pred = out / "predictions"
    with tempfile.TemporaryDirectory() as tmp:
        if args.cases == "test":
            images, refs = paths.raw / name / "imagesTs", paths.raw / name / "labelsTs"
        else:  # the fold's validation images, linked
            splits = read_json(paths.preprocessed / name / "splits_final.json", "splits_final.json")
            for case in splits[args.fold]["val"]:
                for f in (paths.raw / name / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"):
                    os.symlink(f, Path(tmp) / f.name)
            images, refs = Path(tmp), paths.preprocessed / name / "gt_segmentations"
        if not images.is_dir() or not any(images.iterdir()):
            sys.exit(f"{images}: no images")
        predict(images, pred, args.dataset, folds=(args.fold,), trainer=trainer, configuration=configuration,
                plans=plans, device="cpu", checkpoint=args.checkpoint, mirroring=False, postprocess=False,
                overwrite=True)
    evaluation = evaluate_folders(refs, pred, dataset_json=dataset_json, file_ending=ending)
    dice = {k: v["dice"] for k, v in evaluation["mean"].items()}
    mean = sum(dice.values()) / len(dice)
    record = {"model": args.model, "plans": plans, "checkpoint": args.checkpoint, "cases": args.cases,
              "n_cases": evaluation.get("n_cases"), "dice": dice, "mean": mean, "results": args.results}
    write_json_atomic(out / "checkpoint_dice.json", record, indent=2)
    print(f"{args.model} {args.checkpoint}, {args.cases} ({evaluation.get('n_cases')} cases): mean Dice {mean:.4f} "
          f"({' / '.join(f'{v:.4f}' for v in dice.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
