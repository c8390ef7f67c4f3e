"""Interactive prediction: the prompts schema and its one-line errors, voxel/world coordinates, automatic
prompts, the simulated user's clicks, propagation through slices, the pretrained refiner on a synthetic
slice, and the entry points (``samnnu_predict --prompts/--auto-prompts``, ``samnnu_refine``) on the tiny
trained model."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import demo_cases
from samnnu.demo_data import demo_dataset_path
from samnnu.errors import SamnnuError
from samnnu.interactive.auto_prompts import auto_prompts, deepest_voxel
from samnnu.interactive.prompts import (
    Box,
    ImageGeometry,
    Lasso,
    ObjectPrompt,
    Point,
    Stroke,
    load_prompts,
    prompts_to_json,
    voxel_to_world,
    world_to_voxel,
)
from samnnu.interactive.refiner import (
    InteractiveSession,
    ObjectResult,
    RefineOptions,
    SliceLogits,
    click_box,
    compose_label,
    edit_slice,
    mask_confidence,
    merge_label,
    refine_object,
)
from samnnu.interactive.simulated_user import longest_path, next_click, next_scribble

LABELS = {"Anterior": 1, "Posterior": 2}


def rotated_geometry(size=(20, 30, 40)) -> ImageGeometry:
    """A grid with anisotropic spacing, a shifted origin and a direction rotated about two axes."""
    a, b = 0.4, -0.25
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return ImageGeometry(size, (0.7, 1.3, 2.5), (12.5, -40.0, 7.25), tuple((rz @ rx).ravel()))


def sitk_image(geometry: ImageGeometry) -> sitk.Image:
    image = sitk.Image([geometry.size[2], geometry.size[1], geometry.size[0]], sitk.sitkUInt8)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


# --------------------------------------------------------------------------------------------
# coordinates
# --------------------------------------------------------------------------------------------
def test_voxel_world_round_trip_matches_simpleitk():
    geometry = rotated_geometry()
    image = sitk_image(geometry)
    assert ImageGeometry.from_sitk(image) == geometry
    rng = np.random.default_rng(0)
    for _ in range(20):
        zyx = rng.integers(0, geometry.size)
        world = voxel_to_world(zyx, geometry)
        expected = image.TransformIndexToPhysicalPoint([int(zyx[2]), int(zyx[1]), int(zyx[0])])
        np.testing.assert_allclose(world, expected, atol=1e-9)
        np.testing.assert_allclose(world_to_voxel(world, geometry), zyx, atol=1e-9)
        # a continuous point too
        point = rng.uniform(-50, 50, 3)
        np.testing.assert_allclose(world_to_voxel(point, geometry),
                                   image.TransformPhysicalPointToContinuousIndex(point.tolist())[::-1], atol=1e-9)
    # the rotation matters: with an identity direction the answer would differ
    plain = ImageGeometry(geometry.size, geometry.spacing, geometry.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert not np.allclose(voxel_to_world((5, 6, 7), plain), voxel_to_world((5, 6, 7), geometry))


# --------------------------------------------------------------------------------------------
# the prompts file
# --------------------------------------------------------------------------------------------
def test_prompts_file_is_parsed_in_voxel_and_world_coordinates(tmp_path):
    geometry = rotated_geometry()
    world = voxel_to_world((4, 10, 30), geometry).tolist()
    corner = voxel_to_world((6, 1, 2), geometry) + 0.1  # a little off the voxel centre: rounds to it
    data = {"version": 1, "cases": {"a": [
        {"label": "Anterior", "coordinates": "voxel", "box": [[3, 20, 30], [3, 5, 10]], "positive": [[3, 12, 15]]},
        {"label": 2, "coordinates": "world", "positive": [world], "negative": [corner.tolist()]},
    ], "b": []}}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    prompts = load_prompts(path, LABELS, {"a": geometry, "b": geometry, "c": geometry})
    assert set(prompts) == {"a", "b"} and prompts["b"] == []
    first, second = prompts["a"]
    assert first.label == 1 and first.box == Box((3, 5, 10), (3, 20, 30))  # corners sorted per axis
    assert first.points == (Point((3, 12, 15), True),)
    assert second.label == 2 and second.box is None
    assert second.points == (Point((4, 10, 30), True), Point((6, 1, 2), False))
    assert "case 'a', prompt 2" in second.source
    # what prompts_to_json writes reads back to the same prompts
    names = {1: "Anterior", 2: "Posterior"}
    again = load_prompts(prompts_to_json(prompts, names), LABELS, {"a": geometry, "b": geometry})
    assert [(p.label, p.box, p.points) for p in again["a"]] == [(p.label, p.box, p.points) for p in prompts["a"]]


def test_scribbles_and_lasso_in_schema_version_2(tmp_path):
    geometry = rotated_geometry()
    world = [voxel_to_world(v, geometry).tolist() for v in ((5, 10, 10), (5, 13, 16))]
    data = {"version": 2, "cases": {"a": [
        {"label": 1, "coordinates": "voxel", "scribbles": [[[3, 10, 10], [3, 10, 14], [3, 12, 16]]],
         "negative_scribbles": [[[3, 2, 2]]], "lasso": [[4, 5, 5], [4, 5, 9], [4, 9, 9], [4, 9, 5]]},
        {"label": 2, "coordinates": "world", "scribbles": [world]},
    ]}}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    first, second = load_prompts(path, LABELS, {"a": geometry})["a"]
    pos, neg = first.strokes
    # the polyline's voxels, one per step along its longer axis, both ends included, in drawing order
    assert pos.positive and pos.voxels == ((3, 10, 10), (3, 10, 11), (3, 10, 12), (3, 10, 13), (3, 10, 14),
                                           (3, 11, 15), (3, 12, 16))
    assert not neg.positive and neg.voxels == ((3, 2, 2),)
    assert [p.index for p in pos.sample()] == [(3, 10, 10), (3, 10, 13), (3, 12, 16)]
    assert first.lasso == Lasso(4, ((5, 5), (5, 9), (9, 9), (9, 5)))
    inside = first.lasso.mask((20, 20))
    assert inside.sum() == 25 and inside[5:10, 5:10].all()  # the outline and what it encloses
    assert first.lasso.box((20, 20)) == Box((4, 5, 5), (4, 9, 9))
    assert first.slices() == [3, 4]
    assert second.strokes[0].voxels[0] == (5, 10, 10) and second.strokes[0].voxels[-1] == (5, 13, 16)
    again = load_prompts(prompts_to_json({"a": [first, second]}, {1: "Anterior", 2: "Posterior"}), LABELS,
                         {"a": geometry})["a"]
    assert [(p.strokes, p.lasso) for p in again] == [(p.strokes, p.lasso) for p in (first, second)]
    # a version-1 file still loads
    path.write_text(json.dumps({"version": 1, "cases": {"a": [GOOD]}}))
    assert load_prompts(path, LABELS, {"a": geometry})["a"][0].points == (Point((1, 2, 3), True),)


@pytest.mark.parametrize("entry,expected", [
    ({"scribbles": [[[1, 2, 3], [2, 2, 3]]]}, "scribbles 1 spans slices z = 1, 2; draw it on one slice"),
    ({"scribbles": [[]]}, "'scribbles' must be a list of scribbles"),
    ({"negative_scribbles": [[[1, 2, 50]]]}, "negative_scribbles 1, point 1 at voxel (z, y, x) [1, 2, 50] lies outside"),
    ({"lasso": [[1, 2, 3], [1, 4, 5]]}, "'lasso' must be an outline of at least 3 points"),
    ({"lasso": [[1, 2, 3], [1, 4, 5], [3, 4, 4]]}, "lasso spans slices z = 1, 3"),
])
def test_bad_scribbles_and_lassos(tmp_path, entry, expected):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"version": 2, "cases": {"case7": [dict(label=1, coordinates="voxel", **entry)]}}))
    with pytest.raises(SamnnuError) as e:
        load_prompts(path, LABELS, {"case7": rotated_geometry()})
    assert "\n" not in str(e.value) and "case 'case7', prompt 1" in str(e.value) and expected in str(e.value), \
        str(e.value)


GOOD = {"label": "Anterior", "coordinates": "voxel", "positive": [[1, 2, 3]]}


@pytest.mark.parametrize("entry,expected", [
    ({"label": "Hippocampus", "coordinates": "voxel", "positive": [[1, 2, 3]]}, "no label named 'Hippocampus'"),
    ({"label": 7, "coordinates": "voxel", "positive": [[1, 2, 3]]}, "no label with value 7"),
    ({"label": 0, "coordinates": "voxel", "positive": [[1, 2, 3]]}, "no label with value 0"),
    ({"coordinates": "voxel", "positive": [[1, 2, 3]]}, "'label' is missing"),
    ({"label": "Anterior", "coordinates": "pixel", "positive": [[1, 2, 3]]}, "'coordinates' must be"),
    ({"label": "Anterior", "coordinates": "voxel"}, "give a 'box', 'positive'/'negative' points"),
    ({"label": "Anterior", "coordinates": "voxel", "positive": [[20, 2, 3]]},
     "positive point 1 at voxel (z, y, x) [20, 2, 3] lies outside the image (size z, y, x = 20, 30, 40)"),
    ({"label": "Anterior", "coordinates": "voxel", "negative": [[0, 0, 0], [-1, 2, 3]]}, "negative point 2 at voxel"),
    ({"label": "Anterior", "coordinates": "voxel", "box": [[0, 0, 0], [5, 30, 5]]}, "box corner 2 at voxel"),
    ({"label": "Anterior", "coordinates": "world", "positive": [[1e4, 0, 0]]}, "positive point 1 at world"),
    ({"label": "Anterior", "coordinates": "voxel", "positive": [[1.5, 2, 3]]}, "must be integer indices"),
    ({"label": "Anterior", "coordinates": "voxel", "positive": [[1, 2]]}, "must be 3 numbers"),
    ({"label": "Anterior", "coordinates": "voxel", "box": [[1, 2, 3]]}, "'box' must be two opposite corners"),
    ({"label": "Anterior", "coordinates": "voxel", "positive": [[1, 2, 3]], "colour": "red"}, "unknown key(s)"),
], ids=["label-name", "label-value", "background", "no-label", "coordinates", "empty", "outside", "negative-outside",
        "box-outside", "world-outside", "fractional", "two-numbers", "one-corner", "unknown-key"])
def test_bad_prompts_give_one_line_naming_case_and_prompt(tmp_path, entry, expected):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"cases": {"case7": [GOOD, entry]}}))
    with pytest.raises(SamnnuError) as e:
        load_prompts(path, LABELS, {"case7": rotated_geometry()})
    message = str(e.value)
    assert "\n" not in message and expected in message, message
    assert message.startswith(f"{path}: case 'case7', prompt 2"), message


@pytest.mark.parametrize("text,expected", [
    ('{"cases": {"a": [', "not valid JSON (line 1"),
    ('[1, 2]', "expected an object"),
    ('{"cases": {}, "extra": 1}', "unknown top-level key(s) ['extra']"),
    ('{"version": 3, "cases": {}}', "schema version 3 is not supported (supported: 1, 2)"),
    ('{"version": 1, "cases": {"case7": [{"label": 1, "coordinates": "voxel", "lasso": [[1, 1, 1]]}]}}',
     "prompt 1 (label 1): lasso need schema version 2"),
    ('{"cases": {"a": {"label": 1}}}', "case 'a': expected a list of prompt objects"),
    ('{"cases": {"nope": []}}', "case 'nope': no such case in the input folder (cases: case7)"),
])
def test_malformed_prompt_files(tmp_path, text, expected):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(SamnnuError) as e:
        load_prompts(path, LABELS, {"case7": rotated_geometry()})
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)
    with pytest.raises(SamnnuError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.json", LABELS, {})


ABSURD = [[1e29, 0, 0], [0, -1e29, 0], [10 ** 29, 0, 0], [0, 0, 1e308], [float("nan"), 0, 0], [0, float("inf"), 0],
          [40, 0, 0], [-21, 0, 0]]  # the last two: just beyond the image by more than its extent (voxels and mm)


@pytest.mark.parametrize("coordinates", ["voxel", "world"])
def test_absurd_prompt_coordinates_are_one_line_errors(tmp_path, coordinates):
    """Non-finite points, points beyond the image by more than its extent and values no integer index can
    hold: one line naming file, case and prompt, never a traceback or a number of hundreds of digits."""
    geometry = ImageGeometry((20, 30, 40), (0.5, 0.5, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for point in ABSURD:
        path = tmp_path / "prompts.json"
        path.write_text(json.dumps({"cases": {"case7": [GOOD, {"label": "Posterior", "coordinates": coordinates,
                                                              "box": [[0, 0, 0], [1, 1, 1]], "negative": [point]}]}}))
        before = path.read_bytes()
        with pytest.raises(SamnnuError) as e:
            load_prompts(path, LABELS, {"case7": geometry})
        message = str(e.value)
        assert message.startswith(f"{path}: case 'case7', prompt 2 (label \"Posterior\"): negative point 1"), message
        assert "\n" not in message and len(message) < 300, message
        finite = np.all(np.isfinite(np.asarray(point, float)))
        assert ("lies far outside the image (size z, y, x = 20, 30, 40)" if finite else "is not finite") in message
        assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------
# automatic prompts and the simulated user (pure functions on synthetic arrays)
# --------------------------------------------------------------------------------------------
def test_auto_prompts_one_per_component_at_the_most_confident_voxel():
    seg = np.zeros((12, 20, 20), np.uint8)
    seg[2:9, 3:10, 4:12] = 1  # large component of label 1
    seg[10:12, 15:17, 15:17] = 1  # 8 voxels: under 10 % of the large one, no prompt
    seg[1:6, 14:19, 13:18] = 2  # label 2: a 5x5x5 cube
    seg[5, 3, 4:12] = 0  # the large component's slice 5 loses one row
    probs = np.zeros((3, *seg.shape), np.float32)
    probs[1][seg == 1] = 0.8
    probs[1, 6, 5, 9] = 0.95  # the single most confident voxel of label 1
    probs[2][seg == 2] = 0.9  # label 2: all tied, the deepest voxel wins
    prompts = auto_prompts(seg, [1, 2], probs)
    assert [p.label for p in prompts] == [1, 2]
    one, two = prompts
    assert one.points == (Point((6, 5, 9), True),)
    assert one.box == Box((6, 3, 4), (6, 9, 11))  # the component's rectangle on the key slice
    assert two.points == (Point((3, 16, 15), True),)  # its centre
    assert two.box == Box((3, 14, 13), (3, 18, 17))
    # without probabilities: the voxel deepest inside
    assert auto_prompts(seg, [2], None)[0].points[0].index == two.points[0].index
    # a tiny component is kept when it is the only one
    lone = np.zeros((4, 4, 4), np.uint8)
    lone[1, 1, 1] = 1
    assert auto_prompts(lone, [1, 2])[0].points == (Point((1, 1, 1), True),)


def test_deepest_voxel_respects_the_image_border_and_spacing():
    mask = np.zeros((5, 9, 9), bool)
    mask[:, :, 0:5] = True  # fills the image along z and y and touches x = 0: the border counts as surface
    assert deepest_voxel(mask) == (2, 2, 2)
    slab = np.zeros((9, 9, 9), bool)
    slab[2:7] = True
    assert deepest_voxel(slab) == (4, 2, 2)  # in voxels the slab's thickness limits the depth
    # with 10 mm slices the in-plane distance limits it: the centre in y, x wins
    assert deepest_voxel(slab, spacing=(10.0, 1.0, 1.0))[1:] == (4, 4)


def test_next_click_goes_to_the_largest_error_region():
    ref = np.zeros((10, 20, 20), bool)
    ref[2:8, 2:12, 2:12] = True
    pred = ref.copy()
    pred[2:7, 4:9, 4:9] = False  # a missed 5x5x5 block (125 voxels)
    pred[1, 15:18, 15:18] = True  # a spurious 9-voxel patch
    click = next_click(pred, ref)
    assert click == Point((4, 6, 6), True)  # the centre of the missed block, positive
    pred[0:7, 12:19, 12:19] = True  # now a spurious 7x7x7 block (holding the patch) outweighs the miss
    assert next_click(pred, ref) == Point((3, 15, 15), False)
    pred[0:7, 12:19, 12:19] = False
    pred[0:5, 13:18, 13:18] = True  # 125 voxels each: the miss wins the tie
    assert next_click(pred, ref).positive
    assert next_click(ref, ref) is None
    with pytest.raises(ValueError):
        next_click(ref[:5], ref)


def test_next_scribble_runs_along_the_largest_error_region_on_its_largest_slice():
    ref = np.zeros((10, 30, 30), bool)
    ref[2:8, 2:26, 2:26] = True
    pred = ref.copy()
    pred[3:6, 10:15, 4:24] = False  # a missed bar, 20 voxels long, 5 wide, on slices 3-5
    pred[4, 12, 4:24] = True  # on slice 4 a thin line is found: slices 3 and 5 hold the most missed voxels
    pred[1, 27:29, 27:29] = True  # a small spurious patch
    stroke = next_scribble(pred, ref)
    assert stroke.positive and stroke.z == 3
    ys, xs = np.array([v[1] for v in stroke.voxels]), np.array([v[2] for v in stroke.voxels])
    missed = ref & ~pred
    assert all(missed[v] for v in stroke.voxels)  # never outside the error it corrects
    assert xs.max() - xs.min() >= 14 and set(ys) <= {11, 12, 13}  # along the bar's length, in its middle
    steps = np.abs(np.diff(np.stack([ys, xs]), axis=1))
    assert steps.max() <= 1 and (steps.sum(axis=0) > 0).all()  # each voxel a neighbour of the last, no repeats
    spurious = ref.copy()
    spurious[0:2, 0:8, 0:30] = True  # now a spurious slab outweighs everything: a negative stroke on slice 0
    stroke = next_scribble(spurious, ref)
    assert not stroke.positive and stroke.z == 0 and all(not ref[v] for v in stroke.voxels)
    single = ref.copy()
    single[4, 12, 12] = False  # one missed voxel: a one-voxel scribble
    assert next_scribble(single, ref) == Stroke(((4, 12, 12),), True)
    assert next_scribble(ref, ref) is None


def test_longest_path_goes_end_to_end_through_a_branched_skeleton():
    skeleton = np.zeros((9, 12), bool)
    skeleton[4, 1:11] = True  # a horizontal line with a short side branch
    skeleton[1:4, 6] = True
    path = longest_path(skeleton)
    assert {path[0], path[-1]} == {(4, 1), (4, 10)} and len(path) == 10
    with pytest.raises(ValueError):
        longest_path(np.zeros((3, 3), bool))


# --------------------------------------------------------------------------------------------
# propagation through slices, with a stand-in refiner whose answers are known
# --------------------------------------------------------------------------------------------
class ThresholdRefiner:
    """Stands in for SliceRefiner: inside the box (or around a positive click) it returns the bright voxels
    of the slice, minus a 1-voxel disc around negative clicks. Records what it was asked."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.mask_size = (8, 8)
        self.device = torch.device("cpu")
        self.calls = []

    def set_volume(self, image):
        assert image is self.image

    def probability_prompt(self, prob):
        return torch.zeros(1, 1, 8, 8)

    def decode(self, z, *, box=None, points=(), mask_input=None, multimask="sam"):
        self.calls.append((z, box, tuple(points)))
        bright = self.image[z] > 0.5
        region = np.zeros_like(bright)
        if box is not None:
            y0, x0, y1, x1 = box
            region[y0:y1 + 1, x0:x1 + 1] = True
        for p in points:
            if p.positive:
                region[max(0, p.index[1] - 3):p.index[1] + 4, max(0, p.index[2] - 3):p.index[2] + 4] = True
        out = bright & region
        for p in points:
            if not p.positive:
                out[max(0, p.index[1] - 1):p.index[1] + 2, max(0, p.index[2] - 1):p.index[2] + 2] = False
        return SliceLogits(torch.zeros(1, 1, 8, 8), np.where(out, 10.0, -10.0).astype(np.float32))


