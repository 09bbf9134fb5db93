"""Batch-1 decode on the default model: kvflow dense (dequantized), int8, int4, gguf-kept (kvflow's default
where its int kernels run), and llama.cpp; kvflow's compute dtype is its auto one (--dtype).

One request, a short prompt, greedy, EOS ignored, `--tokens` generated tokens; the decode rate excludes
the prompt (timed from the first generated token to the last). All systems are loaded in one process,
then timed round by round (one run of each per round, best of `--runs` rounds after a warm-up round), on
the same GGUF file and prompt tokens. llama.cpp runs through
llama-cpp-python's low-level `generate` (n_threads = n_threads_batch = --threads), which never checks
EOS, as kvflow's ignore_eos does not either.

`--agreement` also generates greedily `--agree-prompts` prompts x `--agree-tokens` tokens with each system
and reports the share of tokens generated before the first difference from kvflow float32 (the GGUF's
weights dequantized exactly), and from kvflow dense in --dtype; and, more stable, the teacher-forced top-1
agreement: how often fp32's greedy token is the system's own top token given fp32's prefix.

    .venv/bin/python benchmarks/decode.py                       # the table
    .venv/bin/python benchmarks/decode.py --agreement --json out.json
    .venv/bin/python benchmarks/decode.py --systems gguf,llamacpp --context 2000   # decode at a long context
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "Write a short story about a robot who learns to paint."
CONTEXT_FILE = "/usr/share/common-licenses/Apache-2.0"     # --context's filler (Debian's base-files)
AGREE_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
                 "The three primary colors are", "Explain why the sky is blue.", "import numpy as np\n",
                 "My favourite recipe for pancakes:", "1, 1, 2, 3, 5, 8,", "The quick brown fox",
                 "Q: What is the boiling point of water?\nA:", "Dear hiring manager,", "The history of Rome"]

# system name -> kvflow's weights (the compute dtype is --dtype, kvflow's auto by default: bf16 where the CPU
# multiplies it natively, fp32 elsewhere); "bf16" is the old name of "dense"
KVFLOW_MODES = {"dense": "none", "bf16": "none", "int8": "int8", "int4": "int4", "gguf": "gguf", "auto": "auto"}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())
               if t.device.type != "meta") - sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                                                  if n.endswith((".cos", ".sin")))


def kvflow_decode_once(llm, prompt_ids: list[int], tokens: int, rid: str) -> float:
    """Seconds per decode step of one request (the prompt and first token excluded)."""
    from kvflow.sampling.params import SamplingParams
    eng = llm.engine
    eng.add_request(rid, None, prompt_ids, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    while not any(o.outputs[0].token_ids for o in eng.step()):     # the prompt (maybe chunked), first token
        pass
    t0, n = time.perf_counter(), 0
    while eng.has_unfinished_requests():
        eng.step()
        n += 1
    s = (time.perf_counter() - t0) / n
    llm.reset_prefix_cache()
    return s


def kvflow_greedy(llm, prompts_ids, tokens):
    from kvflow.sampling.params import SamplingParams
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts_ids],
                        SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def llamacpp_open(model, threads, n_ctx=1024):
    from llama_cpp import Llama
    return Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                 verbose=False)


def llamacpp_decode_once(llm, prompt_ids, tokens) -> float:
    llm.reset()
    gen = llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True)
    next(gen)                                         # prompt eval + first token
    t0 = time.perf_counter()
    for _ in itertools.islice(gen, tokens - 1):
        pass
    s = (time.perf_counter() - t0) / (tokens - 1)
    gen.close()
    return s


def llamacpp_greedy(llm, prompts_ids, tokens):
    outs = []
    for p in prompts_ids:
        llm.reset()
        gen = llm.generate(p, temp=0.0, repeat_penalty=1.0, reset=True)
        outs.append(list(itertools.islice(gen, tokens)))
        gen.close()
    return outs


def kvflow_teacher_forced(llm, prompts_ids, refs) -> list[list[int]]:
    """Per reference token: 1 if it is the model's most likely token given the prompt and the reference
    tokens before it (prompt logprobs; these run the many-row path of the layers and logits)."""
    from kvflow.sampling.params import SamplingParams
    outs = llm.generate([{"prompt_token_ids": p + r} for p, r in zip(prompts_ids, refs)],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [[int(o.prompt_logprobs[len(p) + i][t].rank == 1) for i, t in enumerate(r)]
            for o, p, r in zip(outs, prompts_ids, refs)]


def llamacpp_teacher_forced(model, threads, prompts_ids, refs) -> list[list[int]]:
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                logits_all=True, verbose=False)
    hits = []
    for p, r in zip(prompts_ids, refs):
        llm.reset()
        llm.eval(p + r)
        top = np.asarray(llm.scores[len(p) - 1:len(p) + len(r) - 1]).argmax(-1)
        hits.append([int(a == t) for a, t in zip(top, r)])
    return hits


def prefix_agreement(ref, got) -> float:
    same = sum(next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r)) for r, g in zip(ref, got))
    return same / sum(len(r) for r in ref)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--systems", default="dense,int8,int4,gguf,llamacpp",
                    help="comma list of dense (dequantized), int8, int4, gguf, auto (kvflow's default), llamacpp")
    ap.add_argument("--dtype", default="auto", help="kvflow's compute dtype (auto: bf16 where native, else fp32)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=0,
                    help="prompt length in tokens: license text in front of the prompt (default: the prompt alone)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--agreement", action="store_true")
    ap.add_argument("--agree-prompts", type=int, default=8)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()

    from kvflow import LLM
    from kvflow.config import default_model_path
    from kvflow.platform import capabilities, describe
    torch.set_num_threads(args.threads)
    model = args.model or default_model_path()
    systems = args.systems.split(",")
    load = os.getloadavg()
    print(f"# {os.path.basename(model)}; torch {torch.__version__} ({args.threads} threads); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; {args.tokens} tokens"
          f"{f' after a {args.context}-token prompt' if args.context else ''}, best of {args.runs}")
    print(f"# cpu: {describe()}")

    # load every system first, then time them round by round (best of --runs per system, after one
    # warm-up round): interleaving keeps a burst of load on this shared machine from hitting one system
    rows, engines, tokens_of, top1 = [], {}, {}, {}
    for name in systems:
        if name == "llamacpp":
            import llama_cpp
            engines[name] = llamacpp_open(model, args.threads, max(1024, args.context + args.tokens + 64))
            rows.append({"system": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                         "mode": "GGUF as stored", "weight_mb": os.path.getsize(model) / 1e6})
        else:
            quant, dtype = KVFLOW_MODES[name], args.dtype
            t0 = time.perf_counter()
            engines[name] = LLM(model, dtype=dtype, quantization=quant, max_num_seqs=max(8, args.agree_prompts),
                                kv_cache_memory_bytes=64 << 20)
            rows.append({"system": "kvflow", "mode": name, "load_s": round(time.perf_counter() - t0, 2),
                         "weight_mb": weight_bytes(engines[name].engine.core.runner.model) / 1e6})
    kv = next((e for n, e in engines.items() if n != "llamacpp"), None)
    prompt_ids = (kv.get_tokenizer().encode(PROMPT) if kv
                  else engines["llamacpp"].tokenize(PROMPT.encode(), add_bos=False))
    if args.context:             # a long context: license text in front of the prompt, cut to --context tokens
        with open(CONTEXT_FILE, encoding="utf-8") as f:
            text = f.read()
        filler = (kv.get_tokenizer().encode(text) if kv
                  else engines["llamacpp"].tokenize(text.encode(), add_bos=False))
        filler = (filler * (args.context // len(filler) + 1))[:max(0, args.context - len(prompt_ids))]
        prompt_ids = filler + prompt_ids
    best = {name: float("inf") for name in systems}
    for r in range(args.runs + 1):
        for name, llm in engines.items():
            if name == "llamacpp":
                s = llamacpp_decode_once(llm, prompt_ids, args.tokens)
            else:
                s = kvflow_decode_once(llm, prompt_ids, args.tokens, f"d{r}")
            if r:                                     # round 0 warms up
                best[name] = min(best[name], s)
        if r:
            print(f"  round {r}: " + ", ".join(f"{n} {best[n] * 1e3:.2f}" for n in systems) + " ms/token (best so far)",
                  flush=True)
    for name, row in zip(systems, rows):
        row.update(ms_per_token=best[name] * 1e3, tok_s=1 / best[name])
    if args.agreement:
        ref_llm = LLM(model, dtype="float32", quantization="none", max_num_seqs=args.agree_prompts,
                      kv_cache_memory_bytes=64 << 20)
        agree_ids = [ref_llm.get_tokenizer().encode(p) for p in AGREE_PROMPTS[:args.agree_prompts]]
        tokens_of["fp32"] = kvflow_greedy(ref_llm, agree_ids, args.agree_tokens)
        del ref_llm
        for name, llm in engines.items():
            tokens_of[name] = (llamacpp_greedy if name == "llamacpp" else kvflow_greedy)(llm, agree_ids,
                                                                                          args.agree_tokens)
            forced = (llamacpp_teacher_forced(model, args.threads, agree_ids, tokens_of["fp32"]) if name == "llamacpp"
                      else kvflow_teacher_forced(llm, agree_ids, tokens_of["fp32"]))
            top1[name] = sum(map(sum, forced)) / sum(map(len, forced))
    else:
        agree_ids = None

    lc = next((r for r in rows if r["system"].startswith("llama.cpp")), None)
    for r in rows:
        r["vs_llamacpp"] = r["tok_s"] / lc["tok_s"] if lc else None
        key = r["mode"] if r["system"] == "kvflow" else "llamacpp"
        if key in tokens_of:
            r["agree_fp32"] = prefix_agreement(tokens_of["fp32"], tokens_of[key])
            r["top1_fp32"] = top1[key]
            dense = tokens_of.get("dense", tokens_of.get("bf16"))
            if dense is not None:
                r["agree_bf16"] = prefix_agreement(dense, tokens_of[key])
    print("\n| system | weights | weight MB | ms/token | tok/s | vs llama.cpp |"
          + (" greedy agreement vs fp32 | vs bf16 | teacher-forced top-1 vs fp32 |" if agree_ids else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if agree_ids else ""))
    for r in rows:
        ratio = f"{r['vs_llamacpp']:.2f}x" if r["vs_llamacpp"] else "-"
        line = (f"| {r['system']} | {r['mode']} | {r['weight_mb']:.0f} | {r['ms_per_token']:.2f} | "
                f"{r['tok_s']:.1f} | {ratio} |")
        if agree_ids:
            line += (f" {r.get('agree_fp32', float('nan')):.2f} | {r.get('agree_bf16', float('nan')):.2f} |"
                     f" {r.get('top1_fp32', float('nan')):.3f} |")
        print(line)
    if agree_ids:
        print(f"\ngreedy agreement: share of tokens generated before the first difference, {len(agree_ids)} prompts x "
              f"{args.agree_tokens} tokens; fp32 = kvflow float32 on the GGUF's exactly dequantized weights. "
              f"teacher-forced top-1: share of fp32's greedy tokens that are the system's own top token given "
              f"fp32's prefix (kvflow: prompt logprobs, i.e. its many-row path)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "cpu": capabilities(), "load_average": load,
                       "threads": args.threads, "tokens": args.tokens,
                       "runs": args.runs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
