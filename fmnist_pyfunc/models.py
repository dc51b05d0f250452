"""Network definitions, all (N, 1, 28, 28) -> (N, 10) logits: a small residual CNN (`resnet2`, the default), the
networks it replaced (`resnet`, `cnn`: kept, as registered models name their architecture and older versions must
still load and be scored by the promotion gate) and an MLP baseline."""

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


class Residual(nn.Module):
    """x + conv-BN-ReLU(x): a second convolution per stage whose gradient has a short path."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resnet(width: int, depth: int, dropout: float, first_residual_stage: int = 1) -> nn.Sequential:
    """`depth` stages of conv, 2x2 max-pool, BN, ReLU (pooling before BN and ReLU: their cost, ~half of a
    training step on the CPU, falls 4x), each stage from `first_residual_stage` on followed by a `Residual` conv
    at the pooled resolution (the 14x14 one costs ~13 % more time per step, the 7x7 and 3x3 ones less).
    Channels width, 2*width, 4*width, ..."""
    layers, c_in, size = [], 1, IMAGE_SIZE
    for stage in range(depth):
        c_out = width * 2**stage
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.MaxPool2d(2),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if stage >= first_residual_stage:
            layers.append(Residual(c_out))
        c_in, size = c_out, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * size * size, NUM_CLASSES))


def resnet2(width: int, depth: int, dropout: float) -> nn.Sequential:
    """`resnet` with a residual conv after every stage, the first (14x14) too: the default. A new name, as
    registered `resnet` versions must keep loading with their own layout."""
    return resnet(width, depth, dropout, first_residual_stage=0)


def mlp(width: int, depth: int, dropout: float) -> nn.Sequential:
    """`depth` hidden layers of `width` units with BN, ReLU and dropout."""
    layers, n_in = [nn.Flatten()], IMAGE_SIZE * IMAGE_SIZE
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, NUM_CLASSES))


ARCHITECTURES = {"resnet2": resnet2, "resnet": resnet, "cnn": cnn, "mlp": mlp}


def build(arch: str, width: int, depth: int, dropout: float) -> nn.Sequential:
    return ARCHITECTURES[arch](width, depth, dropout)


def memory_format(arch: str) -> torch.memory_format:
    """channels_last for the CNNs: oneDNN's (CPU) and cuDNN's fast convolution layout (~2x here); inputs need
    no conversion, since with one channel NCHW and NHWC are the same memory."""
    return torch.contiguous_format if arch == "mlp" else torch.channels_last


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
