"""samnnu's experiment planner: nnU-Net's plans plus a ``sam`` block per configuration.

nnU-Net's own rules choose target spacing, transpose, patch size and normalisation (so nnU-Net's
``nnUNetTrainer`` can still train on the same plans as a baseline). On top, for each configuration
the planner decides, from the dataset fingerprint and the device (every rule is a small pure
function below, documented with worked examples in docs/plans.md):

- ``input_size`` (:func:`plan_input_size`): the SAM encoder's square input for one (2D) slice. The
  patch is scaled so its longer side fills it. It is the longer side rounded up to the encoder's
  size divisor, at least ``MIN_INPUT_SIZE`` and at most the encoder's native size: small
  structures are not upsampled beyond that (upsampling costs the square of the factor and has not
  been shown to help), large patches are downsampled to the native size. An encoder with windowed
  attention takes the size in that range whose windows pad least.
- on a CPU, when even a batch of ``MIN_BATCH_SIZE`` would exceed ``CPU_GFLOP_PER_ITERATION``, the
  input is reduced step by step (:func:`fit_input_to_cpu`) so that training stays feasible.
- ``intensity_windows``: per channel, the 0.5th-99.5th percentile of intensities *after* nnU-Net's
  normalisation (CT: clip to foreground percentiles and z-score with dataset statistics; other
  modalities: per-image z-score), pooled over up to ``WINDOW_CASES`` training cases. The network
  clips each channel to its window and scales it to [0, 1], the range SAM encoders were trained on,
  so every case looks alike to the encoder whatever its raw intensity scale.
- ``batch_size`` (:func:`plan_batch_size`): the largest batch whose estimated training memory fits
  the device memory target; on a CPU also at most ``CPU_GFLOP_PER_ITERATION`` of encoder work per
  iteration; then nnU-Net's bounds (at most 5 % of the dataset's voxels per batch, at least 2).
  For 3D patches one sample is ``depth`` slices.
- the encoder: ``litemedsam`` unless the user names one; with ``--sam-checkpoint`` the ViT/MobileSAM
  variant is read from the checkpoint itself (:func:`encoder_for_checkpoint`).
- the recommended configuration, 2D or 3D (:func:`recommend_configuration`); 3D only when two 3D
  samples fit the device memory.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

from samnnu.dataset_conversion.sparse import sparse_info
from samnnu.defaults import PLANS_NAME
from samnnu.errors import SamnnuError
from samnnu.modeling.encoders import (
    ENCODERS,
    EncoderSpec,
    checkpoint_variant,
    get_encoder_spec,
    padded_attention_tokens,
    read_checkpoint,
)

MIN_INPUT_SIZE = 56
WINDOW_CASES = 16
WINDOW_PERCENTILES = (0.5, 99.5)
CPU_GFLOP_PER_ITERATION = 150.0
MIN_BATCH_SIZE = 2
MAX_DATASET_FRACTION = 0.05
# SAM3DAdapterNet vs the 2D model: peak RSS measured on CPU with litemedsam at input 64 (slices x batch
# 8x1: 2.43 GB, 8x2: 3.46 GB, 40x1: 7.32 GB; benchmarks/memory_model.py --network sam3d); a fit gives
# 0.153 GB per slice (0.75 x the 2D per-image 0.203 GB) and 1.21 GB fixed (0.3 above the 2D fixed part)
VOLUMETRIC_PER_SLICE_FACTOR = 0.75
VOLUMETRIC_FIXED_EXTRA_GB = 0.3
# 2D/3D recommendation thresholds (see recommend_configuration)
ANISOTROPY_FOR_2D = 3.0
MIN_SLICES_FOR_3D = 16
MIN_CASES_FOR_3D = 20


def plan_input_size(patch_size: Sequence[int], spec: EncoderSpec) -> int:
    """Square encoder input for a 2D patch (in-plane axes).

    The longer side, at least ``MIN_INPUT_SIZE``, rounded up to the encoder's size divisor and capped at its
    native size. An encoder with windowed attention (``spec.attention_windows``) may instead take any size
    in between that is a multiple of its stride: the one whose attention grids pad least
    (:func:`~samnnu.modeling.encoders.padded_attention_tokens`), the smaller on a tie. LiteMedSAM on the
    hippocampus patch 56 x 40: 56 (every window tiled exactly), not 64 (2.6x the attention tokens).
    """
    base = min(max(max(patch_size), MIN_INPUT_SIZE), spec.native_size)
    top = min(int(math.ceil(base / spec.size_divisor) * spec.size_divisor), spec.native_size)
    if not spec.attention_windows:
        return int(top)
    first = int(math.ceil(base / spec.stride) * spec.stride)
    candidates = range(first, top + 1, spec.stride)
    return int(min(candidates, key=lambda s: (padded_attention_tokens(s, spec.attention_windows), s)))


def estimate_training_memory_gb(spec: EncoderSpec, input_size: int, batch_size: int, slices: int = 1) -> float:
    """Training memory (weights, optimiser state, activations) from the encoder's coefficients.

    ``slices``: 2D images per sample. One slice: a 2D network (SAMed-like). More: a 3D patch run slice
    by slice through the encoder by the volumetric trainer, whose encoder activations per slice are
    smaller (no LoRA branches) but which adds a 3D decoder and stem: ``VOLUMETRIC_PER_SLICE_FACTOR`` x
    the 2D per-image memory, plus ``VOLUMETRIC_FIXED_EXTRA_GB`` (fitted on measurements, see below).
    """
    per_image = (spec.memory_per_sample_gb_constant
                 + spec.memory_per_sample_gb_at_native * (input_size / spec.native_size) ** 2)
    if slices > 1:
        per_slice = VOLUMETRIC_PER_SLICE_FACTOR * per_image
        return spec.memory_fixed_gb + VOLUMETRIC_FIXED_EXTRA_GB + batch_size * slices * per_slice
    return spec.memory_fixed_gb + batch_size * per_image


def training_gflop_per_sample(spec: EncoderSpec, input_size: int, slices: int = 1) -> float:
    """Forward + backward encoder work for one sample (backward taken as twice the forward)."""
    return 3.0 * slices * spec.gflop_at_native * (input_size / spec.native_size) ** 2


def fit_input_to_cpu(spec: EncoderSpec, input_size: int, slices: int = 1) -> int:
    """On a CPU, shrink the input until a minimum batch stays within the per-iteration work budget."""
    lowest = int(math.ceil(MIN_INPUT_SIZE / spec.size_divisor) * spec.size_divisor)
    while (input_size > lowest
           and MIN_BATCH_SIZE * training_gflop_per_sample(spec, input_size, slices) > CPU_GFLOP_PER_ITERATION):
        input_size -= spec.size_divisor
    return input_size


def plan_batch_size(spec: EncoderSpec, input_size: int, patch_size: Sequence[int], n_voxels_dataset: float,
                    device_type: str, memory_gb: float, slices: int = 1) -> Tuple[int, dict]:
    """Batch size and the numbers behind it (see the module docstring for the rule)."""
    per_sample = estimate_training_memory_gb(spec, input_size, 1, slices) - spec.memory_fixed_gb
    by_memory = int((memory_gb - spec.memory_fixed_gb) // per_sample)
    by_dataset = int(round(n_voxels_dataset * MAX_DATASET_FRACTION / float(np.prod(patch_size, dtype=np.float64))))
    limits = {"memory": by_memory, "dataset_5_percent": by_dataset}
    if device_type == "cpu":
        limits["cpu_compute"] = int(CPU_GFLOP_PER_ITERATION // training_gflop_per_sample(spec, input_size, slices))
    batch = max(MIN_BATCH_SIZE, min(limits.values()))
    binding = min(limits, key=limits.get) if min(limits.values()) >= MIN_BATCH_SIZE else "minimum"
    return batch, {"limits": limits, "binding": binding}


def recommend_configuration(spacing: Sequence[float], median_shape: Sequence[float], n_cases: int,
                            has_3d: bool) -> Tuple[str, str]:
    """2D or 3D SAM adaptation, from the target spacing and median shape (transposed: axis 0 = slices).

    Rule, first match wins:
    1. 2D data -> ``2d``.
    2. slice thickness > ANISOTROPY_FOR_2D x the in-plane spacing -> ``2d`` (thick slices: little
       through-plane context, and 2D matches SAM's pretraining).
    3. fewer than MIN_SLICES_FOR_3D slices in the median volume -> ``2d`` (too thin a stack).
    4. fewer than MIN_CASES_FOR_3D training cases -> ``2d`` (few volumes give many more 2D samples).
    5. otherwise -> ``3d_fullres`` (isotropic-enough volumes with enough slices and cases).
    Cross-validation of both, where both are trained, confirms or overturns it.
    """
    if not has_3d:
        return "2d", "the data are 2D"
    anisotropy = float(spacing[0]) / float(max(spacing[1:]))
    if anisotropy > ANISOTROPY_FOR_2D:
        return "2d", (f"slices are {anisotropy:.1f}x thicker than the in-plane spacing "
                      f"(> {ANISOTROPY_FOR_2D}): little through-plane context")
    if median_shape[0] < MIN_SLICES_FOR_3D:
        return "2d", f"only {int(median_shape[0])} slices in the median volume (< {MIN_SLICES_FOR_3D})"
    if n_cases < MIN_CASES_FOR_3D:
        return "2d", f"only {n_cases} training cases (< {MIN_CASES_FOR_3D}): 2D slices give more samples"
    return "3d_fullres", (f"near-isotropic ({anisotropy:.1f}x), {int(median_shape[0])} slices, {n_cases} cases: "
                          f"3D context is available and there are enough volumes")


def encoder_for_checkpoint(path: Union[str, Path]) -> str:
    """Which registered encoder a user's SAM checkpoint belongs to (one-line SamnnuError if none)."""
    state = read_checkpoint(path)
    encoder_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    found = checkpoint_variant(encoder_state)
    for name, spec in ENCODERS.items():
        if spec.pretrained == "user" and spec.signature and all(found.get(k) == v for k, v in spec.signature.items()):
            return name
    raise SamnnuError(f"{path}: image encoder ({found or 'unknown layout'}) matches no registered SAM variant "
                      f"({', '.join(n for n, s in ENCODERS.items() if s.pretrained == 'user')})")


class SAMnnUPlanner(ExperimentPlanner):
    """nnU-Net's ExperimentPlanner with samnnu's plans name and a ``sam`` block per configuration."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = PLANS_NAME,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False, *, encoder: str | None = None, sam_checkpoint: str | None = None,
                 device_type: str = "cpu", device_memory_gb: float = 8.0):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        if sam_checkpoint is not None:
            found = encoder_for_checkpoint(sam_checkpoint)
            if encoder is not None and encoder != found:
                raise SamnnuError(f"{sam_checkpoint}: checkpoint is a '{found}' encoder, not '{encoder}'")
            encoder = found
            sam_checkpoint = str(Path(sam_checkpoint).resolve())
        self.encoder_spec = get_encoder_spec(encoder or "litemedsam")
        if self.encoder_spec.pretrained == "user" and sam_checkpoint is None:
            raise SamnnuError(f"encoder '{self.encoder_spec.name}' needs its weights: pass --sam-checkpoint PATH")
        self.sam_checkpoint = sam_checkpoint
        self.device_type = device_type
        self.device_memory_gb = round(float(device_memory_gb), 1)
        self._windows = None

    def intensity_windows(self) -> List[List[float]]:
        """Per channel, percentiles of normalised intensities over a deterministic sample of cases."""
        if self._windows is not None:
            return self._windows
        reader = self.determine_reader_writer()()
        _, use_mask = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        channel_names = self.dataset_json.get("channel_names", self.dataset_json.get("modality"))
        props = self.dataset_fingerprint["foreground_intensity_properties_per_channel"]
        keys = sorted(self.dataset)
        picked = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, min(WINDOW_CASES, len(keys))).astype(int))]
        pooled = [[] for _ in channel_names]
        for key in picked:
            data, _ = reader.read_images(self.dataset[key]["images"])
            for c, name in enumerate(channel_names.values()):
                scheme = get_normalization_scheme(name)(use_mask_for_norm=use_mask[c],
                                                        intensityproperties=props[str(c)])
                image = data[c].astype(np.float32, copy=True)
                inside = image != 0
                normed = scheme.run(image.copy(), np.where(inside, 0, -1) if use_mask[c] else None)
                values = normed[inside] if use_mask[c] else normed.ravel()
                # a fixed-size, evenly spaced subsample keeps every case's weight equal
                idx = np.linspace(0, values.size - 1, min(values.size, 20000)).astype(int)
                pooled[c].append(np.sort(values)[idx])
        self._windows = []
        for values in pooled:
            v = np.concatenate(values)
            lo, hi = (round(float(np.percentile(v, q)), 4) for q in WINDOW_PERCENTILES)
            self._windows.append([lo, hi if hi > lo else lo + 1.0])
        return self._windows

    def sparse_annotations(self) -> dict | None:
        """For a dataset with nnU-Net's ignore label: the ignore label, how the labels were made (when
        ``samnnu_convert sparse`` made them) and the annotated fraction of voxels (read from the label files
        of the same sample of cases as the intensity windows when not recorded). None for dense labels."""
        info = sparse_info(self.dataset_json)
        if info is None:
            return None
        if "annotated_fraction" not in info:
            reader = self.determine_reader_writer()()
            keys = sorted(self.dataset)
            picked = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, min(WINDOW_CASES, len(keys))).astype(int))]
            annotated = total = 0
            for key in picked:
                seg, _ = reader.read_seg(self.dataset[key]["label"])
                annotated += int(np.count_nonzero(seg != info["ignore_label"]))
                total += seg.size
            info["annotated_fraction"] = round(annotated / max(1, total), 5)
        return info

    def plan_sam(self, patch_size: Sequence[int], approximate_n_voxels_dataset: float) -> dict:
        """The ``sam`` block for one configuration (2D patch, or 3D patch run slice by slice)."""
        spec = self.encoder_spec
        slices = int(patch_size[0]) if len(patch_size) == 3 else 1
        in_plane = tuple(patch_size[-2:])
        input_size = plan_input_size(in_plane, spec)
        reduced_for_cpu = False
        if self.device_type == "cpu":
            fitted = fit_input_to_cpu(spec, input_size, slices)
            reduced_for_cpu, input_size = fitted < input_size, fitted
        batch, why = plan_batch_size(spec, input_size, patch_size, approximate_n_voxels_dataset,
                                     self.device_type, self.device_memory_gb, slices)
        block = {
            "encoder": spec.name,
            "input_size": input_size,
            "embedding_grid": input_size // spec.stride,
            "slices_per_sample": slices,
            "intensity_windows": self.intensity_windows(),
            "batch_size": batch,
            "batch_size_limits": why["limits"],
            "batch_size_bound_by": why["binding"],
            "estimated_training_memory_gb": round(estimate_training_memory_gb(spec, input_size, batch, slices), 2),
            "fits_device_memory": estimate_training_memory_gb(spec, input_size, batch, slices) <= self.device_memory_gb,
            "estimated_gflop_per_iteration": round(batch * training_gflop_per_sample(spec, input_size, slices), 1),
            "input_reduced_for_cpu": reduced_for_cpu,
            "device_type": self.device_type,
            "device_memory_gb": self.device_memory_gb,
        }
        if self.sam_checkpoint is not None:
            block["sam_checkpoint"] = self.sam_checkpoint
        return block

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        plan["sam"] = self.plan_sam(plan["patch_size"], approximate_n_voxels_dataset)
        return plan

    def plan_experiment(self):
        plans = super().plan_experiment()
        fullres = plans["configurations"].get("3d_fullres")
        n_cases = int(self.dataset_json["numTraining"])
        if fullres is not None:
            recommended, reason = recommend_configuration(fullres["spacing"], fullres["median_image_size_in_voxels"],
                                                          n_cases, True)
            if recommended == "3d_fullres" and not fullres["sam"]["fits_device_memory"]:
                recommended, reason = "2d", (f"the data favour 3D ({reason}), but even 2 samples of "
                                             f"{fullres['sam']['slices_per_sample']} slices exceed the device memory "
                                             f"({fullres['sam']['estimated_training_memory_gb']} > "
                                             f"{self.device_memory_gb} GB)")
            elif (recommended == "3d_fullres"
                  and fullres["sam"]["batch_size_limits"].get("cpu_compute", MIN_BATCH_SIZE) < MIN_BATCH_SIZE):
                sam = fullres["sam"]
                recommended, reason = "2d", (f"the data favour 3D ({reason}), but on a CPU the minimum batch of "
                                             f"{MIN_BATCH_SIZE} samples of {sam['slices_per_sample']} slices is "
                                             f"{sam['estimated_gflop_per_iteration']} GFLOP per iteration, over the "
                                             f"budget of {CPU_GFLOP_PER_ITERATION:g}")
        else:
            recommended, reason = recommend_configuration([1.0, 1.0], [1, 1], n_cases, False)
        plans["samnnu"] = {"recommended_configuration": recommended, "reason": reason,
                           "encoder": self.encoder_spec.name}
        sparse = self.sparse_annotations()
        if sparse is not None:
            plans["samnnu"]["sparse_annotations"] = sparse
        self.plans = plans
        self.save_plans(plans)
        return plans
