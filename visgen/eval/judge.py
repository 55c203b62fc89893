"""The shapes judge: finds the objects in an image and reads their shape, colour, size and box.

Used by the GenEval-style benchmark (:mod:`visgen.eval.geneval`), the caption metrics'
ground-truth checks and the Fréchet distance (:mod:`visgen.eval.frechet`). It has to be right on
the project's own renders first (≥ 99 % of images fully right per task, measured by
:func:`judge_accuracy` and stored with the weights), and fair to imperfect generated images:
blurry, noisy, JPEG-compressed, slightly off in colour.

How an image is read, in order:

1. **Background.** The median colour of the one-pixel border (objects keep a 3 % border, so the
   border is background in renders; a generator that tints it is still handled).
2. **Segmentation.** A pixel is foreground when its RGB distance from the background exceeds
   ``fg_threshold``. Object *cores* are the connected components (4-neighbourhood) of the pixels
   above the stricter ``core_threshold``; every foreground pixel joins the nearest core inside
   its foreground component. Two objects whose anti-aliased rims touch after JPEG or blur thus
   stay two objects, while each keeps its full rim. Cores smaller than ``min_core_fraction`` of
   the smallest object the generator draws are noise and dropped.
3. **Colour.** The median of the object's most saturated pixels (the ``saturated_fraction``
   furthest from the background), mapped to the nearest of the ten palette colours by the
   CIE94 difference in CIELAB (a perceptual space that forgives a washed-out colour more than a
   change of hue). Analytic, so a generated "red" that is a little off or blurred into the grey
   is still red, and the rule is easy to state.
4. **Coverage map.** For each pixel of the object, how much of it the object covers: the
   projection of (pixel − background) onto (object colour − background), clipped to [0, 1].
   It is independent of the colour, so one shape model serves all ten colours.
5. **Shape and size.** The coverage map, cropped to a square around the object and resampled to
   ``crop_size`` pixels, plus a few scalars (the box's sides as fractions of the image, the
   covered area, the object's size in pixels, its aspect ratio), go through a small MLP with a
   shape head and a size head (crops are centred and scale-normalised, so no convolution is
   needed). It is trained on generator renders only (:func:`train_judge`) with augmentation —
   blur, noise, JPEG down to quality 30 with 4:4:4 or 4:2:0 chroma, colour gain / offset
   shifts that also tint the background — so that 32-px and generated images are judged fairly.
6. **Box.** The pixels the object covers at least half, as ``(x0, y0, x1, y1)`` pixel edges.

Weights are made by :func:`train_judge` (never downloaded) and stored as ``judge.safetensors``
plus ``judge.json`` (config, measured accuracy, fingerprint).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image
from pydantic import Field, model_validator
from scipy import ndimage

from visgen.base import Section, validate_section
from visgen.data import shapes

log = logging.getLogger("visgen.eval.judge")

JUDGE_VERSION = "visgen-judge/1"
WEIGHTS_NAME, META_NAME = "judge.safetensors", "judge.json"
COLOR_NAMES: tuple[str, ...] = tuple(shapes.COLORS)
N_SCALARS = 7
Resolution = Annotated[int, Field(ge=16, le=1024)]


class JudgeConfig(Section):
    """How the judge segments images, what its shape/size network looks like, how it is trained and checked."""

    # -- segmentation
    fg_threshold: float = Field(0.12, gt=0.0, lt=1.0,
                                description="RGB distance (0-1 scale) from the background above which a pixel is foreground.")
    core_threshold: float = Field(0.25, gt=0.0, lt=1.0,
                                  description="Stricter distance defining object cores; one core = one object.")
    min_core_fraction: float = Field(0.15, gt=0.0, le=1.0,
                                     description="Cores smaller than this fraction of the smallest drawable object are noise.")
    saturated_fraction: float = Field(
        0.15, gt=0.0, le=1.0, description="Share of an object's pixels (furthest from the background) whose median is its colour.")
    # -- network
    crop_size: int = Field(16, ge=8, le=64, description="Side of the coverage-map crop fed to the network.")
    width: int = Field(256, ge=8, le=4096, description="Width of the MLP's first hidden layer.")
    hidden: int = Field(128, ge=8, le=1024, description="Width of the MLP's last hidden layer (the feature layer).")
    # -- training
    seed: int = Field(0, ge=0, description="Seed of the training scenes, augmentations and initialisation.")
    train_scenes: int = Field(12_000, ge=10, le=10_000_000, description="Rendered training scenes (about 2 objects each).")
    train_resolutions: tuple[Resolution, ...] = Field(
        (32, 32, 32, 48, 64, 64, 96, 128), min_length=1,
        description="Resolutions drawn uniformly per training scene (repeats weight them).")
    epochs: int = Field(30, ge=1, le=1000, description="Passes over the training crops.")
    batch_size: int = Field(256, ge=1, le=65536, description="Crops per optimiser step.")
    lr: float = Field(3e-3, gt=0.0, le=1.0,
                      description="AdamW peak learning rate (one cycle: 10 % warm-up, cosine decay).")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, description="AdamW weight decay.")
    label_smoothing: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Label smoothing: heavily degraded crops are ambiguous; soft targets keep them from bending the boundary.")
    augment_prob: float = Field(0.7, ge=0.0, le=1.0,
                                description="Probability that a training image is degraded at all.")
    max_blur: float = Field(1.0, ge=0.0, le=5.0, description="Largest Gaussian blur sigma, in pixels of a 32-px image.")
    max_noise: float = Field(0.04, ge=0.0, le=0.5, description="Largest Gaussian pixel noise std (0-1 scale).")
    min_jpeg_quality: int = Field(30, ge=1, le=100, description="Lowest JPEG quality of an augmented training image.")
    max_color_shift: float = Field(0.06, ge=0.0, le=0.5, description="Largest per-channel colour offset / gain change.")
    # -- accuracy check
    eval_resolutions: tuple[Resolution, ...] = Field(
        (32, 64), min_length=1, description="Resolutions the accuracy on held-out renders is measured at.")
    eval_per_task: int = Field(300, ge=1, le=1_000_000, description="Held-out renders per task and resolution.")
    eval_jpeg_quality: int = Field(95, ge=1, le=100,
                                   description="JPEG quality of the held-out renders (as the shards are written).")

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "JudgeConfig":
        if self.core_threshold <= self.fg_threshold:
            raise ValueError(f"core_threshold ({self.core_threshold}) must exceed fg_threshold ({self.fg_threshold}): "
                             "cores are the strict part of the foreground")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The accuracy tests: a third of the data, still >= 99 % per task at 32 and 64 px (~1 min on a CPU).
    "test": dict(train_scenes=4000, eval_per_task=100),
    # API tests: trained in seconds; its accuracy is low and never quoted.
    "tiny": dict(train_scenes=300, epochs=3, eval_per_task=5, train_resolutions=(32, 64)),
}


def preset(name: str, **overrides: Any) -> JudgeConfig:
    """A named :data:`PRESETS` config with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown judge preset {name!r}; available: {', '.join(PRESETS)}")
    return validate_section(JudgeConfig, {**PRESETS[name], **overrides}, where=f"judge preset {name!r}")


