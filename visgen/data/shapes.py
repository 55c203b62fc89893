"""Procedural shape scenes with exact ground truth, rendered anti-aliased at any resolution.

A scene is sampled in three steps, each deterministic for a seed:

1. a *prompt* for one of GenEval's six tasks: the slots a caption will state
   (count, colour, size, shape per object, plus an optional spatial relation);
2. a *layout* realising the prompt: attributes the prompt leaves free are drawn at random,
   objects are placed so that their bounding boxes never overlap and a stated relation holds
   unambiguously;
3. a *render* at any resolution: analytic coverage from signed distance functions, so edges
   are anti-aliased without supersampling.

Geometry is stored resolution-free (normalised to the unit square, y pointing down); pixel
boxes are derived for the resolution a scene is rendered at. Scenes hold only the objects
their prompt names, so the ground truth is complete: a judge can find every object.

Layout rules (what a judge may rely on):
- every object lies fully inside the image with a border of ``BORDER`` (3 % of the side);
- the bounding boxes of two objects are at least ``GAP`` (4 % of the side, >= 1 px at 32 px)
  apart along x or along y, so objects never touch;
- a size is the longer side of the object's bounding box: small in ``SIZE_EXTENT["small"]``,
  large in ``SIZE_EXTENT["large"]`` (fractions of the image side), with a clear gap between;
- shapes are upright (triangle and star point up) and filled with one flat palette colour;
- a stated relation holds by :func:`relations_between` and is the only relation between the two.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

GENERATOR_VERSION = "visgen-shapes/1"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

# GenEval's ten colour names; values chosen to be far apart from each other and from the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 230, 0),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "purple": (140, 40, 200),
    "pink": (255, 130, 200),
    "brown": (120, 65, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
# Neutral mid grey: half-way between black and white in every channel and far from every hue above.
BACKGROUND: tuple[int, int, int] = (128, 128, 128)

SIZES: tuple[str, ...] = ("small", "large")
# Longer side of the object's bounding box as a fraction of the image side.
SIZE_EXTENT: dict[str, tuple[float, float]] = {"small": (0.22, 0.26), "large": (0.36, 0.42)}

RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}

TASKS: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
MAX_COUNT = 4

BORDER = 0.03          # minimum distance of any object from the image edge (fraction of the side)
GAP = 0.04             # minimum distance between two bounding boxes, along x or y
POSITION_MARGIN = 0.1  # relations ignore centre offsets up to this fraction of the boxes' summed size


def _check_choice(kind: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_resolution(resolution: Any) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or not 8 <= resolution <= 4096:
        raise ValueError(f"resolution must be an integer number of pixels in [8, 4096], got {resolution!r}")
    return int(resolution)


# -- prompts: the slots a caption states ----------------------------------------------------------

@dataclass(frozen=True)
class ObjectSlot:
    """``count`` objects of ``shape``; ``color`` / ``size`` are None when the prompt leaves them free."""

    shape: str
    count: int = 1
    color: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be an integer in [1, {MAX_COUNT}], got {self.count!r}")
        if self.color is not None:
            _check_choice("colour", self.color, tuple(COLORS))
        if self.size is not None:
            _check_choice("size", self.size, SIZES)

    def matches(self, obj: SceneObject) -> bool:
        """True when ``obj`` has this slot's shape and every attribute the slot states."""
        return (obj.shape == self.shape and (self.color is None or obj.color == self.color)
                and (self.size is None or obj.size == self.size))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "count": self.count, "color": self.color, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectSlot:
        return cls(shape=d["shape"], count=int(d.get("count", 1)), color=d.get("color"), size=d.get("size"))


