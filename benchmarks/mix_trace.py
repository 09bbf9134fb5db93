"""A trace file (docs/sim.md's format) of real chat prompts with the default model's own output lengths: the
scheduling benchmark's `mix` (benchmarks/scheduling.py: 50% short questions, 20% medium, 30% long generations
from the test split of kvflow/predict/prompts.py, which the learned length predictor never saw; bursty
arrivals), rendered with the model's chat template, each with the length of the model's greedy answer (up to
--max-tokens; one generation pass, about a minute here). The simulator and the real engine then serve the
same prompts to the same lengths (ignore_eos), so a length predictor reads real text and its estimates can be
right or wrong as they are in serving:

    python benchmarks/mix_trace.py --out benchmarks/results/mix.jsonl
    python benchmarks/sim_fidelity.py --workload benchmarks/results/mix.jsonl \\
        --engine scheduling_policy=sjf --engine length_predictor=benchmarks/results/length_predictor_smollm2.npz
"""
from __future__ import annotations

import argparse
import sys

from kvflow.bench.serve import arrival_times
from kvflow.entrypoints.llm import LLM
from kvflow.predict.prompts import make_items
from kvflow.sampling.params import SamplingParams
from kvflow.sim.workload import SimRequest, write_trace

KINDS = {"short": 0.5, "medium": 0.2, "long": 0.3}     # scheduling.py's mix


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=2.5, help="mean arrivals per second (gamma, burstiness 0.3)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    items = make_items(args.requests, seed=args.seed, split="test", kinds=KINDS)
    llm = LLM()                        # (the default dtype: the lengths the model gives as served here)
    outs = llm.chat([it.messages for it in items], SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                    use_tqdm=False)
    times = arrival_times(len(items), args.rate, burstiness=0.3, seed=args.seed)
    requests = [SimRequest(t, list(o.prompt_token_ids), max(len(o.outputs[0].token_ids), 1))
                for t, o in zip(times, outs)]
    write_trace(requests, args.out)
    lengths = sorted(r.output_len for r in requests)
    print(f"{args.out}: {len(requests)} requests over {times[-1]:.1f} s; prompts "
          f"{min(len(r.prompt_token_ids) for r in requests)}-{max(len(r.prompt_token_ids) for r in requests)} "
          f"tokens; outputs {lengths[0]}-{lengths[-1]}, median {lengths[len(lengths) // 2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
