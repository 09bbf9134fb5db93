"""What a simulation measured, reported as `kvflow bench serve` reports a real run (kvflow/bench/metrics.py:
TTFT, TPOT, ITL, E2E, throughput, goodput), plus prefix-cache hit rate, preemptions, KV transfer time, and
utilisation over time (busy fraction of the replicas up, KV usage, running requests, replicas up), as a
JSON record, a table and a PNG.

`Recorder` is what the event loop writes into: live requests by id (`records`), finished ones as compact
rows (a million of them fit), per-token gaps (ITL) of the first `keep_itl` requests only, and time bins.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvflow.bench.metrics import RequestResult, compute_metrics, format_summary

MAX_BINS = 200


@dataclass(eq=False, slots=True)
class Record:
    rid: str
    arrival: float
    prompt: list[int] | None
    prompt_len: int
    max_tokens: int
    user: str | None = None
    error: str = ""
    replica: int = -1
    decode: int = -1
    transfer_s: float = 0.0
    first: float | None = None
    last: float = 0.0                  # its latest token's time (requests that keep their ITL)
    n_out: int = 0
    itl: list[float] | None = None
    cached: int = 0
    preemptions: int = 0


@dataclass
class Recorder:
    keep_itl: int = 20000
    bin_s: float | None = None
    records: dict[str, Record] = field(default_factory=dict)
    rows: list[tuple] = field(default_factory=list)   # (arrival, prompt_len, n_out, ttft, e2e, cached, preempt, error)
    itls: list[list[float]] = field(default_factory=list)
    transfer_s: float = 0.0
    num_added: int = 0
    end_s: float = 0.0
    bins: dict[int, list[float]] = field(default_factory=dict)   # bin -> [busy s, kv sum, running sum, n, up s]
    up_since: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        self.width = self.bin_s or 1.0

    @property
    def in_flight(self) -> int:
        return len(self.records)

    def add(self, sreq, max_model_len: int) -> Record:
        rid = f"r{self.num_added}"
        self.num_added += 1
        n = len(sreq.prompt_token_ids)
        rec = Record(rid, sreq.arrival_s, sreq.prompt_token_ids, n, min(sreq.output_len, max_model_len - n),
                     sreq.user, itl=[] if self.num_added <= self.keep_itl else None)
        if n >= max_model_len:
            rec.error = f"prompt of {n} tokens does not fit max_model_len {max_model_len}"
            self.rows.append((rec.arrival, n, 0, 0.0, 0.0, 0, 0, rec.error))
            return rec
        self.records[rid] = rec
        return rec

    def outputs(self, outputs, now: float) -> list[tuple[Record, object]]:
        """Record a step's engine-core outputs (their new tokens: the first one's time, the gaps after it);
        the (record, output) pairs of the requests they end. One loop per step, not a call per output."""
        records, ended = self.records, []
        for o in outputs:
            rec = records[o.request_id]
            n = len(o.new_token_ids)
            if n:
                if rec.first is None:
                    rec.first = rec.last = now
                    rec.cached = o.num_cached_tokens if o.num_cached_tokens > 0 else 0
                elif rec.itl is not None:          # (`last` is only for these gaps)
                    rec.itl.extend([(now - rec.last) / n] * n)
                    rec.last = now
                rec.n_out += n
                if o.num_preemptions > rec.preemptions:      # (max(), without the builtin's call)
                    rec.preemptions = o.num_preemptions
            if o.finish_reason is not None:
                ended.append((rec, o))
        return ended

    def done(self, rec: Record, now: float) -> None:
        del self.records[rec.rid]
        self.rows.append((rec.arrival, rec.prompt_len, rec.n_out, rec.first - rec.arrival, now - rec.arrival,
                          rec.cached, rec.preemptions, ""))
        if rec.itl is not None:
            self.itls.append(rec.itl)
        self.transfer_s += rec.transfer_s
        rec.prompt = None

    def fail(self, rec: Record, why: str) -> None:
        self.records.pop(rec.rid, None)
        self.rows.append((rec.arrival, rec.prompt_len, 0, 0.0, 0.0, 0, 0, why))

    # ---- utilisation over time -----------------------------------------------------------------------------

    def _bin(self, k: int) -> list[float]:
        b = self.bins.get(k)
        if b is None:
            b = self.bins[k] = [0.0, 0.0, 0.0, 0.0, 0.0]
        return b

    def _spread(self, t0: float, t1: float, slot: int) -> None:
        w = self.width
        k = int(t0 // w)
        while t0 < t1:
            edge = min((k + 1) * w, t1)
            self._bin(k)[slot] += edge - t0
            t0, k = edge, k + 1

    def busy(self, replica: int, t0: float, seconds: float, kv_usage: float, running: int) -> None:
        """A step of `seconds` from `t0` (once per step: a step within one bin, the usual case, is added without
        _spread's loop, as the same float sum)."""
        t1, k = t0 + seconds, int(t0 // self.width)
        b = self._bin(k)
        if t1 <= (k + 1) * self.width:
            b[0] += t1 - t0
        else:
            self._spread(t0, t1, 0)
        b[1] += kv_usage
        b[2] += running
        b[3] += 1

    def replica_up(self, replica: int, t: float) -> None:
        self.up_since[replica] = t

    def replica_down(self, replica: int, t: float) -> None:
        self._spread(self.up_since.pop(replica, t), t, 4)

    def finish(self, now: float) -> None:
        self.end_s = now
        for replica in list(self.up_since):
            self.replica_down(replica, now)

    def timeline(self) -> dict[str, list[float]]:
        """Per bin (merged to at most MAX_BINS): time, busy fraction of the replicas up, mean KV usage and
        running requests per step, mean replicas up."""
        if not self.bins:
            return {"t_s": [], "utilisation": [], "kv_usage": [], "running": [], "replicas_up": []}
        n = max(self.bins) + 1
        merge = -(-n // MAX_BINS)
        out = {"t_s": [], "utilisation": [], "kv_usage": [], "running": [], "replicas_up": []}
        for start in range(0, n, merge):
            acc = [0.0] * 5
            for k in range(start, min(start + merge, n)):
                for j, v in enumerate(self.bins.get(k, ())):
                    acc[j] += v
            width = self.width * merge
            out["t_s"].append(round(start * self.width, 6))
            out["utilisation"].append(acc[0] / acc[4] if acc[4] else 0.0)
            out["kv_usage"].append(acc[1] / acc[3] if acc[3] else 0.0)
            out["running"].append(acc[2] / acc[3] if acc[3] else 0.0)
            out["replicas_up"].append(acc[4] / width)
        return out

    # ---- the report -----------------------------------------------------------------------------------------

    def results(self) -> list[RequestResult]:
        itls = iter(self.itls)
        out = []
        for arrival, n_in, n_out, ttft, e2e, _, _, error in self.rows:
            ok = not error
            out.append(RequestResult(success=ok, error=error, prompt_len=n_in, output_tokens=n_out, ttft=ttft,
                                     e2e=e2e, start_time=arrival, itl=[]))
        ok_rows = [r for r, row in zip(out, self.rows) if not row[7]]
        for r in ok_rows[:len(self.itls)]:
            r.itl = next(itls)
        return out

    def summary(self, goodput: dict[str, float] | None, sims=None) -> dict:
        results = self.results()            # duration from the workload's time 0, as the benchmark's
        m = compute_metrics(results, max(self.end_s, 1e-9), goodput)
        n_in = sum(row[1] for row in self.rows if not row[7])
        m["prefix_cache_hit_rate"] = sum(row[5] for row in self.rows if not row[7]) / n_in if n_in else 0.0
        m["preempted_requests"] = sum(1 for row in self.rows if row[6])
        m["mean_kv_transfer_ms"] = 1e3 * self.transfer_s / max(m["completed"], 1)
        if getattr(sims, "admission", None) is not None:
            m["rejected"] = sims.admission.rejected
        if getattr(sims, "elastic", None) is not None:
            m["role_switches"] = len(sims.elastic.switches)
        if getattr(sims, "kv_pool", None) is not None:
            stats = sims.kv_pool.stats()
            m["kv_pool_hit_blocks"], m["kv_pool_evictions"] = stats["hit_blocks"], stats["evictions"]
            m["kv_pool_load_ms"] = 1e3 * stats["load_s"]
        if sims is not None:
            reps = sims.replicas()
            m["preemptions"] = sum(r.scheduler.num_preemptions for r in reps)
            m["num_steps"] = sum(r.runner.num_steps for r in reps)
            if any(r.kv.disk is not None for r in reps):
                m["disk_hit_tokens"] = sum(r.kv.num_disk_hits for r in reps)
            up = sum(b[4] for b in self.bins.values())
            m["replica_seconds"] = up
            m["mean_utilisation"] = sum(b[0] for b in self.bins.values()) / up if up else 0.0
        return m


def format_table(summary: dict) -> str:
    """bench serve's summary block, then the simulator's own lines."""
    w = 50
    lines = [format_summary(summary), "{s:{c}^{n}}".format(s=" Simulator ", n=w, c="-")]
    for key, name, fmt in (("prefix_cache_hit_rate", "Prefix cache hit rate:", "{:.3f}"),
                           ("preemptions", "Preemptions:", "{}"), ("preempted_requests", "Preempted requests:", "{}"),
                           ("mean_kv_transfer_ms", "Mean KV transfer exposed (ms):", "{:.2f}"),
                           ("rejected", "Early rejections (503):", "{}"),
                           ("role_switches", "Role switches (elastic P/D):", "{}"),
                           ("disk_hit_tokens", "Disk tier hits (tokens):", "{}"),
                           ("kv_pool_hit_blocks", "KV pool blocks read:", "{}"),
                           ("kv_pool_evictions", "KV pool evictions:", "{}"),
                           ("kv_pool_load_ms", "KV pool reads, total wait (ms):", "{:.2f}"),
                           ("num_steps", "Steps:", "{}"), ("mean_utilisation", "Mean replica utilisation:", "{:.3f}"),
                           ("replica_seconds", "Replica-seconds:", "{:.1f}")):
        if key in summary:
            lines.append(f"{name:<40}{fmt.format(summary[key]):<10}")
    lines.append("=" * w)
    return "\n".join(lines)


def save_json(result: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def have_matplotlib() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def plot_sim(result: dict, results: list[RequestResult], path: str, title: str = "") -> str:
    """2x2 PNG: TTFT and TPOT histograms, utilisation and KV usage over time, replicas up. Returns a
    message (the path, or why no PNG was written)."""
    if not have_matplotlib():
        return "matplotlib is not installed: no PNG written (pip install matplotlib)"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, values) in zip(axes.flat[:2], (("TTFT (ms)", [r.ttft * 1e3 for r in ok]), (
            "TPOT (ms)", [(r.e2e - r.ttft) * 1e3 / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]))):
        ax.hist(values or [0.0], bins=40, color="tab:blue", alpha=0.8)
        ax.set_xlabel(name)
        ax.set_ylabel("requests")
    tl = result["timeline"]
    axes[1, 0].plot(tl["t_s"], tl["utilisation"], label="busy fraction")
    axes[1, 0].plot(tl["t_s"], tl["kv_usage"], label="KV usage")
    axes[1, 0].set_xlabel("simulated time (s)")
    axes[1, 0].legend()
    axes[1, 1].plot(tl["t_s"], tl["running"], label="running / step")
    axes[1, 1].plot(tl["t_s"], tl["replicas_up"], label="replicas up")
    axes[1, 1].set_xlabel("simulated time (s)")
    axes[1, 1].legend()
    s = result["summary"]
    fig.suptitle(f"{title} {s['completed']} requests, {s['output_throughput']:.1f} output tok/s".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