@dataclass(frozen=True)
class Prompt:
    """What a caption states: object slots and, optionally, ``objects[0] <relation> objects[1]``.

    Compare two prompts with ``a.canonical() == b.canonical()``: it folds ``right_of``/``below``
    into ``left_of``/``above`` by swapping the two objects, so equivalent statements compare equal.
    """

    objects: tuple[ObjectSlot, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.relation is not None:
            _check_choice("relation", self.relation, RELATIONS)
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise ValueError(f"a relation ({self.relation!r}) needs exactly two single objects, "
                                 f"got {self.objects!r}")

    def canonical(self) -> Prompt:
        if self.relation in ("right_of", "below"):
            return Prompt((self.objects[1], self.objects[0]), INVERSE_RELATION[self.relation])
        return self

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)

    def holds_for(self, objects: Sequence[SceneObject]) -> bool:
        """True when ``objects`` realise this prompt exactly.

        Every slot is matched by exactly ``count`` objects, and with a relation some object of
        slot 0 stands in that relation to some object of slot 1 (:func:`relations_between`).
        """
        for slot in self.objects:
            if sum(slot.matches(o) for o in objects) != slot.count:
                return False
        if self.relation is None:
            return True
        a_objs = [o for o in objects if self.objects[0].matches(o)]
        b_objs = [o for o in objects if self.objects[1].matches(o)]
        return any(self.relation in relations_between(a.bbox(), b.bbox()) for a in a_objs for b in b_objs)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        return cls(tuple(ObjectSlot.from_dict(o) for o in d["objects"]), d.get("relation"))


def infer_task(prompt: Prompt) -> str:
    """The GenEval task a prompt's structure exercises (``one star`` reads as single_object)."""
    if prompt.relation is not None:
        return "position"
    if len(prompt.objects) >= 2:
        return "color_attr" if all(o.color is not None for o in prompt.objects) else "two_objects"
    (slot,) = prompt.objects
    if slot.count > 1:
        return "counting"
    return "colors" if slot.color is not None else "single_object"


def sample_prompt(task: str, rng: np.random.Generator, extra_attribute_prob: float = 0.0) -> Prompt:
    """A random prompt for ``task``.

    Each task states what GenEval's task needs (e.g. ``color_attr``: two different shapes with
    two different colours). With probability ``extra_attribute_prob`` each attribute the task
    does not need (a size; a colour where none is required) is stated too, so training
    captions also teach sizes and colours everywhere. Evaluation prompts use 0.
    """
    _check_choice("task", task, TASKS)
    if not 0.0 <= extra_attribute_prob <= 1.0:
        raise ValueError(f"extra_attribute_prob must be in [0, 1], got {extra_attribute_prob!r}")

    def extra(values: Sequence[str]) -> str | None:
        return str(values[rng.integers(len(values))]) if rng.random() < extra_attribute_prob else None

    def pick(values: Sequence[str], k: int) -> list[str]:
        return [str(values[i]) for i in rng.choice(len(values), size=k, replace=False)]

    colors = tuple(COLORS)
    if task == "single_object":
        return Prompt((ObjectSlot(pick(SHAPES, 1)[0], 1, extra(colors), extra(SIZES)),))
    if task == "colors":
        return Prompt((ObjectSlot(pick(SHAPES, 1)[0], 1, pick(colors, 1)[0], extra(SIZES)),))
    if task == "counting":
        count = int(rng.integers(1, MAX_COUNT + 1))
        return Prompt((ObjectSlot(pick(SHAPES, 1)[0], count, extra(colors), extra(SIZES)),))
    shapes = pick(SHAPES, 2)  # two-object tasks name two different shapes, so objects are identifiable
    if task == "color_attr":
        c = pick(colors, 2)
        return Prompt(tuple(ObjectSlot(s, 1, c[i], extra(SIZES)) for i, s in enumerate(shapes)))
    slots = tuple(ObjectSlot(s, 1, extra(colors), extra(SIZES)) for s in shapes)
    if task == "position":
        return Prompt(slots, RELATIONS[rng.integers(len(RELATIONS))])
    return Prompt(slots)  # two_objects


# -- scene objects and scenes ---------------------------------------------------------------------

