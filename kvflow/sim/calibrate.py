"""`kvflow sim calibrate`: fit the linear cost model on this machine from measured steps of the real engine.

The real EngineCore (the engine options given: model, dtype, threads, ...) runs a plan of batches (then a sweep
of single prompts on both sides of each candidate kernel switch, SWEEP): B
requests of about P random prompt tokens (P/2 to 3P/2), each generating D tokens (ignore_eos), so that
steps of every shape occur: whole and chunked prefills, mixed steps, decodes of 1..B rows at growing
context. Every step's shape (SchedulerOutput.shape, kvflow/step.py) and wall time (the whole EngineCore.step:
scheduling, the forward pass, sampling and the update: what separates two steps of a served replica) is
recorded, after a first pass of the same plan that is not (first calls of a shape select kernels and grow
buffers). The six coefficients (kvflow.sim.cost_model's linear model) are fitted by non-negative least squares, for
each candidate set of knees (KNEES) and slope changes (HINGES), and the best fit kept; the profile also records the
engine's build time (a serverless cold start), the swap bandwidth the runner measured, the KV budget, and
the fit's quality. With fidelity.py and replay.py, the only modules of kvflow.sim that import torch (via the engine).

A plan's steps run back to back; a served replica's do not (it idles between arrivals, its batches are the
workload's, and beside it another replica may be stepping), and their times differ from the same shapes' in the
plan (single-row decodes of a two-replica fleet here: ~13% longer). `workload` (fit_served): after the plan, the
engines serve that workload in real time (replay.py) and the model is fitted again on the plan's steps and the
served ones (served.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import platform
import time

import numpy as np

from kvflow.sim.cost_model import HardwareProfile, time_ratio

logger = logging.getLogger("kvflow")

# (requests, prompt tokens, output tokens): prefill-heavy, decode-heavy and mixed steps
DEFAULT_PLAN = ((1, 32, 24), (1, 480, 8), (1, 1000, 4), (4, 128, 24), (8, 64, 32), (12, 160, 16), (32, 24, 24),
                (3, 600, 6), (24, 60, 24))
# where a matmul library may switch kernels (a step of more tokens than this costs a fixed amount more): the
# fit tries every set of at most MAX_KNEES of them and keeps the one that fits best. Every pass of a plan ends
# with a sweep of single prompts of exactly k and k + 1 tokens for each k up to SWEEP_MAX, both sides of each
# candidate (random prompt lengths left the fit choosing 48 for a switch at 64 when few fell in between)
KNEES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MAX_KNEES = 2
# where a prompt token's cost may change slope (its step's first h tokens cost more each than the rest: a matmul
# of a few rows runs below a wide one's throughput); the fit tries none or one of them with each set of knees
HINGES = (32, 64, 128, 256, 512)
MAX_HINGES = 1
SWEEP_MAX = 256
SWEEP = tuple(k + d for k in KNEES if k <= SWEEP_MAX for d in (0, 1))


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active set: drop the most negative, refit)."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        neg = [j for j in active if coef[j] < 0]
        if not neg:
            return coef
        active.remove(min(neg, key=lambda j: coef[j]))


def fit(samples: list[tuple[tuple, float]], max_outliers: float = 0.2) -> tuple[list[float], dict]:
    """(coefficients, quality) from (shape, seconds) pairs, for the knees (KNEES) and hinge (HINGES) that fit
    best (the quality names them). Fitted on relative error (each step weighs the same whether it takes 5 ms or
    500). Steps slower than twice the fit (another process took the cores: a shared machine) are dropped and the
    fit redone, at most `max_outliers` of them; the quality says how many."""
    if len(samples) < 10:
        raise ValueError(f"samples: at least 10 measured steps are needed to fit, got {len(samples)}")
    sets = sorted(((knees, hinges) for n in range(MAX_KNEES + 1) for knees in itertools.combinations(KNEES, n)
                   for m in range(MAX_HINGES + 1) for hinges in itertools.combinations(HINGES, m)),
                  key=lambda s: len(s[0]) + len(s[1]))     # fewer terms first: they win a tie
    # judged on the mean relative error of decode-only steps and of steps with a prefill, weighed alike (a plan
    # has ten times more of the first); each knee or hinge must earn its place: it costs 5% of that error
    shapes = np.array([s for s, _ in samples], dtype=np.float64)      # (the shared columns, built once)
    base = np.column_stack([np.ones(len(shapes)), shapes[:, 0], shapes[:, 1], shapes[:, 2] / 1e3,
                            shapes[:, 3] / 1e6])
    tokens = shapes[:, 0] + shapes[:, 1]
    y = np.array([t for _, t in samples])
    return min((fit_terms(design(base, tokens, knees, hinges), y, knees, hinges, max_outliers)
                for knees, hinges in sets),
               key=lambda r: r[1]["balanced_rel_error"] * (1 + 0.05 * (len(r[1]["knee_tokens"])
                                                                        + len(r[1]["hinge_tokens"]))))


def design(base: np.ndarray, tokens: np.ndarray, knees: tuple, hinges: tuple) -> np.ndarray:
    """The fit's features of every sample: the base columns (1, decode rows, prefill tokens, context / 1e3,
    prefill pairs / 1e6: the scheduler's step-time model's), then a step over each knee (the step's tokens above
    it) and a hinge's ramp (its tokens up to the hinge, / 1e3)."""
    return np.column_stack([base, *((tokens > k).astype(np.float64) for k in knees),
                            *(np.minimum(tokens, h) / 1e3 for h in hinges)])


