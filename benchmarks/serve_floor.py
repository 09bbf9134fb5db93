"""Ray Serve's own floor for a scale from zero: an autoscaled deployment with an empty constructor and a
method that returns at once (nothing of kvflow), min_replicas 0, the same autoscaling settings as kvflow's
serverless app. Each round waits until Serve has stopped every replica, then sends one request and times

  decide   request sent -> Serve's controller logs "Upscaling ... from 0 to 1"
  start    -> the replica's constructor runs (a new Ray worker process with Serve's replica code imported)
  answer   -> the answer is back (the replica marked running, the handle told, the call made)

Whatever kvflow's serverless replica adds (attaching a warm engine worker: 10-20 ms; its first token) comes on
top of this, so it bounds the warm-pool start to first token from below (issue 16's target: under 1 s).

    .venv/bin/python benchmarks/serve_floor.py --rounds 5
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import time
from datetime import datetime

UPSCALE = re.compile(r"^\w+ (\S+ \S+) controller .*Upscaling Deployment\(name='Floor'.* from 0 to 1")


def controller_upscales(log_dir: str) -> list[float]:
    """The times of the controller's "from 0 to 1" decisions, from its log."""
    times = []
    for path in glob.glob(os.path.join(log_dir, "serve", "controller_*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = UPSCALE.match(line)
                if m:
                    times.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return sorted(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args()
    import ray
    from ray import serve

    from kvflow.cluster.options import ServerlessOptions
    from kvflow.serverless.app import autoscaling_config
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    opts = ServerlessOptions(serverless=True, min_replicas=0, max_replicas=1, scale_down_idle_s=2.0)

    @serve.deployment(name="Floor", autoscaling_config=autoscaling_config(opts), ray_actor_options={"num_cpus": 0})
    class Floor:
        def __init__(self):
            self.constructed_at = time.time()

        async def __call__(self) -> float:
            return self.constructed_at

    rounds = []
    try:
        handle = serve.run(Floor.bind(), name="serve-floor", route_prefix=None)
        for _ in range(args.rounds):
            while sum(serve.status().applications["serve-floor"].deployments["Floor"].replica_states.values()):
                time.sleep(0.2)
            time.sleep(1.0)
            t0 = time.time()
            constructed = handle.remote().result(timeout_s=60)
            rounds.append({"sent": t0, "start_s": constructed - t0, "answer_s": time.time() - t0})
        log_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
    finally:
        serve.shutdown()
        ray.shutdown()
    for r in rounds:
        decided = [t for t in controller_upscales(log_dir) if t >= r["sent"] - 0.01]
        r["decide_s"] = decided[0] - r["sent"] if decided else None
    for i, r in enumerate(rounds):
        print(f"round {i}: decide {r['decide_s']:.3f} s, constructor at {r['start_s']:.3f} s, "
              f"answer at {r['answer_s']:.3f} s")
    answers = [r["answer_s"] for r in rounds]
    print(f"answer from zero replicas: median {statistics.median(answers):.3f} s, min {min(answers):.3f} s, "
          f"max {max(answers):.3f} s ({len(answers)} rounds, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"rounds": rounds, "cpu_count": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
