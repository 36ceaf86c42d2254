"""Timing shared by the bench scripts (run as `python bench/<script>.py`)."""

import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], steps: int, warmup: int = 3, device: str | torch.device = "cuda") -> float:
    """Seconds per call of `fn`, after `warmup` untimed calls, synchronising a CUDA device around the loop."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def timed_ms(fn: Callable[[], object], steps: int, warmup: int = 3, device: str | torch.device = "cuda") -> float:
    """`timed` in milliseconds."""
    return timed(fn, steps, warmup, device) * 1e3
