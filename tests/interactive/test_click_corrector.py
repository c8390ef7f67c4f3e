"""The 3D click corrector (samnnu.interactive.click_corrector) and its training (corrector_training)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samnnu.errors import SamnnuError
from samnnu.evaluation.metrics import dice
from samnnu.interactive import click_corrector as cc
from samnnu.interactive import corrector_training as ct
from samnnu.interactive.prompts import Point
from samnnu.interactive.simulated_user import noisy_click

SMALL_CROP = (16, 24, 24)  # divisible by the U-Net's strides (z by 4, y and x by 8)
SMALL_FEATURES = (4, 8, 8, 8)


def ellipsoid(shape=(20, 30, 30), centre=(10, 15, 15), radii=(6, 8, 7)) -> np.ndarray:
    grid = np.indices(shape)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def corrector_answering(bias: float, features=SMALL_FEATURES, crop=SMALL_CROP) -> cc.ClickCorrector:
    """A corrector whose U-Net answers ``bias`` everywhere (its last convolution zeroed, bias set): with 0
    it answers the mask it is given (the mask prior), with a large value foreground everywhere in the crop."""
    net = cc.build_network(features)
    last = net.unet.decoder.seg_layers[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, bias)
    return cc.ClickCorrector(net, {"crop": list(crop), "file": "x", "steps": 0, "fold": "0", "cases": 0})


def test_crop_window_lies_inside_the_volume_and_holds_the_click():
    assert cc.crop_window((0, 0, 0), (40, 60, 60), (16, 24, 24)) == (slice(0, 16), slice(0, 24), slice(0, 24))
    assert cc.crop_window((39, 30, 59), (40, 60, 60), (16, 24, 24)) == (slice(24, 40), slice(18, 42), slice(36, 60))
    # an axis smaller than the crop: all of it
    assert cc.crop_window((3, 5, 5), (6, 60, 60), (16, 24, 24))[0] == slice(0, 6)
    channels = cc.click_channels((40, 60, 60), (slice(24, 40), slice(18, 42), slice(36, 60)),
                                 [Point((30, 30, 50), True), Point((25, 20, 40), False), Point((0, 0, 0), True)])
    assert channels.shape == (2, 16, 24, 24)
    assert channels[0, 6, 12, 14] == 1 and channels[1, 1, 2, 4] == 1  # each click in its own channel
    assert channels[0].sum() == channels[1].sum() == 19  # radius 1.5: the voxel, its 6 face and 12 edge neighbours
    # the far click is outside the window
    assert channels[0, 0, 0, 0] == 0


def test_an_untrained_corrector_answers_the_mask_and_changes_only_its_crop():
    target = ellipsoid()
    image = cc.normalize_image(target * 100.0 + np.random.default_rng(0).normal(0, 5, target.shape))
    click = [Point((10, 15, 15), True)]
    np.testing.assert_array_equal(corrector_answering(0.0)(image, target, click), target)
    # whatever the network answers, a clicked voxel is what its click says
    answer = corrector_answering(0.0)(image, target, [Point((10, 15, 15), False)])
    assert not answer[10, 15, 15] and (answer != target).sum() == 1
    everything = corrector_answering(50.0)(image, target, click)
    window = cc.crop_window((10, 15, 15), target.shape, SMALL_CROP)
    assert everything[window].all()
    outside = np.ones_like(target)
    outside[window] = False
    np.testing.assert_array_equal(everything[outside], target[outside])


def test_imperfect_volumes_have_errors_over_several_slices():
    target = ellipsoid()
    rng = np.random.default_rng(0)
    dices, spans = [], []
    for _ in range(40):
        m = ct.imperfect_volume(target, rng)
        assert m.shape == target.shape and m.dtype == bool and (m != target).any()
        dices.append(dice(m, target))
        spans.append(int((m != target).any(axis=(1, 2)).sum()))
    assert 0.5 < np.mean(dices) < 0.98
    assert max(spans) >= 5  # errors are 3D, not one slice's


def test_simulated_clicks_go_to_the_largest_error():
    target = ellipsoid()
    pred = target.copy()
    pred[:9] = False  # the first slices of the structure missed
    p = noisy_click(pred, target, np.random.default_rng(0), deepest=1.0)
    assert p.positive and p.index[0] < 9 and target[p.index]
    assert noisy_click(target, target, np.random.default_rng(0)) is None


def _toy_cases(n=3):
    rng = np.random.default_rng(1)
    images, labels = {}, {}
    for i in range(n):
        lab = ellipsoid(centre=(10, 14 + i, 15)).astype(np.int16)
        lab[ellipsoid(centre=(10, 14 + i, 15), radii=(3, 3, 3))] = 2
        images[f"c{i}"] = (lab * 60.0 + rng.normal(0, 10, lab.shape)).astype(np.float32)
        labels[f"c{i}"] = lab
    return images, labels


def test_training_writes_a_corrector_that_loads_and_resumes(tmp_path, monkeypatch):
    images, labels = _toy_cases()
    settings = ct.CorrectorSettings("toy", "0", 3, 2, 2, 1e-3, 0, crop=SMALL_CROP, features=SMALL_FEATURES)
    out = tmp_path / "click_corrector.pth"
    real_write = ct.write_atomic

    def fail_on_the_final_file(path, *args, **kwargs):
        if path == out:
            raise SamnnuError(f"{path}: cannot be written (disk full)")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(ct, "write_atomic", fail_on_the_final_file)
    with pytest.raises(SamnnuError, match="disk full"):
        ct.train_corrector(images, labels, settings, out, save_every=2, progress=False)
    partial = tmp_path / "click_corrector.partial.pth"
    assert partial.is_file() and not out.exists()
    monkeypatch.setattr(ct, "write_atomic", real_write)
    other = ct.CorrectorSettings("toy", "0", 3, 2, 2, 1e-2, 0, crop=SMALL_CROP, features=SMALL_FEATURES)
    with pytest.raises(SamnnuError, match="an unfinished run with other settings"):
        ct.train_corrector(images, labels, other, out, progress=False)
    record = ct.train_corrector(images, labels, settings, out, save_every=2, progress=False)
    assert not partial.exists() and out.is_file()
    assert record["samples"] == 6 and record["cases"] == 3 and record["predicted_cases"] == 0
    assert [h["step"] for h in record["history"]] == [3]  # resumed at step 2: the history carried over
    loaded = cc.load_corrector(out)
    assert loaded.crop == SMALL_CROP and loaded.record["features"] == list(SMALL_FEATURES)
    mask = labels["c0"] == 1
    answer = loaded(cc.normalize_image(images["c0"]), mask, [Point((10, 14, 15), True)])
    assert answer.shape == mask.shape and answer.dtype == bool


def test_training_mirrors_crops_and_maps_the_answers_back(tmp_path, monkeypatch):
    """With ``mirror`` each crop goes to the network mirrored along random axes and its answer
    is mirrored back before it becomes the next current mask; the file says so and the corrector then
    answers mirrored. The network is replaced by one that answers exactly the mask it is given, so an answer
    mapped back wrongly would change the masks (and their Dice); the volumes are flatter than the crop, so
    a crop mirrored in z shows its zero padding first."""
    rng = np.random.default_rng(2)
    images, labels = {}, {}
    for i in range(2):
        lab = ellipsoid(shape=(12, 30, 30), centre=(6, 13 + i, 15), radii=(4, 8, 7)).astype(np.int16)
        images[f"c{i}"] = (lab * 60.0 + rng.normal(0, 10, lab.shape)).astype(np.float32)
        labels[f"c{i}"] = lab
    seen = []

    def the_mask_it_was_given(network, x, precision):
        seen.append(x.numpy().copy())
        return network(x).float() * 0 + 50 * (2 * x[:, 1:2] - 1)

    monkeypatch.setattr(ct, "corrector_logits", the_mask_it_was_given)
    for mirror in (True, False):
        seen.clear()
        settings = ct.CorrectorSettings("toy", "0", 6, 2, 2, 1e-3, 0, crop=SMALL_CROP, features=SMALL_FEATURES,
                                        mirror=mirror)
        record = ct.train_corrector(images, labels, settings, tmp_path / f"m{mirror}.pth", progress=False)
        assert record["mirror"] is mirror and cc.load_corrector(tmp_path / f"m{mirror}.pth").mirrored is mirror
        assert all(h["dice_after"] == h["dice_before"] for h in record["history"])  # every answer mapped back
        crops = [x for batch in seen for x in batch]
        padding_first = [not x[0, 0].any() for x in crops]  # image channel, first slice of the crop
        padding_last = [not x[0, -1].any() for x in crops]
        assert all(a != b for a, b in zip(padding_first, padding_last))
        assert any(padding_first) is mirror and any(padding_last)
    assert ct.CorrectorSettings("toy", "0", 1, 1, 1, 1e-3, 0).mirror is False  # measured no better: off


def test_mirrored_answers_average_every_mirror_image():
    """Test-time mirroring: the mean probability over the crop and its 7 mirror images, each answer mirrored
    back. The average makes the answer mirror-equivariant, which the network alone is not."""
    torch.manual_seed(0)
    net = cc.build_network(SMALL_FEATURES).eval()
    x = torch.rand(1, 4, *SMALL_CROP)
    assert len(cc.mirror_sets()) == 8 and cc.mirror_sets()[0] == ()
    with torch.inference_mode():
        p = cc.mirrored_probabilities(net, x)
        assert p.shape == (1, 1, *SMALL_CROP) and 0 <= float(p.min()) <= float(p.max()) <= 1
        for axes in [(2,), (3,), (4,), (2, 4), (2, 3, 4)]:
            torch.testing.assert_close(cc.mirrored_probabilities(net, x.flip(axes)), p.flip(axes), atol=1e-5,
                                       rtol=1e-4)
        alone = torch.sigmoid(net(x))
        assert not torch.allclose(torch.sigmoid(net(x.flip((3,)))), alone.flip((3,)), atol=1e-4)
        assert not torch.allclose(p, alone, atol=1e-4)


def test_a_corrector_trained_on_mirrored_crops_answers_mirrored():
    """A corrector whose record says it was trained on mirrored crops answers a click with one batch of the
    8 mirror images (the same as :func:`mirrored_probabilities`); ``mirroring=False`` and an unmirrored
    corrector run the network once, and the remembered answers of the two ways are kept apart."""
    target = ellipsoid()
    image = cc.normalize_image(target * 100.0 + np.random.default_rng(0).normal(0, 5, target.shape))
    torch.manual_seed(0)
    net = cc.build_network(SMALL_FEATURES)
    sizes = []
    net.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    record = {"crop": list(SMALL_CROP), "file": "x", "steps": 0, "fold": "0", "cases": 0}
    mirrored = cc.ClickCorrector(net, dict(record, mirror=True))
    click = [Point((10, 15, 15), True)]
    answer = mirrored.apply(image, target, click)
    assert sizes == [8]
    assert mirrored.apply(image, target, click, mirroring=False).shape == target.shape and sizes == [8, 1]
    mirrored.apply(image, target, click)
    assert sizes == [8, 1]  # remembered
    x, window = cc.corrector_input(image, target, click, SMALL_CROP)
    with torch.inference_mode():
        expected = cc.mirrored_probabilities(net, torch.from_numpy(x)[None])[0, 0].numpy() > 0.5
    expected[tuple(i - w.start for i, w in zip(click[0].index, window))] = True
    np.testing.assert_array_equal(answer[window], expected)
    sizes.clear()
    cc.ClickCorrector(net, record).apply(image, target, click)
    assert sizes == [1]


def test_training_in_bfloat16_writes_a_float32_corrector(tmp_path):
    """Forward passes under bfloat16 autocast (the default where the CPU computes bfloat16 natively): the
    weights stay float32, the file says how it was trained, and it loads and answers as any corrector."""
    images, labels = _toy_cases(2)
    settings = ct.CorrectorSettings("toy", "0", 2, 2, 2, 1e-3, 0, crop=SMALL_CROP, features=(4, 8, 8),
                                    precision="bf16")
    out = tmp_path / "c.pth"
    record = ct.train_corrector(images, labels, settings, out, progress=False)
    assert record["precision"] == "bf16" and record["features"] == [4, 8, 8]
    state = torch.load(out, weights_only=True)
    floats = [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    loaded = cc.load_corrector(out)
    mask = labels["c0"] == 1
    answer = loaded(cc.normalize_image(images["c0"]), mask, [Point((10, 14, 15), False)])
    assert answer.shape == mask.shape and not answer[10, 14, 15]
    assert ct.default_precision() in ct.PRECISIONS


def test_training_can_start_from_a_trained_corrector(tmp_path):
    """--init: the network starts from a trained corrector's weights (a near-zero learning rate leaves them
    as they were), and a corrector of other features is refused in one line."""
    images, labels = _toy_cases(2)
    first = tmp_path / "first.pth"
    ct.train_corrector(images, labels, ct.CorrectorSettings("toy", "0", 2, 2, 1, 1e-2, 0, crop=SMALL_CROP,
                                                            features=SMALL_FEATURES), first, progress=False)
    settings = ct.CorrectorSettings("toy", "0", 1, 2, 1, 1e-12, 1, crop=SMALL_CROP, features=SMALL_FEATURES,
                                    init=str(first))
    record = ct.train_corrector(images, labels, settings, tmp_path / "second.pth", progress=False)
    assert record["init"] == str(first)
    before, after = torch.load(first, weights_only=True), torch.load(tmp_path / "second.pth", weights_only=True)
    weights = [k for k, v in before.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert weights and all(torch.allclose(before[k], after[k], atol=1e-6) for k in weights)
    fresh = ct.train_corrector(images, labels, ct.CorrectorSettings("toy", "0", 1, 2, 1, 1e-12, 1, crop=SMALL_CROP,
                                                                    features=SMALL_FEATURES),
                               tmp_path / "fresh.pth", progress=False)
    assert fresh["init"] is None
    other = torch.load(tmp_path / "fresh.pth", weights_only=True)
    assert not all(torch.allclose(before[k], other[k], atol=1e-6) for k in weights)  # the test can fail
    wrong = ct.CorrectorSettings("toy", "0", 1, 2, 1, 1e-3, 1, crop=SMALL_CROP, features=(4, 8, 8), init=str(first))
    with pytest.raises(SamnnuError, match="features"):
        ct.train_corrector(images, labels, wrong, tmp_path / "third.pth", progress=False)
    # the command checks --init before it predicts the training cases (minutes): one line naming the file
    with pytest.raises(SamnnuError, match="missing.pth"):
        ct.train_click_corrector(4, 0, init=tmp_path / "missing.pth")
    with pytest.raises(SamnnuError, match="features"):
        ct.train_click_corrector(4, 0, init=first, features=(4, 8, 8))


def test_training_starts_from_the_models_predictions_when_given(tmp_path, monkeypatch):
    images, labels = _toy_cases(2)
    predictions = {"c0": np.zeros_like(labels["c0"])}  # the model found nothing in c0
    starts = []
    real = ct.corrector_input

    def record_first_inputs(image, mask, clicks, crop):
        if len(clicks) == 1:
            starts.append(int(np.asarray(mask).sum()))
        return real(image, mask, clicks, crop)

    monkeypatch.setattr(ct, "corrector_input", record_first_inputs)
    settings = ct.CorrectorSettings("toy", "0", 4, 4, 1, 1e-3, 0, crop=SMALL_CROP, features=SMALL_FEATURES,
                                    predicted_share=1.0)
    record = ct.train_corrector(images, labels, settings, tmp_path / "c.pth", predictions=predictions,
                                progress=False)
    assert record["predicted_cases"] == 1
    assert 0 in starts and any(s > 0 for s in starts)  # c0 from its empty prediction, c1 from synthetic errors


def test_corrector_files_never_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "click_corrector.pth"
    torch.save({cc.CLICK_CORRECTOR_RECORD: "{}", "x": Evil()}, bad, pickle_protocol=2)
    with pytest.raises(SamnnuError, match="refused"):
        cc.load_corrector(bad)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(SamnnuError, match="not a trained click corrector"):
        cc.load_corrector(tmp_path / "other.pth")
    torch.save({cc.CLICK_CORRECTOR_RECORD: json.dumps({"features": [4, 8, 8, 8]}), "a": torch.zeros(1)},
               tmp_path / "wrong.pth")
    with pytest.raises(SamnnuError, match="do not fit the corrector"):
        cc.load_corrector(tmp_path / "wrong.pth")


def test_session_clicks_go_to_the_corrector_in_3d():
    """With a corrector, a click edits the label around it in 3D (here: the crop made foreground), on many
    slices; with ``corrector=false`` the refiner's 2D edit answers instead."""
    from samnnu.interactive.refiner import InteractiveSession, RefineOptions, SliceRefiner

    target = ellipsoid()
    image = target * 100.0 + np.random.default_rng(0).normal(0, 5, target.shape)
    seg = target.astype(np.int16)
    seg[:8] = 0  # the prediction missed the first slices
    refiner = SliceRefiner.create("tiny")
    refiner.corrector = corrector_answering(50.0)
    assert "3D click corrector" in refiner.description
    session = InteractiveSession(refiner, image, seg, None, {"A": 1}, reference=target.astype(np.int16))
    session.click("A", (6, 15, 15), True)
    changed = (session.segmentation != seg).any(axis=(1, 2))
    assert changed.sum() >= 10 and refiner.corrector.stats["runs"] == 1
    window = cc.crop_window((6, 15, 15), target.shape, SMALL_CROP)
    assert (session.segmentation[window] == 1).all()
    plain = InteractiveSession(refiner, image, seg, None, {"A": 1}, options=RefineOptions(corrector=False))
    plain.click("A", (6, 15, 15), True)
    assert (plain.segmentation != seg).any(axis=(1, 2)).sum() <= 1 and refiner.corrector.stats["runs"] == 1
    assert RefineOptions.parse(["corrector=false"]).corrector is False
    assert RefineOptions.parse(["corrector_mirroring=false"]).corrector_mirroring is False


