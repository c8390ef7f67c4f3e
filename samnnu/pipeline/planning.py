"""Fingerprint -> samnnu plans -> preprocessed data, with nnU-Net doing the work it already does."""
from __future__ import annotations

import os

from samnnu.config import current_paths, num_processes, setup_environment
from samnnu.datasets import dataset_id, dataset_name, ensure_splits
from samnnu.defaults import PLANS_NAME
from samnnu.errors import SamnnuError


def default_device() -> tuple[str, float]:
    """('cuda', GPU memory in GB) when a GPU is visible, else ('cpu', half the RAM, at most 16 GB)."""
    import torch  # local: torch takes seconds to import

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    return "cpu", min(16.0, ram / 2)


def plan_and_preprocess(dataset: str | int, *, configurations: tuple[str, ...] | None = None,
                        encoder: str | None = None, sam_checkpoint: str | None = None,
                        device_type: str | None = None,
                        device_memory_gb: float | None = None, verify_dataset_integrity: bool = False,
                        processes: int | None = None, nnunet_baseline_plans: bool = False) -> dict:
    """Extract nnU-Net's fingerprint, write samnnu's plans and preprocess the chosen configurations.

    ``configurations`` default: ``2d`` and the planner's recommended configuration (what
    ``samnnu_train`` trains when not told otherwise).

    With ``nnunet_baseline_plans`` nnU-Net's own planner also runs (plans ``nnUNetPlans``) and every
    configuration it plans is preprocessed, so plain nnU-Net's best can be trained side by side.
    ``sam_checkpoint``: the user's SAM checkpoint (``vit_*``, ``mobilesam``), written into the ``sam`` block.
    Returns the samnnu plans.
    """
    setup_environment()
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    from samnnu.plans.samnnu_planner import SAMnnUPlanner  # local: pulls in nnU-Net, which reads nnUNet_* at import

    name = dataset_name(dataset)
    if not (current_paths().raw / name / "dataset.json").is_file():
        raise SamnnuError(f"{current_paths().raw / name}: no raw dataset (dataset.json missing); run samnnu_convert")
    ident = dataset_id(name)
    np_ = processes or num_processes()
    guessed_type, guessed_memory = default_device()
    device_type = device_type or guessed_type
    memory = device_memory_gb if device_memory_gb is not None else guessed_memory

    extract_fingerprint_dataset(ident, num_processes=np_, check_dataset_integrity=verify_dataset_integrity,
                                clean=True, verbose=False)
    planner = SAMnnUPlanner(ident, encoder=encoder, device_type=device_type, device_memory_gb=memory,
                            sam_checkpoint=sam_checkpoint)
    plans = planner.plan_experiment()
    if configurations is None:
        configurations = tuple(dict.fromkeys(("2d", plans["samnnu"]["recommended_configuration"])))
    for c in configurations:
        if c not in plans["configurations"]:
            raise SamnnuError(f"configuration '{c}' is not in the plans; available: "
                              f"{', '.join(plans['configurations'])}")
    preprocess_dataset(ident, PLANS_NAME, configurations, [np_] * len(configurations), verbose=False)
    if nnunet_baseline_plans:  # every configuration nnU-Net plans (a cascade's second stage reuses 3d_fullres data)
        nn_plans = ExperimentPlanner(ident).plan_experiment()
        nn_configurations = [c for c, cfg in nn_plans["configurations"].items() if "previous_stage" not in cfg]
        preprocess_dataset(ident, "nnUNetPlans", nn_configurations, [np_] * len(nn_configurations), verbose=False)
    print(summarize_plans(plans))
    if configurations:  # the splits are made from the preprocessed cases; none preprocessed, none made
        ensure_splits(name, configurations[0], PLANS_NAME)  # says so when a small dataset gets fewer than 5 folds
    return plans


def summarize_plans(plans: dict) -> str:
    """A short, human-readable account of what was planned and why."""
    lines = [f"samnnu plans for {plans['dataset_name']} ({plans['plans_name']})"]
    for cname, c in plans["configurations"].items():
        if "sam" not in c:
            continue
        sam = c["sam"]
        per = f", {sam['slices_per_sample']} slices per sample" if sam.get("slices_per_sample", 1) > 1 else ""
        reduced = " (reduced to keep CPU training feasible)" if sam.get("input_reduced_for_cpu") else ""
        lines += [
            f"  {cname}: spacing {c['spacing']}, patch {c['patch_size']}, normalisation {c['normalization_schemes']}",
            f"      encoder {sam['encoder']} at input {sam['input_size']}x{sam['input_size']}{reduced} "
            f"(embedding grid {sam['embedding_grid']}x{sam['embedding_grid']}){per}",
            f"      intensity window(s) after normalisation {sam['intensity_windows']} -> [0, 1]",
            f"      batch size {sam['batch_size']} (bound by {sam['batch_size_bound_by']}; limits "
            f"{sam['batch_size_limits']}), estimated training memory {sam['estimated_training_memory_gb']} GB "
            f"on {sam['device_type']} with {sam['device_memory_gb']:.1f} GB, "
            f"{sam['estimated_gflop_per_iteration']} GFLOP per iteration",
        ]
        if not sam.get("fits_device_memory", True):
            lines.append(f"      WARNING: even the minimum batch is estimated to exceed the device memory "
                         f"({sam['estimated_training_memory_gb']} > {sam['device_memory_gb']:.1f} GB): "
                         f"expect to run out of memory with this configuration on this device")
    rec = plans.get("samnnu", {})
    if rec:
        lines.append(f"  recommended: {rec['recommended_configuration']} ({rec['reason']})")
    sparse = rec.get("sparse_annotations")
    if sparse:
        lines.append(f"  sparse annotations: {sparse['annotated_fraction']:.1%} of the voxels are annotated, the rest "
                     f"carry the ignore label {sparse['ignore_label']}: training leaves them out of the loss and "
                     f"centres patches on annotated voxels; predictions are dense")
    return "\n".join(lines)
