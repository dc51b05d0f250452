"""The input contract: what the model accepts, checked before anything costly is done, and decoded.

Two input kinds, one row each in a pandas DataFrame (the pyfunc model's input):
  * `pixels`: a 28x28 array on the dataset's 0-255 scale, used as is;
  * `image`:  a base64 image in one of FORMATS (a data URL, wrapped lines, the URL-safe alphabet and missing
              padding are fine) of any size, grey or colour, with or without alpha, on a light or a dark
              background, a scan or a casual phone photo. `photo.py` turns it into what the dataset looks
              like: light garment on black, trimmed, longest edge 28, centred.
Everything that is not one of these raises `InputError` with a message fit for the API's caller. Image
safety is part of the contract: formats are recognised from their bytes, sizes are read from headers and
budgeted before anything is decoded. What a whole HTTP request may be is the servers' business
(`transport.py`); how much one process decodes at once is `admission.py`'s.
Depends on numpy, pandas and Pillow only.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import time
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist_pyfunc import photo
from fmnist_pyfunc.data import IMAGE_SIZE
from fmnist_pyfunc.photo import PIXEL_MAX

MAX_BATCH_ROWS = 1024            # rows per request: ~1 s of CPU work, bounds memory per request
MAX_IMAGE_BYTES = 10 * 2**20     # 10 MiB of encoded image per row: larger than any product photo
MAX_IMAGE_PIXELS = 40_000_000    # width x height before decoding: stops decompression bombs
# Work per request, counted in decoded pixels from the image headers before anything is decoded (~0.01 s of
# CPU per million here): one image at the per-image limit plus a UI batch of 16 phone JPEGs, which decode at
# 1/8 scale (WORK_SIDE), fit. 450 tiny PNGs of 40 M white pixels each (one 32 MiB body) do not.
MAX_REQUEST_PIXELS = 64_000_000
UNIT_SCALE_MAX = 1.0           # 'pixels' all at or below this are on the 0-1 scale (see pixels_to_array)
MAX_REQUEST_SECONDS = 10.0       # decoding stops here, not only the answer: the client has waited long enough
# Images are brought down to about this many pixels a side before any float work (trim, contrast, resize to
# 28): a garment filling a tenth of the frame still spans ~50 pixels. JPEGs decode there directly (DCT scaling
# 1/2, 1/4 or 1/8); other formats decode whole and are box-reduced by an integer factor. Work and memory per
# image then no longer grow with the photo's size beyond its decoding.
WORK_SIDE = 512
# What phones and browsers produce and Pillow decodes safely here (GIF: its first frame). HEIC needs a plugin
# this project does not ship; vector and document formats are not images of a garment. The one list of them:
# Pillow's name -> (the name people know, the media type browsers filter on). Messages, the UI and the
# model's description render it from here.
FORMATS = {"PNG": ("PNG", "image/png"), "JPEG": ("JPEG", "image/jpeg"), "WEBP": ("WebP", "image/webp"),
           "GIF": ("GIF", "image/gif"), "BMP": ("BMP", "image/bmp"), "AVIF": ("AVIF", "image/avif")}
ALLOWED_FORMATS = tuple(FORMATS)
_NAMES = [name for name, _ in FORMATS.values()]
ACCEPTED = f"{', '.join(_NAMES[:-1])} or {_NAMES[-1]}"
MEDIA_TYPES = ",".join(media for _, media in FORMATS.values())
# Formats refused by name, recognised from their first bytes, so the message says what was sent.
REFUSED_SIGNATURES = ((b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"), (b"II*\x00", "TIFF"),
                      (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"))
HEIC_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1")
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")
# A browser data URL's prefix, e.g. "data:image/png;base64,".
DATA_URL = re.compile(r"data:[\w.+-]*/?[\w.+-]*(?:;[\w.+-]+=[^;,]*)*;base64,", re.IGNORECASE)
URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")


class InputError(ValueError):
    """Bad input from the caller; the message says what is wrong and what is expected."""


class DeadlineExceeded(RuntimeError):
    """The request's work passed MAX_REQUEST_SECONDS and was stopped."""


