"""`kvflow bench serve`: a serving load generator with vLLM `bench serve` semantics.

It sends streamed OpenAI requests (/v1/completions or /v1/chat/completions) to a running server at a
chosen arrival rate and measures, per request: TTFT (time to the first chunk with text), ITL (gaps
between successive text chunks), E2E latency and output tokens; then TPOT = (E2E - TTFT) / (output
tokens - 1), throughput and goodput (requests/s meeting every given SLO).

Output lengths are made exact by default: each request sends `"ignore_eos": true` (vLLM's field;
kvflow's server supports it) and `logit_bias` -100 on the tokenizer's end-of-sequence ids (the
standard OpenAI field; llama-cpp-python's server, which drops unknown fields such as `ignore_eos`,
honours it). Output tokens come from the final `usage` chunk when the server sends one
(`stream_options.include_usage`); else, when the stream finished with "length", they are the
max_tokens asked for (llama-cpp-python's server sends no usage and may merge several tokens into one
chunk, so chunks undercount); else the number of text chunks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from kvflow.bench.datasets import RequestSpec, sample_chat, sample_multitenant, sample_random
from kvflow.bench.metrics import RequestResult, compute_metrics, format_summary, plot_result, save_result

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DATASETS = ("random", "chat", "multitenant")
SLO_KEYS = ("ttft", "tpot", "e2el")
# End-of-sequence tokens llama.cpp treats as end-of-generation by their text; banned with the model's EOS.
_EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "</s>")


@dataclass
class BenchConfig:
    """Everything one benchmark run needs (the CLI options, parsed)."""
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None            # None: the first id of GET /v1/models
    api_key: str | None = None
    dataset_name: str = "random"
    num_prompts: int = 100
    random_input_len: int = 256
    random_output_len: int = 64
    random_range_ratio: float = 0.0
    chat_output_len: int | None = None
    multitenant_tenants: int = 6        # --dataset-name multitenant: system prompts,
    multitenant_turns: int = 4          # ... turns per session (sessions: num_prompts / turns, rounded up),
    multitenant_output_len: int = 32    # ... output tokens of every request
    tokenizer: str | None = None        # None: the default model's GGUF
    seed: int = 0
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict = field(default_factory=dict)
    goodput: dict[str, float] = field(default_factory=dict)   # {"ttft": ms, "tpot": ms, "e2el": ms}
    warmup: int = 1
    timeout: float = 600.0              # seconds without a byte before a request fails

    def validate(self) -> None:
        checks = [
            (self.endpoint in ENDPOINTS, "--endpoint", f"must be one of {ENDPOINTS}", self.endpoint),
            (self.dataset_name in DATASETS, "--dataset-name", f"must be one of {DATASETS}", self.dataset_name),
            (self.num_prompts >= 1, "--num-prompts", "must be >= 1", self.num_prompts),
            (self.random_input_len >= 1, "--random-input-len", "must be >= 1", self.random_input_len),
            (self.random_output_len >= 1, "--random-output-len", "must be >= 1", self.random_output_len),
            (0 <= self.random_range_ratio < 1, "--random-range-ratio", "must be in [0, 1)", self.random_range_ratio),
            (self.chat_output_len is None or self.chat_output_len >= 1, "--chat-output-len", "must be >= 1",
             self.chat_output_len),
            (self.multitenant_tenants >= 1, "--multitenant-tenants", "must be >= 1", self.multitenant_tenants),
            (self.multitenant_turns >= 1, "--multitenant-turns", "must be >= 1", self.multitenant_turns),
            (self.multitenant_output_len >= 1, "--multitenant-output-len", "must be >= 1",
             self.multitenant_output_len),
            (self.request_rate > 0, "--request-rate", "must be > 0 (or inf)", self.request_rate),
            (0 < self.burstiness < math.inf, "--burstiness", "must be a positive number", self.burstiness),
            (self.max_concurrency is None or self.max_concurrency >= 1, "--max-concurrency", "must be >= 1",
             self.max_concurrency),
            (self.temperature >= 0, "--temperature", "must be >= 0", self.temperature),
            (self.warmup >= 0, "--warmup", "must be >= 0", self.warmup),
            (self.timeout > 0, "--timeout", "must be > 0", self.timeout),
            (isinstance(self.extra_body, dict), "--extra-body", "must be a JSON object", self.extra_body),
        ]
        for ok, option, rule, value in checks:
            if not ok:
                raise ValueError(f"{option} {rule}, got {value!r}")
        for key, value in self.goodput.items():
            if key not in SLO_KEYS or not value >= 0:
                raise ValueError(f"--goodput: bad SLO {key}:{value}")


# ---- pure helpers ------------------------------------------------------------------------------------

def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput expects KEY:MS with KEY in {SLO_KEYS}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {key} needs a number of milliseconds, got {value!r}") from None
        if not (0 <= ms < math.inf):
            raise ValueError(f"--goodput: {key} must be a finite number >= 0 ms, got {value!r}")
        slos[key] = ms
    return slos


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (s) of n requests: the first at 0, then gamma inter-arrival times with shape
    `burstiness` and mean 1/rate (burstiness 1 = Poisson); all 0 when rate is inf."""
    if rate == math.inf:
        return [0.0] * n
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


