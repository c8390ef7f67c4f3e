"""Predict a folder of volumes with trained folds (ensembled), writing label maps on the inputs' grids."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from samnnu.config import configure_threads, current_paths, prediction_processes, setup_environment
from samnnu.datasets import dataset_name, first_fold_file, model_folder, model_folder_name
from samnnu.defaults import CLICK_CORRECTOR_FILE, DEFAULT_CONFIGURATION, DEFAULT_TRAINER, FINAL_CHECKPOINT
from samnnu.errors import SamnnuError
from samnnu.interactive.prompts import ImageGeometry, label_values, load_prompts, prompts_to_json
from samnnu.pipeline.training import default_model, default_plans_name, pick_device
from samnnu.safe_io import (
    check_image_file,
    describe_os_error,
    load_postprocessing,
    read_json,
    remove_stale_tmp,
    weights_only_loading,
    write_atomic,
    write_image_atomic,
    write_json_atomic,
)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def collect_cases(input_folder: Path, file_ending: str, n_channels: int) -> dict[str, list[Path]]:
    """Group the input files by case: ``CASE_0000.ext`` ... per channel, or ``CASE.ext`` for one channel.

    Raises SamnnuError naming the file for unreadable, truncated or 4D volumes and wrong channel counts.
    """
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
            check_input_image(p)
        out[case] = paths
    return out


def is_natural_image_dataset(dataset_json: Mapping) -> bool:
    """True when nnU-Net reads the dataset with ``NaturalImage2DIO`` (2D PNG/BMP images, as ``samnnu_convert``
    writes photos); a TIFF dataset is that only when it says so (nnU-Net reads 3D TIFFs otherwise)."""
    reader = dataset_json.get("overwrite_image_reader_writer")
    if reader is not None:
        return reader == "NaturalImage2DIO"
    return dataset_json.get("file_ending", "").lower() in (".png", ".bmp")


def collect_2d_cases(input_folder: Path, n_channels: int) -> dict[str, list[Path]]:
    """Group 2D image inputs (PNG, JPEG, TIFF, BMP) by case the way ``samnnu_convert folder`` groups them:
    ``CASE.jpg``, or ``CASE_0000.png``, ``CASE_0001.png``, ... An RGB file holds three channels, a grey
    file one; a case's files together must hold the model's ``n_channels``.

    Raises SamnnuError naming the folder or file for a missing, unreadable or wrongly sized case.
    """
    # local: the converter's readers pull in PIL and SimpleITK (slow to import)
    from samnnu.dataset_conversion.folder import IMAGE_2D_ENDINGS, peek_channel_count, split_ending

    files = sorted(p for p in input_folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and split_ending(p.name)[1] in IMAGE_2D_ENDINGS)
    if not files:
        raise SamnnuError(f"{input_folder}: no 2D images to predict ({', '.join(IMAGE_2D_ENDINGS)})")
    # CASE_0000, CASE_0001, ... are one case's channel files only when they run from _0000 without a gap;
    # otherwise (IMG_0001.jpg, IMG_0002.jpg) every file is a case of its own, named as the file
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        m = _CHANNEL.match(split_ending(p.name)[0])
        if m:
            groups.setdefault(m["case"], {})[int(m["channel"])] = p
    cases: dict[str, list[Path]] = {}
    channel_files = {p for g in groups.values() if sorted(g) == list(range(len(g))) for p in g.values()}
    for case, g in groups.items():
        if sorted(g) == list(range(len(g))):
            cases[case] = [g[i] for i in range(len(g))]
    for p in files:
        if p not in channel_files:
            stem = split_ending(p.name)[0]
            if stem in cases:
                raise SamnnuError(f"{p}: case '{stem}' is also given as {cases[stem][0].name}")
            cases[stem] = [p]
    out = {}
    for case, paths in sorted(cases.items()):
        counts = [peek_channel_count(p) for p in paths]
        for p, n in zip(paths, counts):
            if n is None:
                raise SamnnuError(f"{p}: cannot be read as an image")
        if sum(counts) != n_channels:
            names = ", ".join(p.name for p in paths)
            raise SamnnuError(f"{input_folder}: case '{case}' holds {sum(counts)} channel(s) ({names}) but the model "
                              f"expects {n_channels}" + (" (one RGB file, or three grey ones)" if n_channels == 3 else ""))
        out[case] = paths
    return out


def stage_2d_inputs(cases: Mapping[str, list[Path]], folder: Path) -> dict[str, list[Path]]:
    """Write each case's images as the PNG files ``samnnu_convert`` writes for training (decoded pixels,
    lossless; a colour file keeps its three channels), so the model sees what it was trained on whatever
    the input format. Returns {case: [staged PNG files]}."""
    # local: the converter's readers pull in PIL and SimpleITK (slow to import)
    from samnnu.dataset_conversion.common import CaseRefused
    from samnnu.dataset_conversion.folder import read_2d_image, save_png

    folder.mkdir(parents=True, exist_ok=True)
    staged = {}
    for case, paths in cases.items():
        staged[case] = []
        for i, p in enumerate(paths):
            try:
                array = read_2d_image(p)
            except CaseRefused as e:
                raise SamnnuError(f"{p}: {e}") from None
            target = folder / f"{case}_{i:04d}.png"
            save_png(array, target)
            staged[case].append(target)
    return staged


def check_input_image(path: Path) -> None:
    """Refuse an input image that is truncated, damaged or 4D (one-line SamnnuError naming it); say how many
    NaN voxels a floating-point image holds (they are read as 0)."""
    info = check_image_file(path)
    if info.dimension > 3 and any(n > 1 for n in info.size[3:]):
        raise SamnnuError(f"{path}: is {info.dimension}D (size {info.size}); samnnu predicts 2D and 3D images, "
                          f"one file per channel (CASE_0000, CASE_0001, ...)")
    if info.floating:
        n_nan = _count_nan(path)
        if n_nan:
            print(f"samnnu: warning: {path}: {n_nan} NaN voxel(s), predicted as if they were 0", file=sys.stderr)


def _count_nan(path: Path) -> int:
    """NaN voxels in a floating-point image (SimpleITK's NIfTI reader turns them into 0, so NIfTI files
    are read with nibabel)."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel  # local: nibabel is slow to import

        return int(np.isnan(np.asanyarray(nibabel.load(str(path)).dataobj)).sum())
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    return int(np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).sum())


