"""The one small metrics interface the trainer and loader report through; Prometheus is a backend.

`NullMetrics` is the default (metrics off, tests, non-exporting tools). `build_metrics` picks the backend
from the config: each rank serves its own endpoint on `addr:base_port + local_rank`, and every series carries
the run's identity (`run`) and the rank (`rank`).

Ports: 19400 + local rank by default, clear of the exporters a GPU node already runs (node-exporter 9100,
dcgm-exporter 9400, Prometheus 9090, Alertmanager 9093, Pushgateway 9091); `make shards` serves its progress on
`metrics_port` (19390 in `make monitor`'s scrape config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from common.config import check
from pipeline.clips import LoaderStats


@dataclass
class MetricsConfig:
    enabled: bool = True
    addr: str = "127.0.0.1"  # loopback unless told otherwise
    base_port: int = 19400  # rank r serves on base_port + local_rank (not 9400: dcgm-exporter's)
    run_id: str = ""  # the `run` label of every series; "" = the name of the run folder
    nvml: bool = True  # GPU utilisation, NVDEC, memory, power through NVML; false next to dcgm-exporter
    nvml_interval: float = 2.0  # seconds between NVML samples
    # at exit, wait up to this long for one more scrape, so Prometheus sees how the run ended (its final step,
    # checkpoint and stop state); only when something has scraped the endpoint before; 0 = do not wait
    final_scrape_s: float = 30.0

    def validate(self) -> None:
        check(0 <= self.base_port <= 65535 - 64, "base_port", "must be a TCP port (0..65471)")
        check(self.nvml_interval > 0, "nvml_interval", "must be > 0")
        check(self.final_scrape_s >= 0, "final_scrape_s", "must be >= 0")


@dataclass
class StepStats:
    step: int
    step_seconds: float  # wall time of the whole step, data wait included
    data_wait_seconds: float  # time blocked waiting for the batch
    clips: int  # clips processed by this rank in the step
    loss: float
    lr: float
    weight_decay: float
    ema_momentum: float
    grad_norm: float
    skipped: bool = False  # a non-finite step skipped by the NaN guard


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
