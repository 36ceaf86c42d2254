"""Whether a model's weights fit in the memory available on a device, checked before any weight is allocated."""

import os

import torch

from soma_lightning.errors import SpecError


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on `device` (cpu or cuda), or None where that is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(model: torch.nn.Module, device: torch.device, path: str) -> None:
    """A SpecError naming `path` when the weights of `model` (built on the meta device) alone exceed the
    memory available on `device`."""
    dtype = torch.get_default_dtype()
    count = sum(p.numel() for p in model.parameters())
    needed = count * dtype.itemsize
    available = available_memory(device)
    if available is not None and needed > available:
        raise SpecError(
            f"{path}: the model has {count:,} parameters, {needed:,} bytes ({needed / 2**30:,.1f} GiB) of {str(dtype).removeprefix('torch.')} "
            f"weights, more than the {available:,} bytes ({available / 2**30:,.1f} GiB) available on {device}"
        )
