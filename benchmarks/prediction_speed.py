"""Seconds per hippocampus volume: samnnu's default model against nnU-Net 3d_fullres, in one run.

Prediction time does not depend on what a network has learned, so the models are trained for one
iteration only, on a small subset of the cases: the point is the time of raw file in -> label file out,
with and without test-time mirroring, as ``samnnu_predict`` and ``nnUNetv2_predict`` spend it. The
predictors are timed on the same cases, interleaved (A, B, C, A, B, C, ...), each ``--repeats`` times,
after an untimed warm-up; the median is reported:

- ``nnunet_3d_fullres``: nnU-Net's own predictor on nnU-Net's 3d_fullres model (what nnU-Net users get);
- ``samnnu_2d_per_tile``: nnU-Net's predictor on samnnu's default 2D model (samnnu before batching);
- ``samnnu_2d_batched``: :class:`samnnu.pipeline.inference.BatchedPredictor` on the same model, as
  ``samnnu_predict`` runs it: its network inputs per forward pass (``--views-per-pass`` sets another
  number; 0 leaves this predictor out) and its worker processes for preprocessing and export
  (:func:`samnnu.config.prediction_processes`: none on a machine of 2 cores); nnU-Net's predictors run with
  one preprocessing and one export worker;
- ``samnnu_2d_batched_workers`` and ``nnunet_3d_fullres_in_process`` with ``--also-other-processes``: the
  batched predictor with one worker each, and nnU-Net 3d_fullres with none (nnU-Net's
  ``predict_from_files_sequential``), so the worker choice is timed on its own for both models;
- ``samnnu_2d_input{N}`` with ``--also-input-size N``: the same model and weights with the encoder's square
  input set to N instead of the planned size (a copy of the model folder whose plans say N), to time
  the planner's choice of input size against another one; predicted like ``samnnu_2d_batched`` (with
  ``--views-per-pass 0``, by nnU-Net's per-tile predictor, as in the runs before batching);
- ``samnnu_2d_unfolded_encoder`` with ``--also-unfolded-encoder``: the same model, its frozen encoder run as
  the module itself instead of its inference copy (BatchNorm folded, channels-last; see
  :func:`samnnu.modeling.encoders.inference_encoder`), i.e. samnnu before that copy;
- ``samnnu_2d_student`` with ``--also-sam-checkpoint FILE``: samnnu's default trainer on the same cases
  planned with that encoder checkpoint (a ``samnnu_distill`` student; the cases converted a second time,
  as dataset ``STUDENT_DATASET_ID``), predicted by ``BatchedPredictor`` like ``samnnu_2d_batched``;
- ``samnnu_2d_{NAME}`` with ``--also-trainer NAME``: another trainer of samnnu on the same plans (e.g. a
  recipe variant), trained for one iteration too, predicted by ``BatchedPredictor`` like ``samnnu_2d_batched``;
- ``samnnu_2d_bf16`` with ``--also-bf16``: ``samnnu_predict --precision bf16``, the batched predictor with the
  network under bfloat16 autocast (on a CPU that computes bfloat16 natively);
- ``samnnu_encoder_floor`` (and ``samnnu_encoder_floor_bf16`` where bfloat16 is native) with ``--also-floor``:
  samnnu's frozen encoder alone on exactly the inputs the batched predictor gives the network for the timed
  volumes (every slice, and with mirroring every mirrored copy, in its passes), the volumes preprocessed
  beforehand. No reading, preprocessing, conv branch, decoder or export: the least time a predictor of this
  model can take with these passes, threads and precision. The run also counts the floating-point
  operations per timed volume without mirroring (``torch.utils.flop_counter``) of nnU-Net 3d_fullres,
  samnnu's default and its encoder alone, and of the ``--also-input-size`` and ``--also-trainer`` models and
  their encoders alone.

    python benchmarks/prediction_speed.py -o speed_out        # writes speed_out/prediction_speed.json
    python benchmarks/prediction_speed.py -o speed_out --ensemble-only   # 5-fold SAMUNetTrainer vs one fold

``--ensemble``/``--ensemble-only``: SAMUNetTrainer's five folds (one iteration each) predicted as one
ensemble against fold 0 alone, both with ``BatchedPredictor``, whose frozen encoder encodes each tile once
for all folds.

Run it alone on the machine (it sets torch's threads to the available cores, see
:func:`samnnu.config.configure_threads`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
DATASET_ID = 990
STUDENT_DATASET_ID = 991


def prepare(src: Path, n_cases: int, root: Path) -> list[str]:
    """Convert the first ``n_cases`` cases into a fresh data root, plan (samnnu and nnU-Net plans, 2d and
    3d_fullres), preprocess and train both models for one iteration; the case ids."""
    from samnnu.config import setup_environment
    from samnnu.dataset_conversion.hippocampus import convert_hippocampus
    from samnnu.pipeline.planning import plan_and_preprocess
    from samnnu.pipeline.training import train

    subset = root / "src"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (src / "images").glob("*.nii.gz"))[:n_cases]
    for sub in ("images", "labels"):
        (subset / sub).mkdir(parents=True)
        for c in cases:
            shutil.copy(src / sub / f"{c}.nii.gz", subset / sub / f"{c}.nii.gz")
    paths = setup_environment(root / "data")
    convert_hippocampus(subset, DATASET_ID, raw_root=paths.raw)
    plan_and_preprocess(DATASET_ID, configurations=("2d", "3d_fullres"), nnunet_baseline_plans=True)
    train(DATASET_ID, 0, configuration="2d", epochs=1, iters_per_epoch=1, run_chain=False, device="cpu")
    train(DATASET_ID, 0, trainer="nnUNetTrainer", configuration="3d_fullres", epochs=1, iters_per_epoch=1,
          run_chain=False, device="cpu")
    return cases


def prepare_student(root: Path, checkpoint: Path) -> Path:
    """The subset of :func:`prepare` converted again as ``STUDENT_DATASET_ID``, planned with the encoder
    checkpoint ``checkpoint`` and samnnu's default trainer trained on it for one iteration; its model folder."""
    from samnnu.config import current_paths
    from samnnu.dataset_conversion.hippocampus import convert_hippocampus
    from samnnu.datasets import dataset_name, model_folder
    from samnnu.defaults import DEFAULT_TRAINER, PLANS_NAME
    from samnnu.pipeline.planning import plan_and_preprocess
    from samnnu.pipeline.training import train

    convert_hippocampus(root / "src", STUDENT_DATASET_ID, raw_root=current_paths().raw)
    plan_and_preprocess(STUDENT_DATASET_ID, configurations=("2d",), sam_checkpoint=str(checkpoint), device_type="cpu")
    train(STUDENT_DATASET_ID, 0, configuration="2d", epochs=1, iters_per_epoch=1, run_chain=False, device="cpu")
    return model_folder(dataset_name(STUDENT_DATASET_ID), DEFAULT_TRAINER, PLANS_NAME, "2d")


