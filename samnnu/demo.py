"""``samnnu_demo``: the whole chain on the hippocampus cases shipped inside the package
(``samnnu_demo --2d``: on the shipped synthetic RGB photos with JPEG masks).

convert -> fingerprint + plans + preprocessing -> train fold 0 briefly -> validation, postprocessing,
evaluation and the fold report -> ``samnnu_predict`` on the fold's validation images -> Dice against
their labels. Everything lives under one work folder; nothing outside it is touched.
"""
from __future__ import annotations

import time
from pathlib import Path

from samnnu.config import setup_environment
from samnnu.dataset_conversion.hippocampus import convert_hippocampus
from samnnu.defaults import DEFAULT_TRAINER
from samnnu.demo_data import demo_dataset_path
from samnnu.evaluation.folders import evaluate_folders, format_dice_table, write_evaluation
from samnnu.pipeline.planning import plan_and_preprocess
from samnnu.pipeline.prediction import predict
from samnnu.pipeline.training import train

DEMO_DATASET_ID = 4
DEFAULT_ITERATIONS = 120
ITERATIONS_PER_EPOCH = 40


def run_demo(output: str | None = None, *, iterations: int | None = None, encoder: str = "litemedsam",
             device: str | None = None) -> dict:
    """Run the demo; returns the Dice per class of the predicted validation cases and the report path."""
    work = Path(output or "samnnu_demo_output").resolve()
    paths = setup_environment(work)
    start = time.time()

    step = _steps(5)
    step("converting the shipped hippocampus cases")
    conversion = convert_hippocampus(demo_dataset_path(), DEMO_DATASET_ID, raw_root=paths.raw, overwrite=True)

    result, trained = _plan_and_train(step, DEMO_DATASET_ID, encoder, iterations, device)

    step("samnnu_predict on the fold's validation images")
    val_cases = _validation_cases(result, ".nii.gz")
    raw = Path(conversion.dataset_folder)
    inputs = _links(work / "demo_inputs", {f"{c}_0000.nii.gz": raw / "imagesTr" / f"{c}_0000.nii.gz"
                                           for c in val_cases})
    predictions = work / "demo_predictions"
    predict(inputs, predictions, DEMO_DATASET_ID, folds=(0,), trainer=DEFAULT_TRAINER, configuration="2d",
            device=device, mirroring=False)

    step("evaluating the predictions against their labels")
    evaluation = evaluate_folders(raw / "labelsTr", predictions, dataset_json=str(raw / "dataset.json"))
    write_evaluation(evaluation, work / "demo_evaluation.json")
    minutes = (time.time() - start) / 60
    print(format_dice_table(evaluation))
    dice = {name: m["dice"] for name, m in evaluation["mean"].items()}
    print(f"\nsamnnu demo finished in {minutes:.1f} min: {trained} training iterations on "
          f"{len(conversion.converted) - len(val_cases)} cases, {len(val_cases)} held-out cases predicted.")
    print("Mean Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
          + "  (a short CPU training; more iterations and cases reach higher: docs/benchmarks.md)")
    print(f"Fold report: {result['report']}")
    return {"dice": dice, "report": result["report"], "minutes": minutes}


PHOTO_DATASET_ID = 501
PHOTO_LABELS = {"background": 0, "polyp": 255}  # the values the JPEG masks store
PHOTO_MASK_THRESHOLD = 128


