"""Speculative decoding: decode speed with and without drafts, on a copying workload and on open chat,
beside llama.cpp's prompt-lookup decoding, in one run on the default model (greedy).

  - copying: edit a given piece of code or text (rename, fix, reformat): the answer repeats most of the
    input, which is where n-gram (prompt lookup) drafts are accepted;
  - open chat: questions whose answers share little with the prompt: n-gram drafts are rarely found, and the
    adaptive rule must keep speculation from costing time.

Proposers (--methods): `ngram` (prompt lookup); `draft_model` with the default model's own GGUF file kept in
its Q4_1 blocks (`quantization: "gguf"`) as the draft of the same file dequantized to bf16: self-speculation
with a quantized copy (same tokenizer, about 3.4x cheaper batch-1 decode); `layer_skip` (the target's first
--layers layers, default a quarter, and its head).

kvflow is measured one request at a time (batch 1) and with the batch sent at once (batch 8), without
speculation and with each proposer; llama.cpp (llama-cpp-python, `LlamaPromptLookupDecoding`) one request
at a time. Reported: generated tok/s, speed-up, drafts accepted / proposed, the mean accepted length per
verification, and how many outputs are token-for-token identical to the run without speculation (bf16: a
verification's k + 1 rows may round differently from a one-row decode, so near-ties can flip).

    .venv/bin/python benchmarks/spec_decode.py [--max-tokens 192] [--k 4] [--methods ngram,draft_model,layer_skip]
        [--batches 1,8] [--prompts N] [--rounds 3] [--peers llamacpp|none]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvflow import LLM, SamplingParams                          # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def copying_tasks() -> list[str]:
    """Edits of real code and text from this repository: rename, document, reformat."""
    import kvflow.spec.ngram as ngram
    import kvflow.registry as registry
    import kvflow.scheduler.priority as priority
    import kvflow.scheduler.fair as fair
    from kvflow.sampling import params
    src = [inspect.getsource(ngram.lookup), inspect.getsource(registry.Registry),
           inspect.getsource(priority), inspect.getsource(fair.parse_client_weights),
           inspect.getsource(params.SamplingParams._stop_strings), inspect.getsource(params.SamplingParams._logit_bias)]
    asks = ["Rename every variable `n` to `count` and return the whole code.",
            "Add a one-line comment above each method and return the whole code.",
            "Return the same code with double quotes replaced by single quotes.",
            "Return the whole code unchanged except that the function name gets the prefix `kv_`.",
            "Return the code with every `if` statement followed by a blank line.",
            "Return the same code, keeping everything, with type hints removed."]
    return [f"{a}\n\n```python\n{s}```" for a, s in zip(asks, src)] + \
        [f"Fix the typos in this text and return it whole:\n\n{_TEXT}", f"Return this text with every sentence on "
         f"its own line:\n\n{_TEXT}"]


_TEXT = ("kvflow is an LLM inference systme written in Python. It implements the operators and algoritms of "
         "request processing, model execution and memory managment: paged attention, continous batching, "
         "chunked prefill, prefix caching, preemption by swap or recompute, and speculative decoding. Each "
         "runtime the survey compares becomes a preset of kvflow, and its simulator compares them at cluster "
         "scale.")

CHAT = ["Write a short story about a robot who learns to paint.", "What are three good habits for staying healthy?",
        "Explain how a rainbow forms.", "Give me a recipe for a simple tomato soup.",
        "Why is the sky blue? Answer for a child.", "Describe the city of Paris in a few sentences.",
        "What should I pack for a weekend hiking trip?", "Write a polite email asking for a day off."]


def chat_prompts(llm: LLM, asks: list[str]) -> list[str]:
    tok = llm.get_tokenizer()
    return [tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True) for a in asks]


def run(llm: LLM, prompts: list[str], max_tokens: int, batch: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "ids": [o.outputs[0].token_ids for o in outs]}


def spec_config(method: str, model: str, k: int, layers: int | None) -> dict:
    if method == "draft_model":          # self-speculation with a quantized copy: the same GGUF, its Q4_1 kept
        return {"method": "draft_model", "model": model, "quantization": "gguf", "num_speculative_tokens": k}
    if method == "layer_skip":
        return {"method": "layer_skip", "num_layers": layers, "num_speculative_tokens": k}
    return {"method": method, "num_speculative_tokens": k}


def kvflow_runs(model: str, workloads: dict, max_tokens: int, k: int, rounds: int, methods: list[str],
                batches: list[int], layers: int | None) -> dict:
    """Every engine loaded side by side, their rounds interleaved (drift on a shared machine hits all of them);
    the best round of each is kept. Batch b: the prompts sent b at a time."""
    llms = {"off": LLM(model=model, num_threads=2)}
    for m in methods:
        llms[m] = LLM(model=model, num_threads=2, speculative_config=spec_config(m, model, k, layers))
    res = {}
    for wname, asks in workloads.items():
        prompts = chat_prompts(llms["off"], asks)
        for llm in llms.values():
            run(llm, prompts[:2], 16, 2)                          # warm
        for batch in batches:
            runs = {name: [] for name in llms}
            for _ in range(rounds):
                for name, llm in llms.items():
                    sp = llm.engine.core.scheduler.spec
                    before = (sp.num_proposed, sp.num_accepted, sp.num_verifications) if sp else (0, 0, 0)
                    r = run(llm, prompts, max_tokens, batch)
                    after = (sp.num_proposed, sp.num_accepted, sp.num_verifications) if sp else (0, 0, 0)
                    runs[name].append({**r, **dict(zip(("drafts", "accepted", "verifications"),
                                                       (x - y for x, y in zip(after, before))))})
            for name, rs in runs.items():
                res[(name, wname, batch)] = max(rs, key=lambda r: r["tok_s"])
    return res


def llamacpp_runs(model: str, workloads: dict, max_tokens: int, k: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    res = {"version": llama_cpp.__version__}
    tok_llm = LLM(model=model, num_threads=2)
    prompts = {w: chat_prompts(tok_llm, asks) for w, asks in workloads.items()}
    del tok_llm
    for name, draft in (("off", None), ("prompt lookup", LlamaPromptLookupDecoding(num_pred_tokens=k))):
        llm = Llama(model_path=model, n_threads=2, n_threads_batch=2, n_ctx=2048, verbose=False, draft_model=draft)
        for w, ps in prompts.items():
            llm.create_completion(ps[0], max_tokens=8, temperature=0.0)
            t0, n, texts = time.perf_counter(), 0, []
            for p in ps:
                r = llm.create_completion(p, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)
                n += r["usage"]["completion_tokens"]
                texts.append(r["choices"][0]["text"])
            wall = time.perf_counter() - t0
            res[(name, w)] = {"tok_s": n / wall, "tokens": n, "texts": texts}
        del llm
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens (and llama.cpp's num_pred_tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="ngram", help="comma-separated: ngram, draft_model, layer_skip")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (prompts sent at once)")
    ap.add_argument("--prompts", type=int, default=0, help="the first N prompts of each workload (0: all 8)")
    ap.add_argument("--layers", type=int, default=None, help="layer_skip's num_layers (default: a quarter)")
    ap.add_argument("--peers", default="llamacpp")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "spec_decode.json"))
    args = ap.parse_args(argv)
    from kvflow.config import default_model_path
    from kvflow.platform import cpu_info
    model = default_model_path()
    methods = [m for m in args.methods.split(",") if m]
    batches = [int(b) for b in args.batches.split(",")]
    n = args.prompts or None
    workloads = {"copying": copying_tasks()[:n], "open chat": CHAT[:n]}
    print(f"machine: {cpu_info().summary()}; Python {platform.python_version()}; load average "
          f"{open('/proc/loadavg').read().split()[:3]}")
    kv = kvflow_runs(model, workloads, args.max_tokens, args.k, args.rounds, methods, batches, args.layers)
    rows, out = [], {"machine": cpu_info().summary(), "k": args.k, "max_tokens": args.max_tokens, "kvflow": {}}
    for w in workloads:
        for batch in batches:
            off = kv[("off", w, batch)]
            label = f"kvflow {w}, batch {batch}"
            out["kvflow"][label] = {"off_tok_s": off["tok_s"]}
            for m in methods:
                on = kv[(m, w, batch)]
                same = sum(a == b for a, b in zip(off["ids"], on["ids"]))
                acc = on["accepted"] / on["drafts"] if on["drafts"] else 0.0
                mean_len = on["accepted"] / on["verifications"] if on["verifications"] else 0.0
                rows.append(f"| {label} | {m} | {off['tok_s']:.1f} | {on['tok_s']:.1f} | "
                            f"{on['tok_s'] / off['tok_s']:.2f}x | {on['accepted']}/{on['drafts']} ({100 * acc:.0f}%) | "
                            f"{mean_len:.2f} | {same}/{len(off['ids'])} |")
                out["kvflow"][label][m] = {"tok_s": on["tok_s"], "accepted": on["accepted"], "drafts": on["drafts"],
                                           "verifications": on["verifications"], "identical": same}
    if "llamacpp" in args.peers:
        lc = llamacpp_runs(model, workloads, args.max_tokens, args.k)
        out["llamacpp"] = {}
        for w in workloads:
            off, on = lc[("off", w)], lc[("prompt lookup", w)]
            same = sum(a == b for a, b in zip(off["texts"], on["texts"]))
            label = f"llama.cpp {lc['version']} {w}, batch 1"
            rows.append(f"| {label} | prompt lookup | {off['tok_s']:.1f} | {on['tok_s']:.1f} | "
                        f"{on['tok_s'] / off['tok_s']:.2f}x | n/a | n/a | {same}/{len(off['texts'])} |")
            out["llamacpp"][label] = {"off_tok_s": off["tok_s"], "lookup_tok_s": on["tok_s"], "identical": same}
    out["load_average"] = open("/proc/loadavg").read().split()[:3]
    print(f"\n| run | proposer (k={args.k}) | no speculation tok/s | with it tok/s | speed-up | drafts accepted | "
          f"accepted per verification | identical outputs |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"load average after: {out['load_average']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
