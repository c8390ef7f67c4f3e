"""Training the 3D click corrector (:mod:`samnnu.interactive.click_corrector`) on a fold's cases.

``samnnu_train_prompts --corrector`` calls :func:`train_click_corrector`: the fold's model predicts its
training cases, then :func:`train_corrector` trains the network with simulated clicks, starting from those
predictions or from imperfect copies of the labels (:func:`imperfect_volume`), and writes
``fold_F/click_corrector.pth``. What the corrector is and how it is trained: the docstring of
:mod:`samnnu.interactive.click_corrector` and docs/interactive.md.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from samnnu.defaults import CLICK_CORRECTOR_FILE, CLICK_CORRECTOR_RECORD
from samnnu.errors import SamnnuError
from samnnu.evaluation.metrics import dice
from samnnu.interactive.auto_prompts import bounding_rectangle
from samnnu.interactive.click_corrector import (
    CROP,
    FEATURES,
    ball,
    box_center,
    box_input,
    box_window_shifts,
    build_network,
    corrector_input,
    load_corrector,
    normalize_image,
    padded,
)
from samnnu.interactive.prompt_training import fold_cases, segmentation_loss
from samnnu.interactive.prompts import Point
from samnnu.interactive.simulated_user import noisy_click
from samnnu.modeling.common import PRECISIONS, cpu_computes_bf16
from samnnu.safe_io import check_torch_archive, load_torch_safely, write_atomic
from samnnu.trainers.schedules import set_cosine_lr


def imperfect_volume(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A (Z, Y, X) bool mask with the kinds of error a prompt-free prediction makes, in 3D: the target
    eroded or dilated by a voxel, on one side or all round; its first or last slices missing or one more
    slice added past an end; a ball of it cut out at its surface; a ball added beside it; shifted by a
    voxel. Each kind is drawn independently, at least one applies."""
    t = np.asarray(target, dtype=bool)
    m = t.copy()
    zs = np.flatnonzero(t.any(axis=(1, 2)))
    applied = False
    while not applied:
        if rng.random() < 0.5:  # too thin or too thick, all round or on one side of an axis
            grown = ndimage.binary_dilation(m) if rng.random() < 0.5 else ndimage.binary_erosion(m)
            if rng.random() < 0.5:
                axis, side = int(rng.integers(1, 3)), rng.random() < 0.5
                centre = int(np.argwhere(m)[:, axis].mean()) if m.any() else 0
                index = np.arange(m.shape[axis])
                half = (index >= centre) if side else (index < centre)
                shape = [1, 1, 1]
                shape[axis] = -1
                half = half.reshape(shape)
                grown = np.where(half, grown, m)
            m, applied = grown, True
        if len(zs) > 3 and rng.random() < 0.4:  # the structure's ends
            k = int(rng.integers(1, 4))
            if rng.random() < 0.6:
                m[zs[:k] if rng.random() < 0.5 else zs[-k:]] = False
            else:
                end = zs[0] - 1 if rng.random() < 0.5 else zs[-1] + 1
                if 0 <= end < m.shape[0]:
                    m[end] = ndimage.binary_erosion(t[zs[0] if end < zs[0] else zs[-1]])
            applied = True
        if m.any() and rng.random() < 0.5:  # a piece missed at the surface
            surface = m & ~ndimage.binary_erosion(m)
            c = np.argwhere(surface)[rng.integers(surface.sum())]
            m &= ~ball(m.shape, c, float(rng.uniform(2, 6)))
            applied = True
        if rng.random() < 0.4:  # a spurious piece beside it
            edge = ndimage.binary_dilation(t, iterations=3) & ~t
            if edge.any():
                c = np.argwhere(edge)[rng.integers(edge.sum())]
                m |= ball(m.shape, c, float(rng.uniform(1.5, 4))) & ndimage.binary_dilation(t, iterations=4)
                applied = True
        if rng.random() < 0.3:
            m = np.roll(m, int(rng.choice([-1, 1])), axis=int(rng.integers(0, 3)))
            applied = True
    return m