@dataclass
class _Model:
    """A trained model found and checked for prediction; its folds are loaded on first use."""

    folder: Path
    dataset_json: dict
    postprocessing: tuple | None
    reader_writer: object
    folds: tuple
    checkpoint: str
    device: object
    mirroring: bool
    precision: str = "fp32"
    _predictor: object = None

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    def labels(self) -> dict[str, int]:
        return label_values(self.dataset_json["labels"])

    def predictor(self):
        """The predictor holding every fold (loaded once): nnU-Net's, with tiles batched
        (:class:`~samnnu.pipeline.inference.BatchedPredictor`)."""
        if self._predictor is None:
            # local: pulls in torch and nnU-Net, which reads nnUNet_* at import
            from samnnu.pipeline.inference import BatchedPredictor

            dev = self.device
            self._predictor = BatchedPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=self.mirroring,
                                               perform_everything_on_device=dev.type == "cuda", device=dev,
                                               verbose=False, verbose_preprocessing=False, allow_tqdm=False,
                                               case_progress=True, precision=self.precision)
            with weights_only_loading():  # nnU-Net would unpickle the checkpoints with weights_only=False
                self._predictor.initialize_from_trained_model_folder(str(self.folder), use_folds=self.folds,
                                                                     checkpoint_name=self.checkpoint)
        return self._predictor


