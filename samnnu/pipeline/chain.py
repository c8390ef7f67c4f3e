"""The fixed chain after training a fold: validation -> postprocessing -> evaluation -> report."""
from __future__ import annotations

import time
from pathlib import Path

from samnnu.config import current_paths, num_processes
from samnnu.evaluation.folders import evaluate_folders, write_evaluation
from samnnu.modeling.common import count_parameters
from samnnu.reporting.report import write_fold_report


def plans_summary(trainer) -> dict:
    """What a reader of a fold report needs to know about the model that was trained."""
    cm = trainer.configuration_manager
    summary = {
        "dataset": trainer.plans_manager.dataset_name,
        "plans": trainer.plans_manager.plans_name,
        "configuration": trainer.configuration_name,
        "trainer": trainer.__class__.__name__,
        "fold": trainer.fold,
        "spacing": cm.spacing,
        "patch_size": cm.patch_size,
        "batch_size": trainer.batch_size,
        "normalization": cm.normalization_schemes,
        "epochs": trainer.num_epochs,
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "parameters": count_parameters(trainer.network),
        "trainable_parameters": count_parameters(trainer.network, trainable_only=True),
    }
    sam = cm.configuration.get("sam")
    if sam:
        summary.update({"encoder": sam["encoder"], "sam_input_size": sam["input_size"],
                        "intensity_windows": sam["intensity_windows"]})
    return summary


def run_fold_chain(trainer, *, train_seconds: float | None = None, save_probabilities: bool = False) -> dict:
    """Predict the fold's validation cases, decide postprocessing, evaluate and write the report.

    ``save_probabilities``: keep the validation softmax (``validation/CASE.npz``, as ``nnUNetv2_train
    --npz`` does), so that ``samnnu_summarize`` can ensemble this model with others.

    Returns {"evaluation": path, "report": path, "dice": {class: mean Dice}, "inference_seconds_per_case": s}.
    """
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    fold_dir = Path(trainer.output_folder)
    val_dir = fold_dir / "validation"
    ref_dir = Path(trainer.preprocessed_dataset_folder_base) / "gt_segmentations"

    start = time.time()
    trainer.perform_actual_validation(save_probabilities=save_probabilities)
    _, val_keys = trainer.do_split()
    inference_per_case = (time.time() - start) / max(1, len(val_keys))

    pp_fns, _ = determine_postprocessing(str(val_dir), str(ref_dir), trainer.plans_manager.plans,
                                         trainer.dataset_json, num_processes=num_processes(),
                                         keep_postprocessed_files=True)
    final_dir = val_dir / "postprocessed" if pp_fns else val_dir
    evaluation = evaluate_folders(ref_dir, final_dir, dataset_json=trainer.dataset_json,
                                  file_ending=trainer.dataset_json["file_ending"])
    eval_json, _ = write_evaluation(evaluation, fold_dir / "evaluation.json")

    training_log = trainer.logger.get_checkpoint()
    images_dir = current_paths().raw / trainer.plans_manager.dataset_name / "imagesTr"
    extra = {
        "device": str(trainer.device),
        "training_seconds": train_seconds,
        "inference_seconds_per_case": inference_per_case,
        "validation_cases": len(val_keys),
        "postprocessing": [f.__name__ for f in pp_fns] or "none (did not improve validation Dice)",
        "test_time_mirroring": trainer.inference_allowed_mirroring_axes is not None,
    }
    write_fold_report(fold_dir, evaluation, plans_summary=plans_summary(trainer), training=training_log,
                      val_pred_dir=final_dir, val_ref_dir=ref_dir,
                      images_dir=images_dir if images_dir.is_dir() else None, extra=extra)
    dice = {name: values.get("dice") for name, values in evaluation["mean"].items()}
    return {"evaluation": str(eval_json), "report": str(fold_dir / "report.html"), "dice": dice,
            "inference_seconds_per_case": inference_per_case}