def cone_volume() -> np.ndarray:
    """(16, 24, 24): a bright square whose side shrinks away from slice 7; nothing on slices 0-1 and 14-15."""
    image = np.zeros((16, 24, 24), np.float32)
    for z in range(2, 14):
        r = 8 - abs(z - 7)
        image[z, 12 - r:12 + r + 1, 12 - r:12 + r + 1] = 1.0
    image[7, 1:3, 1:3] = 1.0  # a bright speck far from the object on the key slice
    return image


def test_box_on_one_slice_propagates_until_the_prompt_free_mask_ends():
    image = cone_volume()
    base = np.zeros(image.shape, bool)
    base[4:11] = image[4:11] > 0.5  # the prompt-free prediction saw slices 4-10 only
    refiner = ThresholdRefiner(image)
    prompt = ObjectPrompt(1, Box((7, 3, 3), (7, 21, 21)))
    result = refine_object(refiner, prompt, base, None, RefineOptions(margin=1))
    assert result.covered == list(range(4, 11))
    expected = image > 0.5
    expected[7, 1:3, 1:3] = False  # the speck is outside every box
    np.testing.assert_array_equal(result.mask[4:11], expected[4:11])
    assert not result.mask[:4].any() and not result.mask[11:].any()
    # each propagated slice got the box of its neighbour's mask, enlarged by the margin
    asked = {z: box for z, box, _ in refiner.calls}
    assert asked[7] == (3, 3, 21, 21) and asked[8] == (3, 3, 21, 21) and asked[6] == (3, 3, 21, 21)
    assert asked[9] == (4, 4, 20, 20) and asked[10] == (5, 5, 19, 19)  # slice 9's square: rows 6..18
    assert [z for z, _, _ in refiner.calls] == [7, 6, 5, 4, 8, 9, 10]
    # without the prompt-free stop, propagation runs until the mask vanishes
    result = refine_object(ThresholdRefiner(image), prompt, base, None, RefineOptions(margin=1, stop_at_base=False))
    assert result.covered == list(range(1, 15))  # slices 1 and 14 were decoded and came back empty
    np.testing.assert_array_equal(result.mask, expected)


