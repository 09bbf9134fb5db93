"""Run one benchmark on two versions of kvflow side by side: a base commit and the working tree.

The base commit is checked out as a git worktree (benchmarks/results/ab-<rev>); each round runs the
benchmark once against each tree, alternating the order, with PYTHONPATH pointing at that tree, so that
both versions see the same machine state as nearly as a shared machine allows. The benchmark script
itself is the working tree's, so the workload is identical. Every run's output is printed under a label
and kept in benchmarks/results/.

    .venv/bin/python benchmarks/ab.py --base 2c4be85 --rounds 2 -- benchmarks/throughput.py --systems kvflow
    .venv/bin/python benchmarks/ab.py --base 2c4be85 -- benchmarks/decode.py --systems bf16,int4 --runs 3
    .venv/bin/python benchmarks/ab.py --base 2c4be85 -- benchmarks/serve.py --systems kvflow
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


def run(label: str, tree: str, cmd: list[str], log: str) -> int:
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"\n===== {label}: {' '.join(cmd)} (kvflow from {tree})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the base commit (a git revision)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the benchmark script and its arguments")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the benchmark command after --")
    trees = {"base": worktree(args.base), "head": ROOT}
    name = os.path.splitext(os.path.basename(cmd[0]))[0]
    failed = 0
    for r in range(args.rounds):
        order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
        for label in order:
            log = os.path.join(RESULTS, f"ab-{name}-{label}-{r}.txt")
            failed += run(f"{label} round {r}", trees[label], cmd, log) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