def pixels_to_array(value, row: int) -> np.ndarray:
    """A nested list or array of 28x28 numbers -> float32 (28, 28) on the 0-255 scale.

    The scale is read from the values, as documented in docs/serving.md: all within 0..1 is the 0-1 scale
    (torchvision's `ToTensor`, the first thing many ML clients send), multiplied by 255; anything else must lie
    within 0..255. On the 0-255 scale an image that never passes 1 is black, so the rule misreads nothing.
    Booleans, text and normalised tensors (negative values) are refused, saying what to send."""
    where = f"row {row}: 'pixels'"
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} must be a 28x28 array of numbers ({exc})") from None
    if array.dtype == bool:
        raise InputError(f"{where} are booleans: send grey levels, numbers on the 0-255 scale (or 0-1)")
    if array.dtype.kind not in "iuf":
        raise InputError(f"{where} must be a 28x28 array of numbers, got {array.dtype.name} values")
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"{where} must have shape (28, 28), got {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{where} contains NaN or infinite values")
    low, high = array.min(), array.max()
    if low < 0 or high > PIXEL_MAX:
        hint = " (a normalised tensor? send the image before normalising)" if low < 0 else ""
        raise InputError(f"{where} values must be on the 0-255 scale or all within 0..1, got {low:g}..{high:g}{hint}")
    return array * PIXEL_MAX if high <= UNIT_SCALE_MAX else array