class FadingRefiner(ThresholdRefiner):
    """ThresholdRefiner whose answers grow less confident away from slice 7: logits +-(4 - |z - 7|)."""

    def decode(self, z, **kw):
        out = super().decode(z, **kw)
        return SliceLogits(out.low, out.full / 10.0 * max(0.5, 4.0 - abs(z - 7)))


def test_propagation_stops_where_the_answer_loses_confidence():
    image, empty = cone_volume(), np.zeros((16, 24, 24), bool)
    prompt = ObjectPrompt(1, Box((7, 3, 3), (7, 21, 21)))
    # mean foreground probability: 0.982 on slice 7, 0.953 on 6 and 8, 0.881 on 5 and 9
    assert mask_confidence(np.array([[4.0, -4.0]])) == pytest.approx(0.982, abs=1e-3)
    assert mask_confidence(np.full((3, 3), -4.0)) == 0.0
    result = refine_object(FadingRefiner(image), prompt, empty, None,
                           RefineOptions(margin=1, stop_at_base=False, stop_confidence=0.9))
    assert result.covered == [6, 7, 8]
    expected = image > 0.5
    expected[7, 1:3, 1:3] = False
    np.testing.assert_array_equal(result.mask[6:9], expected[6:9])
    assert not result.mask[:6].any() and not result.mask[9:].any()  # slices 5 and 9 were refused
    # off (the default): the same answers run until the mask vanishes
    result = refine_object(FadingRefiner(image), prompt, empty, None, RefineOptions(margin=1, stop_at_base=False))
    assert result.covered == list(range(1, 15))
    with pytest.raises(SamnnuError, match="stop_confidence must lie in"):
        RefineOptions(stop_confidence=1.0)


