"""``samnnu_convert``: write an nnU-Net v2 raw dataset from source data.

    samnnu_convert hippocampus SRC -d ID [--hold-out PATTERN] [--overwrite] [--data-root DIR]
    samnnu_convert folder IMAGES LABELS -d ID -n NAME --labels background=0,liver=1
                   [--channels MRI] [--sparse [VALUE]] [--overwrite] [--data-root DIR]
    samnnu_convert sparse SOURCE -d ID (--slices N [--random --seed S] [--end-slices] | --scribbles) [-n NAME]

The command itself is :func:`samnnu.cli.convert_main` (one error handling for every command); here are
its parser and the call each subcommand makes to one API function
(:func:`~samnnu.dataset_conversion.hippocampus.convert_hippocampus`,
:func:`~samnnu.dataset_conversion.folder.convert_folder`,
:func:`~samnnu.dataset_conversion.sparse.make_sparse_dataset`).
"""
from __future__ import annotations

import argparse

from samnnu.config import setup_environment
from samnnu.errors import SamnnuError

PROG = "samnnu_convert"


def parse_labels(text: str) -> dict[str, int]:
    """``"background=0,liver=1"`` -> ``{"background": 0, "liver": 1}``; SamnnuError if malformed."""
    labels: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise SamnnuError(f"--labels {text!r}: expected name=integer pairs, e.g. background=0,liver=1")
        if name.strip() in labels:
            raise SamnnuError(f"--labels {text!r}: label {name.strip()!r} given twice")
        labels[name.strip()] = int(value)
    return labels


def parse_channels(text: str | None) -> list[str] | None:
    """``"T1,T2"`` -> ``["T1", "T2"]``; None stays None (the converter picks defaults)."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Write an nnU-Net v2 raw dataset (DatasetNNN_Name).")
    sub = parser.add_subparsers(dest="command", required=True)

    hippo = sub.add_parser("hippocampus", help="MSD Task04 hippocampus (images/+labels/ or imagesTr/+labelsTr/)")
    hippo.add_argument("src", help="source folder")
    hippo.add_argument("-d", "--dataset-id", type=int, default=4, help="dataset ID (default 4)")

    folder = sub.add_parser("folder", help="any images/labels folder pair (NIfTI, NRRD, PNG, JPEG, TIFF)")
    folder.add_argument("images", help="folder of images")
    folder.add_argument("labels_dir", metavar="LABELS", help="folder of label files with matching names")
    folder.add_argument("-d", "--dataset-id", type=int, required=True, help="dataset ID (1..999)")
    folder.add_argument("-n", "--name", required=True, help="dataset name, e.g. Liver")
    folder.add_argument("--labels", required=True,
                        help="labels map, e.g. background=0,liver=1; for 2D masks the stored values may be "
                             "given (background=0,polyp=255)")
    folder.add_argument("--channels", default=None, help="channel names, comma separated, e.g. T1,T2")
    folder.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                        help="2D masks with two labels: stored values >= T are foreground, the rest background "
                             "(for masks saved as JPEG; says how many pixels it changed). With --labels "
                             "background=0,polyp=255 the stored values are kept for predictions")

    sparse = sub.add_parser("sparse", help="a new dataset whose training labels are sparse versions of a converted "
                                           "dataset's dense labels (for experiments; the test set stays dense)")
    sparse.add_argument("source", help="the converted dataset with dense labels (ID or DatasetNNN_Name)")
    sparse.add_argument("-d", "--dataset-id", type=int, required=True, help="the new dataset's ID (1..999)")
    sparse.add_argument("-n", "--name", default=None, help="the new dataset's name (default: <source>SparseN or "
                                                           "<source>Scribble)")
    sparse.add_argument("--slices", type=int, default=None, metavar="N",
                        help="annotated slices per volume, spread evenly through the labelled structures")
    sparse.add_argument("--random", action="store_true", help="random slices of the structures (with --seed)")
    sparse.add_argument("--end-slices", action="store_true",
                        help="with --slices: also annotate the empty slice just past each end of the structures "
                             "(background only; tells a 2D model where the structures stop)")
    sparse.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    sparse.add_argument("--scribbles", action="store_true",
                        help="scribbles instead of drawn slices: each structure's skeleton and a background "
                             "stroke around the structures, on every slice with a structure (or on --slices N)")
    sparse.add_argument("--axis", type=int, default=None,
                        help="annotation axis in array order (default: the one with the largest spacing)")
    sparse.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    sparse.add_argument("--data-root", default=None, help="folder holding nnUNet_raw, nnUNet_preprocessed and "
                                                          "nnUNet_results")

    for p in (hippo, folder):
        p.add_argument("--sparse", nargs="?", const=True, default=None, type=int, metavar="VALUE",
                       help="sparse annotations: label files mark unannotated voxels with VALUE (default one above "
                            "the highest class); they become nnU-Net's ignore label, left out of training")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
        p.add_argument("--hold-out", default=None, metavar="PATTERN",
                       help="case ids matching this shell pattern (e.g. '*7': ids ending in 7) go to imagesTs/ + "
                            "labelsTs/ as a fixed test set that planning and training never see")
        p.add_argument("--data-root", default=None,
                       help="folder holding nnUNet_raw, nnUNet_preprocessed and nnUNet_results (overrides the "
                            "nnUNet_* environment variables; default: those variables, else ~/samnnu_data)")
    return parser


def run(args: argparse.Namespace):
    """Call the converter that ``args.command`` names; return its ConversionResult."""
    from samnnu.safe_io import reported_os_errors  # local: pulls in numpy (slow to import)

    with reported_os_errors(args.data_root or "nnU-Net data folders"):
        raw_root = setup_environment(args.data_root).raw
    if args.command == "hippocampus":
        # local: pulls in SimpleITK (slow to import)
        from samnnu.dataset_conversion.hippocampus import convert_hippocampus

        return convert_hippocampus(args.src, args.dataset_id, raw_root=raw_root, overwrite=args.overwrite,
                                   hold_out=args.hold_out, sparse=args.sparse)
    if args.command == "sparse":
        from samnnu.dataset_conversion.sparse import make_sparse_dataset  # local: pulls in SimpleITK

        return make_sparse_dataset(args.source, args.dataset_id, slices=args.slices, scribble=args.scribbles,
                                   random_slices=args.random, seed=args.seed, axis=args.axis, name=args.name,
                                   end_slices_too=args.end_slices, overwrite=args.overwrite)
    from samnnu.dataset_conversion.folder import convert_folder  # local: pulls in SimpleITK (slow to import)

    return convert_folder(
        args.images,
        args.labels_dir,
        args.dataset_id,
        args.name,
        parse_labels(args.labels),
        channel_names=parse_channels(args.channels),
        raw_root=raw_root,
        overwrite=args.overwrite,
        hold_out=args.hold_out,
        mask_threshold=args.mask_threshold,
        sparse=args.sparse,
    )
