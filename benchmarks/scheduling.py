"""Scheduling benchmark: kvflow's policies and the survey runtimes' presets on three workloads, with vLLM's CPU
build (FCFS and priority) as the peer, all in one run on the default model.

Workloads (chat requests, greedy, natural end of sequence: each prompt's output is the same under every
policy, so every configuration does the same work; prompts from kvflow/predict/prompts.py's test split,
which the length predictor never saw):
  1. mix:      short questions and long generations, Poisson arrivals with bursts (gamma, burstiness 0.3).
               Priority configurations send priority 0 for short and medium prompts, 1 for long ones.
  2. flood:    two clients (the OpenAI `user` field): "flood" sends its long requests all at once, "quiet"
               sends a short one every few seconds. Quiet's TTFT is compared with a run of quiet alone.
  3. prefixes: groups of requests that share a long system prompt, interleaved, with a KV cache that holds
               only a few of the prefixes at once.
Every server gets the same batch limit (`--max-num-seqs`), so that queues form. Reported per configuration:
TTFT, TPOT and E2E (mean, median, p99), goodput under an SLO, prefix hit rate (from the server's /metrics),
and Jain's fairness index over the clients' mean service rates (output tokens / E2E per request).

    .venv/bin/python benchmarks/scheduling.py                        # everything (about 30 minutes)
    .venv/bin/python benchmarks/scheduling.py --quick --no-vllm      # smoke test
    .venv/bin/python benchmarks/scheduling.py --workloads mix --configs fcfs,sjf-learned
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.serve import free_port, stop, wait_ready  # noqa: E402
from kvflow.bench.metrics import compute_metrics  # noqa: E402
from kvflow.bench.serve import arrival_times, send_request  # noqa: E402
from kvflow.platform import capabilities, describe  # noqa: E402
from kvflow.predict.prompts import make_items  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PREDICTOR = os.path.join(RESULTS, "length_predictor_smollm2.npz")
SLO = {"ttft": 2000.0, "tpot": 150.0}          # goodput: requests/s with TTFT <= 2 s and TPOT <= 150 ms

# name -> (kvflow serve flags | None for the vLLM peer, its vLLM policy, sends priority)
CONFIGS: dict[str, tuple[list[str] | None, str | None, bool]] = {
    "fcfs": (["--scheduling-policy", "fcfs"], None, False),
    "priority": (["--scheduling-policy", "priority"], None, True),
    "sjf-online": (["--scheduling-policy", "sjf"], None, False),
    "sjf-learned": (["--scheduling-policy", "sjf", "--length-predictor", PREDICTOR], None, False),
    "mlfq-learned": (["--scheduling-policy", "mlfq", "--length-predictor", PREDICTOR], None, False),
    "cache-aware": (["--scheduling-policy", "cache-aware"], None, False),
    "fair": (["--scheduling-policy", "fair"], None, False),
    "fcfs-tpot-slo": (["--tpot-slo-ms", "{tpot_slo}"], None, False),
    "preset-orca": (["--preset", "orca"], None, False),
    "preset-vllm": (["--preset", "vllm"], None, False),
    "preset-sarathi": (["--preset", "sarathi"], None, False),
    "preset-sglang": (["--preset", "sglang"], None, False),
    "preset-fastserve": (["--preset", "fastserve", "--length-predictor", PREDICTOR], None, False),
    "preset-kvflow": (["--preset", "kvflow"], None, False),
    "vllm-fcfs": (None, "fcfs", False),
    "vllm-priority": (None, "priority", True),
}
WORKLOAD_CONFIGS = {
    "mix": list(CONFIGS),
    "flood": ["fcfs", "fair", "priority", "mlfq-learned", "vllm-fcfs"],
    "prefixes": ["fcfs", "cache-aware", "preset-sglang", "preset-kvflow", "vllm-fcfs"],
}


# ---- workloads ---------------------------------------------------------------------------------------

def mix(args) -> list[dict]:
    items = make_items(args.mix_requests, seed=1, split="test", kinds={"short": 0.5, "medium": 0.2, "long": 0.3})
    times = arrival_times(len(items), args.mix_rate, burstiness=0.3, seed=1)
    return [{"t": t, "messages": it.messages, "max_tokens": args.max_tokens, "kind": it.kind,
             "priority": 1 if it.kind == "long" else 0, "user": None} for it, t in zip(items, times)]


def flood(args, quiet_only: bool = False) -> list[dict]:
    long = make_items(args.flood_requests, seed=2, split="test", kinds={"long": 1.0})
    short = make_items(args.quiet_requests, seed=3, split="test", kinds={"short": 1.0})
    reqs = [] if quiet_only else [{"t": 0.02 * i, "messages": it.messages, "max_tokens": args.max_tokens,
                                   "kind": it.kind, "priority": 1, "user": "flood"} for i, it in enumerate(long)]
    reqs += [{"t": 2.0 + args.quiet_gap * i, "messages": it.messages, "max_tokens": 32, "kind": it.kind,
              "priority": 0, "user": "quiet"} for i, it in enumerate(short)]
    return sorted(reqs, key=lambda r: r["t"])


def prefixes(args) -> list[dict]:
    rng = random.Random(4)
    words = ("system policy customer order refund shipping account invoice product support warranty billing "
             "address delivery return exchange payment card balance contract service plan upgrade").split()
    systems = [f"You are assistant number {g} of the help desk. Rules: " +
               " ".join(rng.choice(words) for _ in range(args.prefix_words)) for g in range(args.prefix_groups)]
    questions = make_items(args.prefix_groups * args.prefix_per_group, seed=5, split="test", kinds={"short": 1.0})
    reqs = []
    for i, q in enumerate(questions):                    # interleaved: group 0, 1, ..., 0, 1, ...
        g = i % args.prefix_groups
        reqs.append({"t": 0.05 * i, "messages": [{"role": "system", "content": systems[g]}, *q.messages],
                     "max_tokens": 32, "kind": "short", "priority": 0, "user": f"group{g}"})
    return reqs


WORKLOADS = {"mix": mix, "flood": flood, "prefixes": prefixes}


# ---- running one configuration -----------------------------------------------------------------------

def start(name: str, workload: str, args, log_path: str):
    """Start the configuration's server; returns (process, base url)."""
    flags, vllm_policy, _ = CONFIGS[name]
    port = free_port()
    kv = ["--num-kv-blocks", str(args.prefix_kv_blocks)] if workload == "prefixes" else []
    if flags is None:
        import benchmarks.vllm_peer as peer
        extra = ["--enable-prefix-caching"]
        if workload == "prefixes":
            # the same KV tokens: vLLM's CPU attention needs blocks of a multiple of 32 tokens
            extra += ["--num-gpu-blocks-override", str(args.prefix_kv_blocks // 2), "--block-size", "32"]
        proc = peer.start_server(port, scheduling_policy=vllm_policy, max_num_seqs=args.max_num_seqs,
                                 max_model_len=1024 if workload == "prefixes" else 2048,   # fits the small cache
                                 extra_args=extra, log_path=log_path)
        url = f"http://127.0.0.1:{port}"
        peer.wait_ready(url, proc, timeout_s=args.startup_timeout)
        return proc, url
    flags = [f.format(tpot_slo=args.tpot_slo_ms) for f in flags]
    cmd = [sys.executable, "-m", "kvflow", "serve", "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           *kv, *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, log_path, args.startup_timeout)
    return proc, url


def scrape(url: str) -> dict[str, float]:
    """Prefix-cache hits and queries from /metrics (kvflow's or vLLM's names), summed over labels."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {"hits": 0.0, "queries": 0.0}
    for line in text.splitlines():
        m = re.match(r"^(kvflow|vllm):prefix_cache_(hits|queries)(_total)?(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(2)] += float(m.group(5))
    return out


async def drive(url: str, reqs: list[dict], send_priority: bool) -> tuple[list, float]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=30),
                                 limits=httpx.Limits(max_connections=len(reqs) + 4)) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]

        def body(r):
            b = {"model": model, "messages": r["messages"], "max_tokens": r["max_tokens"], "temperature": 0,
                 "stream": True, "stream_options": {"include_usage": True}}
            if r["user"]:
                b["user"] = r["user"]
            if send_priority:
                b["priority"] = r["priority"]
            return b

        await send_request(client, url + "/v1/chat/completions", body({**reqs[0], "max_tokens": 4}), 0)  # warm-up
        t0 = time.perf_counter()

        async def one(r):
            await asyncio.sleep(max(0.0, t0 + r["t"] - time.perf_counter()))
            return await send_request(client, url + "/v1/chat/completions", body(r), 0, t0)

        results = await asyncio.gather(*(one(r) for r in reqs))
        return results, time.perf_counter() - t0


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values and any(values) else 0.0


def run_one(name: str, workload: str, args, quiet_only: bool = False) -> dict:
    reqs = flood(args, quiet_only=True) if quiet_only else WORKLOADS[workload](args)
    log_path = os.path.join(args.out, f"sched_{workload}_{name}{'_alone' if quiet_only else ''}.log")
    t = time.perf_counter()
    proc, url = start(name, workload, args, log_path)
    ready_s = time.perf_counter() - t
    try:
        before = scrape(url)
        results, duration = asyncio.run(drive(url, reqs, CONFIGS[name][2]))
        after = scrape(url)
    finally:
        stop(proc)
    row = {"config": name, "workload": workload + (" (quiet alone)" if quiet_only else ""), "ready_s": ready_s,
           "summary": compute_metrics(results, duration, SLO)}
    q = after["queries"] - before["queries"]
    row["prefix_hit_rate"] = (after["hits"] - before["hits"]) / q if q > 0 else None
    by_client: dict[str, list] = {}
    for r, spec in zip(results, reqs):
        by_client.setdefault(spec["user"] or spec["kind"], []).append(r)
    row["clients"] = {c: compute_metrics(rs, duration, SLO) for c, rs in by_client.items()}
    rates = [sum(r.output_tokens / r.e2e for r in rs if r.success and r.e2e > 0) / max(len(rs), 1)
             for rs in by_client.values()]
    row["jain"] = jain(rates)
    row["errors"] = sorted({r.error for r in results if not r.success})[:3]
    s = row["summary"]
    print(f"  [{workload}] {name}: {s['completed']}/{len(reqs)} ok, {s['output_throughput']:.1f} tok/s, "
          f"E2E mean {s['mean_e2el_ms']:.0f} ms p99 {s['p99_e2el_ms']:.0f}, TTFT median {s['median_ttft_ms']:.0f}, "
          f"TPOT p99 {s['p99_tpot_ms']:.0f}, hits {row['prefix_hit_rate']}" + (f", errors {row['errors']}"
                                                                                  if row["errors"] else ""),
          flush=True)
    return row


def merge(rows: list[dict]) -> dict:
    """One row from several rounds of a configuration: every number is the mean over the rounds."""
    def avg(values):
        if all(isinstance(v, dict) for v in values):
            return {k: avg([v[k] for v in values if k in v]) for k in values[0]}
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return sum(nums) / len(nums) if nums and len(nums) == len(values) else values[0]
    out = {k: avg([r[k] for r in rows]) for k in rows[0] if k not in ("errors",)}
    out["errors"] = sorted({e for r in rows for e in r["errors"]})
    out["rounds"] = len(rows)
    return out


# ---- report ---------------------------------------------------------------------------------------------

def table(rows: list[dict], workload: str) -> str:
    cols = ("mean_ttft", "median_ttft", "p99_ttft", "mean_tpot", "median_tpot", "p99_tpot", "mean_e2el",
            "median_e2el", "p99_e2el")
    head = ("| config | ok | out tok/s | goodput req/s | TTFT mean | TTFT med | TTFT p99 | TPOT mean | TPOT med "
            "| TPOT p99 | E2E mean | E2E med | E2E p99 | prefix hits | Jain |")
    lines = [f"### workload: {workload}", "", head, "|---|" + "---:|" * 14]
    for r in rows:
        s = r["summary"]
        hit = "-" if r["prefix_hit_rate"] is None else f"{100 * r['prefix_hit_rate']:.0f}%"
        lines.append(f"| {r['config']} | {s['completed']:.0f}/{s['completed'] + s['failed']:.0f} | "
                     f"{s['output_throughput']:.1f} | {s.get('goodput', 0):.2f} | "
                     + " | ".join(f"{s[c + '_ms']:.0f}" for c in cols) + f" | {hit} | {r['jain']:.3f} |")
    return "\n".join(lines)


def flood_table(rows: list[dict], alone: dict) -> str:
    base = alone["clients"]["quiet"]["p99_ttft_ms"]
    lines = ["| config | quiet TTFT p99 ms | x alone | quiet TTFT median ms | flood out tok/s | Jain |",
             "|---|---:|---:|---:|---:|---:|", f"| quiet alone (fcfs) | {base:.0f} | 1.00 | "
             f"{alone['clients']['quiet']['median_ttft_ms']:.0f} | - | - |"]
    for r in rows:
        q, f = r["clients"].get("quiet"), r["clients"].get("flood")
        if q:
            lines.append(f"| {r['config']} | {q['p99_ttft_ms']:.0f} | {q['p99_ttft_ms'] / base:.2f} | "
                         f"{q['median_ttft_ms']:.0f} | {f['output_throughput'] if f else 0:.1f} | {r['jain']:.3f} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = [w for w in report["rows"] if report["rows"][w]]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 5), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        rows = report["rows"][w]
        names = [r["config"] for r in rows]
        mean = [r["summary"]["mean_e2el_ms"] / 1000 for r in rows]
        p99 = [r["summary"]["p99_e2el_ms"] / 1000 for r in rows]
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], mean, height=0.4, label="E2E mean")
        ax.barh([i - 0.2 for i in y], p99, height=0.4, label="E2E p99")
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title(f"workload: {w}")
        ax.legend(fontsize=8)
    fig.suptitle(report["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="mix,flood,prefixes")
    ap.add_argument("--configs", default=None, help="comma list (default: each workload's own list)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's CPU build")
    ap.add_argument("--quick", action="store_true", help="small workloads, a few configurations")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256, help="cap on the long generations")
    ap.add_argument("--mix-requests", type=int, default=40)
    ap.add_argument("--mix-rate", type=float, default=2.5, help="mean arrivals per second in the mix")
    ap.add_argument("--flood-requests", type=int, default=24)
    ap.add_argument("--quiet-requests", type=int, default=6)
    ap.add_argument("--quiet-gap", type=float, default=3.0)
    ap.add_argument("--prefix-groups", type=int, default=6)
    ap.add_argument("--prefix-per-group", type=int, default=6)
    ap.add_argument("--prefix-words", type=int, default=300)
    ap.add_argument("--prefix-kv-blocks", type=int, default=160)
    ap.add_argument("--tpot-slo-ms", type=float, default=35.0, help="the fcfs-tpot-slo configuration's target")
    ap.add_argument("--rounds", type=int, default=1, help="runs per configuration, alternating the order; "
                                                            "the tables show the means")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.mix_requests, args.flood_requests, args.quiet_requests, args.max_tokens = 12, 8, 3, 64
        args.prefix_groups, args.prefix_per_group = 3, 3
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(PREDICTOR):
        print(f"training the length predictor first: {PREDICTOR}", flush=True)
        subprocess.run([sys.executable, "-m", "kvflow", "predict", "train", "--out", PREDICTOR], check=True)
    machine = describe(capabilities())
    print(machine, flush=True)
    report = {"machine": machine, "args": vars(args), "rows": {}}
    for w in args.workloads.split(","):
        names = args.configs.split(",") if args.configs else WORKLOAD_CONFIGS[w]
        if args.quick and not args.configs:
            names = [n for n in names if n in ("fcfs", "sjf-learned", "fair", "cache-aware", "vllm-fcfs")]
        names = [n for n in names if not (args.no_vllm and n.startswith("vllm"))]
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):          # alternate the order, so that drifting load hits every config alike
            for n in (names if r % 2 == 0 else names[::-1]):
                try:
                    runs[n].append(run_one(n, w, args))
                except Exception as e:  # noqa: BLE001 - a failed system is a row, not the end of the run
                    print(f"  [{w}] {n} failed: {e}", flush=True)
        report["rows"][w] = rows = [merge(rs) for rs in runs.values() if rs]
        if w == "flood" and rows:
            report["flood_alone"] = merge([run_one("fcfs", "flood", args, quiet_only=True)
                                           for _ in range(args.rounds)])
    out = os.path.join(args.out, "scheduling")
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("\n" + machine)
    for w, rows in report["rows"].items():
        if rows:
            print("\n" + table(rows, w) + "\n\n(latencies in ms)")
    if report.get("flood_alone"):
        print("\n" + flood_table(report["rows"]["flood"], report["flood_alone"]))
    plot(report, out + ".png")
    print(f"\nsaved {out}.json and {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
