"""The benchmark against nnU-Net: subset selection, target verdicts, and a --quick smoke run end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import use_data_root
from samnnu.benchmark.runner import epochs_for, mean_dice, parse_model, targets, to_markdown, training_subsets
from samnnu.defaults import DEFAULT_TRAINER
from samnnu.errors import SamnnuError


def test_training_subsets_are_seeded_nested_and_sorted():
    keys = [f"case_{i:03d}" for i in range(40)]
    a = training_subsets(keys, [5, 10, 20, None], seed=0)
    b = training_subsets(list(reversed(keys)), [5, 10, 20, None], seed=0)
    assert a == b  # the order the fold lists its cases in does not matter
    assert a["all"] is None and [len(a[k]) for k in ("5", "10", "20")] == [5, 10, 20]
    assert set(a["5"]) < set(a["10"]) < set(a["20"]) <= set(keys)
    assert a["5"] == sorted(a["5"])
    assert training_subsets(keys, [5], seed=1)["5"] != a["5"]
    with pytest.raises(SamnnuError, match="exceeds the fold's 40"):
        training_subsets(keys, [41], seed=0)


def test_parse_model_and_epochs():
    m = parse_model("SAMedLoRATrainer:2d")
    assert (m.trainer, m.configuration, m.plans, m.is_samnnu) == ("SAMedLoRATrainer", "2d", "samnnuPlans", True)
    n = parse_model("nnUNetTrainer:3d_fullres")
    assert (n.plans, n.is_samnnu) == ("nnUNetPlans", False)
    assert parse_model("nnUNetTrainer:2d:myPlans").plans == "myPlans"
    with pytest.raises(SamnnuError, match="trainer:configuration"):
        parse_model("SAMedLoRATrainer")
    assert epochs_for(120) == (2, 50) and epochs_for(7) == (1, 7) and epochs_for(130) == (2, 50)


def _run(model: str, size: str, dice: tuple[float, float], samnnu: bool, inf: float = 1.0) -> dict:
    return {"model": model, "train_size": size, "samnnu": samnnu, "dice": {"a": dice[0], "b": dice[1]},
            "inference_seconds_per_volume": inf, "inference_seconds_per_volume_mirroring": 4 * inf}


def test_target_verdicts_follow_the_numbers():
    """samnnu's default against the best nnU-Net configuration (best by validation Dice) of each size."""
    d = "SAMedLoRATrainer:2d"
    runs = [_run(d, "10", (0.71, 0.71), True, inf=2.0),
            _run("nnUNetTrainer:2d", "10", (0.60, 0.66), False),
            _run("nnUNetTrainer:3d_fullres", "10", (0.63, 0.67), False, inf=3.0),
            _run(d, "all", (0.80, 0.80), True, inf=2.0),
            _run("nnUNetTrainer:2d", "all", (0.79, 0.79), False, inf=1.0),
            _run("SAMUNetTrainer:2d", "all", (0.95, 0.95), True)]  # not the default: no verdict rests on it
    runs[0]["test"] = {"dice": {"a": 0.72, "b": 0.72}}
    runs[2]["test"] = {"dice": {"a": 0.65, "b": 0.65}}
    # the epoch's pseudo-Dice decides where it was kept (the lagging moving average passes 0.75 later);
    # a run recorded with the moving average alone falls back to it (checked below)
    runs[2]["pseudo_dice_curve"] = [{"spent_minutes": 5.0, "pseudo_dice": 0.5, "ema_pseudo_dice": 0.2},
                                    {"spent_minutes": 10.0, "pseudo_dice": 0.8, "ema_pseudo_dice": 0.4},
                                    {"spent_minutes": 15.0, "pseudo_dice": 0.85, "ema_pseudo_dice": 0.8}]
    state = {"setup": {"device": "cpu", "samnnu_default": d, "training_subsets": {"10": [], "all": None}},
             "runs": {f"{r['model']}@{r['train_size']}": r for r in runs}}
    rows = targets(state)
    # all: +1.0 over nnU-Net 2d < 3 -> missed; no test set there -> not measured;
    # 10: best nnU-Net is 3d_fullres (0.65): +6.0 -> met, test +7.0 -> met, 3d_fullres learned after 10 min;
    # inference: 2.0 s against the best "all" configuration's 1.0 s -> missed; no sparse-label runs
    assert [v for _, _, v in rows] == ["missed", "not measured", "met", "met", "met", "missed", "not measured"]
    assert "nnUNetTrainer:3d_fullres 0.650 (+6.0)" in rows[2][1] and "after 10.0 min" in rows[4][1]
    for p in runs[2]["pseudo_dice_curve"]:
        del p["pseudo_dice"]
    assert "after 15.0 min" in targets(state)[4][1]
    runs[2]["pseudo_dice_curve"] = [{"spent_minutes": 5.0, "pseudo_dice": 0.7, "ema_pseudo_dice": 0.1}]
    assert targets(state)[4][1:] == ("nnUNetTrainer:3d_fullres: never", "missed")
    runs[0]["dice"] = {"a": 0.69, "b": 0.70}
    assert [v for _, _, v in targets(state)][2] == "missed"
    assert mean_dice(runs[0]) == pytest.approx(0.695)


