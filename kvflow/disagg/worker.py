"""A prefill/decode worker: an engine replica (kvflow/cluster/replica.py) that can hand a request over after
its prefill, and take one over with the KV computed elsewhere. Which role a worker plays is the client's
choice per request (kvflow/disagg/client.py), so a worker can change roles without restarting.

Prefill side (a request arrives as ["prefill", req, plan]):
  - with a shared KV pool, the prompt's blocks the pool holds beyond the local prefix hit are read in
    first (kvflow/memory/host_store.py), so the scheduler finds them as a prefix hit;
  - the request computes its prompt and samples its first token, streamed to the client as usual;
  - right after that step it is handed off: sync exports its blocks and stages them with the transport (kept
    until the decode worker has pulled them), async and layerwise have already sent theirs (connector.py); it ends here
    and the worker announces ["prefilled", id, meta, [ref] | None]. A first token that finished the request
    (EOS, max_tokens 1) needs no handoff.
Decode side:
  - receive_kv(...)  blocks streamed by a prefill worker; a layer-wise range is assembled until every layer
                     arrived, then written into free blocks of the prefix cache under its hashes
  - ["expect", req, n]   the request, once its n blocks arrived (or `kv_transfer_timeout_s` passed: what is
                     missing is computed here), is added with its first token: only the prompt's last partial
                     block and that token are computed again
  - sync: the client calls pull_request with the staged blocks' descriptor: the worker pulls them with the
    transport that staged them (transport.py: Ray's object store, or Mooncake's transfer engine), then the
    request takes them over as a migrated one does (kvflow/cluster/kv_transfer.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from kvflow.cluster.replica import EngineReplica

logger = logging.getLogger("kvflow")


class PDWorker(EngineReplica):
    def __init__(self, config_json: str, index: int, cpus: float | None = None, log_level: str = "WARNING",
                 pool=None):
        super().__init__(config_json, index, cpus, log_level)
        from kvflow.config import ResolvedConfig
        from kvflow.disagg.connector import KVSender
        rc = ResolvedConfig.from_json(config_json)
        self.opts = rc.config.disagg
        self.pool = pool
        self.sender = KVSender(self.core, rc.arch.num_layers)
        self.core.kv_connector = self.sender
        self.num_layers = rc.arch.num_layers
        self.lock = threading.Lock()
        self.staged: dict[tuple[str, int], dict] = {}     # (request id, first block) -> {layer: arrays}
        self.arrived: dict[str, int] = {}                  # request id -> blocks received
        self.expecting: dict[str, tuple] = {}              # request id -> (request, blocks, deadline, since)
        self.published: set[int] = set()                   # block hashes this worker put in the pool
        self.transports: dict = {}                          # name -> KVTransport (transport.py), made on first use
        # the decode side's events, in order: ("assembled", id, first, layers) once every layer of a range is
        # here, ("imported", id, blocks) when a range is written into the cache, ("added", id) when the
        # request enters the scheduler (tests)
        self.log: deque = deque(maxlen=4096)
        self.stats_ = {"bytes_received": 0, "blocks_received": 0, "kv_wait_s": 0.0, "handoffs_in": 0,
                       "timeouts": 0, "pool_hit_blocks": 0, "pool_put_blocks": 0, "handoffs_out": 0}

    # ---- Ray methods ------------------------------------------------------------------------------------------

    def receive_kv(self, incarnation: str, request_id: str, first: int, hashes: list[int], layer: int | None,
                   dtypes: list[str], arrays: list) -> None:
        """Blocks [first, first + len(hashes)) of a request's prompt, all layers (layer None) or one."""
        if incarnation != self.incarnation:
            return
        if layer is not None:
            with self.lock:
                parts = self.staged.setdefault((request_id, first), {})
                parts[layer] = arrays
                if len(parts) < self.num_layers:
                    return                               # nothing is read before every layer is here
                del self.staged[(request_id, first)]
                self.log.append(("assembled", request_id, first, sorted(parts)))
            per = len(arrays)                            # K, V (, scales) of one layer, in kv_tensors() order
            arrays = [parts[i][k] for k in range(per) for i in range(self.num_layers)]
        self.inbox.put((None, "kv", (request_id, hashes, dtypes, arrays)))

    def transfer_stats(self) -> dict:
        s = self.sender
        return {**self.stats_, "bytes_sent": s.bytes_sent, "sends": s.num_sends, "index": self.index}

    def pull_request(self, incarnation: str, seq: int, request, meta: dict, desc: dict) -> dict:
        """Sync handoff, decode side: pull the blocks `desc` names (transport.py), then the request takes them
        over. A pull that fails leaves the prompt to compute here. {"bytes", "seconds"} of the pull."""
        if incarnation != self.incarnation:
            return {"bytes": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        try:
            arrays = self._transport(desc["transport"]).fetch(desc)
        except Exception:
            logger.exception("pulling %s's KV blocks failed; its prompt is computed here", request.request_id)
            arrays = []
        seconds = time.perf_counter() - t0
        self.inbox.put((seq, "import", (request, meta, arrays)))
        return {"bytes": sum(a.nbytes for a in arrays), "seconds": seconds}

    def _transport(self, name: str):
        if name not in self.transports:
            from kvflow.disagg.transport import TRANSPORTS
            self.transports[name] = TRANSPORTS[name]()
        return self.transports[name]

    def _stage(self, rid: str, name: str, arrays: list) -> dict:
        try:
            return self._transport(name).stage(rid, arrays)
        except Exception:                              # e.g. Mooncake missing here: the object store carries it
            logger.exception("staging %s's KV with %s failed; sent through Ray's object store instead", rid, name)
            return self._transport("ray").stage(rid, arrays)

    def transfer_log(self) -> dict:
        """Both sides' event logs (tests)."""
        return {"sender": list(self.sender.log), "receiver": list(self.log)}

    def set_transfer_failure(self, fail: bool) -> None:
        """Tests: drop (True) every KV send of this worker, as a broken link would."""
        self.sender.fail = fail

    # ---- the core's thread --------------------------------------------------------------------------------------

    def _apply(self, kind: str, payload) -> None:
        if kind != "kv":
            return super()._apply(kind, payload)
        request_id, hashes, dtypes, arrays = payload
        self.log.append(("imported", request_id, len(hashes)))
        try:
            self._import(self.core, hashes, arrays, dtypes)
        except Exception:                              # computed here instead
            logger.exception("importing %s's KV blocks failed", request_id)
        n = sum(a.nbytes for a in arrays)
        self.stats_["bytes_received"] += n
        self.stats_["blocks_received"] += len(hashes)
        self.arrived[request_id] = self.arrived.get(request_id, 0) + len(hashes)

    def _handle_message(self, msg: list) -> None:
        kind = msg[0]
        if kind == "prefill":
            req, plan = msg[1], msg[2]
            if self.pool is not None:
                self._read_pool(req.prompt_token_ids)
            self.sender.plans[req.request_id] = plan
            self._handle(self.core, ["add", req], self._emit)
        elif kind == "release":                        # the decode worker has pulled a sync handoff's blocks
            if msg[2] in self.transports:
                self.transports[msg[2]].release(msg[1])
        elif kind == "expect":
            req, blocks = msg[1], msg[2]
            now = time.monotonic()
            self.expecting[req.request_id] = (req, blocks, now + self.opts.kv_transfer_timeout_s, now)
        else:
            if kind == "abort":
                gone = set(msg[1])
                for rid in gone:
                    self.expecting.pop(rid, None)
                    self.sender.plans.pop(rid, None)
                    self.arrived.pop(rid, None)
                with self.lock:
                    for key in [k for k in self.staged if k[0] in gone]:
                        del self.staged[key]
            super()._handle_message(msg)

    def _after_step(self) -> None:
        self.sender.step_done()
        if self.sender.plans:
            self._hand_off()
        if self.expecting:
            self._admit_expected()

    def _hand_off(self) -> None:
        """Requests whose prefill produced their first token leave for their decode worker."""
        requests = self.core.scheduler.requests
        handed = False
        for rid in list(self.sender.plans):
            req = requests.get(rid)
            if req is None or req.status.finished:     # finished at its first token, or aborted
                del self.sender.plans[rid]
                continue
            if not req.output_token_ids:
                continue
            plan = self.sender.plans.pop(rid)
            if self.pool is not None:
                self._publish(req)
            if plan.mode == "sync":
                meta, arrays = self._export(self.core, rid)
                ref = self._stage(rid, plan.transport, [] if self.sender.fail else arrays) if meta else None
            else:
                meta = {"request_id": rid, "output_token_ids": list(req.output_token_ids),
                        "num_preemptions": req.num_preemptions}
                self.core.abort_requests([rid])
                ref = None
            if meta is None:
                continue
            meta["num_blocks"] = plan.sent_blocks if plan.mode != "sync" else len(meta["hashes"])
            self.stats_["handoffs_out"] += 1
            self._emit(["prefilled", rid, meta, ref])
            handed = True
        if handed:                                     # what it holds now, without them
            self._emit(["outputs", [], self.core.stats()])

    def _admit_expected(self) -> None:
        now = time.monotonic()
        for rid, (req, blocks, deadline, since) in list(self.expecting.items()):
            got = self.arrived.get(rid, 0)
            if got < blocks and now < deadline:
                continue
            if got < blocks:
                self.stats_["timeouts"] += 1
                logger.warning("request %s: %d of its %d KV blocks arrived in time; the rest is computed here",
                               rid, got, blocks)
            del self.expecting[rid]
            self.arrived.pop(rid, None)
            self.stats_["kv_wait_s"] += now - since
            self.stats_["handoffs_in"] += 1
            self.log.append(("added", rid))
            self._handle(self.core, ["add", req], self._emit)

    # ---- the shared KV pool -------------------------------------------------------------------------------------

    def _read_pool(self, prompt: list[int]) -> None:
        """Blocks of this prompt that the pool holds, beyond what this worker caches, into the prefix cache."""
        import ray

        from kvflow.cluster.fleet import block_hashes
        from kvflow.cluster.kv_transfer import cached_prefix
        hashes = block_hashes(prompt, self.core.kv.block_size)
        local = cached_prefix(self.core, hashes)
        if local == len(hashes):
            return
        try:
            keys, dtypes, arrays = ray.get(self.pool.get.remote(hashes, local), timeout=5)
            if keys:
                self._import(self.core, keys, arrays, dtypes)
                self.stats_["pool_hit_blocks"] += len(keys)
        except Exception:
            logger.exception("reading the KV pool failed; the prompt is computed")

    def _publish(self, req) -> None:
        """The prompt's full blocks the pool lacks (as far as this worker knows) go to it."""
        from kvflow.cluster.kv_transfer import read_blocks
        kv = self.core.kv
        n = min(req.num_computed_tokens, len(req.prompt_token_ids)) // kv.block_size
        hashes, table = kv.block_hashes(req)[:n], kv.table(req.request_id)[:n]
        todo = [i for i, h in enumerate(hashes) if h not in self.published]
        if not todo:
            return
        arrays = read_blocks(self.core.runner.kv_tensors(), [table[i].block_id for i in todo])
        self.pool.put.remote([hashes[i] for i in todo], self.sender.dtypes, arrays)
        self.published.update(hashes[i] for i in todo)
        self.stats_["pool_put_blocks"] += len(todo)
