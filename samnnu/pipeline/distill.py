"""``samnnu_distill``: a smaller image encoder trained on the user's own images to reproduce a teacher's
image embeddings (MobileSAM's decoupled distillation).

Only the image encoder is learned: the loss is the mean squared error between the teacher's and the
student's embeddings of the same slice, so the student works with the teacher's prompt encoder and
mask decoder unchanged, and the written checkpoint carries those two as they are. Slices come from
the preprocessed 2d data of one or more planned datasets, mapped to SAM's input as the trainers map
them (the plans' intensity window, scaled to [0, 1], the longer side fitted to the input size), either

- augmented on the fly with nnU-Net's 2D training augmentation (the teacher runs on every batch), or
- with the teacher's embeddings cached once per slice (no augmentation), which is cheaper when each
  slice is seen at least twice (``cache="auto"`` chooses so), but lets the student see only unaugmented
  inputs. The default is the augmented mode.

The student starts from its random initialisation except for the weights it shares with the teacher
by name and shape (:func:`warm_start`: the neck and the 320-wide last-stage blocks).

The run resumes from ``FILE.partial.pth`` (written every ``save_every`` steps) and the teacher cache
from where it stopped. The result, ``FILE``, is a SAM-style checkpoint (``image_encoder.*`` of the
student, ``prompt_encoder.*`` and ``mask_decoder.*`` of the teacher, and a ``samnnu_distill`` record)
that the encoder registry recognises by its widths: ``--sam-checkpoint FILE`` makes the planner and
every trainer use the student.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from samnnu.config import current_paths
from samnnu.datasets import dataset_name
from samnnu.defaults import PLANS_NAME
from samnnu.errors import SamnnuError
from samnnu.row_cache import cached_rows
from samnnu.safe_io import read_json, write_atomic
from samnnu.trainers.schedules import set_cosine_lr

RECORD = "samnnu_distill"


@dataclass
class DistillSettings:
    """What a distillation run is; a partial run resumes only under the same settings."""

    teacher: str
    student: str
    datasets: list[str]
    input_size: int
    steps: int
    batch_size: int
    lr: float
    cache: bool
    seed: int
    teacher_checkpoint: str | None = None
    configuration: str = "2d"
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- slices

class SliceSource:
    """2D slices (axis 0 of nnU-Net's preprocessed arrays) of the planned datasets' training cases.

    ``windows``: per dataset, the plans' intensity windows per channel; every dataset must have the same
    number of channels. ``patch_size``: per dataset, the plans' 2D patch (the augmentation's output).
    """

    def __init__(self, datasets: list[str], configuration: str = "2d"):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class  # local: nnU-Net reads env

        self.items: list[tuple[int, str]] = []  # (dataset index, case key)
        self.data, self.windows, self.patch_size, self.names = [], [], [], []
        channels = None
        for i, dataset in enumerate(datasets):
            name = dataset_name(dataset)
            pre = current_paths().preprocessed / name
            plans = read_json(pre / f"{PLANS_NAME}.json", f"samnnu plans of {name} (run samnnu_plan_and_preprocess)")
            cfg = plans["configurations"].get(configuration)
            if cfg is None or "sam" not in cfg:
                raise SamnnuError(f"{pre / (PLANS_NAME + '.json')}: no samnnu '{configuration}' configuration")
            folder = pre / cfg["data_identifier"]
            if not folder.is_dir() or not any(folder.iterdir()):
                raise SamnnuError(f"{folder}: not preprocessed; run samnnu_plan_and_preprocess -d {dataset}")
            ds = infer_dataset_class(str(folder))(str(folder))
            keys = sorted(ds.identifiers)
            if not keys:
                raise SamnnuError(f"{folder}: no preprocessed cases")
            windows = cfg["sam"]["intensity_windows"]
            if channels is not None and len(windows) != channels:
                raise SamnnuError(f"{name}: {len(windows)} channels; the other datasets have {channels}")
            channels = len(windows)
            self.data.append(ds)
            self.windows.append(windows)
            self.patch_size.append(tuple(cfg["patch_size"]))
            self.names.append(name)
            self.items += [(i, k) for k in keys]
        self._slices: list[tuple[int, str, int]] | None = None
        self._volumes: dict[tuple[int, str], np.ndarray] = {}

    def volume(self, item: tuple[int, str]) -> np.ndarray:
        """(C, Z, Y, X) preprocessed intensities of one case (the last 64 read are kept in memory)."""
        if item not in self._volumes:
            if len(self._volumes) >= 64:
                self._volumes.pop(next(iter(self._volumes)))
            data, _, _, _ = self.data[item[0]].load_case(item[1])
            self._volumes[item] = np.asarray(data, dtype=np.float32)
        return self._volumes[item]

    def all_slices(self) -> list[tuple[int, str, int]]:
        """Every (dataset index, case, z), in a fixed order (the teacher cache's rows)."""
        if self._slices is None:
            self._slices = [(item[0], item[1], z) for item in self.items for z in range(self.volume(item).shape[1])]
        return self._slices

    def encoder_input(self, row: int, input_size: int) -> torch.Tensor:
        """(1, 3, input_size, input_size): row ``row`` of :meth:`all_slices`, unaugmented."""
        ds, case, z = self.all_slices()[row]
        return to_sam_input(torch.from_numpy(self.volume((ds, case))[None, :, z].copy()), self.windows[ds], input_size)


def to_sam_input(x: torch.Tensor, windows: list[list[float]], input_size: int) -> torch.Tensor:
    """Map nnU-Net-normalised slices to the encoder's input as the trainers do at initialisation
    (:class:`samnnu.modeling.common.IntensityToSAM`: window to [0, 1], channel mean into 3 channels,
    then :func:`~samnnu.modeling.common.fit_square`).

    x: (B, C, H, W) -> (B, 3, input_size, input_size)
    """
    from samnnu.modeling.common import fit_square  # local: pulls in segment_anything (slow to import)

    lo = torch.tensor([w[0] for w in windows], dtype=x.dtype).view(1, -1, 1, 1)
    hi = torch.tensor([w[1] for w in windows], dtype=x.dtype).view(1, -1, 1, 1)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    return fit_square(x, input_size)[0]


class AugmentedBatches:
    """Batches of random slices after nnU-Net's 2D training augmentation (spatial, intensity, mirroring)."""

    def __init__(self, source: SliceSource, seed: int):
        from math import pi

        from samnnu.trainers.base import SAMTrainerBase  # local: pulls in nnU-Net

        self.source = source
        self.rng = np.random.default_rng(seed)
        self.transforms = [SAMTrainerBase.get_training_transforms(p, (-pi, pi), None, (0, 1), False)
                           for p in source.patch_size]

    def batch(self, size: int, input_size: int) -> torch.Tensor:
        """(size, 3, input_size, input_size) encoder inputs."""
        out = []
        for _ in range(size):
            item = self.source.items[int(self.rng.integers(len(self.source.items)))]
            vol = self.source.volume(item)
            z = int(self.rng.integers(vol.shape[1]))
            image = torch.from_numpy(vol[:, z].copy())
            seg = torch.zeros((1, *image.shape[1:]), dtype=torch.int16)
            aug = self.transforms[item[0]](image=image, segmentation=seg)["image"]
            out.append(to_sam_input(aug[None], self.source.windows[item[0]], input_size))
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------- the run

def build_parts(name: str, input_size: int, checkpoint: str | None = None, pretrained: bool = True):
    """A registered encoder's SAM parts (seeded initialisation), with its pretrained weights (bundled, or
    ``checkpoint``) unless ``pretrained`` is False or it has none."""
    from samnnu.modeling.encoders import build_sam_parts, get_encoder_spec, load_pretrained

    spec = get_encoder_spec(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        parts = build_sam_parts(name, input_size=input_size, num_mask_tokens=4)
    if pretrained and spec.pretrained is not None:
        load_pretrained(name, parts, checkpoint=checkpoint)
    return parts


def warm_start(student: torch.nn.Module, teacher: torch.nn.Module) -> list[str]:
    """Copy every teacher weight whose name and shape the student shares (in practice the neck that maps
    the last stage to SAM's 256 channels, and the 320-wide last-stage blocks); return the names copied.

    The student then starts with the teacher's output scale instead of having to find it (LiteMedSAM's
    embeddings have a variance near 0.01; a fresh neck's, near 1).
    """
    theirs = teacher.state_dict()
    ours = student.state_dict()
    last = max(int(k.split(".")[1]) for k in ours if k.startswith("layers."))
    shared = ("neck.", f"layers.{last}.")  # same role in both; earlier stages differ in width and depth
    copied = [k for k, v in ours.items() if k.startswith(shared) and k in theirs and theirs[k].shape == v.shape
              and v.dtype.is_floating_point]
    student.load_state_dict({**ours, **{k: theirs[k].clone() for k in copied}})
    return copied


def check_pair(teacher: str, student: str) -> None:
    """One-line SamnnuError unless ``student`` is a registered student whose decoder shape fits ``teacher``."""
    from samnnu.modeling.encoders import ENCODERS, get_encoder_spec

    students = sorted(n for n, s in ENCODERS.items() if s.extra.get("student"))
    if teacher not in ENCODERS:
        raise SamnnuError(f"unknown teacher '{teacher}'; known encoders: {', '.join(sorted(ENCODERS))}")
    if student not in ENCODERS or not ENCODERS[student].extra.get("student"):
        raise SamnnuError(f"unknown student '{student}'; students: {', '.join(students)}")
    t, s = get_encoder_spec(teacher), get_encoder_spec(student)
    if t.stride != s.stride or t.extra.get("heads") != s.extra.get("heads"):
        fits = [n for n in students if ENCODERS[n].extra.get("heads") == t.extra.get("heads")
                and ENCODERS[n].stride == t.stride]
        raise SamnnuError(f"student '{student}' does not fit teacher '{teacher}' (its embedding grid or decoder "
                          f"differs); students for '{teacher}': {', '.join(fits) or 'none yet'}")


def distill(datasets: list[str | int], output: str | Path, *, teacher: str = "litemedsam",
            student: str = "tinyvit_s", teacher_checkpoint: str | None = None, input_size: int | None = None,
            steps: int = 2000, batch_size: int = 16, lr: float = 1e-3, cache: str = "off", seed: int = 0,
            save_every: int = 100, progress: bool = True) -> dict:
    """Distil ``teacher``'s image encoder into ``student`` on the datasets' slices; write ``output``.

    ``input_size``: default the first dataset's planned 2d SAM input size. ``cache``: ``"off"`` (augmented
    slices, teacher on every batch; the default: measured on the hippocampus, a student distilled so came
    within 0.3 Dice points of its teacher in SAMUNet, one distilled on cached slices 4.5 behind, with input
    size and length also differing), ``"on"`` (teacher embeddings computed once per slice, no augmentation)
    or ``"auto"`` (on when the run sees each slice at least twice). Returns the ``samnnu_distill`` record
    written into the checkpoint.
    """
    from samnnu.modeling.common import count_parameters

    if not datasets:
        raise SamnnuError("give at least one dataset (-d)")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise SamnnuError("--steps and --batch-size must be at least 1 and --lr positive")
    if cache not in ("auto", "on", "off"):
        raise SamnnuError(f"--cache must be auto, on or off, not {cache!r}")
    check_pair(teacher, student)
    output = Path(output)
    if output.suffix != ".pth":
        raise SamnnuError(f"{output}: the student checkpoint must end in .pth")
    source = SliceSource([str(d) for d in datasets])
    if input_size is None:
        plans = read_json(current_paths().preprocessed / source.names[0] / f"{PLANS_NAME}.json", "samnnu plans")
        input_size = int(plans["configurations"]["2d"]["sam"]["input_size"])
    n_slices = len(source.all_slices())
    use_cache = cache == "on" or (cache == "auto" and steps * batch_size >= 2 * n_slices)
    settings = DistillSettings(teacher, student, source.names, int(input_size), steps, batch_size, lr, use_cache, seed,
                               teacher_checkpoint and str(Path(teacher_checkpoint).resolve()))
    teacher_parts = build_parts(teacher, input_size, teacher_checkpoint)
    student_parts = build_parts(student, input_size, pretrained=False)
    t_enc, s_enc = teacher_parts.image_encoder.eval(), student_parts.image_encoder
    for p in t_enc.parameters():
        p.requires_grad_(False)
    warm = warm_start(s_enc, t_enc)

    cached = _teacher_cache(output, settings, source, t_enc, progress) if use_cache else None
    optimizer = torch.optim.AdamW(s_enc.parameters(), lr=lr, weight_decay=0.01)
    partial = output.with_name(output.name[:-len(".pth")] + ".partial.pth")
    start = 0
    torch.manual_seed(seed)
    if partial.is_file():
        state = torch.load(partial, map_location="cpu", weights_only=True)
        if state["settings"] != asdict(settings):
            raise SamnnuError(f"{partial}: an unfinished run with other settings; give the same settings to resume, "
                              f"or delete it")
        s_enc.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
    rng = np.random.default_rng(seed + start)
    batches = None if use_cache else AugmentedBatches(source, seed + start)
    s_enc.train()
    losses, energies = [], []
    bar = tqdm(total=steps, initial=start, desc=f"distilling {teacher} -> {student}", unit="step",
               dynamic_ncols=True, disable=not progress)
    began = time.perf_counter()
    for step in range(start, steps):
        set_cosine_lr(optimizer, lr, step, steps)  # cosine decay to 5 % of lr
        if cached is not None:
            inputs, embeddings = cached
            rows = np.sort(rng.choice(n_slices, size=min(batch_size, n_slices), replace=False))
            x = torch.from_numpy(np.asarray(inputs[rows], dtype=np.float32)).expand(-1, 3, -1, -1)
            target = torch.from_numpy(np.asarray(embeddings[rows], dtype=np.float32))
        else:
            x = batches.batch(batch_size, input_size)
            with torch.no_grad():
                target = t_enc(x)
        loss = F.mse_loss(s_enc(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        energies.append(float(target.pow(2).mean()))
        bar.update(1)
        bar.set_postfix(relative_mse=f"{np.mean(losses[-20:]) / np.mean(energies[-20:]):.3f}")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            state = {"settings": asdict(settings), "student": s_enc.state_dict(), "optimizer": optimizer.state_dict(),
                     "torch_rng": torch.get_rng_state(), "step": step + 1}
            write_atomic(partial, lambda tmp, st=state: torch.save(st, tmp))
    bar.close()
    record = {**asdict(settings), "slices": n_slices, "final_mse": float(np.mean(losses[-20:])) if losses else None,
              "final_relative_mse": float(np.mean(losses[-20:]) / np.mean(energies[-20:])) if losses else None,
              "warm_started_tensors": len(warm),
              "seconds_this_run": round(time.perf_counter() - began, 1),
              "student_parameters": count_parameters(s_enc), "teacher_parameters": count_parameters(t_enc)}
    checkpoint = {f"image_encoder.{k}": v for k, v in s_enc.state_dict().items()}
    for module in ("prompt_encoder", "mask_decoder"):
        checkpoint.update({f"{module}.{k}": v for k, v in getattr(teacher_parts, module).state_dict().items()})
    checkpoint[RECORD] = json.dumps(record)
    write_atomic(output, lambda tmp: torch.save(checkpoint, tmp))
    from samnnu.plans.samnnu_planner import encoder_for_checkpoint  # the file must be what the planner reads

    if encoder_for_checkpoint(output) != student:
        raise RuntimeError(f"{output}: written, but recognised as another encoder than '{student}'")
    partial.unlink(missing_ok=True)
    return record


def _teacher_cache(output: Path, settings: DistillSettings, source: SliceSource, t_enc, progress: bool):
    """(inputs (N, 1, S, S), embeddings (N, D, g, g)): every slice's encoder input (one channel; the three are
    equal) and the teacher's embedding of it, float16 memory maps in ``FILE.teacher_inputs.npy`` and
    ``FILE.teacher.npy``; resumable (``FILE.teacher.json`` records how many rows are done, and for what)."""
    stem = output.name[:-len(".pth")]
    slices = source.all_slices()
    size = settings.input_size
    key = {"teacher": settings.teacher, "teacher_checkpoint": settings.teacher_checkpoint,
           "datasets": settings.datasets, "input_size": size, "slices": len(slices)}
    with torch.no_grad():
        probe = t_enc(torch.zeros(1, 3, size, size))

    def compute(rows: range) -> dict:
        x = torch.cat([source.encoder_input(i, size) for i in rows])
        with torch.no_grad():
            return {"embeddings": t_enc(x).numpy(), "inputs": x[:, :1].numpy()}

    arrays = {"embeddings": (output.with_name(stem + ".teacher.npy"), tuple(probe.shape[1:])),
              "inputs": (output.with_name(stem + ".teacher_inputs.npy"), (1, size, size))}
    maps = cached_rows(arrays, output.with_name(stem + ".teacher.json"), key, len(slices), compute,
                       desc="teacher embeddings (cached once)", progress=progress)
    return maps["inputs"], maps["embeddings"]