def test_sparse_label_verdicts_follow_the_numbers():
    """3 slices per volume: samnnu's default keeps >= 90 % of its dense Dice and beats nnU-Net's best run on
    the same sparse labels by 5 points; dense runs of other sizes and sparse runs of other N play no part."""
    from samnnu.benchmark.runner import sparse_key, sparse_targets

    d = "SAMedLoRATrainer:2d"
    dense = _run(d, "10", (0.80, 0.80), True)
    ours = dict(_run(d, "10", (0.74, 0.74), True), sparse_slices=3)
    theirs = [dict(_run("nnUNetTrainer:3d_fullres", "10", (0.66, 0.70), False), sparse_slices=3),
              dict(_run("nnUNetTrainer:2d", "10", (0.30, 0.30), False), sparse_slices=3),
              dict(_run("nnUNetTrainer:2d", "10", (0.90, 0.90), False), sparse_slices=5)]
    ours["test"], dense["test"] = {"dice": {"a": 0.70, "b": 0.70}}, {"dice": {"a": 0.80, "b": 0.80}}
    theirs[0]["test"] = {"dice": {"a": 0.60, "b": 0.60}}
    state = {"setup": {"samnnu_default": d, "training_subsets": {"10": []}},
             "runs": {f"{d}@10": dense, sparse_key(d, "10", 3): ours,
                      **{sparse_key(r["model"], "10", r["sparse_slices"]): r for r in theirs}}}
    rows = sparse_targets(state)
    # validation: 0.74 / 0.80 = 92.5 % -> met; +6.0 over 3d_fullres (0.68) -> met;
    # test: 0.70 / 0.80 = 87.5 % -> missed; +10.0 over 3d_fullres (0.60) -> met
    assert [v for _, _, v in rows] == ["met", "met", "missed", "met"]
    assert "(92.5%)" in rows[0][1] and "nnUNetTrainer:3d_fullres 0.680 (+6.0)" in rows[1][1]
    ours["dice"] = {"a": 0.70, "b": 0.70}
    assert [v for _, _, v in sparse_targets(state)][:2] == ["missed", "missed"]  # 87.5 %, +2.0
    # runs with the empty end slices drawn too are another annotation: no 3-slice verdict rests on them
    ends = [dict(_run(d, "10", (0.95, 0.95), True), sparse_slices=3, sparse_end_slices=True),
            dict(_run("nnUNetTrainer:2d", "10", (0.99, 0.99), False), sparse_slices=3, sparse_end_slices=True)]
    ends[0]["test"] = {"dice": {"a": 0.95, "b": 0.95}}
    state["runs"].update({sparse_key(r["model"], "10", 3, True): r for r in ends})
    assert len(state["runs"]) == 7 and [v for _, _, v in sparse_targets(state)][:2] == ["missed", "missed"]
    assert "nnUNetTrainer:3d_fullres 0.680" in sparse_targets(state)[1][1]
    # ... they get verdicts of their own, against nnU-Net on the same end-slice labels only
    rows = sparse_targets(state)
    assert len(rows) == 8 and all("+ empty ends" in goal for goal, _, _ in rows[4:])
    assert [v for _, _, v in rows[4:]] == ["met", "missed", "met", "not measured"]  # 118.8 %, -4.0; no test run
    assert "nnUNetTrainer:2d 0.990 (-4.0)" in rows[5][1] and "empty ends" not in rows[1][0]
    state["setup"].update(dataset="D", fold=0, seed=0, n_validation_cases=1, device="cpu", command="",
                          updated="", machine={"cpu": "c", "cores": 2}, budget={"iterations": 2, "mode": "iterations"})
    for r in state["runs"].values():  # what a finished run records besides its Dice
        r.update(hd95_mm={"a": 1.0, "b": 1.0}, iterations=2, batch_size=2, training_seconds=1.0,
                 seconds_per_iteration=0.5, peak_rss_gb=1.0, n_training_cases=10)
        if "test" in r:
            r["test"]["n_cases"] = 1
    text = to_markdown(state)
    assert f"| {d} (3 slices/volume + empty ends) |" in text and "| 3 + empty ends |" in text