def time_ensemble(cases: list[str], timing_cases: int, repeats: int, bf16: bool = False) -> dict:
    """Seconds per volume of SAMUNetTrainer: fold 0 alone against the 5-fold ensemble (trained here); with
    ``bf16`` both again with ``--precision bf16``."""
    import torch

    from samnnu.config import current_paths, prediction_processes
    from samnnu.datasets import dataset_name, model_folder
    from samnnu.defaults import FINAL_CHECKPOINT, PLANS_NAME
    from samnnu.pipeline.inference import BatchedPredictor
    from samnnu.pipeline.training import train
    from samnnu.safe_io import weights_only_loading

    for fold in range(5):
        train(DATASET_ID, fold, trainer="SAMUNetTrainer", configuration="2d", epochs=1, iters_per_epoch=1,
              run_chain=False, device="cpu")
    name = dataset_name(DATASET_ID)
    images = current_paths().raw / name / "imagesTr"
    timed = cases[-timing_cases:]
    lists = [[str(images / f"{c}_0000.nii.gz")] for c in timed]
    predictors = {}
    setups = [("one_fold", (0,), "fp32"), ("five_folds", (0, 1, 2, 3, 4), "fp32")]
    if bf16:
        setups += [("one_fold_bf16", (0,), "bf16"), ("five_folds_bf16", (0, 1, 2, 3, 4), "bf16")]
    for key, folds, precision in setups:
        p = BatchedPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                             perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                             verbose_preprocessing=False, allow_tqdm=False, precision=precision)
        with weights_only_loading():
            p.initialize_from_trained_model_folder(str(model_folder(name, "SAMUNetTrainer", PLANS_NAME, "2d")),
                                                   use_folds=folds, checkpoint_name=FINAL_CHECKPOINT)
        p.allowed_mirroring_axes = (0, 1)
        predictors[key] = p
    seconds: dict[str, list[float]] = {f"{k}{m}": [] for k in predictors for m in ("", "_mirroring")}
    with tempfile.TemporaryDirectory() as tmp:
        preprocessing, export = prediction_processes()  # as samnnu_predict runs them

        def run(p, mirroring: bool, tag: str) -> float:
            p.use_mirroring = mirroring
            start = time.perf_counter()
            p.predict_from_files(lists, [os.path.join(tmp, f"{c}_{tag}") for c in timed], save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=preprocessing,
                                 num_processes_segmentation_export=export)
            return (time.perf_counter() - start) / len(timed)

        for p in predictors.values():
            run(p, False, "warmup")
        for r in range(repeats):
            for mirroring in (False, True):
                for key, p in predictors.items():
                    seconds[f"{key}{'_mirroring' if mirroring else ''}"].append(run(p, mirroring, f"{key}{r}"))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    result = {"seconds_per_volume_median": med, "seconds_per_volume_all": seconds}
    for tag in ("", "_bf16") if bf16 else ("",):
        for m in ("", "_mirroring"):
            result[f"five_over_one{tag}{m}"] = med[f"five_folds{tag}{m}"] / med[f"one_fold{tag}{m}"]
    return result


