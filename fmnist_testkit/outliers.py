"""Pictures that are not clothing, as an upload UI receives them: families made on this machine without a
download (scikit-learn, which mlflow requires, bundles the digits and two photos), each seeded, each at the
sizes people send.

    outliers.digits(200, seed=0)  -> 200 Pillow images of handwritten digits, as FAMILIES["handwritten digits"]

Used by benchmarks/ood.py and the out-of-distribution tests; the same seeds give the same pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIDE = (96, 320)             # px: the shorter side of a picture, drawn per image (thumbnails to photos)
DIGIT_INK_SCALE = 255 / 16   # scikit-learn's digits are 8x8 at 17 grey levels (0-16)
CROP_SIDE = (48, 400)        # px: crops of the bundled 427x640 photos, from a detail to most of the frame
WORDS = ("invoice", "hello", "Total 42.50", "SALE", "Fashion", "receipt", "Page 3", "QR code", "menu", "cat",
         "Dear Sir", "2026-12-07", "OK", "password", "Chapter 1", "lorem ipsum", "www", "#1", "Error 404")
TEXT_LINES = (1, 4)
FONT_SHARE = (0.08, 0.25)    # glyph height against the picture's side
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SHAPE_SHARE = (0.3, 0.8)     # the shape's size against the picture's side
STAR_POINTS = 5


def _side(rng: np.random.Generator) -> int:
    return int(rng.integers(*SIDE))


def _colours(rng: np.random.Generator) -> tuple[tuple, tuple]:
    """A foreground and a background colour that differ enough to be seen."""
    while True:
        fg, bg = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        if abs(sum(fg) - sum(bg)) > 3 * 60:
            return fg, bg


@cache
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    return load_digits().images


@cache
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # china.jpg and flower.jpg, bundled

    return tuple(load_sample_images().images)


def digits(n: int, seed: int) -> list[Image.Image]:
    """Handwritten digits, upscaled: half as ink on paper, half light on dark (as MNIST shows them)."""
    rng = np.random.default_rng(seed)
    pool = _digits()
    out = []
    for i in rng.choice(len(pool), n, replace=False):
        ink = (pool[i] * DIGIT_INK_SCALE).astype(np.uint8)
        image = Image.fromarray(ink if rng.random() < 0.5 else 255 - ink)
        side = _side(rng)
        out.append(image.resize((side, side), Image.Resampling.BICUBIC))
    return out


def photo_crops(n: int, seed: int) -> list[Image.Image]:
    """Square crops of natural photos (a temple, a flower) at random places and sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        photo = _photos()[rng.integers(len(_photos()))]
        side = int(rng.integers(CROP_SIDE[0], min(CROP_SIDE[1], *photo.shape[:2])))
        top, left = (int(rng.integers(0, photo.shape[axis] - side + 1)) for axis in (0, 1))
        out.append(Image.fromarray(photo[top:top + side, left:left + side]))
    return out


def text(n: int, seed: int) -> list[Image.Image]:
    """Lines of words in one colour on another: a screenshot, a page, a label."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = _side(rng)
        fg, bg = _colours(rng)
        image = Image.new("RGB", (int(side * rng.uniform(1, 1.6)), side), bg)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=max(8, int(side * rng.uniform(*FONT_SHARE))))
        lines = [" ".join(rng.choice(WORDS, int(rng.integers(1, 4)))) for _ in range(rng.integers(*TEXT_LINES))]
        draw.multiline_text((int(side * 0.05), int(side * 0.05)), "\n".join(lines), fill=fg, font=font)
        out.append(image)
    return out


def noise(n: int, seed: int) -> list[Image.Image]:
    """Sensor-like noise: uniform grey, Gaussian colour, salt and pepper, blurred blotches."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = _side(rng)
        kind = i % 4
        if kind == 0:
            values = rng.integers(0, 256, (side, side))
        elif kind == 1:
            values = rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (side, side, 3))
        elif kind == 2:
            values = np.where(rng.random((side, side)) < rng.uniform(0.02, 0.3), rng.choice([0, 255]),
                              rng.integers(0, 256))
        else:
            small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
            out.append(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC))
            continue
        out.append(Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)))
    return out


def flat(n: int, seed: int) -> list[Image.Image]:
    """One colour filling the frame: a blank page, a lens cap, a wall (white and black among them)."""
    rng = np.random.default_rng(seed)
    colours = [(255, 255, 255), (0, 0, 0)] + [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(n)]
    return [Image.new("RGB", (_side(rng), _side(rng)), colours[i]) for i in range(n)]


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    angles = np.pi / 2 + np.arange(2 * STAR_POINTS) * np.pi / STAR_POINTS
    radii = np.where(np.arange(2 * STAR_POINTS) % 2 == 0, radius, radius * 0.4)
    return [(cx + r * np.cos(a), cy - r * np.sin(a)) for r, a in zip(radii, angles, strict=True)]


def shapes(n: int, seed: int) -> list[Image.Image]:
    """A circle, square, triangle, star, cross or ring, filled or outlined, in one colour on another."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = _side(rng)
        fg, bg = _colours(rng)
        image = Image.new("RGB", (side, side), bg)
        draw = ImageDraw.Draw(image)
        r = side * rng.uniform(*SHAPE_SHARE) / 2
        c = side / 2 + rng.uniform(-0.1, 0.1) * side
        box = (c - r, c - r, c + r, c + r)
        outline = max(2, int(r * 0.15)) if rng.random() < 0.3 else 0
        fill = None if outline else fg
        kind = SHAPES[i % len(SHAPES)]
        if kind == "circle":
            draw.ellipse(box, fill=fill, outline=fg, width=outline or 1)
        elif kind == "square":
            draw.rectangle(box, fill=fill, outline=fg, width=outline or 1)
        elif kind == "triangle":
            draw.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=fill, outline=fg, width=outline or 1)
        elif kind == "star":
            draw.polygon(_star(c, c, r), fill=fill, outline=fg, width=outline or 1)
        elif kind == "cross":
            bar = r * 0.3
            draw.rectangle((c - bar, c - r, c + bar, c + r), fill=fg)
            draw.rectangle((c - r, c - bar, c + r, c + bar), fill=fg)
        else:
            draw.ellipse(box, outline=fg, width=max(2, int(r * 0.25)))
        out.append(image)
    return out


FAMILIES: dict[str, Callable[[int, int], list[Image.Image]]] = {
    "handwritten digits": digits, "natural-photo crops": photo_crops, "rendered words": text,
    "noise": noise, "flat colours": flat, "simple shapes": shapes,
}