def test_box_spanning_slices_bounds_propagation_and_clicks_add_seeds():
    image = cone_volume()
    base = image > 0.5
    prompt = ObjectPrompt(1, Box((5, 4, 4), (9, 20, 20)))
    result = refine_object(ThresholdRefiner(image), prompt, base, None, RefineOptions(margin=1))
    assert result.covered == [5, 6, 7, 8, 9]
    # clicks only: seeds on two slices, the gap between filled, outward until the prompt-free mask ends
    refiner = ThresholdRefiner(image)
    clicks = ObjectPrompt(1, None, (Point((6, 12, 12), True), Point((9, 12, 12), True)))
    base2 = np.zeros_like(base)
    base2[5:11] = base[5:11]
    replace_mode = RefineOptions(margin=1, clicks="replace", propagate_clicks=True)
    result = refine_object(refiner, clicks, base2, None, replace_mode)
    assert result.covered == [5, 6, 7, 8, 9, 10]
    seeds = [c for c in refiner.calls if c[2]]
    assert [c[0] for c in seeds] == [6, 9]
    # the seed slice's derived box: around the prompt-free mask there (side 2*7+1 from 5..19) plus the margin
    assert seeds[0][1] == (4, 4, 20, 20)
    # without propagation a click only changes its own slice
    result = refine_object(ThresholdRefiner(image), clicks, base2, None,
                           RefineOptions(margin=1, clicks="replace", propagate_clicks=False))
    assert result.covered == [6, 9]


def test_lasso_propagates_like_a_box_and_scribbles_are_kept():
    image = cone_volume()
    empty = np.zeros(image.shape, bool)
    refiner = ThresholdRefiner(image)
    lasso = ObjectPrompt(1, lasso=Lasso(7, ((3, 3), (3, 21), (21, 21), (21, 3))))
    result = refine_object(refiner, lasso, empty, None, RefineOptions(margin=1, stop_at_base=False))
    expected = image > 0.5
    expected[7, 1:3, 1:3] = False  # the speck lies outside the outline
    assert result.covered == list(range(1, 15))  # the lasso's slice, then outward until the mask vanishes
    np.testing.assert_array_equal(result.mask, expected)
    assert refiner.calls[0] == (7, (3, 3, 21, 21), ())  # its slice was decoded with the outline's box
    # a positive scribble on an empty slice: clicks along it, and its voxels are the label whatever the answer
    stroke = Stroke(((7, 1, 1), (7, 1, 2), (7, 1, 3), (7, 1, 4)), True)
    result = refine_object(ThresholdRefiner(image), ObjectPrompt(1, strokes=(stroke,)), empty, None, RefineOptions())
    assert result.covered == [7] and result.mask[7, 1, 1:5].all() and result.mask[7, 1:3, 1:3].all()
    # a negative scribble through the object removes exactly its voxels
    cut = Stroke(tuple((7, 12, x) for x in range(0, 24)), False)
    result = refine_object(ThresholdRefiner(image), ObjectPrompt(1, strokes=(cut,)), image > 0.5, None,
                           RefineOptions())
    assert not result.mask[7, 12].any() and result.mask[7, 9].sum() == 17  # rows away from the clicks: kept


def test_negative_click_alone_on_an_empty_slice_gives_nothing():
    image = cone_volume()
    refiner = ThresholdRefiner(image)
    prompt = ObjectPrompt(1, None, (Point((7, 12, 12), False),))
    empty = np.zeros(image.shape, bool)
    result = refine_object(refiner, prompt, empty, None, RefineOptions(clicks="replace"))
    assert result.covered == [7] and not result.mask.any() and refiner.calls == []
    result = refine_object(refiner, prompt, empty, None, RefineOptions(clicks="edit"))  # nothing to edit
    assert result.covered == [] and refiner.calls == []


def test_click_box_turns_clicks_into_box_changes():
    shape = (30, 40)
    rect = (10, 10, 20, 20)
    assert click_box(rect, [], 2, shape) == rect
    assert click_box(rect, [Point((0, 25, 12), True)], 2, shape) == (10, 10, 27, 20)  # stretched past the click
    assert click_box(rect, [Point((0, 15, 15), True)], 2, shape) == rect  # inside: unchanged
    assert click_box(None, [Point((0, 1, 38), True)], 2, shape) == (0, 36, 3, 39)  # a small box, clipped
    assert click_box(rect, [Point((0, 12, 15), False)], 2, shape) == (13, 10, 20, 20)  # nearest side: the top
    assert click_box(rect, [Point((0, 15, 19), False)], 2, shape) == (10, 10, 20, 18)  # nearest side: the right
    assert click_box(rect, [Point((0, 2, 2), False)], 2, shape) == rect  # outside: unchanged
    assert click_box((5, 5, 5, 9), [Point((0, 5, 7), False)], 2, shape) is None  # nothing left


def test_edit_slice_changes_only_the_clicked_component():
    current = np.zeros((12, 12), bool)
    current[2:6, 2:6] = True
    current[8:10, 8:10] = True
    refined = np.zeros_like(current)
    refined[2:6, 2:9] = True  # grows the first square to the right, drops the second
    refined[0, 0] = True  # a stray voxel elsewhere
    added = edit_slice(current, refined, [Point((0, 3, 7), True)])
    np.testing.assert_array_equal(added, current | (refined & ~current & (np.arange(12)[None, :] >= 6)))
    assert not added[0, 0]  # the stray voxel is not connected to the click
    removed = edit_slice(current, refined, [Point((0, 9, 9), False)])
    assert not removed[8:10, 8:10].any() and removed[2:6, 2:6].all()
    # a click the refiner disagrees with changes nothing
    assert (edit_slice(current, refined, [Point((0, 11, 0), True)]) == current).all()


def test_edit_mode_clicks_change_only_their_neighbourhood():
    image = cone_volume()
    reference = image > 0.5
    reference[7, 1:3, 1:3] = False
    base = reference.copy()
    base[6:9, :, 17:21] = False  # the prompt-free mask missed the right edge on slices 6-8
    options = RefineOptions(margin=1, clicks="edit", click_prompts="box", propagate_clicks=True)
    refiner = ThresholdRefiner(image)
    result = refine_object(refiner, ObjectPrompt(1, None, (Point((7, 12, 19), True),)), base, None, options)
    composed = compose_label(base, [result])
    np.testing.assert_array_equal(composed, reference)
    assert all(not pts for _, _, pts in refiner.calls)  # box mode: the refiner never got a point
    assert refiner.calls[0] == (7, (3, 3, 21, 20), ())  # the mask's box (x up to 16 + 1) stretched past the click
    # slices 6 and 8 got the edit's deepest voxel as a stretching click; on 5 and 9 that voxel is already in
    # the mask, so the edit stops there without decoding
    assert [z for z, _, _ in refiner.calls] == [7, 6, 8] and result.covered == [6, 7, 8]
    no_prop = refine_object(ThresholdRefiner(image), ObjectPrompt(1, None, (Point((7, 12, 19), True),)), base, None,
                            RefineOptions(margin=1, clicks="edit", click_prompts="box", propagate_clicks=False))
    assert no_prop.covered == [7]
    fixed = compose_label(base, [no_prop])
    assert fixed[7].sum() == reference[7].sum() and (fixed[6] == base[6]).all()


