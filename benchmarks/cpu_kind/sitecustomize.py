"""Imported by Python at start-up when this folder is on PYTHONPATH (`benchmarks/cpu_kind/run` puts it there):
torch reports no native bf16, as a CPU without AVX512-BF16 or AMX does, so precision "auto" picks fp32 there.
The instruction set itself is capped by the environment the script sets (ATen's and oneDNN's own variables)."""

import torch

torch.cpu._is_avx512_bf16_supported = lambda: False
torch.cpu._is_amx_tile_supported = lambda: False
