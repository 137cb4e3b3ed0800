"""Prometheus progress counters of `make shards`, served on 127.0.0.1:<port> while it runs (port 0: off)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server


class ShardsMetrics:
    def __init__(self, port: int, addr: str = "127.0.0.1"):
        self._server = None
        if not port:
            self._on = False
            return
        self._on = True
        reg = CollectorRegistry()
        self.videos = Counter("tubelet_shards_videos_total", "Input videos processed, by result", ["result"],
                              registry=reg)
        self.rejected = Counter("tubelet_shards_rejected_total", "Input videos rejected, by reason", ["reason"],
                                registry=reg)
        self.source_seconds = Counter("tubelet_shards_source_video_seconds_total",
                                      "Seconds of source video sharded", registry=reg)
        self.bytes = Counter("tubelet_shards_written_bytes_total", "Bytes of transcoded video written",
                             registry=reg)
        self.groups = Counter("tubelet_shards_groups_total", "Shard groups finished", registry=reg)
        self._server, self._thread = start_http_server(port, addr=addr, registry=reg)

    def sample(self, source_seconds: float, nbytes: int) -> None:
        if self._on:
            self.videos.labels("sharded").inc()
            self.source_seconds.inc(source_seconds)
            self.bytes.inc(nbytes)

    def reject(self, reason: str) -> None:
        if self._on:
            self.videos.labels("rejected").inc()
            self.rejected.labels(reason).inc()

    def group(self) -> None:
        if self._on:
            self.groups.inc()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
