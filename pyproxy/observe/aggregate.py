"""One /metrics for several workers: every worker's pyproxy_* counters, summed (pure).

With `--workers N` each worker is a whole proxy with its own counters; worker 0 answers
/metrics on the metrics address and asks the others for their exposition text over their
worker sockets (`pyproxy/observe/inspect_api.py`). Rules kept here:
- `pyproxy_*` families are per-worker data-plane figures (connections, bytes, dials,
  affinity tables): samples with the same name and labels are summed over the workers, so
  the series are the ones a single-process proxy would show.
- Every other family (`kubeproxy_*`, the process's own) is taken from the first text
  only: every worker syncs the same input, so summing sync histograms or change counters
  would count each change N times.
- prometheus-client's multiprocess mode was not used: it aggregates only metrics kept in
  its mmap files, and pyproxy's data-plane figures are plain integers read by collectors
  at scrape time (nothing is written per packet), which that mode cannot see.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

SUMMED_PREFIX = "pyproxy_"


def merge_exposition(texts: Sequence[str]) -> bytes:
    """The first worker's families, with the pyproxy_* ones summed over every text."""
    if not texts:
        return b""
    families = list(text_string_to_metric_families(texts[0]))
    others = [list(text_string_to_metric_families(text)) for text in texts[1:]]
    merged = [_sum(family, others) if family.name.startswith(SUMMED_PREFIX) else family for family in families]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merged))
    return bytes(generate_latest(registry))


def _sum(family: Metric, others: Sequence[Sequence[Metric]]) -> Metric:
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for source in (family, *(f for fams in others for f in fams if f.name == family.name)):
        for sample in source.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            totals[key] = totals.get(key, 0.0) + sample.value
    out = Metric(family.name, family.documentation, family.type)
    out.samples = [Sample(name, dict(labels), value) for (name, labels), value in totals.items()]
    return out


class _Fixed(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families
