"""The prefill worker's side of KV transfer: which blocks a request's decode worker still lacks, and sending them.

A request that a prefill worker computes for a decode worker carries a `TransferPlan`: how its KV goes (the
transfer mode) and, for the streamed modes, the decode worker it goes to. The sender is the engine core's KV
connector (`EngineCore.kv_connector`): it sees each step's schedule before the forward pass.

  sync       nothing moves during prefill; once the first token is sampled the worker exports the whole
             prompt's blocks and the decode worker, chosen then, pulls them (worker.py; DistServe)
  async      after each step, the blocks that step completed go to the decode worker chosen with the
             prefill worker, so that only the last chunk's blocks are left when prefill ends (SplitWise)
  layerwise  the model calls `layer_done(i)` once layer i has written its KV; layer i's slice of the
             blocks this step completes leaves then, while the later layers still compute (Mooncake)

Only full blocks move (they are what a prefix cache can hold, under their chained hashes): the decode
worker computes the prompt's last partial block and the first token again, a few tokens. Sends go from
a thread of their own, so the forward pass never waits on Ray.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections import deque

import numpy as np
import torch

from kvflow.cluster.kv_transfer import read_blocks

logger = logging.getLogger("kvflow")


@dataclasses.dataclass
class TransferPlan:
    mode: str                      # sync | async | layerwise
    transport: str = "ray"         # what carries a sync transfer (transport.py)
    dst: object = None             # the decode worker's actor handle (async, layerwise)
    dst_incarnation: str | None = None
    sent_blocks: int = 0           # leading full blocks already sent


@dataclasses.dataclass
class _Range:
    request_id: str
    plan: TransferPlan
    first: int                     # index of the first block of the range in the request's table
    block_ids: torch.Tensor
    hashes: list[int]


class KVSender:
    def __init__(self, core, num_layers: int):
        self.core, self.num_layers = core, num_layers
        self.plans: dict[str, TransferPlan] = {}
        self.ranges: list[_Range] = []               # this step's: blocks it completes, to send
        tensors = core.runner.kv_tensors()
        self.device = tensors[0].device
        self.dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
        # the tensors of layer i: K, V (and their int8 scales), at i, i + L (, i + 2L, i + 3L) in kv_tensors()
        self.layer_tensors = [tensors[i::num_layers] for i in range(num_layers)]
        self.bytes_sent = self.num_sends = 0
        self.fail = False                            # tests: sends are dropped (the decode side must recover)
        # what happened, in order: ("layer", i) when layer i's KV is written, ("queued", id, first, layer)
        # when a range leaves (layer None: all layers): tests read it to see the sends overlap the forward
        self.log: deque = deque(maxlen=4096)
        self.outbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._send_loop, name="kv-sender", daemon=True)
        self.thread.start()

    # ---- the engine core's hooks ----------------------------------------------------------------------------

    def start_step(self, sched) -> None:
        """Before the forward pass: the blocks each streamed request completes in this step."""
        self.ranges = []
        kv, bs = self.core.kv, self.core.kv.block_size
        for rid, start, n in zip(sched.req_ids, sched.num_computed_tokens, sched.num_new_tokens):
            plan = self.plans.get(rid)
            if plan is None or plan.mode == "sync":
                continue
            req = self.core.scheduler.requests[rid]
            full = min(start + n, len(req.prompt_token_ids)) // bs
            if full <= plan.sent_blocks:
                continue
            table = kv.table(rid)
            ids = torch.tensor([b.block_id for b in table[plan.sent_blocks:full]], dtype=torch.long,
                               device=self.device)
            self.ranges.append(_Range(rid, plan, plan.sent_blocks, ids,
                                      kv.block_hashes(req)[plan.sent_blocks:full]))
            plan.sent_blocks = full
        layerwise = any(r.plan.mode == "layerwise" for r in self.ranges)
        self.core.runner.model.layer_done = self.layer_done if layerwise else None

    def layer_done(self, layer: int) -> None:
        """Layer `layer` wrote its KV: its slice of the step's layer-wise ranges leaves now."""
        tensors = self.layer_tensors[layer]
        self.log.append(("layer", layer))
        for r in self.ranges:
            if r.plan.mode == "layerwise":
                self._queue(r, layer, read_blocks(tensors, r.block_ids))

    def step_done(self) -> None:
        """After the step: the async ranges leave, whole."""
        tensors = self.core.runner.kv_tensors()
        for r in self.ranges:
            if r.plan.mode == "async":
                self._queue(r, None, read_blocks(tensors, r.block_ids))
        self.ranges = []

    # ---- sending ----------------------------------------------------------------------------------------------

    def _queue(self, r: _Range, layer: int | None, arrays: list[np.ndarray]) -> None:
        self.log.append(("queued", r.request_id, r.first, layer))
        self.outbox.put((r.plan, r.request_id, r.first, r.hashes, layer, arrays))

    def _send_loop(self) -> None:
        while True:
            plan, rid, first, hashes, layer, arrays = self.outbox.get()
            if self.fail:
                continue
            try:
                plan.dst.receive_kv.remote(plan.dst_incarnation, rid, first, hashes, layer, self.dtypes, arrays)
                self.bytes_sent += sum(a.nbytes for a in arrays)
                self.num_sends += 1
            except Exception:                    # the decode worker is gone: it computes the prompt itself
                logger.exception("sending %s's KV failed", rid)
