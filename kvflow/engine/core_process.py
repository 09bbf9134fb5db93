"""The engine core in its own process, behind ZMQ sockets, speaking msgpack (kvflow.engine.wire).

The frontend's MPClient (kvflow.engine.core_client) starts `python -m kvflow.engine.core_process` with the
resolved config as JSON and two ZMQ addresses it has bound. The loop drains every pending message, runs one
step whenever there is work, and blocks on the input socket when idle, so tokenization, detokenization and
HTTP never stall the step loop. The messages are listed in kvflow/engine/wire.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

import zmq

from kvflow.config import ResolvedConfig
from kvflow.engine.core import EngineCore
from kvflow.engine.wire import decode, encode
from kvflow.request import RequestStatus

logger = logging.getLogger("kvflow")

IDLE_POLL_MS = 500          # when idle, wake this often to notice that the frontend has gone


def build_core(rc: ResolvedConfig) -> EngineCore:
    from kvflow.models.gguf import read_gguf
    from kvflow.models.loader import is_gguf
    return EngineCore.build(rc, read_gguf(rc.model_path) if is_gguf(rc.model_path) else None)


def handle(core: EngineCore, msg: list, emit) -> bool:
    """Apply one frontend message (`emit(message)` answers it); False on shutdown."""
    kind = msg[0]
    if kind == "add":
        try:
            core.add_request(msg[1])
        except Exception as e:            # the frontend validated it: this is a bug, not bad input
            logger.exception("add_request failed")
            emit(["error", msg[1].request_id, str(e)])
    elif kind == "abort":
        core.abort_requests(msg[1], RequestStatus(msg[2]))
    elif kind == "reset_prefix_cache":
        core.reset_prefix_cache()
    elif kind == "shutdown":
        return False
    else:
        raise ValueError(f"unknown message {kind!r}")
    return True


def serve_core(core: EngineCore, inp: zmq.Socket, out: zmq.Socket, parent_pid: int) -> None:
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    while True:
        timeout = 0 if core.has_unfinished() else IDLE_POLL_MS
        changed = False
        while poller.poll(timeout):
            if not handle(core, decode(inp.recv()), lambda m: out.send(encode(m))):
                return
            changed, timeout = True, 0
        if core.has_unfinished():
            outputs = core.step()
            out.send(encode(["outputs", outputs, core.stats()]))
        elif changed:                         # e.g. the last request was aborted: report the idle state
            out.send(encode(["outputs", [], core.stats()]))
        if os.getppid() != parent_pid:        # the frontend is gone: nobody to serve
            logger.warning("frontend process exited; engine core stopping")
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvflow.engine.core_process")
    ap.add_argument("--config", required=True, help="the ResolvedConfig as JSON")
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
        core = build_core(ResolvedConfig.from_json(args.config))
        core.warm_up()
        out.send(encode(["ready", {"num_kv_blocks": core.kv.num_blocks, "pid": os.getpid()}]))
        serve_core(core, inp, out, parent_pid)
        core.shutdown()                       # persist the prefix cache (disk tier) before exiting
        return 0
    except BaseException as e:               # tell the frontend why, then exit
        logger.error("engine core failed: %s", e)
        out.send(encode(["dead", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"]))
        return 1
    finally:
        inp.close(0)
        out.close()
        ctx.term()


if __name__ == "__main__":
    code = main()
    # everything is persisted and sent (core.shutdown, the sockets' linger): skip the interpreter's teardown
    # of torch and the model, which took 1.5 s of every server's stop
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