@cache
def _unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices (M, 2) of ``shape`` with its bounding box centred on 0 and its longer side 1; None for the circle."""
    def ring(n: int, start_deg: float, radii: Sequence[float]) -> list[tuple[float, float]]:
        pts = []
        for k in range(n):
            a = math.radians(start_deg + 360.0 * k / n)
            r = radii[k % len(radii)]
            pts.append((r * math.cos(a), -r * math.sin(a)))  # minus: image y points down
        return pts

    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = ring(3, 90, [1.0])                 # equilateral, apex up
    elif shape == "hexagon":
        pts = ring(6, 0, [1.0])                  # flat top and bottom
    elif shape == "star":
        pts = ring(10, 90, [1.0, 0.42])          # five points, apex up; fat enough to read at 8 px
    elif shape == "cross":
        t = 0.34                                  # half arm thickness relative to half size
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
               (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    v = np.asarray(pts, dtype=np.float64)
    lo, hi = v.min(0), v.max(0)
    v = (v - (lo + hi) / 2) / (hi - lo).max()
    v.setflags(write=False)
    return v


@cache
def shape_aspect(shape: str) -> tuple[float, float]:
    """(width, height) of the shape's bounding box relative to its longer side."""
    v = _unit_polygon(shape)
    if v is None:
        return (1.0, 1.0)
    w, h = (v.max(0) - v.min(0)).tolist()
    return (float(w), float(h))


