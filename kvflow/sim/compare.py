"""`kvflow sim compare`: the survey's runtimes (kvflow/presets.py) on one workload and one hardware budget.

Each preset gets the same `gpus` devices: single-replica runtimes (orca, vllm, sarathi, sglang, fastserve,
and kvflow's own defaults) run `gpus` replicas behind least-load; preble behind its cache-aware router; the
P/D ones (distserve, tetriinfer, splitwise, mooncake) split them into gpus // 2 prefill and the rest decode
workers (at least one each: a 1-GPU budget gives them 2); deepflow scales from zero up to `gpus` serverless
replicas. Every preset runs at each request rate, and the table gives goodput at every rate and the full
metrics at the highest; the plot is goodput against the request rate. With a search budget, a last row is
kvflow's best configuration on the same devices (kvflow/sim/search.py), found from the best of the others (and
from the best of the other family of shapes, colocated or P/D).
"""
from __future__ import annotations

import dataclasses
import logging

from kvflow.config import EngineConfig
from kvflow.presets import PRESETS, preset_options
from kvflow.sim.cluster import simulate
from kvflow.sim.cost_model import HardwareProfile
from kvflow.sim.search import SHAPE_KEYS, search
from kvflow.sim.workload import WorkloadSpec, workload_requests

SURVEY_PRESETS = ("orca", "vllm", "sarathi", "sglang", "fastserve", "preble", "distserve", "tetriinfer",
                  "splitwise", "mooncake", "deepflow")


def preset_shape(name: str, gpus: int) -> dict:
    """The serving-shape options that give preset `name` a budget of `gpus` devices."""
    if name not in PRESETS:
        raise ValueError(f"presets must name presets among {', '.join(PRESETS)}, got {name!r}")
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    opts = preset_options(name)
    if opts.get("prefill_replicas"):
        p = max(1, gpus // 2)
        return {"prefill_replicas": p, "decode_replicas": max(1, gpus - p)}
    if opts.get("serverless"):
        return {"max_replicas": gpus, "min_replicas": 0}
    return {"replicas": gpus}


def compare(presets: list[str], workload: WorkloadSpec | str, profile: HardwareProfile, gpus: int,
            rates: list[float] | None, goodput: dict[str, float], overrides: dict | None = None,
            search_budget: int = 0) -> dict:
    """{"rows": [{preset, shape, points: [{rate, summary}]}], ...}: every preset at every rate; with
    `search_budget` > 0 a last row, "kvflow-best": kvflow's best configuration for this workload and budget
    (kvflow/sim/search.py; its options and how it was found under "search")."""
    if isinstance(workload, str) and rates:
        raise ValueError("rates: a trace keeps its own arrival times (use a synthetic workload to vary the load)")
    rates = rates or [workload.rate if isinstance(workload, WorkloadSpec) else None]
    overrides = overrides or {}

    def run(options: dict, preset: str | None = None) -> list[dict]:
        config = EngineConfig.from_kwargs(preset=preset, **{**options, **overrides})
        points = []
        for rate in rates:
            w = dataclasses.replace(workload, rate=rate) if isinstance(workload, WorkloadSpec) else workload
            sim, rec = simulate(config, profile, workload_requests(w, config.cache.block_size), keep_itl=2000)
            for r in sim.replicas():
                r.check()
            points.append({"rate": rate, "summary": rec.summary(goodput, sim)})
        return points

    rows, found = [], None
    quiet = logging.getLogger("kvflow")
    level = quiet.level
    quiet.setLevel(logging.WARNING)                 # a preset logs what it sets, once per config
    try:
        for name in presets:
            shape = preset_shape(name, gpus)
            rows.append({"preset": name, "shape": shape, "points": run(shape, name)})
        if search_budget:
            start = [(r["preset"], {k: v for k, v in {**preset_options(r["preset"]), **r["shape"]}.items()
                                    if k not in overrides}, r["points"]) for r in rows if "max_replicas" not in r["shape"]]
            found = search(run, gpus, overrides, start, search_budget)
            shape = {k: v for k, v in found["options"].items() if k in SHAPE_KEYS}
            rows.append({"preset": "kvflow-best", "shape": shape, "points": found["points"]})
    finally:
        quiet.setLevel(level)
    result = {"gpus": gpus, "hardware": profile.name, "goodput_slo_ms": goodput, "rates": rates, "rows": rows}
    if found is not None:
        result["search"] = {k: found[k] for k in ("options", "start", "starts", "evaluations", "skipped", "trail")}
    return result


def format_compare(result: dict) -> str:
    rates = result["rates"]
    head = (f"{'preset':<12}{'shape':<10}" + "".join(f"{'gp@' + _rate(r):>10}" for r in rates)
            + f"{'tok/s':>9}{'TTFT50':>9}{'TTFT99':>9}{'TPOT50':>8}{'TPOT99':>8}{'hit':>6}{'preempt':>8}")
    lines = [f"{len(result['rows'])} runtimes on {result['gpus']} device(s) of {result['hardware']}; goodput "
             f"(req/s) meets {result['goodput_slo_ms']} ms; the other columns at {_rate(rates[-1])} req/s (ms)",
             head, "-" * len(head)]
    for row in result["rows"]:
        sh = row["shape"]
        shape = (f"{sh['prefill_replicas']}P+{sh['decode_replicas']}D" if "prefill_replicas" in sh else
                 f"<={sh['max_replicas']} sl" if "max_replicas" in sh else f"{sh['replicas']}x")
        last = row["points"][-1]["summary"]
        lines.append(f"{row['preset']:<12}{shape:<10}" + "".join(
            f"{p['summary'].get('goodput', 0.0):>10.2f}" for p in row["points"])
            + f"{last['output_throughput']:>9.1f}{last['median_ttft_ms']:>9.1f}{last['p99_ttft_ms']:>9.1f}"
            f"{last['median_tpot_ms']:>8.1f}{last['p99_tpot_ms']:>8.1f}{last['prefix_cache_hit_rate']:>6.2f}"
            f"{last.get('preemptions', 0):>8}")
    if "search" in result:
        found = result["search"]
        lines.append(f"kvflow-best: {', '.join(f'{k}={v}' for k, v in found['options'].items()) or 'the defaults'} "
                     f"({len(found['trail']) - 1} improvement(s) on {found['trail'][0]['start']}, the best of the "
                     f"rows above; descents from {' and '.join(found['starts'])}; {found['evaluations']} "
                     f"configurations simulated, {len(found['skipped'])} refused)")
    return "\n".join(lines)


def _rate(r) -> str:
    return "inf" if r is None or r == float("inf") else f"{r:g}"


def plot_compare(result: dict, path: str) -> str:
    from kvflow.sim.report import have_matplotlib
    if not have_matplotlib():
        return "matplotlib is not installed: no PNG written (pip install matplotlib)"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, row in enumerate(result["rows"]):
        xs = [p["rate"] for p in row["points"]]
        ax.plot(xs, [p["summary"].get("goodput", 0.0) for p in row["points"]], marker="os^vD"[i % 5],
                color=plt.cm.tab20(i % 20), label=row["preset"], ls="--" if row["preset"].startswith("kvflow") else "-")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(f"goodput (req/s within {result['goodput_slo_ms']} ms)")
    ax.set_title(f"{result['gpus']} device(s), {result['hardware']}")
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
