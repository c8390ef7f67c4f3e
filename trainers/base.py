"""SAMTrainerBase: the recipe every SAM trainer shares, as a small set of nnUNetTrainer overrides.

What differs from nnU-Net's trainer, each in one small override:
- the network is whatever :meth:`SAMTrainerBase.build_network_architecture` builds from the plans'
  ``sam`` block (the one method a concrete trainer must write); the SAM encoder's pretrained weights
  are loaded when training starts (:func:`load_sam_pretrained`), never at inference;
- batch size from the ``sam`` block (planned for the SAM encoder, not for a U-Net);
- loss ``loss_weights`` = (cross-entropy, Dice), default 0.2 / 0.8; no deep supervision unless a
  trainer sets ``deep_supervision`` and its network has one output per level (``deep_supervision_levels``;
  nnU-Net's target downsampling and loss wrapper then do the rest, see :meth:`_get_deep_supervision_scales`);
- sparse annotations (nnU-Net's ignore label): the loss and the Dice leave ignored voxels out (nnU-Net's
  loss), patches are centred on annotated voxels (nnU-Net's loader), and voxels that augmentation or
  padding brings in from outside the image are ignored too, not called background
  (:func:`ignore_outside_image`): only what the annotator drew is learned;
- AdamW on the trainable parameters only, linear warm-up (5 % of the run, at most 250 iterations)
  then polynomial decay, stepped per iteration (:class:`samnnu.trainers.schedules.WarmupPolyLR`);
- a progress bar over all iterations with the time left;
- 2.5D context (``context_slices`` > 0): training cases come with every slice's neighbours as channels
  (:class:`~samnnu.modeling.context.ContextDataset`);
- validation predicts with samnnu's :class:`~samnnu.pipeline.inference.BatchedPredictor` (the same
  computation as nnU-Net's predictor, tiles batched on a GPU, neighbours added for 2.5D networks).

nnU-Net finds every concrete subclass by name (``nnUNet_extTrainer`` points at this package), and so
does samnnu (:func:`samnnu.trainers.samnnu_trainers`): a new trainer is a new module here, nothing more.
"""
from __future__ import annotations

import abc
import contextlib

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import numpy as np
import torch
import torch.distributed as dist
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from samnnu.modeling.common import count_parameters
from samnnu.modeling.context import ContextDataset
from samnnu.modeling.encoders import get_encoder_spec
from samnnu.pipeline.inference import BatchedPredictor
from samnnu.safe_io import load_torch_safely, weights_only_loading
from samnnu.trainers.averaging import CHECKPOINT_KEY, PowerAverage
from samnnu.trainers.schedules import WarmupPolyLR


def load_sam_pretrained(trainer: nnUNetTrainer) -> None:
    """Load the SAM encoder's pretrained weights into ``trainer.network`` (after initialize, training only).

    The checkpoint is the plans' ``sam.sam_checkpoint`` (the user's file, for ``vit_*``/``mobilesam``);
    encoders without pretrained weights (``tiny``) keep their initialisation.
    """
    net = trainer.network.module if isinstance(trainer.network, DDP) else trainer.network
    checkpoint = trainer.configuration_manager.configuration["sam"].get("sam_checkpoint")
    if trainer.load_pretrained_weights and get_encoder_spec(net.encoder_name).pretrained is not None:
        net.load_pretrained(checkpoint=checkpoint)
        trainer.print_to_log_file(f"Loaded pretrained {net.encoder_name} weights"
                                  + (f" from {checkpoint}" if checkpoint else ""))
    trainer.print_to_log_file(f"Parameters: {count_parameters(net)} total, "
                              f"{count_parameters(net, trainable_only=True)} trainable")


def ignore_outside_image(transforms, ignore_label: int | None):
    """nnU-Net's transforms with padding (label -1: outside the image, from the loader's padding or a
    spatial transform) set to ``ignore_label`` instead of background; unchanged when there is none.

    With dense labels nnU-Net calls everything outside the image background. With sparse labels nothing
    was annotated there, so it is left out of the loss like every other unannotated voxel.
    """
    if ignore_label is None:
        return transforms
    for i, t in enumerate(transforms.transforms):
        if isinstance(t, RemoveLabelTransform) and t.label_value == -1:
            transforms.transforms[i] = RemoveLabelTransform(-1, ignore_label, t.segmentation_channels)
    return transforms


