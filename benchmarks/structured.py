"""Structured output: what a JSON schema costs, what jump-forward gains, beside vLLM and llama.cpp.

One run, the default model (SmolLM2-135M-Instruct), greedy:
  1. kvflow, a batch of JSON-schema requests against the same requests unconstrained, each unconstrained
     request made to generate exactly as many tokens as its constrained twin (ignore_eos, max_tokens =
     that length): output tok/s and mean TPOT, rounds alternating (goal: the constraint costs <= 5%);
  2. kvflow, a schema with long fixed keys and values, jump-forward off and on: wall time, engine steps,
     whether the outputs are identical;
  3. peers on the same prompts and schema: vLLM's CPU build (xgrammar; a server, the batch sent at once)
     and llama.cpp (llama-cpp-python, its JSON-schema grammar; one request at a time, so kvflow is also
     measured one request at a time beside it).

    .venv/bin/python benchmarks/structured.py [--requests 16] [--rounds 3] [--peers vllm,llamacpp]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvflow import LLM, SamplingParams                          # noqa: E402
from kvflow.structured import StructuredOutputsParams as S       # noqa: E402

THINGS = ["a laptop", "a bicycle", "a coffee mug", "a pair of running shoes", "a desk lamp", "a backpack",
          "a smartphone", "a kitchen knife", "a tent", "a wrist watch", "a board game", "an electric kettle",
          "a guitar", "a camera", "a sofa", "a book about space"]
PRODUCT = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "category": {"enum": ["electronics", "sports", "home", "outdoor", "toys", "books", "music"]},
    "price": {"type": "number", "minimum": 0, "maximum": 10000},
    "in_stock": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "category", "price", "in_stock", "tags"], "additionalProperties": False}
# long fixed keys and values: most of the output is forced by the schema
FORM = {"type": "object", "properties": {
    "customer_account_reference_identifier": {"type": "integer", "minimum": 0, "maximum": 999},
    "order_fulfilment_status_description": {"enum": ["awaiting shipment from the central warehouse"]},
    "preferred_delivery_window_selection": {"enum": ["weekday mornings between eight and noon"]},
    "product_display_name": {"type": "string", "maxLength": 24}},
    "required": ["customer_account_reference_identifier", "order_fulfilment_status_description",
                 "preferred_delivery_window_selection", "product_display_name"], "additionalProperties": False}


def prompts(llm: LLM, n: int) -> list[str]:
    tok = llm.get_tokenizer()
    return [tok.apply_chat_template([{"role": "user", "content": f"Describe {THINGS[i % len(THINGS)]} for an online "
                                      "shop as a JSON object."}], add_generation_prompt=True) for i in range(n)]


def tpot(out) -> float | None:
    m, n = out.metrics, len(out.outputs[0].token_ids)
    if m is None or m.first_token_time is None or m.finished_time is None or n < 2:
        return None
    return (m.finished_time - m.first_token_time) / (n - 1)


def run_batch(llm: LLM, texts: list[str], params) -> dict:
    t0 = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    tp = [t for t in map(tpot, outs) if t is not None]
    return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "tpot_ms": 1e3 * statistics.mean(tp) if tp else None,
            "outs": outs}


def valid(text: str, schema: dict) -> bool:
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except Exception:
        return False


def kvflow_cost(llm: LLM, texts: list[str], rounds: int, max_tokens: int) -> dict:
    cons = SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=S(json=PRODUCT))
    first = run_batch(llm, texts, cons)                   # warm: the grammar's compile, and the lengths
    lengths = [len(o.outputs[0].token_ids) for o in first["outs"]]
    free = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in lengths]
    runs = {"constrained": [], "unconstrained": []}
    for _ in range(rounds):                               # alternate, so that drift hits both
        runs["unconstrained"].append(run_batch(llm, texts, free))
        runs["constrained"].append(run_batch(llm, texts, cons))
    best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in runs.items()}
    median = {k: statistics.median(r["tok_s"] for r in v) for k, v in runs.items()}
    texts_out = [o.outputs[0].text for o in best["constrained"]["outs"]]
    return {"lengths": lengths, "valid": sum(valid(t, PRODUCT) for t in texts_out), "n": len(texts_out),
            "finish": sorted({o.outputs[0].finish_reason for o in best["constrained"]["outs"]}),
            **{k: {m: r[m] for m in ("wall_s", "tokens", "tok_s", "tpot_ms")} for k, r in best.items()},
            "all_tok_s": {k: [round(r["tok_s"], 1) for r in v] for k, v in runs.items()},
            "median_tok_s": median, "example": texts_out[0]}


def kvflow_batch1(llm: LLM, texts: list[str], lengths: list[int], max_tokens: int) -> dict:
    res = {}
    for name, params in (("constrained", [SamplingParams(temperature=0, max_tokens=max_tokens,
                                                         structured_outputs=S(json=PRODUCT))] * len(texts)),
                         ("unconstrained", [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
                                            for k in lengths])):
        t0, n = time.perf_counter(), 0
        for t, p in zip(texts, params):
            n += len(llm.generate([t], p, use_tqdm=False)[0].outputs[0].token_ids)
        res[name] = {"tokens": n, "tok_s": n / (time.perf_counter() - t0)}
    return res


def kvflow_jump_forward(model: str, texts: list[str], rounds: int, max_tokens: int) -> dict:
    res, outs = {}, {}
    for jf in (False, True):
        llm = LLM(model=model, num_threads=2, jump_forward=jf)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=S(json=FORM))
        run_batch(llm, texts[:2], params)
        best = min((run_batch(llm, texts, params) for _ in range(rounds)), key=lambda r: r["wall_s"])
        outs[jf] = [o.outputs[0].text for o in best["outs"]]
        res["on" if jf else "off"] = {"wall_s": best["wall_s"], "tokens": best["tokens"], "tok_s": best["tok_s"],
                                      "valid": sum(valid(t, FORM) for t in outs[jf]),
                                      "forced_tokens": llm.engine.core.structured.num_jump_forward_tokens}
        del llm
    res["identical_outputs"] = sum(a == b for a, b in zip(outs[False], outs[True]))
    res["n"] = len(texts)
    res["speedup"] = res["off"]["wall_s"] / res["on"]["wall_s"]
    return res


def vllm_peer(texts: list[str], max_tokens: int, lengths: list[int], rounds: int) -> dict:
    from benchmarks import vllm_peer as vp
    port = 8813
    proc = vp.start_server(port, max_num_seqs=64)
    base = f"http://127.0.0.1:{port}"
    try:
        vp.wait_ready(base, proc)

        def batch(bodies):
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(len(bodies)) as ex:
                rs = list(ex.map(lambda b: vp._post(base, "/v1/completions", b), bodies))
            wall = time.perf_counter() - t0
            n = sum(r["usage"]["completion_tokens"] for r in rs)
            return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "texts": [r["choices"][0]["text"] for r in rs],
                    "lengths": [r["usage"]["completion_tokens"] for r in rs]}
        common = {"model": vp.SERVED_NAME, "temperature": 0}
        cons = [{**common, "prompt": t, "max_tokens": max_tokens, "structured_outputs": {"json": PRODUCT}}
                for t in texts]
        first = batch(cons)
        free = [{**common, "prompt": t, "max_tokens": k, "ignore_eos": True} for t, k in zip(texts, first["lengths"])]
        runs = {"constrained": [], "unconstrained": []}
        for _ in range(rounds):
            runs["unconstrained"].append(batch(free))
            runs["constrained"].append(batch(cons))
        best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in runs.items()}
        return {"version": vp.version_info(), "valid": sum(valid(t, PRODUCT) for t in best["constrained"]["texts"]),
                "n": len(texts), **{k: {m: r[m] for m in ("wall_s", "tokens", "tok_s")} for k, r in best.items()},
                "example": best["constrained"]["texts"][0]}
    finally:
        vp.stop(proc)


def llamacpp_peer(model: str, texts: list[str], max_tokens: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama, LlamaGrammar
    llm = Llama(model_path=model, n_threads=2, n_threads_batch=2, n_ctx=1024, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(PRODUCT), verbose=False)
    eos = llm.token_eos()
    res, lengths = {}, []
    for name in ("constrained", "unconstrained"):
        t0, n, outs = time.perf_counter(), 0, []
        for i, t in enumerate(texts):
            kw = dict(grammar=grammar, max_tokens=max_tokens) if name == "constrained" else \
                dict(max_tokens=lengths[i], logit_bias={eos: -100.0})
            r = llm.create_completion(t, temperature=0.0, repeat_penalty=1.0, **kw)
            k = r["usage"]["completion_tokens"]
            n += k
            outs.append(r["choices"][0]["text"])
            if name == "constrained":
                lengths.append(k)
        res[name] = {"tokens": n, "tok_s": n / (time.perf_counter() - t0)}
        if name == "constrained":
            res["valid"], res["example"] = sum(valid(o, PRODUCT) for o in outs), outs[0]
    res["version"], res["n"] = llama_cpp.__version__, len(texts)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch1-requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peers", default="vllm,llamacpp", help="comma-separated: vllm, llamacpp (or none)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "structured.json"))
    args = ap.parse_args(argv)
    from kvflow.config import default_model_path
    from kvflow.platform import cpu_info
    model = default_model_path()
    llm = LLM(model=model, num_threads=2)
    texts = prompts(llm, args.requests)
    result = {"machine": f"{cpu_info().summary()}; Python {platform.python_version()}",
              "model": os.path.basename(model), "requests": args.requests, "max_tokens": args.max_tokens}
    print("machine:", result["machine"])
    result["cost"] = cost = kvflow_cost(llm, texts, args.rounds, args.max_tokens)
    print(f"kvflow batch {args.requests}: constrained {cost['constrained']['tok_s']:.1f} tok/s (TPOT "
          f"{cost['constrained']['tpot_ms']:.1f} ms), unconstrained {cost['unconstrained']['tok_s']:.1f} tok/s "
          f"(TPOT {cost['unconstrained']['tpot_ms']:.1f} ms): cost "
          f"{100 * (1 - cost['constrained']['tok_s'] / cost['unconstrained']['tok_s']):.1f}% (best of "
          f"{args.rounds}), {100 * (1 - cost['median_tok_s']['constrained'] / cost['median_tok_s']['unconstrained']):.1f}% "
          f"(medians); valid "
          f"{cost['valid']}/{cost['n']}; all rounds {cost['all_tok_s']}")
    b1 = texts[:args.batch1_requests]
    result["batch1"] = kvflow_batch1(llm, b1, cost["lengths"][:len(b1)], args.max_tokens)
    print(f"kvflow batch 1: constrained {result['batch1']['constrained']['tok_s']:.1f} tok/s, unconstrained "
          f"{result['batch1']['unconstrained']['tok_s']:.1f} tok/s")
    del llm
    result["jump_forward"] = jf = kvflow_jump_forward(model, texts, args.rounds, args.max_tokens)
    print(f"jump-forward (long fixed keys): off {jf['off']['wall_s']:.2f} s, on {jf['on']['wall_s']:.2f} s "
          f"({jf['speedup']:.2f}x), forced tokens {jf['on']['forced_tokens']}, identical outputs "
          f"{jf['identical_outputs']}/{jf['n']}, valid {jf['off']['valid']}/{jf['on']['valid']}")
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    if "llamacpp" in peers:
        result["llamacpp"] = lc = llamacpp_peer(model, b1, args.max_tokens)
        print(f"llama.cpp {lc['version']} batch 1: constrained {lc['constrained']['tok_s']:.1f} tok/s, "
              f"unconstrained {lc['unconstrained']['tok_s']:.1f} tok/s, valid {lc['valid']}/{lc['n']}")
    if "vllm" in peers:
        result["vllm"] = v = vllm_peer(texts, args.max_tokens, cost["lengths"], args.rounds)
        print(f"vLLM CPU batch {args.requests}: constrained {v['constrained']['tok_s']:.1f} tok/s, unconstrained "
              f"{v['unconstrained']['tok_s']:.1f} tok/s: cost "
              f"{100 * (1 - v['constrained']['tok_s'] / v['unconstrained']['tok_s']):.1f}%; valid {v['valid']}/{v['n']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
