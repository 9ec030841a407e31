"""A stand-in for the `pynvml` module (nvidia-ml-py) with two GPUs and fixed readings, for tests."""

from __future__ import annotations

import types


class FakeNVMLError(Exception):
    pass


def fake_nvml(ecc_supported=True, xids=(), fail_init=False):
    """A pynvml stand-in with two GPUs and fixed readings."""
    pending = list(xids)
    calls = {"shutdown": 0}

    def not_supported(*_):
        raise FakeNVMLError("Not Supported")

    def init():
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def wait(_set, _timeout_ms):
        if not pending:
            raise FakeNVMLError("Timeout")
        index, xid = pending.pop(0)
        return types.SimpleNamespace(device=f"h{index}", eventData=xid)

    def shutdown():
        calls["shutdown"] += 1

    return types.SimpleNamespace(
        calls=calls, NVMLError=FakeNVMLError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1,
        NVML_MEMORY_ERROR_TYPE_CORRECTED=0, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1, NVML_VOLATILE_ECC=0,
        nvmlEventTypeXidCriticalError=8,
        nvmlInit=init, nvmlShutdown=shutdown,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetIndex=lambda h: int(h[1:]),
        nvmlDeviceGetName=lambda h: b"Fake H100",
        nvmlDeviceGetPowerUsage=lambda h: 612_500 if h == "h0" else 100_000,  # mW
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetTemperature=lambda h, sensor: 71 if h == "h0" else 40,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97, memory=63),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=70 * 2**30, total=80 * 2**30, free=10 * 2**30),
        nvmlDeviceGetClockInfo=lambda h, clock: 1755,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4 | 0x20,  # sw power cap + sw thermal
        nvmlDeviceGetTotalEccErrors=(lambda h, kind, counter: 3 if kind == 0 else 0) if ecc_supported
        else not_supported,
        nvmlEventSetCreate=lambda: "set",
        nvmlDeviceRegisterEvents=lambda h, kind, s: None,
        nvmlEventSetWait_v2=wait,
        nvmlEventSetFree=lambda s: None,
    )
