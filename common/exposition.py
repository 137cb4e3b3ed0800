"""Prometheus exposition helper shared by the trainer's and the sharding job's exporters."""

from __future__ import annotations

from typing import Dict, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric


class Labelled:
    """A collector that re-emits every family of `inner` with constant labels (the run's identity, the rank),
    and counts scrapes (an exporter can wait for the next one before it exits).

    Drops the `<name>_created` timestamps prometheus_client adds to counters and histograms: in the text format
    they are extra gauge series nothing reads.
    """

    def __init__(self, inner: CollectorRegistry, labels: Dict[str, str]):
        self._inner, self._labels = inner, labels
        self.scrapes = 0

    def collect(self) -> Iterable[Metric]:
        for fam in self._inner.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            created = fam.name + "_created"
            out.samples = [s._replace(labels={**self._labels, **s.labels}) for s in fam.samples
                           if s.name != created]
            yield out
        self.scrapes += 1
