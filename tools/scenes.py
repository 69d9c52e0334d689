"""Procedural "shapes" scenes used to train and check the embedded demo models.

This module is the reference for a specification that the Rust tests
re-implement to draw fresh scenes, so the rules below are normative; the code
must keep matching them.

Canvas
    128x128 RGB, uint8. Pixel (x, y) (column x, row y, both 0-based) is tested
    at its centre (px, py) = (x + 0.5, y + 0.5). All geometry is float64.

Palette (name -> RGB)
    red (220,40,40), green (40,170,60), blue (40,80,220), yellow (240,210,40),
    purple (140,60,190), orange (245,140,30), white (245,245,245),
    black (20,20,20), gray (128,128,128).

Scene content
    * Background: one of white, black, gray, filled uniformly.
    * 1 or 2 shapes, probability 1/2 each.
    * Each shape: kind in {circle, square, triangle}; colour in {red, green,
      blue, yellow, purple, orange} (two shapes may share colour and/or kind);
      size in {small, large}; "radius" r (float) uniform in [10, 14] for small
      and [22, 30] for large.

Rasterisation, for centre (cx, cy) and radius r (all tests inclusive)
    * circle:   (px-cx)^2 + (py-cy)^2 <= r^2
    * square:   |px-cx| <= 0.9*r  and  |py-cy| <= 0.9*r
    * triangle (pointing up): vertices A=(cx, cy-r), B=(cx-r, cy+0.8*r),
      C=(cx+r, cy+0.8*r). With edge(P, Q) = (Qx-Px)*(py-Py) - (Qy-Py)*(px-Px),
      the pixel is inside when edge(A,B), edge(B,C), edge(C,A) are all >= 0 or
      all <= 0.
    Shapes are painted in order, first shape first, over the background.

Placement
    The bounding box [cx-r, cx+r] x [cy-r, cy+r] lies inside the canvas with a
    2 px margin, i.e. cx and cy are uniform in [2+r, 126-r]. With two shapes
    the placement of both is redrawn until the horizontal gap between their
    bounding boxes is >= 6 px (left-to-right order is then unambiguous and the
    shapes never overlap); after 100 failed tries the whole scene is resampled
    (this happens e.g. for two large shapes whose radii add up to more than 59).

Caption (lowercase, single spaces, no final period)
    one shape:  "a {size} {colour} {kind} on a {bg} background"
    two shapes, ordered left to right by cx:
                "a {size} {colour} {kind} and a {size} {colour} {kind} on a {bg} background"

Order of random draws (only needed to reproduce this module's exact scenes;
other implementations just need the same distribution): background index,
shape count, then per shape kind, colour, size index, r; then per placement
try, per shape, cx then cy.
"""

from __future__ import annotations

import numpy as np

CANVAS = 128
MARGIN = 2.0
MIN_GAP = 6.0
MAX_PLACEMENT_TRIES = 100

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
BACKGROUNDS = ("white", "black", "gray")
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
RADIUS_RANGE = {"small": (10.0, 14.0), "large": (22.0, 30.0)}


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int = CANVAS) -> np.ndarray:
    """Boolean HxW mask of a shape, using the pixel-centre rule of the spec.

    `size` other than 128 scales the whole 128-unit scene onto a size x size
    canvas (used only for training-time augmentation); at 128 the scale is
    exactly 1 so the spec's arithmetic is reproduced unchanged.
    """
    scale = CANVAS / size
    coords = (np.arange(size, dtype=np.float64) + 0.5) * scale
    px = coords[None, :]
    py = coords[:, None]
    if kind == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    if kind == "square":
        h = r * 0.9
        return (np.abs(px - cx) <= h) & (np.abs(py - cy) <= h)
    if kind == "triangle":
        ax, ay = cx, cy - r
        bx, by = cx - r, cy + r * 0.8
        qx, qy = cx + r, cy + r * 0.8

        def edge(x0, y0, x1, y1):
            return (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)

        e1 = edge(ax, ay, bx, by)
        e2 = edge(bx, by, qx, qy)
        e3 = edge(qx, qy, ax, ay)
        return ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))
    raise ValueError(f"unknown kind {kind!r}")


def caption_of(meta: dict) -> str:
    """Caption for a scene description; shapes are named left to right."""
    parts = [
        f"a {s['size']} {s['colour']} {s['kind']}"
        for s in sorted(meta["shapes"], key=lambda s: s["cx"])
    ]
    return f"{' and '.join(parts)} on a {meta['bg']} background"


def sample_meta(rng: np.random.Generator) -> dict:
    """Draw a scene description (no pixels) following the spec."""
    while True:
        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        n = 1 + int(rng.integers(2))
        shapes = []
        for _ in range(n):
            kind = KINDS[rng.integers(len(KINDS))]
            colour = SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))]
            size = SIZES[rng.integers(len(SIZES))]
            lo, hi = RADIUS_RANGE[size]
            r = float(rng.uniform(lo, hi))
            shapes.append({"kind": kind, "colour": colour, "size": size, "r": r})
        for _ in range(MAX_PLACEMENT_TRIES):
            for s in shapes:
                lo, hi = MARGIN + s["r"], CANVAS - MARGIN - s["r"]
                s["cx"] = float(rng.uniform(lo, hi))
                s["cy"] = float(rng.uniform(lo, hi))
            if n == 1:
                break
            left, right = sorted(shapes, key=lambda s: s["cx"])
            if (right["cx"] - right["r"]) - (left["cx"] + left["r"]) >= MIN_GAP:
                break
        else:
            continue  # no valid placement: resample the whole scene
        return {"bg": bg, "shapes": shapes}


def render(meta: dict, size: int = CANVAS) -> np.ndarray:
    """Rasterise a scene description to a size x size x 3 uint8 image."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = PALETTE[meta["bg"]]
    for s in meta["shapes"]:
        img[shape_mask(s["kind"], s["cx"], s["cy"], s["r"], size)] = PALETTE[s["colour"]]
    return img


def draw_scene(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    """One plain-spec 128x128 scene: (image HxWx3 uint8, caption, meta)."""
    meta = sample_meta(rng)
    return render(meta), caption_of(meta), meta
