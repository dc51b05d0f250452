"""Whole-batch augmentation of the training set on its device, never per image.

The whole set (~55 MB as uint8) is held in memory as one tensor; a PIL transform per image in a
DataLoader is what makes the tutorial pipeline slow.
"""

from __future__ import annotations

import torch

from fmnist_pyfunc.data import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

NORMALISED_BLACK = -PIXEL_MEAN / PIXEL_STD


MAX_SHIFT_PIXELS = 2  # garments are centred by the dataset's own pipeline; larger shifts hurt accuracy


def augment(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Augment a whole batch (N, 1, 28, 28) at once: random mirror and/or per-image translation."""
    n = images.shape[0]
    if "flip" in kind:
        flip = torch.rand(n, generator=generator, device=images.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if "shift" in kind:
        pad = MAX_SHIFT_PIXELS
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=NORMALISED_BLACK)
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator, device=images.device)
        span = torch.arange(IMAGE_SIZE, device=images.device)
        rows, cols = (dy + span)[:, :, None], (dx + span)[:, None, :]
        images = padded[torch.arange(n, device=images.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    return images
