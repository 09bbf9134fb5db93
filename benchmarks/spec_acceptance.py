"""Speculation's acceptance in the simulator, by draft position or pooled: which reproduces a real speculative
run? One engine with speculation (default ngram, 4 drafts at every step) is calibrated (the plan), serves a trace in real
time, and the simulator then serves the same trace on a fit of the plan's and the served run's own steps (so
the step times are the run's: what is compared is the verifications), with the run's measured acceptance four
ways: the positions pooled into one figure and every ask drafting (what a served calibration recorded before);
one figure per draft position; that with the share of asks the proposer answered (an n-gram proposer finds
nothing without a match), as a served calibration records both; and that with each request's own share (a
repetitive answer matches at most steps, another at few: the served requests' shares by quantile, which a served
calibration's fit records). Two more rows are experiments the simulator does not offer (SimRunner's drafts
patched here): each request its own acceptance, measured request by request in the real run (the controller's
observe, wrapped), at every position or at the first draft only, ranked with its proposal rate. Reported: steps,
drafts accepted per verification, tokens per step, TPOT (median, p10, p90), TTFT, and the real requests' own
shares of drafts accepted.

    python benchmarks/mix_trace.py --out benchmarks/results/mix.jsonl
    python benchmarks/spec_acceptance.py --trace benchmarks/results/mix.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from kvflow.bench.metrics import compute_metrics, tpot
from kvflow.config import EngineConfig
from kvflow.sim.calibrate import build_core, calibrate
from kvflow.sim.cluster import Simulation
from kvflow.sim.replay import serve
from kvflow.sim.runner import PROPOSE_SALT, SimRunner, draw
from kvflow.sim.served import measured_acceptance, request_quantiles, served_profile, spec_between, spec_counts
from kvflow.sim.workload import read_trace

# every step drafts 4 (adaptive off): the adaptive controller's batch rule drafts only where speculation pays,
# which on this CPU with a batch of several requests is seldom (11 verifications in a 40-request run)
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "adaptive": false}'


def sim_counts(specs) -> dict:
    """The simulated replicas' speculation: verifications and drafts accepted."""
    return {"verifications": sum(s.num_verifications for s in specs), "accepted": sum(s.num_accepted for s in specs)}


def row(name: str, steps: int, counts: dict, tokens: int, metrics: dict, results) -> dict:
    """A run's figures; with its requests' TPOT at the 10th and 90th percentiles (how the requests' speeds
    spread: a speculation whose matches and acceptances belong to requests spreads them wider than one
    drawn alike for every request)."""
    v = counts["verifications"]
    tpots = [t for t in map(tpot, results) if t is not None]
    p10, p90 = (float(np.percentile(tpots, q)) * 1e3 for q in (10, 90))
    return {"run": name, "steps": steps, "verifications": v,
            "accepted_per_verification": round(counts["accepted"] / v, 3) if v else 0.0,
            "tokens_per_step": round(tokens / steps, 3), "median_tpot_ms": round(metrics["median_tpot_ms"], 2),
            "p10_tpot_ms": round(p10, 1), "p90_tpot_ms": round(p90, 1),
            "median_ttft_ms": round(metrics["median_ttft_ms"], 1),
            "output_tok_s": round(metrics["output_throughput"], 1)}


ROW_BANDS = ((0, 0, "prefill only"), (1, 16, "1-16 rows"), (17, 48, "17-48 rows"), (49, 1 << 30, "49+ rows"))


def price_by_rows(profile, steps) -> dict:
    """The measured steps' total time and the profile's price of them, by their decode rows (a verification of
    k drafts is k + 1 rows): where the fit prices the run's steps short or long."""
    model = profile.cost_model()
    out = {}
    for lo, hi, name in ROW_BANDS:
        band = [st for st in steps if lo <= st[0][0] <= hi]
        if band:
            out[name] = {"steps": len(band), "measured_s": round(sum(st[1] for st in band), 2),
                         "priced_s": round(sum(model.step_seconds(*st[0]) for st in band), 2)}
    return out


def watch_requests(spec) -> dict[str, list[int]]:
    """Each request's verifications, drafts verified, drafts accepted, positions tried and verifications that
    accepted the first draft, from now on (the controller's observe, wrapped on this instance)."""
    counts: dict[str, list[int]] = {}
    observe = spec.observe

    def counting(request_id: str, proposed: int, accepted: int) -> None:
        c = counts.setdefault(request_id, [0, 0, 0, 0, 0])
        c[0], c[1], c[2] = c[0] + 1, c[1] + proposed, c[2] + accepted
        c[3] += accepted + (accepted < proposed)           # positions tried until the first rejection
        c[4] += accepted > 0                               # verifications whose first draft was accepted
        observe(request_id, proposed, accepted)
    spec.observe = counting
    return counts


