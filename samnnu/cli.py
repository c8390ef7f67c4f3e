"""Command-line entry points: each parses its arguments and calls one API function.

A :class:`~samnnu.errors.SamnnuError` (bad input, missing files, unknown names) is printed as one
line, ``<command>: error: <message>``, and the command exits with status 1.

Commands are quiet (:mod:`samnnu.quiet`): third-party deprecation warnings are filtered, and what
nnU-Net prints is shown only with ``--verbose`` (or when the command fails). Flags are spelled with
dashes; a renamed flag keeps its old spelling, hidden from ``--help``, for one release (:func:`_old_spelling`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from samnnu.errors import SamnnuError
from samnnu.processes import Terminated, adopt_parent_lifetime, install_command_hooks, stop_children
from samnnu.quiet import quiet_warnings, third_party_output

# Imports inside functions here are on purpose: a command imports its module (and samnnu.config,
# samnnu.safe_io, tqdm) only when it runs, so importing this file stays cheap (no numpy, torch or
# nnU-Net) and --help and argument errors need not load them.

# A worker process spawned by a samnnu command re-imports the command's script, which imports this
# module: from then on the worker dies with the command (no orphans after kill -9).
adopt_parent_lifetime()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message> (see --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fold(text: str) -> str:
    """A fold: 'all' or a whole number >= 0 (checked against the dataset's splits when training)."""
    if text == "all" or (text.isdigit() and text.isascii()):
        return text
    raise argparse.ArgumentTypeError(f"fold '{text}' is neither a number (0, 1, ...) nor 'all'")


def _old_spelling(parser: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """Accept ``old``, a flag's former spelling, as a hidden alias (absent from ``--help``) that sets ``dest``."""
    parser.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kwargs)


def _verbose(parser: argparse.ArgumentParser, also: str = "") -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show what nnU-Net prints (its configuration dumps, per-case and per-epoch "
                             f"lines{also}); without it they are shown only when the command fails")


def _run(prog: str, fn: Callable[[], object], verbose: bool = True) -> int:
    """Run a command's body: user errors, full disks and signals end it with one line, never a traceback.

    Third-party deprecation warnings are filtered throughout; unless ``verbose``, what third-party code
    (nnU-Net) prints is held back and shown only if the body fails (before the error line).
    """
    install_command_hooks()
    try:
        with quiet_warnings(), third_party_output(shown=verbose):
            fn()
    except SamnnuError as e:
        return _fail(prog, f"error: {e}", 1)
    except OSError as e:  # the machine's problem, not samnnu's: a full disk, a read-only or vanished folder
        from samnnu.safe_io import describe_os_error

        where = f"{e.filename}: " if e.filename else ""
        return _fail(prog, f"error: {where}{describe_os_error(e)}", 1)
    except KeyboardInterrupt:
        stop_children()
        return _fail(prog, "interrupted", 130)
    except Terminated:
        stop_children()
        return _fail(prog, "terminated", 143)
    return 0


def _fail(prog: str, message: str, status: int) -> int:
    """Close open progress bars (so the message starts its own line), print ``<prog>: <message>``."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds
    return status


def _data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None,
                        help="folder holding nnUNet_raw, nnUNet_preprocessed and nnUNet_results (overrides the "
                             "nnUNet_* environment variables; default: those variables, else ~/samnnu_data)")


def _setup(args) -> None:
    from samnnu.config import setup_environment

    setup_environment(args.data_root)


def convert_main(argv: Sequence[str] | None = None) -> int:
    from samnnu.dataset_conversion.cli import PROG, build_parser, run

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)

    def go():
        for line in run(args).summary_lines():
            print(line)

    return _run(PROG, go)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``samnnu_evaluate --reference DIR --prediction DIR [-d DATASET_JSON_OR_ID] [-o OUT.json] [--tolerance MM]
    [--data-root DIR]``; problems are one ``samnnu_evaluate: error:`` line and exit status 1.
    ``-ref``/``-pred``, the former spellings, still work (hidden from ``--help``)."""
    parser = _Parser(prog="samnnu_evaluate",
                     description="Dice, IoU, HD95, ASSD, surface Dice and volume errors of a folder of predictions.")
    parser.add_argument("--reference", dest="ref", default=None, metavar="FOLDER",
                        help="folder of reference label maps (required)")
    _old_spelling(parser, "-ref", "ref")
    parser.add_argument("--prediction", dest="pred", default=None, metavar="FOLDER",
                        help="folder of predicted label maps (required)")
    _old_spelling(parser, "-pred", "pred")
    parser.add_argument("-d", "--dataset", dest="dataset", default=None,
                        help="dataset.json (file or folder) or dataset ID/name under nnUNet_raw; gives class names")
    parser.add_argument("-o", "--output", dest="out", default=None,
                        help="output JSON (default: PREDICTION/evaluation.json)")
    parser.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                        help="references saved as JPEG masks: stored values >= T are foreground (as samnnu_convert "
                             "--mask-threshold; needs -d)")
    parser.add_argument("--tolerance", type=_positive_float, default=1.0,
                        help="surface Dice tolerance in mm (default 1)")
    parser.add_argument("-np", dest="num_processes", type=_positive_int, default=1, help="worker processes (default 1)")
    _data_root(parser)
    args = parser.parse_args(argv)
    missing = [flag for flag, value in (("--reference", args.ref), ("--prediction", args.pred)) if value is None]
    if missing:  # not argparse's required=True: the hidden former spellings must satisfy it too
        parser.error(f"the following arguments are required: {', '.join(missing)}")

    def go():
        from samnnu.evaluation.folders import (
            check_output_path,
            dataset_json_from_arg,
            evaluate_folders,
            format_dice_table,
            missing_line,
            write_evaluation,
        )

        out = Path(args.out) if args.out else Path(args.pred) / "evaluation.json"
        check_output_path(out)
        ds = dataset_json_from_arg(args.dataset, args.data_root) if args.dataset is not None else None
        result = evaluate_folders(args.ref, args.pred, dataset_json=ds, tolerance_mm=args.tolerance,
                                  num_processes=args.num_processes, reference_threshold=args.mask_threshold)
        missing = missing_line(result)
        if missing:
            print(f"{parser.prog}: {missing}", file=sys.stderr)
        out_json, out_csv = write_evaluation(result, out)
        print(f"{result['n_cases']} cases; Dice per class:")
        print(format_dice_table(result))
        print(f"wrote {out_json} and {out_csv}")

    return _run(parser.prog, go, verbose=True)