@dataclass(frozen=True)
class Detection:
    """One object the judge found. ``bbox`` is ``(x0, y0, x1, y1)`` in pixels (edges, y down)."""

    shape: str
    color: str
    size: str
    bbox: tuple[float, float, float, float]
    area: float = 0.0            # covered pixels (sum of the coverage map)
    confidence: float = 1.0      # shape probability times size probability

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "bbox": [round(float(v), 2) for v in self.bbox], "area": round(float(self.area), 2),
                "confidence": round(float(self.confidence), 4)}


# -- colour ---------------------------------------------------------------------------------------

def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 1], any leading shape ``(..., 3)``."""
    c = np.asarray(rgb, dtype=np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PALETTE_LAB: np.ndarray | None = None


def delta_e94(reference_lab: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """CIE94 colour difference (graphic-arts weights) of ``lab`` from each reference, ``(..., 3)`` → ``(...)``.

    Unlike the plain CIELAB distance it weighs chroma and hue differences less for saturated
    references, so a washed-out blue (blurred into the grey background) stays nearer blue than
    purple.
    """
    l1, a1, b1 = np.moveaxis(reference_lab, -1, 0)
    l2, a2, b2 = np.moveaxis(lab, -1, 0)
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    dl, dc = l1 - l2, c1 - c2
    dh2 = np.maximum((a1 - a2) ** 2 + (b1 - b2) ** 2 - dc ** 2, 0.0)
    return np.sqrt(dl ** 2 + (dc / (1 + 0.045 * c1)) ** 2 + dh2 / (1 + 0.015 * c1) ** 2)


def nearest_color(rgb: np.ndarray) -> tuple[str, float]:
    """The palette colour nearest to an sRGB value in [0, 1] (CIE94 difference in CIELAB), and that difference."""
    global _PALETTE_LAB
    if _PALETTE_LAB is None:  # computed on first use, not at import
        _PALETTE_LAB = srgb_to_lab(np.array([shapes.COLORS[c] for c in COLOR_NAMES]) / 255.0)
    d = delta_e94(_PALETTE_LAB, srgb_to_lab(rgb))
    i = int(np.argmin(d))
    return COLOR_NAMES[i], float(d[i])


# -- segmentation -----------------------------------------------------------------------------------

@dataclass
class Blob:
    """One segmented object before classification."""

    color: str
    rgb: np.ndarray              # (3,) estimated object colour in [0, 1]
    coverage: np.ndarray         # (h, w) coverage map over the window, other objects zeroed
    window: tuple[int, int]      # (row, col) of the coverage map's top-left pixel in the image
    bbox: tuple[float, float, float, float]
    area: float
    image_hw: tuple[int, int]


def as_float_image(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) → float32 in [0, 1], with clear errors for anything else."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} px; the judge needs at least 16 px a side")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if np.issubdtype(image.dtype, np.floating) and image.min() >= 0.0 and image.max() <= 1.0:
        return image.astype(np.float32)
    raise ValueError(f"image must be uint8, or float in [0, 1]; got {image.dtype} in [{image.min()}, {image.max()}]")


def background(img: np.ndarray) -> np.ndarray:
    """Background colour ``(3,)`` in [0, 1]: the median of the one-pixel border of a float image."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])      # (2H + 2W, 3)
    return np.median(border, axis=0)