def training_box(target: np.ndarray, rng: np.random.Generator) -> tuple[int, tuple[int, int, int, int]]:
    """A box a person might draw around a non-empty (Z, Y, X) label: (z, (y0, x0, y1, x1) inclusive) on a
    slice drawn among those holding at least half the label's largest slice area, the label's tight
    rectangle there with each side loosened by 0 or 1 voxel (within the slice)."""
    areas = np.asarray(target, dtype=bool).sum(axis=(1, 2))
    z = int(rng.choice(np.flatnonzero(areas >= 0.5 * areas.max())))
    y0, x0, y1, x1 = bounding_rectangle(target[z])
    g = rng.integers(0, 2, size=4)
    h, w = target.shape[1:]
    return z, (max(0, y0 - int(g[0])), max(0, x0 - int(g[1])), min(h - 1, y1 + int(g[2])), min(w - 1, x1 + int(g[3])))


#: share of training clicks at the error's deepest voxel (the rest at a random voxel of it)
DEEPEST = 0.6


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The prompt path's loss (binary cross-entropy plus soft Dice) per sample of (N, 1, *crop) logits,
    averaged over the batch."""
    return torch.stack([segmentation_loss(a, b) for a, b in zip(logits, target)]).mean()


@dataclass
class CorrectorSettings:
    dataset: str
    fold: str
    steps: int
    batch_size: int
    rounds: int
    lr: float
    seed: int
    crop: tuple = CROP
    features: tuple = FEATURES
    #: share of samples that start from the model's own prediction (when predictions are given)
    predicted_share: float = 0.5
    #: "bf16": forward passes under bfloat16 autocast (weights and optimizer stay float32); "fp32"
    precision: str = "fp32"
    #: a trained corrector file whose weights the network starts from (None: random weights)
    init: str | None = None
    #: mirror each crop along randomly chosen axes (each with probability 1/2); the corrector then answers
    #: with test-time mirroring (:func:`samnnu.interactive.click_corrector.mirrored_probabilities`). Off by
    #: default: on the hippocampus it did not beat the unmirrored corrector (docs/benchmarks.md)
    mirror: bool = False
    #: share of the samples that start from a box on one slice and nothing else (:func:`training_box`); the
    #: corrector then answers boxes too (:meth:`samnnu.interactive.click_corrector.ClickCorrector.box`)
    box_share: float = 0.0


def default_precision() -> str:
    """"bf16" where this CPU computes bfloat16 natively (AVX512-BF16 or AMX: the corrector's forward and
    backward passes ran 1.9x faster on such a CPU, docs/benchmarks.md), else "fp32"."""
    return "bf16" if cpu_computes_bf16() else "fp32"


def starting_weights(path: str | Path, features: Sequence[int]) -> dict[str, torch.Tensor]:
    """The weights of the trained corrector ``path`` (loaded without running code), for a network of
    ``features``; a one-line SamnnuError when the file is no corrector or its features differ."""
    trained = load_corrector(path)
    if list(trained.record.get("features", FEATURES)) != list(features):
        raise SamnnuError(f"{path}: its features {trained.record.get('features', list(FEATURES))} differ from the "
                          f"ones asked for, {list(features)}")
    return trained.network.state_dict()


def train_corrector(images: dict[str, np.ndarray], labels: dict[str, np.ndarray], settings: CorrectorSettings,
                    output: str | Path, *, predictions: dict[str, np.ndarray] | None = None, save_every: int = 100,
                    progress: bool = True) -> dict:
    """Train a corrector on ``images`` and ``labels`` ({case: (Z, Y, X)}, images raw, labels integer maps)
    and write it to ``output``; resumes from ``OUTPUT.partial.pth``. Returns the record stored in the file.

    predictions: {case: (Z, Y, X) labels} the segmentation model's predictions of some of the cases; a
    share ``settings.predicted_share`` of the samples then starts from them (where they are not exact)
    instead of from :func:`imperfect_volume`. A share ``settings.box_share`` of the samples starts from a
    box on one slice instead (:func:`training_box`; the shares above then apply to the rest)."""
    predictions = predictions or {}
    output = Path(output)
    samples = [(c, int(v)) for c in sorted(labels) for v in np.unique(labels[c]) if v > 0]
    if not samples:
        raise SamnnuError(f"{settings.dataset}: fold {settings.fold}'s training cases hold no label to train on")
    normalized = {c: normalize_image(images[c]) for c in sorted(labels)}
    torch.manual_seed(settings.seed)
    network = build_network(settings.features)
    if settings.init:
        network.load_state_dict(starting_weights(settings.init, settings.features))
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=0.01)
    partial = output.with_name(output.stem + ".partial.pth")
    start, history = 0, []
    settings_json = json.dumps(asdict(settings))
    if partial.is_file():
        state = load_torch_safely(partial)
        if json.loads(state["settings"]) != json.loads(settings_json):
            raise SamnnuError(f"{partial}: an unfinished run with other settings; give the same settings to resume, "
                              f"or delete it")
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), json.loads(state["history"])
    network.train()
    rng = np.random.default_rng(settings.seed + start)
    bar = tqdm(total=settings.steps, initial=start, desc="training the click corrector", unit="step",
               dynamic_ncols=True, disable=not progress)
    began = time.perf_counter()
    recent: list[tuple[float, float, float]] = []
    for step in range(start, settings.steps):
        set_cosine_lr(optimizer, settings.lr, step, settings.steps)  # cosine decay to 5 % of lr
        optimizer.zero_grad(set_to_none=True)
        batch = [samples[i] for i in rng.integers(len(samples), size=settings.batch_size)]
        targets = [labels[c] == v for c, v in batch]
        current, boxes = [], []
        for (c, v), t in zip(batch, targets):
            # no draw when no sample starts from a box, so such a run draws what it did before boxes existed
            boxes.append(training_box(t, rng) if settings.box_share > 0 and rng.random() < settings.box_share
                         else None)
            if boxes[-1] is not None:
                current.append(np.zeros_like(t))
                continue
            start_mask = predictions[c] == v if c in predictions and rng.random() < settings.predicted_share else None
            current.append(start_mask if start_mask is not None and (start_mask != t).any()
                           else imperfect_volume(t, rng))
        clicks: list[list[Point]] = [[] for _ in batch]
        first_dice = [dice(m, t) for m, t in zip(current, targets)]
        losses = []
        for r in range(settings.rounds):
            live = []
            for i, (m, t) in enumerate(zip(current, targets)):
                if r == 0 and boxes[i] is not None:  # the first round of a box start answers the box
                    live.append(i)
                    continue
                p = noisy_click(m, t, rng, DEEPEST)
                if p is not None:
                    clicks[i].append(p)
                    live.append(i)
            if not live:
                break
            inputs, windows, want, flips = [], [], [], []
            for i in live:
                if r == 0 and boxes[i] is not None:
                    z, rect = boxes[i]
                    shift = [int(rng.integers(-k, k + 1)) for k in box_window_shifts(settings.crop)]
                    x, window = box_input(normalized[batch[i][0]], z, rect,
                                          [a + b for a, b in zip(box_center(z, rect), shift)], settings.crop)
                else:
                    x, window = corrector_input(normalized[batch[i][0]], current[i], clicks[i], settings.crop)
                y = padded(targets[i][window].astype(np.float32), settings.crop)[None]
                axes = tuple(a for a in range(3) if settings.mirror and rng.random() < 0.5)  # spatial axes mirrored
                channel_axes = tuple(a + 1 for a in axes)
                inputs.append(np.flip(x, channel_axes))  # views: np.stack below copies
                want.append(np.flip(y, channel_axes))
                windows.append(window)
                flips.append(axes)
            logits = corrector_logits(network, torch.from_numpy(np.stack(inputs)), settings.precision)
            loss = _loss(logits, torch.from_numpy(np.stack(want)))
            (loss / settings.rounds).backward()
            losses.append(float(loss.detach()))
            answers = [np.flip(a, axes) for a, axes in zip((logits.detach() > 0).numpy()[:, 0], flips)]
            for i, window, a in zip(live, windows, answers):
                current[i] = current[i].copy()
                current[i][window] = a[tuple(slice(0, w.stop - w.start) for w in window)]
        optimizer.step()
        bar.update(1)
        recent.append((float(np.mean(losses)) if losses else 0.0, float(np.mean(first_dice)),
                       float(np.mean([dice(m, t) for m, t in zip(current, targets)]))))
        if (step + 1) % 20 == 0 or step + 1 == settings.steps:
            loss_m, before, after = (float(np.mean(v)) for v in zip(*recent))
            history.append({"step": step + 1, "loss": round(loss_m, 4), "dice_before": round(before, 4),
                            "dice_after": round(after, 4)})
            bar.set_postfix(loss=f"{loss_m:.3f}", dice=f"{before:.2f}->{after:.2f}")
            recent = []
        if (step + 1) % save_every == 0 and step + 1 < settings.steps:
            state = {"network": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                     "settings": settings_json, "history": json.dumps(history)}
            write_atomic(partial, lambda tmp, st=state: torch.save(st, tmp), check_torch_archive)
    bar.close()
    record = {**json.loads(settings_json), "cases": len(labels), "samples": len(samples),
              "predicted_cases": len(set(predictions) & set(labels)), "history": history,
              "seconds_this_run": round(time.perf_counter() - began, 1)}
    checkpoint = dict(network.state_dict())
    checkpoint[CLICK_CORRECTOR_RECORD] = json.dumps(record)
    write_atomic(output, lambda tmp: torch.save(checkpoint, tmp), check_torch_archive)
    load_corrector(output)  # the file must load as prediction loads it
    partial.unlink(missing_ok=True)
    return dict(record, file=str(output))


def fold_volumes(name: str, fold: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[Path]]]:
    """The raw images and labels of fold ``fold``'s training cases of dataset ``name``: ({case: (Z, Y, X)
    image}, {case: (Z, Y, X) int16 labels}, {case: [image file]}); a one-line SamnnuError for a missing file."""
    # local: pull in nnU-Net
    from samnnu.config import current_paths
    from samnnu.pipeline.prediction import read_image
    from samnnu.safe_io import read_json

    raw = current_paths().raw / name
    ending = read_json(raw / "dataset.json", "dataset.json")["file_ending"]
    images, labels, files = {}, {}, {}
    for case in fold_cases(name, fold):
        label_file, image_file = raw / "labelsTr" / f"{case}{ending}", raw / "imagesTr" / f"{case}_0000{ending}"
        for f in (label_file, image_file):
            if not f.is_file():
                raise SamnnuError(f"{f}: file missing")
        labels[case] = read_image(label_file)[0].astype(np.int16)
        images[case] = read_image(image_file)[0]
        files[case] = [image_file]
    return images, labels, files


def corrector_logits(network: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """(N, 4, *crop) inputs -> (N, 1, *crop) float32 logits, the forward pass under bfloat16 autocast when
    ``precision`` is "bf16" (weights stay float32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return network(x).float()


def train_click_corrector(dataset: str | int, fold: int | str, *, trainer: str | None = None,
                          configuration: str | None = None, plans: str | None = None, steps: int = 2000,
                          batch_size: int = 4, rounds: int = 5, lr: float = 1e-3, seed: int = 0,
                          predicted_share: float = 0.5, box_share: float = 0.3, features: tuple[int, ...] = FEATURES,
                          precision: str | None = None, init: str | Path | None = None, mirror: bool = False,
                          output: str | Path | None = None,
                          progress: bool = True) -> dict:
    """Train the 3D click corrector on fold ``fold``'s training cases; write ``fold_F/click_corrector.pth``.

    The model folder (``trainer``, ``configuration``, ``plans``; defaults as ``samnnu_predict``) is where
    prediction looks for it; the fold must have been trained. Its model predicts the training cases first
    (no mirroring; kept in ``OUTPUT.predictions.npz`` until the corrector is written, so a resumed run
    does not predict again), and a share ``predicted_share`` of the samples starts from those predictions.
    ``features``: the U-Net's features per stage. ``precision``: "bf16" or "fp32" for the forward passes
    (default :func:`default_precision`). ``init``: a trained corrector file to start from instead of random
    weights (its features must match; the file's path is recorded as ``init``). ``mirror``: train on crops
    mirrored along random axes, and answer with test-time mirroring. ``box_share``: the share of samples
    that start from a box on one slice (:func:`training_box`), so the corrector answers boxes too (0: clicks
    only; 0.3 measured as good as 0 for clicks on the hippocampus, docs/benchmarks.md). ``output`` overrides the
    file written. Returns the record stored in the file.
    """
    # local: pull in nnU-Net
    from samnnu.datasets import dataset_name
    from samnnu.pipeline.prediction import trained_model_folder

    if (steps < 1 or batch_size < 1 or rounds < 1 or not lr > 0 or not 0 <= predicted_share <= 1
            or not 0 <= box_share <= 1):
        raise SamnnuError("--steps, --batch-size and --rounds must be at least 1, --lr positive and the predicted "
                          "and box shares within [0, 1]")
    if len(features) < 2 or any(int(f) < 1 for f in features):
        raise SamnnuError(f"--features: at least two stages of at least one feature each, got {list(features)}")
    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise SamnnuError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if init is not None:
        init = Path(init).resolve()
        starting_weights(init, features)  # a bad file fails now, not after predicting the training cases
    name = dataset_name(dataset)
    fold = str(fold)
    folder = trained_model_folder(name, trainer, configuration, plans)
    if output is None:
        if not (folder / f"fold_{fold}").is_dir():
            raise SamnnuError(f"{folder / f'fold_{fold}'}: no such trained fold; run samnnu_train {dataset} {fold} "
                              f"first (or give --output)")
        output = folder / f"fold_{fold}" / CLICK_CORRECTOR_FILE
    output = Path(output)
    if output.suffix != ".pth":
        raise SamnnuError(f"{output}: the click corrector file must end in .pth")
    images, labels, files = fold_volumes(name, fold)
    cache = output.with_name(output.stem + ".predictions.npz")
    predictions = training_predictions(name, fold, files, cache, trainer=trainer, configuration=configuration,
                                       plans=plans) if predicted_share > 0 else {}
    settings = CorrectorSettings(name, fold, steps, batch_size, rounds, lr, seed,
                                 features=tuple(int(f) for f in features), predicted_share=predicted_share,
                                 precision=precision, init=str(init) if init is not None else None,
                                 mirror=bool(mirror), box_share=float(box_share))
    record = train_corrector(images, labels, settings, output, predictions=predictions, progress=progress)
    cache.unlink(missing_ok=True)
    if output.name == CLICK_CORRECTOR_FILE and (output.parent / "evaluation.json").is_file():
        from samnnu.reporting.report import render_fold_report  # local: pulls in matplotlib

        record["report"] = str(render_fold_report(output.parent))  # the fold report says it has one now
    return record


def training_predictions(name: str, fold: str, files: dict[str, list[Path]], cache: str | Path, *,
                         trainer: str | None = None, configuration: str | None = None,
                         plans: str | None = None) -> dict[str, np.ndarray]:
    """{case: (Z, Y, X) int16 labels}: the fold model's predictions (no mirroring) of the cases ``files``
    ({case: [image file]}, e.g. from :func:`fold_volumes`), read from the .npz ``cache`` when it holds every
    case, else predicted and written there (atomically)."""
    # local: pull in nnU-Net
    from samnnu.pipeline.prediction import prompt_free_predictions

    cache = Path(cache)
    if cache.is_file():
        with np.load(cache) as saved:
            predictions = {c: saved[c] for c in saved.files if c in files}
        if set(predictions) == set(files):
            return predictions
    made, _ = prompt_free_predictions(files, name, folds=("all" if fold == "all" else int(fold),), trainer=trainer,
                                      configuration=configuration, plans=plans, mirroring=False)
    predictions = {c: seg.astype(np.int16) for c, (seg, _) in made.items()}
    write_atomic(cache, lambda tmp: np.savez_compressed(tmp, **predictions), _check_npz)
    return predictions


def _check_npz(path: Path) -> None:
    with np.load(path) as saved:
        saved.files  # noqa: B018 (reading the archive's index is the check)