def plan_and_preprocess_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_plan_and_preprocess",
                                description="Fingerprint a converted dataset, plan SAM configurations from it and "
                                            "preprocess the data.")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name (DatasetNNN_Name)")
    p.add_argument("-c", "--configurations", nargs="+", default=None,
                   help="configurations to preprocess (default: 2d and the recommended configuration)")
    p.add_argument("--encoder", default=None, help="SAM encoder (see samnnu.modeling.encoders.ENCODERS; default "
                                                    "litemedsam, or the variant of --sam-checkpoint)")
    p.add_argument("--sam-checkpoint", default=None,
                   help="SAM checkpoint file for encoders whose weights are not bundled (vit_b, vit_l, vit_h, "
                        "mobilesam); written into the plans, loaded when training starts")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device the plans are made for (default: cuda if visible, else cpu)")
    p.add_argument("--device-memory-gb", type=_positive_float, default=None,
                   help="memory budget for training (default: the GPU's memory, or half the RAM up to 16 GB)")
    p.add_argument("--verify-dataset-integrity", action="store_true", help="run nnU-Net's dataset checks first")
    _old_spelling(p, "--verify_dataset_integrity", "verify_dataset_integrity", action="store_true")
    p.add_argument("-np", type=_positive_int, default=None, help="worker processes")
    p.add_argument("--nnunet-baseline-plans", action="store_true",
                   help="also plan and preprocess with nnU-Net's own planner (nnUNetPlans) for baselines")
    _verbose(p)
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        _setup(args)
        from samnnu.pipeline.planning import plan_and_preprocess

        configurations = tuple(args.configurations) if args.configurations else None
        plan_and_preprocess(args.dataset, configurations=configurations, encoder=args.encoder,
                            sam_checkpoint=args.sam_checkpoint, device_type=args.device,
                            device_memory_gb=args.device_memory_gb,
                            verify_dataset_integrity=args.verify_dataset_integrity, processes=args.np,
                            nnunet_baseline_plans=args.nnunet_baseline_plans)

    return _run(p.prog, go, verbose=args.verbose)