@pytest.fixture(scope="module")
def baseline_root(prepared_root, tmp_path_factory) -> Path:
    """A copy of the prepared root's raw and preprocessed data with nnU-Net's own plans added (2d)."""
    root = tmp_path_factory.mktemp("bench_root")
    for sub in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(prepared_root / sub, root / sub)
    with pytest.MonkeyPatch.context() as mp:
        use_data_root(mp, root)
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

        ExperimentPlanner(4).plan_experiment()
        preprocess_dataset(4, "nnUNetPlans", ("2d",), [1], verbose=False)
        pre = root / "nnUNet_preprocessed" / "Dataset004_Hippocampus"
        if not (pre / "splits_final.json").is_file():  # written by the first training otherwise
            from nnunetv2.utilities.crossval_split import generate_crossval_split

            cases = sorted(p.name[:-len(".nii.gz")] for p in (pre / "gt_segmentations").glob("*.nii.gz"))
            (pre / "splits_final.json").write_text(json.dumps(generate_crossval_split(cases, 12345, 5)))
    return root


@pytest.mark.slow
def test_quick_benchmark_end_to_end(baseline_root, tmp_path, monkeypatch, capsys):
    from samnnu.cli import benchmark_main

    use_data_root(monkeypatch, baseline_root)
    out = tmp_path / "bench"
    args = ["-d", "4", "--quick", "--sizes", "3", "all", "-m", "SAMedLoRATrainer:2d", "nnUNetTrainer:2d",
            "-o", str(out), "--data-root", str(baseline_root)]
    assert benchmark_main(args) == 0
    state = json.loads((out / "results.json").read_text())
    splits = json.loads((baseline_root / "nnUNet_preprocessed" / "Dataset004_Hippocampus" /
                         "splits_final.json").read_text())
    subset = state["setup"]["training_subsets"]["3"]
    assert len(subset) == 3 and set(subset) <= set(splits[0]["train"])
    assert sorted(state["runs"]) == sorted(f"{m}@{s}" for m in ("SAMedLoRATrainer:2d", "nnUNetTrainer:2d")
                                           for s in ("3", "all"))
    for key, run in state["runs"].items():
        assert run["iterations"] == 2 and set(run["dice"]) == {"Anterior", "Posterior"}
        assert all(0.0 <= v <= 1.0 for v in run["dice"].values())
        assert run["n_validation_cases"] == len(splits[0]["val"])
        if run["train_size"] == "3":  # inference is timed once per model, on its first run
            assert run["inference_seconds_per_volume"] > 0 and run["inference_seconds_per_volume_mirroring"] > 0
        else:
            assert "inference_seconds_per_volume" not in run
        assert run["peak_rss_gb"] > 0.1 and run["trainable_parameters"] > 0
        # the model really trained on the subset: the run's own settings file records it
        trainer, cfg = run["trainer"], run["configuration"]
        fold_dir = (out / "runs" / f"train_{run['train_size']}" / "nnUNet_results" / "Dataset004_Hippocampus" /
                    f"{trainer}__{run['plans']}__{cfg}" / "fold_0")
        settings = json.loads((fold_dir / "samnnu_training.json").read_text())
        assert settings["train_cases"] == (subset if run["train_size"] == "3" else None)
        assert run["n_training_cases"] == (3 if run["train_size"] == "3" else len(splits[0]["train"]))
    md = (out / "results.md").read_text()
    assert "| SAMedLoRATrainer:2d |" in md and "## Targets" in md
    # the user's own results folder was not touched
    assert not any((baseline_root / "nnUNet_results").glob("Dataset004_Hippocampus/*"))
    # resumable: a second call runs nothing and keeps the results
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert benchmark_main(args) == 0
    assert "(0 runs now, 4 from before)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(before)["runs"]
    assert to_markdown(state).count("| SAMedLoRATrainer:2d |") >= 2
    # --retime: trains nothing, times each model again on its run with the most training cases only
    assert benchmark_main(args + ["--retime"]) == 0
    after = json.loads((out / "results.json").read_text())["runs"]
    for model in ("SAMedLoRATrainer:2d", "nnUNetTrainer:2d"):
        assert "inference_seconds_per_volume" not in after[f"{model}@3"]
        timed = after[f"{model}@all"]
        assert timed["inference_seconds_per_volume"] > 0 and timed["timing_peak_rss_gb"] > 0.1
        assert timed["dice"] == state["runs"][f"{model}@all"]["dice"]  # not retrained


