"""Does the simulator reproduce a measured run? One engine is built, calibrated (kvflow.sim.calibrate), and
then serves a workload in real time (replay.py), alone or as one of `replicas` engines behind a router;
the same workload is simulated with the fresh profile and the same engine options; both are reduced to
`kvflow bench serve`'s metrics and compared.
Targets (issue 17): throughput and median TTFT/TPOT within 10%, p99 within 20%. Imports torch (through
the engine)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from kvflow.bench.metrics import compute_metrics
from kvflow.sim.calibrate import DEFAULT_PLAN, build_core, calibrate
from kvflow.sim.replay import replay, replay_fleet
from kvflow.sim.workload import WorkloadSpec, workload_requests

KEYS = (("output_throughput", 0.10), ("median_ttft_ms", 0.10), ("median_tpot_ms", 0.10),
        ("p99_ttft_ms", 0.20), ("p99_tpot_ms", 0.20))


def fidelity(engine_kwargs: dict, workload: WorkloadSpec, plan=DEFAULT_PLAN, repeats: int = 1,
             warm: bool = True, replicas: int = 1, router: str = "least-load") -> dict:
    """`warm`: serve the workload once unmeasured first (the engine's first call of each batch shape selects
    kernels and grows buffers, up to ~0.7 s on a CPU: a cold run measures that, not steady serving).
    `replicas` > 1: that many engines (one calibrated; they are alike), each on its own thread and core,
    behind `router`, against the simulator's `replicas` and `router`."""
    from kvflow.config import EngineConfig
    from kvflow.sim.cluster import simulate
    t0 = time.perf_counter()
    core, rc, build_s = build_core(engine_kwargs)
    profile = calibrate(engine_kwargs, "fidelity", plan, repeats, core=(core, rc, build_s))
    t_cal = time.perf_counter() - t0
    cores = [core] + [build_core(engine_kwargs)[0] for _ in range(replicas - 1)]
    if warm:
        for c in cores:
            replay(c, workload_requests(workload))
            c.reset_prefix_cache()
    t1 = time.perf_counter()
    steps: list = []
    if replicas == 1:
        real, duration = replay(core, workload_requests(workload), steps)
        cpu_share = replay.cpu_share
    else:
        real, duration = replay_fleet(cores, workload_requests(workload), router, rc.config.cache.block_size,
                                      steps)
        cpu_share = float("nan")
    t_real = time.perf_counter() - t1
    model = profile.cost_model()          # measured / calibrated time of the real run's own steps: ~1 when the
    step_ratio = float(np.median([t / model.step_seconds(*shape) for shape, t in steps])) if steps else 1.0
    for c in cores:
        c.check_blocks()
    real_m = compute_metrics(real, duration)
    fleet = {"replicas": replicas, "router": router} if replicas > 1 else {}
    config = EngineConfig.from_kwargs(**{**engine_kwargs, "num_kv_blocks": rc.num_kv_blocks,
                                         "max_model_len": rc.max_model_len, **fleet,
                                         "enable_prefix_caching": rc.config.cache.enable_prefix_caching})
    sim, rec = simulate(config, profile, workload_requests(workload))
    sim_m = rec.summary(None, sim)
    rows = {}
    for key, tol in KEYS:
        r, s = real_m[key], sim_m[key]
        err = abs(s - r) / r if r else float("inf")
        rows[key] = {"real": round(r, 3), "sim": round(s, 3), "rel_error": round(err, 4), "target": tol,
                     "ok": err <= tol}
    return {"profile": dataclasses.asdict(profile), "calibration_s": round(t_cal, 1),
            "real_run_s": round(t_real, 1), "real_cpu_share": round(cpu_share, 3),
            "real_step_ratio": round(step_ratio, 3),    # machine ran as fast as during the calibration
            "real_duration_s": round(duration, 2), "metrics": rows, "ok": all(v["ok"] for v in rows.values())}
