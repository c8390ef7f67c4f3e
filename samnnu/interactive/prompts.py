"""Prompts for interactive prediction: the JSON schema, its validation, and voxel/world coordinates.

A prompts file names, per case, prompts for labels of the model (the schema is documented in
``docs/interactive.md``)::

    {"version": 2,
     "cases": {"hippocampus_023": [
         {"label": "Anterior", "coordinates": "voxel", "box": [[17, 20, 10], [17, 34, 22]]},
         {"label": 2, "coordinates": "world", "positive": [[-12.0, -30.5, 17.0]], "negative": []},
         {"label": 2, "coordinates": "voxel", "scribbles": [[[20, 30, 12], [20, 33, 16], [20, 35, 21]]],
          "negative_scribbles": [], "lasso": [[21, 28, 10], [21, 28, 22], [21, 38, 22], [21, 38, 10]]}]}}

Version 2 added scribbles (polylines drawn on one slice, inside the label or, negative, outside it)
and the lasso (a closed outline on one slice around the label); version 1 files load unchanged.

Voxel coordinates are integer indices in the order of the array SimpleITK gives numpy, ``(z, y, x)``;
world coordinates are millimetres ``(x, y, z)`` in the image's physical space, mapped to the nearest
voxel through the image's origin, spacing and direction. Every prompt is resolved to voxel indices
(:class:`ObjectPrompt`) before anything is predicted; every problem is one :class:`SamnnuError` line
naming the file, the case and the prompt.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from samnnu.errors import SamnnuError

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
_V2_KEYS = {"scribbles", "negative_scribbles", "lasso"}
_PROMPT_KEYS = {"label", "coordinates", "box", "positive", "negative", "automatic"} | _V2_KEYS
_COORDINATES = ("voxel", "world")

Index = tuple[int, int, int]


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image's voxels lie in space, in SimpleITK's conventions.

    size: (z, y, x) array shape as SimpleITK -> numpy gives it.
    spacing, origin: (x, y, z) millimetres; direction: 3x3 row-major direction cosines (columns = axes x, y, z).
    """

    size: Index
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_sitk(cls, image) -> "ImageGeometry":
        """From a SimpleITK image or an ``ImageFileReader`` after ``ReadImageInformation``; 2D images get z = 1."""
        size, spacing, origin = list(image.GetSize()), list(image.GetSpacing()), list(image.GetOrigin())
        direction = list(image.GetDirection())
        if len(size) == 2:
            size, spacing, origin = size + [1], spacing + [1.0], origin + [0.0]
            direction = [direction[0], direction[1], 0.0, direction[2], direction[3], 0.0, 0.0, 0.0, 1.0]
        if len(size) != 3:
            raise SamnnuError(f"images of dimension {len(size)} are not supported by prompts (2D or 3D only)")
        return cls(tuple(int(s) for s in reversed(size)), tuple(map(float, spacing)), tuple(map(float, origin)),
                   tuple(map(float, direction)))

    def matrix(self) -> np.ndarray:
        """(3, 3): direction @ diag(spacing), mapping an (x, y, z) index offset to millimetres."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3) @ np.diag(self.spacing)

    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def voxel_to_world(index_zyx: Sequence[float], geometry: ImageGeometry) -> np.ndarray:
    """(z, y, x) voxel index (integer or continuous) -> (x, y, z) millimetres: origin + D diag(s) (x, y, z)."""
    ijk = np.asarray(index_zyx, dtype=np.float64)[::-1]
    return np.asarray(geometry.origin) + geometry.matrix() @ ijk


def world_to_voxel(point_xyz: Sequence[float], geometry: ImageGeometry) -> np.ndarray:
    """(x, y, z) millimetres -> continuous (z, y, x) voxel index (the inverse of :func:`voxel_to_world`)."""
    offset = np.asarray(point_xyz, dtype=np.float64) - np.asarray(geometry.origin)
    return np.linalg.solve(geometry.matrix(), offset)[::-1]


@dataclass(frozen=True)
class Point:
    """A click at voxel ``index`` (z, y, x); positive = "this belongs to the label"."""

    index: Index
    positive: bool


@dataclass(frozen=True)
class Box:
    """An axis-aligned box between voxel corners ``lo`` and ``hi`` (z, y, x), both inclusive, lo <= hi.

    Its extent along z is the slice range; a box drawn on one slice has ``lo[0] == hi[0]``.
    """

    lo: Index
    hi: Index

    def in_plane(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), inclusive."""
        return self.lo[1], self.lo[2], self.hi[1], self.hi[2]


