"""The `kvflow` command line: `kvflow serve`, `kvflow generate PROMPT`, `kvflow chat`, `kvflow bench serve`,
`kvflow tune` (a fixed token budget by a stress test), `kvflow predict train|eval` (the output-length
predictor), `kvflow eval perplexity --file F`, `kvflow env` (this machine's CPU capabilities and versions).

Only the generated text goes to stdout; logs and errors go to stderr. A bad argument value prints
`kvflow: error: <message>` and exits 2, as argparse does for a malformed command line.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from kvflow.entrypoints.cli_args import CLIError, add_engine_args, engine_kwargs  # noqa: F401 (re-exported)

logger = logging.getLogger("kvflow")


# ---- shared options ------------------------------------------------------------------------------------
# the engine's flags are generated from the config fields: see cli_args.py

def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--stop", action="append", default=None, metavar="S",
                   help="a stop string (repeat for more)")


def sampling_params(args: argparse.Namespace):
    from kvflow.sampling.params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop)


def build_llm(args: argparse.Namespace):
    from kvflow.config import EngineConfig
    from kvflow.entrypoints.llm import LLM
    kw = engine_kwargs(args)
    EngineConfig.from_kwargs(**kw)           # validate before the (slow) model load
    return LLM(**kw)


def stream(engine, request_id: str, prompt: str | None, token_ids: list[int], params, out=None) -> str:
    """Run one request to completion, writing its text to `out` as it grows; returns the full text."""
    out = out or sys.stdout
    engine.add_request(request_id, prompt, token_ids, params)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.request_id != request_id:
                    continue
                new = o.outputs[0].text          # cumulative: print only the new suffix
                out.write(new[len(text):])
                out.flush()
                text = new
    except BaseException:
        engine.abort_request(request_id)
        raise
    return text


# ---- subcommands ---------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)           # validate before the (slow) model load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = build_llm(args)
    if args.stream:
        tok = llm.engine.tokenizer
        stream(llm.engine, "generate-0", prompt, tok.encode(prompt), params)
        sys.stdout.write("\n")
    else:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        sys.stdout.write(out.outputs[0].text + "\n")
    sys.stdout.flush()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = build_llm(args)
    engine, tok = llm.engine, llm.engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("kvflow chat: /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages = system + history + [{"role": "user", "content": line}]
        text, ids = tok.encode_chat(messages)
        turn += 1
        try:
            reply = stream(engine, f"chat-{turn}", text, ids, params)
        except ValueError as e:      # e.g. the conversation outgrew the context: keep the session alive
            print(f"kvflow: error: {e} (/reset clears the conversation)", file=sys.stderr)
            continue
        except KeyboardInterrupt:    # Ctrl-C stops this reply; the turn is dropped
            print("\n(interrupted)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from kvflow.config import EngineConfig
    from kvflow.engine.async_llm import open_engine
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    if args.max_queue_len < 0:
        raise CLIError(f"--max-queue-len must be >= 0, got {args.max_queue_len}")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.max_body_bytes < 1:
        raise CLIError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    if not args.sse_keepalive >= 0:
        raise CLIError(f"--sse-keepalive must be >= 0 seconds, got {args.sse_keepalive}")
    if args.max_engine_restarts < 0:
        raise CLIError(f"--max-engine-restarts must be >= 0, got {args.max_engine_restarts}")
    if args.max_queue_wait is not None and not args.max_queue_wait >= 0:
        raise CLIError(f"--max-queue-wait must be >= 0 seconds, got {args.max_queue_wait}")

    async def run() -> int:
        engine = open_engine(config, args.max_queue_len, args.max_engine_restarts)   # the core starts loading
        from kvflow.entrypoints.api_server import serve      # FastAPI's imports (about 1 s) meanwhile
        return await serve(engine, args.host, args.port, args.api_key or os.environ.get("KVFLOW_API_KEY"),
                           args.served_model_name, args.drain_timeout,
                           "info" if args.verbose else "warning", args.max_body_bytes, args.sse_keepalive,
                           max_wait_s=args.max_queue_wait)
    return asyncio.run(run())


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from kvflow.eval.perplexity import perplexity
    if args.file == "-":
        text = sys.stdin.read()
    else:
        with open(args.file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    llm = build_llm(args)
    res = perplexity(llm, text, args.max_length, args.stride, args.num_tokens)
    if args.json:
        d = dict(dataclasses.asdict(res), file=args.file, model=llm.engine.model_path,
                 dtype=llm.engine.resolved.dtype, kv_cache_dtype=args.kv_cache_dtype)
        print(json.dumps(d))
    else:
        print(f"perplexity: {res.ppl:.4f}\ntokens: {res.num_tokens} ({res.num_windows} window(s) of up to "
              f"{res.max_length}, stride {res.stride})\nseconds: {res.seconds:.2f}")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from kvflow.bench.serve import main as bench_serve_main
    return bench_serve_main(args)


def cmd_env(args: argparse.Namespace) -> int:
    """Versions and the CPU's capabilities (what dtype="auto" and the kernels choose by)."""
    import json
    import platform

    import torch

    from kvflow import __version__
    from kvflow.platform import capabilities
    caps = capabilities()
    info = {"kvflow": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu": caps}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"kvflow {__version__}, python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads)")
    print(f"cpu: {caps['model'] or 'unknown'} ({caps['arch']}, {caps['cores']} cores)")
    print(f"flags: {' '.join(caps['flags']) or 'none'}")
    print(f"torch cpu capability: {caps['torch_capability']}")
    print(f"bf16 native: {'yes' if caps['bf16_native'] else 'no'} (dtype auto: "
          f"{'bfloat16' if caps['bf16_native'] else 'float32'})")
    print(f"weight kernels: {caps['kernel_isa']}")
    return 0


