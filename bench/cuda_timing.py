"""Timing on a CUDA device, shared by the bench scripts (run as `python bench/<script>.py`)."""

import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], steps: int, warmup: int = 3) -> float:
    """Seconds per call of `fn`, after `warmup` untimed calls, synchronising the device around the loop."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps
