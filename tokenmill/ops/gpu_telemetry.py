"""GPU telemetry through NVML (the `pynvml` module of nvidia-ml-py), sampled by a daemon thread.

Every `interval` seconds (default 1) the thread reads, per GPU: power draw and enforced limit,
temperature, SM and memory-controller utilization, memory used and total, SM clock, the clock
throttle (event) reasons, volatile ECC error counts, and drains NVML's Xid critical-error events;
and exports them as Prometheus gauges with a `gpu` label (the NVML index). Readings a GPU does not
support (NVML says so on the first try) are left out from then on.

Which GPUs: those named by CUDA_VISIBLE_DEVICES (NVML indices or `GPU-` UUIDs), else all.

Without NVML (package missing, no driver library, no GPU) `start()` returns False: no thread, no
gauges, nothing logged above DEBUG.

Cost: each sample is timed twice and exported (sum and count): its CPU time on the sampler thread
(`tokenmill:gpu_telemetry_sample_cpu_seconds`, what it takes from the API process) and its wall
time (`tokenmill:gpu_telemetry_sample_seconds`). The NVML calls themselves take microseconds
(about 35 us for all of one H100's readings); under load the wall time is mostly the thread waiting
for the GIL after each ctypes call while the event loop runs (Python's 5 ms switch interval), which
costs the event loop nothing. Readings that barely change (power limit, memory total, ECC counts)
are re-read every FULL_EVERY samples only, to keep the calls per sample, and so GIL hand-offs, few.
"""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
FULL_EVERY = 30  # samples between reads of the slow-changing readings
SLOW_KEYS = ("power_limit_w", "mem_total_bytes", "ecc_corrected", "ecc_uncorrected")
INTERVAL_ENV = "TOKENMILL_GPU_TELEMETRY_INTERVAL"

# NVML's clocks event ("throttle") reason bits, by the name exported in the `reason` label.
THROTTLE_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}

# Every metric this module can export (sample names as they appear on /metrics).
GPU_METRIC_NAMES = (
    "tokenmill:gpu_power_watts", "tokenmill:gpu_power_limit_watts", "tokenmill:gpu_temperature_celsius",
    "tokenmill:gpu_sm_utilization_perc", "tokenmill:gpu_memory_utilization_perc",
    "tokenmill:gpu_memory_used_bytes", "tokenmill:gpu_memory_total_bytes", "tokenmill:gpu_sm_clock_hertz",
    "tokenmill:gpu_clock_throttle_reasons", "tokenmill:gpu_clock_throttle_active", "tokenmill:gpu_ecc_errors",
    "tokenmill:gpu_xid_errors_total", "tokenmill:gpu_last_xid",
    "tokenmill:gpu_telemetry_sample_seconds_sum", "tokenmill:gpu_telemetry_sample_seconds_count",
    "tokenmill:gpu_telemetry_sample_cpu_seconds_sum", "tokenmill:gpu_telemetry_sample_cpu_seconds_count",
)


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        logger.warning("ignoring %s=%r (not a number)", INTERVAL_ENV, value)
        return default


def _import_nvml():
    try:
        import pynvml
    except Exception as e:  # ImportError, or a broken install
        logger.debug("GPU telemetry off: cannot import pynvml (%s)", e)
        return None
    return pynvml