def own_acceptance_row(name, values, first_only, by_position, own_rates, config, fitted, trace) -> dict:
    """A simulation in which each request takes one of `values` (sorted; 20 quantiles of them) as its acceptance,
    at the same rank as its proposal rate: at every position, or at the first with by_position's after it."""
    quantiles = [values[min(int((i + 0.5) / 20 * len(values)), len(values) - 1)] for i in range(20)]
    drafts = SimRunner._drafts

    def own_drafts(self, seed, pos, num, stops):
        kept = self.acceptance
        mine = quantiles[int(draw(seed ^ PROPOSE_SALT, -1) * len(quantiles))]
        self.acceptance = (mine, *by_position[1:]) if first_only else (mine,)
        try:
            return drafts(self, seed, pos, num, stops)
        finally:
            self.acceptance = kept
    SimRunner._drafts = own_drafts
    try:
        sim = Simulation(config, dataclasses.replace(fitted, spec_acceptance=by_position, spec_propose_rate=own_rates))
        rec = sim.run(read_trace(trace))
    finally:
        SimRunner._drafts = drafts
    reps = sim.replicas()
    print(f"{name}, by quantile: {[round(a, 3) for a in quantiles]}")
    return row(f"sim, each request's {name} and proposal rate (experiment)", sum(r.runner.num_steps for r in reps),
               sim_counts([r.scheduler.spec for r in reps]), sum(r.scheduler.num_scheduled_tokens for r in reps),
               rec.summary(None, sim), rec.results())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True)
    p.add_argument("--speculative-config", default=NGRAM)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    kwargs = {"num_threads": args.threads, "max_num_seqs": args.max_num_seqs,
              "speculative_config": args.speculative_config}
    built = build_core(kwargs)
    core, rc, _ = built
    plan_steps: list = []
    profile = calibrate(kwargs, "spec-acceptance", cores=[built], samples=plan_steps)
    spec = core.scheduler.spec
    per_request = watch_requests(spec)
    before = spec_counts([spec])
    steps: list = []
    results, duration = serve([core], read_trace(args.trace), "round-robin", rc.config.cache.block_size, steps)
    run = spec_between(before, spec_counts([spec]))
    accepted_at, tried_at = run["accepted_at"], run["tried_at"]
    real_counts = {"verifications": run["verifications"], "accepted": sum(accepted_at)}
    by_position = measured_acceptance(accepted_at, tried_at)
    pooled = round(sum(accepted_at) / sum(tried_at), 4)
    propose_rate = round(run["offered"] / run["asked"], 4)
    own_rates = request_quantiles(run["propose_bin_requests"], run["propose_bin_rates"])
    fitted = served_profile(profile, plan_steps, steps, "the trace's real run")
    config = EngineConfig.from_kwargs(**kwargs, num_kv_blocks=rc.num_kv_blocks, max_model_len=rc.max_model_len,
                                      enable_prefix_caching=rc.config.cache.enable_prefix_caching)
    real_m = compute_metrics(results, duration)
    real_tokens = sum(s[0][0] + s[0][1] for s in steps)      # (decode rows + prefill tokens of each step)
    rows = [row("real", len(steps), real_counts, real_tokens, real_m, results)]
    for name, acceptance, rate in (("sim, pooled, every ask drafts (before)", pooled, 1.0),
                                   ("sim, by position, every ask drafts", by_position, 1.0),
                                   ("sim, by position, the proposal rate", by_position, propose_rate),
                                   ("sim, by position, each request's own proposal rate", by_position, own_rates)):
        sim = Simulation(config, dataclasses.replace(fitted, spec_acceptance=acceptance, spec_propose_rate=rate))
        rec = sim.run(read_trace(args.trace))
        reps = sim.replicas()
        counts = sim_counts([r.scheduler.spec for r in reps])
        rows.append(row(name, sum(r.runner.num_steps for r in reps), counts,
                        sum(r.scheduler.num_scheduled_tokens for r in reps), rec.summary(None, sim), rec.results()))
    # experiments: each request its own acceptance, ranked with its proposal rate (a request that repeats itself
    # both matches and accepts): the same at every position (its drafts accepted over the positions it tried), or
    # its own at the first position (its verifications that accepted the first draft) and the run's after it
    known = [c for c in per_request.values() if c[0] >= 5 and c[3]]
    for name, values, first_only in (("own acceptance at every position", [c[2] / c[3] for c in known], False),
                                     ("own first-draft acceptance", [c[4] / c[0] for c in known], True)):
        if values and own_rates:
            rows.append(own_acceptance_row(name, sorted(values), first_only, by_position, own_rates, config, fitted,
                                           args.trace))
    print(f"acceptance by draft position {by_position} (tries {tried_at}); pooled {pooled}; requests asked to "
          f"draft that got drafts {propose_rate} ({run['offered_tokens'] / max(run['offered'], 1):.2f} drafts "
          f"each); the requests' own shares by quantile {own_rates}")
    shares = sorted(c[2] / c[1] for c in per_request.values() if c[0] >= 5)
    if shares:
        print(f"the requests' own shares of drafts accepted ({len(shares)} requests with 5 or more verifications): "
              f"p10 {np.percentile(shares, 10):.3f}, median {np.median(shares):.3f}, "
              f"p90 {np.percentile(shares, 90):.3f}")
    prices = price_by_rows(fitted, steps)
    print("the real run's steps against the fit's price of them, by decode rows: " + "; ".join(
        f"{k}: {v['steps']} steps, measured {v['measured_s']} s, priced {v['priced_s']} s" for k, v in prices.items()))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"by_position": by_position, "pooled": pooled, "tried_at": tried_at,
                       "propose_rate": propose_rate, "request_propose_rates": own_rates,
                       "request_accepted_shares": shares, "price_by_rows": prices, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
