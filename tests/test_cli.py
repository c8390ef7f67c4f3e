"""The commands in samnnu/cli.py: quiet by default (no third-party warnings, nnU-Net's output only with
--verbose or on a crash), and one spelling per flag with the former spellings still accepted but hidden."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_demo_cases, demo_cases, use_data_root
from samnnu import cli
from samnnu.defaults import DEFAULT_TRAINER
from samnnu.errors import SamnnuError

PLAN_ARGS = ["-d", "4", "--encoder", "tiny", "--device", "cpu", "--device-memory-gb", "8", "-c", "2d"]
# what nnU-Net prints while fingerprinting, planning and preprocessing
NNUNET_PLANNING_LINES = ("as reader/writer", "U-Net configuration:", "{'data_identifier'", "Plans were saved to",
                         "Preprocessing dataset")
WARNINGS = ("FutureWarning", "DeprecationWarning", "UserWarning")


def no_warnings(text: str) -> bool:
    return not any(w in text for w in WARNINGS)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    """A data root holding Dataset004_Hippocampus converted from 6 demo cases (not planned)."""
    from samnnu.dataset_conversion.hippocampus import convert_hippocampus

    base = tmp_path_factory.mktemp("cli_raw")
    src = copy_demo_cases(base / "src", demo_cases()[:6])
    with pytest.MonkeyPatch.context() as mp:
        paths = use_data_root(mp, base / "root")
        convert_hippocampus(src, 4, raw_root=paths.raw)
    return base / "root"


def fresh_root(raw_root: Path, tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "root"
    shutil.copytree(raw_root, root)
    use_data_root(monkeypatch, root)
    return root


# ------------------------------------------------------------------------------------------ quiet commands

@pytest.mark.slow
def test_plan_and_preprocess_shows_only_samnnu_lines_unless_verbose(raw_root, tmp_path, monkeypatch, capfd):
    root = fresh_root(raw_root, tmp_path, monkeypatch)
    assert cli.plan_and_preprocess_main([*PLAN_ARGS, "--data-root", str(root)]) == 0
    out, err = capfd.readouterr()  # file descriptors: worker processes' output counts too
    assert "samnnu plans for Dataset004_Hippocampus (samnnuPlans)" in out and "recommended: 2d" in out
    for line in NNUNET_PLANNING_LINES:
        assert line not in out + err, line
    assert no_warnings(out + err), err
    assert "Extracting dataset fingerprint" in err  # nnU-Net's progress bars stay
    assert (root / "nnUNet_preprocessed" / "Dataset004_Hippocampus" / "samnnuPlans.json").is_file()

    # --verbose shows nnU-Net's output; the former spelling of --verify-dataset-integrity still runs the check
    assert cli.plan_and_preprocess_main([*PLAN_ARGS, "--data-root", str(root), "--verbose",
                                         "--verify_dataset_integrity"]) == 0
    out, err = capfd.readouterr()
    for line in NNUNET_PLANNING_LINES:
        assert line in out, line
    assert "verify_dataset_integrity Done" in out
    assert "samnnu plans for Dataset004_Hippocampus" in out
    assert no_warnings(out + err), err


@pytest.mark.slow
def test_train_and_predict_are_quiet_and_the_training_log_stays_complete(raw_root, tmp_path, monkeypatch, capfd):
    from samnnu.pipeline.planning import plan_and_preprocess

    root = fresh_root(raw_root, tmp_path, monkeypatch)
    plan_and_preprocess(4, encoder="tiny", configurations=("2d",), device_type="cpu", device_memory_gb=8)
    capfd.readouterr()
    train = ["4", "0", "--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu", "--no-chain",
             "--data-root", str(root)]
    assert cli.train_main([*train, "--no-mirroring"]) == 0  # the former spelling of --disable-tta
    out, err = capfd.readouterr()
    for nnunet_line in ("Epoch 0", "train_loss", "This is the configuration used by this training", "Using splits"):
        assert nnunet_line not in out + err, nnunet_line
    assert f"training {DEFAULT_TRAINER} fold 0" in err  # samnnu's progress bar
    assert no_warnings(out + err), err
    fold = root / "nnUNet_results" / "Dataset004_Hippocampus" / f"{DEFAULT_TRAINER}__samnnuPlans__2d" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    for nnunet_line in ("Epoch 0", "train_loss", "This is the configuration used by this training", "Training done"):
        assert nnunet_line in log, nnunet_line
    assert json.loads((fold / "samnnu_training.json").read_text())["mirroring"] is False

    # a samnnu line printed in the middle of nnU-Net's work stays visible
    assert cli.train_main([*train, "--continue"]) == 0
    assert f"samnnu: resuming from {fold / 'checkpoint_final.pth'}" in capfd.readouterr().out

    images = tmp_path / "images"
    images.mkdir()
    case = sorted((root / "nnUNet_raw" / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(case, images / case.name)
    predict = ["-i", str(images), "-d", "4", "--device", "cpu", "--disable-tta", "--data-root", str(root)]
    assert cli.predict_main([*predict, "-o", str(tmp_path / "quiet")]) == 0
    out, err = capfd.readouterr()
    assert "wrote 1 segmentations" in out and "cases in the source folder" not in out + err
    assert no_warnings(out + err), err
    assert cli.predict_main([*predict, "-o", str(tmp_path / "verbose"), "--verbose"]) == 0
    out, _ = capfd.readouterr()
    assert "wrote 1 segmentations" in out and "There are 1 cases in the source folder" in out


def test_held_nnunet_output_is_printed_when_the_command_crashes(monkeypatch, tmp_path, capsys):
    """A crash inside nnU-Net shows what nnU-Net printed before it; a user error (SamnnuError) does not."""
    import samnnu.pipeline.planning as planning

    def fake(error):
        def plan_and_preprocess(*args, **kwargs):
            nnunet = {"__name__": "nnunetv2.experiment_planning.fake"}
            exec("print('nnU-Net was here')", nnunet)  # code of an nnunetv2 module
            print("samnnu: own line")
            raise error
        return plan_and_preprocess

    use_data_root(monkeypatch, tmp_path)
    monkeypatch.setattr(planning, "plan_and_preprocess", fake(RuntimeError("inside nnU-Net")))
    with pytest.raises(RuntimeError):
        cli.plan_and_preprocess_main(["-d", "4", "--data-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.index("samnnu: own line") < out.index("nnU-Net was here")  # own line at once, the held one at the end

    monkeypatch.setattr(planning, "plan_and_preprocess", fake(SamnnuError("bad input")))
    assert cli.plan_and_preprocess_main(["-d", "4", "--data-root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "samnnu: own line\n" and err == "samnnu_plan_and_preprocess: error: bad input\n"


@pytest.mark.slow
def test_import_time_warnings_are_filtered_in_a_fresh_process(tmp_path):
    """The deprecation warnings of timm and torch.jit fire when samnnu's models are first imported: a
    fresh process shows whether the command filters them (in this test process they fired long ago)."""
    code = ("import sys; from samnnu.cli import plan_and_preprocess_main as main; "
            f"sys.exit(main(['-d', '4', '--data-root', {str(tmp_path)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}

    def run(extra_env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**env, **extra_env})

    quiet = run({})
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert quiet.stderr.startswith("samnnu_plan_and_preprocess: error: unknown dataset ID 4") and \
        len(quiet.stderr.splitlines()) == 1, quiet.stderr
    # the same import does warn, and a user who asks for warnings gets them
    asked = run({"PYTHONWARNINGS": "default"})
    assert asked.returncode == 1 and "FutureWarning" in asked.stderr and "timm.models.layers" in asked.stderr


# ------------------------------------------------------------------------------------------ flag spellings

def help_text(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


RENAMED = [  # (command, current spelling, former spelling kept as a hidden alias)
    (cli.train_main, "--disable-tta", "--no-mirroring"),
    (cli.predict_main, "--disable-tta", "--no-mirroring"),
    (cli.refine_main, "--disable-tta", "--no-mirroring"),
    (cli.plan_and_preprocess_main, "--verify-dataset-integrity", "--verify_dataset_integrity"),
    (cli.evaluate_main, "--reference", "-ref"),
    (cli.evaluate_main, "--prediction", "-pred"),
]


@pytest.mark.parametrize("main, new, old", RENAMED, ids=[f"{m.__name__}{o}" for m, _, o in RENAMED])
def test_help_shows_the_current_spelling_only(main, new, old, capsys):
    text = help_text(main, capsys)
    assert has_flag(text, new) and not has_flag(text, old)


@pytest.mark.parametrize("main", [cli.plan_and_preprocess_main, cli.train_main, cli.predict_main, cli.refine_main,
                                  cli.demo_main, cli.benchmark_main, cli.summarize_main])
def test_commands_calling_nnunet_have_verbose(main, capsys):
    assert has_flag(help_text(main, capsys), "--verbose")


def recorder(monkeypatch, module, name: str) -> list[dict]:
    """Replace ``module.name`` by a function recording its arguments; it ends the command with a user error."""
    calls = []

    def record(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        raise SamnnuError("recorded")

    monkeypatch.setattr(module, name, record)
    return calls


@pytest.mark.parametrize("flags, mirroring", [([], True), (["--disable-tta"], False), (["--no-mirroring"], False)])
def test_mirroring_switch_in_train_predict_and_refine(flags, mirroring, monkeypatch, tmp_path):
    import samnnu.interactive.refine as refine
    import samnnu.pipeline.prediction as prediction
    import samnnu.pipeline.training as training

    use_data_root(monkeypatch, tmp_path)
    root = ["--data-root", str(tmp_path)]
    trained = recorder(monkeypatch, training, "train")
    assert cli.train_main(["4", "0", *flags, *root]) == 1
    predicted = recorder(monkeypatch, prediction, "predict")
    assert cli.predict_main(["-i", "in", "-o", "out", "-d", "4", *flags, *root]) == 1
    opened = recorder(monkeypatch, refine, "open_session")
    assert cli.refine_main(["-i", "case.nii.gz", "-d", "4", *flags, *root]) == 1
    assert [c[0]["mirroring"] for c in (trained, predicted, opened)] == [mirroring] * 3


def test_predict_precision_reaches_the_api(monkeypatch, tmp_path):
    import samnnu.pipeline.prediction as prediction

    use_data_root(monkeypatch, tmp_path)
    root = ["--data-root", str(tmp_path)]
    predicted = recorder(monkeypatch, prediction, "predict")
    for flags in ([], ["--precision", "bf16"], ["--precision", "fp32"]):
        assert cli.predict_main(["-i", "in", "-o", "out", "-d", "4", *flags, *root]) == 1
    assert [c["precision"] for c in predicted] == ["fp32", "bf16", "fp32"]


@pytest.mark.parametrize("flag", ["--verify-dataset-integrity", "--verify_dataset_integrity"])
def test_verify_dataset_integrity_both_spellings(flag, monkeypatch, tmp_path):
    import samnnu.pipeline.planning as planning

    use_data_root(monkeypatch, tmp_path)
    calls = recorder(monkeypatch, planning, "plan_and_preprocess")
    assert cli.plan_and_preprocess_main(["-d", "4", "--data-root", str(tmp_path)]) == 1
    assert cli.plan_and_preprocess_main(["-d", "4", flag, "--data-root", str(tmp_path)]) == 1
    assert [c["verify_dataset_integrity"] for c in calls] == [False, True]


@pytest.mark.parametrize("ref, pred, dataset, out", [("--reference", "--prediction", "--dataset", "--output"),
                                                     ("-ref", "-pred", "-d", "-o")])
def test_evaluate_spellings(ref, pred, dataset, out, monkeypatch, tmp_path):
    import samnnu.evaluation.folders as folders

    calls = recorder(monkeypatch, folders, "evaluate_folders")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}}))
    argv = [ref, str(tmp_path / "r"), pred, str(tmp_path / "p"), dataset, str(tmp_path), out, str(tmp_path / "e.json")]
    assert cli.evaluate_main(argv) == 1
    assert calls[0]["args"] == (str(tmp_path / "r"), str(tmp_path / "p"))
    assert calls[0]["dataset_json"]["labels"] == {"background": 0, "organ": 1}


@pytest.mark.parametrize("argv, missing", [(["--prediction", "p"], "--reference"), (["-ref", "r"], "--prediction")])
def test_evaluate_still_requires_both_folders(argv, missing, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.evaluate_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"required: {missing}" in err and len(err.splitlines()) == 1


def test_demo_output_short_form(monkeypatch, tmp_path):
    import samnnu.demo as demo

    calls = recorder(monkeypatch, demo, "run_demo")
    assert cli.demo_main(["-o", str(tmp_path / "work"), "--iterations", "2"]) == 1
    assert calls[0]["args"] == (str(tmp_path / "work"),) and calls[0]["iterations"] == 2


def test_every_flag_is_dashed(capsys):
    """Long options use dashes, never underscores (nnU-Net's short -np, -tr, -chk style is kept)."""
    from samnnu.dataset_conversion.cli import build_parser

    texts = [help_text(m, capsys) for m in (cli.evaluate_main, cli.plan_and_preprocess_main, cli.train_main,
                                            cli.predict_main, cli.refine_main, cli.demo_main, cli.report_main,
                                            cli.summarize_main, cli.benchmark_main)]
    for sub in ("hippocampus", "folder"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([sub, "--help"])
        texts.append(capsys.readouterr().out)
    flags = {f for text in texts for f in re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", text)}
    assert flags and not [f for f in flags if "_" in f]


def test_view_refuses_a_missing_image_before_opening_a_window(tmp_path, capsys):
    assert cli.view_main(["-i", str(tmp_path / "case.nii.gz"), "-d", "4", "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"samnnu_view: error: {tmp_path / 'case.nii.gz'}: image not found"]