def test_compose_and_merge_replace_only_what_the_prompts_reached():
    base = np.zeros((4, 5, 5), bool)
    base[:, 1:3, 1:3] = True
    refined = np.zeros_like(base)
    refined[1, 0:4, 0:4] = True
    label = compose_label(base, [ObjectResult(refined, covered=[1, 2])])
    assert label[0].sum() == 4 and label[3].sum() == 4  # slices not reached keep the prompt-free mask
    assert label[1].sum() == 16 and label[2].sum() == 0  # reached slices are what the prompts produced
    seg = np.zeros((4, 5, 5), np.uint8)
    seg[base] = 1
    seg[:, 4, :] = 2
    seg[1, 3, 0] = 2  # a voxel of label 2 that the refined label 1 claims
    merged = merge_label(seg, 1, label)
    assert merged[1, 3, 0] == 1 and (merged[:, 4, :] == 2).all()  # label 2 keeps everything else
    assert merged[2, 1, 1] == 0  # label 1 lost on slice 2: background
    assert (merged == 1).sum() == label.sum()


def test_session_click_undo_and_status():
    image = cone_volume()
    reference = (image > 0.5).astype(np.uint8)
    reference[:, :3, :] = 0  # the speck is not part of the object
    seg = np.zeros(image.shape, np.uint8)
    seg[5:10] = reference[5:10]
    session = InteractiveSession(ThresholdRefiner(image), image, seg, None, {"Thing": 1},
                                 spacing=(2.0, 1.0, 1.0), reference=reference,
                                 options=RefineOptions(margin=1, stop_at_base=False, clicks="replace",
                                                       propagate_clicks=True))
    before = session.dice("Thing")
    assert before < 1.0 and session.volume_ml(1) == pytest.approx((seg == 1).sum() * 2.0 / 1000)
    session.click("Thing", (7, 12, 12), True)
    assert session.dice(1) == pytest.approx(1.0)  # propagation found the slices the prompt-free mask missed
    assert "Thing:" in session.describe(1) and "Dice 1.0000" in session.describe(1) and "1 click" in session.describe(1)
    session.click(1, (7, 12, 12), False)  # a negative click punches a hole on slice 7
    assert session.dice(1) < 1.0 and not session.label_mask(1)[7, 12, 12]
    assert session.undo() and session.dice(1) == pytest.approx(1.0)
    assert session.undo() and session.dice(1) == pytest.approx(before)
    assert not session.undo()
    with pytest.raises(SamnnuError, match="outside the image"):
        session.click(1, (16, 0, 0), True)
    with pytest.raises(SamnnuError, match="no label named 'Other'"):
        session.click("Other", (1, 1, 1), True)


def test_refine_loop_survives_bad_commands_and_keeps_the_mask(tmp_path, monkeypatch):
    """Every bad command, and one that fails inside the refiner, is one error line; the label map stays as
    it was and the session goes on to save it."""
    from samnnu.interactive.refine import RefineLoop

    image = cone_volume()
    geometry = ImageGeometry(image.shape, (0.5, 0.5, 2.0), (10.0, -5.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image_file = tmp_path / "image.nii.gz"
    sitk.WriteImage(sitk_image(geometry), str(image_file))
    (tmp_path / "a_file").write_text("keep me\n")
    inputs = {p: p.read_bytes() for p in (image_file, tmp_path / "a_file")}
    seg = np.zeros(image.shape, np.uint8)
    seg[5:10] = image[5:10] > 0.5
    session = InteractiveSession(ThresholdRefiner(image), image, seg, None, {"Thing": 1, "Other": 2},
                                 options=RefineOptions(margin=1, clicks="replace"))
    saved = tmp_path / "refined.nii.gz"
    loop = RefineLoop(session, geometry, image_file, saved, io.StringIO())
    assert loop.run(["click + 7 12 12"]) == 0
    good, history = session.segmentation.copy(), len(session.history)

    def run_one(command: str) -> str:
        loop.out = io.StringIO()
        loop.run([command])
        lines = loop.out.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("samnnu_refine: error: "), (command, lines)
        assert "Traceback" not in lines[0]
        np.testing.assert_array_equal(session.segmentation, good)
        assert len(session.history) == history
        return lines[0]

    bad = {
        "click + world nan 0 0": "is not finite",
        "click + world inf 0 0": "is not finite",
        "click - world 1e308 0 0": "far outside the image",  # 1e308 mm / 0.5 mm overflows to inf voxels
        "click + 1e29 0 0": "far outside the image",
        "click + -99999999999999999999999 0 0": "far outside the image",
        "click + nan 0 0": "is not finite",
        "click + 7 12 40": "lies outside the image",
        "box world 11 -4 7 1e400 0 0": "box corner 2 [Infinity, 0.0, 0.0] is not finite",  # corner 1 is voxel 2 2 2
        "box 0 0 0 1 1": "expected 6 coordinates",
        "click + 1 2": "expected 3 coordinates",
        "click": "expected '+' or '-'",
        "click * 1 2 3": "expected '+' or '-'",
        "click + a b c": "coordinates must be numbers",
        "label Nothing": "no label named 'Nothing'",
        "label 7": "no label with value 7",
        "label \u00b2": "neither a label name nor a label value",
        "label": "give one label name",
        'label "Thing': "cannot read the command",
        "frobnicate": "unknown command 'frobnicate'",
        f"save {tmp_path / 'missing' / 'x.nii.gz'}": "folder not found",
        f"save {tmp_path / 'a_file' / 'x.nii.gz'}": "is not a folder",
        f"save {tmp_path}/": "is a folder",
        f"save {tmp_path / 'refined'}": "give a file name with an image ending",
        f"save {tmp_path / 'refined.txt'}": "cannot be written",
        "save a.nii.gz b.nii.gz": "at most one path",
        "scribble 7 1 2": "expected '+' or '-'",
        "scribble + 7 1": "expected a slice Z and then (y, x) pairs, at least 1",
        "scribble + 7 1 2 3 99": "scribble point at voxel (z, y, x) [7, 3, 99] lies outside the image",
        "lasso 7 1 1 5 5": "expected a slice Z and then (y, x) pairs, at least 3",
        "lasso 7 1 1 5 5 x 1": "coordinates must be integer voxel indices",
        "lasso 99 1 1 5 5 1 5": "lasso point at voxel (z, y, x) [99, 1, 1] lies outside the image",
    }
    for command, expected in bad.items():
        line = run_one(command)
        assert expected in line, (command, line)
    assert loop.errors == len(bad)

    # a failure the loop did not foresee (here inside the refiner) is taken back: the click does not stay
    def broken(*args, **kwargs):
        raise RuntimeError("refiner broke\non two lines")

    with monkeypatch.context() as m:
        m.setattr(session.refiner, "decode", broken)
        assert "failed (RuntimeError: refiner broke on two lines)" in run_one("click + 8 12 12")

    # the session went on: what it saves is the state before the bad commands
    loop.out = io.StringIO()
    assert loop.run(["save", "quit", "click + 0 0 0"]) == len(bad) + 1
    assert loop.out.getvalue().splitlines() == [f"saved {saved}"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(saved))), good)
    assert not (tmp_path / "missing").exists()
    assert {p: p.read_bytes() for p in inputs} == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "image.nii.gz", "refined.nii.gz"]


