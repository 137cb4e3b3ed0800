"""The one small metrics interface the trainer and loader report through; Prometheus is a backend.

What is reported: `pipeline.clips.LoaderStats` per batch, `train.step.StepStats` per step; the settings are
`train.config.MetricsConfig` (the `metrics` section). The backend (`train.prometheus`) imports those, never this
module, so the interface and its backend form no import circle.

`NullMetrics` is the default (metrics off, tests, non-exporting tools). `build_metrics` picks the backend
from the config: each rank serves its own endpoint on `addr:base_port + local_rank`, and every series carries
the run's identity (`run`) and the rank (`rank`).

Ports: 19400 + local rank by default, clear of the exporters a GPU node already runs (node-exporter 9100,
dcgm-exporter 9400, Prometheus 9090, Alertmanager 9093, Pushgateway 9091); `make shards` serves its progress on
`metrics_port` (19390 in `make monitor`'s scrape config).
"""

from __future__ import annotations

from typing import Dict, Optional

from pipeline.clips import LoaderStats
from train.config import MetricsConfig
from train.step import StepStats


class NullMetrics:
    """Records nothing. Every backend implements these methods."""

    def loader(self, stats: LoaderStats) -> None:
        pass

    def step(self, stats: StepStats) -> None:
        pass

    def started(self, step: int, checkpoint_step: int, dist_timeout_s: float) -> None:
        """Training (re)starts after `step`, resumed from the checkpoint of `checkpoint_step` (0: none)."""

    def checkpoint(self, step: int, seconds: float) -> None:
        pass

    def signals(self, values: Dict[str, float]) -> None:
        """The collapse signals of a logged step (train.signals): "target_<signal>" and "pred_<signal>"."""

    def nonfinite(self, step: int, action: str) -> None:
        """A NaN/inf loss or gradient was seen; action is 'stop' or 'skip'."""

    @property
    def url(self) -> Optional[str]:
        return None

    def close(self) -> None:
        pass


def build_metrics(cfg: MetricsConfig, rank: int, local_rank: int, run: str = ""):
    """The configured backend; `run`: the run's identity when metrics.run_id is not set (the run folder's name)."""
    if not cfg.enabled:
        return NullMetrics()
    from train.prometheus import PrometheusMetrics

    return PrometheusMetrics(cfg, rank=rank, local_rank=local_rank, run=cfg.run_id or run)
