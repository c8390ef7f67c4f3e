"""A per-fold report: ``report.json`` with the numbers and ``report.html`` to read them.

The HTML file is self-contained and works offline: figures are drawn with matplotlib's Agg canvas
(pyplot and its global state are not touched) and embedded as base64 PNG, styles are inline.
Sections, each an ``<h2>``: Plans summary, Training curves, Per-class metrics, Per-case metrics,
Best, median and worst case, Timing and device.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samnnu.evaluation import METRICS, WORST, foreground_classes, to_jsonable, write_text_atomic

#: ``<h2>`` headings of report.html, in order.
SECTIONS = (
    "Plans summary",
    "Training curves",
    "Per-class metrics",
    "Per-case metrics",
    "Best, median and worst case",
    "Timing and device",
)

_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:0.9em}
th{background:#f0f0f0}td.k,th.k{text-align:left}
figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-size:0.85em;color:#555}
.note{color:#777;font-style:italic}
"""


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
    """Loss curves and pseudo Dice curves, as HTML ``<figure>`` snippets."""
    from matplotlib.ticker import MaxNLocator

    figs = []
    losses = {k: _floats(training.get(k)) for k in ("train_losses", "val_losses")}
    if any(v.size for v in losses.values()):
        fig = _figure(6, 3.5)
        ax = fig.add_subplot()
        for key, label in (("train_losses", "train loss"), ("val_losses", "val loss")):
            if losses[key].size:
                ax.plot(np.arange(losses[key].size), losses[key], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        figs.append(_img(_png_base64(fig), "Training and validation loss per epoch"))

    per_class = training.get("dice_per_class_or_region") or []
    ema = _floats(training.get("ema_fg_dice"))
    rows = [_floats(r if isinstance(r, (list, tuple, np.ndarray)) else [r]) for r in per_class]
    if rows or ema.size:
        fig = _figure(6, 3.5)
        ax = fig.add_subplot()
        n_cls = max((r.size for r in rows), default=0)
        for k in range(n_cls):
            y = np.array([r[k] if k < r.size else math.nan for r in rows])
            name = class_names[k] if k < len(class_names) else f"class {k + 1}"
            ax.plot(np.arange(y.size), y, marker="o", ms=3, label=f"pseudo Dice {name}")
        if ema.size:
            ax.plot(np.arange(ema.size), ema, "k--", marker="o", ms=3, label="EMA foreground Dice")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("Dice")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        figs.append(_img(_png_base64(fig), "Pseudo Dice per class on the validation patches, per epoch"))

    durations = _epoch_durations(training)
    if durations.size:
        fig = _figure(6, 2.5)
        ax = fig.add_subplot()
        ax.bar(np.arange(durations.size), durations, color="#7a9cc6")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("seconds")
        figs.append(_img(_png_base64(fig), "Epoch duration"))
    return figs


def _epoch_durations(training: Mapping[str, Any]) -> np.ndarray:
    start = _floats(training.get("epoch_start_timestamps"))
    end = _floats(training.get("epoch_end_timestamps"))
    n = min(start.size, end.size)
    return end[:n] - start[:n]


def _metric_figure(evaluation: Mapping[str, Any], metric: str, classes: Sequence[str]) -> str | None:
    """Box plot with the cases as jittered points, one box per class."""
    per_case = evaluation.get("per_case") or {}
    data = []
    for cls in classes:
        v = _floats([per_case[c].get(cls, {}).get(metric) for c in per_case])
        data.append(v[~np.isnan(v)])
    if not any(d.size for d in data):
        return None
    fig = _figure(max(3.0, 1.0 + 0.9 * len(classes)), 3.0)
    ax = fig.add_subplot()
    ax.boxplot([d if d.size else [math.nan] for d in data], showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.plot(i + rng.uniform(-0.15, 0.15, d.size), d, "o", ms=4, alpha=0.7, color="#c0392b")
    ax.set_xticks(range(1, len(classes) + 1), [str(c) for c in classes], rotation=30, fontsize="small")
    ax.set_title(metric)
    ax.grid(alpha=0.3, axis="y")
    return _img(_png_base64(fig), f"{metric} per case")


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
    import SimpleITK as sitk

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
    if images_dir is not None:
        img_path = images_dir / f"{case}_0000{file_ending}"
        try:
            image, _ = _read_array(img_path)
            if image.shape != ref.shape:
                image = None
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

    fig = _figure(4.2, 4.2 * min(2.0, max(0.4, ref.shape[1] * spacing[1] / (ref.shape[2] * spacing[2]))))
    ax = fig.add_subplot()
    aspect = spacing[1] / spacing[2]
    if image is not None:
        sl = image[z].astype(float)
        lo, hi = np.percentile(sl, [0.5, 99.5]) if sl.size else (0, 1)
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect)
    else:
        ax.imshow(ref[z], cmap="Greys", alpha=0.35, aspect=aspect, interpolation="nearest")
    from matplotlib.lines import Line2D

    colors = ["#2ecc71", "#e74c3c", "#3498db", "#f1c40f", "#9b59b6", "#e67e22", "#1abc9c"]
    handles = []
    for k, (name, value) in enumerate(classes.items()):
        color = colors[k % len(colors)]
        values = value if isinstance(value, (list, tuple)) else [value]
        for arr, style in ((ref[z], "solid"), (pred[z], "dashed")):
            m = np.isin(arr, values).astype(float)
            if m.any() and not m.all():
                ax.contour(m, levels=[0.5], colors=[color], linestyles=style, linewidths=1.5)
        handles.append(Line2D([], [], color=color, label=name))
    handles += [
        Line2D([], [], color="k", ls="solid", label="reference"),
        Line2D([], [], color="k", ls="dashed", label="prediction"),
    ]
    ax.legend(handles=handles, fontsize="x-small", loc="upper right")
    ax.set_axis_off()
    score_txt = "nan" if math.isnan(score) else f"{score:.3f}"
    ax.set_title(f"{role}: {case} (slice {z}, Dice {score_txt})", fontsize="small")
    return _img(_png_base64(fig), f"{role} case {case}, axial slice {z}, mean foreground Dice {score_txt}")


def _all_values(classes: Mapping[str, Any]) -> list[int]:
    out = []
    for v in classes.values():
        out += list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(v) for v in out]


