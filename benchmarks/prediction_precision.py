"""What ``samnnu_predict --precision bf16`` changes: Dice, labels and probabilities against float32, on one model.

A trained model folder predicts the validation cases of one fold (from the data root's ``splits_final.json``)
twice, as ``samnnu_predict`` runs it on a CPU (:class:`samnnu.pipeline.inference.BatchedPredictor`, in this
process, no postprocessing): once in float32 and once with the network under bfloat16 autocast. For every case
and label it reports the Dice of each against the reference label map, the voxels whose label differs between
the two, and the largest difference of a class probability. The seconds of each pass are recorded too (one
pass each, fp32 first; ``benchmarks/prediction_speed.py --also-bf16`` is the interleaved timing).

    python benchmarks/prediction_precision.py --data-root ROOT -d 4 -m MODEL_FOLDER -f 0 -o OUT

Run it alone on the machine; it writes ``OUT/prediction_precision.json`` and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path


def predict_folder(model: Path, fold: int, lists: list[list[str]], targets: list[str], precision: str,
                   mirroring: bool) -> float:
    """Predict ``lists`` into ``targets`` (label maps and probabilities); seconds per case."""
    import torch

    from samnnu.defaults import FINAL_CHECKPOINT
    from samnnu.pipeline.inference import BatchedPredictor
    from samnnu.safe_io import weights_only_loading

    p = BatchedPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                         perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                         verbose_preprocessing=False, allow_tqdm=False, case_progress=True, precision=precision)
    with weights_only_loading():
        p.initialize_from_trained_model_folder(str(model), use_folds=(fold,), checkpoint_name=FINAL_CHECKPOINT)
    start = time.perf_counter()
    p.predict_from_files(lists, targets, save_probabilities=True, overwrite=True, num_processes_preprocessing=0,
                         num_processes_segmentation_export=0)
    return (time.perf_counter() - start) / len(lists)


def compare(cases: list[str], labels_dir: Path, a_dir: Path, b_dir: Path, ending: str,
            classes: dict[str, int]) -> list[dict]:
    """Per case: Dice of each label for both predictions, voxels whose label differs, largest probability difference."""
    import numpy as np

    from samnnu.evaluation.metrics import dice
    from samnnu.pipeline.prediction import read_image

    rows = []
    for case in cases:
        ref, a, b = (read_image(folder / f"{case}{ending}")[0] for folder in (labels_dir, a_dir, b_dir))
        with np.load(a_dir / f"{case}.npz") as pa, np.load(b_dir / f"{case}.npz") as pb:
            prob_diff = float(np.abs(pa["probabilities"].astype(np.float64) - pb["probabilities"]).max())
        rows.append({"case": case, "voxels_changed": int((a != b).sum()), "reference_foreground_voxels": int((ref > 0).sum()),
                     "max_probability_difference": prob_diff,
                     "dice_fp32": {n: dice(a == v, ref == v) for n, v in classes.items()},
                     "dice_bf16": {n: dice(b == v, ref == v) for n, v in classes.items()}})
    return rows


def summarise(rows: list[dict], classes: dict[str, int]) -> dict:
    def mean_dice(key: str) -> float:
        return statistics.mean(statistics.mean(r[key].values()) for r in rows)

    diffs = [statistics.mean(r["dice_bf16"].values()) - statistics.mean(r["dice_fp32"].values()) for r in rows]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"cases": len(rows), "mean_dice_fp32": mean_dice("dice_fp32"), "mean_dice_bf16": mean_dice("dice_bf16"),
            "per_class_fp32": {n: statistics.mean(r["dice_fp32"][n] for r in rows) for n in classes},
            "per_class_bf16": {n: statistics.mean(r["dice_bf16"][n] for r in rows) for n in classes},
            "paired_difference_mean": statistics.mean(diffs), "paired_difference_standard_error": se,
            "largest_case_difference": max(diffs, key=abs),
            "voxels_changed": sum(r["voxels_changed"] for r in rows),
            "cases_with_changed_voxels": sum(r["voxels_changed"] > 0 for r in rows),
            "max_probability_difference": max(r["max_probability_difference"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="samnnu data root (nnUNet_raw, nnUNet_preprocessed, ...)")
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    parser.add_argument("-m", "--model", required=True, type=Path, help="trained model folder (TRAINER__PLANS__CONF)")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for prediction_precision.json")
    parser.add_argument("--cases", type=int, default=None, help="only the first N validation cases")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring (default off, as validation)")
    args = parser.parse_args()

    from samnnu.config import configure_threads, setup_environment
    from samnnu.datasets import dataset_name
    from samnnu.evaluation.metrics import foreground_classes
    from samnnu.quiet import quiet_warnings, third_party_output
    from samnnu.safe_io import write_json_atomic

    paths = setup_environment(args.data_root, quiet=True)
    threads = configure_threads()
    name = dataset_name(args.dataset)
    dataset_json = json.loads((paths.raw / name / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    classes = {n: v for n, v in foreground_classes(dataset_json["labels"]).items() if isinstance(v, int)}
    split = json.loads((paths.preprocessed / name / "splits_final.json").read_text())[args.fold]["val"]
    cases = sorted(split)[: args.cases] if args.cases else sorted(split)
    images = paths.raw / name / "imagesTr"
    lists = [sorted(str(p) for p in images.glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}")) for c in cases]
    args.output.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with quiet_warnings(), third_party_output(shown=False), tempfile.TemporaryDirectory() as tmp:
        folders = {precision: Path(tmp) / precision for precision in ("fp32", "bf16")}
        for precision, folder in folders.items():
            folder.mkdir()
            seconds[precision] = predict_folder(args.model, args.fold, lists, [str(folder / c) for c in cases],
                                                precision, args.mirroring)
        rows = compare(cases, paths.raw / name / "labelsTr", folders["fp32"], folders["bf16"], ending, classes)
    summary = summarise(rows, classes)
    from samnnu.modeling.common import cpu_computes_bf16

    result = {"model": str(args.model), "fold": args.fold, "mirroring": args.mirroring, "torch_threads": threads,
              "machine": platform.processor() or platform.machine(), "cpu_computes_bf16": cpu_computes_bf16(),
              "seconds_per_case_one_pass_fp32_first": seconds,
              "summary": summary, "cases": rows}
    write_json_atomic(args.output / "prediction_precision.json", result)
    print(f"{summary['cases']} cases: mean Dice fp32 {summary['mean_dice_fp32']:.4f}, bf16 {summary['mean_dice_bf16']:.4f} "
          f"(paired {summary['paired_difference_mean']:+.5f} +- {summary['paired_difference_standard_error']:.5f}); "
          f"{summary['voxels_changed']} voxels changed in {summary['cases_with_changed_voxels']} cases; largest "
          f"probability difference {summary['max_probability_difference']:.4f}; s/case {seconds['fp32']:.2f} fp32, "
          f"{seconds['bf16']:.2f} bf16 (one pass each, fp32 first)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