def test_apply_answers_clicks_in_turn_and_remembers_the_first_ones():
    target = ellipsoid()
    image = cc.normalize_image(target * 100.0 + np.random.default_rng(0).normal(0, 5, target.shape))
    start = target.copy()
    start[:8] = False
    corrector = corrector_answering(0.0)
    clicks = [Point((6, 15, 15), True), Point((5, 15, 15), True), Point((10, 15, 15), False)]
    one_by_one = start
    for i in range(3):
        one_by_one = corrector(image, one_by_one, clicks[:i + 1])
    runs = corrector.stats["runs"]
    assert np.array_equal(corrector.apply(image, start, clicks[:2]), corrector.apply(image, start, clicks[:2]))
    assert corrector.stats["runs"] == runs + 2  # the second call was remembered
    np.testing.assert_array_equal(corrector.apply(image, start, clicks), one_by_one)
    assert corrector.stats["runs"] == runs + 3  # one more click, one more run
    other = start.copy()
    other[10] = False  # another starting mask: answered afresh
    corrector.apply(image, other, clicks[:1])
    assert corrector.stats["runs"] == runs + 4


def test_train_prompts_defaults_differ_for_the_corrector_and_the_prompt_path(monkeypatch, tmp_path):
    """samnnu_train_prompts: the corrector trains 2000 steps of 5 clicks per sample unless told otherwise
    (measured better than 600 x 3 and 1000 x 5, docs/benchmarks.md), the 2D prompt path keeps 600 steps of 3 clicks."""
    import inspect

    from samnnu import cli
    from samnnu.interactive import prompt_training

    seen = {}

    def fake(name, real):
        def run(dataset, fold, **kwargs):
            bound = inspect.signature(real).bind(dataset, fold, **kwargs)
            bound.apply_defaults()  # what the real function would run with
            args = seen[name] = bound.arguments
            return {"file": "f", "steps": args["steps"], "samples": 1, "cases": 1, "predicted_cases": 1,
                    "rounds": args["rounds"], "history": [{"dice_before": 0.5, "dice_after": 0.6,
                                                           "dice_first": 0.5, "dice_last": 0.6}]}
        return run

    corrector, prompts = ct.train_click_corrector, prompt_training.train_prompts
    monkeypatch.setattr(ct, "train_click_corrector", fake("corrector", corrector))
    monkeypatch.setattr(prompt_training, "train_prompts", fake("prompts", prompts))
    root = ["--data-root", str(tmp_path)]
    assert cli.train_prompts_main(["4", "0", "--corrector", *root]) == 0
    assert (seen["corrector"]["steps"], seen["corrector"]["rounds"], seen["corrector"]["lr"],
            seen["corrector"]["batch_size"]) == (2000, 5, 1e-3, 4)
    assert cli.train_prompts_main(["4", "0", *root]) == 0
    assert (seen["prompts"]["steps"], seen["prompts"]["rounds"], seen["prompts"]["lr"],
            seen["prompts"]["batch_size"]) == (600, 3, 1e-4, 8)
    assert cli.train_prompts_main(["4", "0", "--corrector", "--steps", "7", "--rounds", "2", *root]) == 0
    assert (seen["corrector"]["steps"], seen["corrector"]["rounds"]) == (7, 2)  # given values win
    assert seen["corrector"]["features"] == ct.FEATURES and seen["corrector"]["precision"] is None
    assert cli.train_prompts_main(["4", "0", "--corrector", "--features", "4", "8", "--precision", "fp32",
                                   *root]) == 0
    assert (seen["corrector"]["features"], seen["corrector"]["precision"]) == ((4, 8), "fp32")
    assert cli.train_prompts_main(["4", "0", "--features", "4", "8", *root]) != 0  # a corrector option
    assert cli.train_prompts_main(["4", "0", "--corrector", "--init", "c.pth", *root]) == 0
    assert seen["corrector"]["init"] == "c.pth"
    assert seen["corrector"]["mirror"] is False
    assert cli.train_prompts_main(["4", "0", "--corrector", "--mirror", *root]) == 0
    assert seen["corrector"]["mirror"] is True
    assert cli.train_prompts_main(["4", "0", "--mirror", *root]) != 0  # a corrector option
    assert seen["corrector"]["predicted_share"] == 0.5
    assert cli.train_prompts_main(["4", "0", "--corrector", "--predicted-share", "0.9", *root]) == 0
    assert seen["corrector"]["predicted_share"] == 0.9
    assert cli.train_prompts_main(["4", "0", "--predicted-share", "0.9", *root]) != 0  # a corrector option
    assert seen["corrector"]["box_share"] == 0.3  # boxes too, unless told otherwise
    assert cli.train_prompts_main(["4", "0", "--corrector", "--box-share", "0", *root]) == 0
    assert seen["corrector"]["box_share"] == 0.0
    assert cli.train_prompts_main(["4", "0", "--box-share", "0.3", *root]) != 0  # a corrector option


