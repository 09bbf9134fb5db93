"""Run one benchmark on two versions of kvflow side by side: a base commit and the working tree.

The base commit is checked out as a git worktree (benchmarks/results/ab-<rev>); each round runs the
benchmark once against each tree, alternating the order, with PYTHONPATH pointing at that tree, so that
both versions see the same machine state as nearly as a shared machine allows. The benchmark script
itself is the working tree's, so the workload is identical. Every run's output is printed under a label
and kept in benchmarks/results/.

    .venv/bin/python benchmarks/ab.py --base 2c4be85 --rounds 2 -- benchmarks/throughput.py --systems kvflow
    .venv/bin/python benchmarks/ab.py --base 2c4be85 -- benchmarks/decode.py --systems bf16,int4 --runs 3
    .venv/bin/python benchmarks/ab.py --base 2c4be85 -- benchmarks/serve.py --systems kvflow

With --together (a benchmark that runs on one core: sim_scale.py without --workers), the two versions run at
the same time, each pinned to its own core, and swap cores from round to round: both see the same moment of
a machine whose speed drifts by tens of percent within minutes, so a few percent between them shows.

    .venv/bin/python benchmarks/ab.py --base b36998f --together --rounds 4 -- benchmarks/sim_scale.py --replicas 100 --requests 30000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def worktree(rev: str) -> str:
    sha = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", rev], text=True).strip()
    path = os.path.join(RESULTS, f"ab-{sha}")
    if not os.path.isdir(path):
        os.makedirs(RESULTS, exist_ok=True)
        subprocess.check_call(["git", "-C", ROOT, "worktree", "add", "--detach", path, sha])
    return path


def start(label: str, tree: str, cmd: list[str], core: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    where = f", core {core}" if core is not None else ""
    print(f"\n===== {label}: {' '.join(cmd)} (kvflow from {tree}{where})", flush=True)
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=pin)


def run(label: str, tree: str, cmd: list[str], log: str) -> int:
    proc = start(label, tree, cmd)
    with open(log, "w") as f:
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
    return proc.wait()


def run_together(labels: list[str], trees: dict, cmd: list[str], logs: list[str]) -> int:
    """Both versions at once, the first on core 0 and the second on core 1; their outputs after both end."""
    procs = [start(label, trees[label.split()[0]], cmd, core) for core, label in enumerate(labels)]
    outs = [p.communicate()[0] for p in procs]
    failed = 0
    for label, out, log, p in zip(labels, outs, logs, procs):
        print(f"----- {label}:\n{out}", end="", flush=True)
        with open(log, "w") as f:
            f.write(out)
        failed += p.returncode != 0
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the base commit (a git revision)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--together", action="store_true",
                    help="run both versions at once, each on its own core, swapping cores each round")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the benchmark script and its arguments")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the benchmark command after --")
    trees = {"base": worktree(args.base), "head": ROOT}
    name = os.path.splitext(os.path.basename(cmd[0]))[0]
    failed = 0
    if args.together and len(os.sched_getaffinity(0)) < 2:
        ap.error("--together needs two cores")
    for r in range(args.rounds):
        order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
        logs = [os.path.join(RESULTS, f"ab-{name}-{label}-{r}.txt") for label in order]
        if args.together:
            failed += run_together([f"{label} round {r}" for label in order], trees, cmd, logs)
            continue
        for label, log in zip(order, logs):
            failed += run(f"{label} round {r}", trees[label], cmd, log) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
