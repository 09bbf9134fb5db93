"""int8 KV cache against the unquantized cache: greedy agreement, perplexity, KV blocks, decode throughput.

For each compute dtype (bf16 and fp32), one engine with kv_cache_dtype="auto" and one with "int8" run the
same prompts greedily (EOS ignored); agreement is the fraction of output positions whose token is the
same, and the mean length of the identical prefix. Perplexity is `kvflow eval perplexity` on a license
text (with int8, attention reads the dequantized cache whatever the prefill chunk, --chunk).

    .venv/bin/python benchmarks/kv_int8.py                     # 16 prompts x 64 tokens, Apache-2.0
    .venv/bin/python benchmarks/kv_int8.py --dtypes bfloat16 --num-prompts 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvflow import LLM, SamplingParams  # noqa: E402
from kvflow.eval import perplexity  # noqa: E402
from benchmarks.prompts import AGREEMENT_PROMPTS as PROMPTS  # noqa: E402


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    same = total = prefix = 0
    for x, y in zip(a, b):
        same += sum(p == q for p, q in zip(x, y))
        total += len(x)
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix += n
    return same / total, prefix / len(a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--file", default="/usr/share/common-licenses/Apache-2.0")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="perplexity over the file's first N tokens")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens of the perplexity engines")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    prompts = (PROMPTS * (1 + args.num_prompts // len(PROMPTS)))[:args.num_prompts]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows, outs = [], {}
    for dtype in args.dtypes.split(","):
        for kv in ("auto", "int8"):
            llm = LLM(model=args.model, dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=256 << 20)
            llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
            t0 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            gen_s = time.perf_counter() - t0
            outs[dtype, kv] = [o.outputs[0].token_ids for o in res]
            blocks = llm.engine.resolved.num_kv_blocks
            del llm
            llm = LLM(model=args.model, dtype=dtype, kv_cache_dtype=kv, max_num_batched_tokens=args.chunk,
                      max_model_len=args.ppl_tokens + 1)
            ppl = perplexity(llm, text, num_tokens=args.ppl_tokens)
            del llm
            rows.append(dict(dtype=dtype, kv_cache_dtype=kv, kv_blocks_256MiB=blocks, ppl=ppl.ppl,
                             ppl_tokens=ppl.num_tokens, ppl_s=ppl.seconds,
                             gen_tok_s=len(prompts) * args.max_tokens / gen_s))
            print(rows[-1], file=sys.stderr)
    ref32 = outs.get(("float32", "auto"))
    print(f"| dtype | KV cache | blocks in 256 MiB | greedy agreement vs auto, same dtype (tokens / mean identical "
          f"prefix) | vs float32 auto | perplexity ({rows[0]['ppl_tokens']} tokens, chunk {args.chunk}) "
          f"| generate tok/s |")
    print("|---|---|---:|---|---|---:|---:|")
    for r in rows:
        key = (r["dtype"], r["kv_cache_dtype"])
        same, prefix = agreement(outs[key], outs[r["dtype"], "auto"])
        r["agreement"], r["identical_prefix"] = same, prefix
        vs32 = "-"
        if ref32 is not None:
            r["agreement_fp32"], r["identical_prefix_fp32"] = agreement(outs[key], ref32)
            vs32 = f"{r['agreement_fp32']:.3f} / {r['identical_prefix_fp32']:.1f}"
        print(f"| {r['dtype']} | {r['kv_cache_dtype']} | {r['kv_blocks_256MiB']} | {same:.3f} / {prefix:.1f} | {vs32} "
              f"| {r['ppl']:.4f} | {r['gen_tok_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
