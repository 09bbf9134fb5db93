"""Serverless metrics: replicas over time, cold and warm starts, and the time to first token of the requests
that waited for a scale-up (beside those that found a replica up).

The client records first tokens (`ServerlessMetrics.first_token`); the warm pool's registry (pool.py) records
replica starts and stops. `summary` joins them into one dict (GET /v1/serverless, the benchmark, the tests);
`ServerlessCollector` exposes the same on the server's /metrics registry as kvflow:serverless_* series.
"""
from __future__ import annotations

import statistics
import time


def _summary(xs: list[float]) -> dict:
    if not xs:
        return {"count": 0}
    xs = sorted(xs)
    return {"count": len(xs), "mean": statistics.fmean(xs), "p50": xs[len(xs) // 2], "max": xs[-1]}


class ServerlessMetrics:
    def __init__(self):
        self.ttft: dict[str, list[float]] = {"cold": [], "warm": [], "warming": [], "up": []}
        self.refused = 0
        self.waited: list[dict] = []          # the latest requests that waited for a scale-up, their phases

    def first_token(self, seconds: float, waited_for: str | None, phases: dict | None = None) -> None:
        """A request's first token after `seconds`; `waited_for`: the kind of start it waited for (cold, warm,
        warming), None when a replica was already up; `phases`: where a waiting request's time went (Serve
        deciding and starting the replica's process, attaching an engine, then the first token)."""
        self.ttft[waited_for or "up"].append(seconds)
        if phases is not None:
            self.waited.append(dict(phases, kind=waited_for, ttft=seconds))
            del self.waited[:-64]

    def summary(self, registry: dict) -> dict:
        starts = registry.get("starts", [])
        timeline = registry.get("timeline", [])
        return {"replicas": len(registry.get("live", [])), "timeline": timeline,
                "replica_seconds": replica_seconds(timeline, time.time()),
                "starts": {kind: sum(s["kind"] == kind for s in starts) for kind in ("cold", "warm", "warming")},
                "start_records": starts,
                "ttft_waited_cold": _summary(self.ttft["cold"]), "ttft_waited_warm": _summary(self.ttft["warm"]),
                "ttft_waited_warming": _summary(self.ttft["warming"]),
                "ttft_replica_up": _summary(self.ttft["up"]), "waited": list(self.waited),
                "refused_scale_up_timeout": self.refused}


def replica_seconds(timeline: list, now: float) -> float:
    """The integral of the replica count over time, from the first timeline point to `now`."""
    total = 0.0
    for (t0, n), (t1, _) in zip(timeline, timeline[1:] + [(now, 0)]):
        total += n * max(0.0, t1 - t0)
    return total


class ServerlessCollector:
    """A prometheus-client collector over the latest summary (refreshed by the server every second)."""

    def __init__(self, model: str):
        self.model = model
        self.latest: dict = {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.latest
        g = GaugeMetricFamily("kvflow:serverless_replicas", "serverless replicas up", labels=["model_name"])
        g.add_metric([self.model], s.get("replicas", 0))
        yield g
        c = CounterMetricFamily("kvflow:serverless_starts", "replica starts, by kind (cold: a new process "
                                "loading the model; warm: from the pre-warmed pool; warming: a pool worker still "
                                "starting, waited for)", labels=["model_name", "kind"])
        for kind, n in s.get("starts", {}).items():
            c.add_metric([self.model, kind], n)
        yield c
        r = GaugeMetricFamily("kvflow:serverless_replica_seconds", "replica-seconds so far", labels=["model_name"])
        r.add_metric([self.model], s.get("replica_seconds", 0.0))
        yield r
        t = GaugeMetricFamily("kvflow:serverless_scale_up_ttft_seconds", "mean time to first token of requests "
                              "that waited for a scale-up, by the kind of start", labels=["model_name", "kind"])
        for kind in ("cold", "warm", "warming"):
            t.add_metric([self.model, kind], s.get(f"ttft_waited_{kind}", {}).get("mean", 0.0))
        yield t
