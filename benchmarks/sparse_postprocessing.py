"""What postprocessing the chain can see on sparse labels: its decision against keeping each label's
largest component always, for the sparse runs of a finished benchmark.

The chain decides the postprocessing on the validation predictions with nnU-Net's
``determine_postprocessing``: keeping only the largest connected component (of the foreground, then of
each label) is kept when it raises the validation Dice. With sparse labels that Dice covers the drawn
slices only, so stray components on the other slices are invisible to the decision. For every run of
``samnnu_benchmark --sparse-slices`` in ``BENCH/results.json`` this takes the run's saved validation
predictions (before postprocessing) and compares two postprocessings:

- ``chain``: nnU-Net's decision against the sparse validation labels, as the chain makes it;
- ``largest per label``: the largest component of each label kept, always (what a user who knows that
  each label is one connected object could apply; not a decision the data can support on their own).

Each is applied to the validation predictions and to the held-out test predictions (the test images
predicted again here without postprocessing and without mirroring, as the benchmark predicts them).
Both are scored against the sparse validation labels (what the decision sees) and against the
**dense** labels (validation and held-out) with samnnu's metrics. A diagnostic of where the strays are:
the share of predicted foreground voxels on validation slices whose dense reference has no foreground.
Nothing in ``BENCH`` is modified; everything is written under ``-o OUT`` (``sparse_postprocessing.json``).

    python benchmarks/sparse_postprocessing.py --data-root DATA -b BENCH -o OUT
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def _mean(evaluation: dict) -> tuple[dict, float]:
    dice = {k: v["dice"] for k, v in evaluation["mean"].items()}
    return dice, sum(dice.values()) / len(dice)


def off_structure_share(pred_dir: Path, dense_refs: Path, ending: str) -> float:
    """The share of predicted foreground voxels on slices (along the first array axis, the one the 2D
    configuration and the sparse twin slice) where the dense reference has no foreground, pooled over
    the cases of ``pred_dir``."""
    import SimpleITK as sitk

    off = total = 0
    for f in sorted(pred_dir.glob(f"*{ending}")):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(dense_refs / f.name))) > 0
        empty = ~ref.reshape(ref.shape[0], -1).any(axis=1)
        off += int(pred[empty].sum())
        total += int(pred.sum())
    return off / max(total, 1)


def one_run(run: dict, bench: Path, paths, out: Path, setup: dict) -> dict:
    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing_to_folder,
        determine_postprocessing,
        remove_all_but_largest_component_from_segmentation,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samnnu.benchmark.runner import run_folder
    from samnnu.evaluation.folders import evaluate_folders
    from samnnu.pipeline.prediction import predict
    from samnnu.safe_io import read_json

    size, slices, fold = run["train_size"], run["sparse_slices"], setup["fold"]
    ends = bool(run.get("sparse_end_slices"))
    folder_name = run_folder(size, slices, ends)
    results_root = bench / "runs" / folder_name / "nnUNet_results"
    os.environ["nnUNet_results"] = str(results_root)
    model_name = f"{run['trainer']}__{run['plans']}__{run['configuration']}"
    twin_dirs = [p for p in results_root.glob("Dataset*") if (p / model_name).is_dir()]
    if len(twin_dirs) != 1:
        sys.exit(f"{results_root}: no single trained dataset for {run['model']}")
    twin = twin_dirs[0].name
    model_dir = twin_dirs[0] / model_name
    plans = read_json(model_dir / "plans.json", "plans")
    dataset_json = read_json(model_dir / "dataset.json", "dataset.json")
    dense_json = read_json(paths.raw / setup["dataset"] / "dataset.json", "dataset.json")
    dense_refs = paths.preprocessed / setup["dataset"] / "gt_segmentations"
    ending = dataset_json["file_ending"]
    work = out / f"{run['trainer']}__{run['configuration']}__{folder_name}"
    shutil.rmtree(work, ignore_errors=True)

    test_raw = work / "test_raw"
    predict(setup["test_images"], test_raw, twin, folds=(fold,), trainer=run["trainer"],
            configuration=run["configuration"], plans=run["plans"], device="cpu", mirroring=False, postprocess=False)
    row = {"model": run["model"], "sparse_slices": slices, "sparse_end_slices": ends, "train_size": size}
    sparse_refs = paths.preprocessed / twin / "gt_segmentations"
    labels = PlansManager(plans).get_label_manager(dataset_json).foreground_labels
    for rule in ("chain", "largest per label"):
        folder = work / rule.replace(" ", "_")
        val = folder / "validation"
        val.mkdir(parents=True)
        for f in (model_dir / f"fold_{fold}" / "validation").glob(f"*{ending}"):
            shutil.copy2(f, val / f.name)
        if rule == "chain":
            decision = determine_postprocessing(str(val), str(sparse_refs), plans, dataset_json, num_processes=1)
        else:
            decision = ([remove_all_but_largest_component_from_segmentation] * len(labels),
                        [{"labels_or_regions": int(c)} for c in labels])
        val_pp, test_pp = folder / "validation_postprocessed", folder / "test_postprocessed"
        for src, dst in ((val, val_pp), (test_raw, test_pp)):
            apply_postprocessing_to_folder(str(src), str(dst), *decision, plans, dataset_json, num_processes=1)
        s_dice, s_mean = _mean(evaluate_folders(sparse_refs, val_pp, dataset_json=dataset_json, file_ending=ending))
        v_dice, v_mean = _mean(evaluate_folders(dense_refs, val_pp, dataset_json=dense_json, file_ending=ending))
        t_dice, t_mean = _mean(evaluate_folders(Path(setup["test_labels"]), test_pp, dataset_json=dense_json,
                                                file_ending=ending))
        if rule == "chain":
            row["raw_foreground_share_off_structure"] = off_structure_share(val, dense_refs, ending)
        row[rule] = {"steps": [dict(kw, function=f.__name__) for f, kw in zip(*decision)],
                     "foreground_share_off_structure": off_structure_share(val_pp, dense_refs, ending),
                     "sparse_validation_dice": s_dice, "sparse_validation_mean": s_mean,
                     "validation_dice": v_dice, "validation_mean": v_mean, "test_dice": t_dice, "test_mean": t_mean}
        print(f"{run['model']} ({slices} slices), {rule}: {len(decision[0])} step(s); validation Dice on the drawn "
              f"slices {s_mean:.3f}; against the dense labels: validation {v_mean:.3f}, held-out {t_mean:.3f}; "
              f"predicted foreground on slices without reference foreground "
              f"{row[rule]['foreground_share_off_structure']:.1%} (before postprocessing "
              f"{row['raw_foreground_share_off_structure']:.1%})", flush=True)
    return row


def main(argv=None) -> int:
    from bench_folder import open_benchmark  # beside this script

    from samnnu.safe_io import write_json_atomic

    paths, bench, out, state = open_benchmark(__doc__.splitlines()[0], argv)
    runs = [r for r in state["runs"].values() if r.get("sparse_slices")]
    if not runs:
        sys.exit(f"{bench / 'results.json'}: no run on sparse labels")
    rows = [one_run(r, bench, paths, out, state["setup"]) for r in runs]
    write_json_atomic(out / "sparse_postprocessing.json", {"benchmark": str(bench), "runs": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