def test_box_input_draws_the_filled_box_on_its_slice_and_no_click():
    image = np.random.default_rng(0).random((20, 30, 30)).astype(np.float32)
    x, window = cc.box_input(image, 12, (10, 11, 14, 20), crop=SMALL_CROP)
    assert x.shape == (4, *SMALL_CROP)
    assert window == cc.crop_window((12, 12, 15), image.shape, SMALL_CROP)
    np.testing.assert_array_equal(x[0, :, :, :], image[window])
    drawn = np.zeros(image.shape, dtype=bool)
    drawn[12, 10:15, 11:21] = True
    np.testing.assert_array_equal(x[1] > 0, drawn[window])
    assert not x[2:].any()  # no click
    moved, shifted = cc.box_input(image, 12, (10, 11, 14, 20), center=(8, 12, 15), crop=SMALL_CROP)
    assert shifted != window and np.array_equal(moved[1] > 0, drawn[shifted])


def test_training_boxes_are_drawn_on_large_slices_of_the_label():
    target = ellipsoid()
    areas = target.sum(axis=(1, 2))
    rng = np.random.default_rng(0)
    for _ in range(20):
        z, (y0, x0, y1, x1) = ct.training_box(target, rng)
        assert areas[z] >= 0.5 * areas.max()
        ys, xs = np.nonzero(target[z])
        assert ys.min() - 1 <= y0 <= ys.min() and xs.min() - 1 <= x0 <= xs.min()  # tight, or a voxel loose
        assert ys.max() <= y1 <= ys.max() + 1 and xs.max() <= x1 <= xs.max() + 1