class VersionAction(argparse.Action):
    """`kvflow --version`: the version, then the CPU line (argparse's own action rewraps the text)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from kvflow import __version__
        from kvflow.platform import describe
        print(f"kvflow {__version__}\ncpu: {describe(with_torch=False)}")
        parser.exit(0)


# ---- main ----------------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvflow", description="kvflow: LLM inference with a paged KV cache")
    parser.add_argument("--version", action=VersionAction, help="print the version and the CPU's capabilities")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="complete a prompt and print the continuation",
                       description="Print the model's continuation of PROMPT (only the generated text).")
    p.add_argument("prompt", metavar="PROMPT", help='the prompt text ("-" reads it from stdin)')
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_sampling_args(p, max_tokens=16, temperature=1.0)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal with the model's chat template",
                       description="Interactive chat: one user message per line on stdin; /reset clears "
                                   "the conversation, /exit, /quit or EOF (Ctrl-D) quits.")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    add_sampling_args(p, max_tokens=256, temperature=0.7)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="An OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics, /tokenize, /detokenize, /version.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 (default: $KVFLOW_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: file name)")
    p.add_argument("--max-queue-len", type=int, default=256,
                   help="requests that may wait beyond --max-num-seqs; more get 503 with Retry-After")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish")
    p.add_argument("--max-body-bytes", type=int, default=2 << 20,
                   help="larger request bodies get 413 (default: 2 MiB, more than a full context needs)")
    p.add_argument("--max-queue-wait", type=float, default=None, metavar="SECONDS",
                   help="refuse with 503 + Retry-After a request predicted to wait longer than this for a "
                        "batch slot (default: off)")
    p.add_argument("--max-engine-restarts", type=int, default=3,
                   help="restarts of a dead engine core within 10 minutes before the server exits non-zero")
    p.add_argument("--sse-keepalive", type=float, default=15.0, metavar="SECONDS",
                   help="a stream with nothing to send gets a keep-alive comment this often (0: never)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks: `kvflow bench serve` loads a running server")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bench.add_parser("serve", help="a serving load generator (like `vllm bench serve`)",
                         description="Send a workload to an OpenAI-compatible server and report TTFT, TPOT, "
                                     "ITL, E2E, throughput and goodput.")
    from kvflow.bench.serve import add_cli_args
    add_cli_args(p)
    p.set_defaults(func=cmd_bench_serve, verbose=False)

    p = sub.add_parser("tune", help="find a fixed token budget by a stress test (Sarathi-Serve's way)",
                       description="Run decodes beside chunked prefills at each candidate budget and print "
                                   "TPOT and prefill throughput per budget, and the budget to serve with.")
    from kvflow.bench.tune import add_cli_args as add_tune_args
    add_tune_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_tune)

    from kvflow.predict.train import add_parser as add_predict_parser
    add_predict_parser(sub)
    from kvflow.sim.cli import add_parser as add_sim_parser
    add_sim_parser(sub)

    p = sub.add_parser("eval", help="evaluate the model: `kvflow eval perplexity --file F`")
    evals = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    p = evals.add_parser("perplexity", help="perplexity of the model on a text file",
                         description="Perplexity over the file's tokens, in windows of --max-length tokens "
                                     "every --stride tokens (each token scored once), computed by the engine "
                                     "with prompt logprobs.")
    p.add_argument("--file", required=True, help='a UTF-8 text file ("-" reads stdin)')
    p.add_argument("--max-length", type=int, default=None,
                   help="window length in tokens (default: max_model_len - 1)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half a window)")
    p.add_argument("--num-tokens", type=int, default=None, help="only the file's first N tokens")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_engine_args(p)
    p.set_defaults(func=cmd_eval_perplexity)

    p = sub.add_parser("env", help="versions and this machine's CPU capabilities",
                       description="kvflow, python and torch versions; the CPU's model and flags, and what "
                                   "dtype=auto and the weight kernels choose by them.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_env, verbose=False)
    return parser


def cmd_tune(args: argparse.Namespace) -> int:
    from kvflow.bench.tune import run
    return run(args, engine_kwargs(args))


def setup_logging(verbose: bool) -> None:
    """kvflow's logs go to stderr: warnings always, info with -v (and for `serve`, whose info lines are
    its start-up progress)."""
    for h in [h for h in logger.handlers if h.get_name() == "kvflow-cli"]:
        logger.removeHandler(h)        # main() may run more than once in a process (tests)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("kvflow-cli")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    # `serve` says what it is doing while it starts (loading, building kernels, warming up), with times
    setup_logging(args.verbose or getattr(args, "func", None) is cmd_serve)
    if getattr(args, "preset", None) and not logger.isEnabledFor(logging.INFO):
        from kvflow.presets import describe, preset_options
        print(f"kvflow: preset {args.preset}: {describe(preset_options(args.preset)) or 'the defaults'}",
              file=sys.stderr)
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        if args.verbose:
            logger.exception("failed")
        parser.exit(2, f"kvflow: error: {e}\n")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:      # e.g. `kvflow generate ... | head -c 10`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
