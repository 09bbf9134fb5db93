"""kvflow's best configuration for one workload, one hardware profile and one device budget: the last row of
`kvflow sim compare`, found by the simulator.

Each of the survey's runtimes fixes its options one way (kvflow/presets.py); kvflow has them all, so for a given
workload it can choose. The search is coordinate descent, from two starts:

  space      every option a preset sets (chunked prefill and its token budget, the scheduling policy, the KV
             reservation, preemption, async recovery, prefix caching, the routers, the P/D transfer, the KV
             pool, early rejection), each with kvflow's default, the values the presets give it, and for the
             routers and scheduling policies every one registered; and the shape: `gpus` colocated replicas,
             or p prefill and gpus - p decode workers. Options given on the command line are fixed, not
             searched. Serverless is not a shape here (scale-to-zero trades latency for idle devices, which
             goodput does not count).
  objective  goodput summed over the rates (the area under compare's plot), then output throughput at the
             highest rate: larger is better
  starts     the best of the configurations already simulated (kvflow's defaults and the presets compare ran,
             serverless aside), so the result is never worse than any runtime it contains; then the best
             configuration of the other family of shapes (colocated replicas, or P/D workers) simulated by
             then (a start or one the first descent tried), if any: a descent rarely crosses from one to the
             other, since a P/D shape is worth little until its own options (the transfer,
             the decode placement, the pool) are chosen, and a move changes one option at a time
  moves      each option in turn takes each of its values, the others fixed, and keeps the best; passes until
             one improves nothing or `budget` configurations have been simulated (one budget for all the
             descents, the first taking what it needs). A configuration the engine refuses (ValueError: an
             option pair it does not allow) is skipped, and so is one the workload cannot run on. A
             configuration is simulated once, whichever descent meets it again.
"""
from __future__ import annotations

import dataclasses
import functools

from kvflow.cluster.router import ROUTERS
from kvflow.config import EngineConfig, field_sections
from kvflow.presets import PRESETS
from kvflow.scheduler.policy import POLICIES

SHAPE_KEYS = ("replicas", "prefill_replicas", "decode_replicas", "serverless")
PD_ONLY = ("pd_policy", "kv_transfer", "kv_pool", "early_rejection")     # meaningless without P/D workers
TOKEN_BUDGETS = (256, 512, 1024, 2048)
DEFAULT_BUDGET = 80


@functools.cache
def default(key: str):
    """kvflow's default for the flat option `key` (canonical() asks for every option of every candidate)."""
    section = field_sections()[key]
    return getattr(getattr(EngineConfig(), section), key)


def search_space(gpus: int, fixed: dict | None = None) -> dict[str, list]:
    """Option -> the values tried, kvflow's default first; "shape" -> the serving shapes of `gpus` devices.
    The options in `fixed` are left out."""
    fixed = fixed or {}
    keys = dict.fromkeys(k for opts in PRESETS.values() for k in opts if k not in SHAPE_KEYS and k not in fixed)
    extra = {"router": list(ROUTERS), "pd_policy": list(ROUTERS), "scheduling_policy": list(POLICIES),
             "max_num_batched_tokens": list(TOKEN_BUDGETS)}
    values = {key: list(dict.fromkeys([default(key)] + [o[key] for o in PRESETS.values() if key in o]
                                      + extra.get(key, [])))      # in order, once each
              for key in keys}
    shapes = [{"replicas": gpus}] + [{"prefill_replicas": p, "decode_replicas": gpus - p} for p in range(1, gpus)]
    return {"shape": shapes, **values}


def canonical(options: dict) -> dict:
    """`options` without what changes nothing: an option at kvflow's default, and the P/D options of colocated
    replicas. Two configurations are the same one when their canonical options are equal."""
    pd = bool(options.get("prefill_replicas"))
    return {k: v for k, v in options.items()
            if k in SHAPE_KEYS or (pd or k not in PD_ONLY) and v != default(k)}


def score(points: list[dict]) -> tuple[float, float]:
    """The objective of a configuration's points ({rate, summary} per rate): larger is better."""
    return (round(sum(p["summary"].get("goodput", 0.0) for p in points), 9),
            round(points[-1]["summary"]["output_throughput"], 9))


