"""A napari dock widget for interactive refinement (``pip install -e ".[napari]"``; ``samnnu_view``).

Open a volume, let the trained model segment it, then refine one label at a time with the prompts of
:class:`~samnnu.interactive.refiner.InteractiveSession`, drawn in napari's own layers:

- ``positive clicks`` / ``negative clicks`` (points): clicks;
- ``boxes and outlines`` (shapes): a rectangle is a box on its slice, a polygon an outline (lasso),
  a path a scribble of the label;
- ``negative scribbles`` (shapes, paths): voxels that are not the label.

**Apply** sends what was drawn since the last apply to the session (and clears the drawing layers: the
prompts live on in the session), **Undo** takes back the last prompt, **Save** writes the label map on
the image's grid. The label layer ``samnnu`` always shows the session's map.

:class:`RefineController` holds the logic and works on any napari viewer model (tested headless);
:class:`SamnnuWidget` is the Qt face over it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from samnnu.errors import SamnnuError
from samnnu.interactive.refine import open_session, write_label_map

LABEL_LAYER = "samnnu"
IMAGE_LAYER = "image"
POSITIVE, NEGATIVE = "positive clicks", "negative clicks"
SHAPES, NEGATIVE_SCRIBBLES = "boxes and outlines", "negative scribbles"


def _voxel(point, shape) -> tuple[int, int, int]:
    """A (z, y, x) data coordinate rounded to the nearest voxel inside ``shape``."""
    return tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(point, shape))


class RefineController:
    """Connects an :class:`~samnnu.interactive.refiner.InteractiveSession` to napari layers.

    viewer: a napari ``Viewer`` or ``ViewerModel``. Layers are in voxel units scaled by the spacing, so
    what is drawn lies on the image's grid.
    """

    def __init__(self, viewer):
        self.viewer = viewer
        self.session = None
        self.image_file: Path | None = None
        self.label: int | None = None

    # ------------------------------------------------------------------ opening
    def open(self, image_file: str | os.PathLike, dataset: str | int, **session_options) -> None:
        """Predict ``image_file`` with the dataset's trained model (options: :func:`samnnu.interactive.refine.open_session`)
        and show the image, the label map and empty prompt layers."""
        session, geometry = open_session([image_file], dataset, **session_options)
        self.session, self.image_file = session, Path(image_file)
        self.label = min(session.labels.values())
        scale = tuple(reversed(geometry.spacing))
        for name in (IMAGE_LAYER, LABEL_LAYER, POSITIVE, NEGATIVE, SHAPES, NEGATIVE_SCRIBBLES):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        self.viewer.add_image(session.image, name=IMAGE_LAYER, scale=scale)
        self.viewer.add_labels(session.segmentation.copy(), name=LABEL_LAYER, scale=scale)
        self.viewer.add_points(np.empty((0, 3)), name=POSITIVE, scale=scale, face_color="lime", size=3)
        self.viewer.add_points(np.empty((0, 3)), name=NEGATIVE, scale=scale, face_color="red", size=3)
        self.viewer.add_shapes(None, ndim=3, name=SHAPES, scale=scale, edge_color="yellow", face_color="transparent")
        self.viewer.add_shapes(None, ndim=3, name=NEGATIVE_SCRIBBLES, scale=scale, edge_color="red",
                               face_color="transparent")

    # ------------------------------------------------------------------ prompts
    def _require(self):
        if self.session is None:
            raise SamnnuError("open an image first")
        return self.session

    def choose_label(self, label: str | int) -> None:
        self.label = self._require().label_value(label)

    def apply(self) -> int:
        """Send every prompt drawn since the last apply to the session; returns how many were applied.
        A bad prompt stops there with a one-line SamnnuError; those applied before it stay."""
        session = self._require()
        shape = session.image.shape
        layers = self.viewer.layers
        applied = 0
        # boxes and outlines first: each is a new object, which the clicks and scribbles then edit
        applied += self._apply_shapes(SHAPES)
        for name, positive in ((POSITIVE, True), (NEGATIVE, False)):
            for point in np.asarray(layers[name].data):
                session.click(self.label, _voxel(point, shape), positive)
                applied += 1
            layers[name].data = np.empty((0, 3))
        applied += self._apply_shapes(NEGATIVE_SCRIBBLES)
        self.refresh()
        return applied

    def _apply_shapes(self, name: str) -> int:
        session, layer = self.session, self.viewer.layers[name]
        shapes = [([_voxel(v, session.image.shape) for v in vertices], kind)
                  for vertices, kind in zip(layer.data, layer.shape_type)]
        if any(v[0] != voxels[0][0] for voxels, _ in shapes for v in voxels):
            raise SamnnuError(f"{name}: draw each shape on one slice")
        for voxels, kind in shapes:
            z = voxels[0][0]
            if name == NEGATIVE_SCRIBBLES or kind in ("path", "line"):
                session.scribble(self.label, voxels, positive=name == SHAPES)
            elif kind == "polygon":
                session.lasso(self.label, z, [v[1:] for v in voxels])
            else:  # a rectangle (or an ellipse: its bounding box)
                ys, xs = [v[1] for v in voxels], [v[2] for v in voxels]
                session.box(self.label, (z, min(ys), min(xs)), (z, max(ys), max(xs)))
        layer.data = []
        return len(shapes)

    def undo(self) -> bool:
        done = self._require().undo()
        self.refresh()
        return done

    def refresh(self) -> None:
        self.viewer.layers[LABEL_LAYER].data = self.session.segmentation.copy()

    def describe(self) -> str:
        return self._require().describe(self.label)

    def save(self, target: str | os.PathLike) -> Path:
        """Write the label map on the image's grid, atomically (one-line SamnnuError on failure)."""
        return write_label_map(self._require().segmentation, self.image_file, target)