def fit_terms(x: np.ndarray, y: np.ndarray, knees: tuple, hinges: tuple,
              max_outliers: float) -> tuple[list[float], dict]:
    keep = np.ones(len(y), dtype=bool)
    for _ in range(5):
        w = 1.0 / y[keep]
        coef = nnls(x[keep] * w[:, None], y[keep] * w)
        ratio = y / np.maximum(x @ coef, 1e-9)
        order = np.argsort(-ratio)
        slow = order[ratio[order] > 2.0][:int(max_outliers * len(y))]
        new = np.ones(len(y), dtype=bool)
        new[slow] = False
        if (new == keep).all():
            break
        keep = new
    pred = x[keep] @ coef
    yk = y[keep]
    rel = np.abs(pred - yk) / yk
    has_prefill = x[keep, 2] > 0
    balanced = np.mean([rel[m].mean() for m in (has_prefill, ~has_prefill) if m.any()])
    r2 = 1.0 - float(((yk - pred) ** 2).sum() / max(((yk - yk.mean()) ** 2).sum(), 1e-30))
    return [float(c) for c in coef], {"num_steps": len(y), "num_dropped_slow": int((~keep).sum()),
                                      "knee_tokens": list(knees), "hinge_tokens": list(hinges),
                                      "r2": round(r2, 4),
                                      "mean_rel_error": round(float(rel.mean()), 4),
                                      "balanced_rel_error": round(float(balanced), 4),
                                      "median_rel_error": round(float(np.median(rel)), 4),
                                      "p90_rel_error": round(float(np.percentile(rel, 90)), 4)}


def build_core(engine_kwargs: dict):
    """The real engine core, warmed up; (core, resolved config, seconds from nothing to serving)."""
    from kvflow.config import EngineConfig
    from kvflow.engine.core import EngineCore
    from kvflow.engine.input_processor import open_model
    config = EngineConfig.from_kwargs(**{"enable_prefix_caching": False, **engine_kwargs})
    t0 = time.perf_counter()
    rc, reader, _ = open_model(config)
    core = EngineCore.build(rc, reader)
    core.warm_up()
    return core, rc, time.perf_counter() - t0


