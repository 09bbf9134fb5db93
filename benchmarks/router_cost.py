"""The router's own cost: every policy of kvflow/cluster/routers/ against a fake fleet, no model, no Ray.

Workload (random.Random(--seed)): --tenants system prompts of 200-2,000 tokens (popularity ~ 1/rank),
--users users each bound to a tenant, multi-turn sessions (a new conversation with probability 0.3, else the
next turn of a recent one: 20-200 new user tokens, 50-400 assistant tokens, restarted past 8,000 tokens).
Block hashes are the engine's `hash_block` chain, block size 16. Fleet: each replica has --kv-blocks KV
blocks; a request stays in flight for an exponential number of arrivals (mean replicas x --concurrency);
the client's counts (num_assigned, outstanding_tokens) change as requests are routed and finish, and
the reported ones (num_running, num_waiting, kv_cache_usage) every 50 arrivals, as if piggybacked on
step outputs. After --warm untimed requests (which fill cache-aware's prefix index), each of --requests
is timed: route() plus the on_finished() calls of the requests finishing at that arrival. The prebuilt
workload is moved out of the garbage collector's way (gc.freeze) so that its pauses do not land on the router.

    .venv/bin/python benchmarks/router_cost.py                               # 64 and 1,000 replicas
    .venv/bin/python benchmarks/router_cost.py --warm 2000 --requests 1000 --out /tmp/router.json
"""
from __future__ import annotations

import argparse
import gc
import heapq
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, make_router  # noqa: E402
from kvflow.memory.kv_cache_manager import hash_block  # noqa: E402
from kvflow.platform import capabilities, describe  # noqa: E402

BS = 16


def workload(n: int, tenants: int, users: int, seed: int) -> list[RouteRequest]:
    rng = random.Random(seed)
    systems = [[rng.randrange(32000) for _ in range(rng.randint(200, 2000))] for _ in range(tenants)]
    tenant_of = rng.choices(range(tenants), weights=[1 / (k + 1) for k in range(tenants)], k=users)
    sessions: list[list] = []          # [user, tokens, hashes]
    out = []
    for i in range(n):
        if not sessions or rng.random() < 0.3:
            u = rng.randrange(users)
            sessions.append([f"user{u}", list(systems[tenant_of[u]]), []])
            sessions = sessions[-500:]
            s = sessions[-1]
        else:
            s = rng.choice(sessions[-200:])
        s[1] += [rng.randrange(32000) for _ in range(rng.randint(20, 200))]
        tokens, hashes = s[1], s[2]
        for b in range(len(hashes), len(tokens) // BS):
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[b * BS:(b + 1) * BS]))
        max_tokens = rng.randint(50, 400)
        out.append(RouteRequest(f"r{i}", list(hashes), len(tokens), max_tokens, user=s[0]))
        s[1] += [rng.randrange(32000) for _ in range(max_tokens)]
        if len(s[1]) > 8000:
            sessions.remove(s)
    return out


def run(policy: str, replicas: int, reqs: list[RouteRequest], warm: int, args) -> dict:
    rng = random.Random(args.seed + 1)
    router = make_router(policy, replicas)
    loads = [ReplicaLoad(i, num_kv_blocks=args.kv_blocks) for i in range(replicas)]
    heap: list = []                      # (finish arrival, request id, replica, tokens)
    mean_life = replicas * args.concurrency
    times = []
    t0 = time.perf_counter()
    for k, req in enumerate(reqs):
        if k % 50 == 0:                  # the replicas' reports
            for ld in loads:
                ld.num_running = min(ld.num_assigned, 64)
                ld.num_waiting = ld.num_assigned - ld.num_running
                ld.kv_cache_usage = min(1.0, ld.num_running * 100 / args.kv_blocks)
        start = time.perf_counter_ns()
        r = router.route(req, loads)
        done = []
        while heap and heap[0][0] <= k:
            done.append(heapq.heappop(heap))
            router.on_finished(done[-1][1], done[-1][2])
        elapsed = time.perf_counter_ns() - start
        if k >= warm:
            times.append(elapsed / 1000)
        for _, _, j, tok in done:
            loads[j].num_assigned -= 1
            loads[j].outstanding_tokens -= tok
        tok = req.num_prompt_tokens + req.max_tokens
        loads[r].num_assigned += 1
        loads[r].outstanding_tokens += tok
        heapq.heappush(heap, (k + 1 + int(rng.expovariate(1 / mean_life)), req.request_id, r, tok))
    times.sort()
    row = {"policy": policy, "replicas": replicas, "mean_us": sum(times) / len(times),
           "p99_us": times[min(len(times) - 1, int(0.99 * len(times)))], "wall_s": time.perf_counter() - t0}
    row.update(state(router))
    if hasattr(router, "stats"):
        row["decisions"] = {k: v for k, v in router.stats().items() if k in ("hits", "balanced", "replicated")}
    return row