@dataclass(frozen=True)
class Stroke:
    """A scribble: the (z, y, x) voxels of a polyline drawn on one slice, in drawing order; positive = the
    voxels belong to the label, negative = they do not."""

    voxels: tuple[Index, ...]
    positive: bool

    @property
    def z(self) -> int:
        return self.voxels[0][0]

    def sample(self, n: int = 3) -> tuple[Point, ...]:
        """Up to ``n`` clicks spread along the stroke (its ends and evenly between), for a point-prompted decoder."""
        idx = np.unique(np.round(np.linspace(0, len(self.voxels) - 1, min(n, len(self.voxels)))).astype(int))
        return tuple(Point(self.voxels[i], self.positive) for i in idx)


@dataclass(frozen=True)
class Lasso:
    """A closed outline drawn around the label on slice ``z``: its vertices (y, x), in order."""

    z: int
    outline: tuple[tuple[int, int], ...]

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """(Y, X) bool: the voxels inside the outline or on it."""
        from matplotlib.path import Path as Polygon  # local: matplotlib is slow to import

        out = np.zeros(shape, dtype=bool)
        ys, xs = np.indices(shape)
        inside = Polygon(np.asarray(self.outline, dtype=float)).contains_points(np.c_[ys.ravel(), xs.ravel()])
        out[inside.reshape(shape)] = True
        closed = self.outline + self.outline[:1]
        for (y0, x0), (y1, x1) in zip(closed, closed[1:]):
            for y, x in line_voxels((y0, x0), (y1, x1)):
                out[y, x] = True
        return out

    def box(self, shape: tuple[int, int]) -> "Box":
        ys, xs = np.nonzero(self.mask(shape))
        return Box((self.z, int(ys.min()), int(xs.min())), (self.z, int(ys.max()), int(xs.max())))


def line_voxels(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, ...]]:
    """The voxels of the straight segment from ``a`` to ``b`` (any dimension), one per step along its
    longest axis, both ends included."""
    a, b = np.asarray(a), np.asarray(b)
    n = int(np.abs(b - a).max()) + 1
    return [tuple(int(v) for v in np.round(a + (b - a) * t)) for t in np.linspace(0.0, 1.0, n)]


@dataclass(frozen=True)
class ObjectPrompt:
    """Prompts for one object of one label, in voxel indices: an optional box and any number of clicks.

    source: how to name this prompt in messages, e.g. ``"case 'x', prompt 2"``.
    automatic: the prompt was derived from the prompt-free prediction (its masks are fused with it).
    """

    label: int
    box: Box | None = None
    points: tuple[Point, ...] = ()
    source: str = ""
    # derived from the prompt-free prediction (samnnu.interactive.auto_prompts) rather than given by a person
    automatic: bool = False
    strokes: tuple[Stroke, ...] = ()
    lasso: Lasso | None = None

    def slices(self) -> list[int]:
        """Slices (z) where this prompt says something directly: the box's key slice, every click's and
        scribble's slice and the lasso's."""
        out = {p.index[0] for p in self.points} | {s.z for s in self.strokes}
        if self.box is not None:
            out.add(key_slice(self))
        if self.lasso is not None:
            out.add(self.lasso.z)
        return sorted(out)

    def with_point(self, point: Point) -> "ObjectPrompt":
        return replace(self, points=self.points + (point,))


def key_slice(prompt: ObjectPrompt) -> int:
    """The slice a box prompt is applied on: that of its first positive click inside the box's slice range,
    else the middle of the range (the slice itself for a box drawn on one slice)."""
    box = prompt.box
    if box is None:
        raise ValueError("prompt has no box")
    for p in prompt.points:
        if p.positive and box.lo[0] <= p.index[0] <= box.hi[0]:
            return p.index[0]
    return (box.lo[0] + box.hi[0]) // 2


