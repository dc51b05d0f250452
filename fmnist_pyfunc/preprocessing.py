"""Turn what people send into what the network was trained on: 28x28, 0-255, light garment on black.

Two input kinds, one row each in a pandas DataFrame (the pyfunc model's input):
  * `pixels`: a 28x28 array on the dataset's 0-255 scale, used as is;
  * `image`:  a base64 PNG or JPEG of any size, grey or colour, with or without alpha, on a light or a
              dark background. It is put through the steps Zalando used to build Fashion-MNIST: grey,
              negate when the background is light, trim to the garment, resize the longest edge to 28,
              centre on a black 28x28 canvas.
Everything that is not one of these raises `InputError` with a message fit for the API's caller.
Depends on numpy, pandas and Pillow only.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist_pyfunc.data import IMAGE_SIZE

PIXEL_MAX = 255.0
UINT16_MAX = 65535.0
MAX_BATCH_ROWS = 1024            # rows per request: ~1 s of CPU work, bounds memory per request
MAX_IMAGE_BYTES = 10 * 2**20     # 10 MiB of encoded image per row: larger than any product photo
MAX_IMAGE_PIXELS = 40_000_000    # width x height before decoding: stops decompression bombs
# Request body of /invocations: two images at the per-image limit (base64: 4/3 larger), or a full batch
# of pixel rows written as floats (~10 KiB each), fit; anything larger is refused before it is read.
MAX_BODY_BYTES = 32 * 2**20
ALLOWED_FORMATS = ("PNG", "JPEG")
# A pixel belongs to the garment when it is this far (0-255) above the background after negation:
# above JPEG noise (~5), low enough to keep the faint edges that set the garment's extent.
FOREGROUND_THRESHOLD = 12
# Side of the corner squares whose median is the background level: garments often touch the edges
# of the frame (Fashion-MNIST's do), but rarely all four corners.
CORNER_PIXELS = 3


# JSON nesting: our contract needs 4 levels (envelope, rows, 28 rows of 28); Python's parser recurses once per
# level and dies with RecursionError (a 500) near 1,000. Deeper than this is refused before parsing.
MAX_JSON_DEPTH = 32
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, vectorised (~10 ms per 32 MiB). Brackets inside strings
    count too: an over-estimate, harmless for base64 images (no brackets in their alphabet)."""
    raw = np.frombuffer(body, np.uint8)
    steps = np.isin(raw, _OPENERS).astype(np.int32) - np.isin(raw, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))


class InputError(ValueError):
    """Bad input from the caller; the message says what is wrong and what is expected."""


def pixels_to_array(value, row: int) -> np.ndarray:
    """A nested list or array of 28x28 numbers in 0-255 -> float32 (28, 28)."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"row {row}: 'pixels' must be a 28x28 array of numbers ({exc})") from None
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"row {row}: 'pixels' must have shape (28, 28), got {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"row {row}: 'pixels' contains NaN or infinite values")
    if array.min() < 0 or array.max() > PIXEL_MAX:
        raise InputError(f"row {row}: 'pixels' values must be in 0..255, got {array.min():g}..{array.max():g}")
    return array


def decode_base64(value, row: int) -> bytes:
    if not isinstance(value, (str, bytes)):
        raise InputError(f"row {row}: 'image' must be a base64 string, got {type(value).__name__}")
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InputError(f"row {row}: 'image' is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"row {row}: 'image' is not valid base64") from None


def open_image(encoded: bytes, where: str) -> Image.Image:
    """Decode PNG/JPEG bytes, refusing other formats, truncated files and decompression bombs.

    `where` names the input in error messages ("row 3", a file name). The web UI uses this too.
    """
    if not encoded:
        raise InputError(f"{where}: the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(encoded), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{where}: image of {width}x{height} pixels exceeds {MAX_IMAGE_PIXELS:,} pixels")
            image.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{where}: not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{where}: image exceeds {MAX_IMAGE_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError):
        raise InputError(f"{where}: the image is truncated or corrupt") from None
    return ImageOps.exif_transpose(image)


def _to_grey_on_black(image: Image.Image) -> np.ndarray:
    """Greyscale float array where the background is ~0 and the garment is bright."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # A cut-out product is a product on a shop page's white background, the dataset's starting point.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: Pillow's convert("L") clips
        values = np.asarray(image, dtype=np.float32)
        peak = UINT16_MAX if image.mode.startswith("I;16") else max(float(values.max()), PIXEL_MAX)
        grey = values * (PIXEL_MAX / peak)
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    c = CORNER_PIXELS
    corners = np.concatenate([grey[:c, :c], grey[:c, -c:], grey[-c:, :c], grey[-c:, -c:]], axis=None)
    background = float(np.median(corners))
    if background > PIXEL_MAX / 2:  # product shot on a light background: negate, as the dataset did
        grey, background = PIXEL_MAX - grey, PIXEL_MAX - background
    return np.clip(grey - background, 0, PIXEL_MAX)


def image_to_array(image: Image.Image) -> np.ndarray:
    """Any decoded image -> float32 (28, 28), 0-255, garment trimmed, scaled and centred."""
    grey = _to_grey_on_black(image)
    if grey.max() > 0:
        grey = grey * (PIXEL_MAX / grey.max())  # stretch contrast: dataset garments reach full white
    rows = np.flatnonzero((grey > FOREGROUND_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((grey > FOREGROUND_THRESHOLD).any(axis=0))
    if rows.size and cols.size:
        grey = grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = grey.shape
    scale = IMAGE_SIZE / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = Image.fromarray(grey.astype(np.uint8)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    top, left = (IMAGE_SIZE - new_h) // 2, (IMAGE_SIZE - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(resized, dtype=np.float32)
    return canvas


def png_base64(pixels: np.ndarray) -> str:
    """A 28x28 dataset image as the `image` column carries it: base64 PNG (input examples, benchmarks)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def frame_to_batch(frame) -> np.ndarray:
    """DataFrame with columns `pixels` and/or `image`, one filled per row -> float32 (N, 28, 28)."""
    columns = set(frame.columns)
    unknown = columns - {"pixels", "image"}
    if unknown:
        raise InputError(f"unknown input column(s) {sorted(unknown)}; send 'pixels' or 'image'")
    if len(frame) == 0:
        # MLflow's schema enforcement drops fields the signature lacks: rows of only those arrive as no rows.
        raise InputError("empty batch: send at least one row with 'pixels' or 'image' (other fields are ignored)")
    if len(frame) > MAX_BATCH_ROWS:
        raise InputError(f"batch of {len(frame)} rows exceeds the maximum of {MAX_BATCH_ROWS}")
    pixels = frame["pixels"].tolist() if "pixels" in columns else [None] * len(frame)
    images = frame["image"].tolist() if "image" in columns else [None] * len(frame)
    batch = np.empty((len(frame), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for row, (pix, img) in enumerate(zip(pixels, images, strict=True)):
        has_pixels, has_image = not _is_missing(pix), not _is_missing(img)
        if has_pixels == has_image:
            raise InputError(f"row {row}: give exactly one of 'pixels' or 'image'")
        if has_pixels:
            batch[row] = pixels_to_array(pix, row)
        else:
            batch[row] = image_to_array(open_image(decode_base64(img, row), f"row {row}"))
    return batch
