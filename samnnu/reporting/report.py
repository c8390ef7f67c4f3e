"""A per-fold report: ``report.json`` with the numbers and ``report.html`` to read them.

The HTML file is self-contained and works offline: figures are drawn with matplotlib's Agg canvas
(pyplot and its global state are not touched) and embedded as base64 PNG, styles are inline.
Sections, each an ``<h2>``: Plans summary, Training curves, Per-class metrics, Per-case metrics,
Best, median and worst case, Timing and device.

:func:`write_fold_report` is called by the chain after training; :func:`render_fold_report` rebuilds
the report of a trained fold from what is on disk (``samnnu_report FOLD_DIR``), e.g. after this
module has improved.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import textwrap
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from samnnu.config import current_paths
from samnnu.datasets import split_model_folder_name
from samnnu.defaults import (
    CHECKPOINTS_NEWEST_FIRST,
    CLICK_CORRECTOR_FILE,
    CLICK_CORRECTOR_RECORD,
    FINAL_CHECKPOINT,
    PROMPT_PATH_FILE,
    PROMPT_PATH_RECORD,
    RUN_SETTINGS,
)
from samnnu.errors import SamnnuError
from samnnu.evaluation.metrics import METRICS, WORST, foreground_classes
from samnnu.reporting.html import format_value, kv_table, page
from samnnu.safe_io import load_torch_safely, read_json, to_jsonable, write_json_atomic, write_text_atomic

#: ``<h2>`` headings of report.html, in order.
SECTIONS = (
    "Plans summary",
    "Training curves",
    "Per-class metrics",
    "Per-case metrics",
    "Best, median and worst case",
    "Timing and device",
)



# --------------------------------------------------------------------------- figures


#: Figure text sizes (points) and resolution: at DPI 100 a 6-inch figure is 600 px wide, and 9-point
#: text is about as large as the page's own small text.
DPI = 100
_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _figure(width: float, height: float):
    """A figure on its own Agg canvas (no pyplot), ``width`` x ``height`` inches at :data:`DPI`."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _epoch_axis(ax, n_epochs: int) -> None:
    """Epochs 0..n-1 on the x axis with integer ticks only, also for a single epoch."""
    ax.set_xlabel("epoch")
    ax.set_xlim(-0.5, max(n_epochs - 1, 0) + 0.5)
    if n_epochs <= 12:
        ax.set_xticks(range(max(n_epochs, 1)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))


def _marker(n_epochs: int) -> dict:
    """Markers when there are few epochs (a single point is otherwise invisible), plain lines else."""
    return {"marker": "o", "ms": 4} if n_epochs <= 30 else {}


