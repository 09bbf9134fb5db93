"""kvflow's simulator beside Vidur (Microsoft's LLM inference simulator, MLSys 2024) on the same workload and
hardware: both results and the simulation speed of each (issue 17).

    .venv/bin/python benchmarks/sim_vidur.py                       # 2,000 requests at 1, 2 and 4 req/s
    .venv/bin/python benchmarks/sim_vidur.py --requests 200 --qps 2 # smoke test

Vidur runs in its own virtualenv (--vidur-python, default /work/vidur-venv/bin/python) from a source tree with
its profiling data (--vidur-src, default /work/vidur-src), as a subprocess; kvflow's simulator runs in this
process. Nothing of Vidur is imported here. Setting up Vidur (benchmarks/README.md has the details):

    python3 -m venv /work/vidur-venv
    /work/vidur-venv/bin/pip install -c benchmarks/vidur-constraints.txt numpy pandas scikit-learn wandb \\
        kaleido ddsketch plotly_express matplotlib seaborn fasteners
    # /work/vidur-src: microsoft/vidur at 7d47513 (its code and data/), plus the A100 attention profile of
    # Llama-2-70B at TP2 from its release commit acb95f6 (data/profiling/a100/attention.csv) copied to
    # data/profiling/compute/a100/meta-llama/Llama-2-70b-hf/attention.csv (see the README for why)

The configuration both can express (what could not be matched is listed in the README and in the JSON):

  model/hardware  Llama-2-70B, tensor parallel 2 on A100 80GB. Vidur: its profiled operator times
                  (random-forest predictor trained on data/profiling/compute/a100/... and the A100 pairwise
                  NVLink all-reduce profile). kvflow: roofline_profile("a100", model=<one TP2 shard of
                  Llama-2-70B>): half the parameters, 32 of 64 query heads and 4 of 8 KV heads per device,
                  80 layers (a TP2 replica is two devices stepping in lock-step on halves).
  scheduler       Sarathi (chunked prefill, token budget 512 per step counting decodes, at most 128 requests
                  running, FCFS, preemption by recompute): Vidur `sarathi` with batch_size_cap 128 and
                  chunk_size 512; kvflow preset `sarathi` with max_num_seqs 128, max_num_batched_tokens 512,
                  preemption_mode recompute, no prefix cache.
  KV cache        the same number of 16-token blocks on both: the blocks kvflow's roofline profile gives one
                  device (90% of the memory the weights leave), passed to Vidur as num_blocks.
  workload        one trace, generated here with kvflow's `random` generator (Poisson arrivals at --qps,
                  prompt lengths uniform in [256, 768], output lengths uniform in [64, 192] by default),
                  written as a kvflow trace (JSON lines) and as Vidur's trace_replay CSV (arrived_at,
                  num_prefill_tokens, num_decode_tokens): identical arrivals and lengths. Outputs end by length
                  on both (Vidur's num_decode_tokens counts the token the prefill produces, as kvflow's
                  output_len).

Metrics are computed here the same way for both from per-request (arrival, TTFT, E2E, output length): TTFT,
TPOT = (E2E - TTFT) / (output - 1), E2E, throughput = completed / (last completion - 0). Speed: simulated
requests per wall second. For Vidur, the wall time of its simulation loop alone (Simulator.run, timed by a
small driver that calls Vidur's own main steps) and of the whole subprocess (interpreter start, config, loading
its cached predictor, the loop, writing its metrics); its predictor training (first run only, cached after)
is timed once on its own. For kvflow, kvflow.sim.cluster.simulate in this process (trace read included).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

from kvflow.config import EngineConfig
from kvflow.sim.cluster import simulate
from kvflow.sim.cost_model import roofline_profile
from kvflow.sim.replica import engine_spec
from kvflow.sim.workload import WorkloadSpec, read_trace, workload_requests, write_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "sim_vidur.json")

# Llama-2-70B (68,976,648,192 parameters; 80 layers, hidden 8192, 64 query / 8 KV heads of 128) and the share
# of it one device holds at tensor parallel 2 (vLLM shards the embeddings, attention and MLP alike)
LLAMA2_70B_PARAMS = 68_976_648_192
TP = 2
LLAMA2_70B_TP2_SHARD = dict(name=f"Llama-2-70b-hf-tp{TP}-shard", num_params=LLAMA2_70B_PARAMS // TP, num_layers=80,
                            hidden_size=8192, num_heads=64 // TP, num_kv_heads=8 // TP, head_dim=128,
                            max_model_len=4096)
BLOCK_SIZE = 16

# Vidur's own main (vidur/main.py), with the predictor build (Simulator's constructor) and the event loop
# (Simulator.run) timed apart; Vidur writes its metrics at exit (atexit), which the subprocess wall includes
VIDUR_DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
from vidur.config import SimulationConfig
from vidur.simulator import Simulator
from vidur.utils.random import set_seeds
config = SimulationConfig.create_from_cli_args()
set_seeds(config.seed)
t1 = time.perf_counter()
simulator = Simulator(config)
t2 = time.perf_counter()
simulator.run()
t3 = time.perf_counter()
print("SIM_VIDUR_TIMES " + json.dumps({"import_s": t1 - t0, "init_s": t2 - t1, "run_s": t3 - t2}), flush=True)
"""