def _default_trained_model(name: str, trainer: str | None, configuration: str | None,
                           plans: str | None) -> tuple[str, str]:
    """What the user left open, decided as ``samnnu_train`` decides it (:func:`samnnu.pipeline.training.default_model`),
    from the preprocessed plans or, without them, from the plans saved with a trained model."""
    plans_name = default_plans_name(trainer, plans)
    candidates = [current_paths().preprocessed / name / f"{plans_name}.json"]
    candidates += sorted((current_paths().results / name).glob(model_folder_name("*", plans_name, "*") + "/plans.json"))
    for path in candidates:
        if path.is_file():
            return default_model(read_json(path, "plans"), trainer, configuration)
    return trainer or DEFAULT_TRAINER, configuration or DEFAULT_CONFIGURATION


def trained_model_folder(dataset: str | int, trainer: str | None = None, configuration: str | None = None,
                         plans: str | None = None) -> Path:
    """The folder of a trained model (``RESULTS/DATASET/TRAINER__PLANS__CONFIGURATION``), with what the user
    left open decided as ``samnnu_train`` decides it; one-line SamnnuError when there is none."""
    name = dataset_name(dataset)
    if trainer is None or configuration is None:
        trainer, configuration = _default_trained_model(name, trainer, configuration, plans)
    plans_name = default_plans_name(trainer, plans)
    mfolder = model_folder(name, trainer, plans_name, configuration)
    if not mfolder.is_dir():
        raise SamnnuError(f"{mfolder}: no trained model for trainer {trainer}, plans {plans_name}, "
                          f"configuration {configuration} (train it with samnnu_train)")
    return mfolder


def _open_model(dataset: str | int, *, folds: tuple, trainer: str | None, configuration: str | None,
                plans: str | None,
                device: str | None, checkpoint: str, mirroring: bool, postprocess: bool,
                precision: str = "fp32") -> _Model:
    """Find and check a trained model (folds loaded later); one-line SamnnuError when something is missing
    or ``precision`` cannot run on the device (:func:`samnnu.pipeline.inference.check_precision`)."""
    setup_environment()
    configure_threads()
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # local: pulls in torch (slow to import)

    mfolder = trained_model_folder(dataset, trainer, configuration, plans)
    folds = tuple(f if f == "all" else int(f) for f in folds)
    for f in folds:
        ckpt = mfolder / f"fold_{f}" / checkpoint
        if not ckpt.is_file():
            raise SamnnuError(f"{ckpt}: checkpoint missing (is fold {f} trained?)")
    dataset_json = read_json(mfolder / "dataset.json", "dataset.json of the model")
    dev = pick_device(device)
    from samnnu.pipeline.inference import check_precision  # local: pulls in nnU-Net's predictor

    try:
        check_precision(precision, dev)
    except ValueError as e:
        raise SamnnuError(str(e)) from None

    pp_folder = (mfolder / f"fold_{folds[0]}" / "validation") if len(folds) == 1 else mfolder
    pp = load_postprocessing(pp_folder) if postprocess else None
    if postprocess and pp is None and (pp_folder / "postprocessing.pkl").is_file():
        print(f"samnnu: {pp_folder / 'postprocessing.pkl'} is not used (pickles can run code and are never "
              f"loaded; samnnu reads postprocessing.json)", file=sys.stderr)
    rw = PlansManager(str(mfolder / "plans.json")).image_reader_writer_class()
    return _Model(mfolder, dataset_json, pp, rw, folds, checkpoint, dev, mirroring, precision)


def _intact_raw_prediction(work: Path, case: str, ending: str, probabilities: bool) -> bool:
    """Whether an earlier, interrupted run left a complete raw prediction of ``case`` in ``work``."""
    try:
        check_image_file(work / f"{case}{ending}")
        if probabilities:
            with np.load(work / f"{case}.npz") as z:
                z["probabilities"].shape  # noqa: B018  (reads the array's header: a truncated file fails)
        return True
    except (SamnnuError, OSError, ValueError, KeyError, EOFError):
        return False


