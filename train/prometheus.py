"""The Prometheus backend of `train.metrics`: each rank serves its own endpoint on `addr:base_port + local_rank`.

Every series carries a `run` label (the run's identity: metrics.run_id or the run folder's name) and a `rank`
label (the global rank), added at exposition time to everything in the rank's registry, the process collectors
included, so dashboards and rules can split or aggregate by run and rank whatever the scrape config, and two
runs that use the same port one after the other are never mixed.

How a run ends is scraped: `tubelet_train_running` is 1 from the start and 0 once the process leaves training
(done, stopped or failed), and `close()` waits up to `metrics.final_scrape_s` for one more scrape (when something
scrapes the endpoint), so the final step, checkpoint and stop state reach Prometheus. A rank that vanishes while
its last scraped `tubelet_train_running` was 1 was killed or froze (TubeletRankDown). Names: prefix `tubelet_`, base units, counters end in `_total`, durations are histograms.

    tubelet_loader_*   per batch, from `pipeline.clips.LoaderStats`
    tubelet_train_*    per step (`StepStats`), checkpoints, non-finite events
    tubelet_gpu_*      NVML, sampled every `metrics.nvml_interval` s; absent without a GPU or NVML
    process_*, python_*  prometheus_client's process / platform / GC collectors

The GPU series come from `train.nvml` (a sampling thread, never an NVML call at scrape time).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import time
from typing import Dict, Iterable, Optional

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, start_http_server)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from common.exposition import Labelled
from pipeline.clips import LoaderStats
from train.config import MetricsConfig
from train.nvml import NvmlSampler
from train.step import StepStats

log = logging.getLogger(__name__)

# 1 ms .. 2 min: a data wait of a few ms (healthy) up to a stalled step or a slow first (compiling) step
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)


class PrometheusMetrics:
    """`NullMetrics`' methods, recorded into a per-rank registry served over HTTP.

    `cfg.base_port = 0` serves on a free port the OS picks (tests); `url` says which.
    """

    def __init__(self, cfg: MetricsConfig, rank: int, local_rank: int, run: str = ""):
        self.rank, self.local_rank, self.final_scrape_s = rank, local_rank, cfg.final_scrape_s
        reg = CollectorRegistry()  # this rank's series, without the rank label
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        self._define(reg)
        self._nvml = NvmlSampler.start(local_rank, cfg.nvml_interval) if cfg.nvml else None
        if self._nvml is not None:
            reg.register(self._nvml)
        self._served = Labelled(reg, {"run": run, "rank": str(rank)})
        self.registry = CollectorRegistry(auto_describe=False)  # what the endpoint serves
        self.registry.register(self._served)

        port = 0 if cfg.base_port == 0 else cfg.base_port + local_rank
        try:
            self._server, self._thread = start_http_server(port, addr=cfg.addr, registry=self.registry)
        except OSError as e:
            if self._nvml is not None:
                self._nvml.close()
            hint = ("another job or a leftover process holds the port: pick a free range with metrics.base_port=..."
                    if e.errno == errno.EADDRINUSE else "check metrics.addr (an address of this machine)")
            raise RuntimeError(
                f"metrics: rank {rank} cannot serve on {cfg.addr}:{port} (metrics.base_port={cfg.base_port} + "
                f"local_rank {local_rank}): {e.strerror or e}; {hint}, or turn metrics off with "
                "metrics.enabled=false") from None
        host = socket.gethostname() if cfg.addr in ("", "0.0.0.0", "::") else cfg.addr
        host = f"[{host}]" if ":" in host else host
        self._url = f"http://{host}:{self._server.server_address[1]}/metrics"

    def _define(self, reg: CollectorRegistry) -> None:
        def hist(name, doc):
            return Histogram(name, doc, buckets=DURATION_BUCKETS, registry=reg)

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=reg)

        # loader, per batch
        self.loader_wait = hist("tubelet_loader_wait_seconds", "Time the consumer blocked in next(loader), per batch")
        self.loader_feed = hist("tubelet_loader_feed_seconds",
                                "Python-side time to feed a batch: read encoded videos, sample, masks")
        self.loader_latency = hist("tubelet_loader_latency_seconds",
                                   "Time from feeding a batch to the decode pipeline to handing it to the consumer")
        self.loader_samples = counter("tubelet_loader_samples_total", "Samples delivered, padding repeats included")
        self.loader_padded = counter("tubelet_loader_padded_samples_total",
                                     "Padding repeats that fill a rank's last step of an epoch")
        self.loader_bytes = counter("tubelet_loader_read_bytes_total", "Bytes of encoded video read from shards")
        self.loader_corrupt = counter("tubelet_loader_corrupt_samples_total",
                                      "Samples whose bytes failed their checksum, skipped (never trained on)")
        # the node's shard cache (remote sets), as counted by this rank
        self.cache = {field: counter(f"tubelet_loader_cache_{name}", doc) for field, name, doc in (
            ("hits", "hits_total", "Shard opens served from the node's local cache"),
            ("misses", "misses_total", "Shards this rank downloaded into the node's cache"),
            ("bytes_downloaded", "downloaded_bytes_total", "Bytes of shards downloaded by this rank"),
            ("download_seconds", "download_seconds_total", "Seconds spent downloading shards (summed over "
                                                             "parallel downloads)"),
            ("wait_seconds", "wait_seconds_total", "Seconds the loader blocked on a shard download (0 when "
                                                     "prefetch keeps ahead)"),
            ("evictions", "evictions_total", "Shards this rank evicted from the node's cache to make room"),
            ("retries", "retries_total", "Storage calls retried after a transient error"))}
        self._cache_seen = None
        # trainer, per step
        self.step_seconds = hist("tubelet_train_step_seconds", "Wall time of a training step, data wait included")
        self.data_wait = hist("tubelet_train_data_wait_seconds", "Time a training step waited for its batch")
        self.steps = counter("tubelet_train_steps_total", "Training steps finished, skipped ones included")
        self.skipped = counter("tubelet_train_skipped_steps_total", "Steps whose update was skipped (non-finite)")
        self.clips = counter("tubelet_train_clips_total", "Clips trained on by this rank")
        self.nonfinite_events = counter("tubelet_train_nonfinite_total", "Non-finite loss or gradient, by action",
                                        ["action"])
        for action in ("stop", "skip"):
            self.nonfinite_events.labels(action)  # exported at 0 from the start: increase() sees the first one
        self.nonfinite_stop = Gauge("tubelet_train_nonfinite_stop",
                                    "1 once training stopped on a non-finite loss or gradient", registry=reg)
        self.running = Gauge("tubelet_train_running", "1 while the run trains, 0 once it left training (done, "
                             "stopped or failed): a rank that vanishes at 1 was killed or froze", registry=reg)
        # last values: absent until first reported (no misleading 0 before the first step or checkpoint, and
        # no checkpoint series on ranks that do not write checkpoints)
        self.last = _LastValues({
            "tubelet_loader_queue_depth": "Batches in flight after the last one was taken",
            "tubelet_loader_epoch": "Epoch of the last batch delivered",
            "tubelet_loader_position": "Global sample position in the epoch after the last batch",
            "tubelet_loader_cache_bytes": "Bytes in the node's shard cache (complete shards and reserved downloads) "
                                          "at this rank's last download",
            "tubelet_train_step": "Last finished step (continues across resumes)",
            "tubelet_train_progress_timestamp_seconds": "Unix time of the last finished step (or of the start)",
            "tubelet_train_dist_timeout_seconds": "How long a collective waits for a peer before failing "
                                                  "(dist_timeout_s)",
            "tubelet_train_loss": "Loss of the last finite step",
            "tubelet_train_learning_rate": "Learning rate of the last step",
            "tubelet_train_weight_decay": "Weight decay of the last step",
            "tubelet_train_ema_momentum": "Target-encoder EMA momentum of the last step",
            "tubelet_train_grad_norm": "Gradient norm of the last finite step",
            "tubelet_train_checkpoint_step": "Step of the last checkpoint written or resumed from (0: none; rank 0)",
            "tubelet_train_checkpoint_seconds": "Time to write the last checkpoint (in the background, while training went on)",
            "tubelet_train_checkpoint_timestamp_seconds": "Unix time the last checkpoint was written",
        })
        reg.register(self.last)
        # collapse signals of the last logged step (train.signals), by source: target encoder or predictor;
        # absent until the first logged step
        self.feature = {name: Gauge(f"tubelet_train_feature_{name}", doc, ["source"], registry=reg) for name, doc in (
            ("std", "Mean per-dimension std of layer-normed features across clips at a position (0: collapsed)"),
            ("erank", "Effective rank of the features as a fraction of its maximum (near 0: collapsed)"),
            ("clip_share", "Share of the feature variance that is each clip's mean token (near 1: clip-only)"),
            ("position_share", "Share of the feature variance that is each position's mean token (near 1: "
                               "position-only)"))}

    # -- NullMetrics' methods ----------------------------------------------------------------------

    def loader(self, stats: LoaderStats) -> None:
        self.loader_wait.observe(stats.wait_seconds)
        self.loader_feed.observe(stats.feed_seconds)
        self.loader_latency.observe(stats.latency_seconds)
        self.loader_samples.inc(stats.samples)
        self.loader_padded.inc(stats.padded)
        self.loader_bytes.inc(stats.bytes_read)
        self.loader_corrupt.inc(stats.corrupt)
        self.last.set(tubelet_loader_queue_depth=stats.queue_depth, tubelet_loader_epoch=stats.epoch,
                      tubelet_loader_position=stats.position)
        if stats.cache is not None:
            seen = self._cache_seen
            for field, c in self.cache.items():
                c.inc(getattr(stats.cache, field) - (getattr(seen, field) if seen is not None else 0))
            self._cache_seen = stats.cache
            self.last.set(tubelet_loader_cache_bytes=stats.cache.bytes_on_disk)

    def started(self, step: int, checkpoint_step: int, dist_timeout_s: float) -> None:
        self.running.set(1)
        self.last.set(tubelet_train_step=step, tubelet_train_progress_timestamp_seconds=time.time(),
                      tubelet_train_dist_timeout_seconds=dist_timeout_s)
        if self.rank == 0:
            self.last.set(tubelet_train_checkpoint_step=checkpoint_step)

    def step(self, stats: StepStats) -> None:
        self.last.set(tubelet_train_progress_timestamp_seconds=time.time())
        self.step_seconds.observe(stats.step_seconds)
        self.data_wait.observe(stats.data_wait_seconds)
        self.steps.inc()
        self.clips.inc(stats.clips)
        if stats.skipped:
            self.skipped.inc()
        self.last.set(tubelet_train_step=stats.step, tubelet_train_learning_rate=stats.lr,
                      tubelet_train_weight_decay=stats.weight_decay, tubelet_train_ema_momentum=stats.ema_momentum)
        # a NaN gauge would blank the loss panel; the skip/stop counters tell about non-finite steps
        if math.isfinite(stats.loss):
            self.last.set(tubelet_train_loss=stats.loss)
        if math.isfinite(stats.grad_norm):
            self.last.set(tubelet_train_grad_norm=stats.grad_norm)

    def checkpoint(self, step: int, seconds: float) -> None:
        self.last.set(tubelet_train_checkpoint_step=step, tubelet_train_checkpoint_seconds=seconds,
                      tubelet_train_checkpoint_timestamp_seconds=time.time())

    def signals(self, values: Dict[str, float]) -> None:
        for key, value in values.items():
            source, _, name = key.partition("_")
            self.feature[name].labels("predictor" if source == "pred" else source).set(value)

    def nonfinite(self, step: int, action: str) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"metrics.nonfinite: action must be 'stop' or 'skip', got {action!r}")
        self.nonfinite_events.labels(action).inc()
        if action == "stop":
            self.nonfinite_stop.set(1)

    @property
    def url(self) -> Optional[str]:
        return self._url

    def close(self) -> None:
        """Leave training (running 0), let Prometheus scrape that final state, stop serving."""
        if self._server is None:
            return
        self.running.set(0)
        if self._served.scrapes > 0 and self.final_scrape_s > 0:  # something scrapes this endpoint
            self._wait_for_scrape(self._served.scrapes)
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        if self._nvml is not None:
            self._nvml.close()

    def _wait_for_scrape(self, after: int) -> None:
        deadline = time.monotonic() + self.final_scrape_s
        log.info("metrics: rank %d waits up to %.0f s for a last scrape of how the run ended", self.rank,
                 self.final_scrape_s)
        while self._served.scrapes <= after and time.monotonic() < deadline:
            time.sleep(0.05)


class _LastValues:
    """Gauges that appear once first set (a collector of the latest values)."""

    def __init__(self, docs: Dict[str, str]):
        self._docs = docs
        self._values: Dict[str, float] = {}

    def set(self, **values: float) -> None:
        for name, v in values.items():
            if name not in self._docs:
                raise KeyError(f"undeclared metric {name}")
            self._values[name] = float(v)

    def collect(self) -> Iterable[Metric]:
        for name, v in list(self._values.items()):
            yield GaugeMetricFamily(name, self._docs[name], value=v)
