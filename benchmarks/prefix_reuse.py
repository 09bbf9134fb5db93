"""Prefix reuse: TTFT and throughput with prefix caching off, on, and served from the disk tier after a
restart, side by side in one run, on two workloads (default model, in-process engine):

  system  32 requests that share a long system prompt (about 1,000 tokens of the Apache-2.0 license
          text) and each ask a short question; Poisson arrivals at --rate requests/s.
  chat    8 conversations of 4 turns; each turn's prompt is the whole conversation so far (system
          prompt, earlier questions and the model's replies), sent when the previous turn finishes.

Configurations, each in a fresh engine:
  off        enable_prefix_caching=False
  on         prefix caching in memory, starting cold
  disk       the disk tier (kv_store_dir) after a restart: one engine runs the workload and shuts down,
             a new engine (memory cache empty) runs it again and loads prefixes from disk

TTFT is arrival to first token (engine metrics); throughput is output tokens / wall time.

    .venv/bin/python benchmarks/prefix_reuse.py
    .venv/bin/python benchmarks/prefix_reuse.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time

from kvflow import LLM, SamplingParams

LICENSE = "/usr/share/common-licenses/Apache-2.0"
WORDS = ("model cache token request latency memory block prefix server batch schedule decode prefill "
         "attention kernel queue replica router stream sample budget chunk").split()


def system_prompt(tok, num_tokens: int) -> str:
    if not os.path.exists(LICENSE):
        raise SystemExit(f"{LICENSE} is missing (it ships with Debian's base-files)")
    text = open(LICENSE).read()
    ids = tok.encode(text, add_special_tokens=False)[:num_tokens]
    return "You answer questions about this license.\n\n" + tok.decode(ids)


def question(rng: random.Random) -> str:
    return "Explain " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "?"


def run_paced(llm: LLM, prompts: list[list[int]], arrivals: list[float], params: SamplingParams) -> dict:
    """Add each request at its arrival time (seconds from start) and step until all finish."""
    engine = llm.engine
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    outs, t0, k = {}, time.monotonic(), 0
    while k < len(order) or engine.has_unfinished_requests():
        now = time.monotonic() - t0
        while k < len(order) and arrivals[order[k]] <= now:
            i = order[k]
            engine.add_request(str(i), None, prompts[i], params)
            k += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[order[k]] - now))
            continue
        for out in engine.step():
            if out.finished:
                outs[int(out.request_id)] = out
    return summarize([outs[i] for i in range(len(prompts))], time.monotonic() - t0)


def run_chat(llm: LLM, tok, system: str, num_convs: int, turns: int, params: SamplingParams, seed: int) -> dict:
    """Conversations advance one turn when their previous turn finishes; all start at once."""
    engine, rng = llm.engine, random.Random(seed)
    convs = [[{"role": "system", "content": system}] for _ in range(num_convs)]
    done_turns, results, t0 = [0] * num_convs, [], time.monotonic()

    def send(c: int) -> None:
        convs[c].append({"role": "user", "content": question(rng)})
        _, ids = tok.encode_chat(convs[c])
        engine.add_request(f"{c}-{done_turns[c]}", None, ids, params)

    for c in range(num_convs):
        send(c)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            c = int(out.request_id.split("-")[0])
            results.append(out)
            convs[c].append({"role": "assistant", "content": out.outputs[0].text})
            done_turns[c] += 1
            if done_turns[c] < turns:
                send(c)
    return summarize(results, time.monotonic() - t0)


def summarize(outs, wall: float) -> dict:
    ttft = sorted(o.metrics.ttft * 1000 for o in outs)
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    cached = sum(max(o.num_cached_tokens, 0) for o in outs)
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": len(outs), "ttft_mean_ms": statistics.mean(ttft), "ttft_median_ms": statistics.median(ttft),
            "ttft_p99_ms": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "output_tok_s": gen / wall,
            "wall_s": wall, "prompt_tokens": prompt, "cached_fraction": cached / prompt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workloads", default="system,chat")
    ap.add_argument("--configs", default="off,on,disk")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=4.0, help="system workload: Poisson requests/s")
    ap.add_argument("--convs", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="8 requests, 4 conversations of 3 turns")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.num_requests, args.convs, args.turns = 8, 4, 3
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for workload in args.workloads.split(","):
        for config in args.configs.split(","):
            store = tempfile.mkdtemp(prefix="kvflow-store-") if config == "disk" else None
            kw = dict(model=args.model, enable_prefix_caching=config != "off", kv_store_dir=store)

            def once(llm):
                tok = llm.get_tokenizer()
                system = system_prompt(tok, args.system_tokens)
                if workload == "system":
                    rng = random.Random(args.seed)
                    prompts = [tok.encode_chat([{"role": "system", "content": system},
                                                {"role": "user", "content": question(rng)}])[1]
                               for _ in range(args.num_requests)]
                    t, arrivals = 0.0, []
                    for _ in prompts:
                        arrivals.append(t)
                        t += rng.expovariate(args.rate)
                    return run_paced(llm, prompts, arrivals, params)
                return run_chat(llm, tok, system, args.convs, args.turns, params, args.seed)

            if config == "disk":                    # populate the store, restart, measure
                with LLM(**kw) as first:
                    once(first)
            llm = LLM(**kw)
            once_warm = once(llm)
            llm.shutdown()
            if store:
                shutil.rmtree(store, ignore_errors=True)
            row = {"workload": workload, "config": config, **once_warm}
            rows.append(row)
            print(f"{workload:7s} {config:5s} TTFT mean {row['ttft_mean_ms']:8.1f} ms, median "
                  f"{row['ttft_median_ms']:8.1f}, p99 {row['ttft_p99_ms']:8.1f}; {row['output_tok_s']:6.1f} out tok/s; "
                  f"{100 * row['cached_fraction']:5.1f}% prompt tokens cached", flush=True)
    print("\n| workload | prefix cache | TTFT mean ms | TTFT median ms | TTFT p99 ms | output tok/s | prompt tokens cached |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['config']} | {r['ttft_mean_ms']:.1f} | {r['ttft_median_ms']:.1f} | "
              f"{r['ttft_p99_ms']:.1f} | {r['output_tok_s']:.1f} | {100 * r['cached_fraction']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
