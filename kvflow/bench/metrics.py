"""Serving metrics as vLLM's `bench serve` defines them, and their report: the summary table, the
JSON record and the PNG (latency distributions and output throughput over time)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    """What one request measured; times in seconds, start_time relative to the benchmark start."""
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    start_time: float = 0.0
    output_tokens_from: str = ""        # "usage" | "max_tokens" (finish_reason "length") | "chunks"
    finish_reason: str | None = None
    text: str = ""


def _stats(prefix: str, values_s: list[float]) -> dict[str, float]:
    a = np.asarray(values_s, dtype=float) * 1000.0 if values_s else np.zeros(1)
    return {f"mean_{prefix}_ms": float(a.mean()), f"median_{prefix}_ms": float(np.median(a)),
            f"p99_{prefix}_ms": float(np.percentile(a, 99)), f"std_{prefix}_ms": float(a.std())}


def tpot(r: RequestResult) -> float | None:
    """(E2E - TTFT) / (output tokens - 1), None for requests with fewer than 2 output tokens."""
    return (r.e2e - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def compute_metrics(results: list[RequestResult], duration: float,
                    goodput: dict[str, float] | None = None) -> dict:
    """vLLM's serving metrics over the successful requests."""
    ok = [r for r in results if r.success]
    tpots = [t for t in map(tpot, ok) if t is not None]
    n_in, n_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    m = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "total_input_tokens": n_in, "total_output_tokens": n_out,
         "request_throughput": len(ok) / duration, "output_throughput": n_out / duration,
         "total_token_throughput": (n_in + n_out) / duration}
    if goodput:
        def meets(r: RequestResult) -> bool:
            got = {"ttft": r.ttft, "tpot": tpot(r) or 0.0, "e2el": r.e2e}
            return all(got[k] * 1000.0 <= slo for k, slo in goodput.items())
        m["goodput"] = sum(map(meets, ok)) / duration
    m.update(_stats("ttft", [r.ttft for r in ok]))
    m.update(_stats("tpot", tpots))
    m.update(_stats("itl", [g for r in ok for g in r.itl]))
    m.update(_stats("e2el", [r.e2e for r in ok]))
    return m


def format_summary(m: dict) -> str:
    """vLLM's "Serving Benchmark Result" block."""
    w = 50
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration_s']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    if "goodput" in m:
        rows.append(("Request goodput (req/s):", f"{m['goodput']:.2f}"))
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    for key, name, title in (("ttft", "TTFT", "Time to First Token"),
                             ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                             ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name} (ms):':<40}{m[f'{stat}_{key}_ms']:<10.2f}")
    lines.append("=" * w)
    return "\n".join(lines)


def machine_header() -> str:
    """The two lines every serving benchmark prints first: cores, Python and load, then the CPU's flags."""
    import os
    import platform

    from kvflow.platform import describe
    return (f"machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"python {platform.python_version()}, load average {os.getloadavg()[0]:.2f} at start\n"
            f"cpu: {describe(with_torch=False)}")


def save_result(result: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def throughput_bins(requests: list[dict], bin_s: float = 1.0, duration: float | None = None) -> list[float]:
    """Output tokens/s in `bin_s` bins since the start (each chunk carries its share of the request's
    tokens; the last bin is divided by its part before `duration`)."""
    counts: dict[int, float] = {}
    for r in requests:
        if not r["success"]:
            continue
        t = r["start_time"] + r["ttft"]
        times = [t] + [t := t + g for g in r["itl"]]
        for ct in times:
            counts[int(ct // bin_s)] = counts.get(int(ct // bin_s), 0.0) + r["output_tokens"] / len(times)
    n = max(counts, default=-1) + 1
    width = [bin_s] * n
    if n and duration:
        width[-1] = min(bin_s, max(duration - (n - 1) * bin_s, 1e-3))
    return [counts.get(i, 0.0) / w for i, w in enumerate(width)]


def plot_result(result: dict, path: str, title: str = "") -> None:
    """2x2 PNG: TTFT, TPOT and E2E histograms, output tokens/s over time (1-s bins)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in result["requests"] if r["success"]]
    series = [("TTFT (ms)", [r["ttft"] * 1e3 for r in ok]),
              ("TPOT (ms)", [(r["e2e"] - r["ttft"]) * 1e3 / (r["output_tokens"] - 1)
                             for r in ok if r["output_tokens"] > 1]),
              ("E2E latency (ms)", [r["e2e"] * 1e3 for r in ok])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, values) in zip(axes.flat, series):
        ax.hist(values or [0.0], bins=min(30, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
        if values:
            ax.axvline(float(np.median(values)), color="tab:red", ls="--", label="median")
            ax.legend()
        ax.set_xlabel(name)
        ax.set_ylabel("requests")
    bins = throughput_bins(result["requests"], duration=result["summary"]["duration_s"])
    axes[1, 1].bar(range(len(bins)), bins, width=1.0, align="edge", color="tab:green")
    axes[1, 1].set_xlabel("time since start (s)")
    axes[1, 1].set_ylabel("output tokens/s")
    s = result["summary"]
    fig.suptitle(f"{title} {s['completed']} requests, {s['output_throughput']:.1f} output tok/s".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