def distill_main(argv: Sequence[str] | None = None) -> int:
    """``samnnu_distill -d DATASET [-d ...] --teacher litemedsam --student tinyvit_s -o FILE.pth``."""
    p = _Parser(prog="samnnu_distill",
                description="Distil a SAM image encoder into a smaller student on your own preprocessed images; "
                            "the student keeps the teacher's prompt encoder and mask decoder. Use the file with "
                            "samnnu_plan_and_preprocess --sam-checkpoint FILE.")
    p.add_argument("-d", "--dataset", action="append", required=True,
                   help="a planned and preprocessed dataset (ID or name); repeat for several")
    p.add_argument("--teacher", default="litemedsam", help="teacher encoder (default litemedsam, bundled)")
    p.add_argument("--teacher-checkpoint", default=None, help="the teacher's SAM checkpoint, if not bundled")
    p.add_argument("--student", default="tinyvit_s", help="student: tinyvit_s (default) or tinyvit_xs")
    p.add_argument("-o", "--output", required=True, help="the student checkpoint to write (.pth)")
    p.add_argument("--input-size", type=_positive_int, default=None,
                   help="encoder input side (default: the first dataset's planned 2d input size)")
    p.add_argument("--steps", type=_positive_int, default=2000, help="optimisation steps (default 2000)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="slices per step (default 16)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate, cosine decay (default 1e-3)")
    p.add_argument("--cache", choices=["auto", "on", "off"], default="off",
                   help="off (default): run the teacher on augmented slices, as the trainers see them; on: cache "
                        "its embeddings once per slice (cheaper, no augmentation); auto: cache when each slice "
                        "is seen at least twice")
    p.add_argument("--seed", type=int, default=0)
    _verbose(p)
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        _setup(args)
        from samnnu.config import configure_threads
        from samnnu.pipeline.distill import distill

        configure_threads()
        record = distill(args.dataset, args.output, teacher=args.teacher, student=args.student,
                         teacher_checkpoint=args.teacher_checkpoint, input_size=args.input_size, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, cache=args.cache, seed=args.seed)
        print(f"wrote {args.output}: {record['student']} ({record['student_parameters']:,} parameters) distilled from "
              f"{record['teacher']} on {record['slices']} slices at input {record['input_size']}, final embedding "
              f"MSE {record['final_mse']:.4f} ({record['final_relative_mse']:.1%} of the teacher embeddings' "
              f"mean square)")

    return _run(p.prog, go, verbose=args.verbose)


def train_prompts_main(argv: Sequence[str] | None = None) -> int:
    """``samnnu_train_prompts DATASET FOLD``: the refiner's prompt path trained on a trained fold's cases."""
    p = _Parser(prog="samnnu_train_prompts",
                description="Train the interactive refiner's prompt encoder and mask decoder on the fold's training "
                            "cases with simulated boxes and corrective clicks (the image encoder stays frozen). "
                            "Writes fold_F/refiner.pth into the model folder; samnnu_predict --prompts and "
                            "samnnu_refine then use it.")
    p.add_argument("dataset", help="dataset ID or name")
    p.add_argument("fold", type=_fold, help="the trained fold whose training cases are used")
    p.add_argument("-tr", "--trainer", default=None, help="the model folder's trainer (default: as samnnu_predict)")
    p.add_argument("-c", "--configuration", default=None, help="default: the plans' recommended configuration")
    p.add_argument("-p", "--plans", default=None)
    p.add_argument("--corrector", action="store_true",
                   help="train the 3D click corrector instead (fold_F/click_corrector.pth): a small 3D U-Net that "
                        "makes each click correct the whole 3D error region it lands in; the fold's model predicts "
                        "its training cases first, for starting masks with real errors")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="optimisation steps (default 600; 2000 with --corrector)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="slices per step (default 8), or volumes with --corrector (default 4)")
    p.add_argument("--rounds", type=int, default=None,
                   help="corrective clicks after the first prompt (default 3), or clicks per sample with --corrector "
                        "(default 5)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="AdamW learning rate, cosine decay (default 1e-4; 1e-3 with --corrector)")
    p.add_argument("--features", type=_positive_int, nargs="+", default=None,
                   help="with --corrector: the 3D U-Net's features per stage (default 8 16 32 64)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="with --corrector: forward passes in bfloat16 autocast or float32 (default bf16 where the "
                        "CPU computes bfloat16 natively, else fp32)")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="with --corrector: start from this trained corrector's weights instead of random ones "
                        "(e.g. to train a finished corrector further)")
    p.add_argument("--mirror", action="store_true",
                   help="with --corrector: mirror each training crop along random axes, and answer clicks with "
                        "test-time mirroring (off by default; docs/interactive.md)")
    p.add_argument("--predicted-share", type=float, default=None, metavar="SHARE",
                   help="with --corrector: share of the training samples that start from the model's own "
                        "prediction of the case, the rest from an imperfect copy of its label (default 0.5)")
    p.add_argument("--box-share", type=float, default=None, metavar="SHARE",
                   help="with --corrector: share of the training samples that start from a box on one slice and "
                        "nothing else, so the corrector also answers such boxes in 3D (default 0.3; 0: clicks only)")
    p.add_argument("--slices-per-case", type=_positive_int, default=4,
                   help="labelled slices taken from each training case (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="file to write instead of fold_F/refiner.pth")
    p.add_argument("--refiner-encoder", default="litemedsam", choices=["litemedsam", "tiny"],
                   help="the refiner whose prompt path is trained (default litemedsam; tiny for tests)")
    _verbose(p)
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        _setup(args)
        from samnnu.config import configure_threads
        from samnnu.interactive.prompt_training import train_prompts

        configure_threads()
        # what the user left out is the API's default, which differs between the corrector and the prompt path
        given = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, rounds=args.rounds,
                                       lr=args.lr).items() if v is not None}
        if args.corrector:
            from samnnu.interactive.corrector_training import train_click_corrector

            if args.features is not None:
                given["features"] = tuple(args.features)
            if args.precision is not None:
                given["precision"] = args.precision
            if args.init is not None:
                given["init"] = args.init
            if args.mirror:
                given["mirror"] = True
            if args.predicted_share is not None:
                given["predicted_share"] = args.predicted_share
            if args.box_share is not None:
                given["box_share"] = args.box_share
            record = train_click_corrector(args.dataset, args.fold, trainer=args.trainer,
                                           configuration=args.configuration, plans=args.plans, seed=args.seed,
                                           output=args.output, **given)
            last = record["history"][-1]
            print(f"wrote {record['file']}: 3D click corrector{' (boxes too)' if record.get('box_share') else ''} "
                  f"trained {record['steps']} steps on {record['samples']} "
                  f"labels of {record['cases']} cases ({record['predicted_cases']} predicted by the model); training "
                  f"Dice of the last steps {last['dice_before']:.3f} before, {last['dice_after']:.3f} after "
                  f"{record['rounds']} clicks")
            return
        if (args.features is not None or args.precision is not None or args.init is not None or args.mirror
                or args.predicted_share is not None or args.box_share is not None):
            raise SamnnuError("--features, --precision, --init, --mirror, --predicted-share and --box-share are "
                              "options of --corrector")
        record = train_prompts(args.dataset, args.fold, trainer=args.trainer, configuration=args.configuration,
                               plans=args.plans, encoder=args.refiner_encoder, slices_per_case=args.slices_per_case,
                               seed=args.seed, output=args.output, **given)
        last = record["history"][-1]
        print(f"wrote {record['file']}: prompt path trained {record['steps']} steps on {record['samples']} labelled "
              f"slices of {record['cases']} cases; training Dice of the last steps {last['dice_first']:.3f} after the "
              f"first prompt, {last['dice_last']:.3f} after {record['rounds']} corrective clicks")

    return _run(p.prog, go, verbose=args.verbose)


def train_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_train", description="Train one fold, then validate, postprocess, "
                                                                  "evaluate and write the fold report.")
    p.add_argument("dataset", help="dataset ID or name")
    p.add_argument("fold", type=_fold, help="fold 0-4 (fewer for datasets of under 5 cases), or 'all'")
    p.add_argument("-tr", "--trainer", default=None, help="trainer class name (default: SAMUNetTrainer for 2d, "
                                                           "SAM3DAdapterTrainer for 3d_fullres)")
    p.add_argument("-c", "--configuration", default=None,
                   help="configuration from the plans (default: the one the planner recommends)")
    p.add_argument("-p", "--plans", default=None, help="plans name (default samnnuPlans; nnUNetPlans for "
                                                        "nnU-Net's own trainers)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="number of epochs (default: the trainer's)")
    p.add_argument("--iters-per-epoch", type=_positive_int, default=None, help="training iterations per epoch")
    p.add_argument("--budget-minutes", type=_positive_float, default=None,
                   help="train on the normal schedule and stop after this many minutes (checkpoints kept at 25%% "
                        "and 50%%, learning curve in budget_curve.json); not with --epochs")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="minutes of --budget-minutes: 'wall' (default) or 'cpu' (CPU time of the training "
                        "processes, which other jobs on a shared machine cannot spend)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--num-gpus", type=_positive_int, default=1,
                   help="data-parallel processes through torch.distributed: one per GPU (nccl), or on --device cpu "
                        "that many CPU processes (gloo); see docs/scaling.md")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from the fold's last checkpoint (and, for a budgeted run, its spent budget)")
    p.add_argument("--disable-tta", action="store_true",
                   help="no test-time mirroring in validation (stored with the model: prediction follows it)")
    _old_spelling(p, "--no-mirroring", "disable_tta", action="store_true")
    p.add_argument("--no-chain", action="store_true", help="train only: skip validation, evaluation and report")
    p.add_argument("--npz", action="store_true",
                   help="keep the validation probabilities (as nnUNetv2_train --npz), so that samnnu_summarize can "
                        "ensemble this model with others")
    p.add_argument("--sam-checkpoint", default=None,
                   help="SAM checkpoint file (vit_*, mobilesam); overrides the plans' sam_checkpoint")
    _verbose(p, "; the fold's training_log_*.txt has them either way")
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        _setup(args)
        from samnnu.pipeline.training import train

        kwargs = dict(trainer=args.trainer, configuration=args.configuration, plans=args.plans, epochs=args.epochs,
                      iters_per_epoch=args.iters_per_epoch, device=args.device,
                      continue_training=args.continue_training, mirroring=not args.disable_tta,
                      run_chain=not args.no_chain, sam_checkpoint=args.sam_checkpoint,
                      budget_minutes=args.budget_minutes, budget_clock=args.clock, save_probabilities=args.npz)
        if args.num_gpus > 1:
            from samnnu.pipeline.distributed import train_distributed

            result = train_distributed(args.dataset, args.fold, args.num_gpus, **kwargs)
            print(f"trained with {args.num_gpus} data-parallel processes ({result['ranks'][0]['device']}); "
                  f"their parameters agree")
        else:
            result = train(args.dataset, args.fold, **kwargs)
        if "budget" in result:
            record = result["budget"]
            stop = record["stopped_at"]
            print(f"trained {stop['iterations']} iterations in {stop['spent_seconds'] / 60:.1f} {record['clock']} "
                  f"minutes of the {record['budget_seconds'] / 60:g}-minute budget")
        if "dice" in result:
            dice = ", ".join(f"{k} {v:.3f}" for k, v in result["dice"].items())
            print(f"validation Dice: {dice}\nreport: {result['report']}")

    return _run(p.prog, go, verbose=args.verbose)


def predict_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_predict", description="Segment a folder of volumes or 2D images with a trained "
                                                   "model (folds are ensembled).")
    p.add_argument("-i", "--input", required=True,
                   help="folder of images in the model's format: volumes (CASE.nii.gz, or CASE_0000.nii.gz ... one "
                        "file per channel), or for a model trained on 2D images PNG, JPEG, TIFF or BMP (CASE.jpg, or "
                        "CASE_0000.png ...; an RGB file holds three channels, as samnnu_convert read them)")
    p.add_argument("-o", "--output", required=True, help="output folder (must differ from the input folder)")
    _trained_model_arguments(p)
    p.add_argument("--overwrite", action="store_true",
                   help="predict every case again (default: an interrupted run resumes, keeping the cases it "
                        "finished with the same model and options)")
    _prompt_arguments(p)
    p.add_argument("--prompts", default=None,
                   help="JSON file of boxes/clicks per case and label (docs/interactive.md); those labels are "
                        "refined by the promptable refiner and merged into the output")
    p.add_argument("--auto-prompts", action="store_true",
                   help="refine every case from automatic first prompts derived from its prompt-free prediction")
    p.add_argument("--write-prompts", default=None, help="write every prompt used (voxel coordinates) to this JSON")
    p.add_argument("--num-parts", type=_positive_int, default=1,
                   help="split the cases into this many parts, one per machine or GPU (default 1)")
    p.add_argument("--part-id", type=int, default=0,
                   help="which part this run predicts, 0 .. num-parts - 1 (default 0)")
    p.add_argument("--overlay", action="store_true",
                   help="2D images: also write OUTPUT/overlays/CASE.png, the image with the prediction in colour")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default, nnU-Net's computation) or bf16: the network in bfloat16 autocast, faster on a "
                        "CPU that computes bfloat16 natively, with slightly different probabilities "
                        "(docs/benchmarks.md)")
    _verbose(p)
    _data_root(p)
    args = p.parse_args(argv)
    if not 0 <= args.part_id < args.num_parts:
        p.error(f"--part-id {args.part_id} must be one of 0 .. {args.num_parts - 1} (--num-parts {args.num_parts})")

    def go():
        _setup(args)
        from samnnu.pipeline.prediction import predict

        options = _refine_options(args)
        written = predict(args.input, args.output, args.dataset, folds=tuple(args.folds), trainer=args.trainer,
                          configuration=args.configuration, plans=args.plans, device=args.device,
                          checkpoint=args.checkpoint, mirroring=not args.disable_tta,
                          postprocess=not args.no_postprocessing, prompts=args.prompts,
                          auto_prompts=args.auto_prompts, refiner=args.refiner_encoder, refine_options=options,
                          refiner_weights=args.refiner_weights,
                          write_prompts=args.write_prompts, overwrite=args.overwrite, num_parts=args.num_parts,
                          part_id=args.part_id, overlay=args.overlay, precision=args.precision)
        part = f" (part {args.part_id} of {args.num_parts})" if args.num_parts > 1 else ""
        print(f"wrote {len(written)} segmentations to {args.output}{part}")

    return _run(p.prog, go, verbose=args.verbose)