@dataclasses.dataclass
class Candidate:
    options: dict                 # flat engine options, the shape's included
    points: list[dict]            # compare's {rate, summary} per rate
    score: tuple[float, float]


def family(options: dict) -> str:
    """A configuration's family of shapes: "pd" (prefill and decode workers) or "colocated"."""
    return "pd" if options.get("prefill_replicas") else "colocated"


def search(evaluate, gpus: int, fixed: dict | None, start: list[tuple[str, dict, list]],
           budget: int = DEFAULT_BUDGET) -> dict:
    """Coordinate descents from the best of `start` ((name, options, points) already simulated), then from the
    best of the other family of shapes (see the module's docstring), within one budget.
    `evaluate(options)` simulates one configuration at every rate and returns its points (or raises ValueError).
    Returns {"options", "points", "score", "evaluations" (simulated here), "skipped" ([options, why]), "start"
    (the name of the start the best descended from), "starts" (the names of the starts descended from), "trail"
    (the options and score of the best start, then each improvement on the best so far, with the start it
    descended from)}."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"search budget must be a non-negative integer of configurations, got {budget!r}")
    if not start:
        raise ValueError("search: no configuration to start from")
    space = search_space(gpus, fixed)
    explored = Explored(budget)
    names: dict[tuple, str] = {}
    for name, options, points in start:
        k = key(options)
        if k not in explored.seen:
            explored.seen[k], names[k] = Candidate(canonical(options), points, score(points)), name
    best = max(explored.seen.values(), key=lambda c: c.score)        # (the first of equal ones)
    origin = names[key(best.options)]
    trail = [{"options": best.options, "score": best.score, "start": origin}]
    starts, done = [], set()
    cand, name = best, origin
    while cand is not None:        # a descent from the best, then from the best seen of a family not yet tried
        starts.append(name)
        done.add(family(cand.options))
        for step in explored.descend(evaluate, space, cand):
            if step.score > best.score:
                best, origin = step, name
                trail.append({"options": step.options, "score": step.score, "start": name})
        rest = [c for c in explored.seen.values() if c is not None and family(c.options) not in done]
        cand = max(rest, key=lambda c: c.score) if rest and explored.evaluations < budget else None
        if cand is not None:
            name = names.get(key(cand.options), f"the best {family(cand.options)} configuration simulated")
    return {"options": best.options, "points": best.points, "score": best.score, "evaluations": explored.evaluations,
            "skipped": explored.skipped, "start": origin, "starts": starts, "trail": trail}


def key(options: dict) -> tuple:
    """A configuration's identity: its canonical options, sorted."""
    return tuple(sorted(canonical(options).items(), key=lambda kv: kv[0]))


@dataclasses.dataclass
class Explored:
    """What every descent of one search shares: the configurations simulated (key -> Candidate, None for a
    refused one), the refusals ([options, why]) and the budget of simulations, with how much of it is spent."""
    budget: int
    seen: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)
    evaluations: int = 0

    def descend(self, evaluate, space: dict, best: Candidate) -> list[Candidate]:
        """One coordinate descent from `best`: each better candidate it found, in order."""
        seen, improvements = self.seen, []
        improved = True
        while improved and self.evaluations < self.budget:
            improved = False
            for name, choices in space.items():
                for choice in choices:
                    move = dict(choice) if name == "shape" else {name: choice}
                    base = {k: v for k, v in best.options.items() if name != "shape" or k not in SHAPE_KEYS}
                    options = canonical({**base, **move})
                    k = key(options)
                    if k in seen:
                        continue
                    if self.evaluations >= self.budget:
                        break
                    self.evaluations += 1
                    try:
                        points = evaluate(options)
                    except ValueError as e:
                        seen[k] = None
                        self.skipped.append([options, str(e)])
                        continue
                    seen[k] = cand = Candidate(options, points, score(points))
                    if cand.score > best.score:
                        best, improved = cand, True
                        improvements.append(cand)
        return improvements
