"""Speculative decoding: decode speed with and without drafts, on a copying workload and on open chat,
beside llama.cpp's prompt-lookup decoding, in one run on the default model (greedy).

  - copying: edit a given piece of code or text (rename, fix, reformat): the answer repeats most of the
    input, which is where n-gram (prompt lookup) drafts are accepted;
  - open chat: questions whose answers share little with the prompt: drafts are rarely found, and the
    adaptive rule must keep speculation from costing time.

kvflow is measured one request at a time (batch 1) and with the batch sent at once (batch 8), without
speculation and with the n-gram proposer; llama.cpp (llama-cpp-python, `LlamaPromptLookupDecoding`) one
request at a time. Reported: generated tok/s, speed-up, drafts accepted / proposed, the mean accepted length
per verification, and how many outputs are token-for-token identical to the run without speculation.

    .venv/bin/python benchmarks/spec_decode.py [--max-tokens 192] [--k 4] [--peers llamacpp|none]
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


def run(llm: LLM, prompts: list[str], max_tokens: int, batch: bool) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    if batch:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "ids": [o.outputs[0].token_ids for o in outs]}


def kvflow_runs(model: str, workloads: dict, max_tokens: int, k: int, rounds: int) -> dict:
    """Both engines loaded side by side, their rounds interleaved (drift on a shared machine hits both);
    the best round of each is kept."""
    llms = {name: LLM(model=model, num_threads=2, speculative_config=cfg)
            for name, cfg in (("off", None), ("ngram", {"method": "ngram", "num_speculative_tokens": k}))}
    res = {}
    for wname, asks in workloads.items():
        prompts = chat_prompts(llms["off"], asks)
        for llm in llms.values():
            run(llm, prompts[:2], 16, True)                       # warm
        for batch in (False, True):
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
    ap.add_argument("--peers", default="llamacpp")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "spec_decode.json"))
    args = ap.parse_args(argv)
    from kvflow.config import default_model_path
    from kvflow.platform import cpu_info
    model = default_model_path()
    workloads = {"copying": copying_tasks(), "open chat": CHAT}
    print(f"machine: {cpu_info().summary()}; Python {platform.python_version()}")
    kv = kvflow_runs(model, workloads, args.max_tokens, args.k, args.rounds)
    rows, out = [], {"machine": cpu_info().summary(), "k": args.k, "max_tokens": args.max_tokens, "kvflow": {}}
    for w in workloads:
        for batch in (False, True):
            off, on = kv[("off", w, batch)], kv[("ngram", w, batch)]
            same = sum(a == b for a, b in zip(off["ids"], on["ids"]))
            acc = on["accepted"] / on["drafts"] if on["drafts"] else 0.0
            mean_len = on["accepted"] / on["verifications"] if on["verifications"] else 0.0
            label = f"kvflow {w}, batch {'8' if batch else '1'}"
            rows.append(f"| {label} | {off['tok_s']:.1f} | {on['tok_s']:.1f} | {on['tok_s'] / off['tok_s']:.2f}x | "
                        f"{on['accepted']}/{on['drafts']} ({100 * acc:.0f}%) | {mean_len:.2f} | "
                        f"{same}/{len(off['ids'])} |")
            out["kvflow"][label] = {"off_tok_s": off["tok_s"], "ngram_tok_s": on["tok_s"], "accepted": on["accepted"],
                                    "drafts": on["drafts"], "verifications": on["verifications"], "identical": same}
    if "llamacpp" in args.peers:
        lc = llamacpp_runs(model, workloads, args.max_tokens, args.k)
        out["llamacpp"] = {}
        for w in workloads:
            off, on = lc[("off", w)], lc[("prompt lookup", w)]
            same = sum(a == b for a, b in zip(off["texts"], on["texts"]))
            label = f"llama.cpp {lc['version']} {w}, batch 1"
            rows.append(f"| {label} | {off['tok_s']:.1f} | {on['tok_s']:.1f} | {on['tok_s'] / off['tok_s']:.2f}x | "
                        f"n/a | n/a | {same}/{len(off['texts'])} |")
            out["llamacpp"][label] = {"off_tok_s": off["tok_s"], "lookup_tok_s": on["tok_s"], "identical": same}
    print(f"\n| run | no speculation tok/s | n-gram k={args.k} tok/s | speed-up | drafts accepted | "
          f"accepted per verification | identical outputs |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
