"""Shared fixtures: an isolated nnU-Net environment, and the shipped hippocampus demo data converted,
planned (tiny encoder) and preprocessed once per test session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from samnnu.defaults import DEFAULT_TRAINER

# nnunetv2.configuration reads nnUNet_def_n_proc once, when it is first imported (during collection,
# before any fixture runs); its default of 8 spawned workers is far too many for this small shared
# machine. A value the user already set is kept.
os.environ.setdefault("nnUNet_def_n_proc", "1")

DEMO_SUBSET = 10  # of the 24 shipped cases: enough for a 5-fold split with 2 validation cases
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_n_proc_DA",
              "SAMNNU_DATA_ROOT")


def use_data_root(mp: pytest.MonkeyPatch, root: Path):
    """Point samnnu and nnU-Net at folders under ``root`` for the lifetime of ``mp`` (restored on undo).

    Also pins torch to one thread: samnnu's train/predict set torch's thread count to ``os.cpu_count()``,
    and on a 2-core machine shared with another job two threads are over 10x slower than one.
    """
    from samnnu.config import setup_environment

    for name in NNUNET_ENV:
        mp.delenv(name, raising=False)  # records the old value; setup_environment then writes them
    mp.setenv("nnUNet_n_proc_DA", "1")
    mp.setattr(os, "cpu_count", lambda: 1)
    return setup_environment(root, quiet=True)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Point nnU-Net's folders into tmp_path (restored after the test); return the raw folder."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer",
                 "nnUNet_def_n_proc", "nnUNet_n_proc_DA", "SAMNNU_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    from samnnu.config import setup_environment

    return setup_environment(tmp_path / "data", quiet=True).raw


def demo_cases() -> list[str]:
    """Case ids of the shipped demo data, sorted."""
    from samnnu.demo_data import demo_dataset_path

    return sorted(p.name[: -len(".nii.gz")] for p in (demo_dataset_path() / "images").glob("*.nii.gz"))


def predict_held_out_case(tmp_path: Path, trainer: str) -> None:
    """Predict the last demo case (never in the prepared root's training subset) with fold 0 of
    ``trainer`` on the prepared root, and check that exactly its label map was written."""
    from samnnu.demo_data import demo_dataset_path
    from samnnu.pipeline.prediction import predict

    inputs = tmp_path / "in"
    inputs.mkdir()
    case = sorted((demo_dataset_path() / "images").glob("*.nii.gz"))[-1]
    (inputs / case.name).write_bytes(case.read_bytes())
    written = predict(inputs, tmp_path / "out", 4, folds=(0,), trainer=trainer, device="cpu", mirroring=False)
    assert [p.name for p in written] == [case.name]


def train_validate_and_predict(tmp_path: Path, trainer: str) -> None:
    """Train fold 0 of ``trainer`` for two iterations through the whole chain (validation included),
    check that the fold was evaluated on both hippocampus classes, then predict a held-out case."""
    from samnnu.pipeline.training import train

    result = train(4, 0, trainer=trainer, epochs=1, iters_per_epoch=2, device="cpu", mirroring=False)
    assert Path(result["evaluation"]).is_file() and set(result["dice"]) == {"Anterior", "Posterior"}
    predict_held_out_case(tmp_path, trainer)


def copy_demo_cases(dst: Path, cases: list[str]) -> Path:
    """Copy demo cases into ``dst/images`` + ``dst/labels`` (the layout convert_hippocampus reads)."""
    from samnnu.demo_data import demo_dataset_path

    src = demo_dataset_path()
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for case in cases:
            shutil.copy2(src / sub / f"{case}.nii.gz", dst / sub / f"{case}.nii.gz")
    return dst


@pytest.fixture(scope="session")
def demo_subset(tmp_path_factory) -> tuple[Path, list[str]]:
    """(folder, case ids): the first DEMO_SUBSET demo cases in images/ + labels/."""
    cases = demo_cases()[:DEMO_SUBSET]
    return copy_demo_cases(tmp_path_factory.mktemp("demo_subset"), cases), cases


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory, demo_subset) -> Path:
    """A data root holding Dataset004_Hippocampus converted from the demo subset, planned with the tiny
    encoder for a CPU with 8 GB and preprocessed (2d). The environment is restored afterwards; tests
    that use the root call :func:`use_data_root` themselves."""
    from samnnu.dataset_conversion.hippocampus import convert_hippocampus
    from samnnu.pipeline.planning import plan_and_preprocess

    root = tmp_path_factory.mktemp("data_root")
    src, cases = demo_subset
    with pytest.MonkeyPatch.context() as mp:
        paths = use_data_root(mp, root)
        result = convert_hippocampus(src, 4, raw_root=paths.raw)
        assert sorted(result.converted) == cases and not result.refused
        plan_and_preprocess(4, encoder="tiny", configurations=("2d",), device_type="cpu", device_memory_gb=8)
    return root


@pytest.fixture
def data_root(prepared_root, monkeypatch) -> Path:
    """The prepared data root, made current for one test."""
    use_data_root(monkeypatch, prepared_root)
    return prepared_root


TINY_MODEL = f"{DEFAULT_TRAINER}__samnnuPlans__2d"


@pytest.fixture(scope="session")
def trained_folds(prepared_root) -> Path:
    """Folds 0 and 1 of the tiny SAMedLoRA model trained on the prepared root (1 epoch of 2 iterations,
    chain run); the model folder. A fold that already has its evaluation.json (e.g. from
    test_integration) is reused."""
    from samnnu.pipeline.training import train

    model_dir = prepared_root / "nnUNet_results" / "Dataset004_Hippocampus" / TINY_MODEL
    with pytest.MonkeyPatch.context() as mp:
        use_data_root(mp, prepared_root)
        for fold in (0, 1):
            if not (model_dir / f"fold_{fold}" / "evaluation.json").is_file():
                train(4, fold, epochs=1, iters_per_epoch=2, mirroring=False, device="cpu")
    return model_dir
