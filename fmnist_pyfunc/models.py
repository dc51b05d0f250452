"""Network definitions: a small conv net and an MLP baseline, both (N, 1, 28, 28) -> (N, 10) logits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fmnist_pyfunc.data import IMAGE_SIZE, NUM_CLASSES, PIXEL_MEAN, PIXEL_STD


def normalize(images: np.ndarray) -> torch.Tensor:
    """The networks' input, for training, evaluation and serving alike: (N, 28, 28) on the 0-255 scale (uint8
    or float) -> float32 (N, 1, 28, 28) with the training set's mean 0 and std 1."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).float()
    return ((pixels / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def cnn(width: int, depth: int, dropout: float) -> nn.Sequential:
    """`depth` stages of conv-BN-ReLU + 2x2 max-pool, channels width, 2*width, 4*width, ..."""
    layers, c_in, size = [], 1, IMAGE_SIZE
    for stage in range(depth):
        c_out = width * 2**stage
        layers += [*_conv_bn_relu(c_in, c_out), nn.MaxPool2d(2)]
        c_in, size = c_out, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * size * size, NUM_CLASSES))


def mlp(width: int, depth: int, dropout: float) -> nn.Sequential:
    """`depth` hidden layers of `width` units with BN, ReLU and dropout."""
    layers, n_in = [nn.Flatten()], IMAGE_SIZE * IMAGE_SIZE
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, NUM_CLASSES))


ARCHITECTURES = {"cnn": cnn, "mlp": mlp}


def build(arch: str, width: int, depth: int, dropout: float) -> nn.Sequential:
    return ARCHITECTURES[arch](width, depth, dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
