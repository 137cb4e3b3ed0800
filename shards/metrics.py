"""Prometheus progress of `make shards`, served on 127.0.0.1:<metrics_port> while it runs (0: off; `make monitor`
scrapes 19390).

Every series carries `run` (the shard set's folder name). `tubelet_shards_videos_expected` is this invocation's
number of input videos, so progress is `tubelet_shards_videos_total / tubelet_shards_videos_expected` and the
dashboard shows a percentage and the time left (recording rules run:tubelet_shards_progress:ratio and
run:tubelet_shards_eta:seconds). Labelled counters start at 0 for every result and rejection reason, so the
first reject is seen by increase(); `tubelet_shards_running` goes to 0 at the end, and the exporter waits for
one more scrape before it stops, so the final counts reach Prometheus.
"""

from __future__ import annotations

import errno
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from common.exposition import Labelled
from shards.output import ShardsError
from shards.validate import REASONS

FINAL_SCRAPE_S = 15.0  # Prometheus scrapes every 10 s in configs/monitoring/prometheus.yml


class ShardsMetrics:
    def __init__(self, port: int, run: str = "", videos: int = 0, groups: int = 0, addr: str = "127.0.0.1",
                 final_scrape_s: float = FINAL_SCRAPE_S):
        self._server, self._final_scrape_s = None, final_scrape_s
        if not port:
            return
        reg = CollectorRegistry()
        self.videos = Counter("tubelet_shards_videos_total", "Input videos processed, by result", ["result"],
                              registry=reg)
        self.rejected = Counter("tubelet_shards_rejected_total", "Input videos rejected, by reason", ["reason"],
                                registry=reg)
        for result in ("sharded", "rejected"):
            self.videos.labels(result)
        for reason in REASONS:
            self.rejected.labels(reason)
        self.source_seconds = Counter("tubelet_shards_source_video_seconds_total",
                                      "Seconds of source video sharded", registry=reg)
        self.bytes = Counter("tubelet_shards_written_bytes_total", "Bytes of transcoded video written",
                             registry=reg)
        self.groups = Counter("tubelet_shards_groups_total", "Shard groups finished", registry=reg)
        Gauge("tubelet_shards_videos_expected", "Input videos this invocation processes", registry=reg).set(videos)
        Gauge("tubelet_shards_groups_expected", "Shard groups this invocation writes", registry=reg).set(groups)
        self.running = Gauge("tubelet_shards_running", "1 while the sharding job runs, 0 at its end", registry=reg)
        self.running.set(1)
        self._served = Labelled(reg, {"run": run})
        served = CollectorRegistry(auto_describe=False)
        served.register(self._served)
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=served)
        except OSError as e:
            hint = "another job holds it: pick another metrics_port" if e.errno == errno.EADDRINUSE else ""
            raise ShardsError(f"metrics: cannot serve on {addr}:{port} (metrics_port): {e.strerror or e}; {hint} "
                              "or set metrics_port=0") from None

    def sample(self, source_seconds: float, nbytes: int) -> None:
        if self._server is not None:
            self.videos.labels("sharded").inc()
            self.source_seconds.inc(source_seconds)
            self.bytes.inc(nbytes)

    def reject(self, reason: str) -> None:
        if self._server is not None:
            self.videos.labels("rejected").inc()
            self.rejected.labels(reason).inc()

    def group(self) -> None:
        if self._server is not None:
            self.groups.inc()

    def close(self) -> None:
        """The end (running 0), scraped once more when something scrapes this endpoint; then stop serving."""
        if self._server is None:
            return
        self.running.set(0)
        seen, deadline = self._served.scrapes, time.monotonic() + self._final_scrape_s
        while seen and self._served.scrapes == seen and time.monotonic() < deadline:
            time.sleep(0.05)
        self._server.shutdown()
        self._server.server_close()
        self._server = None
