"""The options of kvflow's distributed shapes (survey §5): many replicas behind a router (`ClusterOptions`),
disaggregated prefill and decode workers (`DisaggOptions`), and serverless replicas that scale with load
(`ServerlessOptions`). Sections of `EngineConfig` (kvflow/config.py); each field is a command-line flag."""
from __future__ import annotations

from dataclasses import dataclass

from kvflow.cluster.router import ROUTERS
from kvflow.options import check_number, check_positive, opt

KV_TRANSFERS = ("sync", "async", "layerwise")
KV_TRANSPORTS = ("ray", "mooncake")


@dataclass
class ClusterOptions:
    replicas: int = opt(1, "engine replicas; more than one runs each as a Ray actor behind the router")
    router: str = opt("least-load", "how a request chooses its replica (kvflow/cluster/routers); with prefill "
                                    "and decode workers, its prefill worker", tuple(ROUTERS.modules))
    ray_address: str | None = opt(None, "the Ray cluster to join (auto, or HOST:PORT); default: a local one")
    replica_cpus: float | None = opt(None, "CPU cores per replica, declared to Ray; its torch and kernel threads "
                                           "follow it (default: this machine's cores / replicas)")
    replica_gpus: float = opt(0.0, "GPUs per replica, declared to Ray")
    migration_threshold: int = opt(0, "move a running request with its KV blocks from the busiest replica to the "
                                      "idlest when their requests in flight differ by this many (0: never)")
    max_replica_restarts: int = opt(3, "Ray restarts a replica that died at most this many times")

    def __post_init__(self):
        check_positive(self, "replicas")
        check_positive(self, "migration_threshold", allow_zero=True)
        check_positive(self, "max_replica_restarts", allow_zero=True)
        if self.router not in ROUTERS:
            ROUTERS.get(self.router)                       # the ValueError naming the field
        check_number(self, "replica_cpus", optional=True)
        check_number(self, "replica_gpus", allow_zero=True)


@dataclass
class DisaggOptions:
    prefill_replicas: int = opt(0, "prefill workers (with --decode-replicas: prefill and decode disaggregated, "
                                   "each worker a Ray actor; 0: colocated)")
    decode_replicas: int = opt(0, "decode workers (with --prefill-replicas)")
    kv_transfer: str = opt("sync", "how a prompt's KV blocks reach its decode worker: sync (the decode worker "
                                   "is chosen after prefill and pulls them, DistServe), async (chosen with the "
                                   "prefill worker, blocks stream as they fill, SplitWise), layerwise (each "
                                   "layer's KV sent as soon as that layer is computed, Mooncake)", KV_TRANSFERS)
    kv_transport: str = opt("ray", "what carries a sync transfer's blocks: ray (the object store) or mooncake "
                                   "(Mooncake's transfer engine over TCP or RDMA; pip install "
                                   "mooncake-transfer-engine-non-cuda)", KV_TRANSPORTS)
    pd_policy: str = opt("least-load", "how a request chooses its decode worker (kvflow/cluster/routers)",
                         tuple(ROUTERS.modules))
    kv_transfer_timeout_s: float = opt(10.0, "a decode worker waits this long for a request's KV blocks, then "
                                             "computes its prompt itself")
    kv_pool: bool = opt(False, "a KV pool every worker reads (Mooncake's store): prefix blocks by chained hash in "
                               "host memory, so a prefix one prefill worker computed is reused by another")
    kv_pool_bytes: int = opt(1 << 30, "the shared KV pool's size", flag="--kv-pool-size", gib=True)
    early_rejection: bool = opt(False, "refuse a request (503 with Retry-After) before any work when no decode "
                                       "worker has the memory for it (Mooncake)")
    pd_elastic: bool = opt(False, "a worker switches between prefill and decode when the load mix changes "
                                  "(SplitWise, TetriInfer); each switch is logged")

    def __post_init__(self):
        check_positive(self, "prefill_replicas", allow_zero=True)
        check_positive(self, "decode_replicas", allow_zero=True)
        if (self.prefill_replicas == 0) != (self.decode_replicas == 0):
            raise ValueError(f"prefill_replicas and decode_replicas must both be at least 1 (disaggregated) or "
                             f"both 0, got {self.prefill_replicas} and {self.decode_replicas}")
        if self.kv_transfer not in KV_TRANSFERS:
            raise ValueError(f"kv_transfer must be one of {', '.join(KV_TRANSFERS)}, got {self.kv_transfer!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {', '.join(KV_TRANSPORTS)}, got {self.kv_transport!r}")
        if self.kv_transport == "mooncake" and self.kv_transfer != "sync":
            raise ValueError("kv_transport mooncake carries sync transfers (the decode worker pulls); async and "
                             "layerwise stream with Ray actor calls")
        if self.pd_policy not in ROUTERS:
            raise ValueError(f"pd_policy must be one of {', '.join(ROUTERS.modules)}, got {self.pd_policy!r}")
        check_number(self, "kv_transfer_timeout_s")
        check_positive(self, "kv_pool_bytes")

    @property
    def enabled(self) -> bool:
        return self.prefill_replicas > 0


@dataclass
class ServerlessOptions:
    serverless: bool = opt(False, "serve on Ray Serve: replicas scale with load, to zero when idle (DeepFlow)")
    min_replicas: int = opt(0, "serverless: replicas kept when idle")
    max_replicas: int = opt(2, "serverless: replicas at most")
    scale_down_idle_s: float = opt(30.0, "serverless: a replica idle this long is stopped")
    warm_pool: int = opt(1, "serverless: processes kept ready to become a replica (runtime imported, weights read)")
    target_ongoing_requests: float = opt(2.0, "serverless: requests in flight per replica the autoscaler aims for")
    scale_up_timeout_s: float = opt(60.0, "serverless: a request waits this long for a replica to start, then "
                                          "gets 503 with Retry-After")
    keep_kv: bool = opt(True, "serverless: before a replica is scaled down, keep its prefix cache in host memory "
                              "under a shared index, for the replicas that come later (DeepFlow)")
    keep_kv_bytes: int = opt(1 << 30, "serverless: the host memory that keeps prefix caches across scale-downs",
                             flag="--keep-kv-size", gib=True)

    def __post_init__(self):
        check_positive(self, "min_replicas", allow_zero=True)
        check_positive(self, "max_replicas")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        check_number(self, "scale_down_idle_s", allow_zero=True)
        check_positive(self, "warm_pool", allow_zero=True)
        check_number(self, "target_ongoing_requests")
        check_number(self, "scale_up_timeout_s")
        check_positive(self, "keep_kv_bytes")
