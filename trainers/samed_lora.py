"""SAMedLoRATrainer: SAMed's recipe as a thin nnUNetTrainer subclass.

What differs from nnU-Net's trainer, each in one small override:
- the network is :class:`samnnu.networks.samed.SAMedNet`, rebuilt from the plans' ``sam`` block;
  LiteMedSAM's pretrained weights are loaded when training starts, never at inference;
- batch size from the ``sam`` block (planned for the SAM encoder, not for a U-Net);
- no deep supervision; loss 0.2 cross-entropy + 0.8 Dice;
- AdamW on the trainable parameters only, linear warm-up then polynomial decay, stepped per iteration;
- a progress bar over all iterations with the time left.
"""
from __future__ import annotations

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from tqdm import tqdm

from samnnu.encoders import get_encoder_spec
from samnnu.networks.common import count_parameters
from samnnu.networks.samed import SAMedNet


def load_sam_pretrained(trainer: nnUNetTrainer) -> None:
    """Load the SAM encoder's pretrained weights into ``trainer.network`` (after initialize, training only).

    The checkpoint is the plans' ``sam.sam_checkpoint`` (the user's file, for ``vit_*``/``mobilesam``);
    encoders without pretrained weights (``tiny``) keep their initialisation.
    """
    net = trainer.network
    checkpoint = trainer.configuration_manager.configuration["sam"].get("sam_checkpoint")
    if trainer.load_pretrained_weights and get_encoder_spec(net.encoder_name).pretrained is not None:
        net.load_pretrained(checkpoint=checkpoint)
        trainer.print_to_log_file(f"Loaded pretrained {net.encoder_name} weights"
                                  + (f" from {checkpoint}" if checkpoint else ""))
    trainer.print_to_log_file(f"Parameters: {count_parameters(net)} total, "
                              f"{count_parameters(net, trainable_only=True)} trainable")


class WarmupPolyLR:
    """Linear warm-up over the first ``warmup`` iterations, then lr * (1 - t)^0.9 (t: fraction of the rest)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, total_iterations: int,
                 warmup: int, exponent: float = 0.9):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.total = max(1, total_iterations)
        self.warmup = max(0, min(warmup, self.total - 1))
        self.exponent = exponent
        self.iteration = 0
        self._apply()

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup:
            return self.initial_lr * (iteration + 1) / (self.warmup + 1)
        t = (iteration - self.warmup) / max(1, self.total - self.warmup)
        return self.initial_lr * max(0.0, 1.0 - t) ** self.exponent

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.iteration)

    def step(self, epoch: int | None = None, iterations_per_epoch: int | None = None) -> None:
        """With ``epoch`` (nnU-Net calls this at each epoch start): jump to that epoch's first iteration."""
        if epoch is not None and iterations_per_epoch is not None:
            self.iteration = epoch * iterations_per_epoch
        self._apply()

    def step_iteration(self) -> None:
        self.iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self._apply()


class SAMedLoRATrainer(nnUNetTrainer):
    """SAMed: LoRA (rank 4) on q and v of every encoder attention block, prompt-free multi-class decoder."""

    lora_rank = 4
    warmup_fraction = 0.05
    sam_initial_lr = 1e-3
    sam_weight_decay = 0.01
    loss_weights = (0.2, 0.8)  # (cross-entropy, Dice)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = self.sam_initial_lr
        self.weight_decay = self.sam_weight_decay
        self.load_pretrained_weights = True
        self._progress = None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        sam = configuration_manager.configuration["sam"]
        return SAMedNet(encoder=sam["encoder"], input_size=sam["input_size"], in_channels=num_input_channels,
                        num_classes=num_output_channels, intensity_windows=sam["intensity_windows"],
                        lora_rank=cls.lora_rank)

    def initialize(self):
        super().initialize()
        load_sam_pretrained(self)

    def _set_batch_size_and_oversample(self):
        self.batch_size = int(self.configuration_manager.configuration["sam"]["batch_size"])

    def set_deep_supervision_enabled(self, enabled: bool):
        """The SAM networks have a single output: nothing to switch."""

    def _build_loss(self):
        ce, dice = self.loss_weights
        return DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                               "do_bg": False, "ddp": self.is_ddp}, {}, weight_ce=ce, weight_dice=dice,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.initial_lr, weight_decay=self.weight_decay)
        total = self.num_epochs * self.num_iterations_per_epoch
        scheduler = WarmupPolyLR(optimizer, self.initial_lr, total, round(self.warmup_fraction * total))
        return optimizer, scheduler

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.lr_scheduler.step(self.current_epoch, self.num_iterations_per_epoch)

    def on_train_start(self):
        super().on_train_start()
        total = self.num_epochs * self.num_iterations_per_epoch
        self._progress = tqdm(total=total, initial=self.current_epoch * self.num_iterations_per_epoch,
                              desc=f"training {self.__class__.__name__} fold {self.fold}", unit="it",
                              dynamic_ncols=True)

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self.lr_scheduler.step_iteration()
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(loss=f"{float(out['loss']):.3f}")
        return out

    def on_train_end(self):
        if self._progress is not None:
            self._progress.close()
        super().on_train_end()