def _trained_model_arguments(p: argparse.ArgumentParser) -> None:
    """Which trained model predicts, and how (samnnu_predict, samnnu_refine, samnnu_view)."""
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name the model was trained on")
    p.add_argument("-f", "--folds", nargs="+", type=_fold, default=["0"], help="folds to ensemble (default: 0)")
    p.add_argument("-tr", "--trainer", default=None, help="default: as samnnu_train decides from the plans")
    p.add_argument("-c", "--configuration", default=None, help="default: the plans' recommended configuration")
    p.add_argument("-p", "--plans", default=None)
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--disable-tta", action="store_true", help="no test-time mirroring (faster)")
    _old_spelling(p, "--no-mirroring", "disable_tta", action="store_true")
    p.add_argument("--no-postprocessing", action="store_true", help="skip the postprocessing chosen in validation")


def _prompt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refiner-encoder", default="litemedsam", choices=["litemedsam", "tiny"],
                   help="promptable refiner: pretrained LiteMedSAM (default) or a tiny random one (tests)")
    p.add_argument("--refiner-weights", default="auto", metavar="auto|pretrained|FILE",
                   help="the refiner's prompt path: auto (default) uses the one samnnu_train_prompts trained for the "
                        "model when there is one, else the pretrained one; pretrained; or a refiner.pth file")
    p.add_argument("--refine-option", action="append", default=[], metavar="NAME=VALUE",
                   help="refiner setting, a field of samnnu.interactive.refiner.RefineOptions (margin, mask_prompt, "
                        "derived_box, propagate_clicks, stop_at_base, fuse_base, multimask, clicks, click_prompts); "
                        "repeatable; docs/interactive.md")