@cache
def _smallest_object_fraction() -> float:
    """Area (fraction of the image) of the smallest object the generator can draw, measured on
    renders so it follows the shapes module (a thin new shape lowers it automatically)."""
    res, extent = 128, shapes.SIZE_EXTENT["small"][0]
    bg = np.asarray(shapes.BACKGROUND, dtype=np.float64)
    black = np.asarray(shapes.COLORS["black"], dtype=np.float64)
    areas = []
    for shape in shapes.SHAPES:
        obj = shapes.SceneObject(shape, "black", "small", 0.5, 0.5, extent)
        scene = shapes.Scene("area", 0, "single_object", shapes.Prompt((shapes.ObjectSlot(shape),)), (obj,), res)
        covered = (bg - shapes.render(scene).astype(np.float64)) / (bg - black)     # (R, R, 3) coverage
        areas.append(float(covered.mean(-1).sum()) / (res * res))
    return min(areas)


def segment(image: np.ndarray, cfg: JudgeConfig) -> list[Blob]:
    """The objects of one image, in reading order (top to bottom, then left to right)."""
    img = as_float_image(image)                                            # (H, W, 3)
    h, w = img.shape[:2]
    bg = background(img)
    dist = np.linalg.norm(img - bg, axis=-1)                               # (H, W)
    fg = dist > cfg.fg_threshold
    cores, n = ndimage.label(dist > cfg.core_threshold)
    if n == 0:
        return []
    min_core = cfg.min_core_fraction * _smallest_object_fraction() * h * w
    keep = np.bincount(cores.ravel(), minlength=n + 1) >= min_core
    keep[0] = False
    cores = np.where(keep[cores], cores, 0)
    if not cores.any():
        return []
    owner = _assign_to_cores(fg, cores)                                    # (H, W) object label per pixel
    blobs = []
    for label, sl in enumerate(ndimage.find_objects(owner), start=1):
        if sl is None:
            continue
        # Window two pixels wider than the object so the coverage map shows its full rim.
        r0, r1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, h)
        c0, c1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, w)
        own = owner[r0:r1, c0:c1]
        mine = own == label                                                # (h', w')
        pix, d = img[r0:r1, c0:c1][mine], dist[r0:r1, c0:c1][mine]         # (P, 3), (P,)
        k = max(1, int(round(cfg.saturated_fraction * len(d))))
        rgb = np.median(pix[np.argpartition(d, len(d) - k)[-k:]], axis=0)
        color, _ = nearest_color(rgb)
        direction = rgb - bg
        cov = ((img[r0:r1, c0:c1] - bg) @ direction) / max(float(direction @ direction), 1e-6)
        # The faintest rim pixels fall below fg_threshold but still say where the edge is:
        # take coverage one pixel beyond the object's pixels, never from another object's.
        rim = ndimage.binary_dilation(mine) & ((own == 0) | mine)
        cov = np.clip(cov, 0.0, 1.0) * rim                                # (h', w')
        rows, cols = np.nonzero(cov >= 0.5)
        if len(rows) == 0:
            continue
        bbox = (float(c0 + cols.min()), float(r0 + rows.min()), float(c0 + cols.max() + 1), float(r0 + rows.max() + 1))
        blobs.append(Blob(color, rgb, cov.astype(np.float32), (r0, c0), bbox, float(cov.sum()), (h, w)))
    blobs.sort(key=lambda b: (b.bbox[1] + b.bbox[3], b.bbox[0] + b.bbox[2]))
    return blobs


def _assign_to_cores(fg: np.ndarray, cores: np.ndarray) -> np.ndarray:
    """Label every foreground pixel with the core it belongs to (0: none).

    A foreground component holding one core is that object. One holding several (rims that
    touch) is split by nearest core; the distance transform runs only on such components, which
    are rare, so large images stay cheap. Components without a core are dropped as noise.
    """
    fg_comp, _ = ndimage.label(fg | (cores > 0))
    owner = np.zeros_like(cores)
    comp_of_core = np.zeros(int(cores.max()) + 1, dtype=np.int64)
    comp_of_core[cores.ravel()] = fg_comp.ravel()  # a core lies inside one component: any pixel tells which
    by_comp: dict[int, list[int]] = {}
    for core, comp in enumerate(comp_of_core):
        if core > 0 and comp > 0:
            by_comp.setdefault(int(comp), []).append(core)
    slices = ndimage.find_objects(fg_comp)
    for comp, members in by_comp.items():
        sl = slices[comp - 1]
        region = fg_comp[sl] == comp
        if len(members) == 1:
            owner[sl][region] = members[0]
            continue
        local = cores[sl] * region
        _, (ri, ci) = ndimage.distance_transform_edt(local == 0, return_indices=True)
        owner[sl][region] = local[ri, ci][region]
    return owner


