"""The refiner's prompt path trained on the dataset (samnnu.interactive.prompt_training)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from samnnu.errors import SamnnuError
from samnnu.interactive.prompt_training import (
    corrective_click,
    imperfect_mask,
    jittered_box,
    simulate_interaction,
    train_prompts,
    training_samples,
    training_slices,
)
from samnnu.interactive.refiner import PROMPT_PATH_FILE, find_prompt_path, load_prompt_path
from samnnu.reporting.report import render_fold_report


def disc(shape=(40, 50), centre=(20, 24), radius=8) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_training_slices_spread_over_the_labelled_slices_and_hold_where_labels_end():
    lab = np.zeros((30, 8, 8), dtype=np.int16)
    lab[5:25, 2:5, 2:5] = 1  # 20 labelled slices
    lab[10:12, 6:8, 6:8] = 2
    empty = np.zeros((10, 8, 8), dtype=np.int16)
    rows = training_slices({"a": lab, "b": empty}, per_case=4)
    zs = [z for _, z in rows]
    assert all(c == "a" for c, _ in rows) and zs == sorted(set(zs))
    ends = {4, 5, 24, 25, 9, 10, 11, 12}  # each label's first and last slice and the slices just beyond
    spread = set(zs) - ends
    assert ends <= set(zs) and 1 <= len(spread) <= 4 and all(5 <= z < 25 for z in spread)
    assert len(training_slices({"a": lab}, per_case=50)) == 22  # every labelled slice, and 4 and 25
    on_slice, steps = training_samples({"a": lab}, [("a", 4), ("a", 10), ("a", 12)])
    assert on_slice == [(1, 1), (1, 2), (2, 1)]  # slice 4 holds nothing, slice 12 no label 2
    # propagation steps: from a neighbouring slice holding the label, including onto slices without it
    assert (0, 1, 5) in steps and (1, 2, 11) in steps and (2, 2, 11) in steps and (2, 1, 11) in steps
    assert all(lab[src][lab[src] == v].size >= 3 for _, v, src in steps)


def test_simulated_prompts_look_like_the_refiner_inputs():
    rng = np.random.default_rng(0)
    target = disc()
    y0, x0, y1, x1 = jittered_box(target, rng)
    assert abs(y0 - 12) <= 2 and abs(y1 - 28) <= 2 and abs(x0 - 16) <= 2 and abs(x1 - 32) <= 2
    rough = [imperfect_mask(target, rng) for _ in range(20)]
    overlaps = [2 * (r & target).sum() / (r.sum() + target.sum()) for r in rough]
    assert all(0.5 < d < 1.0 for d in overlaps) or min(overlaps) > 0.5  # wrong, but close to the target
    assert any(d < 0.97 for d in overlaps)
    # the click goes to the largest error: a missed half -> positive click inside the missed part
    pred = target.copy()
    pred[:, 24:] = False
    click = corrective_click(pred, target, rng)
    assert click.positive and target[click.index[1], click.index[2]] and not pred[click.index[1], click.index[2]]
    spurious = target | disc(centre=(20, 44), radius=5)
    click = corrective_click(spurious, target, rng)
    assert not click.positive and spurious[click.index[1], click.index[2]] and not target[click.index[1], click.index[2]]
    assert corrective_click(target, target, rng) is None


def test_a_propagation_step_past_the_label_teaches_an_empty_answer():
    from samnnu.interactive.refiner import SliceRefiner

    parts = SliceRefiner.create("tiny").parts
    emb = parts.image_encoder(torch.rand(1, 3, 64, 64)).detach()
    rng = np.random.default_rng(0)
    source, empty = disc(), np.zeros((40, 50), bool)
    loss, dices = simulate_interaction(parts, emb, empty, rng, rounds=2, first="neighbour", source=source)
    assert torch.isfinite(loss) and loss.requires_grad and 1 <= len(dices) <= 3
    loss.backward()
    grads = [p.grad for p in parts.mask_decoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    for first in ("box", "base", "point", "neighbour"):
        loss, dices = simulate_interaction(parts, emb, source, rng, rounds=1, first=first, source=source)
        assert torch.isfinite(loss) and all(0 <= d <= 1 for d in dices)


def test_train_prompts_writes_a_prompt_path_that_prediction_loads(trained_folds, data_root, capsys):
    from samnnu.interactive.refiner import SliceRefiner

    pretrained = SliceRefiner.create("tiny")
    path = trained_folds / "fold_0" / PROMPT_PATH_FILE
    try:
        check_the_trained_prompt_path(pretrained, path, trained_folds)
    finally:  # the session's other tests use the pretrained refiner, and a report without it
        path.unlink(missing_ok=True)
        render_fold_report(path.parent)
    assert "interactive refiner" not in json.loads((path.parent / "report.json").read_text())["extra"]


def check_the_trained_prompt_path(pretrained, path, trained_folds):
    from samnnu.interactive.refiner import SliceRefiner

    record = train_prompts(4, 0, encoder="tiny", steps=3, batch_size=2, rounds=1, slices_per_case=1,
                           save_every=2, progress=False)
    assert record["file"] == str(path) and path.is_file()
    assert record["steps"] == 3 and record["samples"] >= record["slices"] > 0
    assert find_prompt_path(trained_folds, (1, 0)) == path and find_prompt_path(trained_folds, (1,)) is None
    assert not list(path.parent.glob("refiner.*.npy")) and not (path.parent / "refiner.partial.pth").exists()
    trained = SliceRefiner.create("tiny", trained=path)
    assert trained.trained["steps"] == 3 and "trained on this dataset" in trained.description
    assert "pretrained" in pretrained.description
    changed = [k for k, v in trained.parts.mask_decoder.state_dict().items()
               if not torch.equal(v, pretrained.parts.mask_decoder.state_dict()[k])]
    assert changed  # the decoder learned something
    assert all(torch.equal(v, pretrained.parts.image_encoder.state_dict()[k])
               for k, v in trained.parts.image_encoder.state_dict().items())  # the encoder is frozen
    with pytest.raises(SamnnuError, match="trained for the 'tiny' refiner, not 'litemedsam'"):
        load_prompt_path(path, pretrained.parts, "litemedsam")
    # the fold report was rendered again and says the fold has a trained prompt path
    assert record["report"] == str(path.parent / "report.html")
    line = json.loads((path.parent / "report.json").read_text())["extra"]["interactive refiner"]
    assert "prompt path trained on this fold's training cases (refiner.pth: 3 steps" in line


def test_prompt_path_files_never_run_code(tmp_path):
    from samnnu.interactive.refiner import SliceRefiner

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "refiner.pth"
    torch.save({"samnnu_prompt_path": json.dumps({"encoder": "tiny"}), "x": Evil()}, bad, pickle_protocol=2)
    with pytest.raises(SamnnuError, match="refused"):
        SliceRefiner.create("tiny", trained=bad)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(SamnnuError, match="empty.pth"):
        SliceRefiner.create("tiny", trained=tmp_path / "empty.pth")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(SamnnuError, match="not a trained prompt path"):
        SliceRefiner.create("tiny", trained=tmp_path / "other.pth")
    assert pickle  # imported for the payload above
