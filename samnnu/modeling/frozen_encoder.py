"""A frozen SAM image encoder as a feature extractor, shared by the frozen-encoder networks."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from samnnu.modeling.common import IntensityToSAM, fit_square, freeze_batchnorm_stats
from samnnu.modeling.encoders import SAMParts, build_sam_parts, inference_encoder, load_pretrained
from samnnu.modeling.samed import apply_lora, is_lora_parameter


def tensor_digest(tensors: list[torch.Tensor]) -> bytes:
    """A 16-byte digest of the tensors' values, dtypes, shapes and devices, in order (equal digests: the
    same weights on the same device)."""
    h = hashlib.sha256()  # twice blake2b's speed where the CPU computes SHA-256 itself (24 MB: 13 ms against 26)
    for t in tensors:
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}{t.device}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()[:16]


class FrozenSAMEncoder(nn.Module):
    """Frozen SAM image encoder with its fixed intensity mapping; runs without autograd.

    Nothing here trains: the channel mix stays at the channel mean, the encoder at its pretrained
    weights and BatchNorm statistics. With ``lora_rank`` > 0 the one exception is LoRA of that rank on
    every attention block's q and v (SAMed's adaptation, :func:`samnnu.modeling.samed.apply_lora`): the
    encoder then runs with autograd in training, and the LoRA matrices train while the rest stays frozen.
    2D input is fitted into the encoder's square input; 3D input (B, C, D, H, W) is encoded slice by
    slice along D.

    x: (B, C, H, W) -> (B, D_e, g, g) embedding of the square-fitted input, and the content size
       (h, w) of the image inside the size x size square (see fit_square);
       (B, C, D, H, W) -> (B, D_e, D, g, g), content size.
    """

    def __init__(self, *, encoder: str, input_size: int, in_channels: int,
                 intensity_windows: list[tuple[float, float]], rgb_groups: bool = False, lora_rank: int = 0):
        super().__init__()
        parts = build_sam_parts(encoder, input_size=input_size, num_mask_tokens=1)
        self.encoder_name = encoder
        self.input_size = input_size
        self.stride = parts.stride
        self.embed_dim = parts.embed_dim
        self.intensity = IntensityToSAM(in_channels, intensity_windows, rgb_groups=rgb_groups)
        self.image_encoder = parts.image_encoder
        self.lora_rank = lora_rank
        if lora_rank:
            apply_lora(self.image_encoder, lora_rank)  # B matrices at zero: the same encoder at first
        for name, p in self.named_parameters():
            p.requires_grad = bool(lora_rank) and is_lora_parameter(name)
        self._cache: dict[bytes, torch.Tensor] | None = None
        self._weights_key: bytes | None = None

    def use_embedding_cache(self, on: bool) -> None:
        """Remember the embedding of every image encoded while ``on`` (cleared when switched off).

        An ensemble of folds runs the same frozen encoder on the same tiles once per fold; with the cache
        on, each tile is encoded once. The key is the image's bytes together with a digest of this
        module's weights, so folds whose frozen weights differ (an encoder without pretrained weights is
        initialised at random per fold) never share an embedding. Whoever loads other weights into the
        module while the cache is on calls :meth:`weights_loaded` (the predictor does, for every fold).
        """
        self._cache = {} if on else None
        self._weights_key = None

    def weights_loaded(self) -> None:
        """New weights were loaded: the next cached encoding digests them anew."""
        self._weights_key = None

    def _weights_digest(self) -> bytes:
        """A digest of the weights that make an embedding: the image encoder's state (:meth:`_state_digest`,
        which the folded copy's check shares, so a loaded fold is digested once) and the intensity mapping."""
        if self._weights_key is None:
            state = self._encoder_state()
            rest = [t for name, t in [*self.named_parameters(), *self.named_buffers()]
                    if not name.startswith("image_encoder.")]
            encoder = self._state_digest(state, self._weights_version(state))
            self._weights_key = hashlib.sha256(encoder + tensor_digest(rest)).digest()[:16]
        return self._weights_key

    def _state_digest(self, state: list[torch.Tensor], version: tuple) -> bytes:
        """:func:`tensor_digest` of the image encoder's ``state`` (:meth:`_encoder_state`), computed again only
        when its ``version`` (:meth:`_weights_version`) changed."""
        digested = self.__dict__.get("_digested")
        if digested is None or digested[0] != version:
            digested = (version, tensor_digest(state))
            self.__dict__["_digested"] = digested
        return digested[1]

    def _encoder_state(self) -> list[torch.Tensor]:
        """The image encoder's parameters and persistent buffers. Non-persistent buffers are derived or
        constant (TinyViT's ``eval()`` rebuilds its attention-bias table from the parameters every time)."""
        tensors = []
        for m in self.image_encoder.modules():
            tensors += [t for t in m._parameters.values() if t is not None]
            tensors += [b for name, b in m._buffers.items()
                        if b is not None and name not in m._non_persistent_buffers_set]
        return tensors

    @staticmethod
    def _weights_version(state: list[torch.Tensor]) -> tuple:
        """Changes whenever a tensor of the image encoder's state (:meth:`_encoder_state`) is replaced or
        modified in place (loading a state dict, an optimiser step on LoRA, moving the module): the storage
        address, dtype and version counter of each parameter and persistent buffer."""
        return tuple(k for t in state for k in (t.data_ptr(), t.dtype, t._version))

    def _no_grad_encoder(self) -> nn.Module:
        """The folded channels-last copy of the image encoder (kept out of the state dict).

        It is made anew only when the encoder's weights really changed. On the CPU a changed version (see
        :meth:`_weights_version`) is checked against a digest of the values the copy was made from: nnU-Net's
        predictor loads a fold's state dict again for every volume, and the folds of an ensemble share their
        frozen encoder's weights, so the same values come back again and again, and then the copy stays. On
        a GPU, where copying the weights to the host for the digest may cost more than a new copy, any
        changed version makes a new copy.
        """
        state = self._encoder_state()
        version = self._weights_version(state)
        fast, made_from, digest = self.__dict__.get("_inference_encoder", (None, None, None))
        if fast is not None and made_from == version:
            return fast
        new_digest = self._state_digest(state, version) if all(t.device.type == "cpu" for t in state) else None
        if fast is None or new_digest is None or new_digest != digest:
            with torch.inference_mode(False), torch.no_grad():
                fast = inference_encoder(self.image_encoder)
        self.__dict__["_inference_encoder"] = (fast, version, new_digest)
        return fast

    def _run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1] -> (N, D_e, g, g), contiguous. Under ``torch.compile`` (nnU-Net compiles
        on CUDA) the module itself is traced: the compiler does its own fusion, and the copy's bookkeeping is
        Python it should not trace."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.image_encoder(x)
        return self._no_grad_encoder()(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        """Load the pretrained image encoder (training start only)."""
        parts = SAMParts(self.image_encoder, None, None, self.input_size, self.stride, self.embed_dim)
        return load_pretrained(self.encoder_name, parts, checkpoint=checkpoint,
                               new_encoder_keys=lambda key: bool(self.lora_rank) and is_lora_parameter(key))

    def train(self, mode: bool = True):
        super().train(mode)
        freeze_batchnorm_stats(self.image_encoder)
        return self

    def encode_2d(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.lora_rank) and self.training):
            return self._encode_2d(x)

    def _encode_2d(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self._cache is None or self.training:
            x, content = fit_square(self.intensity(x), self.input_size)
            return self._run_encoder(x), content
        weights = self._weights_digest()
        keys = [weights + hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
                for image in x]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        fitted, content = fit_square(self.intensity(x[missing] if missing else x[:1]), self.input_size)
        if missing:
            for i, emb in zip(missing, self._run_encoder(fitted)):
                self._cache[keys[i]] = emb
        return torch.stack([self._cache[k] for k in keys]), content

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.dim() == 4:
            return self.encode_2d(x)
        b, c, d, h, w = x.shape
        emb, content = self.encode_2d(x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w))
        return emb.view(b, d, *emb.shape[1:]).permute(0, 2, 1, 3, 4), content