def _run_model(model: _Model, cases: Mapping[str, list[Path]], work: Path, probabilities: bool) -> dict[str, Path]:
    """Predict ``cases`` into ``work``: {case: post-processed label map}; with ``probabilities``, nnU-Net's
    ``CASE.npz`` (key ``probabilities``, (C, Z, Y, X) on the input grid) lies beside each.

    Raw predictions already complete in ``work`` (from an interrupted run of the same model) are reused;
    damaged ones are predicted again. Every label map returned has passed :func:`check_image_file`.
    """
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save

    ending = model.file_ending
    todo = {c: p for c, p in cases.items() if not _intact_raw_prediction(work, c, ending, probabilities)}
    if len(todo) < len(cases):
        print(f"samnnu: reusing {len(cases) - len(todo)} raw predictions of the interrupted run in {work}",
              file=sys.stderr)
    if todo:
        lists = [[str(p) for p in paths] for paths in todo.values()]
        truncated = [str(work / case) for case in todo]
        try:
            preprocessing, export = prediction_processes(model.device.type)
            model.predictor().predict_from_files(lists, truncated, save_probabilities=probabilities,
                                                 overwrite=True, num_processes_preprocessing=preprocessing,
                                                 num_processes_segmentation_export=export)
        except OSError as e:  # nnU-Net's own files (plans.json, ...) and exports; a write error names no file
            raise SamnnuError(f"{e.filename or work}: cannot write predictions ({describe_os_error(e)})") from None
    out = {}
    for case in cases:
        produced = work / f"{case}{ending}"
        try:
            check_image_file(produced)
        except SamnnuError as e:
            raise SamnnuError(f"the prediction of case '{case}' was not written completely ({e}; disk full?)") \
                from None
        if model.postprocessing is not None and model.postprocessing[0]:
            final = work / "postprocessed" / f"{case}{ending}"
            write_atomic(final, lambda tmp: load_postprocess_save(str(produced), str(tmp), model.reader_writer,
                                                                  model.postprocessing[0], model.postprocessing[1]),
                         check_image_file)
            produced = final
        out[case] = produced
    return out


def read_image(path: Path) -> tuple[np.ndarray, ImageGeometry]:
    """A volume as a (Z, Y, X) float32 array (2D images: Z = 1) and its geometry."""
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if array.ndim == 2:
        array = array[None]
    return array, ImageGeometry.from_sitk(image)


def _geometry(path: Path):
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return ImageGeometry.from_sitk(reader)


