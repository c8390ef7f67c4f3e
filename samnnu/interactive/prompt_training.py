"""``samnnu_train_prompts``: the refiner's prompt path trained on the dataset, with simulated interactions.

The refiner (:mod:`samnnu.interactive.refiner`) is a promptable SAM applied to slices. Pretrained, its
prompt encoder and mask decoder know boxes well and clicks poorly, and they know nothing of the
dataset. Here both are fine-tuned on the slices of a fold's training cases (never its validation
cases), while the image encoder stays frozen, so that slice embeddings are computed once and cached
(:func:`samnnu.row_cache.cached_rows`).

Every training sample is one label on one slice, with an interaction simulated from the label as SAM
and SAM-Med2D train theirs: a first prompt, then ``rounds`` corrective clicks.

- First prompt, one of:
  - ``box``: the label's bounding box, each side moved by up to 10 % of the box's size;
  - ``base``: an imperfect mask standing in for the prompt-free prediction (the label eroded or dilated,
    shifted, with a piece cut out or a blob added, smoothed into probabilities). It is given as the mask
    prompt, with the box around it enlarged by one voxel, as the refiner decodes propagated and clicked
    slices;
  - ``point``: one positive click inside the label, alone;
  - ``neighbour``: a propagation step. The box of the label on the neighbouring slice, enlarged by one
    voxel, as the refiner passes a mask on to the next slice. The label may have ended on this slice, and
    then the right answer is nothing: the training slices include where each label begins and ends
    along z and the slices just beyond, so that propagation learns where to stop.
- Each further round clicks on the largest connected error of the last answer: positive on a missed
  region, negative on a spurious one, at its deepest voxel or at a random voxel of it. The next decode
  gets every click so far and the box around the last answer and the positive clicks. Its mask prompt
  is the ``base`` probabilities when there are some (the refiner's default, ``mask_prompt="base"``), else
  the last answer's logits (SAM's way).

The loss of each decode is binary cross-entropy plus soft Dice on the slice's own grid, averaged over
the rounds. AdamW with a cosine decay. The run resumes from ``refiner.partial.pth``, written every
``save_every`` steps.

The result, ``fold_F/refiner.pth`` beside the fold's checkpoints, holds the prompt encoder's and mask
decoder's weights and a record (:data:`samnnu.defaults.PROMPT_PATH_RECORD`). ``samnnu_predict --prompts`` and ``samnnu_refine`` load
it (weights only) when the model folder has one, and say which refiner they used.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from samnnu.config import current_paths
from samnnu.datasets import dataset_name
from samnnu.defaults import PROMPT_PATH_FILE, PROMPT_PATH_RECORD
from samnnu.errors import SamnnuError
from samnnu.interactive.auto_prompts import bounding_rectangle
from samnnu.interactive.prompts import Point
from samnnu.interactive.refiner import (
    RefineOptions,
    SliceRefiner,
    decode_prompts,
    enlarge,
    load_prompt_path,
    low_to_slice,
    probability_logits,
    slice_box,
)
from samnnu.interactive.simulated_user import noisy_click
from samnnu.row_cache import cached_rows
from samnnu.safe_io import check_torch_archive, load_torch_safely, read_json, write_atomic
from samnnu.trainers.schedules import set_cosine_lr

FIRST_PROMPTS = ("box", "base", "point", "neighbour")
# corrected slices are decoded as the refiner decodes them: clicks as SAM points, box around mask and clicks
_POINT_PROMPTS = RefineOptions(click_prompts="points")


@dataclass
class PromptTrainingSettings:
    """What a prompt-training run is; a partial run resumes only under the same settings."""

    dataset: str
    fold: str
    encoder: str
    steps: int
    batch_size: int
    rounds: int
    lr: float
    slices_per_case: int
    seed: int
    first_prompts: tuple = (0.3, 0.3, 0.15, 0.25)  # probabilities of box, base, point, neighbour


# ------------------------------------------------------------------------------------------- slices

def training_slices(labels: dict[str, np.ndarray], per_case: int) -> list[tuple[str, int]]:
    """(case, z) of up to ``per_case`` slices of each case holding a label, evenly spread over them, and
    the slices where each label begins and ends along z with their outer neighbours (where propagation
    has to stop).

    labels: {case: (Z, Y, X) integer label map}; slices are taken along z, as the refiner decodes them.
    """
    out = []
    for case in sorted(labels):
        lab = labels[case]
        zs = np.flatnonzero(lab.reshape(lab.shape[0], -1).max(axis=1) > 0)
        if len(zs) == 0:
            continue
        picks = np.unique(np.round(np.linspace(0, len(zs) - 1, min(per_case, len(zs)) + 2)[1:-1]).astype(int)) \
            if len(zs) > per_case else np.arange(len(zs))
        chosen = {int(zs[i]) for i in picks}
        for value in np.unique(lab[lab > 0]):
            present = np.flatnonzero((lab == value).reshape(lab.shape[0], -1).any(axis=1))
            for z in (present[0] - 1, present[0], present[-1], present[-1] + 1):
                if 0 <= z < lab.shape[0]:
                    chosen.add(int(z))
        out += [(case, z) for z in sorted(chosen)]
    return out


def training_samples(labels: dict[str, np.ndarray], rows: list[tuple[str, int]], min_voxels: int = 3
                     ) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """The samples of a set of rows: (row, label) for every label on the row's slice (at least
    ``min_voxels``), and the propagation steps (row, label, source z): a neighbouring slice holds the label
    (at least ``min_voxels``), whatever this slice holds of it, possibly nothing."""
    on_slice, steps = [], []
    for i, (case, z) in enumerate(rows):
        lab = labels[case]
        for v in np.unique(lab[z]):
            if v > 0 and (lab[z] == v).sum() >= min_voxels:
                on_slice.append((i, int(v)))
        for src in (z - 1, z + 1):
            if 0 <= src < lab.shape[0]:
                for v in np.unique(lab[src]):
                    if v > 0 and (lab[src] == v).sum() >= min_voxels:
                        steps.append((i, int(v), src))
    return on_slice, steps


# ------------------------------------------------------------------------------------ interactions

def jittered_box(target: np.ndarray, rng: np.random.Generator, fraction: float = 0.1) -> tuple[int, int, int, int]:
    """The bounding rectangle (y0, x0, y1, x1) of a non-empty (Y, X) mask, each side moved by up to
    ``fraction`` of the box's size (at least one voxel), clipped to the slice."""
    y0, x0, y1, x1 = bounding_rectangle(target)
    h, w = target.shape
    dy, dx = max(1, round((y1 - y0 + 1) * fraction)), max(1, round((x1 - x0 + 1) * fraction))
    jy0, jy1 = rng.integers(-dy, dy + 1, size=2)
    jx0, jx1 = rng.integers(-dx, dx + 1, size=2)
    y0, y1 = sorted((int(np.clip(y0 + jy0, 0, h - 1)), int(np.clip(y1 + jy1, 0, h - 1))))
    x0, x1 = sorted((int(np.clip(x0 + jx0, 0, w - 1)), int(np.clip(x1 + jx1, 0, w - 1))))
    return y0, x0, y1, x1