@contextlib.contextmanager
def _saved_with(entries: dict):
    """Within the block, the checkpoint dict nnU-Net's ``save_checkpoint`` hands to ``torch.save`` gets
    ``entries`` added: one write of the file, nothing forked from nnU-Net."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "network_weights" in obj:
            obj = dict(obj, **entries)
        return original(obj, f, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = original


class IgnoreOutsideImage:
    """Mixin for an nnUNetTrainer subclass: with sparse labels, padding is ignored in augmentation
    (:func:`ignore_outside_image`). Every samnnu trainer has it."""

    @staticmethod
    def get_training_transforms(*args, ignore_label: int | None = None, **kwargs):
        """nnU-Net's training augmentation; with sparse labels, padding is ignored (:func:`ignore_outside_image`)."""
        return ignore_outside_image(nnUNetTrainer.get_training_transforms(*args, ignore_label=ignore_label, **kwargs),
                                    ignore_label)

    @staticmethod
    def get_validation_transforms(*args, ignore_label: int | None = None, **kwargs):
        """nnU-Net's validation transforms; with sparse labels, padding is ignored."""
        return ignore_outside_image(nnUNetTrainer.get_validation_transforms(*args, ignore_label=ignore_label,
                                                                            **kwargs), ignore_label)


class SAMTrainerBase(IgnoreOutsideImage, nnUNetTrainer, abc.ABC):
    """The shared SAM recipe; a concrete trainer writes :meth:`build_network_architecture` and what its
    idea changes (its loss, a hyper-parameter as a class attribute)."""

    #: the patch dimensions this trainer's network takes (2: the ``2d`` configuration; 3: ``3d_fullres``);
    #: a configuration with other patches is refused before any work
    patch_dimensions: tuple[int, ...] = (2,)
    warmup_fraction = 0.05
    #: the warm-up never lasts longer than this (5 % of nnU-Net's normal 250,000 iterations would be 12,500)
    max_warmup_iterations = 250
    #: the iteration progress bar (a budgeted run shows its own bar, in minutes, instead)
    show_progress = True
    sam_initial_lr = 1e-3
    sam_weight_decay = 0.01
    loss_weights = (0.2, 0.8)  # (cross-entropy, Dice)
    #: neighbouring slices on each side given to a 2D network as extra channels (2.5D); the network must
    #: take them (its ``context_slices``)
    context_slices = 0
    #: train with one loss per decoder level; the network must have the heads (``deep_supervision_levels``)
    deep_supervision = False
    #: average the trainable weights over the last share of the run (:class:`~samnnu.trainers.averaging.PowerAverage`,
    #: this exponent); validation and checkpoints use the average. None: the last weights, as nnU-Net does
    weight_average_gamma: float | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and torch.device(device).type == "cpu":
            # nnU-Net takes data-parallel training to mean CUDA; with gloo on a CPU the ranks stay there
            self.device = torch.device("cpu")
            self.grad_scaler = None
        self.enable_deep_supervision = self.deep_supervision
        self.initial_lr = self.sam_initial_lr
        self.weight_decay = self.sam_weight_decay
        self.load_pretrained_weights = True
        self._progress = None
        self.weight_average: PowerAverage | None = None

    @classmethod
    @abc.abstractmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        """The network for one configuration, from its ``sam`` block
        (``configuration_manager.configuration["sam"]``): x (B, C, *patch) -> logits (B, K, *patch)."""

    def initialize(self):
        gloo = self.is_ddp and self.device.type != "cuda"
        if gloo:  # nnU-Net's DDP wrapper passes device_ids=[rank], which only GPU modules take
            self.is_ddp = False
            try:
                super().initialize()
            finally:
                self.is_ddp = True
            self.network = DDP(self.network)  # parameters and buffers broadcast from rank 0
            self.loss = self._build_loss()  # Dice over all ranks' samples, as nnU-Net does on GPUs
        else:
            super().initialize()
        load_sam_pretrained(self)  # the same file on every rank: the ranks stay equal
        if self.weight_average_gamma:
            self.weight_average = PowerAverage(self._plain_network(), self.weight_average_gamma)

    def _set_batch_size_and_oversample(self):
        """The ``sam`` block's batch; under data-parallel training an equal share per rank (rounded, at
        least 1): the batch Dice gathers the same number of samples from every rank."""
        batch = int(self.configuration_manager.configuration["sam"]["batch_size"])
        if dist.is_available() and dist.is_initialized():
            batch = max(1, round(batch / dist.get_world_size()))
        self.batch_size = batch

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets; with ``context_slices``, images come with their neighbouring slices."""
        tr, val = super().get_tr_and_val_datasets()
        if self.context_slices:
            tr, val = ContextDataset(tr, self.context_slices), ContextDataset(val, self.context_slices)
        return tr, val

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation, predicting with :class:`~samnnu.pipeline.inference.BatchedPredictor` (with the
        averaged weights when the trainer averages)."""
        original = nnunet_trainer_module.nnUNetPredictor
        nnunet_trainer_module.nnUNetPredictor = BatchedPredictor
        try:
            with self.averaged_weights():
                return super().perform_actual_validation(save_probabilities)
        finally:
            nnunet_trainer_module.nnUNetPredictor = original

    def averaged_weights(self):
        """Context in which the network holds the weights it predicts with: the average, for a trainer that
        averages (:attr:`weight_average_gamma`); nothing changes otherwise."""
        return self.weight_average.applied() if self.weight_average is not None else contextlib.nullcontext()

    def on_validation_epoch_start(self):
        """The epoch's pseudo-Dice (and so ``checkpoint_best``) is measured on the averaged weights."""
        super().on_validation_epoch_start()
        if self.weight_average is not None:
            self.weight_average.swap()

    def on_validation_epoch_end(self, val_outputs):
        if self.weight_average is not None and self.weight_average.swapped:
            self.weight_average.swap()
        super().on_validation_epoch_end(val_outputs)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint; with averaging its ``network_weights`` are the average (what prediction loads)
        and the training weights go beside them under ``samnnu_weight_average``, for resuming."""
        if self.weight_average is None:
            return super().save_checkpoint(filename)
        with self.weight_average.applied(), _saved_with({CHECKPOINT_KEY: self.weight_average.training_state()}):
            super().save_checkpoint(filename)

    def load_checkpoint(self, filename_or_checkpoint):
        """nnU-Net's loading; a checkpoint with an average (``samnnu_weight_average``) puts its training weights
        back into the network, and a trainer that averages keeps the checkpoint's weights as its average
        (a checkpoint without one restarts the average)."""
        with weights_only_loading():  # nnU-Net's torch.load could otherwise run code from the file
            super().load_checkpoint(filename_or_checkpoint)
        stored = load_torch_safely(filename_or_checkpoint).get(CHECKPOINT_KEY)
        if self.weight_average is not None:
            if stored is not None:
                self.weight_average.load_training_state(stored)
            else:
                self.weight_average.restart()
        elif stored is not None:  # trained with averaging, continued without: on from the training weights
            self._plain_network().load_state_dict(stored["weights"], strict=False)

    def _bare_network(self) -> torch.nn.Module:
        return self.network.module if isinstance(self.network, DDP) else self.network

    def _plain_network(self) -> torch.nn.Module:
        """The network without DDP and torch.compile wrappers (the same parameter tensors)."""
        net = self._bare_network()
        return getattr(net, "_orig_mod", net)

    def set_deep_supervision_enabled(self, enabled: bool):
        """Switch the extra outputs of a network with deep-supervision heads; the others have one output."""
        net = self._bare_network()
        if hasattr(net, "deep_supervision_levels"):
            net.deep_supervision = enabled

    def _get_deep_supervision_scales(self):
        """One target scale per network output, halving per level: [[1, 1], [0.5, 0.5], [0.25, 0.25], ...].

        nnU-Net derives its scales from its U-Net's pooling; a SAM network's decoder levels halve from the
        patch down (the network resizes each output to round(size / 2^i), which is how nnU-Net's
        ``DownsampleSegForDSTransform`` sizes the targets).
        """
        if not self.enable_deep_supervision:
            return None
        dims = len(self.configuration_manager.patch_size)
        return [[0.5 ** i] * dims for i in range(self._bare_network().deep_supervision_levels)]

    def _build_loss(self):
        ce, dice = self.loss_weights
        loss = DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                               "do_bg": False, "ddp": self.is_ddp}, {}, weight_ce=ce, weight_dice=dice,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
        if not self.enable_deep_supervision:
            return loss
        # nnU-Net's weights (halving per level, normalised to sum 1), but every level counts: nnU-Net drops
        # its coarsest output, while the SAM decoders are shallow (three levels at the planned sizes)
        weights = np.array([0.5 ** i for i in range(len(self._get_deep_supervision_scales()))])
        return DeepSupervisionWrapper(loss, weights / weights.sum())

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.initial_lr, weight_decay=self.weight_decay)
        total = self.num_epochs * self.num_iterations_per_epoch
        warmup = round(min(self.warmup_fraction * total, self.max_warmup_iterations))
        scheduler = WarmupPolyLR(optimizer, self.initial_lr, total, warmup)
        return optimizer, scheduler

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.lr_scheduler.step(self.current_epoch, self.num_iterations_per_epoch)

    def on_train_start(self):
        super().on_train_start()
        if not self.show_progress or self.local_rank != 0:
            return
        total = self.num_epochs * self.num_iterations_per_epoch
        self._progress = tqdm(total=total, initial=self.current_epoch * self.num_iterations_per_epoch,
                              desc=f"training {self.__class__.__name__} fold {self.fold}", unit="it",
                              dynamic_ncols=True)

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self.lr_scheduler.step_iteration()
        if self.weight_average is not None:
            self.weight_average.update()
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(loss=f"{float(out['loss']):.3f}")
        return out

    def on_train_end(self):
        if self._progress is not None:
            self._progress.close()
        super().on_train_end()