def load_model_stack() -> None:
    """Import what prediction needs (nnU-Net's trainer module, and with it torch's compiler stack and
    triton) before napari opens its OpenGL canvas.

    With Mesa's software renderer (llvmpipe: virtual screens, remote desktops, machines without a GPU
    driver), loading triton's compiler library after Mesa's crashed the process with a segmentation
    fault at the first Segment; loaded first, both work. From napari's plugin menu the canvas is already
    open, so there it depends on the machine's OpenGL driver; ``samnnu_view`` calls this first.
    """
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401


def make_widget(napari_viewer, **defaults):
    """The Qt dock widget over a :class:`RefineController` (napari's plugin entry point; ``defaults``: the
    ``image`` and ``dataset`` fields and :func:`~samnnu.interactive.refine.open_session` options)."""
    from qtpy.QtWidgets import (
        QComboBox,
        QFileDialog,
        QFormLayout,
        QHBoxLayout,
        QLabel,
        QLineEdit,
        QPushButton,
        QVBoxLayout,
        QWidget,
    )

    class SamnnuWidget(QWidget):
        """Image and dataset fields, Segment / Apply / Undo / Save, the label to refine and a status line."""

        def __init__(self, napari_viewer):
            super().__init__()
            self.controller = RefineController(napari_viewer)
            self.options = dict(defaults)
            self.image_edit = QLineEdit(str(self.options.pop("image", "")))
            self.dataset_edit = QLineEdit(str(self.options.pop("dataset", "")))
            browse = QPushButton("Browse...")
            browse.clicked.connect(self._browse)
            row = QHBoxLayout()
            row.addWidget(self.image_edit)
            row.addWidget(browse)
            form = QFormLayout()
            form.addRow("image", row)
            form.addRow("dataset", self.dataset_edit)
            self.label_box = QComboBox()
            self.label_box.currentTextChanged.connect(self._label_changed)
            form.addRow("label", self.label_box)
            self.buttons = {}
            for name, slot in (("Segment", self.segment), ("Apply", self.apply), ("Undo", self.undo),
                               ("Save...", self._save_dialog)):
                self.buttons[name] = QPushButton(name)
                self.buttons[name].clicked.connect(slot)
            self.status = QLabel("open an image and press Segment")
            self.status.setWordWrap(True)
            layout = QVBoxLayout(self)
            layout.addLayout(form)
            for b in self.buttons.values():
                layout.addWidget(b)
            layout.addWidget(self.status)

        def _run(self, action) -> None:
            try:
                message = action()
            except SamnnuError as e:
                message = f"error: {e}"
            self.status.setText(message)

        def _browse(self):
            name, _ = QFileDialog.getOpenFileName(self, "image", "", "Images (*.nii.gz *.nii *.nrrd *.mha)")
            if name:
                self.image_edit.setText(name)

        def segment(self):
            def go():
                self.controller.open(self.image_edit.text(), self.dataset_edit.text(), **self.options)
                self.label_box.blockSignals(True)
                self.label_box.clear()
                self.label_box.addItems(list(self.controller.session.labels))
                self.label_box.blockSignals(False)
                return f"{self.controller.session.refiner.description}. {self.controller.describe()}"
            self._run(go)

        def _label_changed(self, text):
            if text and self.controller.session is not None:
                self._run(lambda: (self.controller.choose_label(text), self.controller.describe())[1])

        def apply(self):
            self._run(lambda: f"{self.controller.apply()} prompt(s) applied. {self.controller.describe()}")

        def undo(self):
            self._run(lambda: ("undone. " if self.controller.undo() else "nothing to undo. ")
                      + self.controller.describe())

        def save(self, target):
            self._run(lambda: f"saved {self.controller.save(target)}")

        def _save_dialog(self):
            name, _ = QFileDialog.getSaveFileName(self, "save the label map", "", "NIfTI (*.nii.gz)")
            if name:
                self.save(name)

    return SamnnuWidget(napari_viewer)
