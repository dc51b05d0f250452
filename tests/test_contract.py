"""Preprocessing: every input kind becomes a dataset-like 28x28 image; bad input gets a clear InputError."""

import base64
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from fmnist_pyfunc import admission
from fmnist_pyfunc import contract as pre
from fmnist_pyfunc.contract import png_base64
from fmnist_testkit.images import correlation, encode, exif_rotated_jpeg, upscaled


def _batch(**columns) -> np.ndarray:
    """What the pyfunc does with its input, without the model: open (checks from headers), then decode."""
    return pre.decode_rows(pre.open_rows(pd.DataFrame(columns)), time.monotonic() + pre.MAX_REQUEST_SECONDS)


def test_raw_pixels_pass_through_unchanged(dataset):
    """A 28x28 pixel row reaches the network exactly as sent, as float32."""
    images = dataset.test_images[:4]
    batch = _batch(pixels=[img.tolist() for img in images])
    assert batch.dtype == np.float32 and np.array_equal(batch, images.astype(np.float32))


def test_pixels_on_the_0_1_scale_are_read_as_torchvision_sends_them(dataset):
    """A 28x28 float array within 0..1 (torchvision's ToTensor) is the same picture as its 0-255 original, and an
    integer 0/1 mask is read as black and white: never as a nearly black image."""
    image = dataset.test_images[:2]
    unit = [(img / 255.0).tolist() for img in image]
    np.testing.assert_allclose(_batch(pixels=unit), image.astype(np.float32), atol=1e-3)
    mask = (image[0] > 0).astype(int)
    np.testing.assert_array_equal(_batch(pixels=[mask.tolist()])[0], mask * 255.0)


def test_png_of_a_dataset_image_reproduces_it(dataset):
    """Dataset images sent as PNG come back as themselves; the few whose faint edges were trimmed, rescaled
    by a pixel or two, stay close."""
    images = dataset.test_images[:100]
    batch = _batch(image=[png_base64(image) for image in images])
    scores = np.array([correlation(out, image) for out, image in zip(batch, images, strict=True)])
    assert (scores > 0.95).mean() >= 0.9 and scores.min() > 0.75


@pytest.mark.parametrize("variant", ["inverted", "rgb_on_white", "jpeg_large", "rgba_cutout", "off_centre_small",
                                     "palette", "16bit"])