# --------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _kv_table(d: Mapping[str, Any]) -> str:
    rows = "".join(
        f'<tr><th class="k">{html.escape(str(k))}</th><td class="k">{html.escape(_fmt(v))}</td></tr>'
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"


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
                f"<td>{html.escape(_fmt(vals.get(m)))}</td>" for m in metrics
            ) + "</tr>"
        n_nan = (evaluation.get("n_nan") or {}).get(cls, {})
        if any(n_nan.get(m) for m in metrics):
            body += f'<tr><td class="k">{html.escape(cls)}</td><td class="k">NaN skipped</td>' + "".join(
                f"<td>{n_nan.get(m, 0)}</td>" for m in metrics
            ) + "</tr>"
    fg = evaluation.get("foreground_mean") or {}
    if fg:
        body += '<tr><td class="k">foreground</td><td class="k">mean of class means</td>' + "".join(
            f"<td>{html.escape(_fmt(fg.get(m)))}</td>" for m in metrics
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
        evaluation: an :func:`samnnu.evaluation.evaluate_folders` result for the validation cases.
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
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>samnnu report: {html.escape(fold_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>samnnu fold report: {html.escape(str(fold_dir))}</h1>",
        f"<p>{evaluation.get('n_cases', 0)} validation cases; foreground mean Dice "
        f"{html.escape(_fmt((evaluation.get('foreground_mean') or {}).get('dice')))}; "
        f"created {html.escape(report['created'])}.</p>",
        f"<h2>{SECTIONS[0]}</h2>",
        _kv_table(plans_summary) if plans_summary else '<p class="note">No plans summary given.</p>',
        f"<h2>{SECTIONS[1]}</h2>",
    ]
    figs = _training_figures(training, class_names)
    parts.append("".join(figs) if figs else '<p class="note">No training log given.</p>')
    if training_summary:
        parts.append(_kv_table(training_summary))
    parts.append(f"<h2>{SECTIONS[2]}</h2>")
    parts.append(
        _class_table(evaluation, class_names) if class_names else '<p class="note">No classes evaluated.</p>'
    )
    parts.append(f"<h2>{SECTIONS[3]}</h2>")
    metric_figs = [f for f in (_metric_figure(evaluation, m, class_names) for m in WORST) if f]
    parts.append("".join(metric_figs) if metric_figs else '<p class="note">No per-case values.</p>')
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
    parts.append(_kv_table(timing) if timing else '<p class="note">No timing or device given.</p>')
    if isinstance(inference, Mapping) and inference:
        parts.append(
            "<table><tr><th class='k'>case</th><th>inference time (s)</th></tr>"
            + "".join(
                f"<tr><td class='k'>{html.escape(str(c))}</td><td>{html.escape(_fmt(t))}</td></tr>"
                for c, t in inference.items()
            )
            + "</table>"
        )
    parts.append("</body></html>\n")

    write_text_atomic(fold_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_text_atomic(fold_dir / "report.html", "\n".join(parts))
    return report
