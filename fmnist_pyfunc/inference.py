"""The one inference path: training's evaluation, the promotion gate and the served model all call
`forward`, so a run's logged test accuracy is exactly what its served model scores.

Also the one place that decides the number format: bf16 where the hardware computes it natively (CUDA,
CPUs with AVX512-BF16 or AMX), fp32 elsewhere, for training and serving alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fmnist_pyfunc.data import NUM_CLASSES
from fmnist_pyfunc.models import normalize

# Images per forward pass. The promotion gate sends this many rows per pyfunc call (under the scoring
# server's 1,024-row limit), so evaluation and gate cut the test set into the same batches.
BATCH_SIZE = 1000


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively. Where it does, bf16 autocast trains and infers faster at the
    same accuracy; where bf16 is emulated (AVX512 without BF16, AVX2) it is slower than fp32, so fp32 is kept
    there (figures per machine: docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def use_bf16(precision: str, device: torch.device) -> bool:
    """`precision` ("auto", "fp32" or "bf16") resolved for `device`."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class Outputs:
    """What one pass of the network gives for N images, float32 on the CPU."""
    logits: torch.Tensor     # (N, 10)
    embedding: torch.Tensor  # (N, E) the last conv stage's channel means (the MLP: the last layer's input)
    stats: torch.Tensor      # (N, S) each conv stage's channel means and standard deviations (S = 0 for the MLP)


def stage_ends(network: torch.nn.Sequential) -> set[int]:
    """Indices of the modules whose output ends a convolutional stage: the next module is a Conv2d, or the
    Flatten before the classifier (the MLP's Flatten comes first: it has no stage)."""
    return {i for i in range(len(network) - 1) if isinstance(network[i + 1], (torch.nn.Conv2d, torch.nn.Flatten))}


def _mirror_mean(x: torch.Tensor, n: int, tta: bool) -> torch.Tensor:
    return (x[:n] + x[n:]) / 2 if tta else x


def _channel_mean_std(x: torch.Tensor) -> list[torch.Tensor]:
    """Each channel's mean and standard deviation over the image (N, C, H, W) -> two (N, C). Two passes, as
    torch.std, written out: its CPU kernel on channels_last maps costs ~10x this (2.3 vs 0.26 ms for the default
    network's first stage at 128 images, 16 % of a 64-image request), to within float32 rounding."""
    mean = x.mean((2, 3), keepdim=True)
    centred = x - mean
    variance = (centred * centred).sum((2, 3)) / (x.shape[2] * x.shape[3] - 1)
    return [mean.flatten(1), variance.sqrt()]


@torch.inference_mode()
def forward(network: torch.nn.Sequential, images: np.ndarray, tta: bool, bf16: bool) -> Outputs:
    """One pass over images (N, 28, 28) on the 0-255 scale, in batches of BATCH_SIZE. With `tta`, the features
    are averaged with the mirror image's (one pass for both) before the last layer: it is linear, so the logits
    are the mirror average too. Every network ends in one Linear layer."""
    network.eval()
    device = next(network.parameters()).device
    ends = stage_ends(network)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for start in range(0, len(images), BATCH_SIZE):
        x = normalize(images[start:start + BATCH_SIZE]).to(device)
        n = len(x)
        if tta:
            x = torch.cat([x, x.flip(3)])
        stats = []
        with autocast(device, bf16):
            for index, module in enumerate(network[:-1]):
                x = module(x)
                if index in ends:
                    stats += _channel_mean_std(x.float())
            features = _mirror_mean(x.float(), n, tta)
            logits = network[-1](features).float()
        # The last stage's channel means: the last layer's input without its spatial layout (128 numbers instead
        # of 1,152 for the default network): as telling for the detector, at 1/80 of its cost (docs/training.md).
        embedding = _mirror_mean(stats[-2], n, tta) if stats else features
        stats = _mirror_mean(torch.cat(stats, 1), n, tta) if stats else features.new_empty(n, 0)
        for part, value in zip(parts, (logits, embedding, stats), strict=True):
            part.append(value.cpu())
    if not images.size:
        return Outputs(torch.empty(0, NUM_CLASSES), torch.empty(0, 0), torch.empty(0, 0))
    return Outputs(*(torch.cat(part) for part in parts))


def logits(network: torch.nn.Sequential, images: np.ndarray, tta: bool, bf16: bool) -> torch.Tensor:
    """Float32 logits on the CPU (see `forward`)."""
    return forward(network, images, tta, bf16).logits


def calibrated(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """(N, 10) class probabilities: softmax of the logits divided by the calibration temperature."""
    return (logits / temperature).softmax(1).numpy()


def serving_bf16() -> bool:
    """The served model runs on the CPU, in bf16 where that CPU computes it natively."""
    return native_bf16(torch.device("cpu"))
