"""Side-by-side benchmark of samnnu trainers and plain nnU-Net on the same fold, budget and chain.

By default the models are samnnu's default (the trainer and configuration ``samnnu_train`` would
pick) and plain nnU-Net in every configuration its planner made; verdicts compare samnnu's default
with the best of those. Every model (``trainer:configuration``) is trained in its own process through
:func:`samnnu.pipeline.training.train` (so its peak memory is its own), on the same seeded subset of the
fold's training cases for each training-set size.

The headline budget is time: each model trains on its normal full-length schedule and is stopped
when the budget is spent (CPU minutes of its processes on a CPU, which other jobs cannot spend;
wall-clock minutes on a GPU), with checkpoints at 25 % and 50 % of the budget validated as a learning
curve. Secondary modes, labelled as such in the results: the minutes converted into iterations with
the schedule squeezed into them, and equal iterations.

Each run then goes through samnnu's fixed chain (validation without test-time mirroring -> nnU-Net's
postprocessing decision -> samnnu's evaluation), its inference speed is timed with and without
mirroring on a few validation volumes, and the external test set (by default the dataset's
``imagesTs``/``labelsTs``, written by ``samnnu_convert --hold-out``) is predicted and evaluated.
Results go to ``results.json``, ``results.md`` and ``learning_curves.png``; a finished run is never
repeated, an interrupted one resumes from its last checkpoint with the budget it had spent.

Sparse annotations (``sparse_slices``): samnnu's default and nnU-Net's best configuration (from the dense
runs) are trained again, with the same budget and training cases, on a twin of the dataset whose
training labels keep only N annotated slices per volume (:mod:`samnnu.pipeline.sparse`), and evaluated
against the dense labels.

Nothing is tuned per model: each one trains with its plans' defaults (patch, batch, learning rate).
"""
from __future__ import annotations

import math
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from samnnu.config import current_paths, prediction_processes, setup_environment
from samnnu.datasets import dataset_name, ensure_splits, model_folder
from samnnu.defaults import CHECKPOINTS_NEWEST_FIRST, FINAL_CHECKPOINT, PLANS_NAME
from samnnu.errors import SamnnuError
from samnnu.pipeline.budget import CLOCKS
from samnnu.pipeline.prediction import predict
from samnnu.pipeline.sparse import sparse_twin
from samnnu.pipeline.training import default_model, default_plans_name, get_trainer_class, pick_device, train
from samnnu.safe_io import (
    read_json,
    to_jsonable,
    weights_only_loading,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)
from samnnu.trainers import samnnu_trainers

RESULTS = "results.json"
MARKDOWN = "results.md"
NNUNET_TRAINER = "nnUNetTrainer"


@dataclass(frozen=True)
class Model:
    trainer: str
    configuration: str
    plans: str

    @property
    def key(self) -> str:
        return f"{self.trainer}:{self.configuration}"

    @property
    def is_samnnu(self) -> bool:
        return self.trainer in samnnu_trainers()