def test_training_with_box_starts_writes_a_corrector_that_answers_boxes(tmp_path, monkeypatch):
    """box_share 1: every sample's first round is a box (with empty click channels), and the corrector
    written says it answers boxes; one trained without box starts refuses them in one line."""
    images, labels = _toy_cases(2)
    boxes = []
    real = ct.box_input

    def record_boxes(image, z, rect, center=None, crop=cc.CROP):
        boxes.append((z, rect))
        return real(image, z, rect, center, crop)

    monkeypatch.setattr(ct, "box_input", record_boxes)
    settings = ct.CorrectorSettings("toy", "0", 2, 3, 2, 1e-3, 0, crop=SMALL_CROP, features=SMALL_FEATURES,
                                    box_share=1.0)
    record = ct.train_corrector(images, labels, settings, tmp_path / "c.pth", progress=False)
    assert len(boxes) == 2 * 3  # one box per sample, in the first round only
    assert record["box_share"] == 1.0
    loaded = cc.load_corrector(tmp_path / "c.pth")
    assert loaded.boxes
    answer = loaded.box(cc.normalize_image(images["c0"]), 10, (8, 9, 20, 21))
    assert answer.shape == labels["c0"].shape and answer.dtype == bool and loaded.stats["runs"] in (1, 2)
    plain = ct.train_corrector(images, labels, ct.CorrectorSettings("toy", "0", 1, 2, 1, 1e-3, 0, crop=SMALL_CROP,
                                                                    features=SMALL_FEATURES), tmp_path / "p.pth",
                               progress=False)
    assert plain["box_share"] == 0.0 and len(boxes) == 6
    with pytest.raises(SamnnuError, match="not trained on boxes"):
        cc.load_corrector(tmp_path / "p.pth").box(cc.normalize_image(images["c0"]), 10, (8, 9, 20, 21))
    from samnnu.reporting.report import describe_corrector  # the fold report says what it answers

    assert "answers the clicks and one-slice boxes" in describe_corrector(tmp_path / "c.pth")
    assert "answers the clicks of" in describe_corrector(tmp_path / "p.pth")


