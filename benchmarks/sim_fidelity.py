"""Does `kvflow sim` reproduce a measured kvflow run on this machine? Calibrate the cost model on a fresh
engine (kvflow.sim.calibrate), serve a workload with that engine in real time, simulate the same workload
with the fresh profile, and compare bench serve's metrics (targets: throughput and median TTFT/TPOT within
10%, p99 within 20%). Prints the load average before and after: the machines here are shared, and another
process on the cores slows the real run (not the simulated one).

    python benchmarks/sim_fidelity.py                                   # ~2-3 minutes on 2 cores
    python benchmarks/sim_fidelity.py --workload random:n=40,rate=2,input=256,output=32,range=0.5 --threads 2
    python benchmarks/sim_fidelity.py --workload wcpu --max-num-seqs 32           # W-CPU, offline (~4 minutes)
    python benchmarks/sim_fidelity.py --replicas 2 --load 0.5 --workload random:n=64,input=200,output=24,range=0.5,seed=42

Measured (AMD EPYC, 2 shared cores, load average 4.4 -> 3.4, --threads 1, the default workload): throughput
+1.1%, median TTFT 0.9%, median TPOT 2.3%, p99 TTFT 15.2%, p99 TPOT 13.6% (all within target). With
--threads 2 at load 3.4 -> 4.7 the real run was ~10x slower than its own calibration (OpenMP threads stalled by other
processes): not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from kvflow.sim.cost_model import HardwareProfile
from kvflow.sim.fidelity import ENSEMBLE, fidelity
from kvflow.sim.workload import parse_workload

DEFAULT_WORKLOAD = "random:n=64,rate=1.5,input=200,output=24,range=0.5,seed=0"


def wcpu_trace(folder: str) -> str:
    """W-CPU (32 requests from random.Random(0), EOS ignored: every request makes its output length) as a trace
    file in `folder` of requests all arriving at t = 0: the offline batch kvflow's throughput benchmark serves."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.throughput import make_workload
    from kvflow.sim.workload import SimRequest, write_trace
    path = os.path.join(folder, "wcpu.jsonl")
    write_trace([SimRequest(0.0, prompt, max_tokens) for prompt, max_tokens in make_workload()], path)
    return path


def summary(metrics: dict) -> str:
    """`metrics` (compare_metrics) in one line: the targets met, and each metric's error."""
    met = sum(row["ok"] for row in metrics.values())
    return f"{met} of {len(metrics)} (" + ", ".join(
        f"{key} {row['rel_error']:.1%}{'' if row['ok'] else ' MISS'}" for key, row in metrics.items()) + ")"


def corun_words(profile: dict) -> str:
    """A profile's co-run figures in words (HardwareProfile.corun_part says what they multiply)."""
    prompts = "".join(f"; a prefill beside a {other} {x:.3f}x" for other, x in profile["corun_by_kind"].get(
        "prefill", {}).items())
    if profile.get("corun_part") == "fixed":
        row = profile["corun_by_kind"].get("decode", {})
        return (f"a decode beside the other's decode takes {row.get('decode', profile['corun_slowdown']) - 1:.3f}x "
                f"the fixed cost ({profile['params']['coef'][0] * 1e3:.2f} ms) longer, beside a prefill "
                f"{row.get('prefill', profile['corun_slowdown']) - 1:.3f}x, whatever its rows{prompts}")
    figures = "".join(f"; a {own} beside a {other} {x:.3f}x" for own, row in profile["corun_by_kind"].items()
                      for other, x in row.items())
    return f"{profile['corun_slowdown']:.3f}x slower than alone{figures}"


