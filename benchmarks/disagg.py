"""Disaggregated prefill/decode against colocated replicas, on equal hardware: long prompts arriving while chat
requests decode (the workload DistServe and SplitWise motivate disaggregation with).

Configurations, each a fresh `kvflow serve` on 127.0.0.1 with its own local Ray cluster, one core per worker:
    colocated   --replicas 2 --router least-load
    sync        --prefill-replicas 1 --decode-replicas 1 --kv-transfer sync        (DistServe)
    async       ... --kv-transfer async                                            (SplitWise)
    layerwise   ... --kv-transfer layerwise                                        (Mooncake)
Each is warmed up (2 short requests), then runs `kvflow bench serve`'s benchmark (kvflow/bench/serve.py) on
the same request list, and is stopped by pid (its Ray processes too; benchmarks/cluster.py's helpers).

Workload (--seed fixed): --chat chat requests (prompt ~--chat-input tokens, --chat-output tokens, ignore_eos)
and --long long-prompt requests (~--long-input tokens, --long-output tokens), shuffled together, Poisson
arrivals at --request-rate. Reported per class: TTFT and TPOT (median, p99); goodput (requests/s meeting both
--slo-ttft-ms and --slo-tpot-ms); and for P/D: the KV bytes handed over per request, the time from a
handoff to the decode worker's first token (the transfer's exposed part plus one decode step), the sync
pull time, and bytes/s over that time.

Run (from the repository root, on a quiet machine):
    .venv/bin/python benchmarks/disagg.py                  # all four configurations
    .venv/bin/python benchmarks/disagg.py --quick          # smoke test: colocated and sync, few requests
Prints one Markdown table and writes disagg_<config>.json and disagg_summary.json under --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cluster import descendants, free_port, stop, wait_ready, warm_up  # noqa: E402
from kvflow.bench.datasets import RequestSpec, _random_text  # noqa: E402
from kvflow.bench.metrics import machine_header, save_result  # noqa: E402
from kvflow.bench.serve import BenchConfig, load_tokenizer, run_benchmark  # noqa: E402
from kvflow.config import default_model_path  # noqa: E402

CONFIGS = {
    "colocated": ["--replicas", "2", "--router", "least-load"],
    "sync": ["--prefill-replicas", "1", "--decode-replicas", "1", "--kv-transfer", "sync"],
    "async": ["--prefill-replicas", "1", "--decode-replicas", "1", "--kv-transfer", "async"],
    "layerwise": ["--prefill-replicas", "1", "--decode-replicas", "1", "--kv-transfer", "layerwise"],
}


def workload(tok, args) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    specs = [RequestSpec(_random_text(tok, rng, args.chat_input), args.chat_input, args.chat_output)
             for _ in range(args.chat)]
    specs += [RequestSpec(_random_text(tok, rng, args.long_input), args.long_input, args.long_output)
              for _ in range(args.long)]
    rng.shuffle(specs)
    return specs


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def class_stats(requests: list[dict], specs: list[RequestSpec], prompt_len: int) -> dict:
    rows = [r for r, s in zip(requests, specs) if s.prompt_len == prompt_len and r["success"]]
    ttft = [1e3 * r["ttft"] for r in rows]
    tpot = [1e3 * (r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in rows if r["output_tokens"] > 1]
    itl = [1e3 * g for r in rows for g in r["itl"]]
    return {"n": len(rows), "ttft_median_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_median_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99), "itl_p99_ms": pct(itl, 99)}


def run_config(name: str, model: str, specs, tok, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kvflow", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--replica-cpus", "1", *CONFIGS[name], *shlex.split(args.kvflow_args)]
    log_path = os.path.join(args.out, f"disagg_{name}.server.log")
    print(f"[{name}] starting: {shlex.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    children: dict[int, str] = {}
    try:
        wait_ready(proc, url, log_path, args.startup_timeout, 2)
        children = descendants(proc.pid)
        asyncio.run(warm_up(url, 2))
        before = httpx.get(url + "/stats", timeout=10).json()["router"] or {}
        cfg = BenchConfig(base_url=url, num_prompts=len(specs), seed=args.seed, request_rate=args.request_rate,
                          warmup=0, tokenizer=model, goodput={"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms})
        result = asyncio.run(run_benchmark(cfg, specs=specs, tok=tok, log=lambda s: None))
        time.sleep(1.0)
        after = httpx.get(url + "/stats", timeout=10).json()["router"] or {}
        children.update(descendants(proc.pid))
    finally:
        stopped = stop(proc, children)
        print(f"[{name}] stopped ({len(stopped['left_behind'])} processes left behind, stopped by pid)", flush=True)
    reqs = result["requests"]
    result["chat"] = class_stats(reqs, specs, args.chat_input)
    result["long"] = class_stats(reqs, specs, args.long_input)
    result["goodput"] = result["summary"]["goodput"]
    pd_before, pd_after = before.get("disagg") or {}, after.get("disagg") or {}
    if pd_after:
        n = pd_after["handoffs"] - pd_before.get("handoffs", 0)
        moved = pd_after["kv_bytes"] - pd_before.get("kv_bytes", 0)
        handoff = pd_after["handoff_s"][-n:] if n else []
        pulls = pd_after["pull_s"][len(pd_before.get("pull_s", [])):] if pd_after["pull_s"] else []
        med = statistics.median(handoff) if handoff else None
        result["transfer"] = {
            "handoffs": n, "kv_bytes_per_request": moved / n if n else None, "fallbacks": pd_after["fallbacks"],
            "handoff_to_decode_ms_median": 1e3 * med if med else None,
            "pull_ms_median": 1e3 * statistics.median(pulls) if pulls else None,
            "bytes_per_s": (moved / n) / med if n and med else None,
            "handoff_share_of_long_ttft": med * 1e3 / result["long"]["ttft_median_ms"]
            if med and result["long"]["ttft_median_ms"] else None}
    result["server_command"] = cmd
    return result


def _f(v, fmt="{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(rows: dict[str, dict]) -> str:
    head = ("| config | chat TTFT med / p99 (ms) | chat TPOT med / p99 (ms) | chat ITL p99 (ms) | long TTFT med / p99 (ms) | "
            "goodput (req/s) | KV per handoff | handoff→decode (ms) | sync pull (ms) | MB/s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        c, lg, t = r["chat"], r["long"], r.get("transfer") or {}
        lines.append(
            f"| {name} | {_f(c['ttft_median_ms'])} / {_f(c['ttft_p99_ms'])} | {_f(c['tpot_median_ms'], '{:.1f}')} / "
            f"{_f(c['tpot_p99_ms'], '{:.1f}')} | {_f(c['itl_p99_ms'], '{:.1f}')} | {_f(lg['ttft_median_ms'])} / {_f(lg['ttft_p99_ms'])} | "
            f"{r['goodput']:.2f} | {_f(t.get('kv_bytes_per_request') and t['kv_bytes_per_request'] / 1024, '{:.0f} KiB')} | "
            f"{_f(t.get('handoff_to_decode_ms_median'), '{:.1f}')} | {_f(t.get('pull_ms_median'), '{:.1f}')} | "
            f"{_f(t.get('bytes_per_s') and t['bytes_per_s'] / 1e6, '{:.0f}')} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--chat", type=int, default=40)
    p.add_argument("--chat-input", type=int, default=96)
    p.add_argument("--chat-output", type=int, default=96)
    p.add_argument("--long", type=int, default=10)
    p.add_argument("--long-input", type=int, default=1536)
    p.add_argument("--long-output", type=int, default=8)
    p.add_argument("--request-rate", type=float, default=2.0)
    p.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kvflow-args", default="", help="more `kvflow serve` flags for every configuration")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.configs, args.chat, args.long = "colocated,sync", 6, 2
    os.makedirs(args.out, exist_ok=True)
    model = args.model or default_model_path()
    tok = load_tokenizer(model)
    specs = workload(tok, args)
    print(machine_header(), flush=True)
    rows = {}
    for name in args.configs.split(","):
        rows[name] = run_config(name, model, specs, tok, args)
        save_result(rows[name], os.path.join(args.out, f"disagg_{name}.json"))
    print(f"\n{args.chat} chat requests ({args.chat_input} -> {args.chat_output} tokens) and {args.long} long "
          f"({args.long_input} -> {args.long_output}), Poisson {args.request_rate} req/s; goodput SLO: TTFT <= "
          f"{args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms\n")
    print(table(rows))
    summary = {"args": vars(args), "machine": machine_header(),
               "results": {k: {x: v[x] for x in ("chat", "long", "goodput", "transfer", "summary") if x in v}
                           for k, v in rows.items()}}
    with open(os.path.join(args.out, "disagg_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
