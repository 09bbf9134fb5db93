"""Prometheus metrics of the server (`GET /metrics`), named as vLLM names them (with a kvflow: prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvflow.engine.wire import EngineStats
from kvflow.entrypoints.request_log import RequestLog
from kvflow.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        self._labels = {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(f"kvflow:{name}", doc, labels, registry=r).labels(**self._labels)

        def counter(name, doc):
            return Counter(f"kvflow:{name}", doc, labels, registry=r).labels(**self._labels)

        def histogram(name, doc, buckets):
            return Histogram(f"kvflow:{name}", doc, labels, buckets=buckets, registry=r).labels(**self._labels)

        self.running = gauge("num_requests_running", "Requests in the engine's running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (0-1)")
        self.hit_rate = gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries, in prompt tokens, since start")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.preemptions = counter("num_preemptions", "Requests preempted by the scheduler")
        self.swapped_out = counter("num_preemptions_swapped", "Preemptions that swapped KV blocks out (the rest "
                                   "recompute)")
        self.cow_copies = counter("cow_block_copies", "KV blocks copied on write by the samples of n > 1 requests")
        self.disk_hits = counter("disk_cache_hit_tokens", "Prompt tokens loaded from the disk tier")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests")
        self._success = Counter("kvflow:request_success", "Finished requests, by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first",
                              TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", LATENCY_BUCKETS)
        by_priority = labels + ["priority"]
        self.ttft_by_priority = Histogram("kvflow:time_to_first_token_by_priority_seconds",
                                          "Time to first token, per request priority", by_priority,
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_by_priority = Histogram("kvflow:e2e_request_latency_by_priority_seconds",
                                         "Arrival to last token, per request priority", by_priority,
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_length = Gauge("kvflow:policy_queue_length", "Requests in each of the scheduling policy's "
                                  "queues (MLFQ: per level)", labels + ["queue"], registry=r)
        self.predictor_error = gauge("length_predictor_error", "The output-length predictor's running mean "
                                     "|log2(predicted / true length)| over requests that ended by themselves")
        self.token_budget = gauge("step_token_budget", "The last step's token budget (it follows "
                                  "--tpot-slo-ms when set)")
        self.spec_drafts = counter("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens "
                                     "accepted")
        self.spec_verifications = counter("spec_decode_num_verifications", "Speculative decoding: verifications "
                                          "(accepted / verifications = mean accepted length)")
        self._last = EngineStats()
        # many replicas (kvflow/cluster) or prefill/decode workers (kvflow/disagg, `role` prefill or decode):
        # each one's own gauges
        by_replica = labels + ["replica", "role"]
        self._roles: dict[str, str] = {}
        self.replica_gauges = {f: Gauge(f"kvflow:replica_{name}", doc, by_replica, registry=r) for f, name, doc in (
            ("healthy", "healthy", "1 while the replica serves, 0 while it is down or restarting"),
            ("num_running", "num_requests_running", "Requests in the replica's running batch"),
            ("num_waiting", "num_requests_waiting", "Requests waiting in the replica"),
            ("num_assigned", "num_requests_assigned", "Requests the router sent to the replica, not finished"),
            ("kv_cache_usage", "kv_cache_usage_perc", "Fraction of the replica's KV blocks held by requests"),
            ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the replica's prefix cache"),
            ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in its prefix cache"),
            ("restarts", "restarts", "Times the replica was restarted after it died"))}
        self.router_gauges = {f: gauge(name, doc) for f, name, doc in (
            ("decisions", "router_decisions", "Requests the router placed (many replicas)"),
            ("seconds", "router_seconds", "Time the router spent placing them, prompt hashing included"),
            ("resumed", "router_resumed_requests", "Requests resumed on another replica after theirs died"),
            ("migrations", "router_migrations", "Running requests moved to another replica with their KV"))}
        self.pd_gauges = {f: gauge(name, doc) for f, name, doc in (
            ("handoffs", "pd_handoffs", "Requests handed from a prefill worker to a decode worker"),
            ("rejected", "pd_rejected_requests", "Requests refused early: no decode worker had KV memory for them"),
            ("fallbacks", "pd_transfer_fallbacks", "Handoffs whose KV did not arrive: computed on the decode worker"),
            ("pull_bytes", "pd_kv_pulled_bytes", "KV bytes decode workers pulled (sync transfer)"))}
        self.recent = RequestLog()      # the web page's timeline, latency charts and token rates (GET /stats)

    def record_stats(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)
        self.hit_rate.set(s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0)
        self.prefix_queries.inc(max(0, s.prefix_cache_queries - self._last.prefix_cache_queries))
        self.prefix_hits.inc(max(0, s.prefix_cache_hits - self._last.prefix_cache_hits))
        self.preemptions.inc(max(0, s.num_preemptions - self._last.num_preemptions))
        self.swapped_out.inc(max(0, s.num_swapped_out - self._last.num_swapped_out))
        self.cow_copies.inc(max(0, s.num_cow_copies - self._last.num_cow_copies))
        self.disk_hits.inc(max(0, s.disk_hit_tokens - self._last.disk_hit_tokens))
        for queue, n in s.queue_lengths.items():
            self.queue_length.labels(queue=queue, **self._labels).set(n)
        if s.predictor_error is not None:
            self.predictor_error.set(s.predictor_error)
        self.token_budget.set(s.token_budget)
        self.spec_drafts.inc(max(0, s.spec_drafts - self._last.spec_drafts))
        self.spec_accepted.inc(max(0, s.spec_accepted - self._last.spec_accepted))
        self.spec_verifications.inc(max(0, s.spec_verifications - self._last.spec_verifications))
        self._last = s

    def record_output(self, out: RequestOutput) -> None:
        """A finished request: token counters and its latencies."""
        self.recent.record(out)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        num_tokens = [len(c.token_ids) for c in out.outputs]
        self.generation_tokens.inc(sum(num_tokens))
        for c in out.outputs:
            self._success.labels(finished_reason=c.finish_reason or "abort", **self._labels).inc()
        m = out.metrics
        if m is None or m.first_token_time is None or m.finished_time is None:
            return
        ttft, e2e = m.first_token_time - m.arrival_time, m.finished_time - m.arrival_time
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        prio = {"priority": str(m.priority), **self._labels}
        self.ttft_by_priority.labels(**prio).observe(ttft)
        self.e2e_by_priority.labels(**prio).observe(e2e)
        if max(num_tokens) > 1:
            self.tpot.observe((e2e - ttft) / (max(num_tokens) - 1))

    def record_replicas(self, replicas: list[dict], router: dict | None = None) -> None:
        """Per-replica gauges (label `replica`) from AsyncLLM.replica_stats, the unlabelled ones being totals;
        the router's counts from AsyncLLM.router_stats."""
        for f, g in self.router_gauges.items():
            if router is not None:
                g.set(router[f])
        if router is not None and "disagg" in router:
            for f, g in self.pd_gauges.items():
                g.set(router["disagg"][f])
        for d in replicas:
            index, role = str(d["index"]), d.get("role", "replica")
            old = self._roles.get(index)
            if old is not None and old != role:          # it switched roles: its old series goes
                for g in self.replica_gauges.values():
                    g.remove(*self._labels.values(), index, old)
            self._roles[index] = role
            for f, g in self.replica_gauges.items():
                g.labels(replica=index, role=role, **self._labels).set(float(d.get(f) or 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