def prompt_free_predictions(cases: Mapping[str, list[Path]], dataset: str | int, *, folds: tuple = (0,),
                            trainer: str | None = None, configuration: str | None = None,
                            plans: str | None = None, device: str | None = None,
                            checkpoint: str = FINAL_CHECKPOINT, mirroring: bool = True,
                            postprocess: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Predict cases ({case: [channel files]}) in memory: ({case: (labels (Z, Y, X), probabilities
    (C, Z, Y, X))}, the model's dataset.json). Labels are post-processed; probabilities are not."""
    model = _open_model(dataset, folds=folds, trainer=trainer, configuration=configuration, plans=plans,
                        device=device, checkpoint=checkpoint, mirroring=mirroring, postprocess=postprocess)
    out = {}
    with tempfile.TemporaryDirectory(prefix="samnnu_predict_") as tmp:
        for case, seg_file in _run_model(model, cases, Path(tmp), probabilities=True).items():
            out[case] = _read_prediction(seg_file, Path(tmp) / f"{case}.npz")
    return out, model.dataset_json


def _read_prediction(seg_file: Path, probs_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels (Z, Y, X), probabilities (C, Z, Y, X)) of one predicted case."""
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_file)))
    probs = np.load(probs_file)["probabilities"].astype(np.float32)
    if seg.ndim == 2:
        seg, probs = seg[None], probs[:, None] if probs.ndim == 3 else probs
    return seg, probs


def _write_like(array: np.ndarray, like: Path, target: Path) -> None:
    """Write a (Z, Y, X) label array with the geometry of the label file ``like`` into ``target`` (atomic,
    checked)."""
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    ref = sitk.ReadImage(str(like))
    data = array if ref.GetDimension() == 3 else array[0]
    image = sitk.GetImageFromArray(data.astype(sitk.GetArrayViewFromImage(ref).dtype, copy=False))
    image.CopyInformation(ref)
    write_image_atomic(image, target)


#: colours of labels 1, 2, ... in overlays (RGB)
OVERLAY_COLOURS = ((46, 204, 113), (231, 76, 60), (52, 152, 219), (241, 196, 15), (155, 89, 182), (230, 126, 34))


def _write_overlay(images: list[Path], labels_file: Path, target: Path, alpha: float = 0.45) -> None:
    """The case's image (its staged PNGs: RGB, or the first grey channel) with each label in colour."""
    from PIL import Image  # local: only 2D datasets need it

    from samnnu.dataset_conversion.folder import save_png  # local: pulls in the converter (SimpleITK)

    with Image.open(images[0]) as im:
        photo = np.asarray(im.convert("RGB") if im.mode in ("RGB", "RGBA", "P") else im)
    if photo.ndim == 2:  # grey (8 or 16 bit): stretched to 8-bit grey
        lo, hi = np.percentile(photo, [0.5, 99.5])
        grey = np.clip((photo.astype(float) - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
        photo = np.stack([grey] * 3, axis=-1)
    with Image.open(labels_file) as im:
        labels = np.asarray(im)
    out = photo.astype(float)
    for k, value in enumerate(v for v in np.unique(labels) if v != 0):
        where = labels == value
        out[where] = (1 - alpha) * out[where] + alpha * np.array(OVERLAY_COLOURS[k % len(OVERLAY_COLOURS)])
    target.parent.mkdir(parents=True, exist_ok=True)
    save_png(np.clip(out, 0, 255).astype(np.uint8), target)


def _write_stored_values(path: Path, values: Mapping[int, int]) -> None:
    """Rewrite a predicted 2D label map (PNG) in the values the dataset's mask files store
    (``{label: stored value}``, e.g. ``{0: 0, 1: 255}``), so it looks as the user's own masks do."""
    from PIL import Image  # local: only 2D datasets need it

    from samnnu.dataset_conversion.folder import save_png  # local: pulls in the converter (SimpleITK)

    with Image.open(path) as image:
        labels = np.asarray(image)
    lut = np.zeros(max(int(labels.max()), max(values)) + 1, dtype=np.uint16)
    for label, value in values.items():
        lut[label] = value
    save_png(lut[labels].astype(np.uint8 if max(values.values()) <= 255 else np.uint16), path)


RESUME_FILE = ".samnnu_predict.json"
WORK_FOLDER = ".samnnu_partial"


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _run_signature(model: _Model, prompts, auto_prompts: bool, refiner: str, refine_options,
                   prompt_path: Path | None = None) -> dict:
    """What makes two prediction runs interchangeable: the model files and every option that changes outputs."""
    if prompts is None:
        prompt_id = None
    elif isinstance(prompts, Mapping):
        prompt_id = hashlib.sha256(json.dumps(prompts, sort_keys=True, default=str).encode()).hexdigest()
    else:
        prompt_id = hashlib.sha256(Path(prompts).read_bytes()).hexdigest() if Path(prompts).is_file() else str(prompts)
    return {"model": str(model.folder), "folds": [str(f) for f in model.folds], "checkpoint": model.checkpoint,
            "checkpoints": [_file_stamp(model.folder / f"fold_{f}" / model.checkpoint) for f in model.folds],
            "mirroring": model.mirroring, "postprocessing": _describe_postprocessing(model.postprocessing),
            "prompts": prompt_id,
            "auto_prompts": auto_prompts, "refiner": refiner if (prompts is not None or auto_prompts) else None,
            "refine_options": repr(refine_options),
            "prompt_path": [str(prompt_path), *_file_stamp(prompt_path)] if prompt_path is not None else None,
            # only when not fp32, so that a record written before the option existed still resumes
            **({"precision": model.precision} if model.precision != "fp32" else {})}


def _describe_postprocessing(postprocessing: tuple | None) -> str | None:
    """nnU-Net's postprocessing decision by function names and arguments: the same in every process (the
    functions' own repr holds their memory address, which would make every run look like another's)."""
    if postprocessing is None:
        return None
    fns, kwargs = postprocessing
    return json.dumps([[f.__name__ for f in fns], kwargs], sort_keys=True, default=str)


def _load_resume_state(record: Path, signature: dict) -> dict | None:
    """{case: input stamps} of cases an interrupted run with the same signature finished, from its resume
    ``record``; None when there is no such run (no record, or one of another model or options)."""
    state = read_json(record, default=None)
    if not isinstance(state, dict) or state.get("signature") != signature or not isinstance(state.get("done"), dict):
        return None
    return state["done"]


def predict(input_folder: str | os.PathLike, output_folder: str | os.PathLike, dataset: str | int, *,
            folds: tuple = (0,), trainer: str | None = None, configuration: str | None = None,
            plans: str | None = None, device: str | None = None, checkpoint: str = FINAL_CHECKPOINT,
            mirroring: bool = True, postprocess: bool = True, prompts: str | os.PathLike | Mapping | None = None,
            auto_prompts: bool = False, refiner: str = "litemedsam", refine_options=None,
            refiner_weights: str = "auto", write_prompts: str | os.PathLike | None = None, overwrite: bool = False, num_parts: int = 1,
            part_id: int = 0, overlay: bool = False, precision: str = "fp32") -> list[Path]:
    """Segment every case in ``input_folder`` into ``output_folder`` (one ``CASE<ending>`` per case).

    Output label maps have exactly the inputs' size, spacing, origin and direction (nnU-Net restores
    them). Several folds are ensembled by averaging softmax outputs. Files appear in the output folder
    only once complete. Inputs are never modified.

    prompts: a prompts file (schema in docs/interactive.md) or its dict; cases it names are refined with
    the promptable refiner (:mod:`samnnu.interactive.refiner`; ``refiner`` = its encoder, ``refine_options`` a
    :class:`~samnnu.interactive.refiner.RefineOptions`). The whole file is checked before anything is predicted:
    a bad prompt is a one-line SamnnuError and no file is written. auto_prompts: every case also gets
    automatic first prompts from its prompt-free prediction (:mod:`samnnu.interactive.auto_prompts`).
    refiner_weights: ``"auto"`` (the prompt path trained on the dataset, ``fold_F/refiner.pth`` of
    ``samnnu_train_prompts``, when the model has one, else the pretrained refiner; and the 3D click corrector,
    ``fold_F/click_corrector.pth`` of ``samnnu_train_prompts --corrector``, when it has one),
    ``"pretrained"`` (neither), or the path of a trained prompt path file. Which ones were used is printed.
    write_prompts: write every prompt used (automatic and given, voxel coordinates) to this JSON file.

    Interrupted runs resume: cases an earlier, interrupted run of the same model and options finished (its
    record is ``OUTPUT/.samnnu_predict.json``, removed when a run completes; inputs unchanged) are kept, raw
    predictions it left in ``OUTPUT/.samnnu_partial/`` are reused when intact, and the rest are predicted. ``overwrite`` redoes
    every case. Every output is re-read before it takes its final name: a full disk is a SamnnuError,
    never a silently empty file.

    precision: "fp32" (default: nnU-Net's computation) or "bf16": the network's forward passes under bfloat16
    autocast, on a CPU that computes bfloat16 natively (measured faster, with slightly different probabilities:
    docs/benchmarks.md, "Prediction speed", "What bfloat16 changes"). Prompted refinement is not affected.

    overlay: for 2D images, also write ``OUTPUT/overlays/CASE.png``: the image with each predicted label
    laid over it in colour, to look at.

    num_parts, part_id: predict only every ``num_parts``-th case (in sorted order), starting at ``part_id``,
    as ``nnUNetv2_predict -num_parts -part_id`` does: ``num_parts`` runs with part ids 0 .. num_parts - 1,
    on as many machines or GPUs, into the same output folder, predict every case exactly once. Each part
    keeps its own resume record and raw predictions.
    """
    if not (isinstance(num_parts, int) and isinstance(part_id, int) and num_parts >= 1 and 0 <= part_id < num_parts):
        raise SamnnuError(f"part {part_id} of {num_parts}: num_parts must be at least 1 and part_id one of "
                          f"0 .. num_parts - 1")
    setup_environment()
    inp = Path(input_folder).resolve()
    out = Path(output_folder).resolve()
    if not inp.is_dir():
        raise SamnnuError(f"{inp}: input folder does not exist")
    if inp == out:
        raise SamnnuError(f"{out}: the output folder must differ from the input folder")
    if out.exists() and not out.is_dir():
        raise SamnnuError(f"{out}: is a file, not a folder (-o names the output folder)")
    model = _open_model(dataset, folds=folds, trainer=trainer, configuration=configuration, plans=plans,
                        device=device, checkpoint=checkpoint, mirroring=mirroring, postprocess=postprocess,
                        precision=precision)
    ending = model.file_ending
    n_channels = len(model.dataset_json["channel_names"])
    images_2d = is_natural_image_dataset(model.dataset_json)
    cases = collect_2d_cases(inp, n_channels) if images_2d else collect_cases(inp, ending, n_channels)
    if num_parts > 1:
        cases = {c: cases[c] for c in sorted(cases)[part_id::num_parts]}

    given = {}
    if prompts is not None:
        given = load_prompts(prompts, model.labels(), {c: _geometry(p[0]) for c, p in cases.items()},
                             input_name=str(inp))
    prompted = [c for c in cases if c in given or auto_prompts]
    refiner_model = prompt_path = None
    if prompted:
        from samnnu.interactive.refiner import RefineOptions, SliceRefiner  # local: pulls in torch (slow to import)

        refine_options = refine_options or RefineOptions()
        prompt_path = choose_prompt_path(model.folder, model.folds, refiner_weights)
        refiner_model = SliceRefiner.create(refiner, device=device, trained=prompt_path,
                                            corrector=choose_corrector(model.folder, model.folds, refiner_weights))
        print(f"samnnu: prompts are applied by the {refiner_model.description}", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".samnnu_tmp_*"):  # left by versions that could not resume
        shutil.rmtree(stale, ignore_errors=True)
    if num_parts == 1:  # other parts may be writing here, from processes this machine cannot see
        remove_stale_tmp(out)
    resume_file, work = out / RESUME_FILE, out / WORK_FOLDER
    if num_parts > 1:
        resume_file = out / f"{Path(RESUME_FILE).stem}.part{part_id}of{num_parts}.json"
        work = out / f"{WORK_FOLDER}.part{part_id}of{num_parts}"
    signature = _run_signature(model, prompts, auto_prompts, refiner, refine_options, prompt_path)
    stamps = {c: [_file_stamp(p) for p in paths] for c, paths in cases.items()}
    previous = None if overwrite else _load_resume_state(resume_file, signature)
    if previous is None and work.is_dir():
        shutil.rmtree(work)  # raw predictions of another model or options
    finished = [c for c in cases if (previous or {}).get(c) == stamps[c] and _intact_output(out / f"{c}{ending}")]
    done = {c: stamps[c] for c in finished}
    if finished:
        print(f"samnnu: {len(finished)} of {len(cases)} cases were already predicted into {out} by the same model "
              f"and options; predicting the other {len(cases) - len(finished)} (--overwrite redoes all)",
              file=sys.stderr)
    todo = {c: p for c, p in cases.items() if c not in done}
    write_json_atomic(resume_file, {"signature": signature, "done": done})

    written = [out / f"{c}{ending}" for c in finished]
    used_prompts = {}
    work.mkdir(exist_ok=True)
    if images_2d and todo:  # any 2D format in, the converter's PNGs to the model
        todo = stage_2d_inputs(todo, work / "inputs")
        cases.update(todo)
    produced = _run_model(model, todo, work, probabilities=bool(prompted)) if todo else {}
    for case, seg_file in produced.items():
        target = out / f"{case}{ending}"
        if case in prompted:
            # local: pulls in scipy and torch (slow to import)
            from samnnu.interactive.auto_prompts import auto_prompts as make_auto_prompts
            from samnnu.interactive.refiner import apply_prompts

            seg, probs = _read_prediction(seg_file, work / f"{case}.npz")
            image, geometry = read_image(cases[case][0])
            case_prompts = []
            if auto_prompts:
                case_prompts += make_auto_prompts(seg, model.labels().values(), probs,
                                                  spacing=tuple(reversed(geometry.spacing)))
            case_prompts += given.get(case, [])
            used_prompts[case] = case_prompts
            refined = apply_prompts(refiner_model, image, seg, probs, case_prompts, refine_options)
            _write_like(refined, seg_file, target)
        else:
            os.replace(seg_file, target)  # checked by _run_model; the same file system
        if images_2d and overlay:
            _write_overlay(cases[case], target, out / "overlays" / f"{case}.png")
        stored = model.dataset_json.get("samnnu_stored_label_values")
        if images_2d and stored:
            labels = model.dataset_json["labels"]
            _write_stored_values(target, {int(labels[name]): value for name, value in stored.items()})
        written.append(target)
        done[case] = stamps[case]
        write_json_atomic(resume_file, {"signature": signature, "done": done})
    shutil.rmtree(work, ignore_errors=True)
    resume_file.unlink()  # every case is done: nothing left to resume
    if write_prompts is not None:
        names = {v: k for k, v in model.labels().items()}
        write_json_atomic(write_prompts, prompts_to_json(used_prompts, names), indent=1)
    return sorted(written)


def choose_prompt_path(folder: Path, folds: Sequence, refiner_weights: str = "auto") -> Path | None:
    """The trained prompt path the refiner loads: for ``"auto"`` the model's own (``fold_F/refiner.pth`` of
    the first fold that has one), for ``"pretrained"`` none, else the file given (which must exist)."""
    from samnnu.interactive.refiner import find_prompt_path  # local: pulls in torch and scipy

    if refiner_weights == "auto":
        return find_prompt_path(folder, folds)
    if refiner_weights == "pretrained":
        return None
    path = Path(refiner_weights)
    if not path.is_file():
        raise SamnnuError(f"{path}: prompt path file not found (--refiner-weights takes auto, pretrained or a "
                          f"refiner.pth written by samnnu_train_prompts)")
    return path


def choose_corrector(folder: Path, folds: Sequence, refiner_weights: str = "auto") -> Path | None:
    """The 3D click corrector the refiner loads: for ``"auto"`` the model's own (``fold_F/click_corrector.pth``
    of the first fold that has one, written by ``samnnu_train_prompts --corrector``), else none."""
    return first_fold_file(folder, folds, CLICK_CORRECTOR_FILE) if refiner_weights == "auto" else None


def _intact_output(path: Path) -> bool:
    try:
        check_image_file(path)
        return True
    except SamnnuError:
        return False
