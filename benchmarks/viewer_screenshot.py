"""A screenshot of ``samnnu_view`` for the docs: napari with samnnu's dock widget, after the trained model
segmented a case and one box was applied through the widget.

napari draws its canvas with OpenGL, so this needs a display. On a machine without one, run it on a
virtual screen with Mesa's software renderer. On Debian, PyQt5's xcb platform plugin also needs a few
X libraries: ``apt-get install xvfb libgl1-mesa-dri libxcb-icccm4 libxcb-image0 libxcb-keysyms1
libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0``::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/viewer_screenshot.py \
        --data-root DATA_ROOT -d 4 -i CASE_0000.nii.gz -o docs/images/samnnu_view.png

It drives the widget as a user would: Segment, choose the label, draw a rectangle on the slice where the
label is largest, Apply. The rectangle is the label's bounding box on that slice in the model's own
prediction, grown by two voxels, so no reference label is needed. It prints the status line after each
step and writes the PNG (atomically).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from samnnu.errors import SamnnuError
from samnnu.safe_io import write_atomic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", required=True, help="the case's image file")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--data-root", default=None)
    p.add_argument("--label", default=None, help="label to refine (default: the last one)")
    p.add_argument("--margin", type=int, default=2, help="voxels added to each side of the drawn box")
    p.add_argument("--zoom", type=float, default=None, help="canvas zoom (default: napari's fit, times 1)")
    p.add_argument("--width", type=int, default=1400, help="window width in pixels")
    p.add_argument("--height", type=int, default=820, help="window height in pixels")
    args = p.parse_args(argv)

    from samnnu.config import setup_environment

    setup_environment(args.data_root)
    import napari

    from samnnu.interactive.viewer import LABEL_LAYER, SHAPES, load_model_stack, make_widget

    load_model_stack()  # before napari's canvas: see load_model_stack
    viewer = napari.Viewer(title="samnnu", show=True)
    widget = make_widget(viewer, image=args.input, dataset=args.dataset, device="cpu", mirroring=False)
    viewer.window.add_dock_widget(widget, name="samnnu", area="right")
    viewer.window.resize(args.width, args.height)
    widget.segment()
    print("after Segment:", widget.status.text())
    controller = widget.controller
    if controller.session is None:
        return 1
    labels = list(controller.session.labels)
    label = args.label or labels[-1]
    widget.label_box.setCurrentText(label)
    value = controller.session.labels[label]
    seg = controller.session.segmentation == value
    if not seg.any():
        print(f"the model found no {label} in {args.input}", file=sys.stderr)
        return 1
    z = int(np.argmax(seg.sum(axis=(1, 2))))
    ys, xs = np.nonzero(seg[z])
    shape = seg.shape
    y0, y1 = max(int(ys.min()) - args.margin, 0), min(int(ys.max()) + args.margin, shape[1] - 1)
    x0, x1 = max(int(xs.min()) - args.margin, 0), min(int(xs.max()) + args.margin, shape[2] - 1)
    box = np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], float)
    viewer.dims.set_current_step(0, z)
    viewer.layers[SHAPES].add_rectangles(box)
    widget.apply()
    print(f"after a box on slice {z} (y {y0}-{y1}, x {x0}-{x1}):", widget.status.text())
    # show the box that was applied (Apply clears the drawing layer) and the refined labels
    viewer.layers[SHAPES].add_rectangles(box)
    viewer.layers.selection.active = viewer.layers[LABEL_LAYER]
    viewer.reset_view()
    if args.zoom:
        viewer.camera.zoom *= args.zoom
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    try:
        out = write_atomic(args.output, lambda tmp: viewer.screenshot(str(tmp), canvas_only=False))
    except SamnnuError as e:
        print(f"viewer_screenshot: error: {e}", file=sys.stderr)
        return 1
    finally:
        viewer.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