class _Bright(torch.nn.Module):
    """A network answering the bright voxels of its image channel: (N, 4, *crop) -> (N, 1, *crop) logits."""

    def forward(self, x):
        return 100.0 * (x[:, :1] - 0.5)


def test_a_box_answer_reaching_the_crop_edge_runs_again_centred_on_it():
    """A structure longer than the crop: the first answer reaches the window's inner face, so the corrector
    runs again on the window centred on that answer, and both answers make the mask; a structure inside the
    first window gets one run."""
    corrector = cc.ClickCorrector(_Bright(), {"crop": list(SMALL_CROP), "box_share": 0.5, "file": "x"})
    image = np.zeros((40, 30, 30), dtype=np.float32)
    image[14:36, 5:20, 5:20] = 1.0
    out = corrector.box(image, 20, (5, 5, 19, 19))
    assert corrector.stats["runs"] == 2
    first = cc.crop_window((20, 12, 12), image.shape, SMALL_CROP)
    second = cc.crop_window((21, 12, 12), image.shape, SMALL_CROP)  # the middle of the first answer (z 14..27)
    assert (first[0].start, second[0].start) == (12, 13)
    expected = np.zeros(image.shape, dtype=bool)
    expected[first] = expected[second] = True
    np.testing.assert_array_equal(out, expected & (image > 0))
    small = np.zeros_like(image)
    small[2:10, 5:20, 5:20] = 1.0
    once = cc.ClickCorrector(_Bright(), {"crop": list(SMALL_CROP), "box_share": 0.5, "file": "x"})
    np.testing.assert_array_equal(once.box(small, 5, (5, 5, 19, 19)), small > 0)
    assert once.stats["runs"] == 1