def _visible_indices(nvml, count: int) -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    indices = []
    for item in (x.strip() for x in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            if int(item) < count:
                indices.append(int(item))
            continue
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(item)
            indices.append(int(nvml.nvmlDeviceGetIndex(handle)))
        except Exception:
            return list(range(count))  # a form we do not understand (MIG ids, ...): watch everything
    return indices


class GpuTelemetry:
    """Samples NVML on a daemon thread into gauges of `registry`. `nvml` is the pynvml module
    (tests pass a fake); None imports it."""

    def __init__(self, registry, interval: float = DEFAULT_INTERVAL_S, nvml=None):
        self.registry = registry
        self.interval = interval
        self._nvml = nvml
        self.handles: dict[int, object] = {}
        self.names: dict[int, str] = {}
        self.latest: dict[int, dict] = {}  # gpu index -> reading name -> value (of the last sample)
        self.samples = 0
        self.last_sample_seconds = 0.0
        self.sample_seconds_total = 0.0
        self.last_sample_cpu_seconds = 0.0
        self.sample_cpu_seconds_total = 0.0
        self._unsupported: set[tuple[int, str]] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._event_set = None
        self.started = False

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self, thread: bool = True) -> bool:
        """Initialize NVML, create the gauges, take one sample and start the thread. False (and
        nothing created) when NVML or a GPU is not there."""
        nvml = self._nvml if self._nvml is not None else _import_nvml()
        if nvml is None or self.interval <= 0:
            return False
        try:
            nvml.nvmlInit()
        except Exception as e:
            logger.debug("GPU telemetry off: NVML did not initialize (%s)", e)
            return False
        try:
            count = int(nvml.nvmlDeviceGetCount())
            for index in _visible_indices(nvml, count):
                self.handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    name = nvml.nvmlDeviceGetName(self.handles[index])
                    self.names[index] = name.decode() if isinstance(name, bytes) else str(name)
                except Exception:
                    self.names[index] = "unknown"
        except Exception as e:
            logger.debug("GPU telemetry off: NVML device enumeration failed (%s)", e)
            self.handles.clear()
        if not self.handles:
            _quiet(nvml.nvmlShutdown)
            return False
        self._nvml = nvml
        self._make_gauges()
        self._register_xid_events()
        self.started = True
        self.sample()
        logger.info("GPU telemetry: NVML sampling %s every %.1f s (first sample %.3f ms)",
                    ", ".join(f"{i}: {self.names[i]}" for i in self.handles), self.interval,
                    self.last_sample_seconds * 1e3)
        if thread:
            self._thread = threading.Thread(target=self._run, name="tokenmill-gpu-telemetry", daemon=True)
            self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(2.0, 2 * self.interval))
        if self.started:
            if self._event_set is not None:
                _quiet(self._nvml.nvmlEventSetFree, self._event_set)
            _quiet(self._nvml.nvmlShutdown)
            self.started = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # never let telemetry take anything down
                logger.debug("GPU telemetry sample failed", exc_info=True)

    # ---- gauges ---------------------------------------------------------------------------------

    def _make_gauges(self) -> None:
        from prometheus_client import Counter, Gauge, Summary

        r, gpu = self.registry, ["gpu"]
        self.g_power = Gauge("tokenmill:gpu_power_watts", "GPU power draw (W).", gpu, registry=r)
        self.g_power_limit = Gauge("tokenmill:gpu_power_limit_watts", "GPU enforced power limit (W).", gpu,
                                   registry=r)
        self.g_temp = Gauge("tokenmill:gpu_temperature_celsius", "GPU core temperature (C).", gpu, registry=r)
        self.g_sm_util = Gauge("tokenmill:gpu_sm_utilization_perc", "Fraction of the last sample period in which "
                               "a kernel ran on the GPU (NVML utilization.gpu, 0-1).", gpu, registry=r)
        self.g_mem_util = Gauge("tokenmill:gpu_memory_utilization_perc", "Fraction of the last sample period in "
                                "which device memory was read or written (NVML utilization.memory, 0-1).", gpu,
                                registry=r)
        self.g_mem_used = Gauge("tokenmill:gpu_memory_used_bytes", "GPU memory in use (bytes).", gpu, registry=r)
        self.g_mem_total = Gauge("tokenmill:gpu_memory_total_bytes", "GPU memory (bytes).", gpu, registry=r)
        self.g_sm_clock = Gauge("tokenmill:gpu_sm_clock_hertz", "GPU SM clock (Hz).", gpu, registry=r)
        self.g_throttle_mask = Gauge("tokenmill:gpu_clock_throttle_reasons", "NVML clocks event (throttle) "
                                     "reasons bitmask.", gpu, registry=r)
        self.g_throttle = Gauge("tokenmill:gpu_clock_throttle_active", "1 while the clocks are held down for "
                                "this reason.", gpu + ["reason"], registry=r)
        self.g_ecc = Gauge("tokenmill:gpu_ecc_errors", "Volatile ECC error count since the driver loaded.",
                           gpu + ["type"], registry=r)
        self.c_xid = Counter("tokenmill:gpu_xid_errors", "Xid critical-error events seen by the sampler.", gpu,
                             registry=r)
        self.g_last_xid = Gauge("tokenmill:gpu_last_xid", "The last Xid critical error seen (0: none).", gpu,
                                registry=r)
        self.s_cost = Summary("tokenmill:gpu_telemetry_sample_seconds", "Wall time of one NVML sample (all "
                              "GPUs; includes waits for the GIL).", registry=r)
        self.s_cpu = Summary("tokenmill:gpu_telemetry_sample_cpu_seconds", "CPU time of one NVML sample on the "
                             "sampler thread (all GPUs).", registry=r)

    # ---- one sample -----------------------------------------------------------------------------

    def sample(self) -> dict[int, dict]:
        """Read every watched GPU once, update the gauges and `latest`; returns `latest`."""
        nvml = self._nvml
        full = self.samples % FULL_EVERY == 0
        start, start_cpu = time.perf_counter(), time.thread_time()
        readings = {index: self._read(nvml, index, handle, full) for index, handle in self.handles.items()}
        xids = self._drain_xid_events()
        cost, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        for index, values in readings.items():
            if not full:  # carry the slow readings over from the last full sample
                previous = self.latest.get(index, {})
                for key in SLOW_KEYS:
                    if key in previous and key not in values:
                        values[key] = previous[key]
            self._export(index, values)
        for index, xid in xids:
            self.c_xid.labels(str(index)).inc()
            self.g_last_xid.labels(str(index)).set(xid)
            readings.get(index, {})["last_xid"] = xid
        self.s_cost.observe(cost)
        self.s_cpu.observe(cpu)
        self.samples += 1
        self.last_sample_seconds, self.last_sample_cpu_seconds = cost, cpu
        self.sample_seconds_total += cost
        self.sample_cpu_seconds_total += cpu
        self.latest = readings
        return readings

    def _try(self, index: int, key: str, fn, *args):
        if (index, key) in self._unsupported:
            return None
        try:
            return fn(*args)
        except Exception as e:
            if self.samples == 0:  # not there on the first try: not there at all
                self._unsupported.add((index, key))
                logger.debug("GPU %d: NVML %s not available (%s)", index, key, e)
            return None

    def _read(self, nvml, index: int, h, full: bool = True) -> dict:
        out: dict = {}
        power = self._try(index, "power", nvml.nvmlDeviceGetPowerUsage, h)
        if power is not None:
            out["power_w"] = power / 1000.0
        limit = self._try(index, "power_limit", nvml.nvmlDeviceGetEnforcedPowerLimit, h) if full else None
        if limit is not None:
            out["power_limit_w"] = limit / 1000.0
        temp = self._try(index, "temperature", nvml.nvmlDeviceGetTemperature, h,
                         getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        if temp is not None:
            out["temperature_c"] = float(temp)
        util = self._try(index, "utilization", nvml.nvmlDeviceGetUtilizationRates, h)
        if util is not None:
            out["sm_util"] = util.gpu / 100.0
            out["mem_util"] = util.memory / 100.0
        mem = self._try(index, "memory", nvml.nvmlDeviceGetMemoryInfo, h)
        if mem is not None:
            out["mem_used_bytes"] = float(mem.used)
            if full:
                out["mem_total_bytes"] = float(mem.total)
        clock = self._try(index, "sm_clock", nvml.nvmlDeviceGetClockInfo, h, getattr(nvml, "NVML_CLOCK_SM", 1))
        if clock is not None:
            out["sm_clock_hz"] = clock * 1e6
        reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if reasons_fn is not None:
            mask = self._try(index, "throttle", reasons_fn, h)
            if mask is not None:
                out["throttle_mask"] = int(mask)
        if not full:
            return out
        volatile = getattr(nvml, "NVML_VOLATILE_ECC", 0)
        for kind, const in (("corrected", "NVML_MEMORY_ERROR_TYPE_CORRECTED"),
                            ("uncorrected", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED")):
            count = self._try(index, f"ecc_{kind}", nvml.nvmlDeviceGetTotalEccErrors, h,
                              getattr(nvml, const, 0 if kind == "corrected" else 1), volatile)
            if count is not None:
                out[f"ecc_{kind}"] = float(count)
        return out

    def _export(self, index: int, v: dict) -> None:
        gpu = str(index)
        for key, gauge in (("power_w", self.g_power), ("power_limit_w", self.g_power_limit),
                           ("temperature_c", self.g_temp), ("sm_util", self.g_sm_util),
                           ("mem_util", self.g_mem_util), ("mem_used_bytes", self.g_mem_used),
                           ("mem_total_bytes", self.g_mem_total), ("sm_clock_hz", self.g_sm_clock)):
            if key in v:
                gauge.labels(gpu).set(v[key])
        if "throttle_mask" in v:
            mask = v["throttle_mask"]
            self.g_throttle_mask.labels(gpu).set(mask)
            for reason, bit in THROTTLE_REASONS.items():
                self.g_throttle.labels(gpu, reason).set(1 if mask & bit else 0)
            v["throttle_reasons"] = [reason for reason, bit in THROTTLE_REASONS.items() if mask & bit]
        for kind in ("corrected", "uncorrected"):
            if f"ecc_{kind}" in v:
                self.g_ecc.labels(gpu, kind).set(v[f"ecc_{kind}"])

    # ---- Xid events ---------------------------------------------------------------------------

    def _register_xid_events(self) -> None:
        nvml = self._nvml
        create = getattr(nvml, "nvmlEventSetCreate", None)
        event_type = getattr(nvml, "nvmlEventTypeXidCriticalError", None)
        if create is None or event_type is None:
            return
        try:
            event_set = create()
        except Exception as e:
            logger.debug("Xid events not available (%s)", e)
            return
        registered = 0
        for index, h in self.handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(h, event_type, event_set)
                registered += 1
                self.c_xid.labels(str(index))  # exported (as 0) from the start where supported
            except Exception as e:
                logger.debug("GPU %d: Xid events not available (%s)", index, e)
        if registered:
            self._event_set = event_set
        else:
            _quiet(nvml.nvmlEventSetFree, event_set)

    def _drain_xid_events(self) -> list[tuple[int, int]]:
        if self._event_set is None:
            return []
        nvml = self._nvml
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or getattr(nvml, "nvmlEventSetWait")
        events = []
        for _ in range(64):  # bounded: a storm of events must not hold the thread
            try:
                data = wait(self._event_set, 0)
            except Exception:  # NVML_ERROR_TIMEOUT: nothing pending
                break
            index = -1
            try:
                index = int(nvml.nvmlDeviceGetIndex(data.device))
            except Exception:
                pass
            events.append((index, int(getattr(data, "eventData", 0))))
        return events

    # ---- summaries ------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Sum of power and limits, hottest temperature, mean utilizations over the watched GPUs."""
        return summarize_readings(self.latest)


def summarize_readings(latest: dict[int, dict]) -> dict:
    def values(key):
        return [v[key] for v in latest.values() if key in v]

    out = {}
    for key, how in (("power_w", sum), ("power_limit_w", sum), ("temperature_c", max), ("sm_util", "mean"),
                     ("mem_util", "mean"), ("mem_used_bytes", sum), ("mem_total_bytes", sum)):
        vals = values(key)
        if vals:
            out[key] = sum(vals) / len(vals) if how == "mean" else how(vals)
    return out


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass


def start_gpu_telemetry(registry, interval: float | None = None) -> GpuTelemetry | None:
    """A started sampler, or None where NVML/GPUs are absent or the interval is 0."""
    interval = interval_from_env() if interval is None else interval
    if interval <= 0:
        return None
    telemetry = GpuTelemetry(registry, interval)
    return telemetry if telemetry.start() else None
