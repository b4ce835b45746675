"""Offline synthetic anomaly-detection dataset in MVTec-AD layout.

The generator exists so that tests, examples and smoke benchmarks can run without network
access and without the (licence-restricted, 5 GB) MVTec-AD download. It writes, for every
requested category::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png

which anomalib's ``MVTecAD`` datamodule reads unchanged (``MVTecAD(root=root, category=cat)``).

Two kinds of categories are produced:

* texture categories are random crops of real texture photographs bundled inside
  scikit-image (no download). Training crops come from the left 60 % of each photograph and
  test crops from the disjoint right 40 %, so test images are never re-crops of training pixels.
* object categories are drawn procedurally (PIL + numpy) with natural variation in position,
  rotation, size, colour and lighting, on a lightly textured background.

Defects (``DEFECT_TYPES``) are painted onto otherwise normal images with an alpha map; the mask
is exactly the set of pixels whose alpha was kept (alpha is zeroed elsewhere), so masks cover
the changed pixels and nothing else. Each defect covers 0.5 %-15 % of the image and, for objects,
lies on the object. Every image is produced from its own ``numpy`` generator seeded by
``(seed, category, split, index)``, so output is byte-identical for identical arguments and a
category does not depend on which other categories are generated alongside it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = [
    "ALL_CATEGORIES",
    "DEFECT_TYPES",
    "MANIFEST_NAME",
    "OBJECT_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "Sample",
    "build_parser",
    "generate_synthetic_dataset",
    "main",
    "render_sample",
]

#: Bumped whenever the pixels produced for given settings change, so stale datasets are rebuilt.
GENERATOR_VERSION = 1
#: JSON file in ``root`` recording which categories were generated with which settings.
MANIFEST_NAME = "synthetic_manifest.json"
_LOCK_NAME = ".synthetic.lock"

# category -> (skimage.data function, dark tint, light tint); tints map grayscale photos to RGB.
_TEXTURE_SOURCES: dict[str, tuple[str, tuple[float, float, float] | None, tuple[float, float, float] | None]] = {
    "brick": ("brick", (0.22, 0.09, 0.06), (0.96, 0.66, 0.52)),
    "grass": ("grass", (0.04, 0.13, 0.03), (0.72, 0.90, 0.45)),
    "gravel": ("gravel", (0.10, 0.09, 0.08), (0.93, 0.89, 0.81)),
    "tissue": ("immunohistochemistry", None, None),
}

TEXTURE_CATEGORIES: tuple[str, ...] = tuple(_TEXTURE_SOURCES)
OBJECT_CATEGORIES: tuple[str, ...] = ("bolt", "washer", "pcb")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "hole", "crack", "contamination")
ALL_CATEGORIES: tuple[str, ...] = TEXTURE_CATEGORIES + OBJECT_CATEGORIES

_MIN_IMAGE_SIZE = 32
_MIN_DEFECT_FRACTION = 0.005  # defects cover at least 0.5 % of the image ...
_MAX_DEFECT_FRACTION = 0.15  # ... and at most 15 %
_MIN_DEFECT_CHANGE = 0.06  # mean absolute change (0-1 scale) inside the mask, so defects are visible
_ALPHA_THRESHOLD = 0.2  # alpha below this is dropped; the kept pixels form the mask
_SUPERSAMPLING = 4  # PIL drawings are rendered this much larger and box-downsampled (anti-aliasing)
_TRAIN_REGION = 0.6  # texture train crops come from the left 60 % of a photograph, test from the rest
_TEXTURE_CROP = 0.32  # crop side as a fraction of the photograph's shorter side

FloatImage = np.ndarray  # float32 (H, W, 3) in [0, 1]
Mask = np.ndarray  # bool (H, W)


class Sample(NamedTuple):
    """One rendered image: ``image`` and ``clean`` are uint8 RGB, ``mask`` uint8 0/255 or ``None``.

    ``clean`` is the same image before the defect was painted (identical to ``image`` for normal
    samples); it lets tests check that the mask covers exactly the changed pixels.
    """

    image: np.ndarray
    mask: np.ndarray | None
    clean: np.ndarray


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------
def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Independent generator for ``(seed, *keys)``; strings are hashed with a stable CRC32."""
    entropy = [int(seed)] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# --------------------------------------------------------------------------------------------
