"""Every trained model of a dataset compared across its folds, and the best one chosen by cross-validation
(:func:`compare_models`; ``samnnu_summarize`` writes the result with :func:`samnnu.reporting.summary.summarize`).

A model is a folder ``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION`` with ``fold_K``
subfolders; samnnu models and plain nnU-Net models (``nnUNetv2_train``) alike. A fold's score is
the mean Dice per class over its validation cases, taken from samnnu's ``evaluation.json`` (written
by the chain after ``samnnu_train``), or, for folds without one, computed here with
:func:`samnnu.evaluation.folders.evaluate_folders` from the fold's ``validation/`` predictions (its
``postprocessed/`` subfolder when nnU-Net made one) against ``nnUNet_preprocessed/<dataset>/
gt_segmentations``, once nnU-Net has finished them (``validation/summary.json`` exists). ``fold_all`` (trained on every case) has no held-out cases and is left out.

Choosing the best (after nnU-Net's ``find_best_configuration``)
    Each model is ranked by its mean foreground Dice: the mean over classes of the per-class
    Dice, averaged over the model's folds. Like nnU-Net, every pair of models is also tried as an
    ensemble (softmax probabilities averaged), but only when both models have the same folds and
    every validation case of every fold has saved probabilities (``CASE.npz`` + ``CASE.pkl``,
    written by ``nnUNetv2_train --npz``); otherwise the summary says so and compares single
    models only. The best candidate is the top of the ranking; on a tie the single model wins
    (it is the simpler one), as in nnU-Net. Differences to nnU-Net: scores are means of fold
    means rather than a mean over the pooled cases, empty-vs-empty scores 1 (see
    samnnu.evaluation), and a single model's score is after the postprocessing its chain chose
    while ensembles are scored without postprocessing.
"""
from __future__ import annotations

import math
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samnnu.config import current_paths, trainers_folder
from samnnu.config import num_processes as default_num_processes
from samnnu.datasets import model_folder_name, split_model_folder_name
from samnnu.errors import SamnnuError
from samnnu.evaluation.folders import evaluate_folders, write_evaluation
from samnnu.safe_io import read_json, to_jsonable

SUMMARY_FOLDER = "summary"
ENSEMBLE_PREFIX = "ensemble___"


# --------------------------------------------------------------------------- collecting


def _fold_number(path: Path) -> int | None:
    tail = path.name.removeprefix("fold_")
    return int(tail) if tail.isdigit() else None


def _prediction_folder(fold_dir: Path, file_ending: str) -> Path | None:
    for d in (fold_dir / "validation" / "postprocessed", fold_dir / "validation"):
        if d.is_dir() and any(p.name.endswith(file_ending) for p in d.iterdir()):
            return d
    return None


def _has_probabilities(validation: Path, file_ending: str) -> bool:
    """Every prediction in ``validation`` has its ``.npz`` and ``.pkl`` (nnU-Net's ``--npz``)."""
    if not validation.is_dir():
        return False
    cases = [p.name[: -len(file_ending)] for p in validation.iterdir() if p.name.endswith(file_ending)]
    return bool(cases) and all((validation / f"{c}.npz").is_file() and (validation / f"{c}.pkl").is_file()
                               for c in cases)


def _fold_scores(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    mean = evaluation.get("mean") or {}
    dice = {cls: _num(vals.get("dice")) for cls, vals in mean.items()}
    return {"dice": dice, "foreground_dice": _num((evaluation.get("foreground_mean") or {}).get("dice")),
            "n_cases": evaluation.get("n_cases")}


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _collect_model(model_dir: Path, ref_dir: Path, dataset_json: Mapping[str, Any], out_dir: Path,
                   processes: int, notes: list[str]) -> dict[str, Any] | None:
    """The per-fold scores of one model folder; None when no fold can be scored."""
    file_ending = dataset_json.get("file_ending", ".nii.gz")
    folds: dict[int, dict[str, Any]] = {}
    for fold_dir in sorted(model_dir.glob("fold_*")):
        if not fold_dir.is_dir():
            continue
        k = _fold_number(fold_dir)
        if k is None:
            notes.append(f"{model_dir.name}/{fold_dir.name}: not a cross-validation fold, left out")
            continue
        eval_json = fold_dir / "evaluation.json"
        if eval_json.is_file():
            evaluation = read_json(eval_json, "evaluation")
            source = "evaluation.json"
        else:
            pred_dir = _prediction_folder(fold_dir, file_ending)
            if pred_dir is None or not (fold_dir / "validation" / "summary.json").is_file():
                notes.append(f"{model_dir.name}/{fold_dir.name}: neither samnnu's evaluation.json nor a finished "
                             "nnU-Net validation (validation/summary.json); left out (training unfinished?)")
                continue
            if not ref_dir.is_dir():
                raise SamnnuError(f"{ref_dir}: reference segmentations missing; needed to evaluate {pred_dir}")
            evaluation = evaluate_folders(ref_dir, pred_dir, dataset_json=dataset_json, file_ending=file_ending,
                                          num_processes=processes)
            write_evaluation(evaluation, out_dir / "evaluations" / model_dir.name / f"{fold_dir.name}.json")
            source = f"evaluated {pred_dir.relative_to(fold_dir)}/ here"
        folds[k] = {"fold": k, "source": source, **_fold_scores(evaluation),
                    "has_probabilities": _has_probabilities(fold_dir / "validation", file_ending)}
    if not folds:
        return None
    trainer, plans, configuration = split_model_folder_name(model_dir.name)
    return {"name": model_dir.name, "kind": "model", "trainer": trainer, "plans": plans,
            "configuration": configuration, "folder": str(model_dir),
            "folds": sorted(folds), "per_fold": [folds[k] for k in sorted(folds)]}


def _aggregate(entry: dict[str, Any]) -> dict[str, Any]:
    """Mean, standard deviation, min and max over folds, per class and for the foreground mean."""
    per_fold = entry["per_fold"]
    classes = list(per_fold[0]["dice"])

    def stats(values: Sequence[float]) -> dict[str, float]:
        v = np.asarray(values, float)
        v = v[~np.isnan(v)]
        if not v.size:
            return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}

    entry["dice"] = {cls: stats([f["dice"].get(cls, math.nan) for f in per_fold]) for cls in classes}
    entry["foreground_dice"] = stats([f["foreground_dice"] for f in per_fold])
    entry["n_folds"] = len(per_fold)
    return entry


