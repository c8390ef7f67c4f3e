"""Predict a folder of volumes with trained folds (ensembled), writing label maps on the inputs' grids."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from samnnu.config import num_processes, setup_environment
from samnnu.datasets import dataset_name, load_json_file, model_folder
from samnnu.errors import SamnnuError
from samnnu.training import DEFAULT_CONFIGURATION, DEFAULT_TRAINER, SAMNNU_TRAINERS, pick_device

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def collect_cases(input_folder: Path, file_ending: str, n_channels: int) -> dict[str, list[Path]]:
    """Group the input files by case: ``CASE_0000.ext`` ... per channel, or ``CASE.ext`` for one channel.

    Raises SamnnuError naming the file for unreadable volumes and wrong channel counts.
    """
    import SimpleITK as sitk

    files = sorted(p for p in input_folder.iterdir() if p.is_file() and p.name.endswith(file_ending)
                   and not p.name.startswith("."))
    if not files:
        raise SamnnuError(f"{input_folder}: no {file_ending} files to predict")
    cases: dict[str, dict[int, Path]] = {}
    for p in files:
        stem = _strip(p.name, file_ending)
        m = _CHANNEL.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        if channel in cases.setdefault(case, {}):
            raise SamnnuError(f"{p}: case '{case}' has channel {channel} twice (mixing CASE{file_ending} and "
                              f"CASE_0000{file_ending}?)")
        cases[case][channel] = p
    out = {}
    for case, channels in cases.items():
        if sorted(channels) != list(range(n_channels)):
            raise SamnnuError(f"{input_folder}: case '{case}' has channels {sorted(channels)} but the model "
                              f"expects {n_channels} (files CASE_0000{file_ending} .. "
                              f"CASE_{n_channels - 1:04d}{file_ending})")
        paths = [channels[c] for c in range(n_channels)]
        for p in paths:
            try:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(p))
                reader.ReadImageInformation()
            except RuntimeError:
                raise SamnnuError(f"{p}: not a readable image (corrupt or not {file_ending})") from None
        out[case] = paths
    return out


def predict(input_folder: str | os.PathLike, output_folder: str | os.PathLike, dataset: str | int, *,
            folds: tuple = (0,), trainer: str = DEFAULT_TRAINER, configuration: str = DEFAULT_CONFIGURATION,
            plans: str | None = None, device: str | None = None, checkpoint: str = "checkpoint_final.pth",
            mirroring: bool = True, postprocess: bool = True) -> list[Path]:
    """Segment every case in ``input_folder`` into ``output_folder`` (one ``CASE<ending>`` per case).

    Output label maps have exactly the inputs' size, spacing, origin and direction (nnU-Net restores
    them). Several folds are ensembled by averaging softmax outputs. Files appear in the output folder
    only once complete. Inputs are never modified.
    """
    setup_environment()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samnnu.plans.samnnu_planner import PLANS_NAME

    inp = Path(input_folder).resolve()
    out = Path(output_folder).resolve()
    if not inp.is_dir():
        raise SamnnuError(f"{inp}: input folder does not exist")
    if inp == out:
        raise SamnnuError(f"{out}: the output folder must differ from the input folder")
    name = dataset_name(dataset)
    plans_name = plans or (PLANS_NAME if trainer in SAMNNU_TRAINERS else "nnUNetPlans")
    mfolder = model_folder(name, trainer, plans_name, configuration)
    if not mfolder.is_dir():
        raise SamnnuError(f"{mfolder}: no trained model for trainer {trainer}, plans {plans_name}, "
                          f"configuration {configuration} (train it with samnnu_train)")
    folds = tuple(f if f == "all" else int(f) for f in folds)
    for f in folds:
        ckpt = mfolder / f"fold_{f}" / checkpoint
        if not ckpt.is_file():
            raise SamnnuError(f"{ckpt}: checkpoint missing (is fold {f} trained?)")
    dataset_json = load_json_file(mfolder / "dataset.json", "dataset.json of the model")
    ending = dataset_json["file_ending"]
    cases = collect_cases(inp, ending, len(dataset_json["channel_names"]))

    dev = pick_device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=True)
    predictor.initialize_from_trained_model_folder(str(mfolder), use_folds=folds, checkpoint_name=checkpoint)

    pp_file = (mfolder / f"fold_{folds[0]}" / "validation" / "postprocessing.pkl") if len(folds) == 1 \
        else mfolder / "postprocessing.pkl"
    pp = None
    if postprocess and pp_file.is_file():
        import pickle

        with open(pp_file, "rb") as fh:
            pp = pickle.load(fh)

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".samnnu_tmp_") as tmp:
        tmp = Path(tmp)
        lists = [[str(p) for p in paths] for paths in cases.values()]
        truncated = [str(tmp / case) for case in cases]
        predictor.predict_from_files(lists, truncated, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=1,
                                     num_processes_segmentation_export=min(2, num_processes()))
        rw = PlansManager(str(mfolder / "plans.json")).image_reader_writer_class()
        for case in cases:
            produced = tmp / f"{case}{ending}"
            if not produced.is_file():
                raise SamnnuError(f"{produced}: prediction for case '{case}' was not written")
            if pp is not None and pp[0]:
                load_postprocess_save(str(produced), str(produced), rw, pp[0], pp[1])
            target = out / f"{case}{ending}"
            shutil.move(str(produced), str(target))
            written.append(target)
    return written
