"""The one small metrics interface the trainer and loader report through; Prometheus is a backend.

`NullMetrics` is the default (metrics off, tests, non-exporting tools). `build_metrics` picks the backend
from the config: each rank serves its own endpoint on `addr:base_port + local_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from common.config import check
from pipeline.loader import LoaderStats


@dataclass
class MetricsConfig:
    enabled: bool = True
    addr: str = "127.0.0.1"  # loopback unless told otherwise
    base_port: int = 9400  # rank r serves on base_port + local_rank
    nvml: bool = True  # GPU utilisation, NVDEC, memory, power through NVML (absent without a GPU)
    nvml_interval: float = 2.0  # seconds between NVML samples

    def validate(self) -> None:
        check(0 <= self.base_port <= 65535 - 64, "base_port", "must be a TCP port (0..65471)")
        check(self.nvml_interval > 0, "nvml_interval", "must be > 0")


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


def build_metrics(cfg: MetricsConfig, rank: int, local_rank: int):
    if not cfg.enabled:
        return NullMetrics()
    from train.prometheus import PrometheusMetrics

    return PrometheusMetrics(cfg, rank=rank, local_rank=local_rank)
