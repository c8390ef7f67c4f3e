"""The look of samnnu's HTML pages (a fold's ``report.html``, the cross-validation ``summary.html``): one
stylesheet, the page frame and the number formats, so that both pages read alike.

Pages are self-contained and work offline: the styles are inline, nothing is loaded from elsewhere.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Mapping

import numpy as np

#: the one stylesheet of samnnu's pages
CSS = """
body{font-family:sans-serif;margin:2em;max-width:1240px;color:#222;line-height:1.4}
h1{font-size:1.6em;overflow-wrap:anywhere}h2{margin-top:1.5em;border-bottom:1px solid #ddd}
.path{color:#555;font-size:0.9em;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:0.9em}
th{background:#f0f0f0}td.k,th.k{text-align:left}
tr.best td{background:#eaf6ea;font-weight:bold}
pre{background:#f6f6f6;padding:0.6em 1em;white-space:pre-wrap}
figure{display:inline-table;vertical-align:top;margin:0 1.5em 1.5em 0}
figcaption{display:table-caption;caption-side:bottom;font-size:0.85em;color:#555}
img{max-width:100%;height:auto}
.note{color:#777;font-style:italic}
"""


def page(title: str, parts: Iterable[str]) -> str:
    """A complete HTML document: ``title`` (escaped here) and the body's HTML ``parts``, one per line."""
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>\n"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>")
    return "\n".join([head, *parts, "</body></html>\n"])


def format_value(v: Any) -> str:
    """Any value of a report table as text: 4 significant digits, thousands separators for integers,
    ``nan`` for NaN and a dash for a missing value; lists and mappings element by element."""
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
        return "(" + ", ".join(format_value(x) for x in v) + ")"
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {format_value(x)}" for k, x in v.items())
    return str(v)


def format_score(v: Any, digits: int = 4) -> str:
    """A score for a table of scores, escaped: a float with ``digits`` decimals (all rows line up), a dash
    for a missing or NaN value, anything else as text."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def kv_table(d: Mapping[str, Any]) -> str:
    """A two-column table: each key and its :func:`format_value`."""
    rows = "".join(
        f'<tr><th class="k">{html.escape(str(k))}</th><td class="k">{html.escape(format_value(v))}</td></tr>'
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"
