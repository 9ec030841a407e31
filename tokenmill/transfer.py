"""Host <-> device copies that never wait for the device.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory and synchronizes the
stream: with async scheduling that would wait for the step just queued. These go through pinned
memory with non-blocking copies instead, in stream order."""

from __future__ import annotations

import numpy as np
import torch


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` (a flat or nested list) on `device`, copied without a sync."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def array_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array on `device` without a sync (a fresh array per call: on the CPU it is shared)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def device_to_host_async(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of `tensor`, started now; valid once the stream has passed this point (wait for an
    event recorded after it, or for a later result)."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
