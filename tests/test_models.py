"""Networks map (N, 1, 28, 28) images to (N, 10) logits for every supported shape."""

import pytest
import torch

from fmnist_pyfunc import models


@pytest.mark.parametrize("arch, width, depth", [("cnn", 8, 1), ("cnn", 8, 2), ("cnn", 32, 3), ("cnn", 4, 4),
                                                ("mlp", 64, 1), ("mlp", 128, 3)])
def test_output_shape(arch, width, depth):
    """Every architecture, width and depth maps (N, 1, 28, 28) to (N, 10) logits."""
    model = models.build(arch, width, depth, dropout=0.1).eval()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_default_cnn_is_small():
    """The default network stays a small CNN (~100k parameters) so that it trains in minutes on a CPU."""
    assert 50_000 < models.count_parameters(models.build("cnn", 32, 3, 0.1)) < 200_000


def test_width_scales_capacity():
    """Doubling the CNN's width multiplies its parameters by more than 3 (conv weights grow with width squared)."""
    small, large = (models.count_parameters(models.build("cnn", w, 3, 0.0)) for w in (8, 16))
    assert large > 3 * small
