"""This rank's GPU through NVML, for the Prometheus backend: utilisation, NVDEC, memory, power, energy, and each
NVDEC engine's utilisation through NVML's GPU Performance Monitoring (GPM) where the GPU has it.

NVML is sampled by a background thread rather than at scrape time: an NVML call can block for a long time on a busy
or wedged driver, and a scrape must stay fast (a hung scrape loses every series of the rank, not just the GPU ones);
the sampling cadence is the config's (metrics.nvml_interval), independent of the scrape interval.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Dict, Iterable, Optional

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


class NvmlSampler:
    """Samples this rank's GPU every `interval` s in a daemon thread; a collector of the latest values.

    The GPU is `cuda:local_rank` as the trainer sees it, mapped to NVML through CUDA_VISIBLE_DEVICES (NVML
    ignores it). A query the GPU does not support is dropped after its first failure.
    """

    GAUGES = {  # name -> (help, read(pynvml, handle) in base units)
        "tubelet_gpu_utilization_ratio": (
            "Fraction of time one or more kernels ran on the GPU (NVML utilization.gpu, 'SM utilisation')",
            lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
        "tubelet_gpu_decoder_utilization_ratio": (
            "NVDEC (video decoder) utilisation",
            lambda nv, h: nv.nvmlDeviceGetDecoderUtilization(h)[0] / 100.0),
        "tubelet_gpu_memory_used_bytes": ("GPU memory used (all processes)",
                                          lambda nv, h: float(nv.nvmlDeviceGetMemoryInfo(h).used)),
        "tubelet_gpu_memory_total_bytes": ("GPU memory installed",
                                           lambda nv, h: float(nv.nvmlDeviceGetMemoryInfo(h).total)),
        "tubelet_gpu_power_watts": ("GPU power draw", lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
    }
    COUNTERS = {
        "tubelet_gpu_energy_joules": ("GPU energy consumed since the driver loaded",
                                      lambda nv, h: nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0),
    }

    @classmethod
    def start(cls, local_rank: int, interval: float) -> Optional["NvmlSampler"]:
        """The sampler, or None (logged) without NVML, a driver or this rank's GPU."""
        try:
            import pynvml
        except ImportError:
            log.info("metrics: pynvml not installed; no GPU series")
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            log.info("metrics: NVML unavailable (%s); no GPU series", e)
            return None
        try:
            found = nvml_device(pynvml, local_rank)
        except pynvml.NVMLError as e:
            found, why = None, str(e)
        else:
            why = "no such GPU visible"
        if found is None:
            log.info("metrics: no NVML device for local rank %d (%s); no GPU series", local_rank, why)
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, *found, interval)

    def __init__(self, nv, handle, index: int, interval: float):
        self._nv, self._handle, self._gpu, self._interval = nv, handle, str(index), interval
        self._reads = {**self.GAUGES, **self.COUNTERS}
        self._latest: Dict[str, float] = {}
        self._engines: Dict[int, float] = {}
        self._gpm = DecoderEngines.start(nv, handle)
        self._lock = threading.Lock()  # sampling vs nvmlShutdown
        self.sample()  # series exist from the first scrape
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tubelet-nvml", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        latest = {}
        with self._lock:
            if self._handle is None:
                return
            for name, (_, read) in list(self._reads.items()):
                try:
                    latest[name] = read(self._nv, self._handle)
                except self._nv.NVMLError_NotSupported:
                    log.info("metrics: NVML %s not supported on GPU %s; dropped", name, self._gpu)
                    del self._reads[name]
                except self._nv.NVMLError as e:  # transient (GPU busy, lost): keep the query, skip the value
                    log.debug("metrics: NVML %s failed: %s", name, e)
            if self._gpm is not None:
                try:
                    self._engines = self._gpm.read()
                except self._nv.NVMLError as e:
                    log.info("metrics: NVML per-engine decoder utilisation failed (%s); dropped", e)
                    self._gpm = None
        self._latest = latest

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def collect(self) -> Iterable[Metric]:
        latest = self._latest
        for name, (doc, _) in self.GAUGES.items():
            if name in latest:
                g = GaugeMetricFamily(name, doc, labels=["gpu"])
                g.add_metric([self._gpu], latest[name])
                yield g
        for name, (doc, _) in self.COUNTERS.items():
            if name in latest:
                c = CounterMetricFamily(name, doc, labels=["gpu"])
                c.add_metric([self._gpu], latest[name])
                yield c
        engines = self._engines
        if engines:
            g = GaugeMetricFamily("tubelet_gpu_decoder_engine_utilization_ratio",
                                  "Utilisation of each NVDEC engine (NVML GPM; one saturated engine of several shows "
                                  "here, not in the GPU-wide decoder ratio)", labels=["gpu", "engine"])
            for engine, value in sorted(engines.items()):
                g.add_metric([self._gpu, str(engine)], value)
            yield g

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._handle = None
            try:
                if self._gpm is not None:
                    self._gpm.close()
                self._nv.nvmlShutdown()
            except self._nv.NVMLError:
                pass


class DecoderEngines:
    """The utilisation of each NVDEC engine from NVML's GPU Performance Monitoring (Hopper and newer GPUs): the
    busy fraction of every engine between two samples one sampling interval apart. None where unsupported."""

    ENGINES = 8

    @classmethod
    def start(cls, nv, handle) -> Optional["DecoderEngines"]:
        try:
            if not nv.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                return None
            return cls(nv, handle)
        except (AttributeError, nv.NVMLError) as e:  # an older driver or GPU, or no GPM in this NVML
            log.info("metrics: no per-engine decoder utilisation (%s)", e)
            return None

    def __init__(self, nv, handle):
        self._nv, self._handle = nv, handle
        self._ids = [getattr(nv, f"NVML_GPM_METRIC_NVDEC_{i}_UTIL") for i in range(self.ENGINES)]
        self._previous = self._sample()

    def _sample(self):
        sample = self._nv.nvmlGpmSampleAlloc()
        self._nv.nvmlGpmSampleGet(self._handle, sample)
        return sample

    def read(self) -> Dict[int, float]:
        """Engine -> busy fraction since the previous read; engines the GPU does not have are left out."""
        nv, current = self._nv, self._sample()
        query = nv.c_nvmlGpmMetricsGet_t()
        query.version, query.numMetrics = nv.NVML_GPM_METRICS_GET_VERSION, len(self._ids)
        query.sample1, query.sample2 = self._previous, current
        for i, metric in enumerate(self._ids):
            query.metrics[i].metricId = metric
        nv.nvmlGpmMetricsGet(query)
        nv.nvmlGpmSampleFree(self._previous)
        self._previous = current
        return {i: query.metrics[i].value / 100.0 for i in range(len(self._ids))
                if query.metrics[i].nvmlReturn == nv.NVML_SUCCESS}

    def close(self) -> None:
        self._nv.nvmlGpmSampleFree(self._previous)


def nvml_device(nv, local_rank: int):
    """(handle, NVML index) of the GPU `cuda:local_rank` is, or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        entry = str(local_rank)
    else:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if local_rank >= len(entries):
            return None
        entry = entries[local_rank]
    if entry.isdigit():
        index = int(entry)
        if index >= nv.nvmlDeviceGetCount():
            return None
        return nv.nvmlDeviceGetHandleByIndex(index), index
    if entry.startswith("GPU-"):  # a full GPU UUID (MIG instances have no utilisation counters: skipped)
        handle = nv.nvmlDeviceGetHandleByUUID(entry)
        return handle, nv.nvmlDeviceGetIndex(handle)
    return None
