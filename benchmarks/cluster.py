"""Router policies side by side: `kvflow serve --replicas 2` behind each policy of kvflow/cluster/routers/ on a
multi-tenant, multi-turn workload with Poisson arrivals.

For each policy in turn the script starts a fresh server on 127.0.0.1 (its own local Ray cluster):
    <python> -m kvflow serve --model GGUF --host 127.0.0.1 --port P --replicas R --replica-cpus C --router POLICY
waits until /v1/models answers and /health lists every replica healthy, sends 2 x replicas short warm-up
requests (unrelated to the workload, no `user`), reads /metrics, runs `kvflow bench serve`'s benchmark
(kvflow/bench/serve.py, no further warm-up) on the same request list, reads /metrics again once the replicas'
counters have settled, and stops the server by its pid (SIGTERM, then SIGKILL). The Ray processes the server
started (its descendants, recorded while it ran) must be gone after it exits; any left are stopped by pid.

Workload (kvflow/bench/datasets.py `sample_multitenant`, the same as `kvflow bench serve --dataset-name
multitenant`): --tenants system prompts of 300-600 tokens; --num-sessions sessions of --turns turns (tenants
dealt to sessions in turn); turn k = the tenant's system prompt + the session's k-1 earlier turns (user
message, fixed synthetic answer) + a new user message; the OpenAI `user` field is the session id; every
request asks for --output-len tokens (ignore_eos). A session's turns are sent in order, spread over the run;
arrivals are Poisson at --request-rate.

Per policy, from /metrics deltas over the measured run: prefix-cache hit rate (prompt tokens found / looked
up, all replicas), each replica's share of the prompt tokens looked up and its own hit rate, and the router's
mean cost per request (router_seconds / router_decisions); from the client: TTFT, TPOT, E2E, throughput, and
median TTFT of first turns vs later turns.

Run (from the repository root):
    .venv/bin/python benchmarks/cluster.py                       # all six policies, 24 sessions x 4 turns
    .venv/bin/python benchmarks/cluster.py --quick               # smoke test: 2 policies, 8 requests
    .venv/bin/python benchmarks/cluster.py --policies round-robin,cache-aware --request-rate 3

Prints one Markdown table (a row per policy) and writes cluster_<policy>.json (every request),
cluster_<policy>.server.log and cluster_summary.json (config and per-policy results) under --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvflow.bench.datasets import sample_multitenant  # noqa: E402
from kvflow.bench.metrics import machine_header, save_result  # noqa: E402
from kvflow.bench.serve import BenchConfig, load_tokenizer, run_benchmark  # noqa: E402
from kvflow.platform import capabilities, describe  # noqa: E402

POLICIES = ("round-robin", "least-load", "power-of-two", "cache-aware", "predicted-load", "session")
GOAL = 1.5          # the goal: cache-aware's median TTFT at least 1.5x lower than round-robin's


# ---- server process ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, policy: str, args) -> list[str]:
    return [sys.executable, "-m", "kvflow", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--replicas", str(args.replicas), "--replica-cpus", str(args.replica_cpus), "--router", policy,
            *shlex.split(args.kvflow_args)]


def _log_tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-3000:]


def wait_ready(proc: subprocess.Popen, url: str, log_path: str, timeout: float, replicas: int) -> None:
    """Poll /v1/models, then /health until it lists `replicas` healthy replicas; raise with the server's log
    tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout:.0f} s"
            raise RuntimeError(f"server {why}; log tail:\n{_log_tail(log_path)}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                h = httpx.get(url + "/health", timeout=2)
                reps = h.json().get("replicas") or [] if h.status_code == 200 else []
                if sum(1 for r in reps if r.get("healthy")) >= replicas:
                    return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (non-zombie) process, from /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            table[int(d)] = (int(fields[1]), cmd)
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(pid: int) -> dict[int, str]:
    """The live descendants of `pid` (Ray's gcs_server, raylet, workers, ...): pid -> command line."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p not in out:
            out[p] = table[p][1]
            todo += children.get(p, [])
    return out


def still_alive(procs: dict[int, str]) -> dict[int, str]:
    """Those of `procs` still running with the same command line (a reused pid is not ours)."""
    table = _proc_table()
    return {p: cmd for p, cmd in procs.items() if p in table and table[p][1] == cmd}


def ray_session_processes(server_pid: int) -> dict[int, str]:
    """Live processes of the Ray cluster the server started, found by its session name in their command line
    (session_<date>_<time>_<n>_<driver pid>), in case one was re-parented out of the server's tree."""
    pattern = re.compile(rf"/session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{server_pid}(?:[/ ]|$)")
    return {p: cmd for p, (_, cmd) in _proc_table().items() if pattern.search(cmd)}


def stop(proc: subprocess.Popen, children: dict[int, str], grace: float = 30.0) -> dict:
    """Stop the server by its pid (SIGTERM, SIGKILL after `grace` s); then wait for the processes it started
    (its descendants seen while it ran, and any process of its Ray session) to go, and stop any left by pid.
    Returns what was left behind and had to be stopped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 15.0
    left = still_alive(children)
    while time.monotonic() < deadline:
        left = {**still_alive(children), **ray_session_processes(proc.pid)}
        if not left:
            break
        time.sleep(0.5)
    report = {"server_returncode": proc.returncode, "children_seen": len(children),
              "left_behind": {str(p): c[:200] for p, c in left.items()}}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in still_alive(left):
            try:
                os.kill(p, sig)
            except OSError:
                pass
        t = time.monotonic() + 5.0
        while still_alive(left) and time.monotonic() < t:
            time.sleep(0.2)
    report["still_alive"] = sorted(still_alive(left))
    return report


# ---- /metrics ----------------------------------------------------------------------------------------

def read_metrics(url: str) -> dict:
    """The figures this benchmark needs from GET /metrics: totals, router counts, per-replica counters."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", timeout=10).text
    m = {"prefix_cache_hits": 0.0, "prefix_cache_queries": 0.0, "router_decisions": 0.0, "router_seconds": 0.0,
         "replicas": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.name.removeprefix("kvflow:")
            if name.endswith("_created"):
                continue
            name = name.removesuffix("_total")
            if "replica" in s.labels and name.startswith("replica_"):
                m["replicas"].setdefault(s.labels["replica"], {})[name.removeprefix("replica_")] = s.value
            elif name in m and not s.labels.keys() - {"model_name"}:
                m[name] = s.value
    return m


def settled_metrics(url: str, decisions: float, timeout: float = 10.0) -> dict:
    """/metrics once the router counted `decisions` and the replicas' prefix counters stopped moving (their
    stats arrive with their steps, a little after the last output)."""
    deadline = time.monotonic() + timeout
    last = read_metrics(url)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        m = read_metrics(url)
        key = lambda x: [(k, v.get("prefix_cache_queries"), v.get("prefix_cache_hits"))  # noqa: E731
                         for k, v in sorted(x["replicas"].items())]
        if m["router_decisions"] >= decisions and key(m) == key(last) and \
                m["prefix_cache_queries"] == last["prefix_cache_queries"]:
            return m
        last = m
    return last


def metric_deltas(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in ("prefix_cache_hits", "prefix_cache_queries", "router_decisions",
                                          "router_seconds")}
    d["hit_rate"] = d["prefix_cache_hits"] / d["prefix_cache_queries"] if d["prefix_cache_queries"] else None
    d["router_us_per_request"] = 1e6 * d["router_seconds"] / d["router_decisions"] if d["router_decisions"] else None
    reps = {}
    for r in sorted(after["replicas"], key=int):
        a, b = after["replicas"][r], before["replicas"].get(r, {})
        q = a.get("prefix_cache_queries", 0) - b.get("prefix_cache_queries", 0)
        h = a.get("prefix_cache_hits", 0) - b.get("prefix_cache_hits", 0)
        reps[r] = {"prefix_cache_queries": q, "prefix_cache_hits": h, "hit_rate": h / q if q else None,
                   "restarts": a.get("restarts", 0) - b.get("restarts", 0), "healthy": a.get("healthy")}
    total_q = sum(v["prefix_cache_queries"] for v in reps.values())
    for v in reps.values():
        v["share_of_queries"] = v["prefix_cache_queries"] / total_q if total_q else None
    d["replicas"] = reps
    return d


# ---- one policy --------------------------------------------------------------------------------------

async def warm_up(url: str, n: int) -> None:
    """n short requests at once, unrelated to the workload (first-request costs on every replica)."""
    async with httpx.AsyncClient(timeout=300) as c:
        model = (await c.get(url + "/v1/models")).json()["data"][0]["id"]
        bodies = [{"model": model, "prompt": f"Warm-up {i}: count from one to ten.", "max_tokens": 4,
                   "temperature": 0.0} for i in range(n)]
        rs = await asyncio.gather(*(c.post(url + "/v1/completions", json=b) for b in bodies))
        for r in rs:
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request failed: HTTP {r.status_code}: {r.text[:300]}")


def turn_ttfts(specs, requests: list[dict]) -> dict:
    """Median TTFT (ms) of first turns and of later turns (a session's k-th request in the list is turn k)."""
    seen: dict[str, int] = {}
    first, later = [], []
    for spec, r in zip(specs, requests):
        seen[spec.user] = seen.get(spec.user, 0) + 1
        if r["success"]:
            (first if seen[spec.user] == 1 else later).append(1000 * r["ttft"])
    return {"first_turn_median_ttft_ms": statistics.median(first) if first else None,
            "later_turns_median_ttft_ms": statistics.median(later) if later else None,
            "first_turns": len(first), "later_turns": len(later)}


def run_policy(policy: str, model: str, specs, tok, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(model, port, policy, args)
    log_path = os.path.join(args.out, f"cluster_{policy}.server.log")
    print(f"[{policy}] starting: {shlex.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    children: dict[int, str] = {}
    stopped = None
    try:
        t = time.perf_counter()
        wait_ready(proc, url, log_path, args.startup_timeout, args.replicas)
        startup_s = time.perf_counter() - t
        children = descendants(proc.pid)
        print(f"[{policy}] ready in {startup_s:.1f} s (pid {proc.pid}, {len(children)} child processes); "
              f"warming up and benchmarking ...", flush=True)
        asyncio.run(warm_up(url, 2 * args.replicas))
        before = settled_metrics(url, 0)
        cfg = BenchConfig(base_url=url, endpoint=args.endpoint, dataset_name="multitenant", num_prompts=len(specs),
                          seed=args.seed, request_rate=args.request_rate, burstiness=1.0, warmup=0,
                          multitenant_tenants=args.tenants, multitenant_turns=args.turns,
                          multitenant_output_len=args.output_len, tokenizer=model)
        result = asyncio.run(run_benchmark(cfg, specs=specs, tok=tok, log=lambda s: None))
        after = settled_metrics(url, before["router_decisions"] + len(specs))
        children.update(descendants(proc.pid))
    finally:
        stopped = stop(proc, children)
        if stopped["left_behind"]:
            print(f"[{policy}] WARNING: {len(stopped['left_behind'])} processes of the server were left behind "
                  f"and stopped by pid: {sorted(stopped['left_behind'])}", flush=True)
        else:
            print(f"[{policy}] stopped; none of its {len(children)} child processes left", flush=True)
    result["server_command"] = cmd
    result["startup_s"] = startup_s
    result["metrics"] = metric_deltas(before, after)
    result["metrics_before"], result["metrics_after"] = before, after
    result["turns"] = turn_ttfts(specs, result["requests"])
    result["shutdown"] = stopped
    return result


# ---- report ------------------------------------------------------------------------------------------

def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    head = ("| policy | completed | prefix hit rate | TTFT median | TTFT p99 | TPOT median | TPOT p99 | E2E median "
            "| TTFT median 1st / later turns | output tok/s | req/s | router µs/req | prompt tokens per replica "
            "(hit rate) |")
    lines = [head, "|---|" + "---:|" * 11 + "---|"]
    for r in rows:
        s = r.get("summary")
        if s is None:
            lines.append(f"| {r['policy']} | failed: {r['error'].splitlines()[0][:80]} |" + " |" * 11)
            continue
        m, t = r["metrics"], r["turns"]
        split = ", ".join(f"r{k}: {_f(v['share_of_queries'], '{:.0%}')} ({_f(v['hit_rate'], '{:.0%}')})"
                          for k, v in m["replicas"].items())
        lines.append(
            f"| {r['policy']} | {s['completed']}/{s['completed'] + s['failed']} | {_f(m['hit_rate'], '{:.1%}')} "
            f"| {s['median_ttft_ms']:.0f} | {s['p99_ttft_ms']:.0f} | {s['median_tpot_ms']:.1f} "
            f"| {s['p99_tpot_ms']:.1f} | {s['median_e2el_ms']:.0f} "
            f"| {_f(t['first_turn_median_ttft_ms'], '{:.0f}')} / {_f(t['later_turns_median_ttft_ms'], '{:.0f}')} "
            f"| {s['output_throughput']:.1f} | {s['request_throughput']:.2f} "
            f"| {_f(m['router_us_per_request'], '{:.0f}')} | {split} |")
    return "\n".join(lines) + "\n\n(latencies in ms)"


def goal_line(rows: list[dict]) -> tuple[str, dict | None]:
    by = {r["policy"]: r["summary"] for r in rows if r.get("summary")}
    if "round-robin" not in by or "cache-aware" not in by:
        return "goal (cache-aware median TTFT >= 1.5x lower than round-robin's): not measured here", None
    rr, ca = by["round-robin"]["median_ttft_ms"], by["cache-aware"]["median_ttft_ms"]
    ratio = rr / ca if ca > 0 else None
    met = ratio is not None and ratio >= GOAL
    return (f"goal: cache-aware median TTFT {ca:.0f} ms vs round-robin {rr:.0f} ms: "
            f"{_f(ratio, '{:.2f}')}x lower (goal >= {GOAL}x): {'MET' if met else 'NOT met'}",
            {"round_robin_median_ttft_ms": rr, "cache_aware_median_ttft_ms": ca, "ratio": ratio, "goal": GOAL,
             "met": met})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma list of " + ",".join(POLICIES))
    ap.add_argument("--model", default=None, help="GGUF file (default: kvflow's default SmolLM2-135M-Instruct)")
    ap.add_argument("--num-sessions", type=int, default=24)
    ap.add_argument("--turns", type=int, default=4, help="turns per session")
    ap.add_argument("--tenants", type=int, default=6, help="system prompts (300-600 tokens each)")
    ap.add_argument("--request-rate", type=float, default=2.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--output-len", type=int, default=32, help="output tokens per request (ignore_eos)")
    ap.add_argument("--endpoint", default="/v1/chat/completions", help="/v1/chat/completions or /v1/completions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--kvflow-args", default="", help="extra `kvflow serve` flags")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: round-robin and cache-aware, 4 sessions x 2 turns of 2 tenants, 8 output tokens")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for each server")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cluster"))
    args = ap.parse_args()
    if args.quick:
        args.num_sessions, args.turns, args.tenants, args.output_len = 4, 2, 2, 8
        if args.policies == ",".join(POLICIES):
            args.policies = "round-robin,cache-aware"
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"--policies: unknown policy {p!r} (choose from {','.join(POLICIES)})")
    for name in ("num_sessions", "turns", "tenants", "output_len", "replicas"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.request_rate < float("inf") or args.replica_cpus <= 0:
        ap.error("--request-rate and --replica-cpus must be positive numbers")
    if args.endpoint not in ("/v1/chat/completions", "/v1/completions"):
        ap.error("--endpoint must be /v1/chat/completions or /v1/completions")
    os.makedirs(args.out, exist_ok=True)

    from kvflow.config import default_model_path
    model = args.model or default_model_path()
    tok = load_tokenizer(model)
    specs = sample_multitenant(tok, args.num_sessions, args.turns, args.tenants, args.output_len, args.seed,
                               chat=args.endpoint == "/v1/chat/completions")
    prompt_tokens = sum(s.prompt_len for s in specs)

    print(machine_header())
    print(f"model: {os.path.basename(model)}; {args.replicas} replicas x {args.replica_cpus:g} CPU")
    print(f"workload: multitenant on {args.endpoint}{' (--quick)' if args.quick else ''}: {args.tenants} tenants, "
          f"{args.num_sessions} sessions x {args.turns} turns = {len(specs)} requests, {prompt_tokens} prompt "
          f"tokens (mean {prompt_tokens / len(specs):.0f}, max {max(s.prompt_len for s in specs)}), "
          f"{args.output_len} output tokens each, Poisson {args.request_rate:g} req/s\n", flush=True)

    rows = []
    for policy in policies:
        try:
            result = run_policy(policy, model, specs, tok, args)
        except Exception as e:  # noqa: BLE001 - report it and go on with the next policy
            print(f"[{policy}] FAILED: {e}", flush=True)
            rows.append({"policy": policy, "error": str(e)})
            continue
        save_result(result, os.path.join(args.out, f"cluster_{policy}.json"))
        s, m = result["summary"], result["metrics"]
        print(f"[{policy}] {s['completed']} completed, {s['failed']} failed, median TTFT {s['median_ttft_ms']:.0f} ms, "
              f"prefix hit rate {_f(m['hit_rate'], '{:.1%}')}", flush=True)
        errors = [r["error"] for r in result["requests"] if not r["success"]]
        for e in sorted(set(errors))[:3]:
            print(f"[{policy}] failed ({errors.count(e)}x): {e}", flush=True)
        rows.append({"policy": policy, "summary": s, "metrics": m, "turns": result["turns"],
                     "startup_s": result["startup_s"], "shutdown": result["shutdown"],
                     "server_command": result["server_command"]})

    print(f"\ncpu: {describe(with_torch=False)}")
    print(table(rows))
    print(f"\noffered load: Poisson {args.request_rate:g} req/s; a policy whose req/s falls well below it could not "
          f"keep up (its queue grew over the run)")
    goal, goal_d = goal_line(rows)
    print(goal)
    summary = {"config": {**vars(args), "policies": policies, "model": model, "requests": len(specs),
                          "prompt_tokens": prompt_tokens,
                          "dataset": "multitenant (kvflow.bench.datasets.sample_multitenant)"},
               "cpu": capabilities(with_torch=False), "cpu_line": describe(with_torch=False),
               "load_average_at_end": os.getloadavg(), "goal": goal_d, "rows": rows}
    with open(os.path.join(args.out, "cluster_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"\nresults in {args.out}/")
    return 0 if rows and all("summary" in r and r["summary"]["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