def _refine_options(args):
    from samnnu.interactive.refiner import RefineOptions

    return RefineOptions.parse(args.refine_option)


def refine_main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
    from samnnu.interactive.refine import HELP

    p = _Parser(prog="samnnu_refine", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Refine one case interactively: the trained model predicts it, then "
                                            "clicks and boxes read from the terminal (or --commands FILE) refine "
                                            "one label at a time.",
                                epilog="commands:\n" + HELP)
    p.add_argument("-i", "--input", nargs="+", required=True, help="the case's image file(s), one per channel")
    p.add_argument("-o", "--output", default=None, help="label map written by 'save'")
    _trained_model_arguments(p)
    p.add_argument("--reference", default=None, help="reference label map: Dice is shown after every change")
    p.add_argument("--label", default=None, help="label to refine first (name or value; default: the first)")
    p.add_argument("--prompts", default=None, help="prompts file; the case's entries start the session")
    p.add_argument("--case", default=None, help="case name in --prompts (default: from the image file name)")
    p.add_argument("--auto-prompts", action="store_true", help="start from automatic first prompts")
    p.add_argument("--commands", default=None, help="read commands from this file instead of stdin")
    _prompt_arguments(p)
    _verbose(p)
    _data_root(p)
    args = p.parse_args(argv)
    out = stdout or sys.stdout

    def go():
        _setup(args)
        from samnnu.interactive.refine import RefineLoop, open_session

        session, geometry = open_session(
            args.input, args.dataset, folds=tuple(args.folds), trainer=args.trainer,
            configuration=args.configuration, plans=args.plans, device=args.device, checkpoint=args.checkpoint,
            mirroring=not args.disable_tta, postprocess=not args.no_postprocessing, reference=args.reference,
            prompts=args.prompts, case=args.case, auto_prompts=args.auto_prompts, refiner=args.refiner_encoder,
            options=_refine_options(args), refiner_weights=args.refiner_weights)
        loop = RefineLoop(session, geometry, args.input[0], args.output, out, label=args.label, prog=p.prog)
        loop.say(f"refiner: {session.refiner.description}")
        for value in sorted(session.names):
            loop.say(("* " if value == loop.label else "  ") + session.describe(value))
        if args.commands is not None:
            try:
                lines = open(args.commands).read().splitlines()
            except OSError as e:
                raise SamnnuError(f"{args.commands}: cannot read commands ({e.strerror})") from None
        else:
            lines = stdin or sys.stdin
        loop.run(lines)

    return _run(p.prog, go, verbose=args.verbose)


