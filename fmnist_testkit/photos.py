"""Real test images re-shot as casual phone photos and as clean uploads, for the photo benchmark and tests.

A Fashion-MNIST image is a product shot negated (light garment on black): 255 - v is the garment's
reflectance as a photo would record it. `render` puts that garment on a light surface, at a random place
and size, and applies the effects people's photos have, each at a random strength:
  * off-centre:  the garment anywhere in the frame, 40-70 % of its longer side;
  * shadow:      a soft drop shadow on the surface beside the garment;
  * rotated:     a tilt of 4-12 degrees either way;
  * degraded:    sensor noise, a slight blur and strong JPEG compression;
  * uneven light: illumination falling off across the frame (to 45-70 % at the far side), any direction.
`together` applies all of them. The clean kinds (`CLEAN_KINDS`) are what the pyfunc already read well:
upscaled on plain light or dark backgrounds, tinted, and transparent cut-outs.

Deterministic: every image is drawn from its own seeded generator.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from fmnist_testkit.images import encode

PHOTO_SIZE = (400, 300)             # width x height of a rendered photo: a phone picture, reduced
GARMENT_FRACTION = (0.4, 0.7)       # the garment's longer side against the frame's shorter side
SURFACE_REFLECTANCE = (0.78, 0.95)  # paper, a sheet, a light table: never the studio's pure white
SHADOW_OFFSET = (0.03, 0.07)        # of the garment's size, down and to one side
SHADOW_DARKNESS = (0.25, 0.45)      # the surface loses this share of its light at the shadow's core
SHADOW_BLUR = 0.04                  # blur radius of the shadow, of the garment's size: a soft edge
TILT_DEGREES = (4, 12)
NOISE_SIGMA = (3, 8)                # grey levels of sensor noise
BLUR_RADIUS = (0.6, 1.4)            # pixels of the photo
JPEG_QUALITY = (15, 35)             # what messaging apps send
LIGHT_FALLOFF = (0.45, 0.70)        # illumination at the far side of the frame, the near side being 1
EFFECTS = ("centred", "off_centre", "shadow", "rotated", "degraded", "uneven_light")
TOGETHER = "together"
CLEAN_KINDS = ("light_background", "dark_background", "tinted", "cutout_light", "cutout_product")


def _garment(pixels: np.ndarray, size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """The garment's reflectance (0-1) and coverage (alpha, 0-1) at `size` pixels, tilted by `angle`."""
    v = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    if angle:
        v = v.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    v = np.asarray(v, dtype=np.float32)
    alpha = np.clip(v / 8.0, 0, 1)  # dataset background is 0; the faintest garment pixels are a few levels up
    return 1.0 - v / 255.0, alpha


def render(pixels: np.ndarray, effect: str, seed: int) -> Image.Image:
    """`pixels` (a 28x28 test image) as a photo with `effect` (one of EFFECTS, or TOGETHER)."""
    rng = np.random.default_rng(seed)
    on = {name: effect in (name, TOGETHER) for name in EFFECTS}
    width, height = PHOTO_SIZE
    size = int(min(width, height) * rng.uniform(*GARMENT_FRACTION))
    angle = rng.uniform(*TILT_DEGREES) * rng.choice([-1, 1]) if on["rotated"] else 0.0
    reflectance, alpha = _garment(pixels, size, angle)
    h, w = alpha.shape
    if on["off_centre"]:
        top, left = rng.integers(0, max(1, height - h)), rng.integers(0, max(1, width - w))
    else:
        top, left = (height - h) // 2, (width - w) // 2
    top, left = min(top, max(0, height - h)), min(left, max(0, width - w))
    h, w = min(h, height - top), min(w, width - left)
    reflectance, alpha = reflectance[:h, :w], alpha[:h, :w]

    surface = np.full((height, width), rng.uniform(*SURFACE_REFLECTANCE), dtype=np.float32)
    if on["shadow"]:
        shadow = np.zeros((height, width), dtype=np.float32)
        dy, dx = (int(size * rng.uniform(*SHADOW_OFFSET)) * s for s in (1, rng.choice([-1, 1])))
        y0, x0 = np.clip(top + dy, 0, height - h), np.clip(left + dx, 0, width - w)
        shadow[y0:y0 + h, x0:x0 + w] = alpha
        blurred = Image.fromarray((shadow * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size * SHADOW_BLUR))
        surface *= 1 - rng.uniform(*SHADOW_DARKNESS) * np.asarray(blurred, dtype=np.float32) / 255
    scene = surface.copy()
    region = scene[top:top + h, left:left + w]
    scene[top:top + h, left:left + w] = region * (1 - alpha) + reflectance * alpha

    if on["uneven_light"]:
        direction = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs - width / 2) * np.cos(direction) + (ys - height / 2) * np.sin(direction)
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        scene *= 1 - (1 - rng.uniform(*LIGHT_FALLOFF)) * ramp
    photo = scene * 255
    if on["degraded"]:
        photo = photo + rng.normal(0, rng.uniform(*NOISE_SIGMA), photo.shape)
    image = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    if on["degraded"]:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS)))
        image = Image.open(_jpeg(image, int(rng.integers(*JPEG_QUALITY))))
    return image


def clean(pixels: np.ndarray, kind: str, seed: int) -> Image.Image:
    """`pixels` as one of the clean uploads the pyfunc already read well (CLEAN_KINDS)."""
    rng = np.random.default_rng(seed)
    big = Image.fromarray(pixels).resize((300, 300), Image.Resampling.BICUBIC)
    v = np.asarray(big, dtype=np.float32)
    if kind == "light_background":
        return Image.fromarray((255 - v).astype(np.uint8))
    if kind == "dark_background":
        return big
    if kind == "tinted":
        tint = rng.uniform(0.6, 1.0, size=3)
        return Image.fromarray(((255 - v)[..., None] * tint).astype(np.uint8), "RGB")
    alpha = (np.clip(v / 8.0, 0, 1) * 255).astype(np.uint8)
    grey = v if kind == "cutout_light" else 255 - v  # the garment as the dataset shows it, or as photographed
    return Image.fromarray(np.stack([grey.astype(np.uint8)] * 3 + [alpha], axis=-1), "RGBA")


def _jpeg(image: Image.Image, quality: int) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return buffer


def encoded(image: Image.Image) -> str:
    """As the JSON contract carries it: base64 JPEG for photos (what phones send), PNG where there is alpha."""
    return encode(image, "PNG") if image.mode == "RGBA" else encode(image, "JPEG", quality=90)