def test_photos_as_people_upload_them_look_like_the_dataset(dataset, variant):
    """Light backgrounds, colour, alpha, JPEG, any size and position are mapped back to the dataset's form."""
    original = dataset.test_images[7]  # a real test image
    if variant == "inverted":
        encoded = png_base64(255 - original)
    elif variant == "rgb_on_white":
        rgb = np.stack([255 - original, 255 - original // 2, 255 - original // 3], axis=-1)
        encoded = encode(upscaled(rgb.astype(np.uint8)))
    elif variant == "jpeg_large":
        encoded = encode(upscaled(255 - original, 600), "JPEG", quality=85)
    elif variant == "rgba_cutout":
        dark = 255 - original  # the product's real tones: dataset pixels are negated photo pixels
        rgba = np.dstack([dark, dark, dark, np.where(original > 0, 255, 0)]).astype(np.uint8)
        encoded = encode(upscaled(rgba))  # its fringe is light: placed on white and negated, as Zalando did
    elif variant == "off_centre_small":
        canvas = np.full((200, 300), 255, np.uint8)
        canvas[20:76, 200:256] = 255 - np.asarray(Image.fromarray(original).resize((56, 56)))
        encoded = encode(Image.fromarray(canvas))
    elif variant == "palette":
        encoded = encode(upscaled(original).convert("P"))
    else:
        encoded = encode(Image.fromarray(original.astype(np.uint16) * 257))
    assert correlation(_batch(image=[encoded])[0], original) > 0.8, variant


N_CUTOUTS = 40  # test images per tone: dim garments (sandals, dark shirts) are where a mean-tone rule misfired
MIN_CUTOUTS_RIGHT = 0.9  # the fringe rule gets ~97 % (a few outlines are brighter than the inside), the mean ~66 %


@pytest.mark.parametrize("tone", ["light", "dark"])
def test_cutouts_are_placed_where_the_garment_has_contrast(dataset, tone):
    """A transparent cut-out comes out as the dataset's bright garment on black whatever its own tone, dim
    garments included: a light one placed on black, a dark one on white and negated (a light one on white
    lost its contrast), decided by the fringe, which keeps the tone of the background it was cut from."""
    right = []
    for original in dataset.test_images[:N_CUTOUTS]:
        grey = original if tone == "light" else 255 - original
        rgba = np.dstack([grey, grey, grey, np.where(original > 0, 255, 0)]).astype(np.uint8)
        right.append(correlation(_batch(image=[encode(upscaled(rgba))])[0], original) > 0.8)
    assert np.mean(right) >= MIN_CUTOUTS_RIGHT, right


def test_mixed_batch_of_pixels_and_images(dataset):
    """One batch may mix pixel rows and encoded images; each row keeps its place and pixels stay unchanged."""
    images = dataset.test_images[:2]
    batch = _batch(pixels=[images[0].tolist(), None], image=[None, png_base64(images[1])])
    assert batch.shape == (2, 28, 28)
    assert np.array_equal(batch[0], images[0])


def test_extreme_aspect_ratios_and_tiny_images_are_accepted():
    """1x1, 10000x10 and 10x10000 images all become one 28x28 input."""
    for size in [(1, 1), (10000, 10), (10, 10000)]:
        encoded = encode(Image.new("L", size, 200))
        assert _batch(image=[encoded]).shape == (1, 28, 28)


def test_exif_rotation_is_applied(dataset):
    """A JPEG stored sideways with an EXIF orientation is turned upright before classification."""
    original = dataset.test_images[3]
    encoded = exif_rotated_jpeg(original)
    assert correlation(_batch(image=[encoded])[0], original) > 0.9


def _tiff_base64() -> str:
    return encode(Image.new("L", (28, 28)), "TIFF")


@pytest.mark.parametrize("columns, message", [
    ({"pixels": [np.zeros((27, 28)).tolist()]}, "shape"),
    ({"pixels": [np.zeros(784).tolist()]}, "shape"),
    ({"pixels": [np.zeros((28, 28, 3)).tolist()]}, "shape"),
    ({"pixels": [np.full((28, 28), np.nan).tolist()]}, "NaN"),
    ({"pixels": [np.full((28, 28), np.inf).tolist()]}, "NaN or infinite"),
    ({"pixels": [np.full((28, 28), -1.0).tolist()]}, "0-255 scale or all within 0..1, got -1..-1 \\(a normalised"),
    ({"pixels": [np.full((28, 28), 256.0).tolist()]}, "0-255 scale or all within 0..1, got 256..256$"),
    ({"pixels": [[["a"] * 28] * 28]}, "numbers"),
    ({"pixels": [np.ones((28, 28), bool).tolist()]}, "booleans: send grey levels"),
    ({"pixels": []}, "empty batch"),
    ({"image": ["not base64!!"]}, "base64"),
    ({"image": [base64.b64encode(b"hello, not an image").decode()]}, "not an image in an accepted format"),
    ({"image": [_tiff_base64()]}, "TIFF is not accepted; send PNG, JPEG, WebP, GIF, BMP or AVIF"),
    ({"image": [base64.b64encode(b"%PDF-1.7\n%...").decode()]}, "PDF is not accepted"),
    ({"image": [base64.b64encode(b"\x00\x00\x00\x18ftypheic" + bytes(20)).decode()]}, "HEIC/HEIF is not accepted"),
    ({"image": [""]}, "row 0: the image is empty"),
    ({"image": [12]}, "base64 string"),
    ({"pixels": [None], "image": [None]}, "exactly one"),
    ({"weights": [1]}, "unknown input column"),
])
def test_bad_input_raises_a_clear_error(columns, message):
    """Each kind of bad row raises InputError with a message saying what is wrong."""
    with pytest.raises(pre.InputError, match=message):
        _batch(**columns)


def test_truncated_jpeg_is_refused(dataset):
    """Half a JPEG is refused as truncated or corrupt, not decoded into a grey half-image."""
    raw = base64.b64decode(encode(upscaled(dataset.test_images[0]), "JPEG"))
    truncated = base64.b64encode(raw[: len(raw) // 2]).decode()
    with pytest.raises(pre.InputError, match="row 0: the image is truncated or corrupt"):
        _batch(image=[truncated])


def test_decompression_bomb_is_refused_before_decoding():
    """A 1 MB PNG declaring 400 M pixels is refused from its header, before decoding."""
    encoded = encode(Image.new("1", (20000, 20000)))  # ~1 MB PNG declaring 400 M pixels
    with pytest.raises(pre.InputError, match="exceeds"):
        _batch(image=[encoded])


def test_oversized_batch_is_refused():
    """More rows than MAX_BATCH_ROWS are refused with the maximum named."""
    with pytest.raises(pre.InputError, match="maximum"):
        _batch(pixels=[np.zeros((28, 28)).tolist()] * (pre.MAX_BATCH_ROWS + 1))


def test_the_pixel_limit_is_ours_not_pillows():
    """Just over MAX_IMAGE_PIXELS (40 M, below Pillow's own bomb threshold of ~89 M) is refused by our check,
    from the header; exactly at the limit is decoded and classified."""
    assert pre.MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS
    width = 6400
    over = encode(Image.new("1", (width, pre.MAX_IMAGE_PIXELS // width + 1)))
    with pytest.raises(pre.InputError, match=f"image of {width}x6251 pixels exceeds 40,000,000 pixels"):
        _batch(image=[over])
    at_limit = Image.new("1", (width, pre.MAX_IMAGE_PIXELS // width))
    at_limit.paste(1, (2000, 1000, 4400, 5250))  # a white block: something to trim to
    assert _batch(image=[encode(at_limit)]).shape == (1, 28, 28)



def test_a_request_is_refused_from_its_headers_when_it_would_decode_too_many_pixels(monkeypatch):
    """Images whose headers add up to more than MAX_REQUEST_PIXELS are refused before any of them is decoded:
    two images at the per-image limit (80 M) fit every per-image check and still exceed the 64 M budget."""
    width = 6400
    at_limit = encode(Image.new("1", (width, pre.MAX_IMAGE_PIXELS // width)))
    frame = pd.DataFrame({"image": [at_limit, at_limit]})

    def no_decoding(image):
        raise AssertionError("an image was decoded before the request's budget was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(pre.InputError, match="decode to 80,000,000 pixels, more than 64,000,000 per request"):
        pre.open_rows(frame)
    assert pre.decoded_pixels(pre.open_rows(pd.DataFrame({"image": [at_limit]}))) == pre.MAX_IMAGE_PIXELS


def test_a_phone_sized_jpeg_costs_and_decodes_at_a_fraction(dataset):
    """A 4000x3000 JPEG is decoded at 1/4 scale (DCT scaling), so it costs 1000x750 pixels of the request's
    budget, and is still read as the same garment."""
    photo = encode(Image.fromarray(255 - dataset.test_images[0]).resize((4000, 3000)), "JPEG", quality=90)
    rows = pre.open_rows(pd.DataFrame({"image": [photo]}))
    assert rows[0].size == (1000, 750) and pre.decoded_pixels(rows) == 1000 * 750
    full = _batch(image=[encode(Image.fromarray(255 - dataset.test_images[0]).resize((400, 300)), "JPEG")])
    assert correlation(pre.decode_rows(rows, time.monotonic() + 10)[0], full[0]) > 0.95


def test_decoding_stops_at_the_deadline(dataset):
    """Past its deadline a request's remaining images are not decoded: DeadlineExceeded names how far it got."""
    rows = pre.open_rows(pd.DataFrame({"image": [png_base64(img) for img in dataset.test_images[:3]]}))
    with pytest.raises(pre.DeadlineExceeded, match="stopped after 0 of 3 images"):
        pre.decode_rows(rows, deadline=time.monotonic() - 1)


def test_a_worker_decodes_one_heavy_request_at_a_time_and_light_ones_beside_it():
    """While one request holds the largest budget, another as heavy is told Busy; a light one still fits;
    once the first is done the heavy one is admitted."""
    with admission.admitted(pre.MAX_REQUEST_PIXELS):
        with pytest.raises(admission.Busy, match="retry in a moment"), admission.admitted(pre.MAX_REQUEST_PIXELS):
            pass
        with admission.admitted(16 * 28 * 28):
            pass
    with admission.admitted(pre.MAX_REQUEST_PIXELS):
        pass
