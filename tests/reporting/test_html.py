"""samnnu.reporting.html: the pages' one stylesheet, frame and number formats; the summary page uses them."""
from __future__ import annotations

import math

import numpy as np

from samnnu.reporting.html import CSS, format_score, format_value, kv_table, page
from samnnu.reporting.summary import summary_html


def test_page_is_complete_escaped_and_offline():
    text = page("a <b> & c", ["<p>one</p>", "<p>two</p>"])
    assert text.startswith("<!DOCTYPE html><html><head><meta charset='utf-8'>")
    assert "<title>a &lt;b&gt; &amp; c</title>" in text and f"<style>{CSS}</style>" in text
    assert "<p>one</p>\n<p>two</p>\n</body></html>\n" in text
    assert "http" not in text


def test_format_value():
    assert [format_value(v) for v in (None, True, np.bool_(False), 1234567, np.int64(7))] == \
        ["–", "True", "False", "1,234,567", "7"]
    assert [format_value(v) for v in (0.123456, np.float32(2.0), math.nan, 123456.0)] == \
        ["0.1235", "2", "nan", "1.2346e+05"]
    assert format_value([1, 0.5, None]) == "(1, 0.5, –)" and format_value({"a": 1, "b": 2.5}) == "a: 1; b: 2.5"


def test_format_score():
    assert [format_score(v) for v in (0.5, 1.0, None, math.nan, 3, "<x>")] == \
        ["0.5000", "1.0000", "–", "–", "3", "&lt;x&gt;"]
    assert format_score(0.12345, digits=2) == "0.12"


def test_kv_table_escapes():
    assert kv_table({"a<": [1, 2]}) == '<table><tr><th class="k">a&lt;</th><td class="k">(1, 2)</td></tr></table>'


def test_summary_page_has_the_shared_style_and_the_best_model():
    fold = {"fold": 0, "dice": {"A": 0.5}, "foreground_dice": 0.5, "n_cases": 2, "source": "evaluation.json"}
    model = {"name": "T__P__2d", "n_folds": 1, "per_fold": [fold],
             "dice": {"A": {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5}},
             "foreground_dice": {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5}}
    summary = {"dataset": "Dataset004_X", "models": [model], "ensembles": [], "results_folder": "/r",
               "created": "now", "notes": [], "ranking": [{"name": "T__P__2d", "folds": [0],
                                                           "foreground_dice_mean": 0.5, "foreground_dice_std": None}],
               "best": {"name": "T__P__2d", "folds": [0], "foreground_dice_mean": 0.5, "predict_command": "run <it>"}}
    text = summary_html(summary)
    assert f"<style>{CSS}</style>" in text and "<title>samnnu summary: Dataset004_X</title>" in text
    assert "<pre>run &lt;it&gt;</pre>" in text and "<tr class='best'><td>1</td>" in text
    assert "<td>0.5000</td><td>–</td>" in text  # mean and a missing std
