"""``samnnu_summarize``: every trained model of a dataset compared across its folds, written as
``summary.json`` and a self-contained ``summary.html``.

The comparison itself (fold scores, ensembles, the ranking and the best model) is
:func:`samnnu.evaluation.summary.compare_models`; this module writes it down.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping

from samnnu.config import current_paths
from samnnu.datasets import dataset_name
from samnnu.evaluation.summary import SUMMARY_FOLDER, compare_models
from samnnu.reporting.html import format_score, page
from samnnu.safe_io import write_json_atomic, write_text_atomic


def summarize(dataset: str | int, *, output_dir: str | os.PathLike | None = None, ensembles: bool = True,
              num_processes: int | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Compare every trained model of ``dataset`` across folds; write ``summary.json`` and ``summary.html``.

    Args:
        dataset: dataset ID or name.
        output_dir: default ``nnUNet_results/<dataset>/summary``.
        ensembles: also try every two-model ensemble that has validation probabilities.
        num_processes: evaluation workers (default: samnnu.config.num_processes()).
        data_root: the data root the user chose (``--data-root``), written into the printed commands.

    Returns:
        :func:`samnnu.evaluation.summary.compare_models`'s result (``"dataset", "models", "ranking",
        "best"`` with its ``"predict_command"``, ``"ensembles_considered", "notes"``) plus ``"json"`` and
        ``"html"``, the paths of the files written.

    Raises:
        SamnnuError: unknown dataset, or no trained fold with validation results.
    """
    name = dataset_name(dataset)
    out_dir = (Path(output_dir).expanduser() if output_dir is not None
               else current_paths().results / name / SUMMARY_FOLDER)
    summary = compare_models(name, out_dir, ensembles=ensembles, num_processes=num_processes, data_root=data_root)
    json_path, html_path = out_dir / "summary.json", out_dir / "summary.html"
    write_json_atomic(json_path, summary)
    write_text_atomic(html_path, summary_html(summary))
    summary["json"], summary["html"] = str(json_path), str(html_path)
    return summary


def _model_table(entry: Mapping[str, Any]) -> str:
    folds = entry["per_fold"]
    head = ('<tr><th class="k">class</th><th>mean</th><th>std</th><th>min</th><th>max</th>'
            + "".join(f"<th>fold {f['fold']}</th>" for f in folds) + "</tr>")
    rows = []
    for cls, st in list(entry["dice"].items()) + [("foreground (mean of classes)", entry["foreground_dice"])]:
        per = [f["dice"].get(cls) if cls in f["dice"] else f["foreground_dice"] for f in folds]
        rows.append(f'<tr><td class="k">{html.escape(cls)}</td>' + "".join(
            f"<td>{format_score(st[s])}</td>" for s in ("mean", "std", "min", "max")) + "".join(
            f"<td>{format_score(v)}</td>" for v in per) + "</tr>")
    sources = "; ".join(f"fold {f['fold']}: {f['source']} ({f['n_cases']} cases)" for f in folds)
    return f"<table>{head}{''.join(rows)}</table><p class='note'>Dice per fold is the mean over its validation " \
           f"cases. {html.escape(sources)}</p>"


def summary_html(summary: Mapping[str, Any]) -> str:
    """The page of a :func:`summarize` result: best model and its command, ranking, one table per model, notes."""
    best = summary["best"]
    parts = [
        f"<h1>samnnu cross-validation summary: {html.escape(summary['dataset'])}</h1>",
        f"<p>Trained models: {len(summary['models'])}, in {html.escape(summary['results_folder'])}; "
        f"created {html.escape(summary['created'])}.</p>",
        "<h2>Best model</h2>",
        f"<p><b>{html.escape(best['name'])}</b>: mean foreground Dice {format_score(best['foreground_dice_mean'])} "
        f"over folds {html.escape(' '.join(map(str, best['folds'])))}.</p>",
        "<p>Segment new images with:</p>",
        f"<pre>{html.escape(best['predict_command'])}</pre>",
        "<h2>Ranking</h2>",
        "<table><tr><th>rank</th><th class='k'>model or ensemble</th><th>folds</th>"
        "<th>mean foreground Dice</th><th>std over folds</th></tr>",
    ]
    for i, r in enumerate(summary["ranking"], start=1):
        cls = " class='best'" if r["name"] == best["name"] else ""
        parts.append(f"<tr{cls}><td>{i}</td><td class='k'>{html.escape(r['name'])}</td>"
                     f"<td>{html.escape(' '.join(map(str, r['folds'])))}</td>"
                     f"<td>{format_score(r['foreground_dice_mean'])}</td>"
                     f"<td>{format_score(r['foreground_dice_std'])}</td></tr>")
    parts.append("</table>")
    parts.append("<p class='note'>Ranked by the mean over folds of each fold's foreground Dice (the mean over "
                 "classes of the mean Dice over the fold's validation cases). Ensembles average the softmax "
                 "probabilities of two models with the same folds and are scored without postprocessing.</p>")
    parts.append("<h2>Models</h2>")
    for entry in summary["models"] + summary["ensembles"]:
        parts.append(f"<h3>{html.escape(entry['name'])} ({entry['n_folds']} "
                     f"fold{'s' if entry['n_folds'] != 1 else ''})</h3>")
        parts.append(_model_table(entry))
    parts.append("<h2>Notes</h2>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"]) + "</ul>"
                 if summary["notes"] else "<p class='note'>None.</p>")
    return page(f"samnnu summary: {summary['dataset']}", parts)