@dataclass(frozen=True)
class SceneObject:
    """One object, resolution-free: centre of its bounding box and its longer side, in [0, 1] units."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    extent: float
    slot: int = 0  # index of the prompt slot this object realises

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.color, tuple(COLORS))
        _check_choice("size", self.size, SIZES)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    def half_extents(self) -> tuple[float, float]:
        w, h = shape_aspect(self.shape)
        return (0.5 * w * self.extent, 0.5 * h * self.extent)

    def bbox(self, resolution: int | None = None) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): normalised, or in pixels at ``resolution`` (pixel edges, not centres)."""
        hw, hh = self.half_extents()
        box = (self.cx - hw, self.cy - hh, self.cx + hw, self.cy + hh)
        return box if resolution is None else tuple(c * resolution for c in box)  # type: ignore[return-value]

    def center(self, resolution: int | None = None) -> tuple[float, float]:
        s = 1 if resolution is None else resolution
        return (self.cx * s, self.cy * s)

    def to_dict(self, resolution: int) -> dict[str, Any]:
        r4 = lambda xs: [round(float(x), 4) for x in xs]  # noqa: E731  derived values: readable precision
        return {
            "shape": self.shape, "color": self.color, "size": self.size, "slot": self.slot,
            "rgb": list(self.rgb),
            "cx": self.cx, "cy": self.cy, "extent": self.extent,  # exact: from_dict rebuilds from these
            "center": r4(self.center(resolution)), "bbox": r4(self.bbox(resolution)),
            "center_norm": r4(self.center()), "bbox_norm": r4(self.bbox()),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneObject:
        return cls(d["shape"], d["color"], d["size"], float(d["cx"]), float(d["cy"]), float(d["extent"]),
                   int(d.get("slot", 0)))


@dataclass(frozen=True)
class Scene:
    """A sampled scene: its task, the prompt it realises, the objects, and (once captioned) its caption."""

    scene_id: str
    seed: int
    task: str
    prompt: Prompt
    objects: tuple[SceneObject, ...]
    resolution: int
    caption: str = ""
    language: str = "en"

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_choice("task", self.task, TASKS)
        check_resolution(self.resolution)

    def with_caption(self, caption: str, language: str) -> Scene:
        return dataclasses.replace(self, caption=caption, language=language)

    def at_resolution(self, resolution: int) -> Scene:
        """The same scene with pixel ground truth at another resolution."""
        return dataclasses.replace(self, resolution=check_resolution(resolution))

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene_id": self.scene_id, "seed": self.seed, "task": self.task,
            "caption": self.caption, "language": self.language,
            "resolution": self.resolution, "width": self.resolution, "height": self.resolution,
            "background": list(BACKGROUND),
            "prompt": self.prompt.to_dict(),
            "objects": [o.to_dict(self.resolution) for o in self.objects],
            "generator": GENERATOR_VERSION,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(scene_id=str(d["scene_id"]), seed=int(d["seed"]), task=d["task"],
                   prompt=Prompt.from_dict(d["prompt"]),
                   objects=tuple(SceneObject.from_dict(o) for o in d["objects"]),
                   resolution=int(d["resolution"]), caption=d.get("caption", ""), language=d.get("language", "en"))

    @classmethod
    def from_json(cls, text: str | bytes | dict[str, Any]) -> Scene:
        return cls.from_dict(text if isinstance(text, dict) else json.loads(text))


# -- relations and layout -------------------------------------------------------------------------

def relations_between(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_MARGIN) -> set[str]:
    """Relations of box A to box B, GenEval style: ``{"left_of"}`` means A is left of B.

    The centre offset is shrunk towards zero by ``margin`` times the two boxes' summed width
    (height), then divided by the length of the unshrunk offset; a component below -0.5 or above
    0.5 names a relation. Boxes are (x0, y0, x1, y1) with y pointing down, in any unit.
    """
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    dx, dy = ax - bx, ay - by
    sum_w = (box_a[2] - box_a[0]) + (box_b[2] - box_b[0])
    sum_h = (box_a[3] - box_a[1]) + (box_b[3] - box_b[1])
    rx = math.copysign(max(abs(dx) - margin * sum_w, 0.0), dx)
    ry = math.copysign(max(abs(dy) - margin * sum_h, 0.0), dy)
    norm = math.hypot(dx, dy)
    if rx == 0.0 and ry == 0.0 or norm == 0.0:
        return set()
    rx, ry = rx / norm, ry / norm
    out = set()
    if rx < -0.5:
        out.add("left_of")
    if rx > 0.5:
        out.add("right_of")
    if ry < -0.5:
        out.add("above")
    if ry > 0.5:
        out.add("below")
    return out


def _separated(c: np.ndarray, h: np.ndarray, placed_c: np.ndarray, placed_h: np.ndarray) -> np.ndarray:
    """For candidate centres ``c`` (K, 2) with half extents ``h`` (2,): clear of every placed box (P, 2)?"""
    if len(placed_c) == 0:
        return np.ones(len(c), dtype=bool)
    d = np.abs(c[:, None, :] - placed_c[None, :, :])                   # (K, P, 2)
    need = h[None, None, :] + placed_h[None, :, :] + GAP                 # (1, P, 2)
    return ((d >= need).any(-1)).all(-1)                                 # apart along x or y, from all


def _layout(halves: np.ndarray, relation: str | None, rng: np.random.Generator) -> np.ndarray:
    """Centres (N, 2) for boxes with half extents ``halves`` (N, 2): in bounds, apart, relation exact."""
    n = len(halves)
    lo, hi = BORDER + halves, 1.0 - BORDER - halves                      # (N, 2) admissible centre ranges
    for _ in range(24):  # random restarts: objects placed one by one, each from 32 vectorised candidates
        centres = np.zeros((0, 2))
        for i in range(n):
            cand = lo[i] + rng.random((32, 2)) * (hi[i] - lo[i])        # (32, 2)
            ok = np.flatnonzero(_separated(cand, halves[i], centres, halves[:i]))
            if len(ok) == 0:
                break
            centres = np.vstack([centres, cand[ok[0]]])
        else:
            if relation is None or _relation_exact(centres, halves, relation):
                return centres
    return _grid_layout(halves, relation, rng)


def _relation_exact(centres: np.ndarray, halves: np.ndarray, relation: str) -> bool:
    boxes = np.concatenate([centres - halves, centres + halves], axis=1)
    return relations_between(boxes[0], boxes[1]) == {relation}


def _grid_layout(halves: np.ndarray, relation: str | None, rng: np.random.Generator) -> np.ndarray:
    """Fallback for crowded scenes: one object per cell of a 2x2 grid, jittered inside its cell.

    Cells shrunk by GAP/2 on each side hold even the largest object, so neighbours stay apart.
    """
    cell = (1.0 - 2 * BORDER) / 2
    if relation is None:
        cells = [divmod(int(k), 2) for k in rng.permutation(4)[: len(halves)]]     # (row, col)
    else:
        line = int(rng.integers(2))
        first, second = ((0, 1) if relation in ("left_of", "above") else (1, 0))
        if relation in ("left_of", "right_of"):
            cells = [(line, first), (line, second)]
        else:
            cells = [(first, line), (second, line)]
    centres = np.zeros((len(halves), 2))
    for i, (row, col) in enumerate(cells):
        x0, y0 = BORDER + col * cell, BORDER + row * cell
        for axis, start in ((0, x0), (1, y0)):
            slack = cell - GAP - 2 * halves[i, axis]
            if slack < 0:
                raise RuntimeError(f"object of half extent {halves[i, axis]:.3f} does not fit a grid cell "
                                   f"of {cell:.3f}")
            # With a relation keep the pair aligned on the shared row/column so no second relation appears.
            jitter = 0.5 * slack if relation is not None and axis == (1 if relation in ("left_of", "right_of") else 0) \
                else rng.random() * slack
            centres[i, axis] = start + GAP / 2 + halves[i, axis] + jitter
    if relation is not None and not _relation_exact(centres, halves, relation):
        raise RuntimeError(f"grid layout failed to realise relation {relation!r}")  # cannot happen with SIZE_EXTENT
    return centres


def _check_slots_disjoint(prompt: Prompt) -> None:
    """Two slots may name the same shape only if an attribute both state tells them apart.

    Otherwise an object of one slot also matches the other ("a star and a red star") and no scene
    realises the prompt with exact counts.
    """
    for i, a in enumerate(prompt.objects):
        for b in prompt.objects[i + 1:]:
            if a.shape == b.shape and not ((a.color and b.color and a.color != b.color)
                                           or (a.size and b.size and a.size != b.size)):
                raise ValueError(f"slots {a!r} and {b!r} name the same shape without a stated colour or size "
                                 "that tells them apart; no scene can realise both exactly")


def layout_prompt(prompt: Prompt, rng: np.random.Generator, large_share: float = 0.5) -> tuple[SceneObject, ...]:
    """Objects realising ``prompt``: free colours and sizes drawn at random, positions by :func:`_layout`.
    An object whose size the prompt leaves free is large with probability ``large_share``."""
    _check_slots_disjoint(prompt)
    _check_share(large_share)
    colors = tuple(COLORS)
    specs = []
    for slot_index, slot in enumerate(prompt.objects):
        for _ in range(slot.count):
            color = slot.color or colors[rng.integers(len(colors))]
            if slot.size:
                size = slot.size
            elif large_share == 0.5:  # the draw every scene made before large_share existed: same scenes
                size = SIZES[rng.integers(len(SIZES))]
            else:
                size = "large" if rng.random() < large_share else "small"
            lo, hi = SIZE_EXTENT[size]
            specs.append((slot.shape, color, size, float(lo + rng.random() * (hi - lo)), slot_index))
    halves = np.array([[0.5 * a * ext for a in shape_aspect(shape)] for shape, _, _, ext, _ in specs])
    centres = _layout(halves, prompt.relation, rng)
    return tuple(SceneObject(shape, color, size, float(cx), float(cy), ext, slot)
                 for (shape, color, size, ext, slot), (cx, cy) in zip(specs, centres))


def scene_for_prompt(prompt: Prompt, seed: int, *, task: str | None = None, resolution: int = 32,
                     scene_id: str | None = None) -> Scene:
    """A scene realising a given ``prompt``; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    objects = layout_prompt(prompt, rng)
    return Scene(scene_id or f"seed{seed}", int(seed), task or infer_task(prompt), prompt, objects,
                 check_resolution(resolution))


def _check_share(large_share: float) -> None:
    if isinstance(large_share, bool) or not isinstance(large_share, (int, float)) or not 0.0 <= large_share <= 1.0:
        raise ValueError(f"large_share must be a probability in [0, 1], got {large_share!r}")


def sample_scene(task: str, seed: int, *, resolution: int = 32, extra_attribute_prob: float = 0.0,
                 scene_id: str | None = None, large_share: float = 0.5) -> Scene:
    """A random scene for ``task``; the same (task, seed, extra_attribute_prob, large_share) always
    gives the same scene. ``large_share``: see :func:`layout_prompt`."""
    _check_choice("task", task, TASKS)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    prompt = sample_prompt(task, rng, extra_attribute_prob)
    objects = layout_prompt(prompt, rng, large_share)
    return Scene(scene_id or f"{task}-{seed}", int(seed), task, prompt, objects, check_resolution(resolution))


# -- rendering ------------------------------------------------------------------------------------

@cache
def _unit_edges(shape: str) -> tuple[np.ndarray, ...]:
    """Per-edge constants of the unit polygon: start vertices, edge vectors, 1/|e|^2, dx/dy slopes."""
    v = _unit_polygon(shape)
    vx, vy = v[:, 0], v[:, 1]                                            # (M,)
    ex, ey = np.roll(vx, -1) - vx, np.roll(vy, -1) - vy
    inv_len2 = 1.0 / (ex * ex + ey * ey)
    inv_slope = np.divide(ex, ey, out=np.zeros_like(ex), where=ey != 0)  # scale invariant
    return vx, vy, ex, ey, inv_len2, inv_slope


def _polygon_sdf(x: np.ndarray, y: np.ndarray, shape: str) -> np.ndarray:
    """Exact signed distance (negative inside) to the unit polygon of ``shape``.

    x: (1, W), y: (H, 1) point coordinates in the polygon's unit frame. Returns (H, W).
    """
    vx, vy, ex, ey, inv_len2, inv_slope = _unit_edges(shape)
    wx, wy = x[..., None] - vx, y[..., None] - vy                        # (1, W, M), (H, 1, M)
    t = np.clip((wx * ex + wy * ey) * inv_len2, 0.0, 1.0)                # (H, W, M) closest point on each edge
    dx, dy = wx - ex * t, wy - ey * t
    dist = np.sqrt((dx * dx + dy * dy).min(-1))                          # (H, W)
    # Even-odd rule: count edges crossed by the ray from the point towards +x.
    straddle = (vy > y[..., None]) != (vy + ey > y[..., None])           # (H, 1, M)
    x_cross = vx + (y[..., None] - vy) * inv_slope                       # (H, 1, M)
    inside = (straddle & (x[..., None] < x_cross)).sum(-1) % 2 == 1      # (H, W)
    return np.where(inside, -dist, dist)


def _coverage(obj: SceneObject, x: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """Fraction of each pixel covered by ``obj``; x (1, W), y (H, 1) pixel centres. Returns (H, W).

    A pixel at signed distance d (in pixels) from the edge is covered by clip(0.5 - d, 0, 1):
    the exact area for a straight edge through a unit pixel when the edge runs along an axis,
    and within a few percent otherwise, so edges get intermediate values at any resolution.
    """
    cx, cy, ext = obj.cx * scale, obj.cy * scale, obj.extent * scale
    if obj.shape == "circle":
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - ext / 2
    elif obj.shape == "square":
        qx, qy = np.abs(x - cx) - ext / 2, np.abs(y - cy) - ext / 2       # (1, W), (H, 1)
        d = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(np.maximum(qx, qy), 0)
    else:
        # Distances are computed in the unit frame and scaled back to pixels.
        d = _polygon_sdf((x - cx) / ext, (y - cy) / ext, obj.shape) * ext
    return np.clip(0.5 - d, 0.0, 1.0)


def render(scene: Scene, resolution: int | None = None) -> np.ndarray:
    """The scene as a uint8 image (R, R, 3) at ``resolution`` (default: the scene's own)."""
    res = check_resolution(scene.resolution if resolution is None else resolution)
    img = np.empty((res, res, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox(res)
        # Only the pixels the box touches (+1 px for the anti-aliased rim) are evaluated.
        c0, r0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        c1, r1 = min(int(math.ceil(x1)) + 1, res), min(int(math.ceil(y1)) + 1, res)
        x = (np.arange(c0, c1, dtype=np.float64) + 0.5)[None, :]          # (1, W) pixel centres
        y = (np.arange(r0, r1, dtype=np.float64) + 0.5)[:, None]          # (H, 1)
        a = _coverage(obj, x, y, res).astype(np.float32)[..., None]       # (H, W, 1)
        win = img[r0:r1, c0:c1]
        win += a * (np.asarray(obj.rgb, dtype=np.float32) - win)
    return np.rint(img).astype(np.uint8)
