"""Whole-batch augmentation of the training set on its device, never per image.

The whole set (~55 MB as uint8) is held in memory as one tensor; a PIL transform per image in a
DataLoader is what makes the tutorial pipeline slow.

"photo" trains for what serving makes of people's photos (photo.py): what the background model, trim
and resize leave behind is a small tilt, a garment a little too large or small or off-centre, and the
trace of a drop shadow beside it. (Blur and noise, tried too, cost clean accuracy and gained nothing on
the photo set: preprocessing removes them; see docs/training.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmnist_pyfunc.data import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

NORMALISED_BLACK = -PIXEL_MEAN / PIXEL_STD
SILHOUETTE_LEVEL = 0.05  # share of white above which a pixel is garment (the dataset's background is 0)


MAX_SHIFT_PIXELS = 2  # garments are centred by the dataset's own pipeline; larger shifts hurt accuracy
PHOTO_SHARE = 0.3            # of each batch: the rest stays clean, as scans and the test set are
PHOTO_TILT_DEGREES = 10.0    # either way: a phone held casually
PHOTO_SCALE = (0.88, 1.05)   # the crop a little loose (shadow, stray edge) or tight
PHOTO_SHIFT_PIXELS = 1.5     # off-centre after the crop
PHOTO_SHADOW_SHARE = 0.5     # of the photo share: a drop shadow's trace left in the crop
PHOTO_SHADOW_OFFSET = (0.5, 2.0)   # pixels the shadow lies below and beside the garment
PHOTO_SHADOW_LEVEL = (0.15, 0.45)  # its brightness as a share of white (serving keeps the weaker ones out)
PHOTO_SHADOW_SOFTNESS = 1.0  # blur sigma (pixels) of its edge
GARMENT_COVER = 2.0          # blur sigma (pixels) of the silhouette: where it stays above 1/2, the garment
                             # (holes in it included) hides the shadow


def augment(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Augment a whole batch (N, 1, 28, 28) at once: random mirror and/or per-image translation."""
    n = images.shape[0]
    if "flip" in kind or kind == "photo":  # photo: mirror too
        flip = torch.rand(n, generator=generator, device=images.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if kind == "photo":
        images = _photo(images, generator)
    if "shift" in kind:
        pad = MAX_SHIFT_PIXELS
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=NORMALISED_BLACK)
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator, device=images.device)
        span = torch.arange(IMAGE_SIZE, device=images.device)
        rows, cols = (dy + span)[:, :, None], (dx + span)[:, None, :]
        images = padded[torch.arange(n, device=images.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    return images


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _photo(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Tilt, rescale and shift a random PHOTO_SHARE of the batch (one affine warp for all of them) and give
    some a shadow."""
    n, device = images.shape[0], images.device
    chosen = torch.rand(n, generator=generator, device=device) < PHOTO_SHARE
    k = int(chosen.sum())
    if k == 0:
        return images
    x = images[chosen] - NORMALISED_BLACK  # black = 0, so the warp's zero padding is the background
    angle = torch.deg2rad(_uniform(k, -PHOTO_TILT_DEGREES, PHOTO_TILT_DEGREES, generator, device))
    scale = _uniform(k, *PHOTO_SCALE, generator, device)
    shift = _uniform(2 * k, -PHOTO_SHIFT_PIXELS, PHOTO_SHIFT_PIXELS, generator, device).view(k, 2) * 2 / IMAGE_SIZE
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = _shadow(x, generator)
    out = images.clone()
    out[chosen] = x + NORMALISED_BLACK
    return out


def _shifted(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each image moved by its own (dy, dx) pixels, zeros shifted in."""
    k = x.shape[0]
    theta = torch.zeros(k, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -dx * 2 / IMAGE_SIZE, -dy * 2 / IMAGE_SIZE
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def _shadow(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For PHOTO_SHADOW_SHARE of the images (black = 0), a soft grey copy of the garment's silhouette below and
    to one side of it: what serving's crop keeps of a drop shadow."""
    k, device = x.shape[0], x.device
    white = 1 / PIXEL_STD
    silhouette = (x > SILHOUETTE_LEVEL * white).to(x.dtype)
    side = torch.where(torch.rand(k, generator=generator, device=device) < 0.5, -1.0, 1.0)
    dy = _uniform(k, *PHOTO_SHADOW_OFFSET, generator, device)
    dx = side * _uniform(k, *PHOTO_SHADOW_OFFSET, generator, device)
    shadow = _blur(_shifted(silhouette, dy, dx), torch.full((k,), PHOTO_SHADOW_SOFTNESS, device=device))
    level = _uniform(k, *PHOTO_SHADOW_LEVEL, generator, device) * white
    level = level * (torch.rand(k, generator=generator, device=device) < PHOTO_SHADOW_SHARE)
    beside = _blur(silhouette, torch.full((k,), GARMENT_COVER, device=device)) < 0.5
    return torch.where(beside, torch.maximum(x, shadow * level.view(k, 1, 1, 1)), x)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur of its own sigma per image: separable 5-tap kernels, applied as grouped convolutions."""
    taps = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-taps[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (k, 5)
    k = x.shape[0]
    x = x.view(1, k, IMAGE_SIZE, IMAGE_SIZE)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0)), kernel.view(k, 1, 1, 5), groups=k)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2)), kernel.view(k, 1, 5, 1), groups=k)
    return x.view(k, 1, IMAGE_SIZE, IMAGE_SIZE)
