"""Serverless serving (kvflow/serverless, Ray Serve) on a bursty, mostly idle trace, in one run.

The trace: --bursts bursts of --sessions requests each (all sent at once), separated by idle gaps longer than
the scale-down time (--idle-s, plus --gap-extra-s); every burst is the same sessions returning with one more
turn (a shared system prompt, the session's earlier turns, a new question), so from the second burst on each
request's prompt extends one that was served before the fleet scaled to zero.

Configurations, each a fresh serverless app on one local Ray cluster (ServerlessLLM in this process, the
engine workers in Ray's):
  cold        min 0 replicas, no warm pool: every scale-up is a true cold start (new process, weights from disk)
  warm        min 0, a warm pool of 2: scale-ups take a pre-started worker
  warm-nokv   as warm, without keeping KV across scale-downs (--no-keep-kv)
  always-on   min = max replicas, never scaled (the baseline for replica-seconds: max x trace time)
Per configuration: TTFT of the first request of each burst and of the rest, replica-seconds over the trace,
prefix hit rate of the returning bursts (cached prompt tokens / prompt tokens), and the cold start's phases.

Run (from the repository root):
    .venv/bin/python benchmarks/serverless.py                      # 3 bursts x 4 sessions, idle 2 s
    .venv/bin/python benchmarks/serverless.py --configs warm,always-on --bursts 2
Prints a Markdown table and the cold-start breakdown, and writes --out (JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

CONFIGS = {                     # min_replicas None: --max-replicas (always on, provisioned for the bursts)
    "cold": dict(min_replicas=0, warm_pool=0, keep_kv=True),
    "warm": dict(min_replicas=0, warm_pool=2, keep_kv=True),
    "warm-nokv": dict(min_replicas=0, warm_pool=2, keep_kv=False),
    "always-on": dict(min_replicas=None, warm_pool=0, keep_kv=True),
}
SYSTEM = ("You are a concise assistant for a travel agency. Answer in at most two sentences, mention one "
          "concrete place, and never ask a follow-up question. ") * 3
QUESTIONS = ["Where should I go in spring?", "What should I eat there?", "How do I get around?",
             "What is a good day trip?", "Where should I stay?"]


def prompt_messages(session: int, turn: int) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM + f"You are talking to customer number {session}."}]
    for t in range(turn):
        msgs += [{"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]},
                 {"role": "assistant", "content": f"Answer {t} for customer {session}: Lisbon, by tram."}]
    return msgs + [{"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]


async def run_config(name: str, args) -> dict:
    from kvflow.config import EngineConfig, default_model_path
    from kvflow.sampling.params import SamplingParams
    from kvflow.serverless.launch import ServerlessLLM
    from kvflow.serverless.metrics import replica_seconds
    opts = dict(CONFIGS[name])
    if opts["min_replicas"] is None:
        opts["min_replicas"] = args.max_replicas
    cfg = EngineConfig.from_kwargs(model=args.model or default_model_path(), preset="deepflow",
                                   max_replicas=args.max_replicas, scale_down_idle_s=args.idle_s,
                                   target_ongoing_requests=args.target, replica_cpus=1.0, num_kv_blocks=512,
                                   max_model_len=2048, **opts)
    engine = ServerlessLLM(cfg)
    await engine.start()
    if opts["min_replicas"]:                      # its replicas are up before the trace starts
        while engine.serverless_stats()["replicas"] < opts["min_replicas"]:
            await asyncio.sleep(0.2)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    rows, t_start = [], time.time()

    async def one(burst: int, session: int) -> dict:
        _, ids = engine.tokenizer.encode_chat(prompt_messages(session, burst), True)
        t0, ttft, out = time.perf_counter(), None, None
        async for out in engine.generate(None, ids, params):
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
        return {"burst": burst, "session": session, "ttft": ttft, "prompt": len(ids),
                "cached": max(0, out.num_cached_tokens)}

    for b in range(args.bursts):
        if b:
            await asyncio.sleep(args.idle_s + args.gap_extra_s)
        first = asyncio.create_task(one(b, 0))            # the burst's first request, then the rest at once
        await asyncio.sleep(0.05)
        rest = await asyncio.gather(*(one(b, s) for s in range(1, args.sessions)))
        rows += [await first, *rest]
    t_end = time.time()
    s = engine.serverless_stats()
    await engine.shutdown()
    timeline = [(t, n) for t, n in s["timeline"] if t <= t_end]
    before = [n for t, n in timeline if t <= t_start]
    clipped = [(t_start, before[-1] if before else 0)] + [(t, n) for t, n in timeline if t > t_start]
    returning = [r for r in rows if r["burst"] > 0]
    return {"config": name, "rows": rows, "trace_s": t_end - t_start,
            "replica_seconds": replica_seconds(clipped, t_end),
            "ttft_first": [r["ttft"] for r in rows if r["session"] == 0],
            "ttft_rest": [r["ttft"] for r in rows if r["session"] != 0],
            "returning_hit_rate": sum(r["cached"] for r in returning) / max(1, sum(r["prompt"] for r in returning)),
            "starts": s["starts"], "start_records": s["start_records"], "max_replicas": args.max_replicas,
            "warm_pool": opts["warm_pool"], "waited": s["waited"]}


def table(results: list[dict]) -> str:
    med = lambda xs: statistics.median(xs) if xs else float("nan")   # noqa: E731
    out = ["| config | TTFT first of burst (s), each | TTFT rest, median (s) | replica-s (trace s) "
           "| vs always-on, same trace | + warm pool's worker-s | returning prefix hit | starts cold/warm/warming |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        always = r["max_replicas"] * r["trace_s"]      # always on at the peak, over this trace
        st, pool_s = r["starts"], r["warm_pool"] * r["trace_s"]
        out.append(f"| {r['config']} | {', '.join(f'{x:.2f}' for x in r['ttft_first'])} | {med(r['ttft_rest']):.2f} "
                   f"| {r['replica_seconds']:.1f} ({r['trace_s']:.0f}) | {r['replica_seconds'] / always:.0%} "
                   f"| {(r['replica_seconds'] + pool_s) / always:.0%} | {r['returning_hit_rate']:.0%} "
                   f"| {st['cold']}/{st['warm']}/{st['warming']} |")
    return "\n".join(out)


def breakdown(results: list[dict]) -> str:
    from kvflow.serverless.cold_start import breakdown_rows
    lines = []
    for r in results:
        for rec in r["start_records"][:1]:
            rows = breakdown_rows(rec)
            lines.append(f"{r['config']} ({rec['kind']} start): " + ", ".join(f"{k} {v:.2f}s" for k, v in rows)
                         + f"; first request's TTFT {r['ttft_first'][0]:.2f}s")
        for w in r["waited"][:1]:
            lines.append(f"  its first waiting request: Serve scale-up + replica process "
                         f"{w['scale_up_and_process']:.2f}s, "
                         f"attach {w['attach']:.2f}s, then first token {w['first_token']:.2f}s "
                         f"(TTFT {w['ttft']:.2f}s)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the SmolLM2-135M GGUF")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--idle-s", type=float, default=2.0, help="scale_down_idle_s")
    p.add_argument("--gap-extra-s", type=float, default=10.0, help="idle gap = idle-s + this")
    p.add_argument("--target", type=float, default=2.0, help="target_ongoing_requests")
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/serverless.json")
    args = p.parse_args()
    names = args.configs.split(",")
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown config {n!r}; choose from {', '.join(CONFIGS)}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             logging_level="ERROR", log_to_driver=False)
    results = []
    try:
        for n in names:
            results.append(asyncio.run(run_config(n, args)))
            print(f"{n}: done in {results[-1]['trace_s']:.0f}s", flush=True)
    finally:
        from ray import serve
        serve.shutdown()
        ray.shutdown()
    print(table(results))
    print(breakdown(results))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
