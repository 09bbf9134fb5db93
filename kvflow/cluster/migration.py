"""Live migration of running requests between replicas: ClusterClient's part that moves a request, with its
KV blocks (kvflow/cluster/kv_transfer.py), from one replica to another (ClusterClient is this class's
subclass: the calls answer through its wait set).

`migrate(id, dst)` asks the source replica to export the request (its tokens and KV blocks); when the export
answers, the tokens the source produced meanwhile are sent to the caller once, and the destination imports
the request and its blocks and continues it. With `migration_threshold` set, the youngest request of the
busiest replica moves to the idlest when their loads differ by that many requests (the youngest has the
least KV to move). A request that asked for logprobs does not move (a move would lose them).
"""
from __future__ import annotations

import dataclasses

from kvflow.cluster.fleet import aggregate
from kvflow.engine.wire import EngineCoreOutput


class Migration:
    def migrate(self, request_id: str, dst: int) -> bool:
        """Start moving a request, with its KV blocks, to replica `dst`; False when it cannot move (unknown,
        already moving, already there, `dst` down, or it asked for logprobs, which a move would lose)."""
        t = self.requests.get(request_id)
        if t is None or t.migrating or t.replica == dst or not self.replicas[dst].healthy:
            return False
        p = t.req.params
        if p.logprobs is not None or p.prompt_logprobs is not None:
            return False
        src = self.replicas[t.replica]
        meta_ref, arrays_ref = src.actor.export_request.options(num_returns=2).remote(
            src.incarnation, src.next_seq(), request_id)
        t.migrating = True
        self.pending[meta_ref] = ("export", src.index, src.incarnation, (request_id, dst, arrays_ref))
        return True

    def _exported(self, request_id: str, dst: int, meta: dict | None, arrays_ref) -> None:
        t = self.requests.get(request_id)
        if t is not None:
            t.migrating = False
        if meta is None or t is None:          # it finished, was aborted, or its replica died meanwhile
            self.num_failed_migrations += 1
            return
        missing = meta["output_token_ids"][len(t.tokens):]
        if missing:                            # produced there, not yet seen here: sent now, once
            t.tokens += missing
            self.buffer.append(["outputs", [EngineCoreOutput(request_id, list(missing))], aggregate(self.replicas)])
        if not self.replicas[dst].healthy:
            self._resume(t)
            return
        self._unassign(t)
        t.replica = dst
        d = self.replicas[dst]
        d.assign(request_id)
        req = dataclasses.replace(t.req, output_token_ids=list(t.tokens), fork_from=None)
        d.actor.import_request.remote(d.incarnation, d.next_seq(), req, meta, arrays_ref)
        self.num_migrations += 1

    def _rebalance(self) -> None:
        threshold = self.opts.migration_threshold
        if not threshold or any(t.migrating for t in self.requests.values()):
            return
        healthy = [r for r in self.replicas if r.healthy]
        if len(healthy) < 2:
            return
        busy = max(healthy, key=lambda r: len(r.assigned))
        idle = min(healthy, key=lambda r: len(r.assigned))
        if len(busy.assigned) - len(idle.assigned) < threshold:
            return
        for rid in reversed(list(busy.assigned)):        # the youngest first: the least KV to move
            if self.migrate(rid, idle.index):
                return
