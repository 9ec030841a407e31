"""Device time of each engine step, and the device's idle gap between steps, without a sync.

On CUDA two events bracket a step's forward + sampling on the stream; the runner already waits for
the sampled tokens (`.tolist()`), after which the step's end event has completed, so reading
`elapsed_time` costs no extra sync. A step that samples nothing (a prefill chunk mid-prompt) does
not wait: its events are read by a later `collect()`, once `query()` says they are done. The idle
gap is `elapsed_time(previous step's end, this step's start)`: the time the GPU had nothing of
ours to run between two back-to-back steps (host scheduling, input preparation, IPC).

On the CPU the "device time" is the forward + sampling wall time (perf_counter) and the gap is the
wall time between one step's sampling end and the next step's forward start.

`mark_idle()` (the engine is about to wait for work) breaks the chain: the next step reports no gap.
"""

from __future__ import annotations

import time
from collections import deque

MAX_PENDING = 64  # steps whose events are not read yet; older ones are dropped


class StepTimer:
    def __init__(self, device, event_factory=None):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.kind = "cuda_events" if self.cuda else "wall"
        if self.cuda and event_factory is None:
            import torch

            def event_factory():
                return torch.cuda.Event(enable_timing=True)

        self._event = event_factory
        self._pending: deque = deque()  # (previous end or None, start, end), oldest first
        self._start = None
        self._last_end = None  # previous step's end event (CUDA) or perf_counter (CPU); None after idle
        self._device: list[float] = []
        self._idle: list[float] = []

    def start(self) -> None:
        """Just before the step's forward is launched."""
        if self.cuda:
            self._start = self._event()
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        """Just after the step's last device work (sampling) is launched, before its tokens are read."""
        if self._start is None:
            return
        if self.cuda:
            end = self._event()
            end.record()
            self._pending.append((self._last_end, self._start, end))
            if len(self._pending) > MAX_PENDING:
                self._pending.popleft()
            self._last_end = end
        else:
            now = time.perf_counter()
            self._device.append(now - self._start)
            if self._last_end is not None:
                self._idle.append(max(0.0, self._start - self._last_end))
            self._last_end = now
        self._start = None

    def mark_idle(self) -> None:
        """The engine has no work and will wait: the next step's gap is not an engine stall."""
        self._last_end = None

    def collect(self) -> tuple[list[float], list[float]]:
        """(device seconds, idle-gap seconds) of the steps completed since the last call."""
        if self.cuda:
            while self._pending and self._pending[0][2].query():
                previous_end, start, end = self._pending.popleft()
                self._device.append(start.elapsed_time(end) / 1e3)
                if previous_end is not None:
                    self._idle.append(max(0.0, previous_end.elapsed_time(start) / 1e3))
        device, idle = self._device, self._idle
        self._device, self._idle = [], []
        return device, idle