def measure_core(core, rc, plan=DEFAULT_PLAN, repeats: int = 1, seed: int = 0) -> list[tuple[tuple, float]]:
    """Run the plan on the core: (step shape, seconds) of every step of the measured passes."""
    import torch

    from kvflow.engine.wire import EngineCoreRequest
    from kvflow.sampling.params import SamplingParams
    samples: list[tuple[tuple, float]] = []
    n = 0
    last: list = []
    orig = core.scheduler.schedule

    def schedule():                    # the step's SchedulerOutput, to read its shape
        out = orig()
        last[:] = [out]
        return out
    core.scheduler.schedule = schedule
    try:
        with torch.inference_mode():
            for rep in range(repeats + 1):  # pass 0 warms every shape up (first calls select kernels): not kept
                rng = np.random.default_rng(seed + max(rep - 1, 0))    # pass 1 repeats pass 0's shapes
                for batch, prompt_len, out_len, exact in (*((*row, False) for row in plan),
                                                          *((1, n, 1, True) for n in SWEEP)):
                    for _ in range(batch):      # prompt lengths vary in [P/2, 3P/2]: many prefill shapes
                        n_in = prompt_len if exact else int(rng.integers(max(prompt_len // 2, 1),
                                                                         prompt_len * 3 // 2 + 1))
                        n_in = min(n_in, rc.max_model_len - out_len - 1)
                        ids = rng.integers(1, rc.arch.vocab_size, size=n_in).tolist()
                        core.add_request(EngineCoreRequest(f"cal-{n}", ids, SamplingParams(
                            max_tokens=out_len, ignore_eos=True, temperature=0.0), [], out_len, time.monotonic()))
                        n += 1
                    while core.has_unfinished():
                        last.clear()
                        t = time.perf_counter()
                        core.step()
                        t = time.perf_counter() - t
                        if rep and last and last[0].req_ids:
                            samples.append((last[0].shape(), t))
    finally:
        core.scheduler.schedule = orig
    core.check_blocks()
    return samples


def model_spec(rc) -> dict:
    a = rc.arch
    per_layer = (a.hidden_size * a.num_heads * a.head_dim * 2 + a.hidden_size * a.num_kv_heads * a.head_dim * 2
                 + 3 * a.hidden_size * a.intermediate_size)
    params = a.num_layers * per_layer + a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    return dict(name=rc.model_path.rsplit("/", 1)[-1], num_params=int(params), num_layers=a.num_layers,
                hidden_size=a.hidden_size, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                max_model_len=rc.max_model_len)


def measure_together(cores, plan=DEFAULT_PLAN, repeats: int = 1) -> list[tuple[tuple, float]]:
    """Run the plan on several (core, rc) at once, each on its own thread pinned to its own core (as
    replay_fleet's replicas run; one core each when the process has enough), each with its own prompts: every
    step measured beside the others' steps, which is how replicas sharing one machine step (its memory
    bandwidth and caches are shared; a one-engine calibration does not see that). A core that finishes its
    plan first keeps stepping small batches, unmeasured, until every core has finished. The samples of all."""
    import threading

    from kvflow.engine.wire import EngineCoreRequest
    from kvflow.sampling.params import SamplingParams
    cpus = sorted(os.sched_getaffinity(0))
    results: list[list | BaseException] = [[] for _ in cores]
    left = [len(cores)]
    lock = threading.Lock()

    def run(i: int, core, rc) -> None:
        try:
            if len(cpus) >= len(cores):
                os.sched_setaffinity(0, [cpus[i]])      # this thread only (Linux)
            try:
                results[i] = measure_core(core, rc, plan, repeats, seed=1000 * i)
            finally:
                with lock:
                    left[0] -= 1
            n = 0
            while left[0]:                              # keep the others company, unmeasured
                core.add_request(EngineCoreRequest(f"busy-{n}", list(range(1, 65)), SamplingParams(
                    max_tokens=16, ignore_eos=True, temperature=0.0), [], 16, time.monotonic()))
                n += 1
                while core.has_unfinished():
                    core.step()
        except BaseException as e:                      # surfaced below, after the join
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c, rc), daemon=True) for i, (c, rc) in enumerate(cores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [s for r in results for s in r]


def calibrate(engine_kwargs: dict, name: str | None = None, plan=DEFAULT_PLAN, repeats: int = 1,
              cores=None, together: int = 1, workload=None, router: str = "least-load",
              samples: list | None = None) -> HardwareProfile:
    """Measure and fit one engine alone. `together` > 1: a profile of that many replicas sharing this machine: then
    the plan again on that many engines at once (measure_together), and the profile's corun_slowdown is those steps'
    total time over the alone fit's price of them (time_ratio). `cores`: (core, rc, build seconds) of build_core for
    each engine, to reuse engines (built when not given; their number is `together`). `workload` (a WorkloadSpec or
    a trace file's path): then fitted again with that workload's served steps (fit_served; a fleet behind `router`).
    `samples`: a list to append the plan's measured steps to."""
    from kvflow.platform import cpu_info
    if together < 1:
        raise ValueError(f"together: at least 1 engine, got {together}")
    cores = list(cores or [build_core(engine_kwargs) for _ in range(together)])
    core, rc, build_s = cores[0]
    measured = measure_core(core, rc, plan, repeats)
    if samples is not None:
        samples.extend(measured)
    swap = core.scheduler.cost.swap_bytes_per_s
    coef, quality = fit(measured)
    cpu = cpu_info().model or platform.processor() or platform.machine()
    threads = rc.config.parallel.num_threads
    device = rc.config.model.device
    profile = HardwareProfile(
        name=name or f"{device}-{rc.arch.model_type}-{rc.dtype}", kind="linear",
        source=(f"calibrated on this machine: {cpu} ({device}, {threads or 'default'} threads), "
                f"{time.strftime('%Y-%m-%d')}, model {rc.model_path.rsplit('/', 1)[-1]} {rc.dtype} "
                f"quantization {rc.config.model.quantization}; {quality['num_steps']} measured EngineCore steps; "
                f"P/D link = the measured swap bandwidth (one machine)"),
        model=model_spec(rc), dtype=rc.dtype if rc.dtype in ("bfloat16", "float32") else "bfloat16",
        params={"coef": coef, "knee_tokens": quality["knee_tokens"], "hinge_tokens": quality["hinge_tokens"]},
        kv_cache_bytes=int(rc.num_kv_blocks * rc.block_bytes), link_bytes_per_s=swap, swap_bytes_per_s=swap,
        cold_start_s=round(build_s, 3), fit=quality)
    if len(cores) > 1:
        beside = measure_together([(c, r) for c, r, _ in cores], plan, repeats)
        slowdown = time_ratio(profile, beside)
        quality["corun_steps"] = len(beside)
        profile = dataclasses.replace(profile, replicas_per_machine=len(cores), corun_slowdown=round(slowdown, 4),
                                      source=f"{profile.source}; {len(cores)} engines stepping at once on their "
                                             f"own cores took {slowdown:.3f}x the time of one alone")
    if workload is not None:
        from kvflow.sim.served import fit_served
        from kvflow.sim.workload import workload_requests
        label = (workload if isinstance(workload, str)
                 else f"{workload.kind}:n={workload.n},rate={workload.rate},seed={workload.seed}")
        profile = fit_served(profile, measured, cores, workload_requests(workload), router, label)
    return profile