def copy_with_input_size(folder: Path, size: int, dst: Path) -> Path:
    """A copy of the model folder ``folder`` whose plans give the SAM encoder an input of ``size``."""
    import json

    from samnnu.modeling.encoders import get_encoder_spec
    from samnnu.safe_io import write_json_atomic

    shutil.copytree(folder, dst)
    plans = json.loads((dst / "plans.json").read_text())
    for configuration in plans["configurations"].values():
        sam = configuration.get("sam")
        if sam:
            sam["input_size"], sam["embedding_grid"] = size, size // get_encoder_spec(sam["encoder"]).stride
    write_json_atomic(dst / "plans.json", plans)
    return dst


def unfold_encoders(network) -> None:
    """Make every frozen encoder of ``network`` run its module itself, not the folded inference copy."""
    from samnnu.modeling.frozen_encoder import FrozenSAMEncoder

    for m in network.modules():
        if isinstance(m, FrozenSAMEncoder):
            object.__setattr__(m, "_run_encoder", m.image_encoder)  # shadows the method


def preprocess_cases(p, lists: list[list[str]]) -> list:
    """The cases ``lists`` preprocessed for predictor ``p`` (its plans and configuration): [(C, *image) tensors]."""
    import torch

    pre = p.configuration_manager.preprocessor_class(verbose=False)
    volumes = []
    for files in lists:
        data, _, _ = pre.run_case(files, None, p.plans_manager, p.configuration_manager, p.dataset_json)
        volumes.append(torch.from_numpy(data).float())
    return volumes


@contextlib.contextmanager
def encoder_only(p):
    """Within: predictor ``p``'s network is replaced by its frozen encoder (``network.sam``) alone, which
    returns zero logits, so that ``p``'s sliding window, mirroring and passes feed the encoder exactly what
    they feed the network."""
    import torch

    network, classes = p.network, p.label_manager.num_segmentation_heads

    class EncoderOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sam = network.sam
            self.context_slices = getattr(network, "context_slices", 0)  # the predictor adds 2.5D neighbours

        def forward(self, x):
            self.sam(x)
            return x.new_zeros((x.shape[0], classes, *x.shape[2:]))

    p.network = EncoderOnly()
    try:
        yield p
    finally:
        p.network = network


def encoder_floor(p, volumes: list, mirroring: bool, precision: str) -> float:
    """Seconds per volume of the frozen encoder of ``p``'s network alone (:func:`encoder_only`) on ``volumes``
    (preprocessed), with or without mirroring, in ``precision``."""
    precision_before, mirroring_before = p.precision, p.use_mirroring
    p.precision, p.use_mirroring = precision, mirroring
    try:
        with encoder_only(p):
            start = time.perf_counter()
            for data in volumes:
                p.predict_sliding_window_return_logits(data)
            return (time.perf_counter() - start) / len(volumes)
    finally:
        p.precision, p.use_mirroring = precision_before, mirroring_before


def flops_per_volume(p, volumes: list) -> float:
    """Floating-point operations (a multiply-add counts 2) of predictor ``p`` per preprocessed volume of
    ``volumes``, without mirroring, as counted by ``torch.utils.flop_counter`` (mean over the volumes)."""
    from torch.utils.flop_counter import FlopCounterMode

    mirroring, p.use_mirroring = p.use_mirroring, False
    try:
        with FlopCounterMode(display=False) as counter:
            for data in volumes:
                p.predict_sliding_window_return_logits(data)
        return counter.get_total_flops() / len(volumes)
    finally:
        p.use_mirroring = mirroring


