"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with `launch_pdl=True` may start
while the previous kernel in the stream (or CUDA graph) is still finishing, and waits for it at
`wait_for_inputs`. At batch 1 a decode step is ~200 kernels of a few to tens of microseconds, and
each one's launch and first memory latency (~2-4 us on an H200, benchmarks/gemv_bench.py) would
otherwise sit between two kernels with the memory system idle.

The rule that keeps it correct: a PDL kernel touches nothing before `wait_for_inputs` except data
no kernel writes (weights). The wait returns once the previous kernel has completed and its
writes are visible; that kernel waited for its own predecessor in turn, so everything earlier in
the stream is complete too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tokenmill.kernels import kernels_interpreted


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def launch_next(PDL: tl.constexpr):
    """Let the next kernel start launching: called once a program's main loop is done, so the next
    kernel's programs take SM slots (and load their first weights) during this one's epilogue and
    tail. Earlier, at a program's start, measured slower on an H200 (gemv_bench.py, 2026-12-01):
    the next kernels' waiting programs then took slots all through this one and came out unevenly
    spread over the SMs."""
    if PDL:
        gdc_launch_dependents()


PDL_ENV = "TOKENMILL_PDL"  # "0": no PDL launches (an A/B switch, and a way out should a driver misbehave)
_DEVICES: dict[torch.device, bool] = {}


def supports_pdl(device: torch.device) -> bool:
    """Whether launches on `device` use PDL: compiled kernels (not the interpreter) on an NVIDIA
    sm_90+ GPU, unless TOKENMILL_PDL=0 (read once per device, not per launch)."""
    if device.type != "cuda" or kernels_interpreted():
        return False
    if device not in _DEVICES:
        _DEVICES[device] = (torch.version.hip is None  # ROCm: no griddepcontrol
                            and os.environ.get(PDL_ENV, "1").strip() != "0"
                            and torch.cuda.get_device_capability(device)[0] >= 9)
    return _DEVICES[device]


def pdl_launch_args(device: torch.device, enabled: bool = True) -> dict:
    """A PDL-capable kernel's `PDL` constexpr and, when on, the `launch_pdl` launch option."""
    return {"PDL": True, "launch_pdl": True} if enabled and supports_pdl(device) else {"PDL": False}
