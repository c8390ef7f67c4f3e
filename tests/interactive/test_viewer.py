"""The napari widget (samnnu.interactive.viewer), driven headless: Qt offscreen, napari's viewer model
without a canvas, the tiny trained model and the tiny refiner."""
from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the napari extra is not installed")


@pytest.fixture
def widget(trained_folds, data_root, monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    from napari.components import ViewerModel
    from qtpy.QtWidgets import QApplication

    from samnnu.demo_data import demo_dataset_path
    from samnnu.interactive.viewer import make_widget

    app = QApplication.instance() or QApplication([])
    image = sorted((demo_dataset_path() / "images").glob("*.nii.gz"))[-1]
    w = make_widget(ViewerModel(), image=str(image), dataset="4", refiner="tiny", device="cpu", mirroring=False)
    yield w
    w.close()
    app.processEvents()


def test_segment_apply_undo_and_save(widget, tmp_path):
    import SimpleITK as sitk

    from samnnu.interactive.viewer import IMAGE_LAYER, LABEL_LAYER, NEGATIVE_SCRIBBLES, POSITIVE, SHAPES

    widget.segment()
    c = widget.controller
    assert c.session is not None, widget.status.text()
    assert "tiny refiner" in widget.status.text()
    layers = c.viewer.layers
    assert {IMAGE_LAYER, LABEL_LAYER, POSITIVE, SHAPES, NEGATIVE_SCRIBBLES} <= {layer.name for layer in layers}
    np.testing.assert_array_equal(layers[LABEL_LAYER].data, c.session.segmentation)
    assert [widget.label_box.itemText(i) for i in range(widget.label_box.count())] == list(c.session.labels)

    z = c.session.image.shape[0] // 2
    widget.label_box.setCurrentIndex(1)  # the second label
    second = list(c.session.labels.values())[1]
    assert c.label == second
    layers[SHAPES].add_rectangles(np.array([[z, 2, 3], [z, 2, 9], [z, 8, 9], [z, 8, 3]], float))
    layers[POSITIVE].add(np.array([z, 5.2, 6.4]))
    layers[NEGATIVE_SCRIBBLES].add_paths(np.array([[z, 1, 1], [z, 1, 4]], float))
    widget.apply()
    assert widget.status.text().startswith("3 prompt(s) applied"), widget.status.text()
    (obj,) = c.session.prompts()  # one object of the second label: the click, the box and the scribble
    assert obj.label == second
    assert obj.box is not None and (tuple(obj.box.lo), tuple(obj.box.hi)) == ((z, 2, 3), (z, 8, 9))
    assert [p.index for p in obj.points] == [(z, 5, 6)]
    assert len(obj.strokes) == 1 and not obj.strokes[0].positive
    assert len(layers[POSITIVE].data) == 0 and len(layers[SHAPES].data) == 0  # drawn prompts were sent
    np.testing.assert_array_equal(layers[LABEL_LAYER].data, c.session.segmentation)
    assert not (c.session.segmentation[z, 1, 1:5] == second).any()  # the scribbled voxels are not the label now

    applied = c.session.segmentation.copy()
    widget.undo()  # takes back the last prompt, the scribble
    (obj,) = c.session.prompts()
    assert obj.strokes == () and len(obj.points) == 1
    np.testing.assert_array_equal(layers[LABEL_LAYER].data, c.session.segmentation)

    target = tmp_path / "refined.nii.gz"
    widget.save(str(target))
    assert widget.status.text() == f"saved {target}"
    saved = sitk.ReadImage(str(target))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(saved), c.session.segmentation)
    assert saved.GetSpacing() == sitk.ReadImage(str(c.image_file)).GetSpacing()
    assert applied.shape == c.session.segmentation.shape

    # a shape across slices is refused with one line; nothing else changes
    layers[SHAPES].add_rectangles(np.array([[z, 2, 3], [z, 2, 9], [z + 1, 8, 9], [z + 1, 8, 3]], float))
    widget.apply()
    assert widget.status.text() == f"error: {SHAPES}: draw each shape on one slice"


def test_apply_before_segment_says_so(widget):
    widget.apply()
    assert widget.status.text() == "error: open an image first"


def test_samnnu_view_loads_the_model_stack_before_the_window(tmp_path, monkeypatch):
    """On a software-rendered display, loading triton after napari's OpenGL canvas crashed the process, so
    samnnu_view must load the model stack before it creates the viewer."""
    from samnnu import cli
    from samnnu.interactive import viewer as viewer_module

    events = []
    monkeypatch.setattr(viewer_module, "load_model_stack", lambda: events.append("model stack"))

    def no_window(*args, **kwargs):
        events.append("window")
        raise cli.SamnnuError("no window in tests")

    monkeypatch.setattr(napari, "Viewer", no_window)
    image = tmp_path / "case_0000.nii.gz"
    image.write_bytes(b"")
    assert cli.view_main(["-i", str(image), "-d", "4", "--data-root", str(tmp_path)]) == 1
    assert events == ["model stack", "window"]
