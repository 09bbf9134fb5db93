"""How fast the simulator runs at cluster scale: R replicas, N requests, wall time and simulated requests/s
(issue 17's target: 1,000 replicas and 1,000,000 requests in under 10 minutes on a 2-core machine).

    python benchmarks/sim_scale.py --replicas 1000 --requests 1000000 --rate-per-replica 200 --workers 4
    python benchmarks/sim_scale.py --replicas 100 --requests 20000 --profile   # cProfile's top entries

The workload is `chat` at a rate that keeps the replicas about 60% busy (so steps batch as in a loaded
fleet), the router least-load (or --router), each replica with --num-kv-blocks blocks (a GPU-sized default
would allocate a BlockPool of 32k blocks per replica). `machine_python_ms`: kvflow/sim/probe.py's pure-Python
loop before and after the run (the simulator is interpreter bound; on a shared machine the loop's time moves by
tens of percent between runs, and the wall time with it). `cpu_s`: the CPU time of this process and of the
workers, and `cores_busy` their sum over the wall time (on two cores, what the barriers and the parent's
serial phase leave idle is 2 minus it)."""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import sys
import time

from kvflow.config import EngineConfig
from kvflow.sim.cluster import simulate
from kvflow.sim.cost_model import load_profile
from kvflow.sim.parallel import simulate_parallel
from kvflow.sim.probe import probe
from kvflow.sim.workload import WorkloadSpec, workload_requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=100)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rate-per-replica", type=float, default=40.0, help="req/s per replica (h100, chat: ~60%% busy)")
    p.add_argument("--router", default="least-load")
    p.add_argument("--hardware", default="h100")
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1, help="processes (kvflow/sim/parallel.py; default 1: one process)")
    p.add_argument("--sync-ms", type=float, default=1.0, help="with --workers > 1: the router's load staleness bound")
    p.add_argument("--profile", action="store_true", help="print cProfile's top 25 by own time (this process)")
    args = p.parse_args()
    config = EngineConfig.from_kwargs(replicas=args.replicas, router=args.router, num_kv_blocks=args.num_kv_blocks)
    workload = WorkloadSpec(kind="chat", n=args.requests, rate=args.rate_per_replica * args.replicas, seed=0)
    prof = cProfile.Profile() if args.profile else None
    before = probe()          # the machine's own speed (no kvflow code): shared cores change it by tens of percent
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = own.ru_utime + own.ru_stime      # (the workers are this run's only children)
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    if args.workers > 1:
        sim, rec = simulate_parallel(config, load_profile(args.hardware), workload_requests(workload), args.workers,
                                     args.sync_ms / 1e3, keep_itl=1000)
    else:
        sim, rec = simulate(config, load_profile(args.hardware), workload_requests(workload), keep_itl=1000)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"parent": round(own.ru_utime + own.ru_stime - cpu0, 1),
           "workers": round(workers.ru_utime + workers.ru_stime, 1)}
    s = rec.summary(None, sim)
    out = {"replicas": args.replicas, "requests": args.requests, "workers": args.workers, "wall_s": round(wall, 1),
           "requests_per_wall_s": round(args.requests / wall, 1), "steps": s["num_steps"],
           "simulated_s": round(rec.end_s, 1), "completed": s["completed"],
           "mean_utilisation": round(s["mean_utilisation"], 3), "median_ttft_ms": round(s["median_ttft_ms"], 2),
           "cpu_s": cpu, "cores_busy": round((cpu["parent"] + cpu["workers"]) / wall, 2),
           "machine_python_ms": [before["python_ms"], probe()["python_ms"]]}   # before and after (probe.py)
    print(json.dumps(out))
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
