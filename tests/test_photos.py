"""Casual photos of real test garments (fmnist_testkit/photos.py) become what the network was trained on: the 28x28
image preprocessing makes of each resembles the garment's own test image, effect by effect."""

import base64

import numpy as np
import pytest

from fmnist_pyfunc import contract
from fmnist_testkit import photos
from fmnist_testkit.images import correlation

SAMPLE = 30  # test images per effect: ~0.3 s each, enough for a stable mean

# Mean correlation with the original, measured with this preprocessing (the corner-median background
# before it: uneven light 0.21, together 0.23, light cut-outs 0.34), less a margin. A tilt cannot be undone:
# the network learns it (augment="photo").
FLOORS = {"centred": 0.8, "off_centre": 0.8, "shadow": 0.7, "rotated": 0.6, "degraded": 0.8,
          "uneven_light": 0.8, photos.TOGETHER: 0.6}


def _seen(image) -> np.ndarray:
    encoded = base64.b64decode(photos.encoded(image))
    return contract.image_to_array(contract.open_image(encoded, "photo"))


@pytest.mark.parametrize("effect", FLOORS)
def test_each_photo_effect_still_shows_the_garment(dataset, effect):
    """Off-centre, shadowed, tilted, noisy/blurred/JPEG'd, unevenly lit photos (and all at once) of real test
    garments come out of preprocessing close to the garments' test images."""
    images = dataset.test_images[:SAMPLE]
    scores = [correlation(_seen(photos.render(image, effect, seed)), image) for seed, image in enumerate(images)]
    assert np.mean(scores) >= FLOORS[effect], f"{effect}: {np.mean(scores):.3f}"


def test_uneven_light_is_modelled_not_mistaken_for_garment(dataset):
    """Light falling off across the frame leaves the background black and the garment filling the 28x28
    frame, as in the dataset (a flat background estimate saw the dim side as garment)."""
    for seed, image in enumerate(dataset.test_images[:10]):
        seen = _seen(photos.render(image, "uneven_light", seed))
        garment = image > 0
        near = np.zeros_like(garment)  # within 2 pixels of the garment: re-centring may move it that much
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near |= np.roll(garment, (dy, dx), axis=(0, 1))
        assert seen[~near].mean() < 10, seed
        assert max(np.ptp(np.nonzero(seen > 30)[0]), np.ptp(np.nonzero(seen > 30)[1])) >= 24, seed


def test_preprocessing_is_deterministic(dataset):
    """The same photo gives the same 28x28 image every time."""
    photo = photos.render(dataset.test_images[0], photos.TOGETHER, 0)
    assert np.array_equal(_seen(photo), _seen(photo))