# --------------------------------------------------------------------------------------------
# the pretrained refiner itself (LiteMedSAM at 256, one slice)
# --------------------------------------------------------------------------------------------
def test_refine_loop_scribble_and_lasso_commands():
    from samnnu.interactive.refine import RefineLoop

    image = cone_volume()
    geometry = ImageGeometry(image.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    session = InteractiveSession(ThresholdRefiner(image), image, np.zeros(image.shape, np.uint8), None,
                                 {"Thing": 1}, options=RefineOptions(margin=1, stop_at_base=False))
    loop = RefineLoop(session, geometry, "unused.nii.gz", None, io.StringIO())
    assert loop.run(["lasso 7 3 3 3 21 21 21 21 3"]) == 0
    expected = image > 0.5
    expected[7, 1:3, 1:3] = False
    np.testing.assert_array_equal(session.label_mask("Thing"), expected)  # the lasso propagated through the cone
    assert loop.run(["scribble - 7 12 0 12 23"]) == 0  # a cut through the key slice
    assert not session.label_mask("Thing")[7, 12].any() and session.label_mask("Thing")[7, 9].sum() == 17
    assert len(session.prompts()) == 1 and len(session.prompts()[0].strokes) == 1  # added to the lasso's object
    assert loop.run(["undo"]) == 0
    np.testing.assert_array_equal(session.label_mask("Thing"), expected)


def test_pretrained_litemedsam_segments_a_boxed_square():
    from samnnu.interactive.refiner import SliceRefiner

    torch.set_num_threads(1)
    refiner = SliceRefiner.create("litemedsam")
    image = np.full((1, 48, 64), 20.0, np.float32)
    image[0, 10:30, 30:52] = 200.0  # a bright rectangle, off-centre on a non-square slice
    refiner.set_volume(image)
    target = image[0] > 100
    out = refiner.decode(0, box=(9, 29, 30, 52))
    mask = out.full > 0
    dice = 2 * (mask & target).sum() / (mask.sum() + target.sum())
    assert dice > 0.85, dice
    assert out.low.shape == (1, 1, *refiner.mask_size)
    # a box elsewhere finds nothing like it: the box coordinates really are used
    other = refiner.decode(0, box=(35, 2, 46, 20)).full > 0
    assert (other & target).sum() < 0.05 * target.sum()
    assert refiner.stats["embeddings"] == 1 and refiner.stats["decodes"] == 2  # one embedding, reused


# --------------------------------------------------------------------------------------------
# entry points on the tiny trained model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def held_out(tmp_path_factory, demo_subset) -> tuple[Path, Path, str]:
    """(images, labels, case): two demo cases not used in training; ``case``, the first, is given a rotated,
    anisotropic grid."""
    _, used = demo_subset
    cases = [c for c in demo_cases() if c not in used][:2]
    root = tmp_path_factory.mktemp("interactive_inputs")
    src = demo_dataset_path()
    c, s = np.cos(0.3), np.sin(0.3)
    for sub in ("images", "labels"):
        (root / sub).mkdir()
        for case in cases:
            image = sitk.ReadImage(str(src / sub / f"{case}.nii.gz"))
            if case == cases[0]:
                image.SetSpacing((1.3, 0.8, 2.0))
                image.SetOrigin((12.5, -40.0, 7.25))
                image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
            sitk.WriteImage(image, str(root / sub / f"{case}.nii.gz"), useCompression=True)
    return root / "images", root / "labels", cases[0]


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


PREDICT = ["-d", "4", "-f", "0", "--device", "cpu", "--disable-tta", "--refiner-encoder", "tiny"]


@pytest.fixture
def reference_as_prediction(held_out, monkeypatch) -> np.ndarray:
    """The tiny model segments nothing after its 2 training iterations: for the prompted cases its
    prompt-free prediction is replaced by the case's reference (probabilities 0.05 / 0.95), so that the
    prompts have labels to refine and to keep. Returns the reference of the rotated case, (Z, Y, X)."""
    import samnnu.pipeline.prediction as prediction

    _, labels, case = held_out
    original = prediction._read_prediction

    def foreground_prediction(seg_file, probs_file):
        seg, probs = original(seg_file, probs_file)  # the real files are still read and checked
        reference = _read(labels / f"{Path(probs_file).name[:-len('.npz')]}.nii.gz")
        assert seg.shape == reference.shape and probs.shape[1:] == reference.shape
        return reference.astype(seg.dtype), np.stack([np.where(reference == c, 0.95, 0.05).astype(np.float32)
                                                      for c in range(probs.shape[0])])

    monkeypatch.setattr(prediction, "_read_prediction", foreground_prediction)
    return _read(labels / f"{case}.nii.gz")


@pytest.mark.slow
def test_predict_with_prompts(trained_folds, data_root, held_out, reference_as_prediction, tmp_path, capsys):
    from samnnu.cli import predict_main

    images, _, case = held_out
    base = reference_as_prediction
    shape = base.shape
    geometry = ImageGeometry.from_sitk(sitk.ReadImage(str(images / f"{case}.nii.gz")))
    z = int(np.argmax((base == 1).sum(axis=(1, 2))))
    y, x = deepest_voxel((base == 1)[z:z + 1])[1:]
    world = voxel_to_world((z, y, x), geometry).tolist()
    prompts = {"cases": {case: [
        {"label": "Anterior", "coordinates": "voxel", "box": [[z, 5, 5], [z, shape[1] - 6, shape[2] - 6]]},
        {"label": "Anterior", "coordinates": "world", "positive": [world]},
    ]}}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "prompted"
    used = tmp_path / "used.json"
    assert predict_main(["-i", str(images), "-o", str(out), "--prompts", str(tmp_path / "prompts.json"),
                         "--write-prompts", str(used), *PREDICT]) == 0
    assert "wrote 2 segmentations" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in images.iterdir())  # no temporary files
    # the case the file does not name is predicted exactly as without prompts
    plain = tmp_path / "plain"
    assert predict_main(["-i", str(images), "-o", str(plain), *PREDICT]) == 0
    other = [p.name for p in images.iterdir() if p.name != f"{case}.nii.gz"][0]
    np.testing.assert_array_equal(_read(out / other), _read(plain / other))
    assert sitk.ReadImage(str(out / other)).GetOrigin() == sitk.ReadImage(str(images / other)).GetOrigin()
    result = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    ref_image = sitk.ReadImage(str(images / f"{case}.nii.gz"))
    assert result.GetSize() == ref_image.GetSize()
    assert result.GetDirection() == pytest.approx(ref_image.GetDirection(), abs=1e-6)
    assert result.GetOrigin() == pytest.approx(ref_image.GetOrigin(), abs=1e-6)
    refined = sitk.GetArrayFromImage(result)
    assert set(np.unique(refined).tolist()) <= {0, 1, 2}
    # Posterior (not prompted) is kept wherever the refined Anterior does not claim a voxel
    keep = (base == 2) & (refined != 1)
    assert keep.any() and (refined[keep] == 2).all() and not ((refined == 2) & (base != 2)).any()
    # Anterior changed on the box's slice, and only on slices where the prompt-free Anterior was (the
    # propagation stops where it ends) or that the prompts name
    changed = set(np.nonzero(((refined == 1) != (base == 1)).any(axis=(1, 2)))[0].tolist())
    assert z in changed
    assert changed <= set(np.nonzero((base == 1).any(axis=(1, 2)))[0].tolist()) | {z}
    # the world click was resolved to the voxel it was computed from
    written = json.loads(used.read_text())["cases"][case]
    assert written[1]["positive"] == [[z, y, x]] and "automatic" not in written[1]
    assert written[0]["box"] == [[z, 5, 5], [z, shape[1] - 6, shape[2] - 6]]