@pytest.mark.slow
def test_benchmark_refuses_bad_input(baseline_root, tmp_path, monkeypatch, capsys):
    from samnnu.cli import benchmark_main

    use_data_root(monkeypatch, baseline_root)
    base = ["-d", "4", "--quick", "-o", str(tmp_path / "b"), "--data-root", str(baseline_root)]
    for extra, expected in ((["-m", "NoSuchTrainer:2d"], "unknown trainer 'NoSuchTrainer'"),
                            (["-m", "nnUNetTrainer:3d_fullres"], "not preprocessed"),
                            (["--sizes", "500", "-m", "SAMedLoRATrainer:2d"], "exceeds the fold's"),
                            (["--test-images", str(tmp_path)], "needs both")):
        assert benchmark_main(base + extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("samnnu_benchmark: error:") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b" / "results.json").exists()


@pytest.mark.slow
def test_time_budget_benchmark_records_learning_curves_and_the_held_out_set(baseline_root, tmp_path, monkeypatch):
    """The headline mode: both models on their normal schedules, stopped at the same budget, with
    validated checkpoints at 25 / 50 / 100 % of it; the dataset's imagesTs is the default test set and
    the default models are samnnu's default and every configuration of nnU-Net's plans."""
    from samnnu.benchmark.runner import CURVES_PNG, default_models
    from samnnu.cli import benchmark_main

    use_data_root(monkeypatch, baseline_root)
    # every configuration nnU-Net planned (the fixture preprocessed its 2d only, so the run names two models)
    assert default_models(4) == ["SAMUNetTrainer:2d", "nnUNetTrainer:2d", "nnUNetTrainer:3d_fullres"]
    raw = baseline_root / "nnUNet_raw" / "Dataset004_Hippocampus"
    held = sorted(raw.glob("labelsTr/*.nii.gz"))[:2]  # stand-ins for held-out cases (mechanism only)
    for sub in ("imagesTs", "labelsTs"):
        (raw / sub).mkdir()
    try:
        for label in held:
            case = label.name[:-len(".nii.gz")]
            shutil.copy2(label, raw / "labelsTs" / label.name)
            shutil.copy2(raw / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTs" / f"{case}_0000.nii.gz")
        out = tmp_path / "bench"
        args = ["-d", "4", "--budget-minutes", "0.2", "--clock", "wall", "--timing-cases", "1",
                "-m", "SAMedLoRATrainer:2d", "nnUNetTrainer:2d", "-o", str(out), "--data-root", str(baseline_root)]
        assert benchmark_main(args) == 0
    finally:
        for sub in ("imagesTs", "labelsTs"):
            shutil.rmtree(raw / sub)
    state = json.loads((out / "results.json").read_text())
    assert state["setup"]["budget"] == {"minutes": 0.2, "mode": "stopped", "clock": "wall"}
    assert state["setup"]["samnnu_default"] == f"{DEFAULT_TRAINER}:2d"
    assert sorted(state["runs"]) == ["SAMedLoRATrainer:2d@all", "nnUNetTrainer:2d@all"]
    for run in state["runs"].values():
        curve = run["learning_curve"]
        assert [p["fraction"] for p in curve[:2]] == [0.25, 0.5] and curve[2]["fraction"] == 1.0
        assert all(a["spent_minutes"] <= b["spent_minutes"] for a, b in zip(curve, curve[1:]))
        assert curve[-1]["spent_minutes"] >= 0.2 and run["budget"]["spent_minutes"] >= 0.2
        assert run["iterations"] == curve[-1]["iterations"] >= 1
        for p in curve:
            assert set(p["dice"]) == {"Anterior", "Posterior"} and all(0 <= v <= 1 for v in p["dice"].values())
        assert run["test"]["n_cases"] == 2
    # both runs kept their validation probabilities: the two-model ensemble was evaluated on the same cases
    assert all(run["probabilities_saved"] for run in state["runs"].values())
    (ensemble,) = state["ensembles"]["all"]["ensembles"]
    assert len(ensemble["members"]) == 2 and 0 <= ensemble["foreground_dice_mean"] <= 1
    md = (out / "results.md").read_text()
    assert "headline mode" in md and "## Learning curves" in md and "## External test set" in md
    assert "## Two-model ensembles" in md
    assert (out / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sparse_label_runs_train_on_the_twin_and_are_evaluated_against_dense_labels(baseline_root, tmp_path,
                                                                                  monkeypatch, capsys):
    """--sparse-slices: samnnu's default and nnU-Net's best dense model train again on a twin of the dataset
    whose training labels keep 3 slices per volume (same plans, folds and cases), evaluated on dense labels."""
    import numpy as np
    import SimpleITK as sitk

    from samnnu.benchmark.runner import sparse_key, sparse_targets
    from samnnu.cli import benchmark_main

    use_data_root(monkeypatch, baseline_root)
    out = tmp_path / "bench"
    models = (f"{DEFAULT_TRAINER}:2d", "nnUNetTrainer:2d")  # samnnu's default, whose sparse verdicts are made
    args = ["-d", "4", "--iterations", "2", "--timing-cases", "1", "--sparse-slices", "3", "-m", *models,
            "-o", str(out), "--data-root", str(baseline_root)]
    try:
        assert benchmark_main(args) == 0
        state = json.loads((out / "results.json").read_text())
        assert sorted(state["runs"]) == sorted([f"{m}@all" for m in models] + [sparse_key(m, "all", 3) for m in models])
        (twin,) = [p for p in (baseline_root / "nnUNet_raw").iterdir() if p.name.endswith("_HippocampusSparse3")]
        dataset_json = json.loads((twin / "dataset.json").read_text())
        assert dataset_json["labels"]["ignore"] == 3
        assert dataset_json["samnnu_sparse"]["source_dataset"] == "Dataset004_Hippocampus"
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(sorted((twin / "labelsTr").iterdir())[0])))
        assert int(np.count_nonzero((label != 3).any(axis=(1, 2)))) == 3  # three annotated slices, the rest ignored
        pre = baseline_root / "nnUNet_preprocessed"
        assert (pre / twin.name / "splits_final.json").read_text() == \
            (pre / "Dataset004_Hippocampus" / "splits_final.json").read_text()
        plans = json.loads((pre / twin.name / "samnnuPlans.json").read_text())
        assert plans["dataset_name"] == twin.name and plans["samnnu"]["sparse_annotations"]["ignore_label"] == 3
        for m in models:
            run = state["runs"][sparse_key(m, "all", 3)]
            assert run["sparse_slices"] == 3 and set(run["dice"]) == {"Anterior", "Posterior"}
            assert run["n_validation_cases"] == state["runs"][f"{m}@all"]["n_validation_cases"]
            assert "inference_seconds_per_volume" not in run  # timed once per model, on its dense run
            trainer, cfg = m.split(":")
            fold_dir = (out / "runs" / "train_all_sparse3" / "nnUNet_results" / twin.name /
                        f"{trainer}__{run['plans']}__{cfg}" / "fold_0")
            assert (fold_dir / "checkpoint_final.pth").is_file()
        rows = sparse_targets(state)
        assert len(rows) == 4 and all(v in ("met", "missed", "not measured") for _, _, v in rows)
        assert "## Sparse annotations" in (out / "results.md").read_text()
        capsys.readouterr()
        assert benchmark_main(args) == 0  # resumable: nothing runs again
        assert "(0 runs now, 4 from before)" in capsys.readouterr().out
    finally:
        for root in ("nnUNet_raw", "nnUNet_preprocessed"):
            for p in (baseline_root / root).glob("Dataset*_HippocampusSparse3"):
                shutil.rmtree(p)
