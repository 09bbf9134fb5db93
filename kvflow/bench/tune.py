"""`kvflow tune`: find a fixed token budget offline by a stress test, as Sarathi-Serve does.

For each candidate budget (`max_num_batched_tokens`), the engine runs `--decodes` requests that keep decoding
while `--prompts` long prompts (`--prompt-len` tokens each) arrive and are prefilled in chunks beside them.
Every step then holds the decodes plus at most one budget of prefill, so the step time is the decodes' time
per output token (TPOT). Measured per budget: TPOT median and p99 over the steps that had a prefill chunk,
and the prefill throughput (prompt tokens per second of those steps). The budget printed is the largest whose
TPOT p99 meets `--tpot-slo-ms`; without a target, the smallest whose prefill throughput is within 10% of
the best (larger budgets only lengthen the decodes' steps). The result is a flag for `kvflow serve`. With a
target, a last row runs the same stress with the online SLO-aware budget (`--tpot-slo-ms` on the server).
(`--tpot-slo-ms` is the engine flag's: here it is the target the fixed budgets are checked against.)
A TPOT target can instead be followed online: `kvflow serve --tpot-slo-ms T`.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

DEFAULT_BUDGETS = (128, 256, 512, 1024, 2048)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="candidate token budgets, comma-separated (default: %(default)s)")
    p.add_argument("--decodes", type=int, default=16, help="requests decoding throughout (default: 16)")
    p.add_argument("--prompts", type=int, default=4, help="long prompts prefilled per budget (default: 4)")
    p.add_argument("--prompt-len", type=int, default=1024, help="tokens per long prompt (default: 1024)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def _measure(llm, budget: int, decodes: int, prompts: int, prompt_len: int, seed: int) -> dict:
    from kvflow.sampling.params import SamplingParams
    engine, sched = llm.engine, llm.engine.core.scheduler
    sched.max_num_batched_tokens = budget
    llm.reset_prefix_cache()                 # every budget computes its prompts in full
    rng = random.Random(seed)
    vocab = min(engine.model_config.vocab_size, 10000)
    long_out = SamplingParams(max_tokens=100000, ignore_eos=True, temperature=0)
    ids = []
    for i in range(decodes):
        rid = f"tune-d{budget}-{i}"
        engine.add_request(rid, None, [rng.randrange(3, vocab) for _ in range(16)], long_out)
        ids.append(rid)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in sched.requests.values()):
        engine.step()                            # the decodes' prompts first: from here on they decode
    for i in range(prompts):
        engine.add_request(f"tune-p{budget}-{i}", None, [rng.randrange(3, vocab) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=1, temperature=0))
    times, prefill = [], 0
    while len(engine.core.scheduler.requests) > decodes:
        before = sched.num_scheduled_tokens
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        prefill += sched.num_scheduled_tokens - before - decodes
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    t = np.asarray(times)
    return {"budget": budget, "steps": len(t), "tpot_median_ms": float(np.median(t) * 1e3),
            "tpot_p99_ms": float(np.percentile(t, 99) * 1e3), "prefill_tok_s": float(prefill / t.sum())}


def choose(rows: list[dict], tpot_slo_ms: float | None) -> dict | None:
    """The budget to use (see the module docstring), None when no budget meets the target."""
    if tpot_slo_ms is not None:
        ok = [r for r in rows if r["tpot_p99_ms"] <= tpot_slo_ms]
        return max(ok, key=lambda r: r["budget"]) if ok else None
    best = max(r["prefill_tok_s"] for r in rows)
    return min((r for r in rows if r["prefill_tok_s"] >= 0.9 * best), key=lambda r: r["budget"])


def run(args: argparse.Namespace, engine_kw: dict) -> int:
    from kvflow.entrypoints.llm import LLM
    budgets = sorted({int(b) for b in str(args.budgets).split(",") if b.strip()})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--budgets must be positive integers, got {args.budgets!r}")
    for name in ("decodes", "prompts", "prompt_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tpot_slo_ms is not None and not args.tpot_slo_ms > 0:
        raise ValueError(f"--tpot-slo-ms must be > 0, got {args.tpot_slo_ms}")
    engine_kw = dict(engine_kw)
    engine_kw.pop("tpot_slo_ms", None)       # --tpot-slo-ms is the target here: the budgets stay fixed
    engine_kw = {**engine_kw, "max_num_seqs": max(engine_kw.get("max_num_seqs") or 0, args.decodes + args.prompts),
                 "max_num_batched_tokens": max(budgets)}
    llm = LLM(**engine_kw)
    _measure(llm, budgets[0], min(args.decodes, 2), 1, min(args.prompt_len, 128), seed=1)   # warm-up
    rows = [_measure(llm, b, args.decodes, args.prompts, args.prompt_len, seed=0) for b in budgets]
    pick = choose(rows, args.tpot_slo_ms)
    online = None
    if args.tpot_slo_ms is not None:        # the same stress with the online SLO-aware budget, for comparison
        sched = llm.engine.core.scheduler
        sched.tpot_slo_s = args.tpot_slo_ms / 1000
        online = _measure(llm, max(budgets), args.decodes, args.prompts, args.prompt_len, seed=0)
        online["budget"] = f"online {args.tpot_slo_ms:g} ms"
        sched.tpot_slo_s = None
    if args.json:
        print(json.dumps({"rows": rows, "online": online, "budget": pick and pick["budget"]}))
        return 0
    print(f"{'budget':>16} {'steps':>6} {'TPOT median ms':>15} {'TPOT p99 ms':>12} {'prefill tok/s':>14}")
    for r in rows + ([online] if online else []):
        print(f"{r['budget']:>16} {r['steps']:>6} {r['tpot_median_ms']:>15.1f} {r['tpot_p99_ms']:>12.1f} "
              f"{r['prefill_tok_s']:>14.0f}")
    if pick is None:
        print(f"no budget meets TPOT p99 <= {args.tpot_slo_ms:g} ms with {args.decodes} decodes: use fewer "
              "--max-num-seqs, or --tpot-slo-ms to follow the target online")
        return 1
    why = f"TPOT p99 <= {args.tpot_slo_ms:g} ms" if args.tpot_slo_ms else "prefill throughput within 10% of the best"
    print(f"recommended: --max-num-batched-tokens {pick['budget']}   ({why})")
    return 0