def view_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_view", description="Open a case in napari with samnnu's refinement widget: the "
                                                 "trained model segments it, then clicks, boxes, outlines and "
                                                 "scribbles drawn in napari refine it (needs the napari extra: "
                                                 "pip install -e \".[napari]\").")
    p.add_argument("-i", "--input", required=True, help="the case's image file")
    _trained_model_arguments(p)
    _prompt_arguments(p)
    _verbose(p)
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        _setup(args)
        if not Path(args.input).is_file():
            raise SamnnuError(f"{args.input}: image not found")
        try:
            import napari
        except ImportError:
            raise SamnnuError("napari is not installed: pip install -e \".[napari]\"") from None
        from samnnu.interactive.viewer import load_model_stack, make_widget

        load_model_stack()  # before napari's OpenGL canvas (see its docstring)
        viewer = napari.Viewer(title="samnnu")
        widget = make_widget(viewer, image=args.input, dataset=args.dataset, folds=tuple(args.folds),
                             trainer=args.trainer, configuration=args.configuration, plans=args.plans,
                             device=args.device, checkpoint=args.checkpoint, mirroring=not args.disable_tta,
                             postprocess=not args.no_postprocessing, refiner=args.refiner_encoder,
                             options=_refine_options(args), refiner_weights=args.refiner_weights)
        viewer.window.add_dock_widget(widget, name="samnnu", area="right")
        widget.segment()
        napari.run()

    return _run(p.prog, go, verbose=args.verbose)