def imperfect_mask(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A (Y, X) bool mask with the kinds of error a prompt-free prediction makes: the target eroded or
    dilated by 1-2 voxels, shifted by up to one voxel, a disc cut out of it or a blob added at its edge."""
    m = np.asarray(target, dtype=bool).copy()
    r = int(rng.integers(1, 3))
    u = rng.random()
    if u < 0.35:
        eroded = ndimage.binary_erosion(m, iterations=r)
        m = eroded if eroded.any() else m
    elif u < 0.7:
        m = ndimage.binary_dilation(m, iterations=r)
    m = np.roll(m, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    yy, xx = np.indices(m.shape)
    if rng.random() < 0.5 and m.any():  # a missed piece
        cy, cx = np.argwhere(m)[rng.integers(m.sum())]
        m &= (yy - cy) ** 2 + (xx - cx) ** 2 > int(rng.integers(2, 6)) ** 2
    if rng.random() < 0.3:  # a spurious blob at the edge
        edge = ndimage.binary_dilation(target, iterations=2) & ~target
        if edge.any():
            cy, cx = np.argwhere(edge)[rng.integers(edge.sum())]
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(1, 4)) ** 2
    return m


def corrective_click(pred: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                     deepest: float = 0.5) -> Point | None:
    """A click on the largest connected error of a (Y, X) answer (positive on missed voxels, negative on
    spurious ones): at its deepest voxel with probability ``deepest``, else at a random voxel of it. None
    when the answer is exact. The click's z is 0."""
    click = noisy_click(pred, target, rng, deepest)
    return None if click is None else Point((0, *click.index), click.positive)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice of logits against a {0, 1} float target of the same shape (one
    sample: (Y, X), or (1, Z, Y, X) for the click corrector)."""
    prob = torch.sigmoid(logits)
    soft_dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + 1 - soft_dice


def simulate_interaction(parts, embedding: torch.Tensor, target: np.ndarray, rng: np.random.Generator, *,
                         rounds: int, first: str, source: np.ndarray | None = None) -> tuple[torch.Tensor, list[float]]:
    """One simulated interaction on one slice; returns (mean loss over the decodes, Dice after each decode;
    1 when the target and the answer are both empty).

    embedding: (1, D, g, g) of the slice; target: (Y, X) bool; first: ``box``, ``base``, ``point`` (target
    non-empty) or ``neighbour``: the box of ``source`` (the label on the neighbouring slice, non-empty)
    enlarged by one voxel, as the refiner propagates a mask to the next slice; the target may be empty
    there, and the answer should then be empty too (the module docstring says what the others are).
    """
    shape = target.shape
    t = torch.from_numpy(target.astype(np.float32))
    box, clicks, mask_input, base = None, [], None, None
    if first == "box":
        box = jittered_box(target, rng)
    elif first == "neighbour":
        box = enlarge(bounding_rectangle(source), 1, shape)
    elif first == "base":
        rough = imperfect_mask(target, rng)
        prob = ndimage.gaussian_filter(rough.astype(np.float32), sigma=1.0)
        base = probability_logits(prob, parts.prompt_encoder.mask_input_size[0])
        mask_input = base
        box = enlarge(bounding_rectangle(rough), 1, shape) if rough.any() else jittered_box(target, rng)
    else:
        inside = np.argwhere(ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1] >= 1)
        y, x = inside[rng.integers(len(inside))]
        clicks = [Point((0, int(y), int(x)), True)]
    losses, dices = [], []
    for r in range(rounds + 1):
        low = decode_prompts(parts, embedding, shape, box=box, points=clicks, mask_input=mask_input)
        full = low_to_slice(low, shape)[0, 0]
        losses.append(segmentation_loss(full, t))
        pred = (full.detach() > 0).numpy()
        inter, total = float((pred & target).sum()), float(pred.sum() + target.sum())
        dices.append(2 * inter / total if total else 1.0)
        if r == rounds:
            break
        click = corrective_click(pred, target, rng)
        if click is None:
            break
        clicks = clicks + [click]
        if first != "point":
            box = slice_box(pred, clicks, _POINT_PROMPTS, shape)
        mask_input = base if base is not None else low.detach()
    return torch.stack(losses).mean(), dices


# ---------------------------------------------------------------------------------------- training

def fold_cases(name: str, fold: str) -> list[str]:
    splits = read_json(current_paths().preprocessed / name / "splits_final.json",
                       "splits_final.json (train a fold first, or plan)")
    if fold == "all":
        return sorted({c for s in splits for c in s["train"] + s["val"]})
    if not 0 <= int(fold) < len(splits):
        raise SamnnuError(f"{name}: splits_final.json has no fold {fold}")
    return sorted(splits[int(fold)]["train"])


def train_prompts(dataset: str | int, fold: int | str, *, trainer: str | None = None,
                  configuration: str | None = None, plans: str | None = None, encoder: str = "litemedsam",
                  steps: int = 600, batch_size: int = 8, rounds: int = 3, lr: float = 1e-4,
                  slices_per_case: int = 4, seed: int = 0, save_every: int = 100, progress: bool = True,
                  output: str | Path | None = None) -> dict:
    """Train the refiner's prompt path on fold ``fold``'s training cases; write ``fold_F/refiner.pth``.

    The model folder (``trainer``, ``configuration``, ``plans``; defaults as ``samnnu_predict``) is where
    prediction looks for it; the fold must have been trained. ``output`` overrides the file written.
    Returns the record stored in the file.
    """
    from samnnu.pipeline.prediction import read_image, trained_model_folder  # local: pulls in nnU-Net

    if steps < 1 or batch_size < 1 or rounds < 0 or slices_per_case < 1 or not lr > 0:
        raise SamnnuError("--steps, --batch-size and --slices-per-case must be at least 1, --rounds at least 0 "
                          "and --lr positive")
    name = dataset_name(dataset)
    fold = str(fold)
    if output is None:
        fold_dir = trained_model_folder(name, trainer, configuration, plans) / f"fold_{fold}"
        if not fold_dir.is_dir():
            raise SamnnuError(f"{fold_dir}: no such trained fold; run samnnu_train {dataset} {fold} first "
                              f"(or give --output)")
        output = fold_dir / PROMPT_PATH_FILE
    output = Path(output)
    if output.suffix != ".pth":
        raise SamnnuError(f"{output}: the prompt path file must end in .pth")
    raw = current_paths().raw / name
    ending = read_json(raw / "dataset.json", "dataset.json")["file_ending"]
    cases = fold_cases(name, fold)
    labels = {}
    for case in cases:
        file = raw / "labelsTr" / f"{case}{ending}"
        if not file.is_file():
            raise SamnnuError(f"{file}: label file missing")
        labels[case] = read_image(file)[0].astype(np.int16)
    rows = training_slices(labels, slices_per_case)
    pairs, steps_between = training_samples(labels, rows)
    if not pairs:
        raise SamnnuError(f"{name}: fold {fold}'s training cases hold no labelled slice to train prompts on")
    settings = PromptTrainingSettings(name, fold, encoder, steps, batch_size, rounds, lr, slices_per_case, seed)

    refiner = SliceRefiner.create(encoder)
    parts = refiner.parts

    loaded = [None]  # the case whose image the refiner holds (rows are grouped by case)

    def compute(chunk: range) -> dict:
        out = []
        for i in chunk:
            case, z = rows[i]
            if loaded[0] != case:
                refiner.set_volume(read_image(raw / "imagesTr" / f"{case}_0000{ending}")[0])
                loaded[0] = case
            out.append(refiner.embedding(z)[0].numpy())
            refiner.embeddings = {}
        return {"embeddings": np.stack(out)}

    with torch.no_grad():
        probe = parts.image_encoder(torch.zeros(1, 3, parts.input_size, parts.input_size))
    stem = output.with_suffix("")
    key = {"dataset": name, "encoder": encoder, "rows": [[c, z] for c, z in rows]}
    cache = cached_rows({"embeddings": (stem.with_name(stem.name + ".embeddings.npy"), tuple(probe.shape[1:]))},
                        stem.with_name(stem.name + ".embeddings.json"), key, len(rows), compute, chunk=8,
                        desc="slice embeddings (cached once)", progress=progress)["embeddings"]

    for p in parts.image_encoder.parameters():
        p.requires_grad_(False)
    modules = (parts.prompt_encoder, parts.mask_decoder)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    partial = stem.with_name(stem.name + ".partial.pth")
    start, history = 0, []
    torch.manual_seed(seed)
    if partial.is_file():
        state = load_torch_safely(partial)
        if json.loads(state["settings"]) != json.loads(json.dumps(asdict(settings))):
            raise SamnnuError(f"{partial}: an unfinished run with other settings; give the same settings to resume, "
                              f"or delete it")
        for m in modules:
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                               if k.split(".", 1)[0] == type(m).__name__})
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), json.loads(state["history"])
    for m in modules:
        m.train()
    rng = np.random.default_rng(seed + start)
    bar = tqdm(total=steps, initial=start, desc="training the prompt path", unit="step", dynamic_ncols=True,
               disable=not progress)
    began = time.perf_counter()
    recent: list[tuple[float, float, float]] = []
    for step in range(start, steps):
        set_cosine_lr(optimizer, lr, step, steps)  # cosine decay to 5 % of lr
        optimizer.zero_grad(set_to_none=True)
        for _ in range(batch_size):
            first = FIRST_PROMPTS[int(rng.choice(len(FIRST_PROMPTS), p=settings.first_prompts))]
            source = None
            if first == "neighbour" and steps_between:
                row, value, src = steps_between[rng.integers(len(steps_between))]
                source = labels[rows[row][0]][src] == value
            else:
                first = "box" if first == "neighbour" else first
                row, value = pairs[rng.integers(len(pairs))]
            case, z = rows[row]
            target = labels[case][z] == value
            emb = torch.from_numpy(np.asarray(cache[row], dtype=np.float32))[None]
            loss, dices = simulate_interaction(parts, emb, target, rng, rounds=rounds, first=first, source=source)
            (loss / batch_size).backward()
            recent.append((float(loss.detach()), dices[0], dices[-1]))
        optimizer.step()
        bar.update(1)
        if (step + 1) % 20 == 0 or step + 1 == steps:
            loss_m, first_m, last_m = (float(np.mean(v)) for v in zip(*recent))
            history.append({"step": step + 1, "loss": round(loss_m, 4), "dice_first": round(first_m, 4),
                            "dice_last": round(last_m, 4)})
            bar.set_postfix(loss=f"{loss_m:.3f}", dice=f"{first_m:.2f}->{last_m:.2f}")
            recent = []
        if (step + 1) % save_every == 0 and step + 1 < steps:
            state = {f"{type(m).__name__}.{k}": v for m in modules for k, v in m.state_dict().items()}
            state.update(optimizer=optimizer.state_dict(), step=step + 1, settings=json.dumps(asdict(settings)),
                         history=json.dumps(history))
            write_atomic(partial, lambda tmp, st=state: torch.save(st, tmp), check_torch_archive)
    bar.close()
    record = {**asdict(settings), "cases": len(cases), "slices": len(rows), "samples": len(pairs),
              "propagation_samples": len(steps_between),
              "input_size": parts.input_size, "history": history,
              "seconds_this_run": round(time.perf_counter() - began, 1)}
    checkpoint = {f"{module}.{k}": v for module in ("prompt_encoder", "mask_decoder")
                  for k, v in getattr(parts, module).state_dict().items()}
    checkpoint[PROMPT_PATH_RECORD] = json.dumps(record)
    write_atomic(output, lambda tmp: torch.save(checkpoint, tmp), check_torch_archive)
    load_prompt_path(output, SliceRefiner.create(encoder).parts, encoder)  # the file must load as prediction loads it
    partial.unlink(missing_ok=True)
    for f in (stem.with_name(stem.name + ".embeddings.npy"), stem.with_name(stem.name + ".embeddings.json")):
        f.unlink(missing_ok=True)
    record = dict(record, file=str(output))
    if output.name == PROMPT_PATH_FILE and (output.parent / "evaluation.json").is_file():
        from samnnu.reporting.report import render_fold_report  # local: pulls in matplotlib

        record["report"] = str(render_fold_report(output.parent))  # the fold report says it has one now
    return record