def decode_base64(value, where: str) -> bytes:
    """Base64 as people produce it: a browser's data URL, `base64`'s 76-column lines, the URL-safe alphabet,
    missing padding. Anything else outside the alphabet is refused."""
    if not isinstance(value, (str, bytes)):
        raise InputError(f"{where}: the image must be a base64 string, got {type(value).__name__}")
    limit = MAX_IMAGE_BYTES * 4 // 3 + 4
    if len(value) > 2 * limit:  # cheap first: whitespace and a prefix never double the length
        raise InputError(f"{where}: the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
        prefix = DATA_URL.match(text)
        text = "".join((text[prefix.end():] if prefix else text).split()).translate(URL_SAFE_TO_STANDARD)
        if len(text) > limit:
            raise InputError(f"{where}: the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: the image is not valid base64") from None


def peek_image(encoded: bytes, where: str) -> Image.Image:
    """Read only the header: the format (refusing others by name), the size (refusing bombs), and for a
    JPEG the reduced size it will decode at. Nothing is decoded yet; `image.size` is what decoding costs."""
    if not encoded:
        raise InputError(f"{where}: the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(encoded), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InputError(f"{where}: {_what_it_is(encoded)}; send {ACCEPTED}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{where}: image exceeds {MAX_IMAGE_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError):
        raise InputError(f"{where}: the image is truncated or corrupt") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{where}: image of {width}x{height} pixels exceeds {MAX_IMAGE_PIXELS:,} pixels")
    if image.format == "JPEG":
        image.draft(image.mode, (WORK_SIDE, WORK_SIDE))  # DCT scaling: 1/2, 1/4 or 1/8 of the work
    return image


def decode_image(image: Image.Image, where: str) -> Image.Image:
    """Decode what `peek_image` opened (a GIF's first frame), upright per its EXIF orientation, reduced to
    about WORK_SIDE pixels a side."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError):
        raise InputError(f"{where}: the image is truncated or corrupt") from None
    image = ImageOps.exif_transpose(image)
    factor = max(image.size) // WORK_SIDE
    if factor < 2:
        return image
    if image.mode not in REDUCIBLE_MODES:  # averaging needs real levels: palette, 1-bit and 16-bit images
        image = image.convert("RGBA" if image.mode in ("P", "PA") else "I" if image.mode.startswith("I;16") else "L")
    return image.reduce(factor)


def open_image(encoded: bytes, where: str) -> Image.Image:
    """Check and decode image bytes; `where` names the input in messages ("row 3", a file name). The UI uses
    this to refuse, before sending it on, what the model would refuse."""
    return decode_image(peek_image(encoded, where), where)


def _what_it_is(encoded: bytes) -> str:
    head = encoded[:64].lstrip()
    for signature, name in REFUSED_SIGNATURES:
        if head.startswith(signature):
            return f"{name} is not accepted"
    if encoded[4:8] == b"ftyp" and encoded[8:12] in HEIC_BRANDS:
        return "HEIC/HEIF is not accepted (export it as JPEG)"
    if head.startswith((b"GIF8", b"\x89PNG", b"\xff\xd8", b"BM", b"RIFF")) or encoded[4:8] == b"ftyp":
        return "not a complete image"
    return "not an image in an accepted format"


def image_to_array(image: Image.Image) -> np.ndarray:
    """Any decoded image -> float32 (28, 28), 0-255, garment trimmed, scaled and centred (see `photo`)."""
    return photo.to_pixels(image)


def png_base64(pixels: np.ndarray) -> str:
    """A 28x28 dataset image as the `image` column carries it: base64 PNG (input examples, benchmarks)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def open_rows(frame) -> list:
    """DataFrame with columns `pixels` and/or `image`, one filled per row -> per row, a float32 (28, 28)
    array or an image opened but not decoded. Everything that can be refused from headers is refused here."""
    columns = set(frame.columns)
    unknown = columns - {"pixels", "image"}
    if unknown:
        raise InputError(f"unknown input column(s) {sorted(unknown)}; send 'pixels' or 'image'")
    if len(frame) == 0:
        # MLflow's schema enforcement drops what the signature lacks: rows of other fields, and bare arrays
        # such as {"inputs": [<28x28>, ...]} (no column name), arrive as no rows.
        raise InputError("empty batch: no row with 'pixels' or 'image' arrived. Send each image as an object, "
                         "{\"pixels\": <28x28 numbers 0-255>} or {\"image\": \"<base64>\"}; bare arrays of "
                         "images and other fields are dropped")
    if len(frame) > MAX_BATCH_ROWS:
        raise InputError(f"batch of {len(frame)} rows exceeds the maximum of {MAX_BATCH_ROWS}")
    pixels = frame["pixels"].tolist() if "pixels" in columns else [None] * len(frame)
    images = frame["image"].tolist() if "image" in columns else [None] * len(frame)
    rows = []
    for row, (pix, img) in enumerate(zip(pixels, images, strict=True)):
        has_pixels, has_image = not _is_missing(pix), not _is_missing(img)
        if has_pixels == has_image:
            raise InputError(f"row {row}: give exactly one of 'pixels' or 'image'")
        where = f"row {row}"
        rows.append(pixels_to_array(pix, row) if has_pixels else peek_image(decode_base64(img, where), where))
    cost = decoded_pixels(rows)
    if cost > MAX_REQUEST_PIXELS:
        raise InputError(f"these images decode to {cost:,} pixels, more than {MAX_REQUEST_PIXELS:,} per request: "
                         "send fewer or smaller images per request")
    return rows


def frame_pixels(frame) -> int:
    """What decoding a frame of rows will cost, in pixels, read from image headers only (a pixel row is 28x28;
    a row that cannot be opened counts as one too: the model will refuse it): a server's measure of the work
    a request queues, before the model sees it."""
    column = frame["image"] if "image" in list(frame.columns) else []
    images = [value for value in column if isinstance(value, (str, bytes))]
    total = (len(frame) - len(images)) * IMAGE_SIZE * IMAGE_SIZE
    for value in images:
        try:
            width, height = peek_image(decode_base64(value, "image"), "image").size
        except InputError:
            width = height = IMAGE_SIZE
        total += width * height
    return total


def decoded_pixels(rows: list) -> int:
    return sum(row.size[0] * row.size[1] if isinstance(row, Image.Image) else row.size for row in rows)


def decode_rows(rows: list, deadline: float) -> np.ndarray:
    """`open_rows`' rows -> float32 (N, 28, 28); stops with DeadlineExceeded once time.monotonic() passes
    `deadline` (checked between images: one image at the per-image limit decodes in under a second)."""
    batch = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for index, row in enumerate(rows):
        if isinstance(row, np.ndarray):
            batch[index] = row
            continue
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"stopped after {index} of {len(rows)} images: decoding took longer than "
                                   f"{MAX_REQUEST_SECONDS:g} s; send fewer or smaller images per request")
        batch[index] = image_to_array(decode_image(row, f"row {index}"))
    return batch