# --------------------------------------------------------------------------- ensembles


def _ensemble(m1: Mapping[str, Any], m2: Mapping[str, Any], dataset_json: Mapping[str, Any], ref_dir: Path,
              out_dir: Path, processes: int) -> dict[str, Any]:
    """Average both models' validation probabilities fold by fold and evaluate the result."""
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.ensembling.ensemble import merge_files
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = f"{ENSEMBLE_PREFIX}{m1['name']}___{m2['name']}"
    plans_manager = PlansManager(read_json(Path(m1["folder"]) / "plans.json", "plans"))
    rw = plans_manager.image_reader_writer_class()
    label_manager = plans_manager.get_label_manager(dict(dataset_json))
    file_ending = dataset_json.get("file_ending", ".nii.gz")
    per_fold = []
    for k in m1["folds"]:
        dirs = [Path(m["folder"]) / f"fold_{k}" / "validation" for m in (m1, m2)]
        out = out_dir / "ensembles" / name / f"fold_{k}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        cases = sorted(p.name[:-4] for p in dirs[0].glob("*.npz"))
        if cases != sorted(p.name[:-4] for p in dirs[1].glob("*.npz")):
            raise SamnnuError(f"{dirs[0]} and {dirs[1]}: different validation cases; cannot ensemble")
        for case in cases:
            merge_files([str(d / f"{case}.npz") for d in dirs], str(out / case), file_ending, rw, label_manager)
        evaluation = evaluate_folders(ref_dir, out, dataset_json=dataset_json, file_ending=file_ending,
                                      num_processes=processes)
        write_evaluation(evaluation, out / "evaluation.json")
        per_fold.append({"fold": k, "source": f"ensembled into {out}", **_fold_scores(evaluation),
                         "has_probabilities": False})
    return {"name": name, "kind": "ensemble", "members": [m1["name"], m2["name"]],
            "folder": str(out_dir / "ensembles" / name), "folds": list(m1["folds"]), "per_fold": per_fold}


# --------------------------------------------------------------------------- commands


