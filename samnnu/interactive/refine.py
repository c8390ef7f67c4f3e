"""``samnnu_refine``: refine one case by commands typed in a terminal or read from a script.

Commands (one per line; ``#`` starts a comment; voxel coordinates are (z, y, x) indices, world ones
(x, y, z) millimetres)::

    label NAME|VALUE                      choose the label the next clicks and boxes refine
    click + Z Y X  |  click - Z Y X       positive / negative click (also: click + world X Y Z)
    box Z0 Y0 X0 Z1 Y1 X1                 a box between two corners (also: box world X0 Y0 Z0 X1 Y1 Z1)
    scribble + Z Y X Y X ...              a scribble on slice Z through the (y, x) points (-: not the label)
    lasso Z Y X Y X Y X ...               an outline around the label on slice Z (at least 3 points)
    undo                                  take back the last click or box
    show                                  volume (and Dice) of every label
    save [PATH]                           write the current label map (default: the -o path)
    help                                  this list
    quit                                  stop (end of input does the same)

After every change one line gives the current label's volume in ml and, with a reference, its Dice.
A bad command (unknown, wrong number of arguments, coordinates that are not finite or lie outside the
image, an unknown label, a ``save`` path that cannot be written) prints one ``error:`` line, leaves the
label map as it was and the loop goes on; so does a command that fails unexpectedly, so that unsaved work
is never lost.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Iterable, Sequence, TextIO

import numpy as np

from samnnu.defaults import DEFAULT_CONFIGURATION, DEFAULT_TRAINER, FINAL_CHECKPOINT
from samnnu.errors import SamnnuError
from samnnu.interactive.auto_prompts import auto_prompts as make_auto_prompts
from samnnu.interactive.prompts import ImageGeometry, label_values, read_prompts_file, resolve_prompt, voxel_index
from samnnu.interactive.refiner import InteractiveSession, RefineOptions, SliceRefiner
from samnnu.pipeline.prediction import (
    choose_corrector,
    choose_prompt_path,
    prompt_free_predictions,
    read_image,
    trained_model_folder,
)
from samnnu.safe_io import write_image_atomic

HELP = __doc__.split("::\n\n", 1)[1].split("\n\n")[0]


def write_label_map(array: np.ndarray, like_image: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write a (Z, Y, X) label map on the grid of ``like_image`` (2D images: Z = 1), atomically and checked
    (:func:`samnnu.safe_io.write_image_atomic`; a failure is a one-line SamnnuError naming ``target``)."""
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    ref = sitk.ReadImage(str(like_image))
    data = np.asarray(array, dtype=np.uint8 if array.max(initial=0) < 256 else np.uint16)
    image = sitk.GetImageFromArray(data if ref.GetDimension() == 3 else data[0])
    image.CopyInformation(ref)
    return write_image_atomic(image, target)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class RefineLoop:
    """Parses commands and applies them to an :class:`InteractiveSession`; prints to ``out``.

    A command that fails prints one error line and is taken back (the session's label map stays as it
    was); the loop goes on.
    """

    def __init__(self, session: InteractiveSession, geometry: ImageGeometry, image_file: str | os.PathLike,
                 output: str | os.PathLike | None, out: TextIO, label: str | int | None = None,
                 prog: str = "samnnu_refine"):
        self.session = session
        self.geometry = geometry
        self.image_file = image_file
        self.output = output
        self.out = out
        self.prog = prog
        self.label = self._label_value(label) if label is not None else min(session.names)
        self.errors = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _label_value(self, label: str | int) -> int:
        try:
            return self.session.label_value(label)
        except ValueError:  # digits int() does not take, e.g. '²'
            raise SamnnuError(f"'{label}' is neither a label name nor a label value") from None

    def _index(self, words: Sequence[str], what: str) -> tuple[int, int, int]:
        world = bool(words) and words[0] == "world"
        nums = words[1:] if world else words
        if len(nums) != 3:
            raise SamnnuError(f"{what}: expected 3 coordinates ({'x y z mm' if world else 'z y x voxels'}), "
                              f"got {' '.join(words) or 'none'}")
        try:
            values = [float(v) for v in nums]
        except ValueError:
            raise SamnnuError(f"{what}: coordinates must be numbers, got {' '.join(nums)}") from None
        return voxel_index(values, "world" if world else "voxel", self.geometry, what)

    def _save(self, target: str | os.PathLike) -> Path:
        """Write the current label map to ``target``: an image file name (e.g. ``.nii.gz``) in a folder that
        exists (a mistyped folder is not created)."""
        target = Path(target).expanduser()
        folder = target.parent
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "folder not found"
            raise SamnnuError(f"save: {folder}: {problem}; nothing was written")
        if target.is_dir():
            raise SamnnuError(f"save: {target} is a folder; give a file name such as {target / 'refined.nii.gz'}")
        if "." not in target.name.lstrip("."):
            raise SamnnuError(f"save: {target}: give a file name with an image ending such as .nii.gz")
        return write_label_map(self.session.segmentation, self.image_file, target)

    def execute(self, line: str) -> bool:
        """Run one command; False when the loop should stop."""
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:  # e.g. an unclosed quote
            raise SamnnuError(f"cannot read the command '{line.strip()}' ({e})") from None
        if not words:
            return True
        cmd, args = words[0].lower(), words[1:]
        s = self.session
        if cmd in ("quit", "exit", "q"):
            return False
        if cmd == "help":
            self.say(HELP)
        elif cmd == "label":
            if len(args) != 1:
                raise SamnnuError("label: give one label name or value")
            self.label = self._label_value(args[0])
            self.say(s.describe(self.label))
        elif cmd == "click":
            if not args or args[0] not in ("+", "-"):
                raise SamnnuError(f"click: expected '+' or '-' first, e.g. click + 12 30 20; got '{line.strip()}'")
            index = self._index(args[1:], "positive click" if args[0] == "+" else "negative click")
            s.click(self.label, index, args[0] == "+")
            self.say(s.describe(self.label))
        elif cmd == "box":
            world = bool(args) and args[0] == "world"
            nums = args[1:] if world else args
            if len(nums) != 6:
                raise SamnnuError(f"box: expected 6 coordinates (two corners), got {len(nums)}")
            prefix = ["world"] if world else []
            lo = self._index(prefix + nums[:3], "box corner 1")
            hi = self._index(prefix + nums[3:], "box corner 2")
            s.box(self.label, lo, hi)
            self.say(s.describe(self.label))
        elif cmd in ("scribble", "lasso"):
            sign = None
            if cmd == "scribble":
                if not args or args[0] not in ("+", "-"):
                    raise SamnnuError(f"scribble: expected '+' or '-' first, e.g. scribble + 12 30 20 32 24; got "
                                      f"'{line.strip()}'")
                sign, args = args[0], args[1:]
            least = 1 if cmd == "scribble" else 3
            if len(args) < 1 + 2 * least or len(args) % 2 != 1:
                raise SamnnuError(f"{cmd}: expected a slice Z and then (y, x) pairs, at least {least}; got "
                                  f"{' '.join(args) or 'none'}")
            try:
                z, *rest = (int(v) for v in args)
            except ValueError:
                raise SamnnuError(f"{cmd}: coordinates must be integer voxel indices, got {' '.join(args)}") from None
            points = [(z, rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]
            if cmd == "scribble":
                s.scribble(self.label, points, sign == "+")
            else:
                s.lasso(self.label, z, [p[1:] for p in points])
            self.say(s.describe(self.label))
        elif cmd == "undo":
            self.say(s.describe(self.label) if s.undo() else "nothing to undo")
        elif cmd == "show":
            for value in sorted(s.names):
                self.say(("* " if value == self.label else "  ") + s.describe(value))
        elif cmd == "save":
            if len(args) > 1:
                raise SamnnuError("save: give at most one path (quote a path that holds spaces)")
            target = args[0] if args else self.output
            if target is None:
                raise SamnnuError("save: no path given and no -o/--output")
            self.say(f"saved {self._save(target)}")
        else:
            raise SamnnuError(f"unknown command '{cmd}' (type help)")
        return True

    def _failed(self, message: str, history: int) -> None:
        """Report a failed command in one line and take back whatever it had changed."""
        while len(self.session.history) > history:
            self.session.undo()
        self.errors += 1
        self.say(f"{self.prog}: error: {_one_line(message)}")

    def run(self, lines: Iterable[str]) -> int:
        """Run commands until quit or the end of input; returns the number of failed commands."""
        for line in lines:
            history = len(self.session.history)
            try:
                if not self.execute(line):
                    break
            except SamnnuError as e:
                self._failed(str(e), history)
            except Exception as e:  # a bug in one command must not end the session and lose unsaved work
                self._failed(f"'{line.strip()}' failed ({type(e).__name__}: {e}); the label map is unchanged",
                             history)
        return self.errors


def open_session(images: Sequence[str | os.PathLike], dataset: str | int, *, folds: tuple = (0,),
                 trainer: str | None = None, configuration: str | None = None, plans: str | None = None,
                 device: str | None = None, checkpoint: str = FINAL_CHECKPOINT, mirroring: bool = True,
                 postprocess: bool = True, reference: str | os.PathLike | None = None,
                 prompts: str | os.PathLike | None = None, case: str | None = None, auto_prompts: bool = False,
                 refiner: str = "litemedsam", options: RefineOptions | None = None, refiner_weights: str = "auto"
                 ) -> tuple[InteractiveSession, ImageGeometry]:
    """Predict one case (its channel files) without prompts and open an interactive session on it.

    reference: a label map on the same grid (for Dice). prompts: a prompts file; the entries of ``case``
    (default: the image file name without ending and ``_0000``) start the session. auto_prompts: start
    from the automatic first prompts. refiner_weights: as :func:`samnnu.pipeline.prediction.predict` (the
    model's trained prompt path when it has one); ``session.refiner.description`` says which was used.
    """
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise SamnnuError(f"{p}: image not found")
    name = paths[0].name
    stem = name[: name.index(".")] if "." in name else name
    case_id = stem[:-5] if stem.endswith("_0000") else stem
    image, geometry = read_image(paths[0])
    ref = None
    if reference is not None:
        ref_path = Path(reference)
        if not ref_path.is_file():
            raise SamnnuError(f"{ref_path}: reference not found")
        ref, _ = read_image(ref_path)
        if ref.shape != image.shape:
            raise SamnnuError(f"{ref_path}: reference size (z, y, x) {ref.shape} differs from the image's "
                              f"{image.shape}")
        ref = ref.astype(np.int64)
    predictions, dataset_json = prompt_free_predictions(
        {case_id: paths}, dataset, folds=folds, trainer=trainer or DEFAULT_TRAINER,
        configuration=configuration or DEFAULT_CONFIGURATION, plans=plans, device=device, checkpoint=checkpoint,
        mirroring=mirroring, postprocess=postprocess)
    seg, probs = predictions[case_id]
    labels = label_values(dataset_json["labels"])
    folder = trained_model_folder(dataset, trainer or DEFAULT_TRAINER, configuration or DEFAULT_CONFIGURATION, plans)
    prompt_path = choose_prompt_path(folder, folds, refiner_weights)
    refiner_model = SliceRefiner.create(refiner, device=device, trained=prompt_path,
                                        corrector=choose_corrector(folder, folds, refiner_weights))
    session = InteractiveSession(refiner_model, image, seg, probs,
                                 labels,
                                 spacing=tuple(reversed(geometry.spacing)), reference=ref,
                                 options=options or RefineOptions())
    if auto_prompts:
        for p in make_auto_prompts(seg, labels.values(), probs, spacing=tuple(reversed(geometry.spacing))):
            session.add_prompt(p)
    if prompts is not None:
        key = case or case_id
        file, entries = read_prompts_file(prompts)
        if key not in entries:
            raise SamnnuError(f"{file}: no prompts for case '{key}' (cases in the file: "
                              f"{', '.join(sorted(entries)) or 'none'}; choose one with --case)")
        resolved = [resolve_prompt(e, i + 1, key, labels, geometry, file) for i, e in enumerate(entries[key])]
        for p in resolved:
            session.add_prompt(p)
    return session, geometry
