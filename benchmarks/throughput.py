"""Offline throughput on workload W-CPU: kvflow vs Hugging Face transformers vs llama.cpp, same GGUF model.

W-CPU: 32 requests from random.Random(0); per request, in this order: a prompt length randint(32, 256),
that many token ids randint(0, 9999), an output length randint(32, 128). EOS is ignored, so the run
yields exactly 2,599 output tokens from 4,170 prompt tokens. Throughput = output tokens / wall time of
the whole run (prefill included), measured after a short warm-up run of each system.

Run (from the repository root):
    .venv/bin/python benchmarks/throughput.py                          # all importable systems
    .venv/bin/python benchmarks/throughput.py --systems kvflow --quick # smoke test: 8 requests
    .venv/bin/python benchmarks/throughput.py --kvflow-dtypes bfloat16,float32 --hf-dtypes float32,bfloat16
    .venv/bin/python benchmarks/throughput.py --json results.json

Systems run one after another in this process:
  kvflow    LLM(dtype=...), all requests in one generate() call (continuous batching).
  hf        transformers AutoModelForCausalLM on the same GGUF (dequantized), greedy generate() in static
            batches of 16 with left padding; each batch runs to its longest output length with EOS
            suppressed, and only each request's own output length counts as useful tokens.
  llamacpp  llama-cpp-python, one request at a time, greedy, exactly max_tokens tokens, n_threads = --threads.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import platform
import random
import time

os.environ.setdefault("TQDM_DISABLE", "1")   # transformers' GGUF loader draws a raw tqdm bar (set before torch imports tqdm)

import torch  # noqa: E402

FULL_PROMPT_TOKENS, FULL_OUTPUT_TOKENS = 4170, 2599


def make_workload(n: int = 32, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen = rng.randint(32, 256)
        prompt = [rng.randint(0, 9999) for _ in range(plen)]
        reqs.append((prompt, rng.randint(32, 128)))
    return reqs


def warmup_slice(reqs, n=4, max_tokens=16):
    return [(p, min(m, max_tokens)) for p, m in reqs[:n]]


# ---- systems: each returns (wall seconds, per-request output token lists, extra info dict) ----

def run_kvflow(model, reqs, dtype, quantization=None):
    from kvflow import LLM, SamplingParams
    llm = LLM(model=model, dtype=dtype, quantization=quantization)
    print(f"  weights: {llm.engine.resolved.config.model.quantization or 'dequantized'}", flush=True)

    def once(rs):
        prompts = [{"prompt_token_ids": p} for p, _ in rs]
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in rs]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    once(warmup_slice(reqs))
    wall, toks = once(reqs)
    return wall, toks, {}


def run_hf(model, reqs, dtype, batch_size=16):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    folder, name = os.path.split(os.path.abspath(model))
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def once(rs):
        toks, generated = [], 0
        t0 = time.perf_counter()
        for i in range(0, len(rs), batch_size):
            batch = rs[i:i + batch_size]
            width = max(len(p) for p, _ in batch)
            new = max(m for _, m in batch)            # static batch: everyone runs to the longest output
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
                                  max_new_tokens=new, min_new_tokens=new)   # min_new_tokens suppresses EOS
            assert out.shape[1] == width + new, out.shape
            generated += new * len(batch)
            toks += [out[j, width:width + m].tolist() for j, (_, m) in enumerate(batch)]
        return time.perf_counter() - t0, toks, generated

    once(warmup_slice(reqs))
    wall, toks, generated = once(reqs)
    return wall, toks, {"generated_tokens_incl_padding_waste": generated}


def run_llamacpp(model, reqs, threads=2):
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                verbose=False, logits_all=False)

    def once(rs):
        toks, decode_s, decode_n = [], 0.0, 0
        t0 = time.perf_counter()
        for prompt, m in rs:
            llm.reset()                               # no KV reuse between requests
            gen = llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True)
            first = next(gen)                         # prompt eval + first token
            t1 = time.perf_counter()
            out = [first] + list(itertools.islice(gen, m - 1))   # greedy, EOS not checked
            decode_s += time.perf_counter() - t1
            decode_n += m - 1
            gen.close()
            toks.append(out)
        return time.perf_counter() - t0, toks, decode_n / decode_s

    once(warmup_slice(reqs, n=2))
    wall, toks, decode_rate = once(reqs)
    return wall, toks, {"batch1_decode_tok_s": decode_rate}


# ---- driver ----

def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=None, help="comma list of kvflow,hf,llamacpp (default: all importable)")
    ap.add_argument("--model", default=None, help="GGUF file (default: kvflow's default SmolLM2-135M-Instruct)")
    ap.add_argument("--kvflow-dtypes", "--kvflow-dtype", "--dtype", default="auto",
                    help="comma list, one kvflow row each (auto = bfloat16)")
    ap.add_argument("--kvflow-quantizations", default="auto",
                    help="comma list of auto (kvflow's default: the GGUF's blocks kept where its int kernels "
                         "run), none (dequantized), int8, int4, gguf: one kvflow row per dtype and quantization")
    ap.add_argument("--hf-dtypes", "--hf-dtype", default="float32", help="comma list, one HF row each")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads (kvflow, hf) and llama.cpp n_threads/n_threads_batch (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="first 8 requests only (smoke test)")
    ap.add_argument("--json", default=None, help="save the results to this path")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from kvflow.config import default_model_path
    model = args.model or default_model_path()
    available = {"kvflow": True, "hf": importlib.util.find_spec("transformers") is not None,
                 "llamacpp": importlib.util.find_spec("llama_cpp") is not None}
    systems = args.systems.split(",") if args.systems else [s for s, ok in available.items() if ok]
    for s in systems:
        if s not in available:
            ap.error(f"unknown system {s!r}")

    reqs = make_workload()
    assert sum(len(p) for p, _ in reqs) == FULL_PROMPT_TOKENS and sum(m for _, m in reqs) == FULL_OUTPUT_TOKENS
    if args.quick:
        reqs = reqs[:8]
    n_out = sum(m for _, m in reqs)

    machine = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
               f"torch {torch.__version__} with {torch.get_num_threads()} threads, python {platform.python_version()}, "
               f"load average {os.getloadavg()[0]:.2f} at start")
    from kvflow.platform import capabilities, describe
    print(f"machine: {machine}")
    print(f"cpu: {describe()}")
    print(f"model: {os.path.basename(model)}")
    print(f"workload: W-CPU{' (--quick)' if args.quick else ''}: {len(reqs)} requests, "
          f"{sum(len(p) for p, _ in reqs)} prompt tokens, {n_out} output tokens, EOS ignored\n", flush=True)

    rows = []
    jobs = []
    for s in systems:
        if s == "kvflow":
            for q in args.kvflow_quantizations.split(","):
                quant = None if q == "none" else q
                jobs += [("kvflow", d + (", dequantized" if quant is None else f", {quant}"),
                          lambda d=d, quant=quant: run_kvflow(model, reqs, d, quant))
                         for d in args.kvflow_dtypes.split(",")]
        elif s == "hf":
            jobs += [("hf transformers", d, lambda d=d: run_hf(model, reqs, d, args.hf_batch_size))
                     for d in args.hf_dtypes.split(",")]
        else:
            import llama_cpp
            jobs.append((f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "GGUF as stored",
                         lambda: run_llamacpp(model, reqs, args.threads)))
    for system, dtype, fn in jobs:
        print(f"running {system} [{dtype}] ...", flush=True)
        wall, toks, extra = fn()
        gc.collect()
        assert [len(t) for t in toks] == [m for _, m in reqs], f"{system}: wrong output lengths"
        if system == "kvflow" and dtype.startswith("auto"):
            from kvflow.config import resolve_dtype        # what auto is on this CPU
            dtype = dtype.replace("auto", f"{resolve_dtype('auto', 'cpu')} (auto)", 1)
        rows.append({"system": system, "dtype": dtype, "output_tokens": n_out, "wall_s": wall,
                     "tok_s": n_out / wall, "tokens": toks, **extra})
        print(f"  {n_out / wall:.1f} tok/s in {wall:.2f} s", flush=True)

    hf_ref = next((r for r in rows if r["system"] == "hf transformers"), None)
    lc_ref = next((r for r in rows if r["system"].startswith("llama.cpp")), None)
    print("\n| system | dtype | output tokens | wall s | tok/s | vs HF transformers | vs llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        vs_hf = f"{r['tok_s'] / hf_ref['tok_s']:.2f}x" if hf_ref else "-"
        vs_lc = f"{r['tok_s'] / lc_ref['tok_s']:.2f}x" if lc_ref else "-"
        print(f"| {r['system']} | {r['dtype']} | {r['output_tokens']} | {r['wall_s']:.2f} | "
              f"{r['tok_s']:.1f} | {vs_hf} | {vs_lc} |")
    print()
    if hf_ref:
        print(f"HF notes: static batches of {args.hf_batch_size}, left padded; each batch generates to its longest "
              f"output ({hf_ref['generated_tokens_incl_padding_waste']} tokens generated), only each request's "
              f"own output length ({n_out}) is counted.")
    if lc_ref:
        print(f"llama.cpp batch-1 decode alone (prompt excluded): {lc_ref['batch1_decode_tok_s']:.1f} tok/s; "
              f"n_threads={args.threads}, n_threads_batch={args.threads}, one request at a time.")
    if hf_ref and hf_ref["dtype"] == "float32":
        for r in rows:
            if r is not hf_ref:
                same = [common_prefix(a, b) for a, b in zip(r["tokens"], hf_ref["tokens"])]
                full = sum(s == len(a) for s, a in zip(same, r["tokens"]))
                print(f"greedy agreement with HF float32, {r['system']} [{r['dtype']}]: request 0 matches for "
                      f"{same[0]}/{len(r['tokens'][0])} tokens; {full}/{len(same)} requests identical")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "cpu": capabilities(), "model": model, "quick": args.quick, "requests": len(reqs),
                       "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}, f, indent=2)
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
