"""`kvflow sim` (simulate a workload on a configuration), `kvflow sim calibrate` (fit this machine's profile)
and `kvflow sim compare` (the survey's runtimes on one workload). docs/sim.md has the details."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

DEFAULT_GOODPUT = ["ttft:2000", "tpot:200"]


def default_hardware() -> str:
    from kvflow.sim.cost_model import list_profiles
    return "cpu" if "cpu" in list_profiles() else "h100"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from kvflow.sim.search import DEFAULT_BUDGET
    from kvflow.entrypoints.cli_args import add_engine_args
    p = subparsers.add_parser("sim", help="simulate kvflow's real scheduler, KV manager and router at cluster scale",
                              description="Run a workload through kvflow's real Scheduler, KVCacheManager and "
                                          "router with step times from a hardware profile; print bench serve's "
                                          "table. Subcommands: calibrate, compare (docs/sim.md).")
    _common(p)
    p.add_argument("--out-json", default=None, help="write the result (summary, timeline, config) here")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    p.add_argument("--step-noise", type=float, default=0.0,
                   help="sigma of a log-normal factor on each step's time, per replica, seeded by --seed "
                        "(default 0: the profile's times; docs/sim.md)")
    p.add_argument("--spec-acceptance", type=_acceptance, default=None, metavar="A[,A...]",
                   help="with --speculative-config: a draft token's chance to be accepted, one for every draft "
                        "position or one per position (the first draft's, the second's given the first was "
                        "accepted, ...) (default: the hardware profile's, measured by `kvflow sim calibrate "
                        "--workload` with --speculative-config; else 0.7)")
    p.add_argument("--spec-propose-rate", type=_propose_rate, default=None, metavar="R[,R...]",
                   help="with --speculative-config: the chance that a request asked to draft gets drafts (an n-gram "
                        "proposer finds none without a match), one for every request or a list of the requests' "
                        "own (each request takes one, all equally likely) (default: the hardware profile's, "
                        "measured with --spec-acceptance's; else 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes to split the replicas over (colocated replicas only; default 1: one process)")
    p.add_argument("--sync-ms", type=float, default=None,
                   help="with --workers: the router sees loads up to this old (default 1 ms; docs/sim.md)")
    add_engine_args(p)
    p.set_defaults(func=cmd_sim)
    sub = p.add_subparsers(dest="sim_command", metavar="SIM", required=False)
    c = sub.add_parser("calibrate", help="fit this machine's cost model from measured engine steps",
                       description="Run the real engine on a plan of batches, time every step and fit the "
                                   "linear cost model; write a hardware profile (JSON). Takes about a minute.")
    c.add_argument("--out", required=True, help="the profile to write (JSON; a name in kvflow/sim/profiles "
                                                 "makes it built in)")
    c.add_argument("--name", default=None, help="the profile's name (default: device-model-dtype)")
    c.add_argument("--repeats", type=int, default=1, help="measured passes of the plan (default 1)")
    c.add_argument("--together", type=int, default=1, metavar="N",
                   help="measure N engines stepping at once, each on its own core: a profile for N replicas "
                        "sharing this machine (default 1: one engine alone)")
    c.add_argument("--workload", default=None, metavar="W",
                   help="then serve workload W (KIND:key=value,... or a trace file; the engines of --together behind "
                        "--router) in real time and fit the model again with its steps (docs/sim.md)")
    c.add_argument("--roofline", default=None, metavar="GPU",
                   help="instead of measuring: write GPU's roofline profile (h100, h200, a100) for the default model")
    add_engine_args(c)
    c.set_defaults(func=cmd_calibrate)
    m = sub.add_parser("compare", help="the survey's runtimes (presets) on one workload and hardware budget",
                       description="Simulate every preset on the same workload and --gpus devices at each of "
                                   "--rates; print one table and plot goodput against the request rate.")
    _common(m)
    m.add_argument("--presets", default="orca,vllm,sarathi,sglang,fastserve,preble,distserve,tetriinfer,splitwise,"
                                        "mooncake,deepflow", help="comma-separated presets (kvflow's own row is added)")
    m.add_argument("--gpus", type=int, default=2, help="devices per runtime (default 2)")
    m.add_argument("--rates", default=None, help="comma-separated request rates (default: the workload's)")
    m.add_argument("--search-budget", type=int, default=DEFAULT_BUDGET,
                   help=f"configurations to simulate in search of kvflow's best for this workload and these devices, "
                        f"the last row (default {DEFAULT_BUDGET}; 0: no search)")
    m.add_argument("--out-json", default=None, help="write the comparison here")
    m.add_argument("--plot", default=None, help="write the goodput-vs-load PNG here (needs matplotlib)")
    add_engine_args(m)
    m.set_defaults(func=cmd_compare)
    return p


def _numbers(text: str, check, what: str) -> float | list[float]:
    try:
        values = [float(x) for x in text.split(",")]
        check(values)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or a comma-separated list of them ({what}), "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _acceptance(text: str) -> float | list[float]:
    """--spec-acceptance: "0.7" or "0.4,0.8,0.9" (one per draft position)."""
    from kvflow.sim.cost_model import acceptance_by_position
    return _numbers(text, acceptance_by_position, "one per draft position")


def _propose_rate(text: str) -> float | list[float]:
    """--spec-propose-rate: "0.6" or "0,0.3,0.9,1" (the requests' own)."""
    from kvflow.sim.cost_model import propose_rates
    return _numbers(text, propose_rates, "the requests' own")


def _common(p) -> None:
    p.add_argument("--workload", default=None, help="KIND:key=value,... (random, chat, multitenant; keys n, rate, "
                                                    "burstiness, bursts, input, output, range, tenants, turns, "
                                                    "seed) or a trace file")
    p.add_argument("--hardware", default=None, help="a profile name in kvflow/sim/profiles (cpu, h100, h200, "
                                                    "a100) or a profile file (default: cpu if calibrated, else h100)")
    p.add_argument("--goodput", nargs="+", default=DEFAULT_GOODPUT, metavar="KEY:MS",
                   help="SLOs for goodput: ttft:MS tpot:MS e2el:MS (default: ttft:2000 tpot:200)")
    p.add_argument("--keep-itl", type=int, default=20000, help="per-token gaps kept for the first N requests")


def _setup(args):
    from kvflow.bench.serve import parse_goodput
    from kvflow.sim.cost_model import load_profile
    from kvflow.sim.workload import parse_workload
    if not args.workload:
        raise ValueError("--workload is required (e.g. chat:n=500,rate=8 or a trace file)")
    return parse_workload(args.workload), load_profile(args.hardware or default_hardware()), parse_goodput(args.goodput)


def _explicit_engine_kwargs(args) -> dict:
    """Only the engine flags given on the command line (with their preset, when one is)."""
    from kvflow.entrypoints.cli_args import engine_kwargs
    kw = engine_kwargs(argparse.Namespace(**{**vars(args), "preset": args.preset or "kvflow"}))
    if not args.preset:
        kw.pop("preset")
    return kw


def cmd_sim(args) -> int:
    from kvflow.config import EngineConfig
    from kvflow.sim.cluster import simulate
    from kvflow.sim.report import format_table, plot_sim, save_json
    from kvflow.sim.workload import workload_requests
    workload, profile, goodput = _setup(args)
    config = EngineConfig.from_kwargs(**_explicit_engine_kwargs(args))
    t0 = time.perf_counter()
    requests = workload_requests(workload, config.cache.block_size)
    sim_options = {"step_noise": args.step_noise}
    if args.spec_acceptance is not None:
        sim_options["spec_acceptance"] = args.spec_acceptance
    if args.spec_propose_rate is not None:
        sim_options["spec_propose_rate"] = args.spec_propose_rate
    if args.workers > 1 or args.sync_ms is not None:      # each worker checks its replicas' blocks
        from kvflow.sim.parallel import SYNC_S, simulate_parallel
        sync_s = SYNC_S if args.sync_ms is None else args.sync_ms / 1e3
        sim, rec = simulate_parallel(config, profile, requests, args.workers, sync_s, keep_itl=args.keep_itl,
                                     **sim_options)
    else:
        sim, rec = simulate(config, profile, requests, keep_itl=args.keep_itl, **sim_options)
        for r in sim.replicas():
            r.check()
    wall = time.perf_counter() - t0
    summary = rec.summary(goodput, sim)
    print(f"simulated {rec.num_added} requests on {profile.name} ({profile.source.split(':')[0]}) in {wall:.1f} s "
          f"wall", file=sys.stderr)
    print(format_table(summary))
    result = {"config": {"engine": config.to_dict(), "workload": args.workload, "hardware": profile.name,
                         "goodput": goodput}, "summary": summary, "timeline": rec.timeline(), "wall_s": wall}
    if args.out_json:
        save_json(result, args.out_json)
    if args.plot:
        print(f"plot: {plot_sim(result, rec.results(), args.plot, args.workload)}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from kvflow.sim.cost_model import roofline_profile
    if args.roofline:
        profile = roofline_profile(args.roofline)
    else:
        from kvflow.sim.calibrate import calibrate
        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        if args.together < 1:
            raise ValueError(f"--together must be at least 1, got {args.together}")
        from kvflow.sim.workload import parse_workload
        workload = parse_workload(args.workload) if args.workload else None
        kw = _explicit_engine_kwargs(args)
        profile = calibrate(kw, args.name, repeats=args.repeats, together=args.together, workload=workload,
                            router=kw.get("router") or "least-load")
    if args.name:
        profile.name = args.name
    profile.save(args.out)
    print(json.dumps({"out": os.path.abspath(args.out), "name": profile.name, "params": profile.params,
                      "fit": profile.fit, "cold_start_s": profile.cold_start_s}, indent=1))
    return 0


def cmd_compare(args) -> int:
    from kvflow.sim.compare import compare, format_compare, plot_compare
    from kvflow.sim.report import save_json
    workload, profile, goodput = _setup(args)
    presets = [p for p in args.presets.split(",") if p]
    if "kvflow" not in presets:
        presets.append("kvflow")
    rates = None
    if args.rates:
        try:
            rates = [math.inf if r == "inf" else float(r) for r in args.rates.split(",")]
        except ValueError:
            raise ValueError(f"--rates must be comma-separated numbers, got {args.rates!r}") from None
    overrides = _explicit_engine_kwargs(argparse.Namespace(**{**vars(args), "preset": None}))
    if args.search_budget < 0:
        raise ValueError(f"--search-budget must be a non-negative number of configurations, got {args.search_budget}")
    result = compare(presets, workload, profile, args.gpus, rates, goodput, overrides, args.search_budget)
    print(format_compare(result))
    if args.out_json:
        save_json(result, args.out_json)
    if args.plot:
        print(f"plot: {plot_compare(result, args.plot)}", file=sys.stderr)
    return 0
