"""A calibration fitted again on served steps (`kvflow sim calibrate --workload`, the fidelity check): the
engines serve a workload in real time (replay.py), and the plan's fit (calibrate.py) is fitted again on the plan's
steps and the served ones; a fleet's with no other replica stepping join the fit, and its co-run figures come from
its own steps beside another's over those alone, in all and per pair of step kinds. A fleet's figures and its
scale are ratios of total times (cost_model.time_ratio), and a decode's figures are on the fit's fixed cost
(HardwareProfile.corun_part). Imports torch only through fit_served (the engine)."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from kvflow.sim.calibrate import fit
from kvflow.sim.cost_model import STEP_KINDS, HardwareProfile, step_kind, step_ratio, time_ratio


def fit_served(profile: HardwareProfile, plan_samples, cores, requests, router: str = "least-load",
               label: str = "a workload", steps: list | None = None) -> HardwareProfile:
    """Serve `requests` (SimRequests) in real time on the engines `cores` ((core, rc, ...) of build_core; one:
    replay, several: replay_fleet behind `router`) and refit `profile` on `plan_samples` (its plan's measured
    steps) and theirs (served_profile); the served steps are appended to `steps` when given. The engines' prefix
    caches are emptied afterwards. With speculative decoding, the profile's spec_acceptance becomes the served
    run's drafts accepted per verification that tried them, position by position (measured_acceptance), when
    any was tried, and its spec_propose_rate the share of requests asked to draft that the proposer gave drafts
    (the fit's record keeps the served requests' own shares too, by quantile: request_quantiles)."""
    from kvflow.sim.replay import serve
    steps = [] if steps is None else steps
    specs = [c[0].scheduler.spec for c in cores if c[0].scheduler.spec is not None]
    before = spec_counts(specs)
    serve([c[0] for c in cores], requests, router, cores[0][1].config.cache.block_size, steps)
    fitted = served_profile(profile, plan_samples, steps, label)
    if not specs:
        return fitted
    # speculative decoding: the drafts accepted per position tried, in this workload's run (not the plan's)
    run = spec_between(before, spec_counts(specs))
    tried_at, asked, offered = run["tried_at"], run["asked"], run["offered"]
    rates = request_quantiles(run["propose_bin_requests"], run["propose_bin_rates"])
    return dataclasses.replace(fitted, spec_acceptance=measured_acceptance(run["accepted_at"], tried_at),
                               spec_propose_rate=round(offered / asked, 4) if asked else None,
                               fit={**fitted.fit, "served_spec_verifications": run["verifications"],
                                    "served_spec_request_propose_rates": rates,
                                    "served_spec_propose_requests": sum(run["propose_bin_requests"]),
                                    "served_spec_tried": sum(tried_at), "served_spec_tried_at": tried_at,
                                    "served_spec_asked": asked, "served_spec_offered": offered,
                                    "served_spec_offered_tokens": run["offered_tokens"]})


MIN_POSITION_TRIES = 30       # a draft position's own acceptance figure needs this many verifications that tried it


def measured_acceptance(accepted_at: list[int], tried_at: list[int],
                                    min_tries: int = MIN_POSITION_TRIES) -> list[float] | None:
    """Drafts accepted over verifications that tried them, position by position (each verification tries the
    positions up to its first rejection: the simulated runner's chance per draft given the ones before it, for
    each position). The positions from the first with fewer than `min_tries` on share one figure, their pooled
    counts' (the later positions are tried least: only after every draft before them was accepted). None
    when nothing was tried."""
    if not sum(tried_at):
        return None
    out = []
    for i, tried in enumerate(tried_at):
        if tried < min_tries:
            rest = sum(tried_at[i:])
            if rest:
                out.append(round(sum(accepted_at[i:]) / rest, 4))
            break
        out.append(round(accepted_at[i] / tried, 4))
    return out


def request_quantiles(requests_by_bin: list[int], rates_by_bin: list[float], n: int = 20) -> list[float] | None:
    """`n` quantiles (at (i + 1/2) / n) of the ended requests' shares of asks given drafts, from a histogram
    (SpecController's propose bins: requests, and the sum of their shares, per bin): each the mean share of its
    bin. None when no request that was asked to draft ended."""
    total = sum(requests_by_bin)
    if not total:
        return None
    out, seen, b = [], 0, 0
    for i in range(n):
        q = (i + 0.5) / n * total
        while seen + requests_by_bin[b] < q:
            seen += requests_by_bin[b]
            b += 1
        out.append(round(rates_by_bin[b] / requests_by_bin[b], 4))
    return out


SPEC_TOTALS = ("verifications", "asked", "offered", "offered_tokens")
SPEC_LISTS = ("accepted_at", "tried_at", "propose_bin_requests", "propose_bin_rates")


def spec_between(before: dict, after: dict) -> dict:
    """What the engines' speculation did between two spec_counts: drafts accepted and tries by draft position,
    verifications, requests asked to draft, those given drafts, the drafts given, and the histogram of the ended
    requests' shares given."""
    return {**{key: [b - a for a, b in zip(before[key] + [0] * len(after[key]), after[key])] for key in SPEC_LISTS},
            **{key: after[key] - before[key] for key in SPEC_TOTALS}}


def spec_counts(specs) -> dict:
    """The engines' SpecControllers' counts, summed over the engines: drafts accepted and verifications that
    tried them, by draft position; verifications, requests asked to draft, those given drafts, the drafts given;
    and the histogram of the ended requests' shares of asks given drafts (requests, sum of shares; per bin)."""
    lists = {"accepted_at": [s.accepted_at for s in specs], "tried_at": [s.tried_at for s in specs],
             "propose_bin_requests": [s.propose_bin_requests for s in specs],
             "propose_bin_rates": [s.propose_bin_rates for s in specs]}
    out = {key: [sum(c) for c in itertools.zip_longest(*rows, fillvalue=0)] for key, rows in lists.items()}
    return {**out, "verifications": sum(s.num_verifications for s in specs), "asked": sum(s.num_asked for s in specs),
            "offered": sum(s.num_offered for s in specs), "offered_tokens": sum(s.num_offered_tokens for s in specs)}


def served_profile(profile: HardwareProfile, plan_samples, steps, label: str = "a workload",
                   min_steps: int = 20) -> HardwareProfile:
    """`profile` (a linear fit of `plan_samples`) fitted again on those and measured served `steps`: (shape,
    seconds) of one engine, or (shape, seconds, replica, start s) of a fleet (replay_fleet's), of which only the
    steps with no other replica stepping (overlap_groups) join the fit, and the fleet's corun_slowdown becomes the
    total time of its steps beside another's over the new fit's price of them (time_ratio; when there are
    `min_steps` of each; else the profile's is kept), and corun_by_kind the same for each pair of step kinds (a
    decode beside another replica's decode, ...) with `min_steps` of it, else for the step's own kind beside any
    (steps with a prefill are long and few, and seldom wholly beside one kind; they are compute bound and barely
    slowed, so the figure of all kinds, which the decodes make, would overprice them). A fleet's fit is then scaled
    by the total time of its steps alone over it (served_over_fit; a fit on relative error with the plan's steps
    meets their median, not their sum): the co-run figures are over those, so a step alone is priced where a co-run
    figure's 1.0 is. The fit records how the served steps compared with the plan's fit, decode-only steps and steps
    with a prefill apart. A decode's figures are then on the new fit's fixed cost (corun_part "fixed", fixed_factor;
    the whole-step ones stay in the fit's record): beside another's decode a one-row decode slows by a larger share
    of its time than a several-row one, and the held-out workload's mix of them need not be the compared one's. A
    step with a prompt keeps its whole-step figures (compute bound, it is barely slowed; its time varies more than
    the fixed cost itself)."""
    if profile.kind != "linear":
        raise ValueError(f"profile: only a linear (calibrated) cost model is fitted to served steps, "
                         f"got {profile.kind!r}")
    if len(steps) < min_steps:
        raise ValueError(f"steps: at least {min_steps} served steps are needed to fit, got {len(steps)}")
    fleet = len(steps[0]) > 2
    groups = overlap_groups(steps) if fleet else {"alone": list(steps), "beside": []}
    alone, beside = groups["alone"], groups["beside"]
    if len(alone) < min_steps:
        raise ValueError(f"steps: at least {min_steps} served steps with no other replica stepping are needed, "
                         f"got {len(alone)} (a lighter workload has more)")
    coef, quality = fit([*plan_samples, *((s[0], s[1]) for s in alone)])
    fitted = dataclasses.replace(profile, params={**profile.params, "coef": coef,
                                                  "knee_tokens": quality["knee_tokens"],
                                                  "hinge_tokens": quality["hinge_tokens"]})
    base = time_ratio(fitted, alone)
    if fleet:       # the co-run figures below are over the steps alone: the fit prices those where they ran
        fitted = dataclasses.replace(fitted, params={**fitted.params, "coef": [c * base for c in coef]})
    quality.update(plan_steps=len(plan_samples), served_steps=len(steps), served_alone_steps=len(alone),
                   served_over_fit=round(base, 4),
                   **{f"served_over_plan_fit_{kind}": round(step_ratio(
                       profile, [s for s in alone if step_kind(s[0][1]) == kind]), 4) for kind in STEP_KINDS})
    if "corun_steps" in profile.fit:
        quality["corun_steps"] = profile.fit["corun_steps"]
    slowdown, by_kind, part = profile.corun_slowdown, {}, profile.corun_part
    if fleet and len(beside) >= min_steps:
        slowdown = round(time_ratio(fitted, beside), 4)
        quality.update(served_corun_slowdown=slowdown, plan_corun_slowdown=profile.corun_slowdown,
                       served_beside_steps=len(beside))
        measured_by: dict[tuple[str, str], list] = {}
        for own in STEP_KINDS:              # by the kinds of the pair, where there are enough steps of it,
            pooled = [s for s in beside if step_kind(s[0][1]) == own]     # else by its own kind beside any
            for other in STEP_KINDS:
                cell = [s for s in groups[f"beside {other}"] if step_kind(s[0][1]) == own]
                measured = cell if len(cell) >= min_steps else pooled
                if len(measured) >= min_steps:
                    measured_by[own, other] = measured
                    by_kind.setdefault(own, {})[other] = round(time_ratio(fitted, measured), 4)
                quality[f"served_{own}_beside_{other}_steps"] = len(cell)
            quality[f"served_{own}_beside_steps"] = len(pooled)
        if coef[0] > 0 and "decode" in by_kind:     # a decode's figures on the fixed cost (corun_part), same steps
            part = "fixed"
            quality["served_corun_by_kind_step"] = {own: dict(row) for own, row in by_kind.items()}
            by_kind["decode"] = {other: fixed_factor(fitted, measured_by["decode", other]) for other in STEP_KINDS}
    return dataclasses.replace(fitted, corun_slowdown=slowdown, corun_by_kind=by_kind, corun_part=part, fit=quality,
                               source=f"{profile.source}; fitted again with {len(alone)} steps served of {label}"
                                      + (f" (co-run slowdown {slowdown:.3f} from {len(beside)} of them beside "
                                         f"another's)" if "served_corun_slowdown" in quality else ""))


def fixed_factor(profile: HardwareProfile, steps) -> float:
    """The co-run factor f of decode `steps` beside another's on `profile`'s fixed cost (corun_part "fixed"):
    1 + their total time over their price alone, less one price alone each, in fixed costs (time_ratio's
    figure, per step); at least 0.01."""
    model = profile.cost_model()
    extra = sum(s[1] - model.step_seconds(*s[0]) for s in steps) / (len(steps) * model.fixed_seconds())
    return round(max(1.0 + extra, 0.01), 4)


def whole_step(profile: HardwareProfile) -> HardwareProfile:
    """A served fit with its co-run figures on each step's whole time (corun_part "step"), as its record keeps
    them (served_corun_slowdown, served_corun_by_kind_step): the model before the fixed cost, to compare."""
    return dataclasses.replace(profile, corun_part="step", corun_slowdown=profile.fit["served_corun_slowdown"],
                               corun_by_kind=profile.fit["served_corun_by_kind_step"])


def overlap_groups(steps) -> dict[str, list]:
    """A fleet's real steps (replay_fleet's (shape, seconds, replica, start)) by whether another replica was
    stepping: "alone" the steps overlapped less than 10% of their time by another's, "beside" those overlapped
    more than 90% (the rest in neither), and of those "beside decode" / "beside prefill" the ones overlapped
    more than 90% by other replicas' steps of that kind (decode rows only / any prefill tokens)."""
    spans = [(start, start + t, i, step_kind(shape[1])) for shape, t, i, start in steps]
    by_start = sorted(spans)
    starts = [a for a, _, _, _ in by_start]
    longest = max((b - a for a, b, _, _ in spans), default=0.0)
    groups: dict[str, list] = {"alone": [], "beside": [], "beside decode": [], "beside prefill": []}
    for step, (a, b, i, _) in zip(steps, spans):
        lo, hi = np.searchsorted(starts, a - longest), np.searchsorted(starts, b)
        shared = {"decode": 0.0, "prefill": 0.0}
        for x, y, j, kind in by_start[lo:hi]:
            if j != i and y > a:
                shared[kind] += min(b, y) - max(a, x)
        d = b - a if b > a else math.inf
        if sum(shared.values()) < 0.1 * d:
            groups["alone"].append(step)
        elif sum(shared.values()) > 0.9 * d:
            groups["beside"].append(step)
            for kind, t in shared.items():
                if t > 0.9 * d:
                    groups[f"beside {kind}"].append(step)
    return groups


def overlap_ratios(profile, steps) -> dict:
    """A fleet's real steps against `profile` (step_ratio), split by overlap_groups; with each group's size."""
    groups = overlap_groups(steps)
    return {**{g: round(step_ratio(profile, groups[g]), 3) for g in ("alone", "beside")},
            "steps": {g: len(groups[g]) for g in ("alone", "beside")}}