def demo_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_demo", description="The whole chain on the hippocampus cases shipped "
                                                                 "with samnnu: convert, plan, preprocess, train, "
                                                                 "predict, evaluate, report.")
    p.add_argument("-o", "--output", default=None, help="work folder (default: ./samnnu_demo_output)")
    p.add_argument("--iterations", type=_positive_int, default=None,
                   help="training iterations (default: a few minutes' worth)")
    p.add_argument("--encoder", default="litemedsam", help="SAM encoder (default litemedsam)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--2d", dest="photos", action="store_true",
                   help="the 2D demo instead: shipped synthetic RGB photos with JPEG masks (convert with a mask "
                        "threshold, predict JPEG photos, evaluate against the JPEG masks)")
    _verbose(p)
    args = p.parse_args(argv)

    def go():
        from samnnu.demo import run_demo, run_demo_2d

        (run_demo_2d if args.photos else run_demo)(args.output, iterations=args.iterations, encoder=args.encoder,
                                                   device=args.device)

    return _run(p.prog, go, verbose=args.verbose)


def report_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_report", description="Rebuild a trained fold's report.html and "
                                                                   "report.json from the files in its folder.")
    p.add_argument("fold_dir", help="the fold's results folder, e.g. nnUNet_results/Dataset004_Hippocampus/"
                                    "SAMUNetTrainer__samnnuPlans__2d/fold_0")
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        _setup(args)
        from samnnu.reporting.report import render_fold_report

        print(f"report: {render_fold_report(args.fold_dir)}")

    return _run(p.prog, go)


def summarize_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_summarize", description="Compare every trained model of a dataset "
                                                                      "across its folds (samnnu and plain nnU-Net "
                                                                      "models), pick the best one by cross-validation "
                                                                      "and write summary.json and summary.html.")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    p.add_argument("-o", "--output", default=None, help="output folder (default: nnUNet_results/DatasetXXX/summary)")
    p.add_argument("--no-ensembles", action="store_true", help="compare single models only")
    p.add_argument("-np", type=_positive_int, default=None, help="worker processes for evaluation")
    _verbose(p)
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        _setup(args)
        from samnnu.reporting.summary import summarize

        result = summarize(args.dataset, output_dir=args.output, ensembles=not args.no_ensembles,
                           num_processes=args.np, data_root=args.data_root)
        best = result["best"]
        print(f"best: {best['name']} (mean foreground Dice {best['foreground_dice_mean']:.4f} over folds "
              f"{' '.join(map(str, best['folds']))})\n{best['predict_command']}\nsummary: {result['html']}")

    return _run(p.prog, go, verbose=args.verbose)


