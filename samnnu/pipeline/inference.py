"""Batched sliding-window inference: nnU-Net's predictor, with many tiles per forward pass.

nnU-Net's predictor sends one tile at a time through the network, and for test-time mirroring one
more forward pass per mirrored copy. For a 2D configuration on a volume that is one tile per slice: a
hippocampus volume of 36 slices with mirroring over two axes is 144 forward passes at batch 1, and a
SAM encoder at batch 1 leaves most of a GPU idle. :class:`BatchedPredictor` computes the same thing
in a few passes: the tiles of a volume and their mirrored copies go through the network together,
in batches sized from the plans' memory model, and are then unflipped, averaged and weighted exactly
as nnU-Net does (Gaussian importance, accumulated in half precision). The result equals nnU-Net's to
float rounding (the network sees the same inputs; only the batch size differs). On a CPU, measured,
large batches are slower per image than small ones, so there it passes :data:`CPU_VIEWS_PER_PASS`.

Two more costs of nnU-Net's predictor are avoided, neither of which changes a number: a single fold's
weights are loaded into the network once, not again for every volume, and with no worker processes
asked for (``num_processes_preprocessing=0``) nnU-Net's in-process path reads, preprocesses and exports
the cases, which on a machine of 2 cores is faster than starting workers
(:func:`samnnu.config.prediction_processes`).

``precision="bf16"`` (``samnnu_predict --precision bf16``) runs every forward pass under bfloat16 autocast on a
CPU that computes bfloat16 natively: faster, with probabilities that move a little (measured in
docs/benchmarks.md, "Prediction speed"); the default, "fp32", is nnU-Net's computation.
"""
from __future__ import annotations

import itertools

import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache
from tqdm import tqdm

from samnnu.modeling.common import PRECISIONS, cpu_computes_bf16
from samnnu.modeling.context import with_context
from samnnu.modeling.encoders import get_encoder_spec

#: most network inputs (tiles times mirrored copies) in one forward pass on a GPU
MAX_VIEWS_PER_PASS = 256
#: network inputs per forward pass on a CPU. Measured (docs/benchmarks.md, "Prediction speed"): on the 2-core
#: development CPU, SAMUNetTrainer's default model at input 56, whose frozen encoder runs folded and
#: channels-last, predicts a hippocampus volume in 2.96 s (6.90 with mirroring) with 4 inputs per pass,
#: against 3.34 (8.18) one at a time; the encoder alone takes 30 ms per slice at batch 4, 39 at batch 1 and
#: 44 at batch 13 (larger batches leave the caches). A GPU takes as many as fit (views_in_budget).
CPU_VIEWS_PER_PASS = 4
# PRECISIONS: "fp32", nnU-Net's own computation on a CPU, or "bf16", the network's forward passes under bfloat16
# autocast (a CPU that computes bfloat16 natively only; each pass's logits returned in float32, then accumulated
# in float16 as nnU-Net does)


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError unless ``precision`` is one of :data:`PRECISIONS` and can run on ``device``: "bf16" needs a CPU
    that computes bfloat16 natively (:func:`~samnnu.modeling.common.cpu_computes_bf16`); a GPU already predicts
    under nnU-Net's float16 autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type != "cpu":
        raise ValueError(f"precision bf16 is for prediction on a CPU (on {device.type} nnU-Net's predictor already "
                         f"runs float16 autocast)")
    if precision == "bf16" and not cpu_computes_bf16():
        raise ValueError("precision bf16 needs a CPU that computes bfloat16 natively (AVX512-BF16 or AMX); this one "
                         "would emulate it, slower than fp32")


def views_in_budget(sam: dict, budget_gb: float) -> int:
    """How many network inputs of the plans' ``sam`` block fit ``budget_gb``, from the encoder's memory
    model (:class:`~samnnu.modeling.encoders.EncoderSpec`): the training memory of one sample, an
    over-estimate for inference, which keeps nothing for a backward pass. At least 1, at most
    :data:`MAX_VIEWS_PER_PASS`."""
    spec = get_encoder_spec(sam["encoder"])
    scale = (int(sam["input_size"]) / spec.native_size) ** 2
    per_view = (spec.memory_per_sample_gb_at_native * scale + spec.memory_per_sample_gb_constant) \
        * int(sam.get("slices_per_sample") or 1)
    return max(1, min(MAX_VIEWS_PER_PASS, int(budget_gb / max(per_view, 1e-3))))


def views_per_pass(sam: dict | None, device: torch.device) -> int:
    """Network inputs (tiles x mirrored copies) per forward pass: :data:`CPU_VIEWS_PER_PASS` on a CPU; on a
    GPU as many as fit half its free memory (:func:`views_in_budget`), 8 for a network without a ``sam``
    block (nnU-Net's own)."""
    if device.type != "cuda":
        return CPU_VIEWS_PER_PASS
    if not sam:
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    return views_in_budget(sam, 0.5 * free / 2 ** 30)