@pytest.mark.slow
def test_predict_with_auto_prompts(trained_folds, data_root, held_out, reference_as_prediction, tmp_path):
    from samnnu.cli import predict_main

    images, _, case = held_out
    reference = reference_as_prediction
    out, used = tmp_path / "auto", tmp_path / "auto.json"
    assert predict_main(["-i", str(images), "-o", str(out), "--auto-prompts", "--write-prompts", str(used),
                         *PREDICT]) == 0
    entries = json.loads(used.read_text())["cases"][case]
    assert sorted(e["label"] for e in entries) == ["Anterior", "Posterior"]  # one component each here
    for e in entries:  # a one-slice box around the component, holding its positive click inside the label
        (lo, hi), (point,) = e["box"], e["positive"]
        assert e["automatic"] is True and lo[0] == hi[0] == point[0]
        value = LABELS[e["label"]]
        assert reference[tuple(point)] == value
        ys, xs = np.nonzero(reference[point[0]] == value)
        assert (lo[1], lo[2], hi[1], hi[2]) == (ys.min(), xs.min(), ys.max(), xs.max())
    result = _read(out / f"{case}.nii.gz")
    assert result.shape == reference.shape and set(np.unique(result).tolist()) <= {0, 1, 2}
    # fused 50/50 with probabilities of 0.95 / 0.05, the random tiny refiner's weak logits change nothing;
    # with fusion off (an option given on the command line) its answer shows
    assert (result == reference).all()
    assert predict_main(["-i", str(images), "-o", str(tmp_path / "unfused"), "--auto-prompts",
                         "--refine-option", "fuse_base=0", *PREDICT]) == 0
    assert (_read(tmp_path / "unfused" / f"{case}.nii.gz") != reference).any()


@pytest.mark.parametrize("prompts,expected", [
    ({"cases": {"not_a_case": [GOOD]}}, "case 'not_a_case': no such case in"),
    ({"cases": {"{case}": [GOOD, {"label": "Tail", "coordinates": "voxel", "positive": [[1, 2, 3]]}]}},
     "case '{case}', prompt 2 (label \"Tail\"): no label named 'Tail'"),
    ({"cases": {"{case}": [{"label": 1, "coordinates": "voxel", "box": [[0, 0, 0], [3, 4, 60]]}]}},
     "case '{case}', prompt 1 (label 1): box corner 2 at voxel (z, y, x) [3, 4, 60] lies outside the image"),
    ({"cases": {"{case}": [{"label": 1, "coordinates": "world", "positive": [[1e29, 0, 0]]}]}},
     "case '{case}', prompt 1 (label 1): positive point 1 at world (x, y, z) [1e+29, 0, 0] mm lies far outside"),
    ("{ not json", "not valid JSON"),
], ids=["unknown-case", "unknown-label", "outside", "absurd", "malformed"])
def test_predict_prompt_errors_write_nothing(trained_folds, data_root, held_out, tmp_path, capsys, prompts, expected):
    from samnnu.cli import predict_main

    images, _, case = held_out
    path = tmp_path / "prompts.json"
    text = prompts if isinstance(prompts, str) else json.dumps(prompts)
    path.write_text(text.replace("{case}", case))
    out = tmp_path / "out"
    assert predict_main(["-i", str(images), "-o", str(out), "--prompts", str(path), *PREDICT]) == 1
    line = one_line_error(capsys, "samnnu_predict")
    assert expected.replace("{case}", case) in line and str(path) in line, line
    assert not out.exists() or not any(out.iterdir()), "a failed prediction wrote output"


@pytest.mark.slow
def test_refine_driven_by_a_script(trained_folds, data_root, held_out, tmp_path):
    from samnnu.cli import refine_main

    images, labels, case = held_out
    image = images / f"{case}.nii.gz"
    shape = _read(image).shape
    z, y, x = shape[0] // 2, shape[1] // 2, shape[2] // 2
    saved = tmp_path / "refined.nii.gz"
    commands = "\n".join([
        "show",
        "label Posterior",
        f"click + {z} {y} {x}",
        f"box {z} 2 2 {z} {shape[1] - 3} {shape[2] - 3}",
        "click + 1 2",  # a bad command: one error line, the loop goes on
        f"click - {z} {shape[1] + 5} 0",  # outside the image
        "label Nothing",
        "undo",
        "save",
        "quit",
        "click + 0 0 0",  # after quit: never run
    ]) + "\n"
    out = io.StringIO()
    rc = refine_main(["-i", str(image), "-o", str(saved), "--reference", str(labels / f"{case}.nii.gz"), *PREDICT],
                     stdin=io.StringIO(commands), stdout=out)
    text = out.getvalue()
    assert rc == 0, text
    lines = text.splitlines()
    assert any(line.startswith("* Anterior:") and " ml, Dice " in line for line in lines), text
    assert sum("Posterior:" in line and "1 click)" in line for line in lines) >= 1, text
    assert sum("(2 objects, 1 click)" in line for line in lines) == 1, text  # after the box
    errors = [line for line in lines if line.startswith("samnnu_refine: error: ")]
    assert len(errors) == 3, text
    assert "expected 3 coordinates" in errors[0] and "outside the image" in errors[1]
    assert "no label named 'Nothing'" in errors[2]
    assert lines[-1] == f"saved {saved}" and saved.is_file()
    result = sitk.ReadImage(str(saved))
    assert result.GetSize() == sitk.ReadImage(str(image)).GetSize()
    assert result.GetDirection() == pytest.approx(sitk.ReadImage(str(image)).GetDirection(), abs=1e-6)
    # after undo the box is gone; what was saved is the one-click state
    one_click = [line for line in lines if "Posterior:" in line and "(1 object, 1 click)" in line]
    assert len(one_click) == 2, text
    assert not list(tmp_path.glob(".refined*")), "temporary file left behind"


@pytest.mark.slow
def test_refine_errors_are_one_line(trained_folds, data_root, held_out, tmp_path, capsys):
    from samnnu.cli import refine_main

    images, _, case = held_out
    assert refine_main(["-i", str(tmp_path / "missing.nii.gz"), *PREDICT], stdin=io.StringIO("")) == 1
    assert "image not found" in one_line_error(capsys, "samnnu_refine")
    sitk.WriteImage(sitk.Image([3, 4, 5], sitk.sitkUInt8), str(tmp_path / "other.nii.gz"))
    assert refine_main(["-i", str(images / f"{case}.nii.gz"), "--reference", str(tmp_path / "other.nii.gz"),
                        *PREDICT], stdin=io.StringIO("")) == 1
    assert "reference size (z, y, x) (5, 4, 3) differs from the image's" in one_line_error(capsys, "samnnu_refine")
    (tmp_path / "p.json").write_text(json.dumps({"cases": {"elsewhere": [GOOD]}}))
    assert refine_main(["-i", str(images / f"{case}.nii.gz"), "--prompts", str(tmp_path / "p.json"), *PREDICT],
                       stdin=io.StringIO("")) == 1
    assert f"no prompts for case '{case}'" in one_line_error(capsys, "samnnu_refine")


