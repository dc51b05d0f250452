"""A gallery of real test-set images for the page, read with numpy and Pillow (no torch)."""

from __future__ import annotations

import io
import logging

from PIL import Image

from fmnist_pyfunc import data
from fmnist_pyfunc.config import CLASS_NAMES

SAMPLES_PER_CLASS = 2
DISPLAY_SIZE = 84  # gallery thumbnails: 3x upscaled so that they are visible; the model re-scales anyway


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()


def load_gallery() -> list[dict]:
    """The first SAMPLES_PER_CLASS test images of each class; empty when the dataset is not installed."""
    try:
        dataset = data.load(download=False)
    except data.DataError as exc:
        logging.getLogger(__name__).warning("no sample gallery: %s", exc)
        return []
    gallery = []
    for label, name in enumerate(CLASS_NAMES):
        for index in (dataset.test_labels == label).nonzero()[0][:SAMPLES_PER_CLASS]:
            gallery.append({"label": name, "test_index": int(index), "png": _png(dataset.test_images[index])})
    return gallery
