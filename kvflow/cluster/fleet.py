"""The replicas as the cluster client sees them: Ray started or joined, one actor per replica with its
resources declared, and each replica's state on the client's side (health, the life of the actor it talks
to, the sequence of its calls, the load it reported, the requests routed to it)."""
from __future__ import annotations

import dataclasses
import logging
import os
import time

from kvflow.cluster.router import ReplicaLoad
from kvflow.config import ResolvedConfig
from kvflow.engine.wire import EngineStats
from kvflow.memory.kv_cache_manager import extend_block_hashes

logger = logging.getLogger("kvflow")

STALL_S = 30.0              # a replica with requests that reports no step for this long is drained from routing


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of `token_ids`: the engine's own prefix-cache keys."""
    return extend_block_hashes([], token_ids, block_size)


def connect_ray(address: str | None, num_cpus: float):
    """Join the Ray cluster at `address` (auto or HOST:PORT), or start a local one with `num_cpus` CPUs,
    bound to 127.0.0.1 (a multi-machine cluster is started with `ray start` and joined by address); nothing
    when this process is already connected (a test session's cluster, a Ray job)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")     # nothing leaves the machine
    import ray
    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=max(num_cpus, os.cpu_count() or 1), _node_ip_address="127.0.0.1", **kwargs)
    return ray


def replica_cpus(requested: float | None, replicas: int) -> float:
    """CPU cores per replica: as asked, else this machine's cores shared evenly (at least one)."""
    if requested:
        return requested
    return float(max(1, (os.cpu_count() or 1) // replicas))


def frontend_predictor(rc: ResolvedConfig):
    """The output-length predictor the router reads (predicted-load): predict.base.frontend_predictor of the
    configured one."""
    from kvflow.predict.base import frontend_predictor as frontend, make_predictor, model_identity
    return frontend(make_predictor(rc.config.scheduler.length_predictor, model_identity(rc.model_path, rc.arch)))


def start_replicas(rc: ResolvedConfig, actor_cls=None, count: int | None = None, **kwargs) -> list["Replica"]:
    """`count` actors of `actor_cls` (default: the configured number of EngineReplica); `kwargs` go to each
    actor's constructor."""
    from kvflow.cluster.replica import EngineReplica
    opts = rc.config.cluster
    count = count or opts.replicas
    cpus = replica_cpus(opts.replica_cpus, count)
    ray = connect_ray(opts.ray_address, cpus * count)
    actor = ray.remote(actor_cls or EngineReplica).options(
        num_cpus=cpus, num_gpus=opts.replica_gpus, max_restarts=opts.max_replica_restarts, max_task_retries=0,
        max_concurrency=8)
    level = logging.getLevelName(logging.getLogger("kvflow").getEffectiveLevel())
    config = rc.to_json()
    logger.info("starting %d replicas (%g CPUs%s each) with router %s", count, cpus,
                f", {opts.replica_gpus:g} GPUs" if opts.replica_gpus else "", opts.router)
    return [Replica(i, actor.remote(config, i, cpus, level, **kwargs)) for i in range(count)]


@dataclasses.dataclass
class Replica:
    index: int
    actor: object
    healthy: bool = False
    gone: bool = False                  # dead with no restart left
    incarnation: str | None = None      # the life of the actor the client talks to
    seq: int = 0
    stats: EngineStats = dataclasses.field(default_factory=EngineStats)
    assigned: set = dataclasses.field(default_factory=set)   # request ids routed here, not finished
    info: dict = dataclasses.field(default_factory=dict)
    restarts: int = 0
    last_output: float = 0.0            # when it last reported a step (time.monotonic)

    def assign(self, request_id: str) -> None:
        if not self.assigned:              # idle until now: its stall clock starts here
            self.last_output = time.monotonic()
        self.assigned.add(request_id)

    def stalled(self, now: float) -> bool:
        """Requests are routed here but it has reported no step for STALL_S: drained from routing until it
        steps again (a replica that is slow, or stuck)."""
        return bool(self.assigned) and now - self.last_output > STALL_S

    def up(self, info: dict) -> None:
        self.info, self.incarnation, self.seq, self.healthy = info, info["incarnation"], 0, True
        self.stats, self.last_output = EngineStats(), time.monotonic()

    def down(self) -> None:
        self.healthy, self.incarnation = False, None
        self.stats = EngineStats()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    def submit(self, *messages: list) -> None:
        self.actor.submit.remote(self.incarnation, self.next_seq(), list(messages))

    def load(self, requests: dict, routable: bool) -> ReplicaLoad:
        s = self.stats
        outstanding = 0.0
        for rid in self.assigned:
            t = requests.get(rid)
            if t is not None:
                expected = t.predicted if t.predicted is not None else t.req.max_tokens
                outstanding += (0 if t.tokens else len(t.req.prompt_token_ids)) + max(1.0, expected - len(t.tokens))
        return ReplicaLoad(self.index, routable, s.num_running, s.num_waiting, s.kv_cache_usage,
                           len(self.assigned), outstanding, self.info.get("num_kv_blocks", 0))

    def describe(self, requests: dict) -> dict:
        d = {"index": self.index, "healthy": self.healthy, "gone": self.gone, "restarts": self.restarts,
             "stalled": self.healthy and self.stalled(time.monotonic()),
             "pid": self.info.get("pid"), "cores": self.info.get("cores"), "num_assigned": len(self.assigned)}
        d.update(dataclasses.asdict(self.stats))
        return d


def aggregate(replicas: list[Replica]) -> EngineStats:
    """The fleet's stats: counts summed, KV usage averaged over healthy replicas, queues merged."""
    total = EngineStats()
    healthy = [r for r in replicas if r.healthy]
    for r in healthy:
        s = r.stats
        for f in ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                  "num_swapped_out", "num_cow_copies", "disk_hit_tokens", "spec_drafts", "spec_accepted",
                  "spec_verifications"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
        for k, v in s.queue_lengths.items():
            total.queue_lengths[k] = total.queue_lengths.get(k, 0) + v
        total.token_budget = max(total.token_budget, s.token_budget)
    if healthy:
        total.kv_cache_usage = sum(r.stats.kv_cache_usage for r in healthy) / len(healthy)
    return total