@pytest.mark.slow
def test_prediction_and_refine_use_the_trained_prompt_path_and_say_so(trained_folds, data_root, held_out,
                                                                       reference_as_prediction, tmp_path, capsys):
    from samnnu.cli import predict_main, refine_main, train_prompts_main
    from samnnu.interactive.refiner import PROMPT_PATH_FILE
    from samnnu.reporting.report import render_fold_report

    images, labels, case = held_out
    base = reference_as_prediction
    z = int(np.argmax((base == 2).sum(axis=(1, 2))))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"cases": {case: [
        {"label": "Posterior", "coordinates": "voxel", "box": [[z, 2, 2], [z, base.shape[1] - 3, base.shape[2] - 3]]}]}}))
    args = ["-i", str(images), "--prompts", str(prompts), *PREDICT]
    assert predict_main(["-o", str(tmp_path / "pretrained"), *args]) == 0
    assert "applied by the pretrained tiny refiner" in capsys.readouterr().err
    trained = trained_folds / "fold_0" / PROMPT_PATH_FILE
    try:
        assert train_prompts_main(["4", "0", "--refiner-encoder", "tiny", "--steps", "2", "--batch-size", "2",
                                   "--rounds", "1", "--slices-per-case", "1", "--lr", "0.01"]) == 0
        out = capsys.readouterr().out
        assert f"wrote {trained}" in out and "corrective clicks" in out
        assert predict_main(["-o", str(tmp_path / "trained"), *args]) == 0
        err = capsys.readouterr().err
        assert "prompt path trained on this dataset" in err and str(trained) in err
        # the same case, other decoder weights: the prompted label differs, the other case does not
        other = [p.name for p in images.iterdir() if p.name != f"{case}.nii.gz"][0]
        np.testing.assert_array_equal(_read(tmp_path / "trained" / other), _read(tmp_path / "pretrained" / other))
        assert not np.array_equal(_read(tmp_path / "trained" / f"{case}.nii.gz"),
                                  _read(tmp_path / "pretrained" / f"{case}.nii.gz"))
        assert predict_main(["-o", str(tmp_path / "forced"), "--refiner-weights", "pretrained", *args]) == 0
        assert "applied by the pretrained tiny refiner" in capsys.readouterr().err
        np.testing.assert_array_equal(_read(tmp_path / "forced" / f"{case}.nii.gz"),
                                      _read(tmp_path / "pretrained" / f"{case}.nii.gz"))
        text = io.StringIO()
        assert refine_main(["-i", str(images / f"{case}.nii.gz"), *PREDICT], stdin=io.StringIO("quit\n"),
                           stdout=text) == 0
        assert f"refiner: tiny refiner with its prompt path trained on this dataset ({trained}" in text.getvalue()
        assert predict_main(["-o", str(tmp_path / "x"), "--refiner-weights", str(tmp_path / "no.pth"), *args]) == 1
        assert "no.pth: prompt path file not found" in one_line_error(capsys, "samnnu_predict")
    finally:  # the session's other tests use the pretrained refiner, and a report without it
        trained.unlink(missing_ok=True)
        render_fold_report(trained.parent)


@pytest.mark.slow
def test_prediction_and_refine_use_the_trained_click_corrector_and_say_so(trained_folds, data_root, held_out,
                                                                          request, tmp_path, capsys):
    """samnnu_train_prompts --corrector predicts the fold's training cases with its model, trains the 3D
    click corrector and writes fold_F/click_corrector.pth; the fold report names it; samnnu_predict
    --prompts then sends clicks to it (and says so), and --refiner-weights pretrained does not."""
    from samnnu.cli import predict_main, refine_main, train_prompts_main
    from samnnu.defaults import CLICK_CORRECTOR_FILE
    from samnnu.reporting.report import render_fold_report

    images, labels, case = held_out
    corrector = trained_folds / "fold_0" / CLICK_CORRECTOR_FILE
    try:
        assert train_prompts_main(["4", "0", "--corrector", "--steps", "2", "--batch-size", "2", "--rounds", "1"]) == 0
        out = capsys.readouterr().out
        # the prompted case's prediction stands in for a real one from here on (the training predicted its own)
        base = request.getfixturevalue("reference_as_prediction")
        z, y, x = (int(v) for v in np.argwhere(base == 2)[0])
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps({"cases": {case: [
            {"label": "Posterior", "coordinates": "voxel", "negative": [[z, y, x]]}]}}))
        args = ["-i", str(images), "--prompts", str(prompts), *PREDICT]
        assert f"wrote {corrector}" in out and "3D click corrector (boxes too) trained 2 steps" in out  # box share 0.3
        assert "predicted by the model" in out
        assert not corrector.with_name("click_corrector.predictions.npz").exists()  # removed once written
        report = json.loads((corrector.parent / "report.json").read_text())["extra"]
        assert report["3D click corrector"].startswith("trained on this fold's training cases (click_corrector.pth")
        assert "answers the clicks and one-slice boxes" in report["3D click corrector"]
        assert predict_main(["-o", str(tmp_path / "corrected"), *args]) == 0
        err = capsys.readouterr().err
        assert "clicks and boxes by the 3D click corrector trained on this dataset" in err and str(corrector) in err
        assert predict_main(["-o", str(tmp_path / "plain"), "--refiner-weights", "pretrained", *args]) == 0
        err = capsys.readouterr().err
        assert "3D click corrector" not in err
        other = [p.name for p in images.iterdir() if p.name != f"{case}.nii.gz"][0]
        np.testing.assert_array_equal(_read(tmp_path / "corrected" / other), _read(tmp_path / "plain" / other))
        text = io.StringIO()
        assert refine_main(["-i", str(images / f"{case}.nii.gz"), *PREDICT], stdin=io.StringIO("quit\n"),
                           stdout=text) == 0
        assert "clicks and boxes by the 3D click corrector" in text.getvalue()
    finally:  # the session's other tests use the refiner alone, and a report without the corrector
        corrector.unlink(missing_ok=True)
        render_fold_report(corrector.parent)


def test_interactive_benchmark_scribbling_user_improves_the_mask():
    """The benchmark's per-label loop with the scribbling user, on the stand-in refiner: each scribble lies
    in the error it corrects and the Dice never falls."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "interactive_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "interactive_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class CountingRefiner(ThresholdRefiner):
        @property
        def stats(self):
            return {"decodes": len(self.calls)}

    image = cone_volume()
    reference = (image > 0.5).astype(np.int64)
    reference[:, :3, :] = 0  # the speck is not part of the object
    seg = np.zeros(image.shape, np.uint8)
    seg[6:9] = reference[6:9]
    options = RefineOptions(margin=1, stop_at_base=False)
    for user in ("scribbles", "clicks"):
        dices, made, steps = bench.run_label(CountingRefiner(image), image, seg, None, reference, 1, {"Thing": 1},
                                             (1.0, 1.0, 1.0), options, "prompt-free", 3, user)
        assert len(dices) == 4 and dices[-1] > dices[0] and np.all(np.diff(dices) >= -1e-9), (user, dices)
        assert len(made) == len(steps) == 3 and all(m[3] == "+" for m in made)
        if user == "scribbles":
            assert all(m[4] > 1 for m in made)  # strokes, not single voxels
    took = {}
    dices, _, _ = bench.run_label(CountingRefiner(image), image, seg, None, reference, 1, {"Thing": 1},
                                  (1.0, 1.0, 1.0), options, "box", 1, "clicks", took)
    assert dices[0] > 0 and took["box_seconds"] > 0  # the starting box is timed
    assert bench.box_timing([{"box_seconds": 0.2}, {"box_seconds": 0.4}, {}]) == pytest.approx(
        {"boxes": 2, "box_seconds_median": 0.3, "box_seconds_max": 0.4})
    summary = bench.summarize([{"variant": "default", "start": "prompt-free", "user": u, "label": "Thing",
                                "dice": [0.5, 0.6, 0.7, 0.8]} for u in ("clicks", "scribbles")])
    assert sorted(r["user"] for r in summary) == ["clicks", "scribbles"]