def run_demo_2d(output: str | None = None, *, iterations: int | None = None, encoder: str = "litemedsam",
                device: str | None = None) -> dict:
    """The same chain on the shipped synthetic RGB photos with JPEG masks (``samnnu_demo --2d``): convert
    with the masks' stored values and a threshold, plan, train fold 0 briefly, predict the validation
    photos straight from their JPEG files, and evaluate against the user's own JPEG masks."""
    from samnnu.dataset_conversion.folder import convert_folder  # local: pulls in PIL
    from samnnu.demo_data import demo_photos_path

    work = Path(output or "samnnu_demo_2d_output").resolve()
    paths = setup_environment(work)
    start = time.time()
    src = demo_photos_path()

    step = _steps(5)
    step("converting the shipped photos (RGB JPEG) and their JPEG masks")
    conversion = convert_folder(src / "images", src / "masks", PHOTO_DATASET_ID, "Polyps", dict(PHOTO_LABELS),
                                raw_root=paths.raw, overwrite=True, mask_threshold=PHOTO_MASK_THRESHOLD)
    for line in conversion.summary_lines()[1:]:
        print(line)

    result, trained = _plan_and_train(step, PHOTO_DATASET_ID, encoder, iterations, device)

    step("samnnu_predict on the fold's validation photos, read straight from their JPEG files")
    val_cases = _validation_cases(result, ".png")
    inputs = _links(work / "demo_inputs", {f"{c}.jpg": src / "images" / f"{c}.jpg" for c in val_cases})
    predictions = work / "demo_predictions"
    predict(inputs, predictions, PHOTO_DATASET_ID, folds=(0,), trainer=DEFAULT_TRAINER, configuration="2d",
            device=device, mirroring=False)

    step("evaluating the predicted PNG masks (0/255) against the original JPEG masks")
    raw = Path(conversion.dataset_folder)
    references = _links(work / "demo_references", {f"{c}.jpg": src / "masks" / f"{c}.jpg" for c in val_cases})
    evaluation = evaluate_folders(references, predictions, dataset_json=str(raw / "dataset.json"),
                                  reference_threshold=PHOTO_MASK_THRESHOLD)
    write_evaluation(evaluation, work / "demo_evaluation.json")
    minutes = (time.time() - start) / 60
    print(format_dice_table(evaluation))
    dice = {name: m["dice"] for name, m in evaluation["mean"].items()}
    print(f"\nsamnnu demo (2D photos) finished in {minutes:.1f} min: {trained} training iterations on "
          f"{len(conversion.converted) - len(val_cases)} photos, {len(val_cases)} held-out photos predicted "
          f"into {predictions}.")
    print("Mean Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    print(f"Fold report: {result['report']}")
    return {"dice": dice, "report": result["report"], "minutes": minutes, "predictions": str(predictions)}


def _plan_and_train(step, dataset_id: int, encoder: str, iterations: int | None, device: str | None) -> tuple[dict, int]:
    """Plan and preprocess ``2d``, then train fold 0 of samnnu's default trainer briefly with the chain after it;
    returns (train()'s result, iterations trained)."""
    step("fingerprint, plans, preprocessing")
    plan_and_preprocess(dataset_id, configurations=("2d",), encoder=encoder)
    iterations = iterations or DEFAULT_ITERATIONS
    per_epoch = min(ITERATIONS_PER_EPOCH, iterations)
    epochs = max(1, round(iterations / per_epoch))
    step(f"training fold 0: {epochs} epoch(s) x {per_epoch} iterations, then validation, postprocessing, "
         f"evaluation and report")
    result = train(dataset_id, 0, trainer=DEFAULT_TRAINER, configuration="2d", epochs=epochs,
                   iters_per_epoch=per_epoch, device=device, mirroring=False)
    return result, epochs * per_epoch


def _validation_cases(result: dict, ending: str) -> list[str]:
    """The case names of the fold's validation predictions (files ending in ``ending``)."""
    return sorted(p.name[: -len(ending)] for p in (Path(result["fold_dir"]) / "validation").glob(f"*{ending}"))


def _links(folder: Path, targets: dict[str, Path]) -> Path:
    """``folder`` holding a symbolic link ``name`` -> ``target`` for each entry (inputs are never copied)."""
    folder.mkdir(exist_ok=True)
    for name, target in targets.items():
        link = folder / name
        if not link.exists():
            link.symlink_to(target)
    return folder


def _steps(total: int):
    count = [0]

    def step(text: str) -> None:
        count[0] += 1
        print(f"\n[samnnu demo {count[0]}/{total}] {text}", flush=True)

    return step
