"""samnnu's experiment planner: nnU-Net's plans plus, per 2D configuration, a ``sam`` block.

nnU-Net's own rules choose target spacing, transpose, patch size and normalisation (so that
nnU-Net's ``nnUNetTrainer`` can still train on the same plans as a baseline). On top, for each 2D
configuration the planner decides, from the dataset and the device:

- ``input_size``: the SAM encoder's square input. The patch is scaled so its longer side fills the
  input; the input is the patch's longer side rounded up to the encoder's size divisor, at least
  ``MIN_INPUT_SIZE`` and at most the encoder's native size (never a fixed 1024 or 256).
- ``intensity_windows``: per channel, the 0.5th-99.5th percentile of intensities *after* nnU-Net's
  normalisation, pooled over up to ``WINDOW_CASES`` training cases. The network clips each channel to
  its window and scales it to [0, 1], the range SAM encoders were trained on, so every case looks
  alike to the encoder whatever its raw intensity scale.
- ``batch_size``: the largest batch whose estimated training memory fits the device memory target;
  on a CPU also at most ``CPU_GFLOP_PER_ITERATION`` of encoder work per iteration; then nnU-Net's
  bounds (at most 5 % of the dataset's voxels per batch, at least 2).
"""
from __future__ import annotations

import math
from typing import List, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

from samnnu.encoders import EncoderSpec, get_encoder_spec

PLANS_NAME = "samnnuPlans"
MIN_INPUT_SIZE = 64
WINDOW_CASES = 16
WINDOW_PERCENTILES = (0.5, 99.5)
CPU_GFLOP_PER_ITERATION = 150.0
MIN_BATCH_SIZE = 2


def plan_input_size(patch_size: Tuple[int, ...], spec: EncoderSpec) -> int:
    """Square encoder input for a 2D patch: longer side rounded up to the divisor, within bounds."""
    side = max(patch_size)
    size = int(math.ceil(side / spec.size_divisor) * spec.size_divisor)
    lowest = int(math.ceil(MIN_INPUT_SIZE / spec.size_divisor) * spec.size_divisor)
    return int(min(max(size, lowest), spec.native_size))


def estimate_training_memory_gb(spec: EncoderSpec, input_size: int, batch_size: int) -> float:
    """Training memory (weights, optimiser state, activations) from the encoder's measured coefficients."""
    per_sample = spec.memory_per_sample_gb_at_native * (input_size / spec.native_size) ** 2
    return spec.memory_fixed_gb + batch_size * per_sample


def training_gflop_per_sample(spec: EncoderSpec, input_size: int) -> float:
    """Forward + backward encoder work for one sample (backward taken as twice the forward)."""
    return 3.0 * spec.gflop_at_native * (input_size / spec.native_size) ** 2


def plan_batch_size(spec: EncoderSpec, input_size: int, patch_size: Tuple[int, ...], n_voxels_dataset: float,
                    device_type: str, memory_gb: float) -> Tuple[int, dict]:
    """Batch size and the numbers behind it (see the module docstring for the rule)."""
    per_sample = estimate_training_memory_gb(spec, input_size, 1) - spec.memory_fixed_gb
    by_memory = int((memory_gb - spec.memory_fixed_gb) // per_sample)
    by_dataset = int(round(n_voxels_dataset * 0.05 / float(np.prod(patch_size, dtype=np.float64))))
    limits = {"memory": by_memory, "dataset_5_percent": by_dataset}
    if device_type == "cpu":
        limits["cpu_compute"] = int(CPU_GFLOP_PER_ITERATION // training_gflop_per_sample(spec, input_size))
    batch = max(MIN_BATCH_SIZE, min(limits.values()))
    binding = min(limits, key=limits.get) if min(limits.values()) >= MIN_BATCH_SIZE else "minimum"
    return batch, {"limits": limits, "binding": binding}


class SAMnnUPlanner(ExperimentPlanner):
    """nnU-Net's ExperimentPlanner with samnnu's plans name and a ``sam`` block per 2D configuration."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = PLANS_NAME,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False, *, encoder: str = "litemedsam", device_type: str = "cpu",
                 device_memory_gb: float = 8.0):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.encoder_spec = get_encoder_spec(encoder)
        self.device_type = device_type
        self.device_memory_gb = round(float(device_memory_gb), 1)
        self._windows = None

    def intensity_windows(self) -> List[List[float]]:
        """Per channel, percentiles of normalised intensities over a deterministic sample of cases."""
        if self._windows is not None:
            return self._windows
        reader = self.determine_reader_writer()()
        schemes, use_mask = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
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
                seg = np.where(image != 0, 0, -1).astype(np.int8)[None] if use_mask[c] else None
                normed = scheme.run(image, seg[0] if seg is not None else None)
                values = normed[image != 0] if use_mask[c] else normed.ravel()
                # a fixed-size, evenly spaced subsample keeps every case's weight equal
                idx = np.linspace(0, values.size - 1, min(values.size, 20000)).astype(int)
                pooled[c].append(np.sort(values)[idx])
        self._windows = [[round(float(np.percentile(np.concatenate(v), WINDOW_PERCENTILES[0])), 4),
                          round(float(np.percentile(np.concatenate(v), WINDOW_PERCENTILES[1])), 4)]
                         for v in pooled]
        return self._windows

    def plan_sam(self, patch_size, approximate_n_voxels_dataset: float) -> dict:
        spec = self.encoder_spec
        input_size = plan_input_size(tuple(patch_size), spec)
        batch, why = plan_batch_size(spec, input_size, tuple(patch_size), approximate_n_voxels_dataset,
                                     self.device_type, self.device_memory_gb)
        return {
            "encoder": spec.name,
            "input_size": input_size,
            "embedding_grid": input_size // spec.stride,
            "intensity_windows": self.intensity_windows(),
            "batch_size": batch,
            "batch_size_limits": why["limits"],
            "batch_size_bound_by": why["binding"],
            "estimated_training_memory_gb": round(estimate_training_memory_gb(spec, input_size, batch), 2),
            "device_type": self.device_type,
            "device_memory_gb": self.device_memory_gb,
        }

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if len(spacing) == 2:
            plan["sam"] = self.plan_sam(plan["patch_size"], approximate_n_voxels_dataset)
        return plan

    def plan_experiment(self):
        plans = super().plan_experiment()
        has_3d = "3d_fullres" in plans["configurations"]
        plans["samnnu"] = {
            "recommended_configuration": "2d",
            "reason": ("3D SAM adaptation is not available yet; the 2D configuration applies SAM slice by slice"
                       if has_3d else "the data are 2D"),
            "encoder": self.encoder_spec.name,
        }
        self.plans = plans
        self.save_plans(plans)
        return plans