def parse_model(text: str) -> Model:
    """``trainer:configuration[:plans]``; plans default to samnnuPlans (samnnu trainers) or nnUNetPlans."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise SamnnuError(f"model '{text}': expected trainer:configuration (e.g. SAMedLoRATrainer:2d or "
                          f"nnUNetTrainer:3d_fullres)")
    return Model(parts[0], parts[1], default_plans_name(parts[0], parts[2] if len(parts) == 3 else None))


def size_label(size: int | None) -> str:
    return "all" if size is None else str(size)


def parse_size(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise SamnnuError(f"training-set size '{text}': expected a positive number or 'all'") from None
    if n < 1:
        raise SamnnuError(f"training-set size {n}: must be at least 1")
    return n


def training_subsets(train_keys: list[str], sizes: list[int | None], seed: int) -> dict[str, list[str] | None]:
    """The same seeded subsets for every model: prefixes of one shuffled order, so smaller subsets are
    contained in larger ones. ``None`` (all cases) maps to ``None``."""
    order = sorted(train_keys)
    random.Random(seed).shuffle(order)
    out = {}
    for n in sizes:
        if n is not None and n > len(order):
            raise SamnnuError(f"training-set size {n} exceeds the fold's {len(order)} training cases")
        out[size_label(n)] = None if n is None else sorted(order[:n])
    return out


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------------------------- worker

def _worker(spec: dict) -> dict:
    """Train, validate, time and (optionally) test one model on one training-set size; runs in its own process."""
    setup_environment(spec["data_root"], quiet=True)
    os.environ["nnUNet_results"] = spec["results_root"]  # before nnunetv2 is imported: keep runs apart
    Path(spec["results_root"]).mkdir(parents=True, exist_ok=True)
    import torch  # local: torch takes seconds to import

    if spec.get("timing_only"):
        out = _time_inference(spec, dataset_name(spec["dataset"]), Path(spec["fold_dir"]))
        out["timing_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
        return out
    if spec.get("ensembles_only"):
        return _ensembles(spec)
    kwargs = dict(trainer=spec["trainer"], configuration=spec["configuration"], plans=spec["plans"],
                  epochs=spec.get("epochs"), iters_per_epoch=spec.get("iters_per_epoch"), device=spec["device"],
                  mirroring=False, train_cases=spec["train_cases"], budget_minutes=spec.get("budget_minutes"),
                  budget_clock=spec.get("budget_clock", "wall"))
    if spec.get("calibrate"):
        result = train(spec["dataset"], spec["fold"], run_chain=False, **kwargs)
        return {"seconds_per_iteration": result["train_seconds"] / (spec["epochs"] * spec["iters_per_epoch"])}
    # resume an interrupted run of this very spec (a finished one is recognised by checkpoint_final.pth)
    name = dataset_name(spec["dataset"])
    fold_dir = model_folder(name, spec["trainer"], spec["plans"], spec["configuration"], fold=spec["fold"])
    resume = any((fold_dir / f).is_file() for f in CHECKPOINTS_NEWEST_FIRST)
    result = train(spec["dataset"], spec["fold"], continue_training=resume,
                   save_probabilities=spec.get("save_probabilities", False), **kwargs)
    fold_dir = Path(result["fold_dir"])
    report = read_json(fold_dir / "report.json", "fold report")
    if spec.get("reference_dataset"):  # sparse labels: the chain's final predictions against the dense labels
        from samnnu.evaluation.folders import evaluate_folders  # local: pulls in scipy (slow to import)

        gt, dataset_json = _references(spec)
        evaluation = evaluate_folders(gt, Path(report["val_pred_dir"]), dataset_json=dataset_json,
                                      file_ending=dataset_json["file_ending"])
    else:
        evaluation = read_json(result["evaluation"], "evaluation")
    summary = report.get("plans_summary", {})
    budget = result.get("budget")
    iterations = budget["stopped_at"]["iterations"] if budget else spec["epochs"] * spec["iters_per_epoch"]
    # a budgeted run's own record spans every process of a resumed run, and only the training loop
    training_seconds = budget["stopped_at"]["wall_seconds"] if budget else result["train_seconds"]
    out = {
        "dice": {k: v.get("dice") for k, v in evaluation["mean"].items()},
        "hd95_mm": {k: v.get("hd95") for k, v in evaluation["mean"].items()},
        "n_validation_cases": evaluation.get("n_cases"),
        "iterations": iterations,
        "batch_size": summary.get("batch_size"),
        "patch_size": summary.get("patch_size"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "training_seconds": training_seconds,
        "seconds_per_iteration": training_seconds / max(1, iterations),
        "resumed": resume,
        "probabilities_saved": bool(spec.get("save_probabilities")),
    }
    if budget:
        out["budget"] = {"clock": budget["clock"], "minutes": budget["budget_seconds"] / 60,
                         "spent_minutes": budget["stopped_at"]["spent_seconds"] / 60,
                         "wall_minutes": budget["stopped_at"]["wall_seconds"] / 60}
        out["learning_curve"] = _learning_curve(spec, name, fold_dir, budget)
        out["pseudo_dice_curve"] = [
            {"iterations": p["iterations"], "spent_minutes": p["spent_seconds"] / 60,
             "pseudo_dice": p.get("pseudo_dice"), "ema_pseudo_dice": p["ema_pseudo_dice"]}
            for p in budget["curve"]]
    out.update(_time_inference(spec, name, fold_dir))
    if spec.get("test_images"):
        out["test"] = _external_test(spec, name)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    if torch.cuda.is_available() and spec["device"] != "cpu":
        out["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return out


def _ensembles(spec: dict) -> dict:
    """Every two-model ensemble of one training-set size's runs (averaged validation probabilities),
    evaluated by :func:`samnnu.evaluation.summary.compare_models` on the same validation cases."""
    from samnnu.evaluation.summary import compare_models  # local: pulls in scipy (slow to import)

    summary = compare_models(dataset_name(spec["dataset"]), Path(spec["out_dir"]), ensembles=True)
    return {"ensembles": [{"members": e["members"], "dice": {k: v["mean"] for k, v in e["dice"].items()},
                           "foreground_dice_mean": e["foreground_dice"]["mean"]} for e in summary["ensembles"]],
            "notes": summary["notes"]}


def _learning_curve(spec: dict, name: str, fold_dir: Path, budget: dict) -> list[dict]:
    """Validation Dice of the checkpoints kept at fractions of the budget and at its end.

    Every point is measured the same way: the fold's validation cases predicted without test-time
    mirroring and without postprocessing, evaluated against nnU-Net's ground truth with samnnu's metrics.
    The end point is the chain's own validation prediction (before its postprocessing decision).
    """
    from samnnu.evaluation.folders import evaluate_folders  # local: pulls in scipy (slow to import)

    pre = current_paths().preprocessed / name
    gt, dataset_json = _references(spec)
    ending = dataset_json["file_ending"]
    val_cases = sorted(read_json(pre / "splits_final.json", "splits_final.json")[spec["fold"]]["val"])
    images = current_paths().raw / name / "imagesTr"
    points = []
    for key, snap in sorted(budget["snapshots"].items(), key=lambda kv: int(kv[0])):
        out_dir = fold_dir / "learning_curve" / f"budget_{key}"
        with tempfile.TemporaryDirectory() as tmp:  # the validation cases' images, linked, not copied
            for case in val_cases:
                for f in images.glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"):
                    os.symlink(f, Path(tmp) / f.name)
            predict(tmp, out_dir, spec["dataset"], folds=(spec["fold"],), trainer=spec["trainer"],
                    configuration=spec["configuration"], plans=spec["plans"], device=spec["device"],
                    checkpoint=snap["file"], mirroring=False, postprocess=False, overwrite=True)
        points.append({"fraction": int(key) / 100, "iterations": snap["iterations"],
                       "spent_minutes": snap["spent_seconds"] / 60, "wall_minutes": snap["wall_seconds"] / 60,
                       "dice": _mean_dice_per_class(evaluate_folders(gt, out_dir, dataset_json=dataset_json,
                                                                     file_ending=ending))})
    end = budget["stopped_at"]
    points.append({"fraction": min(1.0, end["spent_seconds"] / budget["budget_seconds"]),
                   "iterations": end["iterations"], "spent_minutes": end["spent_seconds"] / 60,
                   "wall_minutes": end["wall_seconds"] / 60,
                   "dice": _mean_dice_per_class(evaluate_folders(gt, fold_dir / "validation", dataset_json=dataset_json,
                                                                 file_ending=ending))})
    return points


def _references(spec: dict) -> tuple[Path, dict]:
    """(ground-truth folder, dataset.json) that runs are evaluated against: the dense dataset's, also for a
    run trained on sparse labels (``spec["reference_dataset"]``)."""
    pre = current_paths().preprocessed / dataset_name(spec.get("reference_dataset") or spec["dataset"])
    return pre / "gt_segmentations", read_json(pre / "dataset.json", "dataset.json")


def _mean_dice_per_class(evaluation: dict) -> dict:
    return {k: v.get("dice") for k, v in evaluation["mean"].items()}


def _time_inference(spec: dict, name: str, fold_dir: Path) -> dict:
    """Seconds per volume, raw file in -> label file out, with and without test-time mirroring, on the
    first ``timing_cases`` validation cases (the network is loaded once, before timing)."""
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from samnnu.pipeline.inference import BatchedPredictor  # local: pulls in nnU-Net, which reads nnUNet_* at import

    n = spec["timing_cases"]
    if n <= 0:
        return {}
    splits = read_json(current_paths().preprocessed / name / "splits_final.json", "splits_final.json")
    cases = sorted(splits[spec["fold"]]["val"])[:n]
    dataset_json = read_json(current_paths().raw / name / "dataset.json", "dataset.json")
    ending, n_ch = dataset_json["file_ending"], len(dataset_json["channel_names"])
    images = current_paths().raw / name / "imagesTr"
    lists = [[str(images / f"{c}_{ch:04d}{ending}") for ch in range(n_ch)] for c in cases]
    dev = pick_device(spec["device"])
    # samnnu's models as samnnu_predict runs them (tiles batched); nnU-Net's as nnUNetv2_predict runs them
    predictor_class = BatchedPredictor if spec["trainer"] in samnnu_trainers() else nnUNetPredictor
    predictor = predictor_class(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    with weights_only_loading():
        predictor.initialize_from_trained_model_folder(str(fold_dir.parent), use_folds=(spec["fold"],),
                                                       checkpoint_name=FINAL_CHECKPOINT)
    if predictor.allowed_mirroring_axes is None:  # the benchmark trains with test-time mirroring off
        predictor.allowed_mirroring_axes = tuple(range(len(predictor.configuration_manager.patch_size)))
    # workers as samnnu_predict starts them for samnnu's models, as nnUNetv2_predict's one each for nnU-Net's
    preprocessing, export = prediction_processes(dev.type) if predictor_class is BatchedPredictor else (1, 1)
    out = {"timing_cases": len(cases)}
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up (untimed): the first call pays for worker start-up and first-touch allocations
        predictor.predict_from_files(lists[:1], [os.path.join(tmp, "warmup")], save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=preprocessing,
                                     num_processes_segmentation_export=export)
        for mirroring in (False, True):
            predictor.use_mirroring = mirroring
            targets = [os.path.join(tmp, f"{c}_{int(mirroring)}") for c in cases]
            start = time.perf_counter()
            predictor.predict_from_files(lists, targets, save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=preprocessing,
                                         num_processes_segmentation_export=export)
            key = "inference_seconds_per_volume_mirroring" if mirroring else "inference_seconds_per_volume"
            out[key] = (time.perf_counter() - start) / len(cases)
    return out


def _external_test(spec: dict, name: str) -> dict:
    """Predict the external test images (no mirroring, the fold's postprocessing) and evaluate them."""
    from samnnu.evaluation.folders import evaluate_folders  # local: pulls in scipy (slow to import)

    pred_dir = Path(spec["results_root"]) / "external_test" / f"{spec['trainer']}__{spec['configuration']}"
    predict(spec["test_images"], pred_dir, spec["dataset"], folds=(spec["fold"],), trainer=spec["trainer"],
            configuration=spec["configuration"], plans=spec["plans"], device=spec["device"], mirroring=False)
    _, dataset_json = _references(spec)
    evaluation = evaluate_folders(Path(spec["test_labels"]), pred_dir, dataset_json=dataset_json,
                                  file_ending=dataset_json["file_ending"])
    return {"dice": {k: v.get("dice") for k, v in evaluation["mean"].items()},
            "hd95_mm": {k: v.get("hd95") for k, v in evaluation["mean"].items()},
            "n_cases": evaluation.get("n_cases")}


def _run_worker(spec: dict, log: Path) -> dict:
    """Run :func:`_worker` in a fresh Python process; its stdout/stderr go to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    spec_file = log.with_suffix(".spec.json")
    result_file = log.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    write_json_atomic(spec_file, spec)
    with open(log, "a") as fh:
        proc = subprocess.run([sys.executable, "-m", "samnnu.benchmark.runner", "--worker", str(spec_file),
                               str(result_file)], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode or not result_file.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise SamnnuError(f"{log}: {spec['trainer']}:{spec['configuration']} failed (exit {proc.returncode}): "
                          f"{tail[0][:300]}")
    return read_json(result_file, "result of the model's process")


# ----------------------------------------------------------------------------------------------- driver

def epochs_for(iterations: int, max_iters_per_epoch: int = 50) -> tuple[int, int]:
    """(epochs, iterations per epoch) with epochs * iterations_per_epoch == iterations rounded down to
    whole epochs of at most ``max_iters_per_epoch``."""
    if iterations < 1:
        raise SamnnuError(f"iteration budget {iterations}: must be at least 1")
    per_epoch = min(max_iters_per_epoch, iterations)
    return max(1, iterations // per_epoch), per_epoch


def samnnu_default(dataset: str | int) -> str | None:
    """``trainer:configuration`` that ``samnnu_train`` picks from samnnu's plans when told nothing
    (None when the dataset has no samnnu plans)."""
    plans_file = current_paths().preprocessed / dataset_name(dataset) / f"{PLANS_NAME}.json"
    if not plans_file.is_file():
        return None
    return ":".join(default_model(read_json(plans_file, "samnnu plans"), None, None))


def default_models(dataset: str | int) -> list[str]:
    """samnnu's default (the trainer and configuration ``samnnu_train`` picks from samnnu's plans) and
    plain nnU-Net in every configuration its own planner made (``nnUNetPlans``), cascade stages excepted."""
    pre = current_paths().preprocessed / dataset_name(dataset)
    theirs = read_json(pre / "nnUNetPlans.json",
                       "nnU-Net's plans (run samnnu_plan_and_preprocess with --nnunet-baseline-plans)")
    ours = samnnu_default(dataset)
    if ours is None:
        raise SamnnuError(f"{dataset_name(dataset)}: no samnnu plans; run samnnu_plan_and_preprocess first")
    return [ours] + [f"{NNUNET_TRAINER}:{c}" for c, cfg in theirs["configurations"].items()
                                             if "previous_stage" not in cfg]


def run_benchmark(dataset: str | int, models: list[str] | None, output: str | os.PathLike, *, fold: int = 0,
                  iterations: int | None = None, budget_minutes: float | None = None, squeeze: bool = False,
                  clock: str | None = None, sizes: list[int | None] | None = None, seed: int = 0,
                  timing_cases: int = 5, test_images: str | None = None, test_labels: str | None = None,
                  device: str = "cpu", data_root: str | None = None, calibration_iterations: int = 10,
                  max_iters_per_epoch: int = 50, command: str | None = None, retime: bool = False,
                  sparse_slices: list[int] | None = None, sparse_end_slices: bool = False) -> dict:
    """Run every model on every training-set size; return the results dict also written to ``output``.

    Budgets (exactly one of ``iterations`` and ``budget_minutes``):

    - ``budget_minutes`` (the headline): each model trains on its normal full-length schedule and is
      stopped when the minutes of ``clock`` are spent (``"cpu"``: CPU time of the training processes,
      the default on a CPU; ``"wall"`` on a GPU); checkpoints at 25 %, 50 % and 100 % of the budget
      are validated (the learning curve);
    - ``budget_minutes`` with ``squeeze`` (secondary): the minutes are converted into iterations from a
      short timed run, and the schedule is squeezed into them;
    - ``iterations`` (secondary): the same number of iterations for every model, squeezed schedule.

    ``models``: ``trainer:configuration[:plans]``; default :func:`default_models`. ``sizes``:
    training-set sizes (``None`` = all of the fold's training cases); default all only. The external
    test set defaults to the raw dataset's ``imagesTs``/``labelsTs`` (``samnnu_convert --hold-out``).
    ``retime``: train nothing; time the inference of each listed model again on its run with the most
    training cases. ``sparse_slices``: after the dense runs, train samnnu's default and nnU-Net's best
    configuration (by validation Dice of the dense runs of the same size; every listed nnU-Net model when
    there is none) on N annotated slices per training volume, for each N, with the same budget, and
    evaluate them against the dense labels (:func:`sparse_targets`). ``sparse_end_slices``: those N slices
    and the empty slice past each end of the structures (runs kept apart from the plain N-slice runs; the
    sparse targets are about N slices alone).
    """
    if (iterations is None) == (budget_minutes is None):
        raise SamnnuError("give exactly one budget: iterations or budget minutes")
    if squeeze and budget_minutes is None:
        raise SamnnuError("squeezing the schedule needs a minutes budget")
    clock = clock or ("wall" if device != "cpu" else "cpu")
    if clock not in CLOCKS:
        raise SamnnuError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if sparse_end_slices and not sparse_slices:
        raise SamnnuError("--sparse-end-slices goes with --sparse-slices N")
    if any(n < 1 for n in sparse_slices or []):
        raise SamnnuError(f"--sparse-slices {' '.join(map(str, sparse_slices))}: every number must be at least 1")
    if (test_images is None) != (test_labels is None):
        raise SamnnuError("an external test set needs both its images and its labels folder")
    for folder in (test_images, test_labels):
        if folder is not None and not Path(folder).is_dir():
            raise SamnnuError(f"{folder}: external test folder does not exist")
    setup_environment(data_root, quiet=data_root is not None)
    paths = current_paths()
    data_root = str(paths.raw.parent) if data_root is None else str(Path(data_root).resolve())
    name = dataset_name(dataset)
    if test_images is None and (paths.raw / name / "imagesTs").is_dir() and (paths.raw / name / "labelsTs").is_dir():
        test_images, test_labels = str(paths.raw / name / "imagesTs"), str(paths.raw / name / "labelsTs")
    parsed = [parse_model(m) for m in (models or default_models(name))]
    if len({m.key for m in parsed}) != len(parsed):
        raise SamnnuError("a model is listed twice")
    sizes = sizes or [None]
    pre = paths.preprocessed / name
    for m in parsed:
        get_trainer_class(m.trainer)  # unknown trainer names fail here, before anything runs
        plans = read_json(pre / f"{m.plans}.json", f"plans '{m.plans}' (plan and preprocess first)")
        if m.configuration not in plans["configurations"]:
            raise SamnnuError(f"{pre / (m.plans + '.json')}: no configuration '{m.configuration}' for {m.key}")
        if "previous_stage" in plans["configurations"][m.configuration]:
            raise SamnnuError(f"{m.key}: a cascade stage needs the previous stage's predictions; the benchmark "
                              f"trains single-stage configurations only")
        data_id = plans["configurations"][m.configuration].get("data_identifier", "")
        if not (pre / data_id).is_dir():
            raise SamnnuError(f"{pre / data_id}: not preprocessed; run nnUNetv2_preprocess -d {dataset} "
                              f"-plans_name {m.plans} -c {m.configuration}")
    splits = ensure_splits(name, parsed[0].configuration, parsed[0].plans)  # nnU-Net's 5 folds when missing
    if fold >= len(splits):
        raise SamnnuError(f"{pre / 'splits_final.json'}: has no fold {fold}")
    subsets = training_subsets(splits[fold]["train"], sizes, seed)

    out = Path(output).resolve()
    results_file = out / RESULTS
    state = read_json(results_file, "benchmark results") if results_file.is_file() else {}
    if iterations is not None:
        budget = {"iterations": iterations, "mode": "iterations"}
    elif squeeze:
        budget = {"minutes": budget_minutes, "mode": "squeezed"}
    else:
        budget = {"minutes": budget_minutes, "mode": "stopped", "clock": clock}
    if state and (state["setup"]["budget"] != budget or state["setup"]["fold"] != fold
                  or state["setup"]["seed"] != seed or state["setup"]["dataset"] != name):
        raise SamnnuError(f"{results_file}: holds a run with another dataset, fold, seed or budget; "
                          f"use another --output")
    state.setdefault("runs", {})
    state.setdefault("calibration", {})
    # a later call may add sizes or models to the same output; subsets of one seed never change
    all_subsets = dict(state.get("setup", {}).get("training_subsets", {}), **subsets)
    all_subsets = dict(sorted(all_subsets.items(), key=lambda kv: math.inf if kv[0] == "all" else int(kv[0])))
    state["setup"] = {
        "dataset": name, "fold": fold, "seed": seed, "budget": budget,
        "n_training_cases_in_fold": len(splits[fold]["train"]), "n_validation_cases": len(splits[fold]["val"]),
        "training_subsets": all_subsets, "timing_cases": timing_cases, "device": device,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "command": command or "", "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "test_images": test_images, "test_labels": test_labels,
        "samnnu_default": samnnu_default(name),
    }

    def save():
        write_json_atomic(results_file, to_jsonable(state))
        write_text_atomic(out / MARKDOWN, to_markdown(state))
        plot_learning_curves(state, out / CURVES_PNG)

    base = {"data_root": data_root, "dataset": name, "fold": fold, "device": device, "timing_cases": timing_cases,
            "test_images": test_images and str(Path(test_images).resolve()),
            "test_labels": test_labels and str(Path(test_labels).resolve())}
    if retime:
        return _retime(state, parsed, base, out, save)
    def train_one(m: Model, label: str, key: str, sparse: int | None = None) -> None:
        """Train, validate and test one model on one training subset (dense labels, or the sparse twin)."""
        if squeeze and m.key not in state["calibration"]:
            spec = dict(base, trainer=m.trainer, configuration=m.configuration, plans=m.plans, epochs=1,
                        iters_per_epoch=calibration_iterations, train_cases=None, calibrate=True,
                        results_root=str(out / "calibration" / "nnUNet_results"))
            log = out / "logs" / f"calibrate_{m.trainer}_{m.configuration}.log"
            state["calibration"][m.key] = _run_worker(spec, log)
            save()
        folder = run_folder(label, sparse, sparse_end_slices)
        tag = folder.removeprefix("train_")
        spec = dict(base, trainer=m.trainer, configuration=m.configuration, plans=m.plans, train_cases=subsets[label],
                    results_root=str(out / "runs" / folder / "nnUNet_results"),
                    save_probabilities=sparse is None)
        if sparse is not None:  # the twin's labels for training, the dense labels for every evaluation
            spec.update(dataset=twins[sparse], reference_dataset=name)
        if budget["mode"] == "stopped":
            spec.update(budget_minutes=budget_minutes, budget_clock=clock)
        else:
            if iterations is not None:
                n_iter = iterations
            else:
                spi = state["calibration"][m.key]["seconds_per_iteration"]
                n_iter = max(1, math.floor(budget_minutes * 60 / spi))
            spec["epochs"], spec["iters_per_epoch"] = epochs_for(n_iter, max_iters_per_epoch)
        # inference speed does not depend on the training subset or labels: time each model once
        timed = any(r["model"] == m.key and "inference_seconds_per_volume" in r for r in state["runs"].values())
        if timed or sparse is not None:
            spec["timing_cases"] = 0
        start = time.time()
        result = _run_worker(spec, out / "logs" / f"{m.trainer}_{m.configuration}_{tag}.log")
        result.update({"model": m.key, "trainer": m.trainer, "configuration": m.configuration, "plans": m.plans,
                       "train_size": label, "n_training_cases": len(subsets[label] or splits[fold]["train"]),
                       "process_wall_seconds": time.time() - start, "samnnu": m.is_samnnu})
        if sparse is not None:
            result["sparse_slices"] = sparse
            if sparse_end_slices:
                result["sparse_end_slices"] = True
        state["runs"][key] = result
        save()
        ran.append(key)
        tqdm.write(f"{label_of(result)} on {label} training cases: "
                   f"mean Dice {mean_dice(result):.3f} after {result['iterations']} iterations, "
                   f"{result['seconds_per_iteration']:.2f} s/iter")

    jobs = [(m, label) for label in subsets for m in parsed if f"{m.key}@{label}" not in state["runs"]]
    ran = []
    twins: dict[int, str] = {}
    bar = tqdm(jobs, desc="benchmark", unit="run")
    for m, label in bar:
        bar.set_postfix_str(f"{m.key} on {label} cases")
        train_one(m, label, f"{m.key}@{label}")
    for n in sparse_slices or []:
        for label in subsets:
            chosen = [m for m in _sparse_models(state, parsed, label)
                      if sparse_key(m.key, label, n, sparse_end_slices) not in state["runs"]]
            if not chosen:
                continue
            if n not in twins:
                needed: dict[str, list[str]] = {}
                for m in _sparse_models(state, parsed, label):
                    needed.setdefault(m.plans, []).append(m.configuration)
                twins[n] = sparse_twin(name, n, needed, end_slices=sparse_end_slices)
            for m in tqdm(chosen, desc=f"sparse labels, {n} slices per volume", unit="run"):
                train_one(m, label, sparse_key(m.key, label, n, sparse_end_slices), sparse=n)
    _ensemble_sizes(state, subsets, parsed, base, out)
    save()
    state["ran"] = ran
    return state


def run_folder(size: str, sparse: int | None = None, end_slices: bool = False) -> str:
    """The folder under ``BENCH/runs`` of the runs on ``size`` training cases: dense labels, or ``sparse``
    annotated slices per volume (with the empty slices past the ends when ``end_slices``)."""
    if sparse is None:
        return f"train_{size}"
    return f"train_{size}_sparse{sparse}{'ends' if end_slices else ''}"


def sparse_key(model: str, size: str, slices: int, end_slices: bool = False) -> str:
    """The results key of a run on sparse labels (dense runs are ``model@size``)."""
    return f"{model}@{size}@sparse{slices}{'ends' if end_slices else ''}"


def _sparse_models(state: dict, models: list[Model], size: str) -> list[Model]:
    """samnnu's default (else every listed samnnu model) and nnU-Net's best configuration on ``size``
    dense training cases (else every listed nnU-Net model)."""
    default = state["setup"].get("samnnu_default")
    ours = [m for m in models if m.key == default] or [m for m in models if m.is_samnnu]
    best = best_nnunet(state, size)
    theirs = [m for m in models if best is not None and m.key == best["model"]] or \
        [m for m in models if not m.is_samnnu]
    return ours + theirs


def _ensemble_sizes(state: dict, subsets: dict, models: list[Model], base: dict, out: Path) -> None:
    """For each training-set size with at least two runs that kept their validation probabilities, evaluate
    every two-model ensemble (``state["ensembles"][size]``), again whenever the set of such runs changes."""
    state.setdefault("ensembles", {})
    for label in subsets:
        runs = [r for r in _runs(state, label) if r.get("probabilities_saved")]
        members = sorted(r["model"] for r in runs)
        if len(runs) < 2 or state["ensembles"].get(label, {}).get("models") == members:
            continue  # fewer than two models to ensemble, or done for exactly these models
        spec = dict(base, ensembles_only=True, out_dir=str(out / "ensembles" / f"train_{label}"),
                    results_root=str(out / "runs" / run_folder(label) / "nnUNet_results"))
        state["ensembles"][label] = dict(_run_worker(spec, out / "logs" / f"ensembles_{label}.log"), models=members)


def _retime(state: dict, models: list[Model], base: dict, out: Path, save) -> dict:
    """Time inference again for already trained models (e.g. after a timing change), nothing else."""
    ran = []
    for m in models:
        runs = [r for r in state["runs"].values() if r["model"] == m.key]
        if not runs:
            raise SamnnuError(f"{m.key}: no finished run in {out / RESULTS} to time")
        run = max(runs, key=lambda r: r["n_training_cases"])
        results_root = out / "runs" / run_folder(run["train_size"]) / "nnUNet_results"
        fold_dir = model_folder(state["setup"]["dataset"], m.trainer, m.plans, m.configuration,
                                fold=state["setup"]["fold"], results=results_root)
        spec = dict(base, trainer=m.trainer, configuration=m.configuration, plans=m.plans, timing_only=True,
                    fold_dir=str(fold_dir), results_root=str(results_root))
        timing = _run_worker(spec, out / "logs" / f"retime_{m.trainer}_{m.configuration}.log")
        for r in runs:  # one timing per model, kept on its largest run only
            for key in ("inference_seconds_per_volume", "inference_seconds_per_volume_mirroring", "timing_cases"):
                r.pop(key, None)
        run.update(timing)
        ran.append(f"{m.key}@{run['train_size']} (timing)")
        save()
    state["ran"] = ran
    return state


# ----------------------------------------------------------------------------------------------- results

def mean_dice(run: dict) -> float:
    values = [v for v in run["dice"].values() if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _runs(state: dict, size: str) -> list[dict]:
    """The runs on ``size`` training cases with dense labels."""
    return [r for r in state["runs"].values() if r["train_size"] == size and not r.get("sparse_slices")]


def _sparse_runs(state: dict) -> list[dict]:
    return [r for r in state["runs"].values() if r.get("sparse_slices")]


def _find(state: dict, model: str, size: str) -> dict | None:
    return state["runs"].get(f"{model}@{size}")


def _timed_run(state: dict, model: str) -> dict | None:
    """The run of ``model`` that carries its inference timing (the "all" run first), if any."""
    runs = sorted(state["runs"].values(), key=lambda r: r["train_size"] != "all")
    return next((r for r in runs if r["model"] == model and "inference_seconds_per_volume" in r), None)


def best_nnunet(state: dict, size: str) -> dict | None:
    """Plain nnU-Net's best configuration on ``size`` training cases, chosen by validation Dice."""
    runs = [r for r in _runs(state, size) if not r["samnnu"]]
    return max(runs, key=mean_dice) if runs else None


#: (training-set size, required margin in mean Dice points over nnU-Net's best configuration)
TARGET_MARGINS = (("all", 3.0), ("10", 5.0))
#: EMA pseudo-Dice above which a model is said to have learned the structure
LEARNED = 0.75


#: (annotated slices per volume, share of samnnu's own dense-label Dice it must keep, margin in mean Dice
#: points over nnU-Net's best configuration trained on the same sparse labels)
SPARSE_TARGETS = ((3, 0.90, 5.0),)


def label_of(run: dict) -> str:
    """The run's model, with its annotation when the labels were sparse."""
    n = run.get("sparse_slices")
    return run["model"] if not n else f"{run['model']} ({_annotation(run)})"


def _annotation(run: dict, unit: str = " slices/volume") -> str:
    """How a sparse run's labels were drawn, e.g. '3 slices/volume' or '3 slices/volume + empty ends'."""
    return f"{run['sparse_slices']}{unit}" + (" + empty ends" if run.get("sparse_end_slices") else "")


def sparse_targets(state: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for training on sparse labels: samnnu's default on N slices per volume
    against its own dense-label runs of the same size, and against nnU-Net's best run on the same sparse
    labels; on the validation cases and the external test set (dense references for both). Runs whose labels
    also mark the empty slice past each end are another annotation: they get rows of their own, compared
    only with nnU-Net runs on those same labels."""
    default = state["setup"].get("samnnu_default", "")
    rows = []
    for n, keep, margin in SPARSE_TARGETS:
        measured = False
        for ends in (False, True):
            what = f"{n} slices/volume" + (" + empty ends" if ends else "")
            for size in state["setup"]["training_subsets"]:
                d = state["runs"].get(sparse_key(default, size, n, ends))
                if d is None:
                    continue
                measured = True
                rows += _sparse_rows(state, d, size, what, keep, margin,
                                     [r for r in _sparse_runs(state) if r["train_size"] == size and not r["samnnu"]
                                      and r["sparse_slices"] == n and bool(r.get("sparse_end_slices")) == ends])
        if not measured:
            rows.append((f"{n} annotated slices per volume: samnnu's default against its dense Dice and nnU-Net's best",
                         "-", "not measured"))
    return rows


def _sparse_rows(state: dict, d: dict, size: str, what: str, keep: float, margin: float,
                 theirs: list[dict]) -> list[tuple[str, str, str]]:
    """The two sparse-label verdicts of samnnu's default run ``d`` (on ``size`` cases), on the validation
    cases and the external test set: its share of its own dense Dice, and its margin over the best of
    ``theirs`` (nnU-Net runs on the same sparse labels)."""
    default = d["model"]
    dense = _find(state, default, size)
    b = max(theirs, key=mean_dice) if theirs else None
    rows = []
    for where, pick in (("validation", lambda r: r), ("held-out test", lambda r: r.get("test"))):
        goal = f"{size} training cases, {what}, {where}: {default} keeps >= {keep:.0%} of its dense Dice"
        if dense is None or pick(d) is None or pick(dense) is None or not mean_dice(pick(dense)) > 0:
            rows.append((goal, "-", "not measured"))
        else:
            share = mean_dice(pick(d)) / mean_dice(pick(dense))
            rows.append((goal, f"{mean_dice(pick(d)):.3f} vs dense {mean_dice(pick(dense)):.3f} ({share:.1%})",
                         "met" if share >= keep else "missed"))
        goal = (f"{size} training cases, {what}, {where}: {default} >= nnU-Net's best on the same "
                f"sparse labels + {margin:g} points")
        if b is None or pick(d) is None or pick(b) is None:
            rows.append((goal, "-", "not measured"))
        else:
            gap = 100 * (mean_dice(pick(d)) - mean_dice(pick(b)))
            rows.append((goal, f"{mean_dice(pick(d)):.3f} vs {b['model']} {mean_dice(pick(b)):.3f} "
                               f"({gap:+.1f})", "met" if gap >= margin else "missed"))
    return rows


def epoch_pseudo_dice(point: dict) -> float | None:
    """nnU-Net's pseudo-Dice of one epoch (mean over the foreground classes); runs recorded before it was
    kept have only the exponential moving average, which is used for them instead.

    The moving average (0.9 old + 0.1 new, starting at 0) lags the epoch's figure by several epochs, far
    too long for a run of a few dozen epochs to say when the structure was learned.
    """
    value = point.get("pseudo_dice")
    return point.get("ema_pseudo_dice") if value is None else value


def minutes_to_learn(run: dict, threshold: float = LEARNED) -> float | None:
    """Budget minutes after which an epoch's pseudo-Dice first exceeded ``threshold`` (None: never)."""
    return next((p["spent_minutes"] for p in run.get("pseudo_dice_curve", [])
                 if (value := epoch_pseudo_dice(p)) is not None and value > threshold), None)


def targets(state: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the targets samnnu holds itself to; verdict 'met', 'missed' or
    'not measured' (a model or size missing from this run). samnnu's default is compared with the best
    nnU-Net configuration of the same training-set size (best by validation Dice), on the validation
    cases and on the external test set."""
    default = state["setup"].get("samnnu_default", "")
    rows = []
    for size, margin in TARGET_MARGINS:
        d, b = _find(state, default, size), best_nnunet(state, size)
        for where, pick in (("validation", lambda r: r), ("held-out test", lambda r: r.get("test"))):
            goal = f"{size} training cases, {where}: {default} mean Dice >= nnU-Net's best + {margin:g} points"
            if d is None or b is None or pick(d) is None or pick(b) is None:
                rows.append((goal, "-", "not measured"))
                continue
            gap = 100 * (mean_dice(pick(d)) - mean_dice(pick(b)))
            rows.append((goal, f"{mean_dice(pick(d)):.3f} vs {b['model']} {mean_dice(pick(b)):.3f} ({gap:+.1f})",
                         "met" if gap >= margin else "missed"))
        if b is not None and "pseudo_dice_curve" in b:
            learned = minutes_to_learn(b)
            rows.append((f"{size} training cases: nnU-Net's best learns the structure within the budget "
                         f"(an epoch's pseudo-Dice > {LEARNED})",
                         f"{b['model']}: " + ("never" if learned is None else f"after {learned:.1f} min"),
                         "met" if learned is not None else "missed"))
    best = best_nnunet(state, "all") or next((best_nnunet(state, s) for s in state["setup"]["training_subsets"]
                                              if best_nnunet(state, s)), None)
    goal = f"CPU inference: {default} s/volume <= nnU-Net's best configuration (same mirroring setting)"
    d, b = _timed_run(state, default), best and _timed_run(state, best["model"])
    if d and b and state["setup"]["device"] == "cpu":
        ok = all(d[k] <= b[k] for k in ("inference_seconds_per_volume", "inference_seconds_per_volume_mirroring"))
        rows.append((goal, f"{d['inference_seconds_per_volume']:.2f} vs {b['model']} "
                           f"{b['inference_seconds_per_volume']:.2f} without mirroring, "
                           f"{d['inference_seconds_per_volume_mirroring']:.2f} vs "
                           f"{b['inference_seconds_per_volume_mirroring']:.2f} with",
                     "met" if ok else "missed"))
    else:
        rows.append((goal, "-", "not measured"))
    return rows + sparse_targets(state)


def to_markdown(state: dict) -> str:
    s = state["setup"]
    budget = describe_budget(s["budget"])
    sizes = list(s["training_subsets"])
    models = list(dict.fromkeys(r["model"] for r in state["runs"].values() if not r.get("sparse_slices")))
    lines = [f"# Benchmark: {s['dataset']}, fold {s['fold']}", "",
             f"- Budget: {budget}; training subsets seeded with {s['seed']} (smaller subsets are contained in "
             f"larger ones); validation on the fold's {s['n_validation_cases']} validation cases, no test-time "
             f"mirroring, nnU-Net's postprocessing decision, samnnu's metrics.",
             f"- Machine: {s['machine']['cpu']}, {s['machine']['cores']} cores, device {s['device']}.",
             f"- Command: `{s['command']}`", f"- Updated: {s['updated']}", "",
             "## Mean foreground Dice by number of training cases", "",
             "| model | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    for m in models:
        cells = []
        for size in sizes:
            r = _find(state, m, size)
            cells.append("-" if r is None else f"{mean_dice(r):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run", "",
              "| model | cases | iters | batch | Dice per class | mean Dice | HD95 mm per class | train s | s/iter | "
              "infer s/vol (mirror) | peak RSS GB | trainable params |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for r in _runs(state, size):
            dice = " / ".join("-" if v is None else f"{v:.3f}" for v in r["dice"].values())
            hd = " / ".join("-" if v is None else f"{v:.2f}" for v in r["hd95_mm"].values())
            inf = (f"{r['inference_seconds_per_volume']:.2f} ({r['inference_seconds_per_volume_mirroring']:.2f})"
                   if "inference_seconds_per_volume" in r else "-")
            params = f"{r['trainable_parameters']:,}" if r.get("trainable_parameters") else "-"
            lines.append(f"| {r['model']} | {r['n_training_cases']} | {r['iterations']} | {r['batch_size']} | {dice} | "
                         f"{mean_dice(r):.3f} | {hd} | {r['training_seconds']:.0f} | {r['seconds_per_iteration']:.2f} "
                         f"| {inf} | {r['peak_rss_gb']:.2f} | {params} |")
    curves = [r for r in state["runs"].values() if r.get("learning_curve")]
    if curves:
        lines += ["", "## Learning curves", "",
                  "Validation mean Dice of the checkpoint kept at each point of the budget (no mirroring, no "
                  "postprocessing), with the budget minutes and iterations done by then; the last column is when "
                  f"nnU-Net's pseudo-Dice of an epoch (computed during training; its moving average for runs "
                  f"recorded before the epoch's figure was kept) first exceeded {LEARNED}. Plot: "
                  f"`{CURVES_PNG}`.", "",
                  "| model | cases | " + " | ".join(f"{p:.0%} of budget" for p in (0.25, 0.5, 1.0))
                  + f" | pseudo-Dice > {LEARNED} after |", "|---|---|---|---|---|---|"]
        for r in curves:
            at = {min((0.25, 0.5, 1.0), key=lambda f: abs(f - p["fraction"])): p for p in r["learning_curve"]}
            cells = [f"{mean_dice(at[f]):.3f} ({at[f]['spent_minutes']:.1f} min, {at[f]['iterations']} it)"
                     if f in at else "-" for f in (0.25, 0.5, 1.0)]
            learned = minutes_to_learn(r)
            lines.append(f"| {label_of(r)} | {r['n_training_cases']} | " + " | ".join(cells)
                         + f" | {'never' if learned is None else f'{learned:.1f} min'} |")
    ensembles = [(size, e) for size, found in state.get("ensembles", {}).items() for e in found["ensembles"]]
    if ensembles:
        lines += ["", "## Two-model ensembles (averaged validation probabilities)", "",
                  "| members | cases | Dice per class | mean Dice |", "|---|---|---|---|"]
        for size, e in ensembles:
            dice = " / ".join("-" if v is None else f"{v:.3f}" for v in e["dice"].values())
            lines.append(f"| {' + '.join(e['members'])} | {size} | {dice} | {mean_dice(e):.3f} |")
    sparse = _sparse_runs(state)
    if sparse:
        lines += ["", "## Sparse annotations", "",
                  "Trained on N annotated slices per training volume (evenly spaced through the structures; every "
                  "other voxel carries the ignore label), same budget and training cases as the dense runs; "
                  "evaluated against the dense labels.", "",
                  "| model | cases | slices/volume | iters | validation mean Dice | share of its dense Dice | "
                  "held-out mean Dice |", "|---|---|---|---|---|---|---|"]
        for r in sorted(sparse, key=lambda r: (r["sparse_slices"], bool(r.get("sparse_end_slices")),
                                               r["n_training_cases"], not r["samnnu"])):
            dense = _find(state, r["model"], r["train_size"])
            share = f"{mean_dice(r) / mean_dice(dense):.1%}" if dense and mean_dice(dense) > 0 else "-"
            test = f"{mean_dice(r['test']):.3f}" if r.get("test") else "-"
            lines.append(f"| {r['model']} | {r['n_training_cases']} | {_annotation(r, unit='')} | {r['iterations']} | "
                         f"{mean_dice(r):.3f} | {share} | {test} |")
    tested = [r for r in state["runs"].values() if "test" in r]
    if tested:
        lines += ["", "## External test set", "", "| model | cases | training cases | Dice per class | mean Dice |",
                  "|---|---|---|---|---|"]
        for r in tested:
            t = r["test"]
            dice = " / ".join("-" if v is None else f"{v:.3f}" for v in t["dice"].values())
            lines.append(f"| {label_of(r)} | {t['n_cases']} | {r['n_training_cases']} | {dice} | {mean_dice(t):.3f} |")
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in targets(state)]
    if state.get("calibration"):
        lines += ["", "Calibration (seconds per iteration from a short timed run, used to convert the minutes "
                      "budget): " + ", ".join(f"{k} {v['seconds_per_iteration']:.2f}"
                                              for k, v in state["calibration"].items())]
    return "\n".join(lines) + "\n"


CURVES_PNG = "learning_curves.png"


def describe_budget(budget: dict) -> str:
    """One sentence naming the budget and its mode (the headline, or a secondary mode)."""
    mode = budget.get("mode", "iterations" if "iterations" in budget else "squeezed")
    if mode == "iterations":
        return (f"{budget['iterations']} training iterations per model, the schedule squeezed into them "
                "(secondary mode: equal iterations)")
    if mode == "squeezed":
        return (f"{budget['minutes']:g} minutes of training per model, converted to iterations from a timed run "
                "of each model, the schedule squeezed into them (secondary mode)")
    clock = ("CPU minutes of the training process and its data-loader workers" if budget["clock"] == "cpu"
             else "wall-clock minutes")
    return (f"{budget['minutes']:g} {clock} per model; each model trains on its normal full-length schedule "
            "and is stopped when the budget is spent (headline mode)")


def plot_learning_curves(state: dict, path: Path) -> bool:
    """Dice against budget minutes, one panel per training-set size: each model's EMA pseudo-Dice
    during training (line) and the validation Dice of its budget checkpoints (markers). False when no
    run has a learning curve."""
    sizes = [size for size in state["setup"]["training_subsets"]
             if any(r.get("learning_curve") for r in _runs(state, size))]
    if not sizes:
        return False
    import matplotlib  # local: slow to import, and only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, r in enumerate(r for r in _runs(state, size) if r.get("learning_curve")):
            colour = f"C{i}"
            pseudo = [(p["spent_minutes"], value) for p in r.get("pseudo_dice_curve", [])
                      if (value := epoch_pseudo_dice(p)) is not None]
            if pseudo:
                ax.plot(*zip(*pseudo), color=colour, alpha=0.5, lw=1)
            points = [(p["spent_minutes"], mean_dice(p)) for p in r["learning_curve"]]
            ax.plot(*zip(*points), "o-", color=colour, label=r["model"])
        ax.set(title=f"{size} training cases", xlabel="budget minutes spent", ylabel="mean foreground Dice",
               ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("validation Dice (markers) and each epoch's pseudo-Dice during training (thin lines)", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return True


def _worker_main(argv: list[str]) -> int:
    spec_file, result_file = Path(argv[0]), Path(argv[1])
    result = _worker(read_json(spec_file, "model spec"))
    write_json_atomic(result_file, to_jsonable(result))
    return 0


if __name__ == "__main__":  # one model's process, started by run_benchmark (the command is samnnu_benchmark)
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m samnnu.benchmark.runner --worker SPEC.json RESULT.json (use samnnu_benchmark)")
    sys.exit(_worker_main(sys.argv[2:]))
