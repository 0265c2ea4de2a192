"""Device and precision: CUDA with fp16/bf16 (SDPA attention) when a GPU is visible, else CPU fp32.

On a CPU-only machine Ray still schedules `num_gpus` replicas against fake GPUs and sets
CUDA_VISIBLE_DEVICES; `torch.cuda.is_available()` is then false and we fall back to the CPU.
"""

from __future__ import annotations

import torch


def select_device(cuda_dtype: str = "float16") -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), getattr(torch, cuda_dtype)
    return torch.device("cpu"), torch.float32