def _legend_outside(ax) -> None:
    """The legend to the right of the axes, where it cannot cover a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _img(b64: str, caption: str) -> str:
    return (
        f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _floats(values: Any) -> np.ndarray:
    """A 1D float array; None and non-numbers become NaN."""
    out = []
    for v in values if isinstance(values, (list, tuple, np.ndarray)) else []:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=float)


def _training_figures(training: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
    """Loss curves, pseudo Dice curves and epoch durations, as HTML ``<figure>`` snippets."""
    with matplotlib.rc_context(_RC):
        return _training_figures_rc(training, class_names)


def _training_figures_rc(training: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
    figs = []
    losses = {k: _floats(training.get(k)) for k in ("train_losses", "val_losses")}
    n = max((v.size for v in losses.values()), default=0)
    if n:
        fig = _figure(5.4, 3.0)
        ax = fig.add_subplot()
        for key, label in (("train_losses", "train loss"), ("val_losses", "val loss")):
            if losses[key].size:
                ax.plot(np.arange(losses[key].size), losses[key], label=label, **_marker(n))
        _epoch_axis(ax, n)
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        _legend_outside(ax)
        ax.grid(alpha=0.3)
        figs.append(_img(_png_base64(fig), "Training and validation loss per epoch"))

    per_class = training.get("dice_per_class_or_region") or []
    ema = _floats(training.get("ema_fg_dice"))
    rows = [_floats(r if isinstance(r, (list, tuple, np.ndarray)) else [r]) for r in per_class]
    if rows or ema.size:
        n = max(len(rows), ema.size)
        fig = _figure(5.4, 3.0)
        ax = fig.add_subplot()
        n_cls = max((r.size for r in rows), default=0)
        for k in range(n_cls):
            y = np.array([r[k] if k < r.size else math.nan for r in rows])
            name = class_names[k] if k < len(class_names) else f"class {k + 1}"
            ax.plot(np.arange(y.size), y, label=str(name), **_marker(n))
        if ema.size:
            ax.plot(np.arange(ema.size), ema, "k--", label="EMA foreground", **_marker(n))
        _epoch_axis(ax, n)
        ax.set_ylabel("pseudo Dice")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Pseudo Dice on validation patches")
        _legend_outside(ax)
        ax.grid(alpha=0.3)
        figs.append(_img(_png_base64(fig), "Pseudo Dice per class on the validation patches, per epoch"))

    durations = _epoch_durations(training)
    if durations.size:
        fig = _figure(5.4, 2.5)
        ax = fig.add_subplot()
        ax.bar(np.arange(durations.size), durations, color="#7a9cc6", width=0.7)
        _epoch_axis(ax, durations.size)
        ax.set_ylabel("seconds")
        ax.set_title("Epoch duration")
        ax.grid(alpha=0.3, axis="y")
        figs.append(_img(_png_base64(fig), "Epoch duration"))
    return figs


def _epoch_durations(training: Mapping[str, Any]) -> np.ndarray:
    start = _floats(training.get("epoch_start_timestamps"))
    end = _floats(training.get("epoch_end_timestamps"))
    n = min(start.size, end.size)
    return end[:n] - start[:n]


#: Axis labels of the per-case plots.
METRIC_LABELS = {
    "dice": "Dice",
    "iou": "IoU",
    "surface_dice": "surface Dice",
    "hd95": "HD95 (mm)",
    "assd": "ASSD (mm)",
    "volume_abs_error_ml": "|volume error| (ml)",
    "volume_rel_error": "relative volume error",
}
#: The same for 2D images without a physical pixel size (PNG, JPEG, ...): distances in pixels, areas in
#: thousands of pixels (the metrics' "ml" is the pixel count times the unit spacing over 1000).
METRIC_LABELS_PIXELS = dict(METRIC_LABELS, hd95="HD95 (px)", assd="ASSD (px)",
                            volume_abs_error_ml="|area error| (1000 px)")
#: file endings of 2D natural images (nnU-Net's NaturalImage2DIO): no physical spacing, maybe colour
PIXEL_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def _pixels(evaluation: Mapping[str, Any]) -> bool:
    """True for 2D images without a physical pixel size (their distances are in pixels)."""
    return (evaluation.get("file_ending") or "").lower() in PIXEL_ENDINGS


def metric_label(metric: str, pixels: bool = False) -> str:
    """Axis label of a metric, in pixel units for 2D images without physical spacing."""
    return (METRIC_LABELS_PIXELS if pixels else METRIC_LABELS).get(metric, metric)


def _metric_figure(evaluation: Mapping[str, Any], metric: str, classes: Sequence[str]) -> str | None:
    """One metric: a box per class with the cases as jittered points, class names horizontal."""
    with matplotlib.rc_context(_RC):
        return _metric_figure_rc(evaluation, metric, classes)


def _metric_figure_rc(evaluation: Mapping[str, Any], metric: str, classes: Sequence[str]) -> str | None:
    per_case = evaluation.get("per_case") or {}
    data = []
    for cls in classes:
        v = _floats([per_case[c].get(cls, {}).get(metric) for c in per_case])
        data.append(v[~np.isnan(v)])
    if not any(d.size for d in data):
        return None
    fig = _figure(max(3.4, 1.2 + 1.2 * len(classes)), 2.9)
    ax = fig.add_subplot()
    ax.boxplot([d if d.size else [math.nan] for d in data], showfliers=False, widths=0.5,
               medianprops={"color": "#333"})
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.plot(i + rng.uniform(-0.12, 0.12, d.size), d, "o", ms=3.5, alpha=0.7, color="#c0392b")
    names = ["\n".join(textwrap.wrap(str(c), 14)) or str(c) for c in classes]
    ax.set_xticks(range(1, len(classes) + 1), names)
    ax.set_xlim(0.4, len(classes) + 0.6)
    label = metric_label(metric, _pixels(evaluation))
    ax.set_ylabel(label)
    if metric in ("dice", "iou", "surface_dice"):
        ax.set_ylim(-0.03, 1.03)
    n_nan = sum(len(per_case) - d.size for d in data)
    ax.set_title(label + (f" ({n_nan} undefined values left out)" if n_nan else ""), fontsize=9.5)
    ax.grid(alpha=0.3, axis="y")
    return _img(_png_base64(fig), f"{label} per case, one point per case")


# --------------------------------------------------------------------------- overlays


def _case_scores(evaluation: Mapping[str, Any], classes: Sequence[str]) -> dict[str, float]:
    """Mean Dice over the foreground classes of each case (NaN skipped)."""
    scores = {}
    for case, metrics in (evaluation.get("per_case") or {}).items():
        v = _floats([metrics.get(c, {}).get("dice") for c in classes])
        v = v[~np.isnan(v)]
        scores[case] = float(v.mean()) if v.size else math.nan
    return scores


def pick_cases(evaluation: Mapping[str, Any], classes: Sequence[str]) -> dict[str, str]:
    """``{"best": case, "median": case, "worst": case}`` by mean foreground Dice per case."""
    scores = {c: s for c, s in _case_scores(evaluation, classes).items() if not math.isnan(s)}
    if not scores:
        return {}
    order = sorted(scores, key=lambda c: (scores[c], c))
    return {"best": order[-1], "median": order[(len(order) - 1) // 2], "worst": order[0]}


def _read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))


def _overlay(
    case: str,
    role: str,
    score: float,
    val_pred_dir: Path,
    val_ref_dir: Path,
    images_dir: Path | None,
    file_ending: str,
    classes: Mapping[str, Any],
) -> str:
    """An axial slice through the structure: reference (solid) vs prediction (dashed) contours."""
    ref_path, pred_path = val_ref_dir / f"{case}{file_ending}", val_pred_dir / f"{case}{file_ending}"
    try:
        ref, spacing = _read_array(ref_path)
        pred, _ = _read_array(pred_path)
    except RuntimeError:
        return f'<p class="note">{html.escape(role)} case {html.escape(case)}: cannot read {html.escape(str(ref_path))} or {html.escape(str(pred_path))}</p>'
    image = None
    photo = ref.ndim == 2 and file_ending.lower() in PIXEL_ENDINGS  # a 2D image: no slices, no mm
    if images_dir is not None:
        img_path = images_dir / f"{case}_0000{file_ending}"
        try:
            image, _ = _read_array(img_path)
            colour = image.ndim == ref.ndim + 1 and image.shape[-1] in (3, 4)  # RGB(A): (H, W, 3)
            if image.shape[:ref.ndim] != ref.shape or (image.ndim != ref.ndim and not colour):
                image = None
            elif colour:
                image = image[..., :3]
        except RuntimeError:
            image = None
    if ref.ndim == 2:
        ref, pred = ref[None], pred[None]
        image = image[None] if image is not None else None
        spacing = (1.0, *spacing)
    fg_ref = np.isin(ref, _all_values(classes))
    fg = fg_ref if fg_ref.any() else np.isin(pred, _all_values(classes))
    area = fg.reshape(fg.shape[0], -1).sum(1)
    z = int(np.argmax(area)) if area.any() else ref.shape[0] // 2

    with matplotlib.rc_context(_RC):
        fig = _draw_overlay(case, role, score, z, ref, pred, image, spacing, classes, photo=photo)
    score_txt = "nan" if math.isnan(score) else f"{score:.3f}"
    where = "" if photo else f", axial slice {z}"
    return _img(_png_base64(fig), f"{role} case {case}{where}, mean foreground Dice {score_txt}")


def _draw_overlay(case, role, score, z, ref, pred, image, spacing, classes, photo: bool = False):
    ratio = ref.shape[1] * spacing[1] / (ref.shape[2] * spacing[2])  # height / width on screen
    width = 3.2
    fig = _figure(width, width * min(2.0, max(0.5, ratio)) + 0.9)
    ax = fig.add_subplot()
    aspect = spacing[1] / spacing[2]
    if image is not None and image.ndim == 4:  # colour: the photo as it is
        sl = image[z]
        ax.imshow(sl if sl.dtype == np.uint8 else np.clip(sl / max(float(sl.max()), 1e-9), 0, 1), aspect=aspect,
                  interpolation="nearest")
    elif image is not None:
        sl = image[z].astype(float)
        lo, hi = np.percentile(sl, [0.5, 99.5]) if sl.size else (0, 1)
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
                  interpolation="nearest")
    else:
        ax.imshow(ref[z], cmap="Greys", alpha=0.35, aspect=aspect, interpolation="nearest")
    colors = ["#2ecc71", "#e74c3c", "#3498db", "#f1c40f", "#9b59b6", "#e67e22", "#1abc9c"]
    handles = []
    for k, (name, value) in enumerate(classes.items()):
        color = colors[k % len(colors)]
        values = value if isinstance(value, (list, tuple)) else [value]
        for arr, style in ((ref[z], "solid"), (pred[z], "dashed")):
            m = np.isin(arr, values).astype(float)
            if m.any() and not m.all():
                ax.contour(m, levels=[0.5], colors=[color], linestyles=style, linewidths=1.5)
        handles.append(Line2D([], [], color=color, lw=2, label=str(name)))
    handles += [
        Line2D([], [], color="k", ls="solid", label="reference"),
        Line2D([], [], color="k", ls="dashed", label="prediction"),
    ]
    # below the image, never over the structure
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    ax.set_axis_off()
    score_txt = "nan" if math.isnan(score) else f"{score:.3f}"
    ax.set_title(f"{role}: {case}\n" + ("" if photo else f"slice {z}, ") + f"mean Dice {score_txt}")
    return fig


def _all_values(classes: Mapping[str, Any]) -> list[int]:
    out = []
    for v in classes.values():
        out += list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(v) for v in out]


# --------------------------------------------------------------------------- tables


def _class_table(evaluation: Mapping[str, Any], classes: Sequence[str]) -> str:
    metrics = [m for m in METRICS if any(m in (evaluation.get("mean") or {}).get(c, {}) for c in classes)]
    head = '<tr><th class="k">class</th><th class="k">statistic</th>' + "".join(
        f"<th>{html.escape(m)}</th>" for m in metrics
    ) + "</tr>"
    body = ""
    for cls in classes:
        for stat in ("mean", "median", "worst"):
            vals = (evaluation.get(stat) or {}).get(cls, {})
            body += f'<tr><td class="k">{html.escape(cls)}</td><td class="k">{stat}</td>' + "".join(
                f"<td>{html.escape(format_value(vals.get(m)))}</td>" for m in metrics
            ) + "</tr>"
        n_nan = (evaluation.get("n_nan") or {}).get(cls, {})
        if any(n_nan.get(m) for m in metrics):
            body += f'<tr><td class="k">{html.escape(cls)}</td><td class="k">NaN skipped</td>' + "".join(
                f"<td>{n_nan.get(m, 0)}</td>" for m in metrics
            ) + "</tr>"
    fg = evaluation.get("foreground_mean") or {}
    if fg:
        body += '<tr><td class="k">foreground</td><td class="k">mean of class means</td>' + "".join(
            f"<td>{html.escape(format_value(fg.get(m)))}</td>" for m in metrics
        ) + "</tr>"
    return f"<table>{head}{body}</table>"


# --------------------------------------------------------------------------- the report


def _training_summary(training: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = max((len(v) for v in training.values() if isinstance(v, (list, tuple))), default=0)
    out["epochs_logged"] = n
    for key in ("train_losses", "val_losses"):
        v = _floats(training.get(key))
        if v.size:
            out[f"final_{key[:-2]}"] = float(v[-1])
    ema = _floats(training.get("ema_fg_dice"))
    if ema.size and not np.isnan(ema).all():
        best = int(np.nanargmax(ema))
        out["best_ema_fg_dice"] = float(ema[best])
        out["best_ema_fg_dice_epoch"] = best
        out["final_ema_fg_dice"] = float(ema[-1])
    durations = _epoch_durations(training)
    if durations.size:
        start = _floats(training.get("epoch_start_timestamps"))
        end = _floats(training.get("epoch_end_timestamps"))
        out["mean_epoch_time_s"] = float(np.nanmean(durations))
        out["training_time_s"] = float(end[durations.size - 1] - start[0])
    return out


def write_fold_report(
    fold_dir: str | os.PathLike,
    evaluation: Mapping[str, Any],
    *,
    plans_summary: Mapping[str, Any],
    training: Mapping[str, Any],
    val_pred_dir: str | os.PathLike,
    val_ref_dir: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.json`` and a self-contained ``report.html`` into ``fold_dir``.

    Args:
        fold_dir: the fold's results folder.
        evaluation: an :func:`samnnu.evaluation.folders.evaluate_folders` result for the validation cases.
        plans_summary: shown as a table as given (configuration, spacing, patch size, SAM input
            size, encoder, trainer, trainable parameters, ...).
        training: nnU-Net's ``checkpoint['logging']``: lists per epoch under ``train_losses``,
            ``val_losses``, ``dice_per_class_or_region`` (one list per epoch), ``ema_fg_dice``,
            ``epoch_start_timestamps``, ``epoch_end_timestamps``; any of them may be missing.
        val_pred_dir, val_ref_dir: folders of predicted and reference label maps, for the overlays.
        images_dir: nnU-Net raw images (``CASE_0000<file_ending>``) drawn under the contours;
            without it the contours are drawn over the reference label map.
        extra: shown under "Timing and device", e.g. ``device``, ``training_time_s``,
            ``inference_time_per_case_s`` ({case: seconds}).

    Returns:
        The report dict that was written to ``report.json`` (NaN as None).
    """
    fold_dir = Path(fold_dir)
    val_pred_dir, val_ref_dir = Path(val_pred_dir), Path(val_ref_dir)
    images_dir = Path(images_dir) if images_dir is not None else None
    extra = dict(extra or {})
    training = dict(training or {})
    labels = evaluation.get("labels") or {}
    classes_map = foreground_classes(labels) if labels else {}
    class_names = list(evaluation.get("mean") or {}) or list(classes_map)
    if not classes_map:
        classes_map = {c: int(c.rsplit("_", 1)[-1]) for c in class_names if c.rsplit("_", 1)[-1].isdigit()}
    file_ending = evaluation.get("file_ending") or ".nii.gz"
    picked = pick_cases(evaluation, class_names)
    scores = _case_scores(evaluation, class_names)
    training_summary = _training_summary(training)

    timing: dict[str, Any] = {}
    for key in ("training_time_s", "mean_epoch_time_s", "epochs_logged"):
        if key in training_summary:
            timing[f"{key} (from training log)"] = training_summary[key]
    inference = extra.get("inference_time_per_case_s")
    if isinstance(inference, Mapping) and inference:
        t = _floats(list(inference.values()))
        timing["inference_time_per_case_s mean / max"] = (float(np.nanmean(t)), float(np.nanmax(t)))
    for key, value in extra.items():
        if not (key == "inference_time_per_case_s" and isinstance(value, Mapping)):
            timing[key] = value

    report = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "fold_dir": str(fold_dir),
        "plans_summary": dict(plans_summary or {}),
        "training_summary": training_summary,
        "training": training,
        "evaluation": {
            k: evaluation.get(k)
            for k in ("n_cases", "labels", "tolerance_mm", "mean", "median", "worst", "worst_case",
                      "n_nan", "foreground_mean", "per_case")
        },
        "cases_shown": {role: {"case": c, "mean_fg_dice": scores.get(c)} for role, c in picked.items()},
        "extra": extra,
        "val_pred_dir": str(val_pred_dir),
        "val_ref_dir": str(val_ref_dir),
        "images_dir": str(images_dir) if images_dir is not None else None,
    }
    report = to_jsonable(report)

    parts = [
        f"<h1>samnnu fold report: {html.escape(fold_dir.parent.name)}, {html.escape(fold_dir.name)}</h1>",
        f'<p class="path">{html.escape(str(fold_dir))}</p>',
        f"<p>{evaluation.get('n_cases', 0)} validation cases; foreground mean Dice "
        f"{html.escape(format_value((evaluation.get('foreground_mean') or {}).get('dice')))}; "
        f"created {html.escape(report['created'])}.</p>",
        f"<h2>{SECTIONS[0]}</h2>",
        kv_table(plans_summary) if plans_summary else '<p class="note">No plans summary given.</p>',
        f"<h2>{SECTIONS[1]}</h2>",
    ]
    figs = _training_figures(training, class_names)
    parts.append("".join(figs) if figs else '<p class="note">No training log given.</p>')
    if training_summary:
        parts.append(kv_table(training_summary))
    parts.append(f"<h2>{SECTIONS[2]}</h2>")
    parts.append(
        _class_table(evaluation, class_names) if class_names else '<p class="note">No classes evaluated.</p>'
    )
    parts.append(f"<h2>{SECTIONS[3]}</h2>")
    metric_figs = {m: _metric_figure(evaluation, m, class_names) for m in WORST}
    parts.append("".join(f for f in metric_figs.values() if f) or '<p class="note">No per-case values.</p>')
    undefined = [metric_label(m, _pixels(evaluation)) for m, f in metric_figs.items() if f is None]
    if undefined and any(metric_figs.values()):
        parts.append(f'<p class="note">Not drawn, no case has a defined value: {html.escape(", ".join(undefined))} '
                     "(a distance to an empty mask is undefined).</p>")
    parts.append(f"<h2>{SECTIONS[4]}</h2>")
    if picked:
        background = "the image" if images_dir is not None else "the reference label map"
        parts.append(
            f"<p>Solid: reference, dashed: prediction, over {background}; cases ranked by mean "
            "foreground Dice.</p>"
        )
        for role, case in picked.items():
            parts.append(
                _overlay(case, role, scores[case], val_pred_dir, val_ref_dir, images_dir, file_ending, classes_map)
            )
    else:
        parts.append('<p class="note">No case has a defined Dice.</p>')
    parts.append(f"<h2>{SECTIONS[5]}</h2>")
    parts.append(kv_table(timing) if timing else '<p class="note">No timing or device given.</p>')
    if isinstance(inference, Mapping) and inference:
        parts.append(
            "<table><tr><th class='k'>case</th><th>inference time (s)</th></tr>"
            + "".join(
                f"<tr><td class='k'>{html.escape(str(c))}</td><td>{html.escape(format_value(t))}</td></tr>"
                for c, t in inference.items()
            )
            + "</table>"
        )
    write_json_atomic(fold_dir / "report.json", report)
    write_text_atomic(fold_dir / "report.html", page(f"samnnu report: {fold_dir.name}", parts))
    return report