def benchmark_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="samnnu_benchmark",
                                description="samnnu's default and plain nnU-Net (every configuration it plans) side "
                                            "by side on one fold: the same budget, training subsets and chain for "
                                            "every model; writes results.json, results.md and learning curves. "
                                            "Resumable.")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name (converted, planned, preprocessed)")
    p.add_argument("-m", "--models", nargs="+", default=None,
                   help="trainer:configuration[:plans] (default: samnnu's default trainer and configuration, and "
                        "nnUNetTrainer in every configuration of nnU-Net's plans)")
    p.add_argument("-f", "--fold", type=int, choices=range(0, 100), metavar="FOLD", default=0)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-minutes", type=_positive_float, default=None,
                        help="the headline budget: each model trains on its normal schedule and is stopped after "
                             "this many minutes (see --clock); its learning curve is recorded")
    budget.add_argument("--iterations", type=_positive_int, default=None,
                        help="secondary mode: the same number of iterations per model, schedule squeezed into them")
    p.add_argument("--squeeze", action="store_true",
                   help="secondary mode: convert --budget-minutes into iterations from a timed run and squeeze the "
                        "schedule into them")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="what a minute of --budget-minutes is: 'cpu' (CPU time of the training process and its "
                        "data-loader workers; other jobs cannot spend it; default on a CPU) or 'wall' (default on "
                        "a GPU)")
    p.add_argument("--sizes", nargs="+", default=None,
                   help="training-set sizes, e.g. 5 10 20 all (seeded subsets of the fold's training cases; "
                        "default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training subsets")
    p.add_argument("--sparse-slices", nargs="+", type=_positive_int, default=None, metavar="N",
                   help="also train samnnu's default and nnU-Net's best on N annotated slices per training volume "
                        "(a sparse-label copy of the dataset, same budget), evaluated against the dense labels")
    p.add_argument("--sparse-end-slices", action="store_true",
                   help="with --sparse-slices: the sparse labels also mark the empty slice past each end of the "
                        "structures as background (runs kept apart from the plain N-slice runs)")
    p.add_argument("--timing-cases", type=_positive_int, default=None,
                   help="validation volumes timed for inference speed (default 5; 1 with --quick)")
    p.add_argument("--test-images", default=None,
                   help="external test images, cases never used in training (default: the dataset's imagesTs, "
                        "written by samnnu_convert --hold-out)")
    p.add_argument("--test-labels", default=None, help="labels of the external test images")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--retime", action="store_true",
                   help="train nothing: time the listed models' inference again on their largest finished run")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 iterations per model, one timed volume (unless given otherwise)")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json, results.md, runs, logs)")
    _verbose(p, " of this process; each model's full output is in OUTPUT/logs")
    _data_root(p)
    args = p.parse_args(argv)

    def go():
        from samnnu.benchmark.runner import parse_size, run_benchmark

        iterations, minutes = args.iterations, args.budget_minutes
        if args.quick and iterations is None and minutes is None:
            iterations = 2
        timing = args.timing_cases if args.timing_cases is not None else (1 if args.quick else 5)
        if iterations is None and minutes is None:
            raise SamnnuError("give a budget: --iterations N or --budget-minutes M (or --quick)")
        sizes = [parse_size(s) for s in args.sizes] if args.sizes else None
        state = run_benchmark(args.dataset, args.models, args.output, fold=args.fold, iterations=iterations,
                              budget_minutes=minutes, squeeze=args.squeeze, clock=args.clock, sizes=sizes, seed=args.seed, timing_cases=timing,
                              test_images=args.test_images, test_labels=args.test_labels, device=args.device,
                              data_root=args.data_root, retime=args.retime, sparse_slices=args.sparse_slices,
                              sparse_end_slices=args.sparse_end_slices,
                              command=" ".join(["samnnu_benchmark", *(argv or sys.argv[1:])]))
        print(f"results: {args.output}/results.json and results.md ({len(state['ran'])} runs now, "
              f"{len(state['runs']) - len(state['ran'])} from before)")

    return _run(p.prog, go, verbose=args.verbose)