def mirror_combinations(mirror_axes, ndim: int) -> list[tuple[int, ...]]:
    """Every non-empty combination of the mirroring axes, as tensor axes of an (N, C, *spatial) batch,
    in nnU-Net's order."""
    if not mirror_axes:
        return []
    assert max(mirror_axes) <= ndim - 3, "mirror axes do not match the input's dimension"
    axes = [m + 2 for m in mirror_axes]
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


class BatchedPredictor(nnUNetPredictor):
    """nnU-Net's predictor with tiles and their mirrored copies batched (everything else is nnU-Net's)."""

    def __init__(self, *args, views_per_pass: int | None = None, case_progress: bool = False,
                 precision: str = "fp32", **kwargs):
        """``case_progress``: one progress bar over the cases of :meth:`predict_from_files` (with time left),
        for commands that set nnU-Net's ``allow_tqdm`` off (its per-volume tile and export bars).
        ``precision``: one of :data:`PRECISIONS` (checked by :func:`check_precision`)."""
        super().__init__(*args, **kwargs)
        check_precision(precision, self.device)
        self.precision = precision
        self.views_per_pass = views_per_pass
        self.case_progress = case_progress
        self._n_cases: int | None = None
        self._loaded: tuple | None = None  # (network, the one fold's weights loaded into it)
        self._case_bar: tqdm | None = None  # the case progress bar of in-process prediction (case_progress)

    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str | None = None, num_parts: int = 1, part_id: int = 0):
        """nnU-Net's, and with ``num_processes_preprocessing`` = 0 everything in this process: nnU-Net's
        ``predict_from_files_sequential`` reads, preprocesses, predicts and exports one case after the other.
        That skips starting the worker processes (each a fresh interpreter that imports torch and nnU-Net),
        which on a small machine costs more than the overlap saves (:func:`samnnu.config.prediction_processes`)."""
        if num_processes_preprocessing > 0:
            return super().predict_from_files(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files, save_probabilities,
                overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                folder_with_segs_from_prev_stage, num_parts, part_id)
        if num_parts != 1:
            raise ValueError("in-process prediction takes the whole list (split it before: num_parts=1)")
        # the total is unknown when nnU-Net may skip cases it finds predicted (overwrite off) or reads a folder
        n = len(list_of_lists_or_source_folder) if isinstance(list_of_lists_or_source_folder, list) and overwrite \
            else None
        self._case_bar = tqdm(total=n, unit="case", desc="predicting") if self.case_progress else None
        try:
            return self.predict_from_files_sequential(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files, save_probabilities,
                overwrite, folder_with_segs_from_prev_stage)
        finally:
            if self._case_bar is not None:
                self._case_bar.close()
                self._case_bar = None

    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists, *args, **kwargs):
        """nnU-Net's; the number of cases it will yield is the total of the case progress bar."""
        self._n_cases = len(input_list_of_lists)
        return super()._internal_get_data_iterator_from_lists_of_filenames(input_list_of_lists, *args, **kwargs)

    def predict_from_data_iterator(self, data_iterator, *args, **kwargs):
        """nnU-Net's, with the case progress bar (``case_progress``) advancing as each case is predicted."""
        if not self.case_progress:
            return super().predict_from_data_iterator(data_iterator, *args, **kwargs)
        with tqdm(total=self._n_cases, unit="case", desc="predicting") as bar:
            def counted():
                for item in data_iterator:
                    yield item  # the predictor asks for the next case once this one is predicted
                    bar.update()
            try:
                return super().predict_from_data_iterator(counted(), *args, **kwargs)
            finally:
                self._n_cases = None

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's ensemble over the loaded folds; a frozen encoder the folds share (SAM-UNet, nnSAM) encodes
        each tile once for all folds, not once per fold (``use_embedding_cache`` of such modules). One fold:
        :meth:`_predict_one_fold`.

        data: (C, *image) preprocessed -> logits (K, *image) on the CPU
        """
        try:
            return self._predict_logits(data)
        finally:
            if self._case_bar is not None:  # in-process prediction (predict_from_files)
                self._case_bar.update()

    def _predict_logits(self, data: torch.Tensor) -> torch.Tensor:
        if isinstance(self.list_of_parameters, list) and len(self.list_of_parameters) == 1:
            return self._predict_one_fold(data)
        self._loaded = None  # nnU-Net's loop below leaves the last fold's weights in the network
        cached = [m for m in self.network.modules() if hasattr(m, "use_embedding_cache")] \
            if len(self.list_of_parameters) > 1 else []
        for m in cached:
            m.use_embedding_cache(True)
        try:
            return super().predict_logits_from_preprocessed_data(data)
        finally:
            for m in cached:
                m.use_embedding_cache(False)

    @torch.inference_mode()
    def _predict_one_fold(self, data: torch.Tensor) -> torch.Tensor:
        """What nnU-Net computes for one fold, with the fold's weights loaded into the network for the first
        volume only. nnU-Net loads them again for every volume: a copy of every weight each time, and a frozen
        encoder then checks that its inference copy still matches (measured in docs/benchmarks.md,
        "Prediction speed"). Another network or ``list_of_parameters`` (another model) is loaded at its first volume.

        data: (C, *image) -> logits (K, *image) on the CPU
        """
        loaded = (self.network, self.list_of_parameters[0])
        if self._loaded is None or any(a is not b for a, b in zip(self._loaded, loaded)):
            getattr(self.network, "_orig_mod", self.network).load_state_dict(loaded[1])
            self._loaded = loaded
        n_threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, n_threads))  # nnU-Net's cap
        try:
            return self.predict_sliding_window_return_logits(data).to("cpu")
        finally:
            torch.set_num_threads(n_threads)

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        """nnU-Net's, after telling cached frozen encoders that a fold's weights were just loaded; a 2.5D
        network (``context_slices`` > 0) gets every slice's neighbours as channels first
        (:func:`samnnu.modeling.context.with_context`).

        input_image: (C, Z, Y, X) -> logits (K, Z, Y, X)
        """
        for m in self.network.modules():
            if hasattr(m, "weights_loaded"):
                m.weights_loaded()
        net = getattr(self.network, "_orig_mod", self.network)
        context = int(getattr(net, "context_slices", 0))
        if context:
            input_image = with_context(input_image, context)
        return super().predict_sliding_window_return_logits(input_image)

    def _views_per_pass(self) -> int:
        if self.views_per_pass is not None:
            return self.views_per_pass
        return views_per_pass(self.configuration_manager.configuration.get("sam"), self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a batch of inputs, in :attr:`precision`; float32 logits (N, K, *patch)."""
        if self.precision == "fp32":
            return self.network(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.network(x).float()

    @torch.inference_mode()
    def predict_tiles(self, tiles: torch.Tensor, combos: list[tuple[int, ...]], views: int | None = None) -> torch.Tensor:
        """Logits of a batch of tiles, averaged over the mirrored copies.

        tiles: (N, C, *patch) -> (N, K, *patch) float32. The N tiles and their ``len(combos)`` mirrored copies
        go through the network in one pass when they fit ``views`` network inputs (default
        :meth:`_views_per_pass`), else in one pass per copy (with one tile per pass and precision "fp32" that
        is exactly nnU-Net's computation).
        """
        if not combos:
            return self._forward(tiles)
        views = self._views_per_pass() if views is None else views
        if tiles.shape[0] * (len(combos) + 1) > views:  # one pass per mirrored copy
            prediction = self._forward(tiles)
            for axes in combos:
                prediction += torch.flip(self._forward(torch.flip(tiles, axes)), axes)
        else:
            views = torch.cat([tiles] + [torch.flip(tiles, axes) for axes in combos])
            out = self._forward(views).split(tiles.shape[0])
            prediction = out[0].clone()
            for o, axes in zip(out[1:], combos):
                prediction += torch.flip(o, axes)
        prediction /= len(combos) + 1
        return prediction

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """data: (C, *image) padded to at least the patch; slicers: nnU-Net's tiles -> logits (K, *image), half."""
        results_device = self.device if do_on_device else torch.device("cpu")
        empty_cache(self.device)
        data = data.to(results_device)
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half,
                             device=results_device)
        n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian = (compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                     value_scaling_factor=10, device=results_device)
                    if self.use_gaussian else 1)
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        combos = mirror_combinations(mirror_axes, len(self.configuration_manager.patch_size) + 2)
        views = self._views_per_pass()
        tiles_per_pass = max(1, views // (len(combos) + 1)) if views > len(combos) else views
        with tqdm(total=len(slicers), disable=not self.allow_tqdm, unit="tile", leave=False) as bar:
            for start in range(0, len(slicers), tiles_per_pass):
                chunk = slicers[start:start + tiles_per_pass]
                tiles = torch.stack([data[s] for s in chunk]).to(self.device)
                predictions = self.predict_tiles(tiles, combos, views).to(results_device)
                for prediction, s in zip(predictions, chunk):
                    if self.use_gaussian:
                        prediction *= gaussian
                    logits[s] += prediction
                    n_predictions[s[1:]] += gaussian
                bar.update(len(chunk))
        torch.div(logits, n_predictions, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("inf in the predicted logits (half-precision overflow)")
        return logits
