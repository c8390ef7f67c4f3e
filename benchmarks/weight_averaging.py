"""Averaged weights against the last training weights of the same run: a paired comparison.

A trainer that averages its weights (``weight_average_gamma``; SAMUNetTrainer) keeps two weight sets in
every checkpoint: the average as ``network_weights`` (what prediction and the chain use) and the training
weights beside it (``samnnu_weight_average``, what training resumes from). For each budgeted run of a
finished ``samnnu_benchmark`` folder that has them, this predicts with both sets from the same
checkpoints, so the difference is the averaging alone, not a second run:

- the validation cases of the fold, for every checkpoint of the learning curve (25 %, 50 % of the budget
  and the final one), no mirroring, no postprocessing, as the benchmark's learning curve is measured;
- the held-out test cases with the final checkpoint, no mirroring, no postprocessing.

Both are scored against the reference labels with samnnu's metrics; a run trained on sparse labels
(``--sparse-slices``) against the dense labels, as the benchmark scores it. Nothing in ``BENCH`` is
modified: the training weights are written as checkpoints of a linked copy of each model folder under
``-o OUT``, beside the predictions and ``weight_averaging.json``.

    python benchmarks/weight_averaging.py --data-root DATA -b BENCH -o OUT
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

CHECKPOINTS = ("checkpoint_budget_25.pth", "checkpoint_budget_50.pth", "checkpoint_final.pth")


def training_weights_checkpoint(path: Path, target: Path) -> Path | None:
    """Write ``path``'s training weights to ``target`` as a checkpoint of their own (its network weights
    replaced by them) and return ``target``; None when the checkpoint holds no second weight set."""
    import torch

    from samnnu.safe_io import check_torch_archive, load_torch_safely, write_atomic
    from samnnu.trainers.averaging import CHECKPOINT_KEY

    checkpoint = load_torch_safely(path)
    if CHECKPOINT_KEY not in checkpoint:
        return None
    stored = checkpoint.pop(CHECKPOINT_KEY)
    checkpoint["network_weights"] = dict(checkpoint["network_weights"], **stored["weights"])
    write_atomic(target, lambda tmp: torch.save(checkpoint, tmp), check_torch_archive)
    return target


def model_copy(model_dir: Path, fold: int, root: Path) -> Path:
    """A model folder under ``root`` (``root/DATASET/MODEL``) whose files link to ``model_dir``'s, for
    the fold's files too: the training-weight checkpoints are written there, not into the benchmark."""
    copy = root / model_dir.parent.name / model_dir.name
    for src, dst in ((model_dir, copy), (model_dir / f"fold_{fold}", copy / f"fold_{fold}")):
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and not (dst / f.name).exists():
                (dst / f.name).symlink_to(f.resolve())
    return copy


def _mean(evaluation: dict) -> tuple[dict, float]:
    dice = {k: v["dice"] for k, v in evaluation["mean"].items()}
    return dice, sum(dice.values()) / len(dice)


def one_run(run: dict, bench: Path, paths, out: Path, setup: dict) -> dict:
    from samnnu.benchmark.runner import run_folder
    from samnnu.evaluation.folders import evaluate_folders
    from samnnu.pipeline.prediction import predict
    from samnnu.safe_io import read_json

    fold, dense = setup["fold"], setup["dataset"]
    folder = run_folder(run["train_size"], run.get("sparse_slices"), bool(run.get("sparse_end_slices")))
    results_root = bench / "runs" / folder / "nnUNet_results"
    model = f"{run['trainer']}__{run['plans']}__{run['configuration']}"
    trained = [p.name for p in results_root.glob("Dataset*") if (p / model).is_dir()]  # a sparse run: the twin
    if len(trained) != 1:
        sys.exit(f"{results_root}: no single trained dataset for {run['model']}")
    dataset = trained[0]
    work = out / f"{run['trainer']}__{run['configuration']}__{folder}"
    fold_dir = model_copy(results_root / dataset / model, fold, work / "nnUNet_results") / f"fold_{fold}"
    os.environ["nnUNet_results"] = str(work / "nnUNet_results")
    dataset_json = read_json(paths.raw / dense / "dataset.json", "dataset.json")
    ending = dataset_json["file_ending"]
    refs = paths.preprocessed / dense / "gt_segmentations"  # the dense labels, also for a sparse run
    val_cases = sorted(read_json(paths.preprocessed / dense / "splits_final.json", "splits")[fold]["val"])
    row = {"model": run["model"], "train_size": run["train_size"], "sparse_slices": run.get("sparse_slices"),
           "sparse_end_slices": bool(run.get("sparse_end_slices")), "points": []}
    kw = dict(folds=(fold,), trainer=run["trainer"], configuration=run["configuration"], plans=run["plans"],
              device="cpu", mirroring=False, postprocess=False, overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:  # the validation images, linked
        for case in val_cases:
            for f in (paths.raw / dense / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"):
                os.symlink(f, Path(tmp) / f.name)
        for name in CHECKPOINTS:
            if not (fold_dir / name).is_file():
                continue
            training = training_weights_checkpoint(fold_dir / name,
                                                   fold_dir / name.replace(".pth", "_training_weights.pth"))
            if training is None:
                print(f"{fold_dir / name}: no training weights beside the average; skipped", flush=True)
                continue
            point = {"checkpoint": name}
            for variant, file in (("average", name), ("training_weights", training.name)):
                pred = work / name.removesuffix(".pth") / variant
                predict(tmp, pred / "validation", dataset, checkpoint=file, **kw)
                point[variant] = dict(zip(("validation_dice", "validation_mean"), _mean(
                    evaluate_folders(refs, pred / "validation", dataset_json=dataset_json, file_ending=ending))))
                if name == "checkpoint_final.pth" and setup.get("test_images"):
                    predict(setup["test_images"], pred / "test", dataset, checkpoint=file, **kw)
                    point[variant].update(zip(("test_dice", "test_mean"), _mean(evaluate_folders(
                        Path(setup["test_labels"]), pred / "test", dataset_json=dataset_json, file_ending=ending))))
            a, t = point["average"], point["training_weights"]
            print(f"{run['model']} ({folder}) {name}: validation {a['validation_mean']:.4f} averaged, "
                  f"{t['validation_mean']:.4f} last weights"
                  + (f"; held-out {a['test_mean']:.4f} / {t['test_mean']:.4f}" if "test_mean" in a else ""),
                  flush=True)
            row["points"].append(point)
    return row


def main(argv=None) -> int:
    from bench_folder import open_benchmark  # beside this script

    from samnnu.config import configure_threads
    from samnnu.safe_io import write_json_atomic

    paths, bench, out, state = open_benchmark(__doc__.splitlines()[0], argv)
    configure_threads()
    runs = [r for r in state["runs"].values() if r.get("budget")]
    if not runs:
        sys.exit(f"{bench / 'results.json'}: no budgeted run")
    rows = [row for r in runs if (row := one_run(r, bench, paths, out, state["setup"]))["points"]]
    write_json_atomic(out / "weight_averaging.json", {"benchmark": str(bench), "runs": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
