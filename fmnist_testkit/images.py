"""Images as the JSON contract carries them (base64 of the encoded file), the request bodies built from
them, and how alike two 28x28 images are."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

from fmnist_pyfunc.contract import png_base64

PHOTO_SIDE = 300   # px: a dataset image upscaled to the size of a photo
MAX_SHIFT = 2      # re-centring a trimmed garment may move it by a pixel or two; that is not a difference
EXIF_ORIENTATION = 0x0112
TURN_CLOCKWISE_TO_VIEW = 6  # the EXIF orientation of a phone photo stored on its side


def b64(raw: bytes) -> str:
    """Standard base64 text, as the `image` column takes it."""
    return base64.b64encode(raw).decode()


def image_bytes(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    """A Pillow image as the bytes of a PNG/JPEG/... file."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> str:
    """A Pillow image as base64 PNG/JPEG/..., as the JSON contract carries it."""
    return b64(image_bytes(image, fmt, **save_args))


def upscaled(pixels: np.ndarray, size: int = PHOTO_SIDE) -> Image.Image:
    """A dataset image the size of a photo."""
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)


def photo_jpeg(pixels: np.ndarray, size: int = PHOTO_SIDE, quality: int = 85) -> str:
    """A dataset image as a phone would send it: dark garment on a light, tinted background, upscaled, JPEG."""
    light = upscaled(255 - pixels, size)
    tinted = Image.merge("RGB", [light, light.point(lambda v: v * 0.95), light.point(lambda v: v * 0.9)])
    return encode(tinted, "JPEG", quality=quality)


def exif_rotated_jpeg(pixels: np.ndarray) -> str:
    """Stored turned 90 degrees anticlockwise, with the EXIF orientation that says "turn clockwise to view"."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = TURN_CLOCKWISE_TO_VIEW
    return encode(upscaled(pixels).rotate(90, expand=True), "JPEG", quality=95, exif=exif.tobytes())


def rows_of_each_kind(images: np.ndarray, photo_side: int = PHOTO_SIDE) -> dict[str, list[dict]]:
    """The same test images as `dataframe_records` rows of each input kind: raw pixels, PNGs, photo JPEGs."""
    return {"pixels": [{"pixels": img.tolist()} for img in images],
            "png": [{"image": png_base64(img)} for img in images],
            "jpeg": [{"image": photo_jpeg(img, photo_side)} for img in images]}


def records(*rows: dict, params: dict | None = None) -> bytes:
    """An /invocations body in MLflow's `dataframe_records` layout, with optional params."""
    body = {"dataframe_records": list(rows)}
    if params is not None:
        body["params"] = params
    return json.dumps(body).encode()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel correlation of two 28x28 images, at the best alignment within +-MAX_SHIFT pixels. An image with
    no contrast (every pixel the same) has no correlation with anything: 0, never NaN, so it never passes
    for the same picture."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    shifts = range(-MAX_SHIFT, MAX_SHIFT + 1)
    return max(float(np.corrcoef(np.roll(a, (dy, dx), axis=(0, 1)).ravel(), b.ravel())[0, 1])
               for dy in shifts for dx in shifts)


def png_files(images: np.ndarray, folder) -> list:
    """28x28 images written as PNG files in `folder` (a pathlib.Path), named by index: their paths, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, pixels in enumerate(images):
        path = folder / f"{index:06d}.png"
        path.write_bytes(image_bytes(Image.fromarray(pixels)))
        paths.append(path)
    return paths
