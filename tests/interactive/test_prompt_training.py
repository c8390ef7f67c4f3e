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
    train_prompts,
    training_slices,
)
from samnnu.interactive.refiner import PROMPT_PATH_FILE, find_prompt_path, load_prompt_path


def disc(shape=(40, 50), centre=(20, 24), radius=8) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_training_slices_spread_over_the_labelled_slices():
    lab = np.zeros((30, 8, 8), dtype=np.int16)
    lab[5:25, 2:5, 2:5] = 1  # 20 labelled slices
    empty = np.zeros((10, 8, 8), dtype=np.int16)
    rows = training_slices({"a": lab, "b": empty}, per_case=4)
    zs = [z for _, z in rows]
    assert all(c == "a" for c, _ in rows) and len(zs) == 4
    assert all(5 <= z < 25 for z in zs) and zs == sorted(set(zs)) and zs[-1] - zs[0] >= 10
    assert len(training_slices({"a": lab}, per_case=50)) == 20


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


def test_train_prompts_writes_a_prompt_path_that_prediction_loads(trained_folds, data_root, capsys):
    from samnnu.interactive.refiner import SliceRefiner

    pretrained = SliceRefiner.create("tiny")
    record = train_prompts(4, 0, encoder="tiny", steps=3, batch_size=2, rounds=1, slices_per_case=1,
                           save_every=2, progress=False)
    path = trained_folds / "fold_0" / PROMPT_PATH_FILE
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