def engine_settings(items: list[str]) -> dict:
    """--engine KEY=VALUE items: the value as JSON where it parses (numbers, true/false), else as text."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--engine expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default=DEFAULT_WORKLOAD,
                   help="KIND:key=value,... (kvflow/sim/workload.py), a trace file, or wcpu: BENCHMARKS.md's W-CPU, "
                        "offline (then --max-num-seqs 32 serves it all at once, as the throughput benchmark)")
    p.add_argument("--threads", type=int, default=1,
                   help="the engine's compute threads (default 1: with 2 threads on 2 shared cores another process "
                        "stalls both at every barrier, and the real run is up to 10x slower than its calibration)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="measured calibration passes")
    p.add_argument("--replicas", type=int, default=1,
                   help="engines serving the workload, each on its own thread and core, behind --router")
    p.add_argument("--router", default="round-robin",
                   help="the fleet's router (default round-robin: it places each request by its arrival order, so "
                        "the real runs and the simulation place alike; least-load's ties go by which step ended "
                        "first, and the real system does not reproduce its own placement from run to run)")
    p.add_argument("--served", choices=("auto", "on", "off"), default="auto",
                   help="fit the model again with the steps of the workload's next seed, served just before the real "
                        "run (auto, the default: on for a generated workload, off for one engine on a trace file)")
    p.add_argument("--real-runs", type=int, default=3,
                   help="serve the workload this many times (default 3) and compare with each metric's median over "
                        "the runs (their own spread is printed: the real system's run-to-run variation)")
    p.add_argument("--load", type=float, default=None,
                   help="serve the workload at this fraction of the fleet's capacity (the requests/s its simulation "
                        "on the fresh calibration serves with every request at once) instead of its own rate: the "
                        "same distance from saturation however fast the machine is that day")
    p.add_argument("--bracket", action="store_true",
                   help="serve the held-out workload again after the real runs and also report the simulation on a fit "
                        "of both served runs' steps (before and after the real runs: the machine drifts)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="another engine setting for the real engine and the simulation alike (EngineConfig's field "
                        "names; repeatable), e.g. scheduling_policy=sjf, length_predictor=FILE")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--save-profile", default=None, help="write the fresh calibration (a hardware profile) here")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvflow-fidelity-") as tmp:     # (wcpu's trace lives there)
        workload = wcpu_trace(tmp) if args.workload == "wcpu" else parse_workload(args.workload)
        settings = {"num_threads": args.threads, "max_num_seqs": args.max_num_seqs, **engine_settings(args.engine)}
        result = fidelity(settings, workload,
                          repeats=args.repeats, replicas=args.replicas, router=args.router,
                          served={"auto": None, "on": True, "off": False}[args.served], real_runs=args.real_runs,
                          load=args.load, bracket=args.bracket)
    result.update(workload=args.workload, wall_s=round(time.perf_counter() - t0, 1), load_avg_before=load0,
                  load_avg_after=os.getloadavg()[0], cpu_count=os.cpu_count())
    tables = [("", result["metrics"])]
    if "load" in result:
        print(f"capacity {result['capacity_rps']:.3f} req/s (simulated on the fresh calibration); served at "
              f"{result['load']:.0%} of it: {result['rate']:.3f} req/s")
    if "real_runs" in result:
        print(f"{args.real_runs} real runs (the real column below: their median); each run's metrics, and the "
              f"farthest run from the median:")
        for key in result["real_spread"]:
            print(f"  {key:<20}" + "".join(f"{r[key]:>10.2f}" for r in result["real_runs"])
                  + f"   {result['real_spread'][key]:>7.1%}")
    print("each real run's median band (its 45th and 55th percentiles over its median: where a twentieth of the "
          "requests crossing it would put it): " + "; ".join(
              ", ".join(f"{k.split('_')[1].upper()} {lo:+.1%}/{hi:+.1%}" for k, (lo, hi) in band.items())
              for band in result["real_median_band"]))
    corr = result["per_request_corr"]
    print("request by request, the correlation of each request's TTFT / TPOT with each real run's: " + "; ".join(
        f"{name} " + ", ".join("-" if c is None else f"{c['ttft']}/{c['tpot']}" for c in runs)
        for name, runs in [("the simulation", corr["simulation"]), ("in-sample", corr.get("insample", [])),
                           ("the real runs with each other", corr["real"])] if runs))
    m = result["machine"]
    print("the machine itself (kvflow/sim/probe.py, no kvflow code; before the calibration, then after each real "
          "run): " + "; ".join(f"{k} " + ", ".join(f"{p[k]:.2f}" for p in m["probes"]) + f" (spread {v:.1%})"
                               for k, v in m["spread"].items()))
    if "metrics_alone" in result:      # several replicas: with the co-run slowdown (above) and without
        prof = result["profile"]
        tables[0] = (f"the simulation, {args.replicas} replicas on one machine (calibrated stepping at once: "
                     f"{corun_words(prof)}):", result["metrics"])
        tables.append(("the simulation with each replica as if alone on its machine:", result["metrics_alone"]))
    if "metrics_corun_step" in result:  # the whole-step co-run figures of the same served steps
        prof = result["profile"]
        step = {**prof, "corun_part": "step", "corun_slowdown": prof["fit"]["served_corun_slowdown"],
                "corun_by_kind": prof["fit"]["served_corun_by_kind_step"]}
        tables.append((f"the simulation with the co-run figures on each step's whole time instead "
                       f"({corun_words(step)}):", result["metrics_corun_step"]))
    if "metrics_plan" in result:       # the plan's fit, before fitting it again with served steps
        fit = result["profile"]["fit"]
        tables.append((f"the simulation with the plan's fit alone (served steps took "
                       f"{fit['served_over_plan_fit_decode']:.3f}x it (decodes), "
                       f"{fit['served_over_plan_fit_prefill']:.3f}x (steps with a prefill)"
                       + (f"; co-run slowdown {fit['plan_corun_slowdown']:.3f} from the plan, "
                          f"{fit['served_corun_slowdown']:.3f} served" if "served_corun_slowdown" in fit else "")
                       + "):", result["metrics_plan"]))
    if "metrics_insample" in result:   # fitted with the real runs' own steps: the simulator's error alone
        tables.append(("the simulation fitted with the real runs' own steps (in-sample, not a prediction: the "
                       "simulator's own error, without the machine's drift since the calibration):",
                       result["metrics_insample"]))
    if "metrics_bracket" in result:    # fitted with the held-out workload served before and after the real runs
        tables.append(("the simulation fitted with the held-out workload served before and after the real runs:",
                       result["metrics_bracket"]))
    if "metrics_placed" in result:     # several replicas: also with each request where the real run put it
        tables.append((f"the simulation with the real run's placement (its own router placed "
                       f"{result['placed_alike']} of {workload.n} requests alike):", result["metrics_placed"]))
        tables.append((f"the median of {ENSEMBLE} simulations with step times "
                       f"jittered by sigma {result['step_noise']} (the calibration's residuals); their ranges: "
                       + ", ".join(f"{k} {lo:.1f}-{hi:.1f}" for k, (lo, hi) in result["ensemble_range"].items()),
                       result["metrics_ensemble"]))
    for title, metrics in tables:
        if title:
            print(title)
        print(f"{'metric':<20}{'real':>10}{'sim':>10}{'error':>8}{'target':>8}")
        for key, row in metrics.items():
            print(f"{key:<20}{row['real']:>10.2f}{row['sim']:>10.2f}{row['rel_error']:>8.1%}{row['target']:>8.0%}"
                  f"{'' if row['ok'] else '  MISS'}")
    print(f"calibration fit: {result['profile']['fit']}; load average {load0:.2f} -> {result['load_avg_after']:.2f} "
          f"on {os.cpu_count()} cores; the engine's CPU time / wall time while stepping "
          f"{result['real_cpu_share']:.2f} (threads {args.threads}); the real run's steps took "
          f"{result['real_step_ratio']:.2f}x their calibrated time; {result['wall_s']} s")
    if "real_step_ratio_overlap" in result:
        o = result["real_step_ratio_overlap"]
        print(f"the real steps against the calibration alone: {o['alone']:.3f}x while the other replica was idle "
              f"({o['steps']['alone']} steps), {o['beside']:.3f}x while it stepped too ({o['steps']['beside']})")
    for k, run in enumerate(result.get("runs", ())):     # each real run alone: the machine's speed in it
        line = (f"real run {k + 1} (its steps {run['step_ratio']:.2f}x the calibration): the simulation "
                + summary(run["metrics"]))
        if "metrics_insample" in run:
            line += "; fitted with this run's own steps " + summary(run["metrics_insample"])
        print(line)
    if args.save_profile:
        HardwareProfile(**{**result["profile"], "name": "cpu-fidelity"}).save(args.save_profile)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
