"""Interactive refinement: a pretrained promptable SAM on 2D slices, propagation through a volume, and a
session a person (or a script) drives with clicks and boxes.

The refiner is LiteMedSAM as published (TinyViT encoder, SAM prompt encoder and mask decoder with SAM's
four mask tokens), not the adapted prompt-free network: it works on slices taken along the first array
axis (z of SimpleITK's (z, y, x)), each scaled so its longer side is 256 and zero-padded to 256 x 256,
after the volume's intensities are mapped to [0, 1] between its 0.5 and 99.5 percentiles. A slice's
image embedding is computed once and cached; every update reruns only the prompt encoder and mask decoder.

How prompts become a mask (one label, one :class:`~samnnu.interactive.prompts.ObjectPrompt` = one object):

1. A box is decoded on its key slice (:func:`~samnnu.interactive.prompts.key_slice`) and propagated: slice by slice
   outward, each slice is decoded with the box of its neighbour's refined mask enlarged by ``margin``
   voxels, until the mask vanishes, the box's slice range ends (a box spanning several slices) or, for a
   box drawn on one slice, the prompt-free prediction has no voxel of the label on the next slice. Every
   decode also gets a mask prompt (``mask_prompt``: none, the prompt-free probabilities, or the object's
   previous logits on that slice). Masks of automatic prompts are fused with the prompt-free
   probabilities (``fuse_base``); a box drawn by the user is followed as the refiner answers it. A box
   drawn on one slice goes instead to the refiner's 3D click corrector when that was trained on boxes
   (``corrector_boxes``), which answers the structure in 3D at once.
2. Clicks (``clicks="edit"``, the default) are local edits of the current mask (the box's result, or the
   prompt-free mask): the click's slice is decoded with a box around the current mask (and the positive
   clicks) and the clicks themselves (``click_prompts``: as SAM points, or as changes of the box); a
   positive click adds the connected part of the answer that holds it and that the mask lacked, a
   negative click removes the connected part of the mask that holds it and the answer lacks. With
   ``propagate_clicks`` the edit continues to neighbouring slices while it keeps changing voxels next to
   the previous slice's change. ``clicks="replace"`` instead treats click slices as seeds like a box's
   key slice, and the decoder's mask replaces the slice.
3. The label's mask: on every slice some object reached, the union of the objects' masks there; on the
   other slices, the prompt-free mask. It then replaces the label in the multi-class map: voxels the
   label loses become background, voxels it gains are taken from whatever label had them.

What the defaults are and why (measured with ``benchmarks/interactive_benchmark.py``): docs/interactive.md.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from samnnu.datasets import first_fold_file
from samnnu.defaults import PROMPT_PATH_FILE, PROMPT_PATH_RECORD
from samnnu.errors import SamnnuError
from samnnu.evaluation.metrics import dice
from samnnu.interactive.auto_prompts import bounding_rectangle, deepest_voxel
from samnnu.interactive.click_corrector import normalize_image
from samnnu.interactive.prompts import Box, Lasso, ObjectPrompt, Point, Stroke, key_slice, line_voxels
from samnnu.safe_io import load_torch_safely

REFINER_ENCODERS = ("litemedsam", "tiny")
_MASK_PROMPTS = ("none", "base", "previous")
_MULTIMASK = ("sam", "never", "always")
_CLICK_MODES = ("replace", "edit")


@dataclass(frozen=True)
class RefineOptions:
    """How prompts drive the refiner (defaults chosen by ``benchmarks/interactive_benchmark.py``, see
    docs/interactive.md).

    margin: voxels added on every side of boxes derived from masks.
    mask_prompt: "none", "base" (prompt-free probabilities of the label as mask logits) or "previous"
        (the object's logits on that slice from the previous update, else as "base").
    derived_box: on seed slices without a user box (``clicks="replace"``), give the decoder the box of the
        prompt-free mask and the positive clicks there.
    propagate_clicks: a click's change continues to neighbouring slices (else it changes its slice only).
    stop_at_base: propagation from a one-slice box (or, with ``clicks="replace"``, clicks) stops where the
        prompt-free prediction has no voxel of the label.
    fuse_base: weight of the prompt-free probability in the masks of automatic prompts (0: the refiner alone).
    multimask: "sam" (SAM's rule: three candidate masks, best predicted IoU, when a slice's only prompt is
        one click; else the single-mask output), "never" or "always".
    clicks: "edit" (clicks edit the current mask locally) or "replace" (click slices are decoded afresh).
    click_prompts: "points" (clicks go to the decoder as SAM points) or "box" (they only reshape the box:
        :func:`click_box`).
    stop_confidence: propagation also stops at a slice whose mask has a mean probability (sigmoid of the
        decoder's logits over the mask's voxels) under this; 0 turns the rule off. Meant for boxes without a
        prompt-free prediction, where nothing else tells the refiner that the structure has ended.
    corrector: in edit mode, clicks go to the refiner's 3D click corrector when it has one
        (:mod:`samnnu.interactive.click_corrector`), which edits the whole 3D error region a click lands in;
        false: the 2D edit above even then.
    corrector_boxes: in edit mode, a box drawn on one slice (not a lasso) goes to the 3D click corrector when
        it was trained on box starts (:meth:`samnnu.interactive.click_corrector.ClickCorrector.box`), which
        answers the structure in 3D at once; false: the refiner decodes and propagates it even then.
    corrector_mirroring: a corrector trained on mirrored crops answers with test-time mirroring (the mean over
        the crop's 8 mirror images); false: one run of its network per click.
    """

    margin: int = 1
    mask_prompt: str = "base"
    derived_box: bool = True
    propagate_clicks: bool = False
    stop_at_base: bool = True
    fuse_base: float = 0.5
    multimask: str = "sam"
    clicks: str = "edit"
    click_prompts: str = "points"
    stop_confidence: float = 0.0
    corrector: bool = True
    corrector_boxes: bool = True
    corrector_mirroring: bool = True

    def __post_init__(self):
        if self.mask_prompt not in _MASK_PROMPTS:
            raise SamnnuError(f"mask_prompt must be one of {', '.join(_MASK_PROMPTS)}, not '{self.mask_prompt}'")
        if self.multimask not in _MULTIMASK:
            raise SamnnuError(f"multimask must be one of {', '.join(_MULTIMASK)}, not '{self.multimask}'")
        if not 0.0 <= self.fuse_base <= 1.0:
            raise SamnnuError(f"fuse_base must lie in [0, 1], not {self.fuse_base}")
        if self.clicks not in _CLICK_MODES:
            raise SamnnuError(f"clicks must be one of {', '.join(_CLICK_MODES)}, not '{self.clicks}'")
        if self.click_prompts not in ("points", "box"):
            raise SamnnuError(f"click_prompts must be points or box, not '{self.click_prompts}'")
        if self.margin < 0:
            raise SamnnuError(f"margin must be >= 0, not {self.margin}")
        if not 0.0 <= self.stop_confidence < 1.0:
            raise SamnnuError(f"stop_confidence must lie in [0, 1), not {self.stop_confidence}")

    @classmethod
    def parse(cls, items: Iterable[str]) -> "RefineOptions":
        """``["margin=3", "mask_prompt=none", ...]`` -> options (command-line form)."""
        out = cls()
        types = {name: type(getattr(out, name)) for name in out.__dataclass_fields__}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or name not in types:
                raise SamnnuError(f"refine option '{item}': expected NAME=VALUE with NAME one of "
                                  f"{', '.join(types)}")
            kind = types[name]
            try:
                parsed = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
            except ValueError:
                raise SamnnuError(f"refine option '{item}': {value!r} is not a {kind.__name__}") from None
            out = replace(out, **{name: parsed})
        return out


@dataclass
class SliceLogits:
    """The decoder's answer on one slice. low: (1, 1, M, M) logits on the padded square grid (M = the
    prompt encoder's mask input size, so they can be fed back as a mask prompt); full: (Y, X) logits
    on the slice's own grid."""

    low: torch.Tensor
    full: np.ndarray


class SliceRefiner:
    """A pretrained promptable SAM applied to 2D slices of one volume at a time.

    Call :meth:`set_volume` with a (Z, Y, X) image, then :meth:`decode` per slice; image embeddings
    are computed on first use and cached until the next :meth:`set_volume`.
    """

    def __init__(self, parts, *, device: str | torch.device = "cpu", encoder: str = "", trained: dict | None = None,
                 corrector=None):
        self.parts = parts
        self.encoder = encoder
        # the record of a prompt path trained on the dataset (samnnu.interactive.prompt_training), else None
        self.trained = trained
        # a 3D click corrector trained on the dataset (samnnu.interactive.click_corrector.ClickCorrector) or None
        self.corrector = corrector
        self.device = torch.device(device)
        for module in (parts.image_encoder, parts.prompt_encoder, parts.mask_decoder):
            module.to(self.device).eval()
        self.input_size = parts.input_size
        self.mask_size = tuple(parts.prompt_encoder.mask_input_size)
        self._image: np.ndarray | None = None
        self._volume: np.ndarray | None = None
        # {z: (1, D, g, g)} image embeddings of the current volume's slices (may be filled from a saved copy)
        self.embeddings: dict[int, torch.Tensor] = {}
        self.stats = {"embeddings": 0, "embedding_seconds": 0.0, "decodes": 0, "decode_seconds": 0.0}

    @property
    def description(self) -> str:
        """Which refiner this is, in words (for reports and command output)."""
        if self.trained is None:
            text = f"pretrained {self.encoder} refiner (prompt path not trained on this dataset)"
        else:
            t = self.trained
            text = (f"{self.encoder} refiner with its prompt path trained on this dataset ({t['file']}: "
                    f"{t['steps']} steps on {t['slices']} slices of fold {t['fold']}'s training cases)")
        if self.corrector is None:
            return text
        return f"{text}; {'clicks and boxes' if self.corrector.boxes else 'clicks'} by the {self.corrector.description}"

    @classmethod
    def create(cls, encoder: str = "litemedsam", *, device: str | None = None,
               trained: str | Path | None = None, corrector: str | Path | None = None) -> "SliceRefiner":
        """``litemedsam``: the bundled pretrained LiteMedSAM at 256. ``tiny``: random weights at 64 (tests).

        trained: a prompt path trained on a dataset (``refiner.pth`` of
        :func:`samnnu.interactive.prompt_training.train_prompts`), loaded over the pretrained prompt encoder
        and mask decoder (weights only; a file for another refiner encoder is refused).
        corrector: a 3D click corrector trained on a dataset (``click_corrector.pth`` of
        :func:`samnnu.interactive.click_corrector.train_corrector`; weights only), which then answers clicks.
        """
        # local: pulls in segment_anything, timm and LiteMedSAM (slow to import)
        from samnnu.modeling.encoders import build_sam_parts, load_pretrained

        if encoder not in REFINER_ENCODERS:
            raise SamnnuError(f"unknown refiner encoder '{encoder}' (use {' or '.join(REFINER_ENCODERS)})")
        if encoder == "litemedsam":
            parts = build_sam_parts("litemedsam", input_size=256, num_mask_tokens=4)
            left = load_pretrained("litemedsam", parts)
            if any(left.values()):
                raise RuntimeError(f"LiteMedSAM weights left parts uninitialised: {left}")
        else:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                parts = build_sam_parts("tiny", input_size=64, num_mask_tokens=4)
        record = load_prompt_path(trained, parts, encoder) if trained is not None else None
        if corrector is not None:
            from samnnu.interactive.click_corrector import load_corrector  # local: pulls in nnU-Net's U-Net

            corrector = load_corrector(corrector, device or "cpu")
        return cls(parts, device=device or "cpu", encoder=encoder, trained=record, corrector=corrector)

    # ------------------------------------------------------------------ image side
    def set_volume(self, image: np.ndarray) -> None:
        """image: (Z, Y, X) intensities (any scale); mapped to [0, 1] between its 0.5/99.5 percentiles.

        Embeddings are kept when the same volume is set again, dropped otherwise.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {image.shape}")
        if self._image is not None and self._image.shape == image.shape and np.array_equal(self._image, image):
            return  # the same volume again: keep its embeddings
        self._image = image
        self._volume = normalize_image(image)
        self.embeddings = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._volume.shape

    @property
    def normalized_volume(self) -> np.ndarray:
        """(Z, Y, X) the current volume mapped to [0, 1] (what the encoder and the click corrector see)."""
        return self._volume

    def _fit(self, x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
        from samnnu.modeling.common import fit_square  # local: pulls in segment_anything (slow to import)

        return fit_square(x, size)

    def embedding(self, z: int) -> torch.Tensor:
        """(1, D, g, g) image embedding of slice z (cached)."""
        if z not in self.embeddings:
            start = time.perf_counter()
            x = torch.from_numpy(self._volume[z]).to(self.device)[None, None].expand(1, 3, -1, -1)
            x, _ = self._fit(x, self.input_size)
            with torch.inference_mode():
                self.embeddings[z] = self.parts.image_encoder(x)
            self.stats["embeddings"] += 1
            self.stats["embedding_seconds"] += time.perf_counter() - start
        return self.embeddings[z]

    # ------------------------------------------------------------------ prompt side
    def probability_prompt(self, prob: np.ndarray) -> torch.Tensor:
        """(Y, X) probabilities -> (1, 1, M, M) mask-prompt logits on the padded grid (padding = certain 0)."""
        return probability_logits(prob, self.mask_size[0]).to(self.device)

    def decode(self, z: int, *, box: tuple[int, int, int, int] | None = None,
               points: Sequence[Point] = (), mask_input: torch.Tensor | None = None,
               multimask: str = "sam") -> SliceLogits:
        """Run the prompt encoder + mask decoder on slice z.

        box: (y0, x0, y1, x1) inclusive voxel indices; points: clicks on this slice (their z is ignored);
        mask_input: (1, 1, M, M) logits or None. Returns the logits of the chosen mask.
        """
        start = time.perf_counter()
        # SAM's rule for the pretrained decoder; a prompt path trained here was trained single-mask
        multi = self.trained is None and (multimask == "always" or (
            multimask == "sam" and box is None and mask_input is None and len(points) == 1))
        emb = self.embedding(z)
        with torch.inference_mode():
            low = decode_prompts(self.parts, emb, self._volume.shape[1:], box=box, points=points,
                                 mask_input=mask_input, multimask=multi)
            full = self._to_slice(low)
        self.stats["decodes"] += 1
        self.stats["decode_seconds"] += time.perf_counter() - start
        return SliceLogits(low, full)

    def _to_slice(self, low: torch.Tensor) -> np.ndarray:
        """(1, 1, M, M) -> (Y, X) logits on the slice grid (crop the padding, resize)."""
        return low_to_slice(low, self._volume.shape[1:])[0, 0].float().cpu().numpy()


def probability_logits(prob: np.ndarray, size: int) -> torch.Tensor:
    """(Y, X) probabilities -> (1, 1, size, size) mask-prompt logits on the padded square grid (padding =
    certain 0), as the image was fitted to the encoder's input."""
    from samnnu.modeling.common import fit_square  # local: pulls in segment_anything (slow to import)

    x, _ = fit_square(torch.from_numpy(np.asarray(prob, dtype=np.float32))[None, None], size)
    x = x.clamp(1e-3, 1 - 1e-3)
    return torch.log(x) - torch.log1p(-x)


def low_to_slice(low: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, K, M, M) decoder logits on the padded square grid -> (B, K, Y, X) on a slice of ``shape`` (Y, X):
    the padding is cropped and the rest resized (differentiable)."""
    h, w = shape
    s = low.shape[-1] / max(h, w)
    ch, cw = max(1, round(h * s)), max(1, round(w * s))
    return F.interpolate(low[..., :ch, :cw], size=(h, w), mode="bilinear", align_corners=False)


def decode_prompts(parts, embedding: torch.Tensor, shape: tuple[int, int], *,
                   box: tuple[int, int, int, int] | None = None, points: Sequence[Point] = (),
                   mask_input: torch.Tensor | None = None, multimask: bool = False) -> torch.Tensor:
    """SAM's prompt encoder and mask decoder on one slice's embedding; differentiable (training uses it too).

    embedding: (1, D, g, g); shape: the slice's (Y, X), fitted to the input grid as the image was; box:
    (y0, x0, y1, x1) inclusive voxel indices; points: clicks on this slice (their z is ignored); mask_input:
    (1, 1, M, M) logits or None. multimask: SAM's three candidate masks, the one with the best predicted IoU
    kept. Returns (1, 1, M', M') low-resolution logits on the padded square grid.
    """
    device = embedding.device
    s = parts.input_size / max(shape)
    pe = parts.prompt_encoder
    point_arg = box_arg = None
    if points:
        # SAM's point coordinates are (x, y) on the input grid; the prompt encoder adds half a pixel
        coords = torch.tensor([[[(p.index[2] + 0.5) * s - 0.5, (p.index[1] + 0.5) * s - 0.5] for p in points]],
                              dtype=torch.float32, device=device)
        labels = torch.tensor([[1 if p.positive else 0 for p in points]], dtype=torch.int64, device=device)
        point_arg = (coords, labels)
    if box is not None:
        y0, x0, y1, x1 = box
        box_arg = torch.tensor([[x0 * s, y0 * s, (x1 + 1) * s - 1, (y1 + 1) * s - 1]], dtype=torch.float32,
                               device=device)
    sparse, dense = pe(points=point_arg, boxes=box_arg, masks=mask_input)
    low, iou = parts.mask_decoder(image_embeddings=embedding, image_pe=pe.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask)
    if multimask:
        best = int(torch.argmax(iou[0]))
        low = low[:, best:best + 1]
    return low


# ---------------------------------------------------------------------- trained prompt paths
def load_prompt_path(path: str | Path, parts, encoder: str) -> dict:
    """Load a trained prompt path into ``parts`` (prompt encoder and mask decoder), weights only.

    Returns its record (with ``file``). Raises a one-line SamnnuError for a damaged file, a file holding
    code, or one trained for another refiner encoder.
    """
    path = Path(path)
    state = load_torch_safely(path)
    if not isinstance(state, dict) or PROMPT_PATH_RECORD not in state:
        raise SamnnuError(f"{path}: not a trained prompt path (no '{PROMPT_PATH_RECORD}' record)")
    record = json.loads(state[PROMPT_PATH_RECORD])
    if record.get("encoder") != encoder:
        raise SamnnuError(f"{path}: trained for the '{record.get('encoder')}' refiner, not '{encoder}'")
    for module in ("prompt_encoder", "mask_decoder"):
        prefix = module + "."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            getattr(parts, module).load_state_dict(weights)
        except RuntimeError as e:
            raise SamnnuError(f"{path}: its {module} does not fit the '{encoder}' refiner "
                              f"({str(e).splitlines()[0]})") from None
    return dict(record, file=str(path))


def find_prompt_path(folder: Path, folds: Sequence) -> Path | None:
    """``fold_F/refiner.pth`` of the first of ``folds`` that has one in a model folder, else None."""
    return first_fold_file(folder, folds, PROMPT_PATH_FILE)


# ---------------------------------------------------------------------- propagation through a volume
def enlarge(rect: tuple[int, int, int, int], margin: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) grown by ``margin`` on every side, clipped to a (Y, X) slice."""
    y0, x0, y1, x1 = rect
    return max(0, y0 - margin), max(0, x0 - margin), min(shape[0] - 1, y1 + margin), min(shape[1] - 1, x1 + margin)


@dataclass
class ObjectResult:
    """One object's refinement. mask: (Z, Y, X) bool (False off ``covered``); covered: the slices it
    reached; logits: its low-resolution logits per covered slice (mask prompts for the next update)."""

    mask: np.ndarray
    covered: list[int]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    # edit mode: the box's own result (box, mask, covered, logits), reused while only clicks change
    box_pass: tuple | None = None


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logits to probabilities (clipped to +-50 first, so large logits cannot overflow)."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def mask_confidence(logits: np.ndarray) -> float:
    """Mean probability over the voxels a (Y, X) logit map calls foreground; 0 when it calls none."""
    inside = logits > 0
    return float(sigmoid(logits[inside]).mean()) if inside.any() else 0.0


def click_box(rect: tuple[int, int, int, int] | None, clicks: Sequence[Point], margin: int,
              shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Clicks as changes of a box (y0, x0, y1, x1) on a (Y, X) slice, for refiners trained on boxes only.

    A positive click outside the box stretches it to reach ``margin`` voxels past the click (no box yet:
    a box of half-side ``max(margin, 1)`` around the click); a negative click inside the box moves the
    side nearest to it to just past the click. Returns None when negative clicks leave no box.
    """
    for p in clicks:
        y, x = p.index[1], p.index[2]
        if p.positive:
            r = max(margin, 1)
            rect = (y, x, y, x) if rect is None else rect
            rect = (min(rect[0], y - r), min(rect[1], x - r), max(rect[2], y + r), max(rect[3], x + r))
            rect = (max(0, rect[0]), max(0, rect[1]), min(shape[0] - 1, rect[2]), min(shape[1] - 1, rect[3]))
    for p in clicks:
        y, x = p.index[1], p.index[2]
        if p.positive or rect is None or not (rect[0] <= y <= rect[2] and rect[1] <= x <= rect[3]):
            continue
        y0, x0, y1, x1 = rect
        side = int(np.argmin([y - y0, y1 - y, x - x0, x1 - x]))
        rect = [(y + 1, x0, y1, x1), (y0, x0, y - 1, x1), (y0, x + 1, y1, x1), (y0, x0, y1, x - 1)][side]
        if rect[0] > rect[2] or rect[1] > rect[3]:
            return None
    return rect


def slice_box(mask2d: np.ndarray, clicks: Sequence[Point], options: "RefineOptions",
              shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The box a slice is decoded with when the user drew none: around ``mask2d`` (and, with point prompts,
    its positive clicks), enlarged by the margin; with ``click_prompts="box"`` the clicks then reshape it
    (:func:`click_box`)."""
    if options.click_prompts == "box":
        rect = enlarge(bounding_rectangle(mask2d), options.margin, shape) if mask2d.any() else None
        return click_box(rect, clicks, options.margin, shape)
    region = mask2d.copy()
    for p in clicks:
        if p.positive:
            region[p.index[1], p.index[2]] = True
    return enlarge(bounding_rectangle(region), options.margin, shape) if region.any() else None


def _component_at(mask: np.ndarray, y: int, x: int) -> np.ndarray:
    """The 2D connected component (face connectivity) of ``mask`` holding (y, x); empty if (y, x) is not in it."""
    if not mask[y, x]:
        return np.zeros_like(mask)
    components, _ = ndimage.label(mask)
    return components == components[y, x]


def _touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The 2D components of ``mask`` that overlap ``seeds`` (both (Y, X) bool)."""
    components, _ = ndimage.label(mask)
    ids = np.unique(components[seeds & mask])
    return np.isin(components, ids[ids > 0])


def edit_slice(current: np.ndarray, refined: np.ndarray, clicks: Sequence[Point]) -> np.ndarray:
    """A click's local edit of one (Y, X) slice: a positive click adds the connected part of
    ``refined & ~current`` that holds it, a negative click removes the connected part of
    ``current & ~refined`` that holds it; nothing else changes. Returns the new (Y, X) mask."""
    out = current.copy()
    for p in clicks:
        y, x = p.index[1], p.index[2]
        if p.positive:
            out |= _component_at(refined & ~current, y, x)
        else:
            out &= ~_component_at(current & ~refined, y, x)
    return out


def refine_object(refiner: SliceRefiner, prompt: ObjectPrompt, base_mask: np.ndarray,
                  base_prob: np.ndarray | None = None, options: RefineOptions = RefineOptions(),
                  last: ObjectResult | None = None) -> ObjectResult:
    """Refine one object through the volume (see the module docstring for the rules).

    base_mask: (Z, Y, X) bool, the prompt-free mask of the prompt's label; base_prob: (Z, Y, X) its
    probability or None; last: this object's previous result (its logits are the "previous" mask prompts;
    in edit mode its box pass is reused when the box is unchanged).
    """
    base_mask = np.asarray(base_mask, dtype=bool)
    nz, h, w = base_mask.shape
    previous = last.logits if last is not None else {}
    lasso_mask = None
    if prompt.lasso is not None:  # a lasso acts as a box on its slice, with its inside as the mask prompt
        lasso_mask = prompt.lasso.mask((h, w))
        if prompt.box is None:
            prompt = replace(prompt, box=prompt.lasso.box((h, w)))
    box = prompt.box
    clicks: dict[int, list[Point]] = defaultdict(list)
    for p in prompt.points + tuple(p for st in prompt.strokes for p in st.sample()):
        clicks[p.index[0]].append(p)
    edit = options.clicks == "edit"
    # in edit mode the box (if any) is applied first, alone; the clicks then edit the result
    seeds = ([key_slice(prompt)] if box is not None else []) if edit else prompt.slices()
    mask = np.zeros_like(base_mask)
    logits: dict[int, torch.Tensor] = {}

    def mask_prompt(z: int) -> torch.Tensor | None:
        if lasso_mask is not None and z == prompt.lasso.z:
            return refiner.probability_prompt(np.where(lasso_mask, 0.9, 0.1))
        if options.mask_prompt == "previous" and z in previous:
            return previous[z]
        if options.mask_prompt in ("base", "previous") and base_prob is not None:
            return refiner.probability_prompt(base_prob[z])
        return None

    def decide(z: int, out: SliceLogits) -> np.ndarray:
        logits[z] = out.low
        if prompt.automatic and options.fuse_base > 0 and base_prob is not None:
            return (1 - options.fuse_base) * sigmoid(out.full) + options.fuse_base * base_prob[z] > 0.5
        return out.full > 0

    def seed(z: int) -> None:
        pts = [] if edit else clicks.get(z, [])
        rect = None
        if box is not None and box.lo[0] <= z <= box.hi[0]:
            rect = click_box(box.in_plane(), pts, 0, (h, w)) if options.click_prompts == "box" else box.in_plane()
        elif options.derived_box:
            rect = slice_box(base_mask[z], pts, options, (h, w))
        if rect is None and (options.click_prompts == "box" or not any(p.positive for p in pts)):
            logits[z] = torch.full((1, 1, *refiner.mask_size), -20.0, device=refiner.device)
            return  # nothing left to segment (e.g. only negative clicks): empty
        points = pts if options.click_prompts == "points" else ()
        mask[z] = decide(z, refiner.decode(z, box=rect, points=points, mask_input=mask_prompt(z),
                                           multimask=options.multimask))

    def follow(z: int, src: int) -> bool:
        """Propagate from slice src to its neighbour z; False when the source mask is empty or the answer on
        z is less confident than ``options.stop_confidence`` (z then stays empty)."""
        if not mask[src].any():
            return False
        rect = enlarge(bounding_rectangle(mask[src]), options.margin, (h, w))
        out = refiner.decode(z, box=rect, mask_input=mask_prompt(z), multimask=options.multimask)
        mask[z] = decide(z, out)
        if options.stop_confidence > 0 and mask_confidence(out.full) < options.stop_confidence:
            mask[z] = False
            return False
        return True

    reusable = (edit and last is not None and last.box_pass is not None and last.box_pass[0] == box
                and options.mask_prompt != "previous")
    corrector = getattr(refiner, "corrector", None)
    by_corrector = (edit and not reusable and box is not None and box.lo[0] == box.hi[0] and lasso_mask is None
                    and options.corrector and options.corrector_boxes and corrector is not None and corrector.boxes)
    if reusable:
        _, kept, kept_covered, kept_logits = last.box_pass
        mask, seeds = kept.copy(), []
        logits.update(kept_logits)
    elif by_corrector:  # the corrector answers the box in 3D: it covers its slice and every slice it reached
        mask = corrector.box(refiner.normalized_volume, box.lo[0], box.in_plane(), options.corrector_mirroring)
        kept_covered, seeds = {box.lo[0], *(int(z) for z in np.flatnonzero(mask.any(axis=(1, 2))))}, []
    for z in seeds:
        seed(z)
    covered = set(kept_covered) if reusable or by_corrector else set(seeds)
    if seeds and (box is not None or options.propagate_clicks):
        for a, b in zip(seeds, seeds[1:]):
            for z in range(a + 1, b):
                covered.add(z)
                follow(z, z - 1)
        box_range = (box.lo[0], box.hi[0]) if box is not None and box.hi[0] > box.lo[0] else None
        for start, step in ((seeds[0], -1), (seeds[-1], 1)):
            z = start + step
            while 0 <= z < nz:
                if box_range is not None:
                    if not box_range[0] <= z <= box_range[1]:
                        break
                elif options.stop_at_base and not base_mask[z].any():
                    break
                if not follow(z, z - step):
                    break
                covered.add(z)
                z += step
    box_pass = (box, mask.copy(), sorted(covered), dict(logits)) if edit and box is not None else None
    if edit and clicks and options.corrector and corrector is not None:
        ordered = prompt.points + tuple(p for st in prompt.strokes for p in st.sample())
        mask, covered = _correct_in_3d(refiner, ordered, base_mask, mask, covered, options.corrector_mirroring)
    elif edit and clicks:
        mask, covered = _edit_with_clicks(refiner, clicks, base_mask, mask, covered, options, mask_prompt, logits)
    for st in prompt.strokes:  # scribbled voxels are what the person said they are
        if st.z not in covered:
            mask[st.z] = base_mask[st.z]
            covered.add(st.z)
        for z, y, x in st.voxels:
            mask[z, y, x] = st.positive
    return ObjectResult(mask, sorted(covered), logits, box_pass)


def _edit_with_clicks(refiner: SliceRefiner, clicks: Mapping[int, list[Point]], base_mask: np.ndarray,
                      mask: np.ndarray, covered: set[int], options: RefineOptions, mask_prompt,
                      logits: dict[int, torch.Tensor]) -> tuple[np.ndarray, set[int]]:
    """Edit mode: each click slice is decoded with all its clicks and a box around the current mask and
    the positive clicks; :func:`edit_slice` applies the result locally. With ``propagate_clicks`` an edit
    continues to neighbouring slices while it keeps adding (removing) voxels connected to the previous
    slice's change."""
    nz, h, w = base_mask.shape
    current = _current_mask(base_mask, mask, covered)
    covered = set(covered)

    def decode(z: int, pts: Sequence[Point]) -> np.ndarray | None:
        rect = slice_box(current[z], pts, options, (h, w))
        if rect is None:
            return None
        points = pts if options.click_prompts == "points" else ()
        out = refiner.decode(z, box=rect, points=points, mask_input=mask_prompt(z), multimask=options.multimask)
        logits[z] = out.low
        return out.full > 0

    for z in sorted(clicks):
        refined = decode(z, clicks[z])
        if refined is None:
            continue
        before = current[z].copy()
        current[z] = edit_slice(before, refined, clicks[z])
        covered.add(z)
        if not options.propagate_clicks:
            continue
        for step in (-1, 1):
            added, removed = current[z] & ~before, before & ~current[z]
            t = z + step
            while (added.any() or removed.any()) and 0 <= t < nz and t not in clicks:
                pts = []
                if added.any():
                    y, x = deepest_voxel(added)
                    if not current[t, y, x]:
                        pts.append(Point((t, y, x), True))
                if removed.any():
                    y, x = deepest_voxel(removed)
                    if current[t, y, x]:
                        pts.append(Point((t, y, x), False))
                if not pts:
                    break
                refined = decode(t, pts)
                if refined is None:
                    break
                old = current[t].copy()
                new = old | _touching(refined & ~old, added) if added.any() else old.copy()
                if removed.any():
                    new &= ~_touching(old & ~refined, removed)
                added, removed = new & ~old, old & ~new
                current[t] = new
                covered.add(t)
                t += step
    out = np.zeros_like(mask)
    idx = sorted(covered)
    out[idx] = current[idx]
    return out, covered


def _current_mask(base_mask: np.ndarray, mask: np.ndarray, covered: Iterable[int]) -> np.ndarray:
    """(Z, Y, X): the object's mask on the slices it covers, the prompt-free mask elsewhere (what clicks edit)."""
    return np.where(np.isin(np.arange(base_mask.shape[0]), sorted(covered))[:, None, None], mask, base_mask)


def _correct_in_3d(refiner: SliceRefiner, clicks: Sequence[Point], base_mask: np.ndarray, mask: np.ndarray,
                   covered: set[int], mirroring: bool = True) -> tuple[np.ndarray, set[int]]:
    """Edit mode with a 3D click corrector: the clicks, in the order given, each correct the current mask
    (the object's mask on the slices it covers, the prompt-free mask elsewhere) around themselves in 3D.
    The object then covers every slice the corrections changed. ``mirroring``: test-time mirroring where
    the corrector was trained for it."""
    current = _current_mask(base_mask, mask, covered)
    corrected = refiner.corrector.apply(refiner.normalized_volume, current, clicks, mirroring=mirroring)
    covered = set(covered) | {int(z) for z in np.flatnonzero((corrected != current).any(axis=(1, 2)))}
    out = np.zeros_like(mask)
    idx = sorted(covered)
    out[idx] = corrected[idx]
    return out, covered


def compose_label(base_mask: np.ndarray, results: Iterable[ObjectResult]) -> np.ndarray:
    """(Z, Y, X) label mask: the union of the objects' masks on slices they reached, the base elsewhere."""
    out = np.asarray(base_mask, dtype=bool).copy()
    results = list(results)
    covered = sorted({z for r in results for z in r.covered})
    out[covered] = False
    for r in results:
        out |= r.mask
    return out


def merge_label(segmentation: np.ndarray, label: int, mask: np.ndarray) -> np.ndarray:
    """Replace ``label`` in a multi-class (Z, Y, X) map by ``mask``: lost voxels become background (0),
    gained voxels are taken from whatever label had them. Returns a new array."""
    out = np.array(segmentation, copy=True)
    out[out == label] = 0
    out[np.asarray(mask, dtype=bool)] = label
    return out


def apply_prompts(refiner: SliceRefiner, image: np.ndarray, segmentation: np.ndarray,
                  probabilities: np.ndarray | None, prompts: Sequence[ObjectPrompt],
                  options: RefineOptions = RefineOptions()) -> np.ndarray:
    """Refine a prompt-free multi-class map with prompts (one shot, no history).

    image: (Z, Y, X) the channel the refiner sees; segmentation: (Z, Y, X) prompt-free labels;
    probabilities: (C, Z, Y, X) prompt-free softmax (channel = label value) or None. Labels are refined
    against the prompt-free map and merged in increasing label value. Returns the new (Z, Y, X) map.
    """
    refiner.set_volume(image)
    by_label: dict[int, list[ObjectPrompt]] = defaultdict(list)
    for p in prompts:
        by_label[p.label].append(p)
    out = np.array(segmentation, copy=True)
    for label in sorted(by_label):
        base = segmentation == label
        prob = probabilities[label] if probabilities is not None else None
        results = [refine_object(refiner, p, base, prob, options) for p in by_label[label]]
        out = merge_label(out, label, compose_label(base, results))
    return out


# ---------------------------------------------------------------------- a session driven click by click
@dataclass
class _LabelState:
    prompts: list[ObjectPrompt] = field(default_factory=list)
    results: list[ObjectResult] = field(default_factory=list)


class InteractiveSession:
    """Clicks and boxes on one case, one label at a time, with undo; the multi-class map is kept current.

    image: (Z, Y, X) the refiner's channel; segmentation: (Z, Y, X) prompt-free labels; probabilities:
    (C, Z, Y, X) or None; labels: {name: value} (foreground); spacing: (z, y, x) mm (volumes in ml);
    reference: (Z, Y, X) labels for Dice, or None. Only the prompted object is re-decoded after a change.
    """

    def __init__(self, refiner: SliceRefiner, image: np.ndarray, segmentation: np.ndarray,
                 probabilities: np.ndarray | None, labels: Mapping[str, int], *,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), reference: np.ndarray | None = None,
                 options: RefineOptions = RefineOptions()):
        self.refiner = refiner
        self.image = np.asarray(image)
        self.base = np.asarray(segmentation)
        if self.base.shape != self.image.shape:
            raise SamnnuError(f"segmentation {self.base.shape} and image {self.image.shape} differ in shape")
        if reference is not None and np.shape(reference) != self.image.shape:
            raise SamnnuError(f"reference {np.shape(reference)} and image {self.image.shape} differ in shape")
        self.probabilities = probabilities
        self.labels = dict(labels)
        self.names = {v: k for k, v in self.labels.items()}
        self.spacing = tuple(float(s) for s in spacing)
        self.reference = None if reference is None else np.asarray(reference)
        self.options = options
        self.state: dict[int, _LabelState] = {v: _LabelState() for v in self.labels.values()}
        self.history: list[tuple[int, _LabelState]] = []
        self.segmentation = self.base.copy()
        refiner.set_volume(self.image)

    # -------------------------------------------------------------- helpers
    def label_value(self, label: str | int) -> int:
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in self.labels:
                raise SamnnuError(f"no label named '{label}' (labels: "
                                  f"{', '.join(f'{k}={v}' for k, v in self.labels.items())})")
            return self.labels[label]
        value = int(label)
        if value not in self.names:
            raise SamnnuError(f"no label with value {value} (labels: "
                              f"{', '.join(f'{k}={v}' for k, v in self.labels.items())})")
        return value

    def _check_index(self, index: Sequence[int], what: str) -> tuple[int, int, int]:
        index = tuple(int(i) for i in index)
        if len(index) != 3 or not all(0 <= i < s for i, s in zip(index, self.image.shape)):
            raise SamnnuError(f"{what} at voxel (z, y, x) {list(index)} lies outside the image (size z, y, x = "
                              f"{', '.join(map(str, self.image.shape))})")
        return index

    def _base(self, label: int) -> tuple[np.ndarray, np.ndarray | None]:
        prob = self.probabilities[label] if self.probabilities is not None else None
        return self.base == label, prob

    def _snapshot(self, label: int) -> None:
        st = self.state[label]
        self.history.append((label, _LabelState(list(st.prompts), list(st.results))))

    def _update(self, label: int, i: int) -> None:
        """Re-decode object i of ``label`` and rebuild the label in the multi-class map."""
        st = self.state[label]
        base, prob = self._base(label)
        last = st.results[i] if i < len(st.results) else None
        result = refine_object(self.refiner, st.prompts[i], base, prob, self.options, last)
        st.results = st.results[:i] + [result] + st.results[i + 1:]
        self._rebuild()

    def _rebuild(self) -> None:
        seg = self.base.copy()
        for label in sorted(self.state):
            st = self.state[label]
            if st.prompts:
                seg = merge_label(seg, label, compose_label(self.base == label, st.results))
        self.segmentation = seg

    # -------------------------------------------------------------- actions
    def add_prompt(self, prompt: ObjectPrompt) -> None:
        """A new object for ``prompt.label`` (e.g. from a prompts file or automatic prompts)."""
        if prompt.label not in self.state:
            raise SamnnuError(f"{prompt.source or 'prompt'}: no label with value {prompt.label}")
        for p in prompt.points:
            self._check_index(p.index, "click")
        if prompt.box is not None:
            self._check_index(prompt.box.lo, "box corner")
            self._check_index(prompt.box.hi, "box corner")
        for st in prompt.strokes:
            for v in st.voxels:
                self._check_index(v, "scribble point")
        if prompt.lasso is not None:
            for y, x in prompt.lasso.outline:
                self._check_index((prompt.lasso.z, y, x), "lasso point")
        self._snapshot(prompt.label)
        st = self.state[prompt.label]
        st.prompts.append(prompt)
        self._update(prompt.label, len(st.prompts) - 1)

    def click(self, label: str | int, index: Sequence[int], positive: bool) -> None:
        """Add a click to the label's object nearest to it (a new object when the label has none)."""
        value = self.label_value(label)
        index = self._check_index(index, "click")
        st = self.state[value]
        point = Point(index, positive)
        if not st.prompts:
            self.add_prompt(ObjectPrompt(value, None, (point,), source="click"))
            return
        i = self._nearest_object(value, index)
        self._snapshot(value)
        st.prompts[i] = st.prompts[i].with_point(point)
        self._update(value, i)

    def box(self, label: str | int, lo: Sequence[int], hi: Sequence[int]) -> None:
        """A new object from a box between voxel corners lo and hi (z, y, x)."""
        value = self.label_value(label)
        a = np.asarray(self._check_index(lo, "box corner"))
        b = np.asarray(self._check_index(hi, "box corner"))
        box = Box(tuple(int(v) for v in np.minimum(a, b)), tuple(int(v) for v in np.maximum(a, b)))
        self.add_prompt(ObjectPrompt(value, box, (), source="box"))

    def scribble(self, label: str | int, voxels: Sequence[Sequence[int]], positive: bool = True) -> None:
        """A scribble through voxels (z, y, x) on one slice (joined by straight segments), added to the label's
        object nearest to its first voxel (a new object when the label has none). Positive: these voxels are
        the label; negative: they are not."""
        value = self.label_value(label)
        vertices = [self._check_index(v, "scribble point") for v in voxels]
        if not vertices:
            raise SamnnuError("scribble: give at least one point")
        if len({v[0] for v in vertices}) > 1:
            raise SamnnuError("scribble: every point must lie on one slice (one z)")
        path = [vertices[0]] + [v for a, b in zip(vertices, vertices[1:]) for v in line_voxels(a, b)[1:]]
        stroke = Stroke(tuple(path), positive)
        st = self.state[value]
        if not st.prompts:
            self.add_prompt(ObjectPrompt(value, strokes=(stroke,), source="scribble"))
            return
        i = self._nearest_object(value, vertices[0])
        self._snapshot(value)
        st.prompts[i] = replace(st.prompts[i], strokes=st.prompts[i].strokes + (stroke,))
        self._update(value, i)

    def lasso(self, label: str | int, z: int, outline: Sequence[Sequence[int]]) -> None:
        """A new object from a closed outline of (y, x) vertices around the label on slice z (at least 3)."""
        value = self.label_value(label)
        if len(outline) < 3:
            raise SamnnuError("lasso: give at least 3 outline points")
        vertices = [self._check_index((z, *v), "lasso point") for v in outline]
        self.add_prompt(ObjectPrompt(value, lasso=Lasso(int(z), tuple((v[1], v[2]) for v in vertices)),
                                     source="lasso"))

    def undo(self) -> bool:
        """Take back the last action; False when there is nothing to undo."""
        if not self.history:
            return False
        label, st = self.history.pop()
        self.state[label] = st
        self._rebuild()
        return True

    def _nearest_object(self, label: int, index: tuple[int, int, int]) -> int:
        st = self.state[label]
        if len(st.prompts) == 1:
            return 0
        best, best_d = 0, np.inf
        for i, r in enumerate(st.results):
            pts = np.argwhere(r.mask)
            if len(pts):
                d = float(np.min(np.sum((pts - np.asarray(index)) ** 2, axis=1)))
                if d < best_d:
                    best, best_d = i, d
        return best

    # -------------------------------------------------------------- reading the state
    def label_mask(self, label: str | int) -> np.ndarray:
        return self.segmentation == self.label_value(label)

    def volume_ml(self, label: str | int) -> float:
        return float(self.label_mask(label).sum()) * float(np.prod(self.spacing)) / 1000.0

    def dice(self, label: str | int) -> float | None:
        """Dice of the label against the reference (None without one; 1.0 when both are empty)."""
        if self.reference is None:
            return None
        value = self.label_value(label)
        return dice(self.segmentation == value, self.reference == value)

    def prompts(self) -> list[ObjectPrompt]:
        return [p for label in sorted(self.state) for p in self.state[label].prompts]

    def describe(self, label: str | int) -> str:
        """One status line: label, volume (ml), Dice against the reference, number of prompts."""
        value = self.label_value(label)
        n = len(self.state[value].prompts)
        clicks = sum(len(p.points) for p in self.state[value].prompts)
        text = f"{self.names[value]}: {self.volume_ml(value):.3f} ml"
        d = self.dice(value)
        if d is not None:
            text += f", Dice {d:.4f}"
        return text + f" ({n} object{'s' if n != 1 else ''}, {clicks} click{'s' if clicks != 1 else ''})"