# Small drawing helpers
# --------------------------------------------------------------------------------------------
def _draw_alpha(size: int, draw: Callable[[ImageDraw.ImageDraw, float], None]) -> np.ndarray:
    """Rasterise ``draw(d, scale)`` (coordinates in output pixels times ``scale``) anti-aliased."""
    big = Image.new("L", (size * _SUPERSAMPLING, size * _SUPERSAMPLING), 0)
    draw(ImageDraw.Draw(big), float(_SUPERSAMPLING))
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _to_uint8(img: FloatImage) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(round(float(c) * 255)) for c in np.clip(colour, 0.0, 1.0))
    return r, g, b


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise field of shape (size, size)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _lighting(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Multiplicative linear lighting gradient in a random direction (uneven illumination)."""
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    return 1.0 + strength * (np.cos(angle) * xx + np.sin(angle) * yy) * 2.0


def _background(rng: np.random.Generator, size: int, base: tuple[float, float, float], amp: float) -> FloatImage:
    """Plain surface with low-frequency blotches, fine grain and a lighting gradient."""
    field = 1.0 + amp * _smooth_noise(rng, size, size / 24) + (amp / 3) * rng.standard_normal((size, size))
    field = field * _lighting(rng, size, 0.06)
    return (np.asarray(base, dtype=np.float32)[None, None, :] * field[..., None]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Textures (real photographs shipped with scikit-image)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """Load a photograph bundled with scikit-image (these ship in the wheel: no download)."""
    import skimage.data  # local import: skimage is slow to import and only needed for textures

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype != np.uint8:
        msg = f"unexpected dtype {img.dtype} for skimage.data.{name}"
        raise TypeError(msg)
    img.setflags(write=False)
    return img


@functools.lru_cache(maxsize=None)
def _photo_levels(name: str) -> tuple[float, float]:
    """1st/99th intensity percentiles of a photograph, used to stretch its contrast."""
    low, high = np.percentile(_photo(name), [1, 99])
    return float(low) / 255.0, float(high) / 255.0


def _texture_crop(category: str, rng: np.random.Generator, size: int, region: str) -> FloatImage:
    """Random crop of the category's photograph, flipped at random and resized to ``size``.

    ``region`` is ``"train"`` (left part of the photo), ``"test"`` (disjoint right part) or
    ``"any"`` (used for foreign-material patches).
    """
    name, dark, light = _TEXTURE_SOURCES[category]
    src = _photo(name)
    height, width = src.shape[:2]
    crop = int(round(_TEXTURE_CROP * min(height, width)))
    split_x = int(_TRAIN_REGION * width)
    lo, hi = {"train": (0, split_x - crop), "test": (split_x, width - crop), "any": (0, width - crop)}[region]
    x0 = int(rng.integers(lo, hi + 1))
    y0 = int(rng.integers(0, height - crop + 1))
    patch = src[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    resized = Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.Resampling.BICUBIC)
    img = np.asarray(resized, dtype=np.float32) / 255.0
    if img.ndim == 2:  # grayscale photo: stretch contrast, then map through a two-colour ramp
        low, high = _photo_levels(name)
        img = np.clip((img - low) / (high - low), 0.0, 1.0)
        d = np.asarray(dark, dtype=np.float32)
        li = np.asarray(light, dtype=np.float32)
        img = d + (li - d) * img[..., None]
    gain = float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))  # exposure variation between shots
    return np.clip(img * gain, 0.0, 1.0).astype(np.float32)


def _render_texture(category: str, rng: np.random.Generator, size: int, region: str) -> tuple[FloatImage, Mask]:
    return _texture_crop(category, rng, size, region), np.ones((size, size), dtype=bool)


# --------------------------------------------------------------------------------------------
# Procedural objects
# --------------------------------------------------------------------------------------------
def _composite(obj_premult: FloatImage, alpha: np.ndarray, shade: np.ndarray, bg: FloatImage) -> FloatImage:
    """Place a premultiplied object layer, lit by ``shade``, over ``bg``."""
    out = obj_premult * shade[..., None] + bg * (1.0 - alpha[..., None])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _render_bolt(rng: np.random.Generator, size: int) -> tuple[FloatImage, Mask]:
    """A hex-head bolt lying on a bench, seen from above, at a random position and angle."""
    ss = _SUPERSAMPLING
    cx = size * (0.5 + rng.uniform(-0.06, 0.06))
    cy = size * (0.5 + rng.uniform(-0.06, 0.06))
    angle = rng.uniform(0, 2 * math.pi)
    length = size * 0.70 * rng.uniform(0.97, 1.03)
    metal = np.array([0.60, 0.61, 0.64], dtype=np.float32) * rng.uniform(0.93, 1.07)
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    def pts(local: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [
            ((cx + (u * cos_a - v * sin_a) * length) * ss, (cy + (u * sin_a + v * cos_a) * length) * ss)
            for u, v in local
        ]

    head = [(-0.5, -0.10), (-0.48, -0.125), (-0.34, -0.125), (-0.34, 0.125), (-0.48, 0.125), (-0.5, 0.10)]
    head_face = [(-0.49, -0.045), (-0.345, -0.045), (-0.345, 0.045), (-0.49, 0.045)]
    shaft = [(-0.345, -0.072), (0.40, -0.072), (0.47, -0.03), (0.5, 0.0), (0.47, 0.03), (0.40, 0.072), (-0.345, 0.072)]
    threads = [(u, u + 0.028) for u in np.arange(-0.30, 0.37, 0.042)]

    canvas = Image.new("RGB", (size * ss, size * ss), (0, 0, 0))
    sil = Image.new("L", (size * ss, size * ss), 0)
    d, ds = ImageDraw.Draw(canvas), ImageDraw.Draw(sil)
    for poly in (head, shaft):
        ds.polygon(pts(poly), fill=255)
    d.polygon(pts(head), fill=_rgb(metal * 0.78))
    d.polygon(pts(head_face), fill=_rgb(metal * 1.08))
    d.polygon(pts(shaft), fill=_rgb(metal))
    thread_w = max(1, int(round(0.014 * length * ss)))
    for u0, u1 in threads:
        d.line(pts([(u0, -0.072), (u1, 0.072)]), fill=_rgb(metal * 0.5), width=thread_w)
    obj = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    alpha = np.asarray(sil.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    obj = obj * (alpha[..., None] > 0)  # drop thread-line spill outside the silhouette

    # Cylinder shading with a specular band across the axis.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    v = (-(xx - cx) * sin_a + (yy - cy) * cos_a) / length
    shade = 0.72 + 0.5 * np.exp(-(((v - 0.02) / 0.04) ** 2)) + 0.03 * rng.standard_normal((size, size))
    bg = _background(rng, size, (0.80, 0.78, 0.73), 0.035)
    return _composite(obj, alpha, shade.astype(np.float32), bg), alpha > 0.5


def _render_washer(rng: np.random.Generator, size: int) -> tuple[FloatImage, Mask]:
    """A machined brass disc with a centre bore and four bolt holes, rotated at random."""
    cx = size * (0.5 + rng.uniform(-0.05, 0.05))
    cy = size * (0.5 + rng.uniform(-0.05, 0.05))
    radius = size * 0.36 * rng.uniform(0.98, 1.02)
    bore = radius * 0.34
    hole_r, hole_ring = radius * 0.10, radius * 0.67
    phase = rng.uniform(0, 2 * math.pi)
    light = rng.uniform(0, 2 * math.pi)
    brass = np.array([0.80, 0.63, 0.30], dtype=np.float32) * rng.uniform(0.94, 1.06) + rng.normal(0, 0.015, 3)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    alpha = np.clip(radius - r + 0.5, 0, 1) * np.clip(r - bore + 0.5, 0, 1)
    rim = np.zeros_like(r)
    for k in range(4):
        hx = cx + hole_ring * math.cos(phase + k * math.pi / 2)
        hy = cy + hole_ring * math.sin(phase + k * math.pi / 2)
        dk = np.hypot(xx - hx, yy - hy)
        alpha = alpha * np.clip(dk - hole_r + 0.5, 0, 1)
        rim = rim + np.exp(-(((dk - hole_r) / (0.05 * radius)) ** 2))
    t = np.clip((r - bore) / (radius - bore), 0, 1)
    shade = (
        (0.86 + 0.16 * np.cos(2 * (phi - light)))  # brushed, anisotropic highlight
        * (1 - 0.30 * np.exp(-(((1 - t) / 0.07) ** 2)) + 0.18 * np.exp(-((t / 0.07) ** 2)))  # bevels
        * (1 + 0.03 * np.sin(r * 2 * math.pi / max(size / 45, 1.5)))  # lathe rings
        * (1 - 0.3 * rim)
    ).astype(np.float32)
    obj = brass[None, None, :] * alpha[..., None]
    bg = _background(rng, size, (0.17, 0.18, 0.20), 0.05)
    return _composite(obj, alpha, shade, bg), alpha > 0.5


@functools.lru_cache(maxsize=64)
def _pcb_layout(seed: int) -> dict[str, list]:
    """Board design shared by every image of a seed: a product, whose copies differ only in pose."""
    rng = _rng(seed, "pcb", "layout")
    chip = (0.40 + rng.uniform(-0.02, 0.02), 0.26, 0.60 + rng.uniform(-0.02, 0.02), 0.66)
    pins_per_side = 5
    pin_t = np.linspace(chip[1] + 0.05, chip[3] - 0.05, pins_per_side)
    traces: list[list[tuple[float, float]]] = []
    pads: list[tuple[float, float]] = []
    for side in (-1, 1):
        x_pin = chip[0] - 0.025 if side < 0 else chip[2] + 0.025
        pad_t = np.linspace(0.12, 0.88, pins_per_side) + rng.uniform(-0.03, 0.03, pins_per_side)
        for i in range(pins_per_side):
            x_pad = 0.5 + side * rng.uniform(0.37, 0.43)
            # Traces turning upwards bend later the lower their pin, downward ones the reverse:
            # with pads in pin order this Manhattan routing never crosses itself.
            k = i if pad_t[i] < pin_t[i] else pins_per_side - 1 - i
            x_mid = x_pin + side * (0.03 + 0.03 * k)
            traces.append([(x_pin, pin_t[i]), (x_mid, pin_t[i]), (x_mid, pad_t[i]), (x_pad, pad_t[i])])
            pads.append((x_pad, pad_t[i]))
    resistors = [(s, 0.82 + rng.uniform(-0.02, 0.02)) for s in np.linspace(0.33, 0.67, 3) + rng.uniform(-0.02, 0.02, 3)]
    bands = [rng.integers(0, 6, 3).tolist() for _ in resistors]
    caps = [(s, 0.13) for s in (0.40 + rng.uniform(-0.03, 0.03), 0.60 + rng.uniform(-0.03, 0.03))]
    return {
        "chip": [chip],
        "pin_t": pin_t.tolist(),
        "traces": traces,
        "pads": pads,
        "resistors": resistors,
        "bands": bands,
        "caps": caps,
    }


def _render_pcb(rng: np.random.Generator, size: int, seed: int) -> tuple[FloatImage, Mask]:
    """A small green circuit board (chip, traces, pads, resistors), placed with slight jitter."""
    ss = _SUPERSAMPLING
    layout = _pcb_layout(seed)
    cx = size * (0.5 + rng.uniform(-0.03, 0.03))
    cy = size * (0.5 + rng.uniform(-0.03, 0.03))
    angle = rng.normal(0, 0.04)
    bw, bh = size * 0.80, size * 0.66
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    mask_green = np.array([0.09, 0.40, 0.18], dtype=np.float32) * rng.uniform(0.95, 1.05) + rng.normal(0, 0.01, 3)
    copper = np.array([0.80, 0.66, 0.35], dtype=np.float32) * rng.uniform(0.95, 1.05)

    def p(s: float, t: float) -> tuple[float, float]:
        u, v = (s - 0.5) * bw, (t - 0.5) * bh
        return ((cx + u * cos_a - v * sin_a) * ss, (cy + u * sin_a + v * cos_a) * ss)

    def rect(s0: float, t0: float, s1: float, t1: float) -> list[tuple[float, float]]:
        return [p(s0, t0), p(s1, t0), p(s1, t1), p(s0, t1)]

    def circle(s: float, t: float, rad: float) -> list[float]:
        x, y = p(s, t)
        rr = rad * bw * ss
        return [x - rr, y - rr, x + rr, y + rr]

    canvas = Image.new("RGB", (size * ss, size * ss), (0, 0, 0))
    sil = Image.new("L", (size * ss, size * ss), 0)
    d = ImageDraw.Draw(canvas)
    board = rect(0, 0, 1, 1)
    ImageDraw.Draw(sil).polygon(board, fill=255)
    d.polygon(board, fill=_rgb(mask_green))
    trace_w = max(1, int(round(0.018 * bw * ss)))
    for trace in layout["traces"]:
        d.line([p(s, t) for s, t in trace], fill=_rgb(copper * 0.85), width=trace_w, joint="curve")
    for s, t in layout["pads"]:
        d.ellipse(circle(s, t, 0.028), fill=_rgb(copper))
        d.ellipse(circle(s, t, 0.010), fill=(20, 20, 20))
    s0, t0, s1, t1 = layout["chip"][0]
    for t in layout["pin_t"]:
        d.polygon(rect(s0 - 0.03, t - 0.012, s1 + 0.03, t + 0.012), fill=_rgb(np.array([0.78, 0.78, 0.80])))
    d.polygon(rect(s0, t0, s1, t1), fill=(28, 28, 32))
    d.ellipse(circle(s0 + 0.04, t0 + 0.05, 0.012), fill=(70, 70, 76))
    band_colours = [(20, 20, 20), (140, 70, 20), (200, 30, 30), (230, 140, 20), (40, 40, 190), (240, 240, 240)]
    for (s, t), bands in zip(layout["resistors"], layout["bands"], strict=True):
        d.polygon(rect(s - 0.085, t - 0.045, s + 0.085, t + 0.045), outline=(235, 235, 225), width=max(1, ss // 2))
        d.polygon(rect(s - 0.06, t - 0.025, s + 0.06, t + 0.025), fill=(205, 180, 130))
        for j, b in enumerate(bands):
            bs = s - 0.03 + 0.03 * j
            d.polygon(rect(bs - 0.008, t - 0.025, bs + 0.008, t + 0.025), fill=band_colours[b])
    for s, t in layout["caps"]:
        d.polygon(rect(s - 0.04, t - 0.03, s + 0.04, t + 0.03), fill=(150, 110, 50))
        d.polygon(rect(s - 0.04, t - 0.03, s - 0.025, t + 0.03), fill=_rgb(copper))
        d.polygon(rect(s + 0.025, t - 0.03, s + 0.04, t + 0.03), fill=_rgb(copper))
    for s, t in ((0.045, 0.06), (0.955, 0.06), (0.045, 0.94), (0.955, 0.94)):
        d.ellipse(circle(s, t, 0.032), fill=_rgb(copper))
        d.ellipse(circle(s, t, 0.018), fill=(12, 12, 12))
    obj = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    alpha = np.asarray(sil.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    shade = (_lighting(rng, size, 0.08) * (1 + 0.025 * _smooth_noise(rng, size, 1.0))).astype(np.float32)
    bg = _background(rng, size, (0.24, 0.24, 0.26), 0.04)
    return _composite(obj, alpha, shade, bg), alpha > 0.5


def _render_normal(category: str, rng: np.random.Generator, size: int, region: str, seed: int) -> tuple[FloatImage, Mask]:
    """Defect-free image and its foreground mask (all-true for textures)."""
    if category in _TEXTURE_SOURCES:
        return _render_texture(category, rng, size, region)
    if category == "bolt":
        return _render_bolt(rng, size)
    if category == "washer":
        return _render_washer(rng, size)
    if category == "pcb":
        return _render_pcb(rng, size, seed)
    raise _unknown_category(category)


# --------------------------------------------------------------------------------------------
# Defects: each returns (alpha, layer); the image becomes img * (1 - alpha) + layer * alpha
# --------------------------------------------------------------------------------------------
def _pick_point(rng: np.random.Generator, fg: Mask) -> tuple[float, float]:
    ys, xs = np.nonzero(fg)
    i = int(rng.integers(len(xs)))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def _blob(rng: np.random.Generator, size: int, fg: Mask, area_fraction: tuple[float, float]) -> np.ndarray:
    """Anti-aliased irregular blob (perturbed, stretched ellipse) centred on the foreground."""
    cx, cy = _pick_point(rng, fg)
    r0 = math.sqrt(rng.uniform(*area_fraction) * size * size / math.pi)
    theta = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    radial = np.ones_like(theta)
    for k in range(2, 6):
        radial += rng.uniform(0, 0.35 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    stretch = math.sqrt(rng.uniform(1.0, 2.2))
    rot = rng.uniform(0, math.pi)
    x = r0 * radial * np.cos(theta) * stretch
    y = r0 * radial * np.sin(theta) / stretch
    xr, yr = x * math.cos(rot) - y * math.sin(rot) + cx, x * math.sin(rot) + y * math.cos(rot) + cy

    def draw(d: ImageDraw.ImageDraw, s: float) -> None:
        d.polygon([(float(a) * s, float(b) * s) for a, b in zip(xr, yr, strict=True)], fill=255)

    return _draw_alpha(size, draw)


def _contrast_colour(rng: np.random.Generator, img: FloatImage, fg: Mask) -> np.ndarray:
    """A colour that stands out from the (foreground) image: dark on bright parts, bright on dark."""
    lum = float(img[fg].mean()) if fg.any() else float(img.mean())
    if lum > 0.45:
        return np.full(3, rng.uniform(0.06, 0.20), dtype=np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    return np.full(3, rng.uniform(0.82, 0.96), dtype=np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)


def _defect_scratch(
    rng: np.random.Generator, img: FloatImage, fg: Mask, size: int, category: str
) -> tuple[np.ndarray, FloatImage]:
    """Thin curved line (quadratic Bezier) of a contrasting colour."""
    cx, cy = _pick_point(rng, fg)
    length = size * rng.uniform(0.3, 0.65)
    theta = rng.uniform(0, math.pi)
    ux, uy = math.cos(theta), math.sin(theta)
    bend = rng.uniform(-0.25, 0.25) * length
    p0 = np.array([cx - ux * length / 2, cy - uy * length / 2])
    p2 = np.array([cx + ux * length / 2, cy + uy * length / 2])
    p1 = np.array([cx - uy * bend, cy + ux * bend])
    t = np.linspace(0, 1, 32)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(1.2, size / 80) * rng.uniform(1.0, 1.6)

    def draw(d: ImageDraw.ImageDraw, s: float) -> None:
        d.line([(float(x) * s, float(y) * s) for x, y in curve], fill=255, width=int(round(width * s)), joint="curve")

    alpha = _draw_alpha(size, draw) * rng.uniform(0.85, 1.0)
    colour = _contrast_colour(rng, img, fg)
    grain = 1 + 0.05 * rng.standard_normal(img.shape[:2])
    layer = 0.85 * colour[None, None, :] * grain[..., None] + 0.15 * img
    return alpha, layer.astype(np.float32)


def _defect_crack(
    rng: np.random.Generator, img: FloatImage, fg: Mask, size: int, category: str
) -> tuple[np.ndarray, FloatImage]:
    """Jagged, branching dark fissure (random walk) that keeps a little of the texture inside."""
    step = size / 32
    start = np.array(_pick_point(rng, fg))
    heading = rng.uniform(0, 2 * math.pi)

    def walk(p: np.ndarray, h: float, n: int) -> list[np.ndarray]:
        path = [p]
        for _ in range(n):
            h += rng.normal(0, 0.45)
            p = p + step * np.array([math.cos(h), math.sin(h)])
            path.append(p)
        return path

    n_main = int(rng.integers(8, 16))
    main = walk(start, heading, n_main)
    branches = []
    for _ in range(int(rng.integers(1, 3))):
        j = int(rng.integers(1, len(main) - 1))
        branches.append(walk(main[j], heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), int(rng.integers(3, 7))))
    width = max(1.5, size / 52) * rng.uniform(1.0, 1.4)

    def draw(d: ImageDraw.ImageDraw, s: float) -> None:
        d.line([(float(x) * s, float(y) * s) for x, y in main], fill=255, width=int(round(width * s)), joint="curve")
        for br in branches:
            d.line([(float(x) * s, float(y) * s) for x, y in br], fill=255, width=int(round(width * 0.7 * s)), joint="curve")

    alpha = _draw_alpha(size, draw)
    layer = img * rng.uniform(0.08, 0.22)
    return alpha, layer.astype(np.float32)


_STAIN_COLOURS = np.array(
    [
        [0.45, 0.24, 0.07],  # rust
        [0.08, 0.07, 0.05],  # oil
        [0.88, 0.87, 0.78],  # dried residue
        [0.30, 0.42, 0.55],  # blue-grey chemical
        [0.55, 0.10, 0.30],  # dye
    ],
    dtype=np.float32,
)


def _defect_stain(
    rng: np.random.Generator, img: FloatImage, fg: Mask, size: int, category: str
) -> tuple[np.ndarray, FloatImage]:
    """Soft-edged discoloured blob: the surface texture stays visible through the colour shift."""
    blob = _blob(rng, size, fg, (0.02, 0.07))
    alpha = np.clip(ndimage.gaussian_filter(blob, size / 100) * 1.3, 0, 1) * rng.uniform(0.7, 0.9)
    lum = float(img[fg].mean())
    candidates = [c for c in _STAIN_COLOURS if abs(float(c.mean()) - lum) > 0.2] or list(_STAIN_COLOURS)
    colour = candidates[int(rng.integers(len(candidates)))] * rng.uniform(0.9, 1.1)
    layer = 0.35 * img + 0.65 * colour[None, None, :]
    return alpha.astype(np.float32), layer.astype(np.float32)


def _defect_hole(
    rng: np.random.Generator, img: FloatImage, fg: Mask, size: int, category: str
) -> tuple[np.ndarray, FloatImage]:
    """Dark irregular cavity / missing material; the walls keep a dim trace of the surface."""
    blob = _blob(rng, size, fg, (0.012, 0.05))
    alpha = np.clip(ndimage.gaussian_filter(blob, size / 256) * 1.2, 0, 1)
    depth = ndimage.gaussian_filter(blob, size / 40)
    depth = depth / max(float(depth.max()), 1e-6)  # 0 at the rim, 1 at the deepest point
    shade = 0.06 + 0.22 * (1 - depth) ** 2 + 0.01 * rng.standard_normal((size, size))
    layer = img * shade[..., None] * np.array([1.0, 0.95, 0.9], dtype=np.float32)[None, None, :]
    return alpha.astype(np.float32), layer.astype(np.float32)


def _defect_contamination(
    rng: np.random.Generator, img: FloatImage, fg: Mask, size: int, category: str
) -> tuple[np.ndarray, FloatImage]:
    """Patch of foreign material: a crop of another texture photograph pasted in a blob."""
    others = [c for c in TEXTURE_CATEGORIES if c != category]
    foreign = _texture_crop(others[int(rng.integers(len(others)))], rng, size, "any")
    blob = _blob(rng, size, fg, (0.02, 0.07))
    alpha = np.clip(ndimage.gaussian_filter(blob, size / 256) * 1.2, 0, 1)
    return alpha.astype(np.float32), foreign


_DEFECTS: dict[str, Callable[..., tuple[np.ndarray, FloatImage]]] = {
    "scratch": _defect_scratch,
    "stain": _defect_stain,
    "hole": _defect_hole,
    "crack": _defect_crack,
    "contamination": _defect_contamination,
}
assert tuple(_DEFECTS) == DEFECT_TYPES  # noqa: S101 - keeps the public tuple and the table in sync


def _apply_defect(
    defect: str, rng: np.random.Generator, img: FloatImage, fg: Mask, size: int, category: str
) -> tuple[FloatImage, Mask]:
    """Paint ``defect`` onto ``img``; retry until its mask is on the object, sized and visible."""
    total = size * size
    for _ in range(200):
        alpha, layer = _DEFECTS[defect](rng, img, fg, size, category)
        mask = (alpha >= _ALPHA_THRESHOLD) & fg
        area = int(mask.sum())
        if not _MIN_DEFECT_FRACTION * total <= area <= _MAX_DEFECT_FRACTION * total:
            continue
        a = np.where(mask, alpha, 0.0).astype(np.float32)[..., None]
        out = np.clip(img * (1 - a) + layer * a, 0.0, 1.0)
        if float(np.abs(out - img)[mask].mean()) < _MIN_DEFECT_CHANGE:
            continue
        return out.astype(np.float32), mask
    msg = f"could not place a {defect!r} defect on {category!r} at image_size={size}"
    raise RuntimeError(msg)


# --------------------------------------------------------------------------------------------
# Public rendering API
# --------------------------------------------------------------------------------------------
def _unknown_category(name: str) -> ValueError:
    return ValueError(f"unknown synthetic category {name!r}; known categories: {', '.join(ALL_CATEGORIES)}")


def render_sample(
    category: str,
    split: str,
    index: int,
    *,
    defect: str | None = None,
    image_size: int = 128,
    seed: int = 0,
) -> Sample:
    """Render one image exactly as :func:`generate_synthetic_dataset` writes it.

    ``split`` is ``"train"`` or ``"test"``; ``defect`` is ``None`` for a normal image or one of
    ``DEFECT_TYPES`` (test split only).
    """
    if category not in ALL_CATEGORIES:
        raise _unknown_category(category)
    if split not in {"train", "test"}:
        msg = f"split must be 'train' or 'test', got {split!r}"
        raise ValueError(msg)
    if defect is not None and (defect not in DEFECT_TYPES or split != "test"):
        msg = f"defect must be None or one of {DEFECT_TYPES} on the test split, got {defect!r} on {split!r}"
        raise ValueError(msg)
    rng = _rng(seed, category, f"{split}/{defect or 'good'}", int(index))
    img, fg = _render_normal(category, rng, image_size, split, seed)
    clean = _to_uint8(img)
    if defect is None:
        return Sample(clean, None, clean)
    out, mask = _apply_defect(defect, rng, img, fg, image_size, category)
    return Sample(_to_uint8(out), mask.astype(np.uint8) * 255, clean)


# --------------------------------------------------------------------------------------------
# Writing to disk, manifest and reuse
# --------------------------------------------------------------------------------------------
def _save_png(array: np.ndarray, path: Path) -> None:
    # Fixed encoder settings and no metadata chunks: identical arrays give identical bytes.
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _counts(n_train: int, n_test_good: int, n_test_per_defect: int) -> dict[str, int]:
    counts = {"train/good": n_train, "test/good": n_test_good}
    if n_test_per_defect:
        counts.update({f"test/{d}": n_test_per_defect for d in DEFECT_TYPES})
        counts.update({f"ground_truth/{d}": n_test_per_defect for d in DEFECT_TYPES})
    return counts


def _on_disk_counts(cat_dir: Path, expected: dict[str, int]) -> bool:
    """Cheap completeness check: every expected folder holds exactly the expected PNG count."""
    for rel, n in expected.items():
        folder = cat_dir / rel
        found = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
        if found != n:
            return False
    return True


def _write_category(
    root: Path, category: str, image_size: int, n_train: int, n_test_good: int, n_test_per_defect: int, seed: int
) -> None:
    """Render one category into a temporary folder and move it into place when complete."""
    width = max(3, len(str(max(n_train, n_test_good, n_test_per_defect, 1) - 1)))
    tmp = root / f".{category}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    jobs: list[tuple[str, int, str | None]] = [("train", i, None) for i in range(n_train)]
    jobs += [("test", i, None) for i in range(n_test_good)]
    jobs += [("test", i, d) for d in DEFECT_TYPES for i in range(n_test_per_defect)]
    try:
        for split, i, defect in jobs:
            sample = render_sample(category, split, i, defect=defect, image_size=image_size, seed=seed)
            label = defect or "good"
            image_dir = tmp / split / label
            image_dir.mkdir(parents=True, exist_ok=True)
            _save_png(sample.image, image_dir / f"{i:0{width}d}.png")
            if sample.mask is not None:
                mask_dir = tmp / "ground_truth" / label
                mask_dir.mkdir(parents=True, exist_ok=True)
                _save_png(sample.mask, mask_dir / f"{i:0{width}d}_mask.png")
        final = root / category
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"categories": {}}
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        return {"categories": {}}
    return data


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``root`` (POSIX); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with (root / _LOCK_NAME).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _resolve_categories(categories: Sequence[str] | str | None) -> list[str]:
    if categories is None:
        return list(ALL_CATEGORIES)
    if isinstance(categories, str):
        categories = [categories]
    resolved: list[str] = []
    for name in categories:
        if name not in ALL_CATEGORIES:
            raise _unknown_category(name)
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        msg = f"no categories requested; known categories: {', '.join(ALL_CATEGORIES)}"
        raise ValueError(msg)
    return resolved


def _generate(
    root: str | Path,
    categories: Sequence[str] | str | None,
    image_size: int,
    n_train: int,
    n_test_good: int,
    n_test_per_defect: int,
    seed: int,
    overwrite: bool,
) -> tuple[Path, dict[str, str]]:
    """Implementation of :func:`generate_synthetic_dataset`; also reports generated/reused."""
    names = _resolve_categories(categories)
    if int(image_size) < _MIN_IMAGE_SIZE:
        msg = f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}"
        raise ValueError(msg)
    if n_train < 1 or n_test_good < 0 or n_test_per_defect < 0 or n_test_good + n_test_per_defect < 1:
        msg = "need n_train >= 1, n_test_good >= 0, n_test_per_defect >= 0 and at least one test image"
        raise ValueError(msg)
    if seed < 0:
        msg = f"seed must be a non-negative integer, got {seed}"
        raise ValueError(msg)
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    settings = {
        "generator_version": GENERATOR_VERSION,
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect),
        "seed": int(seed),
        "defect_types": list(DEFECT_TYPES),
    }
    expected = _counts(n_train, n_test_good, n_test_per_defect)
    status: dict[str, str] = {}
    with _locked(root_path):
        manifest = _read_manifest(root_path)
        recorded: dict = manifest["categories"]
        for name in names:
            cat_dir = root_path / name
            entry = recorded.get(name)
            if not overwrite and entry == {"settings": settings, "counts": expected} and _on_disk_counts(cat_dir, expected):
                status[name] = "reused"
                continue
            if cat_dir.exists() and entry is None and not overwrite:
                msg = (
                    f"{cat_dir} exists but is not recorded in {root_path / MANIFEST_NAME}; "
                    "refusing to replace it (pass overwrite=True to regenerate)"
                )
                raise FileExistsError(msg)
            _write_category(root_path, name, int(image_size), int(n_train), int(n_test_good), int(n_test_per_defect), int(seed))
            recorded[name] = {"settings": settings, "counts": expected}
            manifest["format"] = "anomalib_mcad.data.synthetic"
            _write_manifest(root_path, manifest)
            status[name] = "generated"
    return root_path, status


def generate_synthetic_dataset(
    root: str | Path,
    categories: Sequence[str] | None = None,
    image_size: int = 128,
    n_train: int = 24,
    n_test_good: int = 6,
    n_test_per_defect: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an MVTec-AD-layout dataset under ``root`` and return ``Path(root)``.

    Args:
        root: Dataset root; one sub-folder per category is created.
        categories: Names from ``ALL_CATEGORIES``; ``None`` means all. Unknown names raise
            ``ValueError`` listing the known ones.
        image_size: Side of the square RGB images (>= 32).
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_per_defect: Defective test images per defect type per category.
        seed: Base seed; same arguments give byte-identical files.
        overwrite: Regenerate even when ``root`` already holds the category with these settings.
            Without it, recorded categories whose settings differ are regenerated, matching ones
            are reused untouched, and unrecorded existing folders raise ``FileExistsError``.

    The settings of each generated category are recorded in ``root/synthetic_manifest.json``.
    """
    path, _ = _generate(root, categories, image_size, n_train, n_test_good, n_test_per_defect, seed, overwrite)
    return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m anomalib_mcad.data.synthetic") -> argparse.ArgumentParser:
    """Argument parser of the generator (``anomalib-mcad synth`` passes its own program name)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Generate an offline synthetic anomaly-detection dataset in MVTec-AD layout.",
    )
    parser.add_argument("--root", type=Path, help="output directory (one sub-folder per category)")
    parser.add_argument(
        "--categories", nargs="+", default=None, metavar="NAME", help=f"subset of: {' '.join(ALL_CATEGORIES)} (default: all)"
    )
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--n-train", type=int, default=24, help="normal training images per category (default: 24)")
    parser.add_argument("--n-test-good", type=int, default=6, help="normal test images per category (default: 6)")
    parser.add_argument(
        "--n-test-per-defect", type=int, default=4, help="defective test images per defect type (default: 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if a matching dataset exists")
    parser.add_argument("--list", action="store_true", help="list categories and defect types, then exit")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m anomalib_mcad.data.synthetic") -> int:
    """CLI entry point: generate, then print where the data went and per-category counts."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list:
        print("texture categories:", " ".join(TEXTURE_CATEGORIES))
        print("object categories: ", " ".join(OBJECT_CATEGORIES))
        print("defect types:      ", " ".join(DEFECT_TYPES))
        return 0
    if args.root is None:
        parser.error("--root is required")
    start = time.perf_counter()
    try:
        root, status = _generate(
            args.root,
            args.categories,
            args.image_size,
            args.n_train,
            args.n_test_good,
            args.n_test_per_defect,
            args.seed,
            args.overwrite,
        )
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"Synthetic MVTec-AD-style dataset at {root.resolve()} ({elapsed:.1f} s)")
    defects = ", ".join(f"{d} {args.n_test_per_defect}" for d in DEFECT_TYPES) if args.n_test_per_defect else "none"
    for name, state in status.items():
        print(
            f"  {name:<8} train/good {args.n_train:>3} | test/good {args.n_test_good:>3} | "
            f"defects: {defects} ({len(DEFECT_TYPES) * args.n_test_per_defect} masks) [{state}]"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
