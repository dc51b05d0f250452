"""The one inference path: training's evaluation, the promotion gate and the served model all call
`probabilities`, so a run's logged test accuracy is exactly what its served model scores.

Also the one place that decides the number format: bf16 where the hardware computes it natively (CUDA,
CPUs with AVX512-BF16 or AMX), fp32 elsewhere, for training and serving alike.
"""

from __future__ import annotations

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


@torch.inference_mode()
def logits(network: torch.nn.Module, images: np.ndarray, tta: bool, bf16: bool) -> torch.Tensor:
    """Float32 logits on the CPU for images (N, 28, 28) on the 0-255 scale, in batches of BATCH_SIZE; with
    `tta`, averaged with the mirror image's (one forward pass for both)."""
    network.eval()
    device = next(network.parameters()).device
    outputs = []
    for start in range(0, len(images), BATCH_SIZE):
        x = normalize(images[start:start + BATCH_SIZE]).to(device)
        n = len(x)
        if tta:
            x = torch.cat([x, x.flip(3)])
        with autocast(device, bf16):
            out = network(x).float()
        outputs.append(((out[:n] + out[n:]) / 2 if tta else out).cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, NUM_CLASSES)


def calibrated(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """(N, 10) class probabilities: softmax of the logits divided by the calibration temperature."""
    return (logits / temperature).softmax(1).numpy()


def probabilities(network: torch.nn.Module, images: np.ndarray, tta: bool, bf16: bool,
                  temperature: float = 1.0) -> np.ndarray:
    """What the served model answers for images (N, 28, 28) on the 0-255 scale."""
    return calibrated(logits(network, images, tta, bf16), temperature)


def serving_bf16() -> bool:
    """The served model runs on the CPU, in bf16 where that CPU computes it natively."""
    return native_bf16(torch.device("cpu"))