# --------------------------------------------------------------------------- re-rendering


def _nnunet_folder(name: str) -> Path | None:
    """``nnUNet_raw`` / ``nnUNet_preprocessed`` when configured (see samnnu.config), else None."""
    try:
        paths = current_paths()
    except KeyError:
        return None
    return {"nnUNet_raw": paths.raw, "nnUNet_preprocessed": paths.preprocessed}[name]


def _training_log(fold_dir: Path) -> tuple[dict, str | None]:
    """nnU-Net's ``checkpoint['logging']`` of the newest checkpoint, and the file it came from."""
    for fname in CHECKPOINTS_NEWEST_FIRST:
        path = fold_dir / fname
        if path.is_file():
            ckpt = load_torch_safely(path)  # tensors and plain data only: a model file never runs code
            if not isinstance(ckpt, dict):
                raise SamnnuError(f"{path}: not an nnU-Net checkpoint (no training log)")
            return dict(ckpt.get("logging") or {}), fname
    return {}, None


def _plans_summary_from_disk(fold_dir: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the plans.json / dataset.json beside the fold and the folder names say about the model."""
    model_dir = fold_dir.parent
    trainer, plans_name, configuration = split_model_folder_name(model_dir.name) or (None, None, None)
    summary: dict[str, Any] = {"dataset": model_dir.parent.name, "plans": plans_name,
                               "configuration": configuration, "trainer": trainer,
                               "fold": fold_dir.name.removeprefix("fold_")}
    plans = read_json(model_dir / "plans.json", default=None) or {}
    cfg = (plans.get("configurations") or {}).get(configuration) or {}
    for key, out in (("spacing", "spacing"), ("patch_size", "patch_size"), ("batch_size", "batch_size"),
                     ("normalization_schemes", "normalization")):
        if key in cfg:
            summary[out] = cfg[key]
    for key, out in (("epochs", "epochs"), ("iters_per_epoch", "iterations_per_epoch")):
        if key in settings:
            summary[out] = settings[key]
    sam = cfg.get("sam")
    if sam:
        summary.update({"encoder": sam.get("encoder"), "sam_input_size": sam.get("input_size"),
                        "intensity_windows": sam.get("intensity_windows")})
    dataset_json = read_json(model_dir / "dataset.json", default=None) or {}
    if dataset_json.get("labels"):
        summary["labels"] = dataset_json["labels"]
    return {k: v for k, v in summary.items() if v is not None}


REFINER_KEY = "interactive refiner"
CORRECTOR_KEY = "3D click corrector"


def _describe_trained(path: Path, record_key: str, line) -> str:
    """``line(record, last history entry)`` for a file written by a samnnu training (its record under
    ``record_key``), read without running code; or one line saying why it cannot be read."""
    try:
        record = json.loads(load_torch_safely(path)[record_key])
        return line(record, record["history"][-1])
    except (SamnnuError, KeyError, IndexError, TypeError, ValueError) as e:
        return f"{path.name}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def describe_corrector(path: Path) -> str:
    """One line on a fold's 3D click corrector (``click_corrector.pth``)."""
    return _describe_trained(path, CLICK_CORRECTOR_RECORD, lambda record, last: (
        f"trained on this fold's training cases ({path.name}: {record['steps']} steps; training Dice "
        f"{last['dice_before']:.3f} before and {last['dice_after']:.3f} after {record['rounds']} clicks); "
        f"answers the clicks{' and one-slice boxes' if record.get('box_share') else ''} of samnnu_predict "
        f"--prompts and samnnu_refine"))


def describe_prompt_path(path: Path) -> str:
    """One line on a fold's trained prompt path (``refiner.pth``)."""
    return _describe_trained(path, PROMPT_PATH_RECORD, lambda record, last: (
        f"{record['encoder']} with its prompt path trained on this fold's training cases ({path.name}: "
        f"{record['steps']} steps; training Dice {last['dice_first']:.3f} after the first prompt, "
        f"{last['dice_last']:.3f} after {record['rounds']} corrective clicks); used by samnnu_predict "
        f"--prompts and samnnu_refine"))


def render_fold_report(fold_dir: str | os.PathLike) -> Path:
    """Rebuild ``report.html`` and ``report.json`` of a trained fold from the files in its folder.

    Reads ``evaluation.json`` (required), the training log in ``checkpoint_final.pth`` (else the
    latest or best checkpoint), ``plans.json`` / ``dataset.json`` in the model folder and
    ``samnnu_training.json``; the previous ``report.json``'s ``plans_summary`` (which holds the
    parameter counts) and ``extra`` (timing and device) are kept. The validation predictions and
    references are looked up where ``evaluation.json`` says they were, else in ``validation/``
    (``validation/postprocessed`` when present) and ``nnUNet_preprocessed/<dataset>/gt_segmentations``.

    Returns:
        The path of the new ``report.html``.

    Raises:
        SamnnuError: the folder or its ``evaluation.json`` is missing or unreadable.
    """
    fold_dir = Path(fold_dir).expanduser().resolve()
    if not fold_dir.is_dir():
        raise SamnnuError(f"{fold_dir}: fold folder not found")
    eval_path = fold_dir / "evaluation.json"
    if not eval_path.is_file():
        raise SamnnuError(f"{eval_path}: missing (the fold has not been evaluated; run samnnu_train's chain, "
                          f"or samnnu_evaluate --reference GT --prediction {fold_dir / 'validation'} -o {eval_path})")
    evaluation = read_json(eval_path, default=None)
    if not isinstance(evaluation, dict) or "per_case" not in evaluation:
        raise SamnnuError(f"{eval_path}: not a samnnu evaluation (no 'per_case')")
    previous = read_json(fold_dir / "report.json", default=None) or {}
    settings = read_json(fold_dir / RUN_SETTINGS, default=None) or {}
    training, checkpoint = _training_log(fold_dir)

    plans_summary = _plans_summary_from_disk(fold_dir, settings)
    plans_summary.update(previous.get("plans_summary") or {})
    extra = dict(previous.get("extra") or {})
    if not extra and settings.get("device"):
        extra["device"] = settings["device"]
    extra.pop(REFINER_KEY, None)
    refiner = fold_dir / PROMPT_PATH_FILE
    if refiner.is_file():
        extra[REFINER_KEY] = describe_prompt_path(refiner)
    corrector = fold_dir / CLICK_CORRECTOR_FILE
    if corrector.is_file():
        extra[CORRECTOR_KEY] = describe_corrector(corrector)
    if checkpoint is None:
        extra["training log"] = "no checkpoint in the fold folder"
    elif checkpoint != FINAL_CHECKPOINT:
        extra["training log"] = f"from {checkpoint} (training did not finish)"

    dataset = fold_dir.parent.parent.name
    val_dir = fold_dir / "validation"
    pred_candidates = [evaluation.get("pred_dir"), val_dir / "postprocessed", val_dir]
    pred_dir = next((Path(d) for d in pred_candidates if d and Path(d).is_dir()), val_dir)
    preprocessed = _nnunet_folder("nnUNet_preprocessed")
    ref_candidates = [evaluation.get("ref_dir"), previous.get("val_ref_dir"),
                      preprocessed / dataset / "gt_segmentations" if preprocessed else None]
    ref_dir = next((Path(d) for d in ref_candidates if d and Path(d).is_dir()), Path(ref_candidates[0] or "."))
    raw = _nnunet_folder("nnUNet_raw")
    images_candidates = [previous.get("images_dir"), raw / dataset / "imagesTr" if raw else None]
    images_dir = next((Path(d) for d in images_candidates if d and Path(d).is_dir()), None)

    write_fold_report(fold_dir, evaluation, plans_summary=plans_summary, training=training,
                      val_pred_dir=pred_dir, val_ref_dir=ref_dir, images_dir=images_dir, extra=extra)
    return fold_dir / "report.html"