@contextmanager
def torch_threads(n: int):
    """Run torch ops on ``n`` threads, then restore. The judge's network is tiny: on a busy machine
    extra threads cost far more in synchronisation than they gain (30x slower measured on 2 cores)."""
    import torch  # torch: only the judge's network needs it

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- what the network sees ----------------------------------------------------------------------

def crop_inputs(blob: Blob, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The network's inputs for one object: coverage crop ``(S, S)`` and scalars ``(N_SCALARS,)``.

    The crop is a square around the box centre, a little larger than the box's longer side, so
    the object fills it at any resolution and keeps its aspect ratio (a hexagon stays wider than
    tall). Downsampling is antialiased (PIL's resize widens its filter), so a 100-px object and an
    8-px one reach the network in comparable form.
    """
    h, w = blob.image_hw
    x0, y0, x1, y1 = blob.bbox
    bw, bh = x1 - x0, y1 - y0
    side = 1.2 * max(bw, bh) + 2.0
    pad = int(math.ceil(side))
    cov = np.pad(blob.coverage, pad)                                       # room for the box to overhang
    cx = (x0 + x1) / 2 - blob.window[1] + pad
    cy = (y0 + y1) / 2 - blob.window[0] + pad
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    crop = np.asarray(Image.fromarray(cov.astype(np.float32)).resize((crop_size, crop_size), Image.BILINEAR, box=box),
                      dtype=np.float32)
    soft_w = float(blob.coverage.max(axis=0).sum())                        # columns covered, sub-pixel
    soft_h = float(blob.coverage.max(axis=1).sum())
    scalars = np.array([soft_w / w, soft_h / h, bw / w, bh / h, 4.0 * blob.area / (h * w),
                        math.log2(max(bw, bh, 1.0)) / 6.0, soft_h / max(soft_w, 1e-3) - 1.0], dtype=np.float32)
    return crop, scalars


def build_net(cfg: JudgeConfig):
    """The shape/size classifier: an MLP over the flattened crop and the scalars."""
    import torch  # torch: only the judge's network needs it
    from torch import nn

    class JudgeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            n_in = cfg.crop_size * cfg.crop_size + N_SCALARS
            self.body = nn.Sequential(nn.Linear(n_in, cfg.width), nn.GELU(),
                                      nn.Linear(cfg.width, cfg.hidden), nn.GELU())
            self.shape_head = nn.Linear(cfg.hidden, len(shapes.SHAPES))
            self.size_head = nn.Linear(cfg.hidden, len(shapes.SIZES))

        def forward(self, crops: torch.Tensor, scalars: torch.Tensor):
            # crops (B, S, S), scalars (B, N_SCALARS) -> features (B, hidden), logits (B, 6), (B, 2)
            x = torch.cat([crops.flatten(1), scalars], dim=1)
            feats = self.body(x)
            return feats, self.shape_head(feats), self.size_head(feats)

    return JudgeNet()


# -- training data: renders, degraded the way generated images are ---------------------------------

def encode_decode_jpeg(image: np.ndarray, quality: int, subsampling: int = 0) -> np.ndarray:
    """Round-trip a uint8 image through JPEG (``subsampling`` 0 = 4:4:4 as the shards, 2 = 4:2:0)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def degrade(image: np.ndarray, rng: np.random.Generator, cfg: JudgeConfig) -> np.ndarray:
    """What a generator might do to a render: colour drift, blur, noise, JPEG (quality down to
    ``min_jpeg_quality``, 4:4:4 or 4:2:0 chroma). With probability ``1 - augment_prob`` the render
    is only JPEG-encoded the way the shards store it."""
    if rng.random() >= cfg.augment_prob:
        return encode_decode_jpeg(image, cfg.eval_jpeg_quality)
    img = image.astype(np.float32) / 255.0
    s = cfg.max_color_shift
    img = img * (1.0 + rng.uniform(-s, s, 3)) + rng.uniform(-s, s, 3)     # per-channel gain and offset
    if rng.random() < 0.5:
        sigma = rng.uniform(0.0, cfg.max_blur) * image.shape[0] / 32.0       # blur in 32-px units
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
    if rng.random() < 0.5:
        img = img + rng.normal(0.0, rng.uniform(0.0, cfg.max_noise), img.shape)
    img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return encode_decode_jpeg(img, int(rng.integers(cfg.min_jpeg_quality, 96)), int(rng.choice([0, 2])))


def match_to_truth(boxes: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """One-to-one pairs (detection i, true object j) of boxes whose centres lie inside each other's box.

    Among admissible pairs the assignment minimises total centre distance (Hungarian).
    """
    from scipy.optimize import linear_sum_assignment  # scipy.optimize (0.25 s): only matching boxes needs it

    if not len(boxes) or not len(truth):
        return []
    b, t = np.asarray(boxes, dtype=np.float64), np.asarray(truth, dtype=np.float64)   # (D, 4), (T, 4)
    bc, tc = (b[:, :2] + b[:, 2:]) / 2, (t[:, :2] + t[:, 2:]) / 2
    inside_t = ((bc[:, None] >= t[None, :, :2]) & (bc[:, None] <= t[None, :, 2:])).all(-1)  # (D, T)
    inside_b = ((tc[None] >= b[:, None, :2]) & (tc[None] <= b[:, None, 2:])).all(-1)
    cost = np.linalg.norm(bc[:, None] - tc[None], axis=-1)
    ok = inside_t & inside_b
    rows, cols = linear_sum_assignment(np.where(ok, cost, 1e9))
    return [(int(i), int(j)) for i, j in zip(rows, cols) if ok[i, j]]


def _training_crops(cfg: JudgeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Crops ``(N, S, S)``, scalars ``(N, K)``, shape and size labels ``(N,)`` from degraded renders."""
    crops, scalars, shape_y, size_y = [], [], [], []
    rng = np.random.default_rng([cfg.seed, 17])
    for i in range(cfg.train_scenes):
        task = shapes.TASKS[i % len(shapes.TASKS)]
        res = int(cfg.train_resolutions[int(rng.integers(len(cfg.train_resolutions)))])
        scene = shapes.sample_scene(task, int(rng.integers(_HELD_OUT_SEED_BASE)), resolution=res)
        image = degrade(shapes.render(scene), rng, cfg)
        blobs = segment(image, cfg)
        truth = [o.bbox(res) for o in scene.objects]
        for bi, ti in match_to_truth([b.bbox for b in blobs], truth):
            crop, sc = crop_inputs(blobs[bi], cfg.crop_size)
            crops.append(crop)
            scalars.append(sc)
            shape_y.append(shapes.SHAPES.index(scene.objects[ti].shape))
            size_y.append(shapes.SIZES.index(scene.objects[ti].size))
    return (np.stack(crops), np.stack(scalars), np.asarray(shape_y, dtype=np.int64), np.asarray(size_y, dtype=np.int64))


# Training scenes draw seeds below this; held-out accuracy renders use seeds above it.
_HELD_OUT_SEED_BASE = 2**40


# -- the judge ------------------------------------------------------------------------------------

class Judge:
    """Segmentation + colour rule + the trained shape/size network, with its measured accuracy.

    >>> judge = train_judge(JudgeConfig(), out_dir="work/eval/judge")   # or Judge.load(dir)
    >>> judge.detect(image)              # [Detection(shape='star', color='red', size='small', bbox=...), ...]
    >>> judge.accuracy                   # {"32": {"tasks": {...}, "min": 0.997, ...}, "64": {...}}
    """

    def __init__(self, cfg: JudgeConfig, net, meta: dict | None = None):
        self.cfg = cfg
        self.net = net.eval()
        self.meta = dict(meta or {})

    # -- persistence
    @property
    def fingerprint(self) -> str:
        """Hash of the config and weights: results computed with different judges never mix."""
        if "fingerprint" not in self.meta:
            h = hashlib.sha256(JUDGE_VERSION.encode())
            h.update(json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True).encode())
            for name, t in sorted(self.net.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self.meta["fingerprint"] = h.hexdigest()[:16]
        return self.meta["fingerprint"]

    @property
    def accuracy(self) -> dict:
        """Accuracy on held-out renders, per resolution (see :func:`judge_accuracy`); {} if never measured."""
        return self.meta.get("accuracy", {})

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file  # torch: only the judge's network needs it

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(out / (WEIGHTS_NAME + ".tmp")), metadata={"version": JUDGE_VERSION})
        (out / (WEIGHTS_NAME + ".tmp")).replace(out / WEIGHTS_NAME)
        meta = {"version": JUDGE_VERSION, "config": self.cfg.model_dump(mode="json"),
                **{k: v for k, v in self.meta.items() if k != "fingerprint"}, "fingerprint": self.fingerprint}
        (out / (META_NAME + ".tmp")).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (out / (META_NAME + ".tmp")).replace(out / META_NAME)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Judge":
        from safetensors.torch import load_file  # torch: only the judge's network needs it

        p = Path(path)
        if not (p / WEIGHTS_NAME).is_file() or not (p / META_NAME).is_file():
            raise FileNotFoundError(f"no judge in {str(p)!r} (needs {WEIGHTS_NAME} and {META_NAME}); "
                                    "train one with `visgen eval judge --train` (visgen.eval.judge.train_judge)")
        meta = json.loads((p / META_NAME).read_text(encoding="utf-8"))
        if meta.get("version") != JUDGE_VERSION:
            raise ValueError(f"judge in {str(p)!r} is {meta.get('version')!r}, this code reads {JUDGE_VERSION!r}; retrain it")
        cfg = validate_section(JudgeConfig, meta.pop("config"), where=str(p / META_NAME))
        net = build_net(cfg)
        net.load_state_dict(load_file(str(p / WEIGHTS_NAME)))
        meta.pop("version", None)
        return cls(cfg, net, meta)

    # -- judging
    def _classify(self, blobs: list[Blob]):
        import torch  # torch: only the judge's network needs it

        if not blobs:
            return np.zeros((0, self.cfg.hidden), np.float32), np.zeros((0, len(shapes.SHAPES))), np.zeros((0, 2))
        inputs = [crop_inputs(b, self.cfg.crop_size) for b in blobs]
        crops = torch.from_numpy(np.stack([c for c, _ in inputs]))
        scal = torch.from_numpy(np.stack([s for _, s in inputs]))
        with torch.no_grad(), torch_threads(1):
            feats, shape_logits, size_logits = self.net(crops, scal)
        return feats.numpy(), shape_logits.softmax(-1).numpy(), size_logits.softmax(-1).numpy()

    def _read(self, images: Sequence[np.ndarray]) -> list[tuple[list[Blob], np.ndarray, list[Detection]]]:
        """Segment every image, classify all their objects in one batch."""
        per_image = [segment(img, self.cfg) for img in images]
        flat = [b for blobs in per_image for b in blobs]
        feats, p_shape, p_size = self._classify(flat)
        out, k = [], 0
        for blobs in per_image:
            dets = []
            for b in blobs:
                si, zi = int(p_shape[k].argmax()), int(p_size[k].argmax())
                dets.append(Detection(shapes.SHAPES[si], b.color, shapes.SIZES[zi], b.bbox, b.area,
                                      float(p_shape[k, si] * p_size[k, zi])))
                k += 1
            out.append((blobs, feats[k - len(blobs):k], dets))
        return out

    def detect(self, image: np.ndarray) -> list[Detection]:
        """The objects of one uint8 (H, W, 3) image, in reading order."""
        return self._read([image])[0][2]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        return [dets for _, _, dets in self._read(images)]

    def features(self, images: Sequence[np.ndarray], batch: int = 256) -> np.ndarray:
        """One fixed-length vector per image ``(N, D)`` for the Fréchet distance (see :mod:`visgen.eval.frechet`).

        Concatenates: covered fraction of the image per palette colour (10), a 4 x 4 map of
        covered fraction (16), number of objects / 4 (1), per-shape, per-colour and per-size
        object counts / 4 (6 + 10 + 2), fidelity (3: the background's CIELAB distance from the
        renderer's grey / 5, the objects' mean CIE94 difference from their palette colour / 5,
        3 × the objects' mean share of partially covered pixels — soft edges), and the mean
        feature-layer activation of the image's objects (``hidden``; zeros for an empty image).
        """
        rows = []
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            for image, (blobs, feats, dets) in zip(chunk, self._read(chunk)):
                rows.append(_image_vector(image, blobs, feats, dets, self.cfg.hidden))
        if not rows:
            raise ValueError("features() needs at least one image")
        return np.stack(rows)


FEATURE_DIM_FIXED = 10 + 16 + 1 + len(shapes.SHAPES) + 10 + len(shapes.SIZES) + 3


def _image_vector(image: np.ndarray, blobs: list[Blob], feats: np.ndarray, dets: list[Detection],
                  hidden: int) -> np.ndarray:
    colour_cov = np.zeros(len(COLOR_NAMES))
    grid = np.zeros((4, 4))
    for b in blobs:
        h, w = b.image_hw
        colour_cov[COLOR_NAMES.index(b.color)] += b.area / (h * w)
        rows, cols = np.nonzero(b.coverage)
        gy = np.minimum(((rows + b.window[0]) * 4) // h, 3)
        gx = np.minimum(((cols + b.window[1]) * 4) // w, 3)
        np.add.at(grid, (gy, gx), b.coverage[rows, cols] * 16.0 / (h * w))
    counts = np.zeros(1 + len(shapes.SHAPES) + len(COLOR_NAMES) + len(shapes.SIZES))
    counts[0] = len(dets)
    for d in dets:
        counts[1 + shapes.SHAPES.index(d.shape)] += 1
        counts[1 + len(shapes.SHAPES) + COLOR_NAMES.index(d.color)] += 1
        counts[1 + len(shapes.SHAPES) + len(COLOR_NAMES) + shapes.SIZES.index(d.size)] += 1
    bg_shift = np.linalg.norm(srgb_to_lab(background(as_float_image(image)))
                              - srgb_to_lab(np.asarray(shapes.BACKGROUND) / 255.0))
    colour_err = [nearest_color(b.rgb)[1] for b in blobs]
    soft = [float(((b.coverage > 0.05) & (b.coverage < 0.95)).sum() / max((b.coverage > 0.05).sum(), 1)) for b in blobs]
    # Scaled so that a visibly degraded image (blur of 1 px at 32 px, 20 % washed out) moves each
    # term by about one unit, like the count features, instead of being lost among them.
    fidelity = np.array([bg_shift / 5.0, np.mean(colour_err) / 5.0 if blobs else 0.0, 3.0 * np.mean(soft) if blobs else 0.0])
    mean_feat = feats.mean(axis=0) if len(feats) else np.zeros(hidden)
    return np.concatenate([colour_cov, grid.ravel(), counts / 4.0, fidelity, mean_feat]).astype(np.float64)


# -- training and the accuracy check ----------------------------------------------------------------

def train_judge(cfg: JudgeConfig, out_dir: str | Path | None = None, measure: bool = True) -> Judge:
    """Train the shape/size network on degraded renders, measure accuracy on held-out renders, save.

    Everything derives from ``cfg.seed``: the same config gives the same judge on the same
    machine. Returns the judge; with ``out_dir`` it is also saved there (safetensors + JSON).
    """
    t0 = time.perf_counter()
    with torch_threads(1):
        return _train_judge(cfg, out_dir, measure, t0)


def _train_judge(cfg: JudgeConfig, out_dir, measure: bool, t0: float) -> Judge:
    import torch  # torch: only the judge's network needs it
    import torch.nn.functional as F

    crops, scalars, shape_y, size_y = _training_crops(cfg)
    t_data = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    net = build_net(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(shape_y)
    steps = cfg.epochs * max(1, math.ceil(n / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    x_crop, x_scal = torch.from_numpy(crops), torch.from_numpy(scalars)
    y_shape, y_size = torch.from_numpy(shape_y), torch.from_numpy(size_y)
    gen = torch.Generator().manual_seed(cfg.seed)
    net.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            _, s_logits, z_logits = net(x_crop[idx], x_scal[idx])
            ls = cfg.label_smoothing
            loss = (F.cross_entropy(s_logits, y_shape[idx], label_smoothing=ls)
                    + F.cross_entropy(z_logits, y_size[idx], label_smoothing=ls))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        _, s_logits, z_logits = net(x_crop, x_scal)
    train_acc = {"shape": float((s_logits.argmax(-1) == y_shape).float().mean()),
                 "size": float((z_logits.argmax(-1) == y_size).float().mean())}
    meta = {"trained": {"scenes": cfg.train_scenes, "objects": n, "data_seconds": round(t_data, 1),
                        "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(float(loss.detach()), 4),
                        "train_accuracy": train_acc}}
    judge = Judge(cfg, net, meta)
    log.info("judge trained on %d objects from %d scenes in %.1fs (train acc shape %.4f, size %.4f)",
             n, cfg.train_scenes, meta["trained"]["seconds"], train_acc["shape"], train_acc["size"])
    if measure:
        judge.meta["accuracy"] = judge_accuracy(judge)
    if out_dir is not None:
        judge.save(out_dir)
    return judge


#: The judge shipped with visgen (default JudgeConfig, trained by ``visgen eval judge --train``):
#: every benchmark run scores with the same instrument unless a spec names another.
DEFAULT_JUDGE_DIR = Path(__file__).parent / "assets" / "judge"


def load_judge(path: str | Path | None = None) -> Judge:
    """The judge in ``path``; None = the shipped default judge."""
    return Judge.load(DEFAULT_JUDGE_DIR if path is None else path)


def load_or_train_judge(path: str | Path, cfg: JudgeConfig | None = None, retrain: bool = False) -> Judge:
    """The judge saved at ``path``; trained (and saved there) when missing, when ``retrain``, or when
    ``cfg`` differs from the config it was trained with."""
    p = Path(path)
    if not retrain and (p / META_NAME).is_file():
        judge = Judge.load(p)
        if cfg is None or judge.cfg == cfg:
            return judge
        log.info("judge in %s was trained with another config; retraining", p)
    return train_judge(cfg or JudgeConfig(), out_dir=p)


def held_out_scene(task: str, index: int, resolution: int):
    """Held-out scene ``index`` of ``task``: seeds no training scene uses, the same at every resolution."""
    return shapes.sample_scene(task, _HELD_OUT_SEED_BASE + 1_000_003 * shapes.TASKS.index(task) + index,
                               resolution=resolution)


def compare_to_truth(dets: Sequence[Detection], scene) -> dict[str, bool]:
    """Which parts of one image the judge got right: count, and for the matched objects shape,
    colour, size and box (each true object's centre inside its detection's box and vice versa)."""
    res = scene.resolution
    pairs = match_to_truth([d.bbox for d in dets], [o.bbox(res) for o in scene.objects])
    n = len(scene.objects)
    out = {"count": len(dets) == n, "position": len(pairs) == n == len(dets)}
    out["shape"] = all(dets[i].shape == scene.objects[j].shape for i, j in pairs)
    out["color"] = all(dets[i].color == scene.objects[j].color for i, j in pairs)
    out["size"] = all(dets[i].size == scene.objects[j].size for i, j in pairs)
    out["all"] = all(out.values())
    return out


def judge_accuracy(judge: Judge, resolutions: Sequence[int] | None = None, per_task: int | None = None,
                   jpeg_quality: int | None = None, degraded: bool = False) -> dict:
    """Accuracy of ``judge`` on held-out renders, JPEG-encoded as the shards are.

    An image counts as right only when the judge finds exactly its objects (one detection per
    object, boxes matching) with every shape, colour and size right. Returns, per resolution,
    ``{"tasks": {task: accuracy}, "min": worst task, "images": n, "errors": {part: images wrong}}``.

    ``degraded=True`` instead passes every render through the training degradations (blur,
    noise, colour drift, JPEG down to ``min_jpeg_quality``) with a fixed seed: a robustness
    figure for imperfect images, not the ≥ 99 % bound, which is about real renders.
    """
    cfg = judge.cfg
    resolutions = tuple(resolutions or cfg.eval_resolutions)
    per_task = per_task or cfg.eval_per_task
    quality = jpeg_quality or cfg.eval_jpeg_quality
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for res in resolutions:
        tasks, errors, examples = {}, dict.fromkeys(("count", "position", "shape", "color", "size"), 0), []
        for task in shapes.TASKS:
            scenes = [held_out_scene(task, i, res) for i in range(per_task)]
            if degraded:
                rng = np.random.default_rng([judge.cfg.seed, res, shapes.TASKS.index(task), 99])
                harsh = judge.cfg.model_copy(update={"augment_prob": 1.0})
                images = [degrade(shapes.render(s), rng, harsh) for s in scenes]
            else:
                images = [encode_decode_jpeg(shapes.render(s), quality) for s in scenes]
            right = 0
            for scene, dets in zip(scenes, judge.detect_batch(images)):
                verdict = compare_to_truth(dets, scene)
                right += verdict["all"]
                for part in errors:
                    errors[part] += not verdict[part]
                if not verdict["all"] and len(examples) < 5:
                    examples.append({"scene_seed": scene.seed, "task": task,
                                     "truth": [f"{o.size} {o.color} {o.shape}" for o in scene.objects],
                                     "judged": [f"{d.size} {d.color} {d.shape}" for d in dets]})
            tasks[task] = right / per_task
        out[str(res)] = {"tasks": tasks, "min": min(tasks.values()), "mean": sum(tasks.values()) / len(tasks),
                         "images": per_task * len(shapes.TASKS), "jpeg_quality": None if degraded else quality,
                         "degraded": degraded, "errors": errors,
                         "examples": examples}
    log.info("judge accuracy on held-out renders (%.1fs): %s", time.perf_counter() - t0,
             ", ".join(f"{r} px min {v['min']:.4f}" for r, v in out.items()))
    return out


ACCURACY_BOUND = 0.99


def judge_report(judge_dir: str | Path, cfg: JudgeConfig | None = None, train: bool = False,
                 resolutions: Sequence[int] | None = None, per_task: int | None = None,
                 degraded: bool = False) -> dict:
    """What ``visgen eval judge`` prints: the judge at ``judge_dir`` (trained there first with
    ``train=True`` or when missing) and its accuracy on held-out renders per task and resolution.

    ``resolutions`` / ``per_task`` re-measure (and store) the accuracy; ``degraded=True`` adds
    the robustness figure on degraded renders (reported, never stored as the bound).
    ``meets_bound`` says whether every task is at least 99 % right at every measured resolution.
    """
    p = Path(judge_dir)
    judge = train_judge(cfg or JudgeConfig(), out_dir=p) if train or not (p / META_NAME).is_file() else Judge.load(p)
    if resolutions or per_task:
        judge.meta.setdefault("accuracy", {}).update(judge_accuracy(judge, resolutions, per_task))
        judge.save(p)
    acc = judge.accuracy
    report = {"judge_dir": str(p.resolve()), "fingerprint": judge.fingerprint, "version": JUDGE_VERSION,
              "trained": judge.meta.get("trained"),
              "accuracy": {r: {"tasks": v["tasks"], "min": v["min"], "images": v["images"], "errors": v["errors"]}
                           for r, v in acc.items()},
              "meets_bound": bool(acc) and all(v["min"] >= ACCURACY_BOUND for v in acc.values())}
    if degraded:
        deg = judge_accuracy(judge, resolutions, per_task, degraded=True)
        report["degraded_accuracy"] = {r: {"tasks": v["tasks"], "min": v["min"]} for r, v in deg.items()}
    return report