def eos_logit_bias(tok) -> dict[str, float]:
    """logit_bias that bans the tokenizer's end-of-sequence tokens (OpenAI's -100)."""
    ids = set(tok.eos_token_ids) | {tok.token_to_id(t) for t in _EOG_TEXTS}
    return {str(i): -100 for i in sorted(i for i in ids if i is not None)}


def request_body(spec: RequestSpec, cfg: BenchConfig, model: str, logit_bias: dict | None) -> dict:
    body = {"model": model, "max_tokens": spec.output_len, "temperature": cfg.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "/v1/chat/completions":
        body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if spec.user is not None:
        body["user"] = spec.user
    if cfg.ignore_eos:
        body["ignore_eos"] = True
        if logit_bias:
            body["logit_bias"] = logit_bias
    return {**body, **cfg.extra_body}


# ---- sending -----------------------------------------------------------------------------------------

async def send_request(client: httpx.AsyncClient, url: str, body: dict, prompt_len: int,
                       t0: float = 0.0) -> RequestResult:
    """Stream one request and time it; never raises (a failure is recorded in the result)."""
    r = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    r.start_time = start - t0
    last, parts, usage_tokens = 0.0, [], None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:500]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):
                    raise RuntimeError(f"error event: {chunk['error']}")
                if chunk.get("usage") and chunk["usage"].get("completion_tokens") is not None:
                    usage_tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    r.finish_reason = choice.get("finish_reason") or r.finish_reason
                    if text:
                        now = time.perf_counter()
                        if parts:
                            r.itl.append(now - last)
                        else:
                            r.ttft = now - start
                        last = now
                        parts.append(text)
        r.e2e = time.perf_counter() - start
        r.text = "".join(parts)
        if not parts:
            raise RuntimeError("the stream ended without any text")
        if r.finish_reason is None:  # e.g. llama-cpp-python's server cuts a stream when another request arrives
            raise RuntimeError("the stream ended without a finish_reason (interrupted by the server?)")
        if usage_tokens is not None:
            r.output_tokens, r.output_tokens_from = usage_tokens, "usage"
        elif r.finish_reason == "length" and body.get("max_tokens"):
            r.output_tokens, r.output_tokens_from = int(body["max_tokens"]), "max_tokens"
        else:
            r.output_tokens, r.output_tokens_from = len(parts), "chunks"
        r.success = True
    except Exception as e:  # noqa: BLE001 - every failure is data, not a crash
        r.e2e = r.e2e or time.perf_counter() - start
        r.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return r


def _headers(cfg: BenchConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


async def fetch_model(client: httpx.AsyncClient, cfg: BenchConfig) -> str:
    url = cfg.base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url)
        resp.raise_for_status()
        data = resp.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        raise RuntimeError(f"cannot list the models at {url} (check --base-url and --api-key, "
                           f"or pass --model): {type(e).__name__}: {e}") from None
    if not data:
        raise RuntimeError(f"{cfg.base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def load_tokenizer(path: str | None):
    from kvflow.config import default_model_path
    from kvflow.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(path or default_model_path())


def build_dataset(cfg: BenchConfig, tok) -> list[RequestSpec]:
    if cfg.dataset_name == "multitenant":
        sessions = -(-cfg.num_prompts // cfg.multitenant_turns)
        return sample_multitenant(tok, sessions, cfg.multitenant_turns, cfg.multitenant_tenants,
                                  cfg.multitenant_output_len, cfg.seed,
                                  chat=cfg.endpoint == "/v1/chat/completions")[:cfg.num_prompts]
    if cfg.dataset_name == "chat":
        return sample_chat(tok, cfg.num_prompts, cfg.seed, cfg.chat_output_len,
                           chat=cfg.endpoint == "/v1/chat/completions")
    return sample_random(tok, cfg.num_prompts, cfg.random_input_len, cfg.random_output_len,
                         cfg.random_range_ratio, cfg.seed)


async def run_benchmark(cfg: BenchConfig, specs: list[RequestSpec] | None = None, tok=None,
                        log=print) -> dict:
    """Run one benchmark; returns {"config", "summary", "requests"} (per-request records)."""
    cfg.validate()
    tok = tok if tok is not None else load_tokenizer(cfg.tokenizer)
    specs = specs if specs is not None else build_dataset(cfg, tok)
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    bias = eos_logit_bias(tok) if cfg.ignore_eos else None
    n_conn = max(cfg.max_concurrency or len(specs), 1) + 4
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    timeout = httpx.Timeout(cfg.timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=_headers(cfg)) as client:
        model = cfg.model or await fetch_model(client, cfg)
        for i in range(cfg.warmup):
            spec = specs[i % len(specs)]
            r = await send_request(client, url, request_body(spec, cfg, model, bias), spec.prompt_len)
            if not r.success:
                raise RuntimeError(f"warm-up request failed ({url}): {r.error}")
        log(f"benchmark: {len(specs)} requests to {url} (model {model}), rate {cfg.request_rate} req/s, "
            f"burstiness {cfg.burstiness}, max concurrency {cfg.max_concurrency}")
        sem = asyncio.Semaphore(cfg.max_concurrency or max(len(specs), 1))
        offsets = arrival_times(len(specs), cfg.request_rate, cfg.burstiness, cfg.seed)
        t0 = time.perf_counter()

        async def one(spec: RequestSpec, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            async with sem:
                return await send_request(client, url, request_body(spec, cfg, model, bias),
                                          spec.prompt_len, t0)

        results = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets)))
        duration = time.perf_counter() - t0
    config = {**asdict(cfg), "model": model, "request_rate": _num(cfg.request_rate),
              "api_key": "***" if cfg.api_key else None}
    return {"config": config, "summary": compute_metrics(results, duration, cfg.goodput),
            "requests": [asdict(r) for r in results]}


