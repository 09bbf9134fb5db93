"""min-ttft: Mooncake's conductor. For each healthy replica predict the request's time to first token,

    queue wait      its queued prefill tokens / its prefill rate
    own prefill     the prompt tokens it does not already cache / its prefill rate
    transfer        the blocks it does not cache x the time to move one block (a prefill worker's KV goes to
                    a decode worker; 0 where nothing moves)

and choose the smallest. What each replica caches is the same global prefix index as cache-aware's
(kvflow/cluster/prefix_index.py), fed with the prompts routed to it. Rates come from the client in
`ReplicaLoad.extra` ("prefill_tokens_per_s", "transfer_s_per_block"), measured as requests complete; the
defaults below stand until then.
"""
from __future__ import annotations

from kvflow.cluster.prefix_index import PrefixIndex
from kvflow.cluster.router import ROUTERS, ReplicaLoad, RouteRequest, Router

DEFAULT_PREFILL_TOKENS_PER_S = 2000.0
DEFAULT_TRANSFER_S_PER_BLOCK = 0.0


def predicted_ttft(req: RouteRequest, load: ReplicaLoad, hit_blocks: int, block_size: int) -> float:
    rate = load.extra.get("prefill_tokens_per_s") or DEFAULT_PREFILL_TOKENS_PER_S
    per_block = load.extra.get("transfer_s_per_block", DEFAULT_TRANSFER_S_PER_BLOCK)
    queued = load.extra.get("queued_prefill_tokens", load.outstanding_tokens)
    own = max(0, req.num_prompt_tokens - hit_blocks * block_size)
    return (queued + own) / rate + per_block * (len(req.block_hashes) - hit_blocks)


@ROUTERS.register("min-ttft")
class MinTTFTRouter(Router):
    load_extras = ("prefill_tokens_per_s", "transfer_s_per_block", "queued_prefill_tokens")

    def __init__(self, num_replicas: int, block_size: int = 16, **options):
        super().__init__(num_replicas, **options)
        self.block_size = block_size
        self.index = PrefixIndex(num_replicas)
        self.last_prediction: dict[int, float] = {}      # replica -> the TTFT predicted for the last request

    def route(self, req: RouteRequest, loads: list[ReplicaLoad]) -> int:
        best, best_t = None, float("inf")
        self.last_prediction = {}
        for ld in loads:
            if not ld.healthy:
                continue
            if ld.num_kv_blocks:
                self.index.set_capacity(ld.index, ld.num_kv_blocks)
            t = predicted_ttft(req, ld, self.index.hit_length(req.block_hashes, ld.index), self.block_size)
            self.last_prediction[ld.index] = t
            if t < best_t:
                best, best_t = ld.index, t
        if best is None:
            raise RuntimeError("no healthy replica")
        self.index.insert(best, req.block_hashes)
        return best

    def on_replica_down(self, replica: int) -> None:
        self.index.clear(replica)

    def on_replica_up(self, replica: int) -> None:
        self.index.clear(replica)
