"""Online serving, side by side: kvflow's OpenAI server vs llama-cpp-python's, same GGUF, same workload.

For each system in turn the script starts its server on a free port, waits for GET /v1/models, runs
`kvflow bench serve`'s benchmark (kvflow/bench/serve.py) on the same request list, and stops the server:
  kvflow    <python> -m kvflow serve --model GGUF --host 127.0.0.1 --port P [--kvflow-args ...]
  llamacpp  <python> -m llama_cpp.server --model GGUF --n_threads T --n_threads_batch T --n_ctx N
            --logits_all False --interrupt_requests False --verbose False
            (n_ctx holds the longest prompt + output; logits_all False computes only the last position's
            logits, as kvflow does; interrupt_requests False stops the server from cutting a running
            stream when the next request arrives; requests add "repeat_penalty": 1.0, since the server's
            default of 1.1 would change greedy decoding; llama-cpp-python serves one request at a time)
Output lengths are exact on both (ignore_eos plus a logit_bias on EOS; see kvflow/bench/serve.py).

Run (from the repository root):
    .venv/bin/python benchmarks/serve.py                               # both systems, 64 random prompts
    .venv/bin/python benchmarks/serve.py --systems llamacpp --quick    # smoke test: 8 short prompts
    .venv/bin/python benchmarks/serve.py --request-rate 4 --max-concurrency 16 --dataset-name chat

Prints one Markdown table (a row per system) and writes serve_<system>.json, serve_<system>.png,
serve_<system>.server.log and serve_summary.json under --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time

import httpx

from kvflow.bench.metrics import machine_header, plot_result, save_result
from kvflow.bench.serve import BenchConfig, build_dataset, load_tokenizer, run_benchmark
from kvflow.platform import capabilities

SYSTEMS = ("kvflow", "llamacpp")
EXTRA_BODY = {"kvflow": {}, "llamacpp": {"repeat_penalty": 1.0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(system: str, model: str, port: int, args, n_ctx: int) -> list[str]:
    if system == "kvflow":
        return [sys.executable, "-m", "kvflow", "serve", "--model", model, "--host", "127.0.0.1",
                "--port", str(port), *shlex.split(args.kvflow_args)]
    t = str(args.threads)
    return [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(n_ctx), "--logits_all", "False",
            "--interrupt_requests", "False", "--verbose", "False"]


def wait_ready(proc: subprocess.Popen, url: str, log_path: str, timeout: float) -> None:
    """Poll GET /v1/models until it answers; raise with the server's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-3000:]
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout:.0f} s"
            raise RuntimeError(f"server {why}; log tail:\n{tail}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_system(system: str, model: str, specs, tok, args, n_ctx: int) -> dict:
    """Start the system's server, benchmark it, stop it; returns the benchmark result."""
    port = free_port()
    cmd = server_command(system, model, port, args, n_ctx)
    log_path = os.path.join(args.out, f"serve_{system}.server.log")
    print(f"[{system}] starting: {shlex.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        t = time.perf_counter()
        wait_ready(proc, f"http://127.0.0.1:{port}", log_path, args.startup_timeout)
        print(f"[{system}] ready in {time.perf_counter() - t:.1f} s; benchmarking ...", flush=True)
        cfg = BenchConfig(base_url=f"http://127.0.0.1:{port}", endpoint=args.endpoint,
                          dataset_name=args.dataset_name, num_prompts=len(specs), seed=args.seed,
                          random_input_len=args.input_len, random_output_len=args.output_len,
                          random_range_ratio=args.range_ratio, request_rate=args.request_rate,
                          burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                          warmup=args.warmup, extra_body=EXTRA_BODY[system], tokenizer=model)
        result = asyncio.run(run_benchmark(cfg, specs=specs, tok=tok, log=lambda s: None))
    finally:
        stop(proc)
    result["server_command"] = cmd
    return result


def table(rows: list[dict]) -> str:
    head = ("| system | completed | req/s | output tok/s | TTFT mean | TTFT median | TTFT p99 "
            "| TPOT mean | TPOT median | TPOT p99 | E2E median |")
    lines = [head, "|---|" + "---:|" * 10, ]
    for r in rows:
        s = r.get("summary")
        if s is None:
            lines.append(f"| {r['system']} | failed: {r['error'].splitlines()[0][:80]} |" + " |" * 9)
            continue
        ms = [s[f"{k}_ms"] for k in ("mean_ttft", "median_ttft", "p99_ttft", "mean_tpot", "median_tpot",
                                     "p99_tpot", "median_e2el")]
        lines.append(f"| {r['system']} | {s['completed']}/{s['completed'] + s['failed']} "
                     f"| {s['request_throughput']:.2f} | {s['output_throughput']:.1f} | "
                     + " | ".join(f"{v:.1f}" for v in ms) + " |")
    return "\n".join(lines) + "\n\n(latencies in ms)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of kvflow,llamacpp")
    ap.add_argument("--model", default=None, help="GGUF file (default: kvflow's default SmolLM2-135M-Instruct)")
    ap.add_argument("--dataset-name", default="random", help="random or chat")
    ap.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256, help="random dataset input length")
    ap.add_argument("--output-len", type=int, default=64, help="random dataset output length")
    ap.add_argument("--range-ratio", type=float, default=0.0, help="random dataset length range ratio")
    ap.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf)")
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 prompts of 64 input and 16 output tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp n_threads and n_threads_batch")
    ap.add_argument("--kvflow-args", default="", help="extra `kvflow serve` flags, e.g. '--max-num-seqs 32'")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for each server")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.input_len, args.output_len = 8, 64, 16
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"--systems: unknown system {s!r} (choose from {','.join(SYSTEMS)})")
    os.makedirs(args.out, exist_ok=True)

    from kvflow.config import default_model_path
    model = args.model or default_model_path()
    tok = load_tokenizer(model)
    probe = BenchConfig(endpoint=args.endpoint, dataset_name=args.dataset_name, num_prompts=args.num_prompts,
                        random_input_len=args.input_len, random_output_len=args.output_len,
                        random_range_ratio=args.range_ratio, seed=args.seed, request_rate=args.request_rate,
                        burstiness=args.burstiness, max_concurrency=args.max_concurrency, warmup=args.warmup)
    try:
        probe.validate()
    except ValueError as e:
        ap.error(str(e))
    specs = build_dataset(probe, tok)
    longest = max(s.prompt_len + s.output_len for s in specs)
    n_ctx = max(2048, -(-(longest + 64) // 512) * 512)

    print(machine_header())
    print(f"model: {os.path.basename(model)}")
    print(f"workload: {args.dataset_name} on {args.endpoint}{' (--quick)' if args.quick else ''}: "
          f"{len(specs)} requests, {sum(s.prompt_len for s in specs)} prompt tokens, "
          f"{sum(s.output_len for s in specs)} output tokens requested, rate {args.request_rate} req/s, "
          f"max concurrency {args.max_concurrency}\n", flush=True)

    rows = []
    for system in systems:
        try:
            result = run_system(system, model, specs, tok, args, n_ctx)
        except Exception as e:  # noqa: BLE001 - report it and go on with the next system
            print(f"[{system}] FAILED: {e}", flush=True)
            rows.append({"system": system, "error": str(e)})
            continue
        save_result(result, os.path.join(args.out, f"serve_{system}.json"))
        plot_result(result, os.path.join(args.out, f"serve_{system}.png"), title=system)
        s = result["summary"]
        print(f"[{system}] {s['completed']} completed, {s['failed']} failed, "
              f"{s['output_throughput']:.1f} output tok/s", flush=True)
        rows.append({"system": system, "summary": s, "server_command": result["server_command"]})

    print("\n" + table(rows))
    with open(os.path.join(args.out, "serve_summary.json"), "w", encoding="utf-8") as f:
        json.dump({"workload": {**vars(args), "request_rate": str(args.request_rate), "model": model,
                                "requests": len(specs)},
                   "cpu": capabilities(with_torch=False), "rows": rows}, f, indent=1)
    print(f"\nresults in {args.out}/")
    return 0 if all("summary" in r and r["summary"]["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
