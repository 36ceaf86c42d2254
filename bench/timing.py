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


PROFILED_STEPS = 3
KERNEL_KINDS = {  # first match wins, on the lower-cased kernel name
    "attention": ("flash", "fmha", "attention"),
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_"),
    "optimizer": ("adam", "multi_tensor"),
    "compiled (triton)": ("triton",),
}


def profile_steps(fn: Callable[[], object]) -> torch.profiler.profile:
    """PROFILED_STEPS calls of `fn` under torch.profiler (CUDA kernels), for `kernel_profile`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(PROFILED_STEPS):
            fn()
        torch.cuda.synchronize()
    return profiler


def kernel_profile(name: str, profiler: torch.profiler.profile) -> dict:
    """CUDA kernel time per step (over PROFILED_STEPS profiled steps) by kind, and the top kernels; printed
    and returned."""
    kernels = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = next((k for k, keys in KERNEL_KINDS.items() if any(key in e.key.lower() for key in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1e3 / PROFILED_STEPS
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    print(f"\n{name}: CUDA ms per step by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    for e in top:
        print(f"  {e.self_device_time_total / 1e3 / PROFILED_STEPS:8.2f} ms  x{e.count // PROFILED_STEPS:4d}  {e.key[:110]}")
    return {"ms_per_step_by_kind": by_kind, "top": [{"kernel": e.key, "ms_per_step": e.self_device_time_total / 1e3 / PROFILED_STEPS,
                                                  "calls_per_step": e.count / PROFILED_STEPS} for e in top]}