def test_a_one_slice_box_goes_to_a_corrector_trained_on_boxes():
    """A box on one slice is answered by a box-trained corrector in 3D (no slice decoded); with
    corrector_boxes=false, or a corrector trained on clicks only, the refiner decodes and propagates it."""
    from samnnu.interactive.refiner import InteractiveSession, RefineOptions, SliceRefiner

    target = ellipsoid()
    image = target * 100.0 + np.random.default_rng(0).normal(0, 5, target.shape)
    empty = np.zeros(target.shape, dtype=np.int16)
    refiner = SliceRefiner.create("tiny")
    refiner.corrector = corrector_answering(50.0)
    refiner.corrector.record["box_share"] = 0.3
    assert "clicks and boxes by the 3D click corrector" in refiner.description
    session = InteractiveSession(refiner, image, empty, None, {"A": 1})
    decodes = refiner.stats["decodes"]
    session.box("A", (10, 9, 9), (10, 21, 21))
    assert refiner.corrector.stats["runs"] == 1 and refiner.stats["decodes"] == decodes
    window = cc.crop_window((10, 15, 15), target.shape, SMALL_CROP)
    assert (session.segmentation[window] == 1).all() and session.segmentation.sum() == np.prod(SMALL_CROP)
    session.click("A", (10, 15, 15), False)  # a click then edits the box's answer with the corrector
    assert refiner.corrector.stats["runs"] == 2 and refiner.stats["decodes"] == decodes
    plain = InteractiveSession(refiner, image, empty, None, {"A": 1}, options=RefineOptions(corrector_boxes=False))
    plain.box("A", (10, 9, 9), (10, 21, 21))
    assert refiner.corrector.stats["runs"] == 2 and refiner.stats["decodes"] > decodes
    refiner.corrector.record["box_share"] = 0.0
    assert "clicks by the 3D click corrector" in refiner.description
    clicks_only = InteractiveSession(refiner, image, empty, None, {"A": 1})
    clicks_only.box("A", (10, 9, 9), (10, 21, 21))
    assert refiner.corrector.stats["runs"] == 2
    assert RefineOptions.parse(["corrector_boxes=false"]).corrector_boxes is False