@dataclass
class CasePrompts:
    """The prompts of one case as written in the file, before they are resolved against the image."""

    case: str
    entries: list[dict] = field(default_factory=list)


def label_values(labels: Mapping[str, int | Sequence[int]]) -> dict[str, int]:
    """dataset.json ``labels`` -> {name: value} for the foreground labels (region-based labels are refused)."""
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise SamnnuError(f"label '{name}' is a region ({value}); prompts need integer labels")
        if int(value) != 0:
            out[name] = int(value)
    return out


def _where(file: str, case: str, number: int | None = None, entry: Mapping | None = None) -> str:
    text = f"{file}: case '{case}'"
    if number is not None:
        text += f", prompt {number}"
        if isinstance(entry, Mapping) and "label" in entry:
            text += f" (label {json.dumps(entry['label'])})"
    return text


def read_prompts_file(path: str | os.PathLike | Mapping) -> tuple[str, dict[str, list[dict]]]:
    """Read and check the structure of a prompts file (or an already loaded dict).

    Returns (name used in messages, {case: [prompt dict, ...]}). Raises one-line SamnnuError for
    unreadable files, invalid JSON and a wrong top-level structure.
    """
    if isinstance(path, Mapping):
        name, data = "prompts", path
    else:
        name = str(path)
        p = Path(path)
        if not p.is_file():
            raise SamnnuError(f"{name}: prompts file not found")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SamnnuError(f"{name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SamnnuError(f"{name}: cannot read the prompts file ({e})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("cases"), Mapping):
        raise SamnnuError(f"{name}: expected an object {{\"cases\": {{CASE: [prompt, ...]}}}} at the top level")
    extra = set(data) - {"version", "cases"}
    if extra:
        raise SamnnuError(f"{name}: unknown top-level key(s) {sorted(extra)} (allowed: version, cases)")
    version = data.get("version", SCHEMA_VERSION)
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise SamnnuError(f"{name}: schema version {version!r} is not supported (supported: "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    cases = {}
    for case, entries in data["cases"].items():
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise SamnnuError(f"{_where(name, case)}: expected a list of prompt objects")
        for i, e in enumerate(entries):
            newer = sorted(_V2_KEYS & set(e))
            if version < 2 and newer:
                raise SamnnuError(f"{_where(name, case, i + 1, e)}: {', '.join(newer)} need schema version 2 "
                                  f"(set \"version\": 2)")
        cases[case] = [dict(e) for e in entries]
    return name, cases


def _resolve_label(value, labels: Mapping[str, int], where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SamnnuError(f"{where}: 'label' must be a label name or integer value, not {json.dumps(value)}")
    if isinstance(value, str):
        if value not in labels:
            raise SamnnuError(f"{where}: no label named '{value}' in the model's dataset.json (labels: "
                              f"{', '.join(f'{k}={v}' for k, v in labels.items())})")
        return labels[value]
    if value not in labels.values():
        raise SamnnuError(f"{where}: no label with value {value} in the model's dataset.json (labels: "
                          f"{', '.join(f'{k}={v}' for k, v in labels.items())})")
    return int(value)


def _continuous_position(coords: Sequence[float], system: str, geometry: ImageGeometry) -> np.ndarray:
    """(z, y, x) continuous voxel position of a point; infinite where a value overflows."""
    try:
        values = np.asarray([float(c) for c in coords], dtype=np.float64)
    except OverflowError:  # an integer beyond the range of floats
        return np.full(3, np.inf)
    if system == "voxel":
        return values
    with np.errstate(over="ignore", invalid="ignore"):
        return world_to_voxel(values, geometry)


def voxel_index(coords: Sequence[float], system: str, geometry: ImageGeometry, what: str) -> Index:
    """A point as given -> the in-image (z, y, x) voxel index it names, or a one-line SamnnuError.

    coords: a (z, y, x) voxel index (``system="voxel"``, integer values) or an (x, y, z) point in
    millimetres (``system="world"``, mapped to the nearest voxel). ``what`` starts every message, e.g.
    ``"prompts.json: case 'a', prompt 2: positive point 1"``. Non-finite values, fractional voxel indices
    and points outside the image are refused; a point farther outside than the image's own extent along
    some axis (which covers every value too large for an integer index) is refused before it is turned
    into voxel indices.
    """
    if (not isinstance(coords, (list, tuple)) or len(coords) != 3
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coords)):
        raise SamnnuError(f"{what} must be 3 numbers, got {json.dumps(coords)}")
    given = json.dumps(list(coords))
    if not all(isinstance(c, int) or math.isfinite(c) for c in coords):
        raise SamnnuError(f"{what} {given} is not finite")
    if system == "voxel" and not all(isinstance(c, int) or c.is_integer() for c in coords):
        raise SamnnuError(f"{what} {given}: voxel coordinates must be integer indices (z, y, x)")
    extent = f"size z, y, x = {', '.join(map(str, geometry.size))}"
    shown = f"voxel (z, y, x) {given}" if system == "voxel" else f"world (x, y, z) {given} mm"
    position = _continuous_position(coords, system, geometry)
    size = np.asarray(geometry.size, dtype=np.float64)
    if not (np.all(np.isfinite(position)) and np.all(position >= -size) and np.all(position < 2 * size)):
        raise SamnnuError(f"{what} at {shown} lies far outside the image ({extent})")
    index = tuple(int(v) for v in np.floor(position + 0.5))
    shown = f"voxel (z, y, x) {list(index)}" if system == "voxel" else f"{shown} = voxel (z, y, x) {list(index)}"
    if not all(0 <= i < s for i, s in zip(index, geometry.size)):
        raise SamnnuError(f"{what} at {shown} lies outside the image ({extent})")
    return index


def resolve_prompt(entry: Mapping, number: int, case: str, labels: Mapping[str, int], geometry: ImageGeometry,
                   file: str = "prompts") -> ObjectPrompt:
    """One prompt dict of the file -> an :class:`ObjectPrompt` in voxel indices (checked against the image).

    number: the prompt's position in its case's list, from 1 (used in messages).
    """
    where = _where(file, case, number, entry)
    unknown = set(entry) - _PROMPT_KEYS
    if unknown:
        raise SamnnuError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {', '.join(sorted(_PROMPT_KEYS))})")
    if "label" not in entry:
        raise SamnnuError(f"{where}: 'label' is missing")
    label = _resolve_label(entry["label"], labels, where)
    system = entry.get("coordinates")
    if system not in _COORDINATES:
        raise SamnnuError(f"{where}: 'coordinates' must be \"voxel\" (z, y, x indices) or \"world\" (x, y, z mm), "
                          f"got {json.dumps(system)}")
    if not any(entry.get(k) for k in ("box", "positive", "negative", *_V2_KEYS)):
        raise SamnnuError(f"{where}: give a 'box', 'positive'/'negative' points, 'scribbles'/'negative_scribbles' "
                          f"or a 'lasso'")
    box = None
    if entry.get("box") is not None:
        corners = entry["box"]
        if not isinstance(corners, (list, tuple)) or len(corners) != 2:
            raise SamnnuError(f"{where}: 'box' must be two opposite corners [[...], [...]], got {json.dumps(corners)}")
        a, b = (np.asarray(voxel_index(c, system, geometry, f"{where}: box corner {i + 1}"))
                for i, c in enumerate(corners))
        box = Box(tuple(int(v) for v in np.minimum(a, b)), tuple(int(v) for v in np.maximum(a, b)))
    points = []
    for key, positive in (("positive", True), ("negative", False)):
        values = entry.get(key) or []
        if not isinstance(values, (list, tuple)):
            raise SamnnuError(f"{where}: '{key}' must be a list of points, got {json.dumps(values)}")
        for i, coords in enumerate(values):
            points.append(Point(voxel_index(coords, system, geometry, f"{where}: {key} point {i + 1}"), positive))
    automatic = entry.get("automatic", False)
    if not isinstance(automatic, bool):
        raise SamnnuError(f"{where}: 'automatic' must be true or false, got {json.dumps(automatic)}")
    strokes = []
    for key, positive in (("scribbles", True), ("negative_scribbles", False)):
        lines = entry.get(key) or []
        if not isinstance(lines, (list, tuple)) or not all(isinstance(line, (list, tuple)) and line for line in lines):
            raise SamnnuError(f"{where}: '{key}' must be a list of scribbles, each a list of points, got "
                              f"{json.dumps(lines)}")
        for i, line in enumerate(lines):
            vertices = _on_one_slice(line, system, geometry, f"{where}: {key} {i + 1}")
            voxels = [vertices[0]] + [v for a, b in zip(vertices, vertices[1:]) for v in line_voxels(a, b)[1:]]
            strokes.append(Stroke(tuple(voxels), positive))
    lasso = None
    if entry.get("lasso") is not None:
        outline = entry["lasso"]
        if not isinstance(outline, (list, tuple)) or len(outline) < 3:
            raise SamnnuError(f"{where}: 'lasso' must be an outline of at least 3 points, got {json.dumps(outline)}")
        vertices = _on_one_slice(outline, system, geometry, f"{where}: lasso")
        lasso = Lasso(vertices[0][0], tuple((v[1], v[2]) for v in vertices))
    return ObjectPrompt(label, box, tuple(points), source=f"case '{case}', prompt {number}", automatic=automatic,
                        strokes=tuple(strokes), lasso=lasso)


