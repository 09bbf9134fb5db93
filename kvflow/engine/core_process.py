"""The engine core in its own process, behind ZMQ sockets, speaking msgpack (never pickle).

The server's frontend (AsyncLLM) starts `python -m kvflow.engine.core_process` with the engine
config as JSON and two ZMQ addresses that it has bound:
  input  (frontend PUSH -> core PULL):  ["add", request] | ["abort", [ids]] | ["reset_prefix_cache"]
                                        | ["shutdown"]
  output (core PUSH -> frontend PULL):  ["ready", info] | ["outputs", [output...], stats]
                                        | ["error", request_id, message] | ["dead", message]
The loop drains every pending message, runs one step whenever there is work, and blocks on the
input socket when idle, so tokenization, detokenization and HTTP never stall the step loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import traceback

import msgpack
import torch
import zmq

from kvflow.config import EngineConfig, resolve_dtype
from kvflow.engine.core import EngineCore, EngineCoreOutput, EngineStats
from kvflow.engine.frontend import max_model_len, num_kv_blocks
from kvflow.models.gguf import read_gguf
from kvflow.models.loader import is_gguf, load_model_config
from kvflow.request import Request
from kvflow.sampling.params import SamplingParams

logger = logging.getLogger("kvflow")

_OUTPUT_FIELDS = [f.name for f in dataclasses.fields(EngineCoreOutput)]
_STATS_FIELDS = [f.name for f in dataclasses.fields(EngineStats)]
IDLE_POLL_MS = 500          # when idle, wake this often to notice that the frontend has gone


# ---- the wire format: plain lists and dicts --------------------------------------------------------------

def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_request(req: Request) -> dict:
    return {"request_id": req.request_id, "prompt_token_ids": req.prompt_token_ids,
            "params": dataclasses.asdict(req.params), "stop_ids": sorted(req.stop_ids),
            "max_tokens": req.max_tokens, "arrival_time": req.arrival_time, "fork_of": req.fork_of}


def decode_request(d: dict) -> Request:
    return Request(d["request_id"], d["prompt_token_ids"], SamplingParams(**d["params"]), set(d["stop_ids"]),
                   d["max_tokens"], arrival_time=d["arrival_time"], fork_of=d["fork_of"])


def encode_outputs(outputs: list[EngineCoreOutput]) -> list[list]:
    return [[getattr(o, f) for f in _OUTPUT_FIELDS] for o in outputs]


def decode_outputs(rows: list[list]) -> list[EngineCoreOutput]:
    return [EngineCoreOutput(*row) for row in rows]


def encode_stats(stats: EngineStats) -> list:
    return [getattr(stats, f) for f in _STATS_FIELDS]


def decode_stats(row: list) -> EngineStats:
    return EngineStats(*row)


def config_to_json(config: EngineConfig) -> str:
    d = dataclasses.asdict(config)
    if isinstance(d["dtype"], torch.dtype):
        d["dtype"] = str(d["dtype"]).removeprefix("torch.")
    return json.dumps(d)


# ---- the process ---------------------------------------------------------------------------------------

def build_core(config: EngineConfig) -> EngineCore:
    path = config.model
    reader = read_gguf(path) if is_gguf(path) else None
    mcfg = load_model_config(path, reader)
    dtype = resolve_dtype(config.dtype, config.device)
    model_len = max_model_len(config.max_model_len, mcfg)
    return EngineCore.build(config, path, mcfg, dtype, model_len, num_kv_blocks(config, mcfg, dtype, model_len),
                            reader)


def serve_core(core: EngineCore, inp: zmq.Socket, out: zmq.Socket, parent_pid: int) -> None:
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    while True:
        timeout = 0 if core.has_unfinished() else IDLE_POLL_MS
        changed = False
        while poller.poll(timeout):
            msg = unpack(inp.recv())
            kind = msg[0]
            if kind == "add":
                try:
                    core.add_request(decode_request(msg[1]))
                except Exception as e:        # the frontend validated it: this is a bug, not bad input
                    logger.exception("add_request failed")
                    out.send(pack(["error", msg[1].get("request_id"), str(e)]))
            elif kind == "abort":
                core.abort_requests(msg[1])
            elif kind == "reset_prefix_cache":
                core.kv.pool.reset_prefix_cache()
            elif kind == "shutdown":
                return
            changed, timeout = True, 0
        if core.has_unfinished():
            outputs = core.step()
            out.send(pack(["outputs", encode_outputs(outputs), encode_stats(core.stats())]))
        elif changed:                         # e.g. the last request was aborted: report the idle state
            out.send(pack(["outputs", [], encode_stats(core.stats())]))
        if os.getppid() != parent_pid:        # the frontend is gone: nobody to serve
            logger.warning("frontend process exited; engine core stopping")
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvflow.engine.core_process")
    ap.add_argument("--config", required=True, help="EngineConfig as JSON")
    ap.add_argument("--input", required=True, help="ZMQ address to pull requests from")
    ap.add_argument("--output", required=True, help="ZMQ address to push outputs to")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the frontend, which drains, then stops us
    logging.basicConfig(level=args.log_level, format="%(levelname)s kvflow.core: %(message)s", stream=sys.stderr)
    parent_pid = os.getppid()
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(args.input)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(args.output)
    try:
        core = build_core(EngineConfig(**json.loads(args.config)))
        core.warm_up()
        out.send(pack(["ready", {"num_kv_blocks": core.kv.num_blocks, "pid": os.getpid()}]))
        serve_core(core, inp, out, parent_pid)
        core.shutdown()                       # persist the prefix cache (disk tier) before exiting
        return 0
    except BaseException as e:               # tell the frontend why, then exit
        logger.error("engine core failed: %s", e)
        out.send(pack(["dead", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"]))
        return 1
    finally:
        inp.close(0)
        out.close()
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
