"""Does the simulator reproduce a measured run? One engine is built, calibrated (kvflow.sim.calibrate), and
then serves a workload in real time (replay.py), alone or as one of `replicas` engines behind a router;
the same workload is simulated with the fresh profile and the same engine options; both are reduced to
`kvflow bench serve`'s metrics and compared.
Targets (issue 17): throughput and median TTFT/TPOT within 10%, p99 within 20%. Imports torch (through
the engine)."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from kvflow.bench.metrics import compute_metrics, tpot
from kvflow.cluster.router import RouteRequest, Router
from kvflow.sim.calibrate import DEFAULT_PLAN, build_core, calibrate
from kvflow.sim.served import fit_served, overlap_ratios, served_profile, whole_step
from kvflow.sim.cost_model import step_ratio
from kvflow.sim.probe import probe, spread
from kvflow.sim.replay import replay, serve
from kvflow.sim.workload import WorkloadSpec, workload_requests

ENSEMBLE = 16          # jittered runs of the simulation (several replicas: ensemble())
KEYS = (("output_throughput", 0.10), ("median_ttft_ms", 0.10), ("median_tpot_ms", 0.10),
        ("p99_ttft_ms", 0.20), ("p99_tpot_ms", 0.20))


def fidelity(engine_kwargs: dict, workload: WorkloadSpec | str, plan=DEFAULT_PLAN, repeats: int = 1,
             warm: bool = True, replicas: int = 1, router: str = "round-robin", served: bool | None = None,
             real_runs: int = 1, load: float | None = None, bracket: bool = False) -> dict:
    """`workload`: generated (a WorkloadSpec) or a trace file's path. `warm`: serve the workload once unmeasured
    first (the engine's first call of each batch shape selects kernels and grows buffers, up to ~0.7 s on a
    CPU: a cold run measures that, not steady serving).
    `replicas` > 1: that many engines, each on its own thread and core, behind `router`, against the simulator's
    `replicas` and `router` on one simulated machine (calibrate's `together`: the profile's co-run slowdown);
    `metrics_alone`: the simulation without it; `metrics_corun_step`: with the served steps' co-run figures on each
    step's whole time rather than its fixed cost (corun_part). `served`: the plan's fit is then fitted again with
    the steps of the same workload with another seed, served just before the real run (served.fit_served);
    `metrics_plan`: the simulation with the plan's fit alone. By default on for a generated workload, and off for
    one engine on a trace file (served_by_default): one engine's served decodes took 1.07-1.16x the plan's fit in
    five checks, and the served fit met more targets than the plan's alone (benchmarks/README.md). `real_runs` > 1:
    the workload is served that many times, one after another, and the simulation is compared with each metric's
    median over them; `real_spread` says how far the real runs themselves fell from that median (the real system's
    own run-to-run variation: a bound below which no simulation of it can be judged), and `runs` compares the
    simulation with each run alone (each_run); `real_median_band`, each run's median_band of TTFT and TPOT (how far
    its median moves when a twentieth of the requests cross it); `per_request_corr`, the correlation of each
    request's TTFT and TPOT between the simulation (and the in-sample one) and each real run, and between the real
    runs. `load`: the workload's rate becomes this fraction of the requests/s the fleet serves at most (capacity():
    its simulation with every request at once, on the plan's fresh fit), so that the check runs at the same distance
    from saturation however fast the machine is that day (this one's speed halved from one day to the next; near
    capacity a few percent of it moves TPOT by tens). `machine`: probe.py's timings of two fixed kernels with no
    kvflow code, before the calibration and after each real run, and their spread: how far the machine itself moved
    during the check. `bracket` (with `served`): the held-out workload is served again after the real runs, and
    `metrics_bracket` is the simulation on a fit of the plan's steps and both served runs' (a calibration on either
    side of the real runs, as a drifting instrument is calibrated before and after a measurement).
    `metrics_insample` is the simulation on a fit of the plan's steps and the real runs' own (not a prediction of
    them: what is left of its error is the simulator's, not the machine's drift since the calibration; absent when
    the real runs have too few steps to fit)."""
    from kvflow.config import EngineConfig
    if isinstance(real_runs, bool) or not isinstance(real_runs, int) or real_runs < 1:
        raise ValueError(f"real_runs must be an integer >= 1, got {real_runs!r}")
    if load is not None and (isinstance(load, bool) or not isinstance(load, (int, float)) or not 0 < load < 10):
        raise ValueError(f"load must be a fraction of the fleet's capacity in (0, 10), got {load!r}")
    served = served_by_default(workload, replicas) if served is None else served
    if bracket and not served:
        raise ValueError("bracket needs served: the held-out workload is served before and after the real runs")
    if isinstance(workload, str) and (served or load is not None):
        raise ValueError(f"workload: a trace file ({workload}) has its own arrival times and no seed to draw a "
                         f"held-out one: load and served need a generated workload")
    built = [build_core(engine_kwargs) for _ in range(replicas)]
    rc = built[0][1]
    cores = [c for c, _, _ in built]
    if warm:
        for c in cores:
            replay(c, workload_requests(workload))
            c.reset_prefix_cache()
    probes = [probe()]            # the machine's own speed (no kvflow code): now and after each real run
    t0 = time.perf_counter()      # calibrated just before the real run: the machine's speed drifts by minutes
    plan_steps: list = []
    plan_profile = profile = calibrate(engine_kwargs, "fidelity", plan, repeats, cores=built,  # (co-run too)
                                       samples=plan_steps)
    fleet = {"replicas": replicas, "router": router} if replicas > 1 else {}
    sim_kwargs = {**engine_kwargs, "num_kv_blocks": rc.num_kv_blocks, "max_model_len": rc.max_model_len, **fleet,
                  "enable_prefix_caching": rc.config.cache.enable_prefix_caching}
    config = EngineConfig.from_kwargs(**sim_kwargs)
    extra: dict = {}
    if load is not None:        # the served and real runs at `load` of what the fresh fit says the fleet serves
        cap = capacity(config, profile, workload)
        workload = dataclasses.replace(workload, rate=load * cap)
        extra.update(load=load, capacity_rps=round(cap, 4), rate=round(workload.rate, 4))
    served_steps: list = []
    served_after: list = []       # (bracket) the held-out workload's steps served after the real runs
    if served:                    # a held-out draw of the workload: not the one compared
        held_out = dataclasses.replace(workload, seed=workload.seed + 1)
        profile = fit_served(profile, plan_steps, built, workload_requests(held_out), router,
                             f"the workload with seed {held_out.seed}", served_steps)
    alone = dataclasses.replace(profile, replicas_per_machine=1, corun_slowdown=1.0, corun_by_kind={})
    t_cal = time.perf_counter() - t0
    t1 = time.perf_counter()
    runs = []
    for _ in range(real_runs):
        runs.append(serve_once(cores, workload, router, rc.config.cache.block_size))
        probes.append(probe())
    t_real = time.perf_counter() - t1
    real_m, steps, placed, duration, cpu_share, _ = runs[0]   # the steps and placement studied: the first run's
    if real_runs > 1:
        real_m = {key: float(np.median([r[0][key] for r in runs])) for key in real_m}
    if served and bracket:        # the held-out workload again, after: its steps start after the first's ended
        serve(cores, workload_requests(held_out), router, rc.config.cache.block_size, served_after)
        extra["metrics_bracket"] = simulated(config, served_profile(
            plan_profile, plan_steps, in_sequence(served_steps, served_after),
            f"the workload with seed {held_out.seed}, before and after"), workload, real_m)[0]
    ratio = step_ratio(alone, steps)   # the real run's own steps / their calibrated time alone: ~1 when the
    rows, recorded, sim_requests = simulated(config, profile, workload, real_m, record=bool(placed))
    if real_runs > 1:
        extra["real_runs"] = [{key: round(r[0][key], 3) for key, _ in KEYS} for r in runs]
        extra["real_spread"] = {key: round(max(abs(r[0][key] - real_m[key]) for r in runs) / real_m[key], 4)
                                if real_m[key] else 0.0 for key, _ in KEYS}
    extra["real_median_band"] = [{"median_ttft_ms": median_band([q[0] for q in r[5]]),
                                  "median_tpot_ms": median_band([q[1] for q in r[5] if q[1] is not None])}
                                 for r in runs]
    if served:
        extra["metrics_plan"] = simulated(config, plan_profile, workload, real_m)[0]
    # not a prediction: the fit of the real runs' own steps, which the machine's drift since the calibration
    # does not reach; what is left is the simulator's (scheduling, co-run model), not the calibration's
    try:
        insample = served_profile(plan_profile, plan_steps, in_sequence(*(r[1] for r in runs)), "the real runs")
    except ValueError:            # too few real steps (alone) to fit: no in-sample figures
        insample = None
    # request by request: the simulation's TTFT and TPOT against each real run's, and the real runs' own
    corr = extra["per_request_corr"] = {"simulation": [request_correlation(r[5], sim_requests) for r in runs]}
    if insample is not None:
        extra["metrics_insample"], _, insample_requests = simulated(config, insample, workload, real_m)
        corr["insample"] = [request_correlation(r[5], insample_requests) for r in runs]
    if real_runs > 1:
        extra["runs"] = each_run(config, plan_profile, alone, plan_steps, workload, rows, runs)
    corr["real"] = [request_correlation(runs[i][5], runs[j][5])
                    for i in range(len(runs)) for j in range(i + 1, len(runs))]
    if replicas > 1:       # the same simulation without the co-run slowdown (each replica as if alone)
        extra["real_step_ratio_overlap"] = overlap_ratios(alone, steps)
        extra["metrics_alone"] = simulated(config, alone, workload, real_m)[0]
        if profile.corun_part == "fixed":     # the same served steps' co-run figures on each step's whole time
            extra["metrics_corun_step"] = simulated(config, whole_step(profile), workload, real_m)[0]
    if placed:        # the simulation again with each request where the real run put it: its step times alone
        extra["placed_alike"] = sum(a == b for a, b in zip(placed, recorded.placed))
        extra["metrics_placed"] = simulated(config, profile, workload, real_m, Placement(placed))[0]
        extra.update(ensemble(config, profile, workload, real_m))
    extra["machine"] = {"probes": probes, "spread": spread(probes)}
    extra["record"] = {"plan_profile": dataclasses.asdict(plan_profile), "real_metrics": real_m,   # to study
                       "sim_kwargs": sim_kwargs,
                       "workload": workload if isinstance(workload, str) else dataclasses.asdict(workload),
                       "plan_steps": plan_steps, "served_steps": served_steps, "real_steps": steps,   # offline
                       "served_after_steps": served_after, "real_requests": [r[5] for r in runs],
                       "real_runs": [{"metrics": r[0], "steps": r[1], "placed": r[2]} for r in runs[1:]]}
    return {**extra, "profile": dataclasses.asdict(profile), "calibration_s": round(t_cal, 1),
            "real_run_s": round(t_real, 1), "real_cpu_share": round(cpu_share, 3),
            "real_step_ratio": round(ratio, 3),    # machine ran as fast as during the calibration
            "real_duration_s": round(duration, 2), "metrics": rows, "ok": all(v["ok"] for v in rows.values())}


def served_by_default(workload: WorkloadSpec | str, replicas: int) -> bool:
    """Whether fidelity() fits served steps when not told: for a generated workload (a held-out draw is its
    next seed), and for several replicas (their co-run figures come from served steps; a trace file then is
    refused); not for one engine on a trace file."""
    return replicas > 1 or not isinstance(workload, str)


def each_run(config, plan_profile, profile, plan_steps, workload, rows: dict, runs) -> list[dict]:
    """Run by run (several real runs): how fast the machine ran each (`step_ratio`: its steps' median time over
    `profile`'s, the prediction's fit with each replica as if alone; a fleet's steps with no other replica
    stepping, as the co-run slowdown is not the machine's drift), the prediction against that run alone
    (`metrics`: the simulation's figures in `rows`, no new simulation), and a simulation fitted with the plan's
    steps and that run's own (`metrics_insample`, absent when the run has too few steps to fit). The median of
    the runs mixes runs at different speeds of the machine; one run at a time, a miss is either the machine's
    drift since the calibration (the prediction misses, its own fit does not) or the simulator's."""
    sim_m = {key: row["sim"] for key, row in rows.items()}
    out = []
    for k, run in enumerate(runs):
        real, steps = run[0], run[1]
        fleet = steps and len(steps[0]) > 2         # (shape, s, replica, start) steps: overlap_ratios splits them
        ratio = overlap_ratios(profile, steps)["alone"] if fleet else round(step_ratio(profile, steps), 3)
        entry = {"step_ratio": ratio, "metrics": compare_metrics(real, sim_m)}
        try:
            own = served_profile(plan_profile, plan_steps, steps, f"real run {k + 1}")
        except ValueError:        # too few steps (alone) to fit
            pass
        else:
            entry["metrics_insample"] = simulated(config, own, workload, real)[0]
        out.append(entry)
    return out


def in_sequence(*runs) -> list:
    """The steps of served runs as one run: a fleet's (shape, s, replica, start s) each shifted to start a
    second after the previous run's last step ended (one engine's (shape, s) as they are)."""
    out: list = []
    for steps in runs:
        shift = max((s[3] + s[1] for s in out if len(s) > 2), default=-1.0) + 1.0     # (0.0 for the first)
        out += [(*s[:3], s[3] + shift) if len(s) > 2 else s for s in steps]
    return out


def serve_once(cores, workload: WorkloadSpec | str, router: str, block_size: int):
    """One real run of `workload` (replay.serve: several cores behind `router`): (bench serve's metrics, its
    steps, where each request went (several cores), duration s, CPU share (one core), each request's TTFT and
    TPOT in ms (None: one token), in arrival order)."""
    steps, placed = [], []
    real, duration = serve(cores, workload_requests(workload), router, block_size, steps, placed)
    cpu_share = replay.cpu_share if len(cores) == 1 else float("nan")
    per_request = [(round(r.ttft * 1e3, 3), None if t is None else round(t * 1e3, 3))
                   for r, t in zip(real, map(tpot, real)) if r.success]
    return compute_metrics(real, duration), steps, placed, duration, cpu_share, per_request


def median_band(values) -> list[float]:
    """The 45th and 55th percentiles of `values` relative to their median, minus 1: where the median goes when
    a twentieth of them cross it. Wider than a target, and the median cannot be judged to it: a few requests
    that move (a decode that meets a prompt's step or not) move it further."""
    a = np.asarray(values, dtype=float)
    mid = float(np.median(a)) if a.size else 0.0
    if mid <= 0:
        return [0.0, 0.0]
    return [round(float(np.percentile(a, q)) / mid - 1.0, 4) for q in (45, 55)]


def request_times(rec) -> list[tuple]:
    """Each request's (TTFT ms, TPOT ms or None: one token) in a simulation's Recorder, in arrival order (as
    serve_once's; requests refused or failed left out). Empty when two requests arrive at one instant (the
    report's rows, in finish order, do not say which came first)."""
    rows = sorted((r for r in rec.rows if not r[7]), key=lambda row: row[0])
    if len({row[0] for row in rows}) < len(rows):
        return []
    return [(row[3] * 1e3, (row[4] - row[3]) / (row[2] - 1) * 1e3 if row[2] > 1 else None) for row in rows]


def request_correlation(a: list[tuple], b: list[tuple]) -> dict | None:
    """Pearson's r of two runs' per-request TTFT and of their TPOT ((ttft, tpot) per request, arrival order):
    how alike they put each request, whatever their medians. None when they are not the same requests in one
    order (their number differs); a metric's None when fewer than three requests have it in both, or it does
    not vary in one of the runs."""
    if len(a) != len(b):
        return None
    out = {}
    for j, key in enumerate(("ttft", "tpot")):
        pairs = np.array([(x[j], y[j]) for x, y in zip(a, b) if x[j] is not None and y[j] is not None]).reshape(-1, 2)
        ok = len(pairs) >= 3 and pairs[:, 0].std() > 0 and pairs[:, 1].std() > 0
        out[key] = round(float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]), 3) if ok else None
    return out