def _num(x: float):
    return x if math.isfinite(x) else str(x)


# ---- command line ------------------------------------------------------------------------------------

def add_cli_args(p: argparse.ArgumentParser) -> None:
    """All options of `kvflow bench serve`."""
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--endpoint", default="/v1/completions", help=" or ".join(ENDPOINTS))
    g.add_argument("--model", default=None, help="model name sent in requests (default: first of /v1/models)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", help=" or ".join(DATASETS))
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--random-input-len", type=int, default=256)
    g.add_argument("--random-output-len", type=int, default=64)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [L*(1-r), L*(1+r)]")
    g.add_argument("--chat-output-len", type=int, default=None, help="fixed output length for --dataset-name chat")
    g.add_argument("--multitenant-tenants", type=int, default=6, help="--dataset-name multitenant: system prompts")
    g.add_argument("--multitenant-turns", type=int, default=4,
                   help="--dataset-name multitenant: turns per session (num-prompts / turns sessions)")
    g.add_argument("--multitenant-output-len", type=int, default=32,
                   help="--dataset-name multitenant: output tokens of every request")
    g.add_argument("--tokenizer", default=None, help="tokenizer path (default: the default model's GGUF)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson)")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--warmup", type=int, default=1, help="requests sent and discarded before measuring")
    g = p.add_argument_group("requests")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos and an EOS logit_bias so output lengths are exact (default: on)")
    g.add_argument("--extra-body", default=None, metavar="JSON", help="JSON object merged into every request")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait for data")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    g.add_argument("--save-result", default=None, metavar="PATH.json")
    g.add_argument("--plot", default=None, metavar="PATH.png")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra-body is not valid JSON: {e}") from None
    cfg = BenchConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        dataset_name=args.dataset_name, num_prompts=args.num_prompts, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, random_range_ratio=args.random_range_ratio,
        chat_output_len=args.chat_output_len, multitenant_tenants=args.multitenant_tenants,
        multitenant_turns=args.multitenant_turns, multitenant_output_len=args.multitenant_output_len,
        tokenizer=args.tokenizer, seed=args.seed,
        request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        temperature=args.temperature, ignore_eos=args.ignore_eos, extra_body=extra,
        goodput=parse_goodput(args.goodput), warmup=args.warmup, timeout=args.timeout)
    cfg.validate()
    return cfg


def main(args: argparse.Namespace) -> int:
    """Run `kvflow bench serve`; returns 0 when at least one request completed, 1 otherwise or when the
    server cannot be reached; raises ValueError naming the option for a bad option value."""
    cfg = config_from_args(args)
    try:
        result = asyncio.run(run_benchmark(cfg, log=lambda s: print(s, file=sys.stderr)))
    except RuntimeError as e:  # server unreachable, warm-up failed: a message, not a traceback
        print(f"kvflow bench serve: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(result["summary"]))
    errors = [r["error"] for r in result["requests"] if not r["success"]]
    for e in sorted(set(errors))[:5]:
        print(f"failed ({errors.count(e)}x): {e}", file=sys.stderr)
    if args.save_result:
        save_result(result, args.save_result)
    if args.plot:
        plot_result(result, args.plot)
    return 0 if result["summary"]["completed"] else 1