def time_predictors(cases: list[str], timing_cases: int, repeats: int, views: int | None,
                    other_input_size: int | None = None, unfolded: bool = False,
                    student: Path | None = None, workers_too: bool = False, only: list[str] | None = None,
                    bf16: bool = False, floor: bool = False, other_trainer: str | None = None) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from samnnu.config import current_paths, prediction_processes
    from samnnu.datasets import dataset_name, model_folder
    from samnnu.defaults import DEFAULT_TRAINER, FINAL_CHECKPOINT, PLANS_NAME
    from samnnu.pipeline.inference import BatchedPredictor
    from samnnu.safe_io import weights_only_loading

    name = dataset_name(DATASET_ID)
    images = current_paths().raw / name / "imagesTr"
    timed = cases[-timing_cases:]
    lists = [[str(images / f"{c}_0000.nii.gz")] for c in timed]
    samnnu_model = model_folder(name, DEFAULT_TRAINER, PLANS_NAME, "2d")
    setups = {
        "nnunet_3d_fullres": (nnUNetPredictor, model_folder(name, "nnUNetTrainer", "nnUNetPlans", "3d_fullres")),
        "samnnu_2d_per_tile": (nnUNetPredictor, samnnu_model),
    }
    if views != 0:
        setups["samnnu_2d_batched"] = (BatchedPredictor, samnnu_model)
    if workers_too:
        setups["samnnu_2d_batched_workers"] = (BatchedPredictor, samnnu_model)
        setups["nnunet_3d_fullres_in_process"] = setups["nnunet_3d_fullres"]
    if other_input_size:
        # predicted as samnnu_predict predicts (batched), unless batching is left out (--views-per-pass 0)
        setups[f"samnnu_2d_input{other_input_size}"] = (
            BatchedPredictor if views != 0 else nnUNetPredictor,
            copy_with_input_size(samnnu_model, other_input_size,
                                 samnnu_model.parent / f"{samnnu_model.name}_input{other_input_size}"))
    if unfolded:
        setups["samnnu_2d_unfolded_encoder"] = (nnUNetPredictor, samnnu_model)
    if student is not None:
        setups["samnnu_2d_student"] = (BatchedPredictor, student)
    if other_trainer:
        setups[f"samnnu_2d_{other_trainer}"] = (BatchedPredictor if views != 0 else nnUNetPredictor,
                                                model_folder(name, other_trainer, PLANS_NAME, "2d"))
    if bf16:
        setups["samnnu_2d_bf16"] = (BatchedPredictor, samnnu_model)
    if only:
        unknown = set(only) - set(setups)
        if unknown:
            raise SystemExit(f"--only: no predictor {sorted(unknown)} in this run (there are {sorted(setups)})")
        setups = {k: v for k, v in setups.items() if k in only}
    def load(cls, folder: Path, **extra):
        """Fold 0 of the model in ``folder`` loaded into a ``cls`` predictor on the CPU, mirroring every axis."""
        if cls is BatchedPredictor:
            extra = {"views_per_pass": views or None, **extra}
        p = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False, **extra)
        with weights_only_loading():
            p.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name=FINAL_CHECKPOINT)
        p.allowed_mirroring_axes = tuple(range(len(p.configuration_manager.patch_size)))
        return p

    predictors = {}
    for key, (cls, folder) in setups.items():
        predictors[key] = load(cls, folder, **({"precision": "bf16"} if key == "samnnu_2d_bf16" else {}))
        if key == "samnnu_2d_unfolded_encoder":
            unfold_encoders(predictors[key].network)
    # worker processes (preprocessing, export): nnUNetv2_predict's one each; samnnu_predict's own choice for
    # BatchedPredictor (prediction_processes: none on a machine of 2 cores); the *_workers / *_in_process rows
    # time the other choice
    processes = {key: (1, 1) for key in predictors}
    others = ([f"input{other_input_size}"] if other_input_size else []) + ([other_trainer] if other_trainer else [])
    for key in ("samnnu_2d_batched", "samnnu_2d_student", "samnnu_2d_bf16", *(f"samnnu_2d_{t}" for t in others)):
        if key in processes and isinstance(predictors[key], BatchedPredictor):
            processes[key] = prediction_processes()
    if "nnunet_3d_fullres_in_process" in processes:
        processes["nnunet_3d_fullres_in_process"] = (0, 0)
    floors, flops = {}, {}
    if floor:
        from samnnu.modeling.common import cpu_computes_bf16

        batched = predictors.get("samnnu_2d_batched") or load(BatchedPredictor, samnnu_model)
        batched.network.load_state_dict(batched.list_of_parameters[0])
        volumes = preprocess_cases(batched, lists)
        for precision in ("fp32", "bf16") if cpu_computes_bf16() else ("fp32",):
            floors["samnnu_encoder_floor" + ("_bf16" if precision == "bf16" else "")] = (
                lambda mirroring, precision=precision: encoder_floor(batched, volumes, mirroring, precision))
        flops["samnnu_2d_batched"] = flops_per_volume(batched, volumes)
        with encoder_only(batched):
            flops["samnnu_encoder"] = flops_per_volume(batched, volumes)
        # the same preprocessing as the default's: the same plans but for the sam block's input size
        for tag in others:
            other = predictors.get(f"samnnu_2d_{tag}")
            if isinstance(other, BatchedPredictor):
                other.network.load_state_dict(other.list_of_parameters[0])
                flops[f"samnnu_2d_{tag}"] = flops_per_volume(other, volumes)
                with encoder_only(other):
                    flops[f"samnnu_encoder_{tag}"] = flops_per_volume(other, volumes)
        reference = next((predictors[k] for k in ("nnunet_3d_fullres", "nnunet_3d_fullres_in_process")
                          if k in predictors), None)
        if reference is not None:
            reference.network.load_state_dict(reference.list_of_parameters[0])
            flops["nnunet_3d_fullres"] = flops_per_volume(reference, preprocess_cases(reference, lists))
    seconds: dict[str, list[float]] = {f"{k}{m}": [] for k in [*predictors, *floors] for m in ("", "_mirroring")}
    with tempfile.TemporaryDirectory() as tmp:
        def run(key: str, mirroring: bool, tag: str) -> float:
            if key in floors:
                return floors[key](mirroring)
            p = predictors[key]
            p.use_mirroring = mirroring
            targets = [os.path.join(tmp, f"{c}_{tag}") for c in timed]
            start = time.perf_counter()
            if processes[key] == (0, 0) and not isinstance(p, BatchedPredictor):  # nnU-Net's in-process path
                p.predict_from_files_sequential(lists, targets, save_probabilities=False, overwrite=True)
            else:
                p.predict_from_files(lists, targets, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=processes[key][0],
                                     num_processes_segmentation_export=processes[key][1])
            return (time.perf_counter() - start) / len(timed)

        for key in [*predictors, *floors]:  # warm-up, untimed
            run(key, False, "warmup")
        for r in range(repeats):
            for mirroring in (False, True):
                for key in [*predictors, *floors]:
                    seconds[f"{key}{'_mirroring' if mirroring else ''}"].append(run(key, mirroring, f"{key}{r}"))
    return {"seconds_per_volume_median": {k: statistics.median(v) for k, v in seconds.items()},
            "seconds_per_volume_all": seconds, "timing_cases": timed, "flops_per_volume": flops,
            "worker_processes": {k: list(v) for k, v in processes.items()},
            "views_per_pass": next((p._views_per_pass() for p in predictors.values() if hasattr(p, "_views_per_pass")),
                                   None),
            "planned_input_size": next(iter(p.configuration_manager.configuration["sam"]["input_size"]
                                            for p in predictors.values() if "sam" in p.configuration_manager.configuration),
                                       None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="folder for prediction_speed.json")
    parser.add_argument("--src", default=str(DEFAULT_SRC), help="hippocampus folder (images/, labels/)")
    parser.add_argument("--cases", type=int, default=12, help="cases converted and planned (default 12)")
    parser.add_argument("--timing-cases", type=int, default=4, help="volumes predicted per timing (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per predictor and mirroring (default 3)")
    parser.add_argument("--ensemble", action="store_true", help="also time SAMUNetTrainer's 5-fold ensemble")
    parser.add_argument("--ensemble-only", action="store_true", help="time only the 5-fold ensemble")
    parser.add_argument("--views-per-pass", type=int, default=None,
                        help="network inputs per pass, batched (default: samnnu_predict's; 0: do not time the "
                             "batched predictor)")
    parser.add_argument("--also-input-size", type=int, default=None,
                        help="also time samnnu's model with the encoder input set to this size")
    parser.add_argument("--also-sam-checkpoint", type=Path, default=None,
                        help="also time samnnu's default trainer planned with this encoder checkpoint (a student)")
    parser.add_argument("--also-other-processes", action="store_true",
                        help="also time samnnu's batched predictor with nnU-Net's worker processes and nnU-Net "
                             "3d_fullres in one process (nnU-Net's predict_from_files_sequential)")
    parser.add_argument("--also-trainer", default=None, metavar="NAME",
                        help="also time this samnnu trainer's model (trained for one iteration on the same plans), "
                             "e.g. SAMUNetHalfEncoderTrainer")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREDICTOR",
                        help="time only these predictors of the run (e.g. samnnu_2d_batched samnnu_2d_batched_workers)")
    parser.add_argument("--also-bf16", action="store_true",
                        help="also time samnnu_predict --precision bf16 (a CPU that computes bfloat16 natively; "
                             "with --ensemble, the ensemble and one fold in bf16 too)")
    parser.add_argument("--also-floor", action="store_true",
                        help="also time samnnu's frozen encoder alone on the timed volumes' network inputs (the "
                             "least time its predictor can take at these passes and precision) and count each "
                             "model's operations per volume")
    parser.add_argument("--also-unfolded-encoder", action="store_true",
                        help="also time samnnu's model with its frozen encoder unfolded (no inference copy)")
    args = parser.parse_args()

    from samnnu.config import configure_threads
    from samnnu.quiet import quiet_warnings, third_party_output
    from samnnu.safe_io import write_json_atomic

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_warnings(), third_party_output(shown=False), tempfile.TemporaryDirectory() as tmp:
        threads = configure_threads()
        t0 = time.perf_counter()
        cases = prepare(Path(args.src), args.cases, Path(tmp))
        student = (prepare_student(Path(tmp), args.also_sam_checkpoint.resolve())
                   if args.also_sam_checkpoint and not args.ensemble_only else None)
        if (args.also_trainer and not args.ensemble_only
                and (not args.only or f"samnnu_2d_{args.also_trainer}" in args.only)):
            from samnnu.pipeline.training import train

            train(DATASET_ID, 0, trainer=args.also_trainer, configuration="2d", epochs=1, iters_per_epoch=1,
                  run_chain=False, device="cpu")
        prepared = time.perf_counter() - t0
        result = {} if args.ensemble_only else time_predictors(cases, args.timing_cases, args.repeats,
                                                                args.views_per_pass, args.also_input_size,
                                                                args.also_unfolded_encoder, student,
                                                                args.also_other_processes, args.only,
                                                                args.also_bf16, args.also_floor, args.also_trainer)
        if args.ensemble or args.ensemble_only:
            result["ensemble"] = time_ensemble(cases, args.timing_cases, args.repeats, args.also_bf16)
    from samnnu.modeling.common import cpu_computes_bf16

    result.update({"torch_threads": threads, "prepare_seconds": prepared,
                   "machine": platform.processor() or platform.machine(), "cpu_computes_bf16": cpu_computes_bf16()})
    if "seconds_per_volume_median" in result:
        med = result["seconds_per_volume_median"]
        ratios = {}
        for base, tag in (("nnunet_3d_fullres", "nnunet_3d"), ("nnunet_3d_fullres_in_process", "nnunet_3d_in_process")):
            for key in [k for k in med if base in med and k.startswith("samnnu") and not k.endswith("_mirroring")]:
                ratios[f"{key}_over_{tag}"] = med[key] / med[base]
                ratios[f"{key}_over_{tag}_mirroring"] = med[f"{key}_mirroring"] / med[f"{base}_mirroring"]
        result["ratios"] = ratios
        for k, v in result.get("flops_per_volume", {}).items():
            print(f"{k:36s} {v / 1e9:8.1f} GFLOP per volume (no mirroring, mean of the timed volumes)")
        for k, v in list(med.items()) + list(result["ratios"].items()):
            print(f"{k:36s} {v:6.2f}")
    if "ensemble" in result:
        for k, v in list(result["ensemble"]["seconds_per_volume_median"].items()):
            print(f"SAMUNetTrainer {k:26s} {v:6.2f} s/volume")
        for tag in ("", "_bf16"):
            if f"five_over_one{tag}" in result["ensemble"]:
                print(f"five folds / one fold{tag.replace('_', ', ')}: {result['ensemble'][f'five_over_one{tag}']:.2f} "
                      f"(mirroring {result['ensemble'][f'five_over_one{tag}_mirroring']:.2f})")
    write_json_atomic(out / "prediction_speed.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