def capacity(config, profile, workload: WorkloadSpec) -> float:
    """The requests/s `config`'s fleet serves at most on `profile`: its simulation of `workload` with every
    request arriving at once (rate inf), the completed requests over the time it takes to serve them all."""
    from kvflow.sim.cluster import simulate
    sim = simulate(config, profile, workload_requests(dataclasses.replace(workload, rate=math.inf)))[1]
    return sim.summary(None)["request_throughput"]


def simulated(config, profile, workload: WorkloadSpec | str, real_m: dict, router: Router | None = None,
              record: bool = False):
    """(compare_metrics of the simulation of `workload` against `real_m`, the Recording router or None, each
    request's times: request_times); with `router` in place of the configured one, or (`record`) the
    configured one noting where it places each."""
    from kvflow.sim.cluster import Simulation
    sim = Simulation(config, profile)
    if record:
        router = Recording(sim.prefill.router)
    if router is not None:
        sim.prefill.router = router
    rec = sim.run(workload_requests(workload))
    return compare_metrics(real_m, rec.summary(None, sim)), router if record else None, request_times(rec)


def ensemble(config, profile, workload: WorkloadSpec, real_m: dict, runs: int = ENSEMBLE) -> dict:
    """The simulation `runs` times with jittered step times (sigma from the calibration's residuals: the
    median relative error of a normal is 0.674 sigma), each with its own seed; each metric's median over the
    runs against the real run, and the runs' range. With several replicas the router's ties make placement,
    and with it TPOT, a chaotic function of step timing: one deterministic run is one draw of it."""
    from kvflow.sim.cluster import simulate
    sigma = profile.fit.get("median_rel_error", 0.015) / 0.674
    summaries = [simulate(dataclasses.replace(config, model=dataclasses.replace(config.model, seed=k)), profile,
                          workload_requests(workload), step_noise=sigma)[1].summary(None) for k in range(runs)]
    median = {key: float(np.median([s[key] for s in summaries])) for key, _ in KEYS}
    return {"step_noise": round(sigma, 4), "metrics_ensemble": compare_metrics(real_m, median),
            "ensemble_range": {key: [round(min(s[key] for s in summaries), 3), round(max(s[key] for s in summaries), 3)]
                               for key, _ in KEYS}}


def compare_metrics(real: dict, sim: dict) -> dict:
    """Per metric of KEYS: both values, the simulation's relative error, its target, whether it is met."""
    rows = {}
    for key, tol in KEYS:
        r, s = real[key], sim[key]
        err = abs(s - r) / r if r else float("inf")
        rows[key] = {"real": round(r, 3), "sim": round(s, 3), "rel_error": round(err, 4), "target": tol,
                     "ok": err <= tol}
    return rows


class Placement(Router):
    """Places the k-th request (the simulator names it "r{k}") where a real run placed it."""

    def __init__(self, placed: list[int]):
        super().__init__(max(placed) + 1)
        self.placed = placed

    def route(self, req: RouteRequest, loads) -> int:
        return self.placed[int(req.request_id[1:])]


class Recording(Router):
    """Another router, noting where it placed each request (in arrival order)."""

    def __init__(self, inner: Router):
        super().__init__(inner.num_replicas)
        self.inner, self.placed = inner, []

    def route(self, req: RouteRequest, loads) -> int:
        self.placed.append(self.inner.route(req, loads))
        return self.placed[-1]

    def on_finished(self, request_id: str, replica: int) -> None:
        self.inner.on_finished(request_id, replica)