def _on_one_slice(coords: Sequence, system: str, geometry: ImageGeometry, what: str) -> list[Index]:
    """Points of a scribble or lasso -> voxel indices, which must all lie on one slice (one z)."""
    vertices = [voxel_index(c, system, geometry, f"{what}, point {i + 1}") for i, c in enumerate(coords)]
    slices = sorted({v[0] for v in vertices})
    if len(slices) > 1:
        raise SamnnuError(f"{what} spans slices z = {', '.join(map(str, slices))}; draw it on one slice")
    return vertices


def load_prompts(source: str | os.PathLike | Mapping, labels: Mapping[str, int],
                 geometries: Mapping[str, ImageGeometry], input_name: str = "the input folder"
                 ) -> dict[str, list[ObjectPrompt]]:
    """Read, check and resolve a whole prompts file against the cases to predict.

    labels: {name: value} of the model's foreground labels; geometries: {case: geometry} of the input
    cases. Returns {case: [ObjectPrompt, ...]} in file order. Raises one-line SamnnuError (naming file,
    case and prompt) for cases not among ``geometries``, unknown labels, malformed prompts and prompts
    outside the image.
    """
    file, cases = read_prompts_file(source)
    out = {}
    for case, entries in cases.items():
        if case not in geometries:
            known = ", ".join(sorted(geometries)[:5]) + (", ..." if len(geometries) > 5 else "")
            raise SamnnuError(f"{_where(file, case)}: no such case in {input_name} (cases: {known})")
        out[case] = [resolve_prompt(e, i + 1, case, labels, geometries[case], file) for i, e in enumerate(entries)]
    return out


def prompts_to_json(prompts: Mapping[str, Iterable[ObjectPrompt]], label_names: Mapping[int, str]) -> dict:
    """{case: [ObjectPrompt]} -> a prompts-file dict (voxel coordinates) that :func:`load_prompts` reads back."""
    cases = {}
    for case, items in prompts.items():
        entries = []
        for p in items:
            entry: dict = {"label": label_names.get(p.label, p.label), "coordinates": "voxel"}
            if p.box is not None:
                entry["box"] = [list(p.box.lo), list(p.box.hi)]
            for key, positive in (("positive", True), ("negative", False)):
                pts = [list(q.index) for q in p.points if q.positive == positive]
                if pts:
                    entry[key] = pts
            for key, positive in (("scribbles", True), ("negative_scribbles", False)):
                lines = [[list(v) for v in st.voxels] for st in p.strokes if st.positive == positive]
                if lines:
                    entry[key] = lines
            if p.lasso is not None:
                entry["lasso"] = [[p.lasso.z, y, x] for y, x in p.lasso.outline]
            if p.automatic:
                entry["automatic"] = True
            entries.append(entry)
        cases[case] = entries
    return {"version": SCHEMA_VERSION, "cases": cases}
