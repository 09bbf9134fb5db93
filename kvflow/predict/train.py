"""`kvflow predict train` and `kvflow predict eval`: train the learned length predictor on a model's own
outputs, and measure how well each predictor ranks and buckets output lengths.

  kvflow predict train --model M --out F [--num-prompts N] [--num-test M] [--max-tokens 512]
                       [--temperature 0.7] [--seed 0] [--dtype ...] [--data CACHE.npz]
  kvflow predict eval  --model M --predictor F [--num-prompts N]

Training data: the prompts of kvflow/predict/prompts.py ("train" split) are run through the model with
`LLM.chat`; the engine core records each request's "embed" and "hidden" features (`features_log`), and
the number of tokens the model generated is the label. Evaluation uses the "test" split (other topics).

Metrics, on the held-out prompts (importable: a benchmark reuses them):
  kendall_tau      Kendall's tau-b between predicted (expected length) and true lengths: ranking quality,
                   which is what shortest-job-first scheduling needs;
  bucket_accuracy  the share of requests whose most probable bucket is the true one (within=1: or a
                   neighbour).
Compared: the learned predictor's embed and hidden heads; a prompt-length-only baseline (a histogram per
prompt-length bucket of the training lengths); the online predictor after observing the training set
(without clients, and with the prompt's template as its client, i.e. when a client stands for one kind
of task); and the oracle: the length of a second sample of the same prompt with another seed, the noise
of sampling that no predictor can remove.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from kvflow.predict.base import EDGES, LengthEstimate, bucket_of, model_identity
from kvflow.predict.online import OnlinePredictor
from kvflow.predict.prompts import PromptItem, make_items

# prompt-length buckets of the prompt-length baseline
FINE_PROMPT_EDGES = (0, 16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192, 256, 384, 512, 1024, math.inf)

# ---- metrics ---------------------------------------------------------------------------------------


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of two sequences (ties in either count as neither concordant nor discordant, and
    shrink the normaliser); nan when fewer than two items or one sequence is constant. O(n^2) in numpy,
    in row blocks (fine for a few thousand items)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-d sequences of the same length, got {x.shape} and {y.shape}")
    n = len(x)
    s = nx = ny = 0.0
    for i in range(0, n, 512):
        dx = np.sign(x[i:i + 512, None] - x[None, :])
        dy = np.sign(y[i:i + 512, None] - y[None, :])
        s += float((dx * dy).sum())
        nx += float(np.abs(dx).sum())
        ny += float(np.abs(dy).sum())
    if nx == 0 or ny == 0:      # every pair counted twice in each sum: the factor cancels
        return math.nan
    return s / math.sqrt(nx * ny)


def bucket_accuracy(pred_buckets, lengths, edges: tuple[float, ...] = EDGES, within: int = 0) -> float:
    """The share of predicted buckets within `within` buckets of the bucket holding the true length."""
    true = np.array([bucket_of(float(n), edges) for n in lengths])
    pred = np.asarray(pred_buckets)
    return float(np.mean(np.abs(pred - true) <= within)) if len(true) else math.nan


def evaluate(predictions, lengths, cap: float = math.inf, edges: tuple[float, ...] = EDGES) -> dict:
    """Quality of one predictor: `predictions` are LengthEstimates (ranked by their mean, clipped to
    `cap`, and bucketed by their most probable bucket) or plain lengths (e.g. the oracle's second sample).
    Returns {"tau", "acc", "acc1", "n"}."""
    scores, buckets = [], []
    for p in predictions:
        if isinstance(p, LengthEstimate):
            scores.append(p.mean(cap))
            buckets.append(p.bucket())
        else:
            scores.append(float(p))
            buckets.append(bucket_of(float(p), edges))
    return {"tau": kendall_tau(scores, lengths), "acc": bucket_accuracy(buckets, lengths, edges),
            "acc1": bucket_accuracy(buckets, lengths, edges, within=1), "n": len(lengths)}


# ---- data ------------------------------------------------------------------------------------------


def collect(llm, items: list[PromptItem], max_tokens: int, temperature: float, seed: int | list[int],
            batch_size: int | None = None, with_features: bool = True) -> dict[str, np.ndarray]:
    """Run `items` through the model (`seed`: the sampling seed, or one per item, so that one pass can
    sample a prompt twice) and return per request: "lengths" (output tokens), "prompt_lens", "censored"
    (cut at max_tokens), "kinds", "templates" ("kind:index", the online baseline's client) and, with
    features, "embed" and "hidden" [N, hidden_size] from the engine core's features_log. All requests
    go in at once unless `batch_size` is set (fewer, longer decode tails).
    A request cut at max_tokens is censored: its length is kept as max_tokens (its true length is at
    least that), which puts it in the bucket that holds max_tokens."""
    from kvflow.sampling.params import SamplingParams
    core = llm.engine.core
    seeds = [seed] * len(items) if isinstance(seed, int) else list(seed)
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=s) for s in seeds]
    batch_size = batch_size or max(len(items), 1)
    out = {k: [] for k in ("lengths", "prompt_lens", "censored", "embed", "hidden")}
    try:
        for i in range(0, len(items), batch_size):
            batch = items[i:i + batch_size]
            if with_features:
                core.features_log = {}
            results = llm.chat([it.messages for it in batch], params[i:i + batch_size],
                               use_tqdm=sys.stderr.isatty())
            for r in results:
                n = len(r.outputs[0].token_ids)
                censored = r.outputs[0].finish_reason == "length"
                out["lengths"].append(max_tokens if censored else n)
                out["prompt_lens"].append(len(r.prompt_token_ids))
                out["censored"].append(censored)
                if with_features:
                    f = core.features_log[r.request_id]
                    out["embed"].append(np.asarray(f["embed"], np.float32))
                    out["hidden"].append(np.asarray(f["hidden"], np.float32))
    finally:
        if with_features:
            core.features_log = None
    data = {"lengths": np.array(out["lengths"], np.int64), "prompt_lens": np.array(out["prompt_lens"], np.int64),
            "censored": np.array(out["censored"], bool), "kinds": np.array([it.kind for it in items]),
            "templates": np.array([f"{it.kind}:{it.template}" for it in items])}
    if with_features:
        data["embed"], data["hidden"] = np.stack(out["embed"]), np.stack(out["hidden"])
    return data


def take(data: dict[str, np.ndarray], part: slice) -> dict[str, np.ndarray]:
    """The requests `part` of collected data."""
    return {k: v[part] for k, v in data.items()}


def baselines(train: dict[str, np.ndarray]) -> dict[str, OnlinePredictor]:
    """The feature-free predictors, fitted on (having observed) the training set, in order."""
    # a plain histogram per (fine) prompt-length bucket: chat prompts differ by only tens of tokens
    by_prompt_len = OnlinePredictor(decay=1.0, min_obs=3, prompt_edges=FINE_PROMPT_EDGES)
    online = OnlinePredictor()
    online_client = OnlinePredictor()
    for plen, n, tpl in zip(train["prompt_lens"], train["lengths"], train["templates"]):
        by_prompt_len.observe(int(plen), None, int(n))
        online.observe(int(plen), None, int(n))
        online_client.observe(int(plen), str(tpl), int(n))
    return {"prompt-length histogram": by_prompt_len, "online (no client)": online,
            "online (client = template)": online_client}


def quality_table(predictor, train: dict[str, np.ndarray], test: dict[str, np.ndarray],
                  oracle_lengths, cap: float) -> dict[str, dict]:
    """name -> evaluate(...) on `test` for the learned heads, the baselines and the oracle."""
    lengths = test["lengths"]
    rows = {}
    for head in ("embed", "hidden"):
        if head in predictor.heads:
            probs = predictor.predict_batch(head, test[head], test["prompt_lens"])
            rows[f"learned ({head} head)"] = evaluate([LengthEstimate(p.tolist(), predictor.edges) for p in probs],
                                                      lengths, cap, predictor.edges)
    for name, p in (baselines(train) if "templates" in train else {}).items():
        clients = test["templates"] if "client" in name else [None] * len(lengths)
        ests = [p.predict(int(pl), None if c is None else str(c), {}) for pl, c in zip(test["prompt_lens"], clients)]
        rows[name] = evaluate(ests, lengths, cap)
    if oracle_lengths is not None:
        rows["oracle (2nd sample)"] = evaluate(list(oracle_lengths), lengths, cap)
    return rows


def format_table(rows: dict[str, dict]) -> str:
    lines = [f"{'predictor':<30} {'tau':>7} {'bucket acc':>11} {'within 1':>9}"]
    for name, r in rows.items():
        lines.append(f"{name:<30} {r['tau']:>7.3f} {r['acc']:>11.3f} {r['acc1']:>9.3f}")
    return "\n".join(lines)


def describe(data: dict[str, np.ndarray], label: str) -> str:
    n = data["lengths"]
    by_kind = ", ".join(f"{k} {np.median(n[data['kinds'] == k]):.0f}" for k in ("short", "medium", "long")
                        if (data["kinds"] == k).any())
    return (f"{label}: {len(n)} requests, mean output {n.mean():.1f} tokens, {int(data['censored'].sum())} cut at "
            f"max_tokens; median by kind: {by_kind}")


# ---- the command line --------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `predict` (with `train` and `eval`) to a subparsers object; each sets func=run."""
    from kvflow.entrypoints.cli_args import add_engine_args
    p = subparsers.add_parser("predict", help="output-length predictors: `kvflow predict train|eval`")
    sub = p.add_subparsers(dest="predict_command", metavar="PREDICT", required=True)
    t = sub.add_parser("train", help="train the learned length predictor on the model's own outputs",
                       description="Generate answers to --num-prompts training prompts, record the model's "
                                   "features and output lengths, fit the predictor, save it to --out, and "
                                   "print its quality on --num-test held-out prompts. --seed seeds the "
                                   "prompts and the sampling (default 0).")
    t.add_argument("--out", required=True, help="the predictor file to write (.npz)")
    t.add_argument("--num-prompts", type=int, default=300, help="training prompts (default: 300)")
    t.add_argument("--num-test", type=int, default=None, help="held-out prompts (default: a third of --num-prompts)")
    t.add_argument("--max-tokens", type=int, default=512, help="output cap; longer answers are censored (default: 512)")
    t.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    t.add_argument("--epochs", type=int, default=100,
                   help="training epochs (full-batch steps) of each head (default: 100)")
    t.add_argument("--data", default=None, metavar="CACHE.npz",
                   help="reuse the collected features from this file if it exists, else save them there")
    add_engine_args(t)
    e = sub.add_parser("eval", help="evaluate a length predictor file on held-out prompts",
                       description="Generate answers to --num-prompts held-out prompts (twice, for the "
                                   "oracle) and print Kendall's tau and bucket accuracy of the predictor and "
                                   "of the baselines (fitted on the training lengths stored in the file).")
    e.add_argument("--predictor", required=True, help="a file written by `kvflow predict train`")
    e.add_argument("--num-prompts", type=int, default=100, help="held-out prompts (default: 100)")
    e.add_argument("--max-tokens", type=int, default=None, help="default: the value it was trained with")
    e.add_argument("--temperature", type=float, default=None, help="default: the value it was trained with")
    add_engine_args(e)
    for q in (t, e):
        q.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.predict_command == "train":
        return _train(args)
    return _eval(args)


def _open_llm(args):
    from kvflow.entrypoints.cli_args import engine_kwargs
    from kvflow.entrypoints.llm import LLM
    kw = engine_kwargs(args)
    kw["seed"] = kw.get("seed") or 0
    return LLM(**kw)


def _collect_with_test(llm, train_items: list[PromptItem], num_test: int, max_tokens: int, temperature: float,
                       seed: int):
    """One pass through the engine for the training prompts, the test prompts, and the test prompts again
    with another seed (the oracle): (train data, test data, the oracle's lengths)."""
    test_items = make_items(num_test, seed, "test")
    items = train_items + test_items + test_items
    seeds = [seed] * (len(train_items) + num_test) + [seed + 1] * num_test
    data = collect(llm, items, max_tokens, temperature, seeds)
    a, b = len(train_items), len(train_items) + num_test
    return take(data, slice(0, a)), take(data, slice(a, b)), data["lengths"][b:]


def _train(args) -> int:
    from kvflow.predict.learned import fit
    if args.num_prompts < 2 or args.max_tokens < 1:
        raise ValueError("--num-prompts must be >= 2 and --max-tokens >= 1")
    seed = args.seed or 0
    num_test = args.num_test if args.num_test is not None else max(2, args.num_prompts // 3)
    t0 = time.perf_counter()
    llm = _open_llm(args)
    identity = model_identity(llm.engine.model_path, llm.engine.model_config)
    cached = _load_data(args.data, identity, args) if args.data else None
    if cached is None:
        train_items = make_items(args.num_prompts, seed, "train")
        train, test, oracle = _collect_with_test(llm, train_items, num_test, args.max_tokens, args.temperature, seed)
        t_collect = time.perf_counter() - t0
        if args.data:
            np.savez(args.data, identity=np.array(str(sorted(identity.items()))), settings=np.array(_settings(args)),
                     **{f"{part}_{k}": v for part, d in (("train", train), ("test", test)) for k, v in d.items()},
                     oracle=oracle, collect_s=np.array(t_collect))
    else:
        train, test, oracle, t_collect = cached          # the time it took to generate them, back then
    print(describe(train, "train"), file=sys.stderr)
    t1 = time.perf_counter()
    meta = {"model_path": llm.engine.model_path, "dtype": llm.engine.resolved.dtype, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": seed, "prompt_split": "train", "collect_s": round(t_collect, 1)}
    extras = {f"train_{k}": train[k] for k in ("lengths", "prompt_lens", "censored", "templates")}
    predictor = fit(train["embed"], train["hidden"], train["lengths"], train["prompt_lens"], epochs=args.epochs,
                    seed=seed, identity=identity, meta=meta, extras=extras)
    t_fit = time.perf_counter() - t1
    predictor.meta["fit_s"] = round(t_fit, 2)
    predictor.save(args.out)
    print(f"saved {args.out} ({len(train['lengths'])} training requests; collecting {t_collect:.0f}s, "
          f"fitting {t_fit:.1f}s)", file=sys.stderr)
    print(describe(test, "test"), file=sys.stderr)
    print(format_table(quality_table(predictor, train, test, oracle, args.max_tokens)))
    print(f"train {len(train['lengths'])} / test {len(test['lengths'])} requests (+ {len(oracle)} second samples); "
          f"generating {t_collect:.0f}s, fitting {t_fit:.1f}s, total {time.perf_counter() - t0:.0f}s")
    return 0


def _settings(args) -> str:
    return f"{args.num_prompts} {args.num_test} {args.max_tokens} {args.temperature} {args.seed or 0}"


def _load_data(path: str, identity: dict, args):
    """(train, test, oracle, seconds it took) collected before and cached at `path`, if it is there (made
    with these settings); else None."""
    import os
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["identity"]) != str(sorted(identity.items())) or str(z["settings"]) != _settings(args):
            raise ValueError(f"{path} holds data collected for another model or other settings")
        parts = [{k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(p + "_")} for p in ("train", "test")]
        return parts[0], parts[1], z["oracle"], float(z["collect_s"]) if "collect_s" in z.files else math.nan


def _eval(args) -> int:
    from kvflow.predict.learned import LearnedPredictor
    predictor = LearnedPredictor.load(args.predictor, None)      # fail fast on a bad file, before the model
    meta = predictor.meta
    max_tokens = args.max_tokens or meta.get("max_tokens", 512)
    temperature = args.temperature if args.temperature is not None else meta.get("temperature", 0.7)
    seed = args.seed if args.seed is not None else meta.get("seed", 0)
    t0 = time.perf_counter()
    llm = _open_llm(args)
    predictor = LearnedPredictor.load(args.predictor, model_identity(llm.engine.model_path, llm.engine.model_config))
    train = {k[len("train_"):]: v for k, v in predictor.extras.items() if k.startswith("train_")}
    _, test, oracle = _collect_with_test(llm, [], args.num_prompts, max_tokens, temperature, seed)
    print(describe(test, "test"), file=sys.stderr)
    print(format_table(quality_table(predictor, train, test, oracle, max_tokens)))
    print(f"train {len(train.get('lengths', []))} / test {len(test['lengths'])} requests; "
          f"evaluation took {time.perf_counter() - t0:.0f}s")
    return 0