def predict_commands(dataset: str, best: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
                     data_root: str | None = None) -> str:
    """The command(s) that segment new images with ``best`` (a model, or an ensemble of two), complete:
    with ``--data-root`` (or, for nnU-Net's tools, its folders exported) when the data live in a chosen root."""
    folds = " ".join(str(f) for f in best["folds"])
    root = f" --data-root {shlex.quote(str(data_root))}" if data_root is not None else ""
    if best["kind"] == "model":
        return (f"samnnu_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {dataset} -f {folds} "
                f"-tr {best['trainer']} -c {best['configuration']} -p {best['plans']}{root}")
    lines = [f"# samnnu_predict has no ensembling; nnU-Net's tools do it (export nnUNet_extTrainer="
             f"{trainers_folder()} so that they find samnnu's trainers)"]
    if data_root is not None:
        base = Path(data_root).expanduser().resolve()
        lines.append("export " + " ".join(f"{v}={shlex.quote(str(base / v))}"
                                          for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")))
    outs = []
    for j, member in enumerate(best["members"], start=1):
        m = models[member]
        outs.append(f"OUTPUT_FOLDER_MODEL_{j}")
        lines.append(f"nnUNetv2_predict -d {dataset} -i INPUT_FOLDER -o {outs[-1]} -f {folds} "
                     f"-tr {m['trainer']} -c {m['configuration']} -p {m['plans']} --save_probabilities")
    lines.append(f"nnUNetv2_ensemble -i {' '.join(outs)} -o OUTPUT_FOLDER")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the summary


def compare_models(name: str, out_dir: Path, *, ensembles: bool = True,
                   num_processes: int | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Compare every trained model of the dataset ``name`` across folds and choose the best one.

    Folds without samnnu's ``evaluation.json`` are evaluated into ``out_dir/evaluations/``, ensembles
    into ``out_dir/ensembles/``; ``summary.json`` and ``summary.html`` are written by
    :func:`samnnu.reporting.summary.summarize`, which calls this.

    Args:
        name: the dataset's folder name (``DatasetNNN_Name``).
        ensembles: also try every two-model ensemble that has validation probabilities.
        num_processes: evaluation workers (default: samnnu.config.num_processes()).

    Returns:
        ``{"dataset", "models": [...], "ensembles", "ranking": [names, best first], "best": {...,
        "predict_command"}, "ensembles_considered", "notes"}`` as plain JSON types; each model has
        ``folds``, ``per_fold`` (Dice per class and foreground Dice of each fold), ``dice`` ({class: {mean,
        std, min, max, n}}) and ``foreground_dice`` (same statistics).

    Raises:
        SamnnuError: no trained fold with validation results.
    """
    paths = current_paths()
    results = paths.results / name
    processes = max(1, num_processes or default_num_processes())
    ref_dir = paths.preprocessed / name / "gt_segmentations"
    notes: list[str] = []

    models: dict[str, dict[str, Any]] = {}
    for model_dir in sorted(results.glob(model_folder_name("*", "*", "*"))) if results.is_dir() else []:
        if not model_dir.is_dir() or split_model_folder_name(model_dir.name) is None:
            continue
        dataset_json = _dataset_json(model_dir, paths.preprocessed / name)
        entry = _collect_model(model_dir, ref_dir, dataset_json, out_dir, processes, notes)
        if entry is not None:
            models[entry["name"]] = _aggregate(entry)
    if not models:
        raise SamnnuError(f"{results}: no trained folds with validation results (train with samnnu_train or "
                          "nnUNetv2_train first)")

    candidates = dict(models)
    ensembles_considered: list[str] = []
    if ensembles and len(models) > 1:
        names = list(models)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                m1, m2 = models[a], models[b]
                if m1["folds"] != m2["folds"]:
                    notes.append(f"{a} + {b}: not ensembled, different folds ({m1['folds']} vs {m2['folds']})")
                    continue
                missing = [m["name"] for m in (m1, m2) if not all(f["has_probabilities"] for f in m["per_fold"])]
                if missing:
                    notes.append(f"{a} + {b}: not ensembled, validation probabilities missing for "
                                 f"{' and '.join(missing)} (train with nnUNetv2_train --npz, or run "
                                 f"nnUNetv2_train --val --npz on the folds)")
                    continue
                ens = _aggregate(_ensemble(m1, m2, _dataset_json(Path(m1["folder"]), paths.preprocessed / name),
                                           ref_dir, out_dir, processes))
                candidates[ens["name"]] = ens
                ensembles_considered.append(ens["name"])
    elif not ensembles:
        notes.append("ensembles not considered (--no-ensembles)")
    if ensembles and len(models) > 1 and not ensembles_considered:
        notes.append("no ensemble could be evaluated: single models compared only")

    def key(n: str):
        score = candidates[n]["foreground_dice"]["mean"]
        return (-(score if not math.isnan(score) else -math.inf), candidates[n]["kind"] == "ensemble", n)

    ranking = sorted(candidates, key=key)
    best = dict(candidates[ranking[0]])
    best["foreground_dice_mean"] = best["foreground_dice"]["mean"]
    best["predict_command"] = predict_commands(name, best, models, data_root)
    fold_sets = {tuple(m["folds"]) for m in models.values()}
    if len(fold_sets) > 1:
        notes.append("the models were validated on different folds; their means are not over the same cases")

    summary = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dataset": name,
        "results_folder": str(results),
        "models": list(models.values()),
        "ensembles": [candidates[n] for n in ensembles_considered],
        "ensembles_considered": ensembles_considered,
        "ranking": [{"name": n, "kind": candidates[n]["kind"], "folds": candidates[n]["folds"],
                     "foreground_dice_mean": candidates[n]["foreground_dice"]["mean"],
                     "foreground_dice_std": candidates[n]["foreground_dice"]["std"]} for n in ranking],
        "best": {k: best[k] for k in ("name", "kind", "folds", "foreground_dice_mean", "predict_command")
                 if k in best} | {k: best[k] for k in ("trainer", "plans", "configuration", "members")
                                  if k in best},
        "notes": notes,
    }
    return to_jsonable(summary)


def _dataset_json(model_dir: Path, preprocessed: Path) -> dict[str, Any]:
    for path in (model_dir / "dataset.json", preprocessed / "dataset.json"):
        if path.is_file():
            return read_json(path, "dataset.json")
    raise SamnnuError(f"{model_dir}: no dataset.json beside the model or in {preprocessed}")