def percentile(xs: list[float], q: float) -> float:
    """numpy's default (linear) percentile, as kvflow's bench metrics."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def metrics(rows: list[tuple[float, int, int, float, float]]) -> dict:
    """rows: (arrival_s, prompt_len, output_len, ttft_s, e2e_s) of the completed requests."""
    ttft = [r[3] for r in rows]
    tpot = [(r[4] - r[3]) / (r[2] - 1) for r in rows if r[2] > 1]
    e2e = [r[4] for r in rows]
    end = max((r[0] + r[4] for r in rows), default=0.0)
    ms = 1e3
    return {"completed": len(rows), "duration_s": end,
            "request_throughput": len(rows) / end if end else 0.0,
            "output_throughput": sum(r[2] for r in rows) / end if end else 0.0,
            "median_ttft_ms": ms * percentile(ttft, 50), "p99_ttft_ms": ms * percentile(ttft, 99),
            "median_tpot_ms": ms * percentile(tpot, 50), "p99_tpot_ms": ms * percentile(tpot, 99),
            "median_e2e_ms": ms * percentile(e2e, 50), "p99_e2e_ms": ms * percentile(e2e, 99)}


# ---- the workload ---------------------------------------------------------------------------------------------

def make_traces(args, qps: float, work: str) -> tuple[str, str, list]:
    spec = WorkloadSpec(kind="random", n=args.requests, rate=qps, input=args.input, output=args.output,
                        range=args.range, seed=args.seed)
    reqs = list(workload_requests(spec))
    tag = f"n{args.requests}-qps{qps:g}"
    kv_trace = os.path.join(work, f"trace-{tag}.jsonl")
    write_trace(reqs, kv_trace, block_size=BLOCK_SIZE)
    vidur_trace = os.path.join(work, f"trace-{tag}.csv")
    with open(vidur_trace, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        for r in reqs:
            w.writerow([repr(r.arrival_s), len(r.prompt_token_ids), r.output_len])
    return kv_trace, vidur_trace, [(r.arrival_s, len(r.prompt_token_ids), r.output_len) for r in reqs]


# ---- kvflow ---------------------------------------------------------------------------------------------------

def kvflow_config(args) -> EngineConfig:
    kw = dict(max_num_seqs=args.batch_cap, max_num_batched_tokens=args.chunk, preemption_mode="recompute",
              enable_prefix_caching=False, block_size=BLOCK_SIZE, max_model_len=4096)
    if args.num_blocks:
        kw["num_kv_blocks"] = args.num_blocks
    return EngineConfig.from_kwargs(preset="sarathi", **kw)


def run_kvflow(args, profile, kv_trace: str) -> dict:
    config = kvflow_config(args)
    t0 = time.perf_counter()
    sim, rec = simulate(config, profile, read_trace(kv_trace), keep_itl=args.requests)
    wall = time.perf_counter() - t0
    rows = [(r.start_time, r.prompt_len, r.output_tokens, r.ttft, r.e2e) for r in rec.results() if r.success]
    out = metrics(rows)
    s = rec.summary(None, sim)
    out.update(failed=s["failed"], preemptions=s["preemptions"], num_steps=s["num_steps"],
               mean_utilisation=s["mean_utilisation"], median_itl_ms=s["median_itl_ms"], p99_itl_ms=s["p99_itl_ms"],
               mean_step_ms=1e3 * s["mean_utilisation"] * s["replica_seconds"] / max(s["num_steps"], 1),
               wall_s=wall, sim_requests_per_wall_s=args.requests / wall, loop_s=wall,
               sim_requests_per_loop_s=args.requests / wall)
    return out


# ---- Vidur ----------------------------------------------------------------------------------------------------

def vidur_cmd(args, trace: str, out_dir: str, num_blocks: int) -> list[str]:
    rf = "--random_forrest_execution_time_predictor_config_"
    cmd = [args.vidur_python, "-c", VIDUR_DRIVER,
           "--seed", "42",
           "--replica_config_device", "a100", "--replica_config_model_name", "meta-llama/Llama-2-70b-hf",
           "--replica_config_tensor_parallel_size", str(TP), "--replica_config_num_pipeline_stages", "1",
           "--replica_config_network_device", "a100_pairwise_nvlink", "--cluster_config_num_replicas", "1",
           "--request_generator_config_type", "trace_replay", "--trace_request_generator_config_trace_file", trace,
           "--trace_request_generator_config_max_tokens", "4096",
           "--replica_scheduler_config_type", "sarathi",
           "--sarathi_scheduler_config_batch_size_cap", str(args.batch_cap),
           "--sarathi_scheduler_config_chunk_size", str(args.chunk),
           "--sarathi_scheduler_config_block_size", str(BLOCK_SIZE),
           "--sarathi_scheduler_config_num_blocks", str(num_blocks),
           "--execution_time_predictor_config_type", "random_forrest",
           rf + "num_training_job_threads", "1",
           "--metrics_config_output_dir", out_dir, "--metrics_config_cache_dir", args.vidur_cache,
           "--no-metrics_config_store_plots", "--no-metrics_config_enable_chrome_trace",
           "--no-metrics_config_write_json_trace"]
    if not args.vidur_full_grid:        # one point of Vidur's default grid: 3 fits per operator, not 270
        cmd += [rf + "num_estimators", "250", rf + "max_depth", "32", rf + "min_samples_split", "2",
                rf + "k_fold_cv_splits", "2"]
    return cmd


def run_vidur(args, trace: str, arrivals: list, num_blocks: int, work: str, tag: str) -> dict:
    out_dir = os.path.join(work, f"vidur-out-{tag}")
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(vidur_cmd(args, trace, out_dir, num_blocks), cwd=args.vidur_src, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"Vidur failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    times = next(json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines()
                 if line.startswith("SIM_VIDUR_TIMES "))
    runs = sorted(glob.glob(os.path.join(out_dir, "*", "request_metrics.csv")))
    if not runs:
        raise RuntimeError(f"Vidur wrote no request_metrics.csv under {out_dir}")
    rows, restarts = [], 0
    with open(runs[-1], encoding="utf-8") as f:
        for row in csv.DictReader(f):
            i = int(float(row["Request Id"]))
            arrival, n_in, n_out = arrivals[i]
            assert int(float(row["request_num_prefill_tokens"])) == n_in, "Vidur's prompt lengths differ"
            assert int(float(row["request_num_decode_tokens"])) == n_out, "Vidur's output lengths differ"
            rows.append((arrival, n_in, n_out, float(row["prefill_e2e_time"]), float(row["request_e2e_time"])))
            restarts += int(float(row["request_num_restarts"]))
    out = metrics(rows)
    out.update(failed=len(arrivals) - len(rows), preemptions=restarts, **vidur_batch_times(os.path.dirname(runs[-1])),
               wall_s=wall, loop_s=times["run_s"], predictor_load_s=times["init_s"],
               sim_requests_per_wall_s=args.requests / wall, sim_requests_per_loop_s=args.requests / times["run_s"])
    return out


def vidur_batch_times(run_dir: str) -> dict:
    """Vidur's batch (step) execution time at the 0th, 50th and 100th percentile (its plots/ CDF sketch)."""
    path = os.path.join(run_dir, "plots", "batch_execution_time.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cdf = {round(float(r["cdf"]), 2): float(r["batch_execution_time"]) for r in csv.DictReader(f)}
    return {"step_ms_min": 1e3 * cdf.get(0.0, math.nan), "step_ms_median": 1e3 * cdf.get(0.5, math.nan),
            "step_ms_max": 1e3 * cdf.get(1.0, math.nan)}


def train_vidur(args, work: str, num_blocks: int) -> float:
    """Vidur's predictor training on a 16-request trace (cached in --vidur-cache for the measured runs)."""
    trace = os.path.join(work, "trace-warmup.csv")
    with open(trace, "w", encoding="utf-8") as f:
        f.write("arrived_at,num_prefill_tokens,num_decode_tokens\n")
        for i in range(16):
            f.write(f"{i * 0.5},{args.input},{args.output}\n")
    out_dir = os.path.join(work, "vidur-out-warmup")
    t0 = time.perf_counter()
    p = subprocess.run(vidur_cmd(args, trace, out_dir, num_blocks), cwd=args.vidur_src, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"Vidur failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


# ---- the report -----------------------------------------------------------------------------------------------

COLUMNS = (("median_ttft_ms", "TTFT p50 ms", "{:.1f}"), ("p99_ttft_ms", "TTFT p99 ms", "{:.1f}"),
           ("median_tpot_ms", "TPOT p50 ms", "{:.2f}"), ("p99_tpot_ms", "TPOT p99 ms", "{:.2f}"),
           ("median_e2e_ms", "E2E p50 ms", "{:.0f}"), ("request_throughput", "req/s", "{:.3f}"),
           ("output_throughput", "out tok/s", "{:.0f}"), ("preemptions", "preempt", "{}"),
           ("sim_requests_per_wall_s", "sim req/wall s", "{:.0f}"), ("wall_s", "wall s", "{:.2f}"),
           ("sim_requests_per_loop_s", "sim req/loop s", "{:.0f}"), ("loop_s", "loop s", "{:.2f}"))


def table(rows: list[dict]) -> str:
    head = ["QPS", "simulator"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['qps']:g}", r["simulator"]] + [fmt.format(r[k]) for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--qps", default="1,2,4", help="comma-separated Poisson arrival rates (req/s)")
    p.add_argument("--input", type=int, default=512, help="mean prompt length (uniform in input x (1 +- range))")
    p.add_argument("--output", type=int, default=128, help="mean output length (uniform in output x (1 +- range))")
    p.add_argument("--range", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-cap", type=int, default=128, help="requests running at most (both)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per step (Sarathi chunk size, both)")
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks (both; 0: what kvflow's profile gives)")
    p.add_argument("--vidur-python", default="/work/vidur-venv/bin/python")
    p.add_argument("--vidur-src", default="/work/vidur-src", help="Vidur's source tree with data/ (its cwd)")
    p.add_argument("--vidur-cache", default=None, help="Vidur's predictor cache (default: <work>/vidur-cache)")
    p.add_argument("--vidur-full-grid", action="store_true",
                   help="Vidur's default random-forest grid search (27 points x 10 folds; ~45 min on 2 cores)")
    p.add_argument("--work", default="/tmp/kvflow-sim-vidur", help="traces and Vidur's output")
    p.add_argument("--json", default=RESULTS)
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    args.vidur_cache = os.path.abspath(args.vidur_cache or os.path.join(args.work, "vidur-cache"))
    for path in (args.vidur_python, os.path.join(args.vidur_src, "vidur", "main.py"),
                 os.path.join(args.vidur_src, "data/profiling/compute/a100/meta-llama/Llama-2-70b-hf/attention.csv")):
        if not os.path.exists(path):
            print(f"missing {path}: see the module docstring for Vidur's setup", file=sys.stderr)
            return 2

    profile = roofline_profile("a100", model=LLAMA2_70B_TP2_SHARD)
    num_blocks = args.num_blocks or engine_spec(kvflow_config(args), profile).num_kv_blocks
    args.num_blocks = num_blocks
    cost = profile.cost_model()
    roof = {f"decode_batch_{b}_ctx_{c}_ms": 1e3 * cost.step_seconds(b, 0, b * c, 0.0)
            for b, c in ((1, 600), (32, 600), (128, 600))}
    roof["prefill_512_ms"] = 1e3 * cost.step_seconds(0, 512, 0, 512 * 256.0)
    print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), load "
          f"{os.getloadavg()[0]:.2f}; kvflow profile {profile.name}: {num_blocks} KV blocks of {BLOCK_SIZE}; "
          f"roofline step ms: " + ", ".join(f"{k} {v:.1f}" for k, v in roof.items()), file=sys.stderr)

    cached = os.path.isdir(args.vidur_cache) and any(f.endswith(".pkl") for f in os.listdir(args.vidur_cache))
    t_train = train_vidur(args, args.work, num_blocks)
    print(f"Vidur predictor {'load (cached)' if cached else 'training'} + 16-request run: {t_train:.1f} s wall",
          file=sys.stderr)

    rows = []
    for qps in [float(q) for q in args.qps.split(",") if q]:
        kv_trace, vidur_trace, arrivals = make_traces(args, qps, args.work)
        v = run_vidur(args, vidur_trace, arrivals, num_blocks, args.work, f"qps{qps:g}")
        k = run_kvflow(args, profile, kv_trace)
        rows += [{"qps": qps, "simulator": "Vidur", **v}, {"qps": qps, "simulator": "kvflow", **k}]
        print(f"qps {qps:g}: Vidur loop {v['loop_s']:.2f} s (subprocess {v['wall_s']:.2f} s, step ms min/p50/max "
              f"{v.get('step_ms_min', math.nan):.1f}/{v.get('step_ms_median', math.nan):.1f}/"
              f"{v.get('step_ms_max', math.nan):.1f}); kvflow {k['wall_s']:.2f} s ({k['num_steps']} steps, mean "
              f"{k['mean_step_ms']:.1f} ms)", file=sys.stderr)
    print(table(rows))
    result = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "load_average_at_end": os.getloadavg()[0]},
        "workload": {"requests": args.requests, "qps": args.qps, "prompt_len": [int(args.input * (1 - args.range)),
                     int(args.input * (1 + args.range))], "output_len": [int(args.output * (1 - args.range)),
                     int(args.output * (1 + args.range))], "arrivals": "Poisson", "seed": args.seed},
        "config": {"model": "meta-llama/Llama-2-70b-hf", "tensor_parallel": TP, "gpu": "a100 (80GB)",
                   "scheduler": "sarathi", "batch_cap": args.batch_cap, "chunk_size": args.chunk,
                   "block_size": BLOCK_SIZE, "num_kv_blocks": num_blocks, "preemption": "recompute",
                   "kvflow_profile": {"name": profile.name, "source": profile.source, "model": profile.model,
                                      "params": profile.params, "roofline_step_ms": roof},
                   "vidur": {"src": args.vidur_src, "commit": _read(os.path.join(args.vidur_src, "VIDUR_COMMIT")),
                             "predictor": "random_forrest" + ("" if args.vidur_full_grid else
                                                              " (n_estimators 250, max_depth 32, "
                                                              "min_samples_split 2, 2-fold CV)"),
                             "network_device": "a100_pairwise_nvlink",
                             "predictor_training_or_load_s": t_train, "cache_was_warm": cached}},
        "rows": rows,
        "speed_note": ("sim_requests_per_wall_s: requests / wall seconds. Vidur: its whole subprocess (interpreter, "
                       "config, loading its cached predictor, the loop, writing metrics); loop_s and "
                       "sim_requests_per_loop_s: Simulator.run alone. kvflow: simulate() in-process, trace read "
                       "included (loop_s = wall_s)."),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