def state(router) -> dict:
    """Entries and bytes the router keeps (deep size of its containers; the hash ints counted once)."""
    size = sys.getsizeof
    idx = getattr(router, "index", None)
    if idx is not None:
        b = size(idx.holders) + sum(size(k) + size(v) for k, v in idx.holders.items())
        b += sum(size(od) for od in idx.lru) + size(router._window) + size(router._pair_count) * 2
        return {"entries": idx.stats()["entries"], "bytes": b}
    sessions = getattr(router, "sessions", None)
    if sessions is not None:
        b = size(sessions) + sum(size(u) + size(v) for u, v in sessions.items())
        return {"entries": len(sessions), "bytes": b}
    return {"entries": 0, "bytes": size(router) + (2500 if hasattr(router, "rng") else 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default=",".join(ROUTERS))
    ap.add_argument("--replicas", default="64,1000")
    ap.add_argument("--state-replicas", default="100,1000", help="fleets whose router state is reported")
    ap.add_argument("--warm", type=int, default=20000, help="untimed requests first (a warm prefix index)")
    ap.add_argument("--requests", type=int, default=5000, help="timed requests")
    ap.add_argument("--tenants", type=int, default=40)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--kv-blocks", type=int, default=8192, help="each replica's KV cache, in blocks of 16")
    ap.add_argument("--concurrency", type=float, default=16, help="mean requests in flight per replica")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    print(f"cpu: {describe(with_torch=False)}; python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    reqs = workload(args.warm + args.requests, args.tenants, args.users, args.seed)
    gc.collect()
    gc.freeze()          # the workload is not the router's: keep the collector from walking it each time
    blocks = sum(len(r.block_hashes) for r in reqs) / len(reqs)
    print(f"workload: {len(reqs)} requests ({args.warm} warm), {blocks:.0f} prompt blocks each on average, "
          f"{args.tenants} system prompts, {args.users} users; built in {time.perf_counter() - t:.1f} s\n")
    rows = [run(p, int(n), reqs, args.warm, args) for n in args.replicas.split(",")
            for p in args.policies.split(",")]
    print("| policy | replicas | mean µs | p99 µs | state entries | state MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['replicas']} | {r['mean_us']:.1f} | {r['p99_us']:.1f} | {r['entries']:,} "
              f"| {r['bytes'] / 2**20:.1f} |")
    print("\nstate kept (after the warm-up and timed requests; bound = every replica's cache model full):")
    states = []
    for n in map(int, args.state_replicas.split(",")):
        for p in ("cache-aware", "session"):
            if p not in args.policies.split(","):
                continue
            r = next((x for x in rows if x["policy"] == p and x["replicas"] == n), None) or run(p, n, reqs,
                                                                                                args.warm, args)
            per = r["bytes"] / max(1, r["entries"])
            bound = n * args.kv_blocks * 2 * per if p == "cache-aware" else 100_000 * per
            states.append({"policy": p, "replicas": n, "entries": r["entries"], "bytes": r["bytes"],
                           "bound_bytes": bound})
            print(f"  {p}, {n} replicas: {r['entries']:,} entries, {r['bytes'] / 2**20:.1f} MB "
                  f"({per:.0f} B/entry); bound {bound / 2**30:.2f} GB")
    print("messages per request: 0 sent by the router (loads arrive piggybacked on each replica's step "
          "outputs; the client sends the request itself, 1 message, to the chosen replica)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"cpu": capabilities(with_torch=False), "args": vars(args), "rows": rows,
                       "state": states, "router_messages_per_request": 0}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
