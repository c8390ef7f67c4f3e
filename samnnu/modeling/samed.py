"""SAMed's network: a SAM encoder with LoRA, prompt-free multi-class masks from SAM's mask decoder.

LoRA on the query and value projections of an encoder's attention blocks (SAMed's idea).

SAM-family encoders compute q, k and v with one fused linear layer (``attn.qkv``). :class:`LoRAQV`
replaces it by a linear layer with the same frozen weight and bias plus two trainable low-rank
updates, one added to the q outputs and one to the v outputs. Which output features are q and v
depends on the encoder's layout (:func:`qv_output_indices`). B matrices start at zero, so a freshly
wrapped encoder computes exactly what it computed before.

Because the wrapper keeps the base layer's ``weight`` and ``bias`` names, pretrained state dicts
load into a wrapped encoder unchanged; only the ``lora_*`` keys are new.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from samnnu.modeling.prompt_free import PromptFreeSAMNet


class LoRAQV(nn.Linear):
    """A fused qkv projection with low-rank updates on its q and v outputs.

    x: (..., in_features) -> (..., out_features); out = W x + b + s * (B_q A_q x at q features,
    B_v A_v x at v features) with s = alpha / rank.
    """

    def __init__(self, base: nn.Linear, q_index: torch.Tensor, v_index: torch.Tensor, rank: int = 4,
                 alpha: float | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_q_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_q_b = nn.Linear(rank, len(q_index), bias=False)
        self.lora_v_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_v_b = nn.Linear(rank, len(v_index), bias=False)
        for a, b in ((self.lora_q_a, self.lora_q_b), (self.lora_v_a, self.lora_v_b)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        self.register_buffer("q_index", q_index.long(), persistent=False)
        self.register_buffer("v_index", v_index.long(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        out = out.index_add(-1, self.q_index, self.lora_q_b(self.lora_q_a(x)), alpha=self.scale)
        return out.index_add(-1, self.v_index, self.lora_v_b(self.lora_v_a(x)), alpha=self.scale)


def qv_output_indices(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the q and v features in ``attn.qkv``'s output.

    TinyViT (``key_dim`` attribute): per head [q (key_dim), k (key_dim), v (d)], heads concatenated.
    SAM ViT: [q (dim), k (dim), v (dim)].
    """
    out_features = attn.qkv.out_features
    if hasattr(attn, "key_dim"):
        kd, d, heads = attn.key_dim, attn.d, attn.num_heads
        per_head = 2 * kd + d
        q = torch.cat([torch.arange(h * per_head, h * per_head + kd) for h in range(heads)])
        v = torch.cat([torch.arange(h * per_head + 2 * kd, (h + 1) * per_head) for h in range(heads)])
        return q, v
    dim = out_features // 3
    return torch.arange(0, dim), torch.arange(2 * dim, 3 * dim)


def apply_lora(encoder: nn.Module, rank: int = 4) -> int:
    """Wrap the ``qkv`` layer of every attention block of ``encoder`` in place; return how many."""
    count = 0
    for module in list(encoder.modules()):
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and not isinstance(qkv, LoRAQV):
            q, v = qv_output_indices(module)
            module.qkv = LoRAQV(qkv, q, v, rank=rank)
            count += 1
    return count


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


class SAMedNet(PromptFreeSAMNet):
    """SAM encoder with LoRA on q and v, mask decoder with one mask token per class (background included).

    Trainable in the encoder: the LoRA matrices only (see :class:`PromptFreeSAMNet` for the rest).

    x: (B, C, H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W)
    """

    def __init__(self, *, lora_rank: int = 4, **kwargs):
        self.lora_rank = lora_rank
        super().__init__(**kwargs)
        self.num_lora_layers = self.num_adapted

    def adapt_encoder(self, encoder: nn.Module) -> int:
        return apply_lora(encoder, self.lora_rank)

    def is_encoder_trainable(self, name: str) -> bool:
        return is_lora_parameter(name)
