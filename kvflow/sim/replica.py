"""One simulated engine: kvflow's real KVCacheManager and Scheduler (its policy, preemption, prefix cache,
swap tier), unchanged, on the simulation's clock, with the simulated runner in place of the model.

`engine_spec(config, profile)` derives what an engine core would be built with from an EngineConfig and a
hardware profile (the KV blocks the profile's memory holds, the swap blocks, the context length), as
kvflow.config.resolve does from a model. A step is two halves, as EngineCore.step: `begin_step` schedules
and asks the runner for the step's seconds; `end_step`, that long later, feeds the runner's output back
(Scheduler.record_step, Scheduler.update_from_output) and returns the engine core's outputs.

Speculative decoding (`speculative_config`) runs the real scheduler's path (kvflow/spec/adaptive.py's
SpecController, lookahead slots, the rollback of rejected drafts) against the simulated runner's drafts and
verifications (kvflow/sim/runner.py; `spec_acceptance`: each draft's chance of acceptance). As EngineCore,
every step then teaches the scheduler's step-time model (the controller's batch rule reads it), without the
proposer's share, which the controller learns apart.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvflow.cluster.router import LoadTable, ReplicaLoad
from kvflow.config import EngineConfig
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.predict.base import LengthPredictor
from kvflow.request import Request
from kvflow.sampling.params import SamplingParams
from kvflow.scheduler.costs import PreemptionCost
from kvflow.scheduler.policy import make_policy
from kvflow.scheduler.scheduler import Scheduler
from kvflow.sim.cost_model import DTYPE_BYTES, CostModel, HardwareProfile
from kvflow.sim.disk import SimDiskTier
from kvflow.sim.runner import DEFAULT_ACCEPTANCE, SimRunner
from kvflow.spec.config import SpeculativeConfig

PARAMS = SamplingParams(max_tokens=1 << 30, ignore_eos=True)     # one object shared by every simulated request
# ... and their stop ids (none: ignore_eos): one shared object, which the per-token stop check reads without
# touching a set of each request's own
NO_STOP_IDS: frozenset[int] = frozenset()


@dataclass
class EngineSpec:
    block_size: int
    num_kv_blocks: int
    num_swap_blocks: int
    block_bytes: int
    max_model_len: int
    enable_prefix_caching: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    preemption_mode: str
    scheduling_policy: str
    client_weights: str | None
    tpot_slo_ms: float | None
    enable_chunked_prefill: bool
    kv_reservation: str
    async_recovery: bool
    speculative: SpeculativeConfig | None = None
    num_disk_blocks: int = 0           # the disk tier's size in blocks (kv_store_dir; 0: none)


def engine_spec(config: EngineConfig, profile: HardwareProfile) -> EngineSpec:
    c, sc, m = config.cache, config.scheduler, profile.model
    itemsize = DTYPE_BYTES[profile.dtype]
    per_token = 2 * m["num_layers"] * m["num_kv_heads"] * (
        m["head_dim"] + itemsize if c.kv_cache_dtype == "int8" else m["head_dim"] * itemsize)
    block_bytes = per_token * c.block_size
    model_len = config.model.max_model_len or m.get("max_model_len", 8192)
    if c.num_kv_blocks is not None:
        num_blocks = c.num_kv_blocks
    else:
        budget = c.kv_cache_memory_bytes or profile.kv_cache_bytes
        num_blocks = min(budget // block_bytes, sc.max_num_seqs * -(-model_len // c.block_size))
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget} is too small for one block of {c.block_size} tokens")
    num_swap = c.num_swap_blocks if c.num_swap_blocks is not None else c.swap_space_bytes // block_bytes
    return EngineSpec(c.block_size, num_blocks, num_swap, block_bytes, model_len, c.enable_prefix_caching,
                      sc.max_num_seqs, sc.max_num_batched_tokens, sc.preemption_mode, sc.scheduling_policy,
                      sc.client_weights, sc.tpot_slo_ms, sc.enable_chunked_prefill, sc.kv_reservation,
                      sc.async_recovery, config.speculative.parsed,
                      c.kv_store_max_bytes // block_bytes if c.kv_store_dir is not None else 0)


def queued_prefill_tokens(s: Scheduler) -> int:
    """Prompt tokens still to compute: every waiting request's, and the running ones' with more than one
    token left (a decode has exactly one). Once per step over the whole batch, so len() rather than the
    Request properties (num_tokens = len(all_token_ids)), and one list per queue."""
    queued = sum([len(r.all_token_ids) - r.num_computed_tokens for r in s.waiting])
    return queued + sum([n for r in s.running if (n := len(r.all_token_ids) - r.num_computed_tokens) > 1])


class SimReplica:
    def __init__(self, index: int, spec: EngineSpec, cost: CostModel, clock: Callable[[], float],
                 prefix_caching: bool | None = None, track_tables: bool = False,
                 spec_acceptance: float | list[float] = DEFAULT_ACCEPTANCE, reports_extra: bool = True,
                 predictor: LengthPredictor | None = None, spec_propose_rate: float | list[float] = 1.0):
        """`reports_extra`: whether its load carries the extras a router or the elastic P/D rule reads
        ("queued_prefill_tokens", a sum over its queues every step, and "prefill_tokens_per_s"); the
        simulation turns it off when nothing reads them (Router.load_extras). `predictor`: a learned length
        predictor (kvflow/sim/features.py: `add` then takes the features it reads; None: the scheduler's own
        online one, when its policy ranks by length)."""
        self.index, self.spec = index, spec
        caching = spec.enable_prefix_caching if prefix_caching is None else prefix_caching
        disk = (SimDiskTier(spec.num_disk_blocks, spec.block_bytes / cost.profile.disk_bytes_per_s, clock)
                if spec.num_disk_blocks else None)
        self.kv = KVCacheManager(spec.num_kv_blocks, spec.block_size, caching, spec.num_swap_blocks, disk)
        prefill_rate = 1.0 / max(cost.step_seconds(0, 1024, 0, 1024 * 512) / 1024, 1e-9)
        self.cost = PreemptionCost(spec.block_bytes, prefill_tokens_per_s=prefill_rate,
                                   swap_bytes_per_s=cost.profile.swap_bytes_per_s)
        self.scheduler = Scheduler(
            self.kv, spec.max_num_seqs, spec.max_num_batched_tokens, spec.max_model_len, spec.preemption_mode,
            self.cost, clock=clock, policy=make_policy(spec.scheduling_policy, client_weights=spec.client_weights),
            tpot_slo_ms=spec.tpot_slo_ms, enable_chunked_prefill=spec.enable_chunked_prefill,
            kv_reservation=spec.kv_reservation, async_recovery=spec.async_recovery, speculative=spec.speculative,
            predictor=predictor)
        self.runner = SimRunner(cost, track_tables, spec.speculative, spec_acceptance, spec.block_bytes,
                                spec_propose_rate)
        if predictor is not None and "hidden" in predictor.features:
            self.runner.hidden = {}     # the runner returns it when the prompt's last token is computed
        self.reports_extra = reports_extra
        self.load = ReplicaLoad(index, num_kv_blocks=spec.num_kv_blocks, extra={
            "prefill_tokens_per_s": prefill_rate, "queued_prefill_tokens": 0} if reports_extra else {})
        self.loads: LoadTable | None = None   # the pool's table of loads (its router's view), told of changes
        self.busy = False
        self.role = "mixed"             # or prefill / decode (P/D)
        self._step = None
        self.started_s = 0.0          # when it became ready (serverless)
        self.idle_since = 0.0

    def add(self, rid: str, prompt: list[int], max_tokens: int, arrival: float, user: str | None = None,
            outputs: list[int] | None = None, features: dict | None = None) -> None:
        """`features`: the model's features of the prompt that the learned length predictor reads (as
        EngineCore.add_request computes them: "embed" now, "hidden" from the step that ends the prompt)."""
        req = Request(rid, prompt, PARAMS, NO_STOP_IDS, max_tokens, arrival, client=user)
        if outputs:                    # moved here after its first token (P/D): its outputs so far are known
            req.output_token_ids = list(outputs)
            req.all_token_ids += outputs
            req.num_prompt_logprobs = len(prompt)
        if features and self.runner.hidden is not None and "hidden" in features:
            self.runner.hidden[rid] = (len(prompt), features["hidden"])
        self.scheduler.add_request(req, {"embed": features["embed"]} if features and "embed" in features else None)
        self.count_placed(len(prompt))

    def count_placed(self, num_prompt: int) -> None:
        """The load fields a request placed here changes (kvflow/sim/parallel.py's router counts them on its
        view of a replica that another process runs)."""
        self.load.num_assigned += 1
        self.load.num_waiting += 1
        if self.reports_extra:
            self.load.extra["queued_prefill_tokens"] += num_prompt
        self.load_changed()

    def load_changed(self) -> None:
        """`self.load` changed: the pool's LoadTable recomputes its value (least-load reads the kept ones)."""
        if self.loads is not None:
            self.loads.update(self.load.index)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    def begin_step(self) -> float | None:
        """Schedule a step; its seconds, or None when nothing could be scheduled."""
        sched = self.scheduler.schedule()
        result, seconds = self.runner.execute(sched)      # finished ids and block ops apply even when empty
        if not sched.req_ids:
            if self.scheduler.waiting and not self.scheduler.running and not self.scheduler.num_loading:
                req = self.scheduler.waiting[0]
                raise ValueError(f"cannot schedule request {req.request_id!r} ({req.num_tokens} tokens) with "
                                 f"{self.kv.pool.num_free} of {self.kv.num_blocks} KV blocks free: num_kv_blocks "
                                 f"is too small for this workload")
            return None
        seconds = self.runner.cost.step_started(seconds, self.runner.last_prefill)   # beside its machine's others
        self._step = (sched, result, seconds)
        self.busy = True
        return seconds

    def wake_at(self) -> float | None:
        """With nothing scheduled: when a disk-tier read its waiting requests need ends (None: no such read)."""
        return self.kv.disk.wake_at() if self.kv.disk is not None and self.scheduler.num_loading else None

    def end_step(self):
        """Apply the finished step; (its SchedulerOutput, the engine core's outputs)."""
        sched, result, seconds = self._step
        self._step = None
        self.busy = False
        s = self.scheduler
        if s.spec is not None and result.draft_tokens:     # as EngineCore: the proposer's part of the step
            s.spec.observe_draft(result.draft_seconds, result.draft_tokens)
            seconds -= result.draft_seconds
        if s.tpot_slo_s is not None or s.spec is not None:   # the step-time model's readers: budget, batch rule
            s.record_step(sched, seconds)
        num_tokens = self.runner.last_tokens
        if num_tokens >= 4 * len(sched.req_ids) and num_tokens >= 64:   # as EngineCore: refine the prefill rate
            self.cost.prefill_tokens_per_s += 0.2 * (num_tokens / seconds - self.cost.prefill_tokens_per_s)
        outputs = s.update_from_output(sched, result)
        ld = self.load
        ld.num_running, ld.num_waiting = len(s.running), len(s.waiting)
        ld.kv_cache_usage = 1.0 - self.kv.pool.num_free / self.kv.num_blocks
        ld.outstanding_tokens = max(ld.outstanding_tokens - (num_tokens - self.runner.last_rejected), 0.0)
        if self.reports_extra:
            ld.extra["queued_prefill_tokens"] = queued_prefill_tokens(s)
            ld.extra["prefill_tokens_per_s"] = self.cost.prefill_tokens_per_s
        self.load_changed()
        return sched, outputs

    def finished(self, remaining_tokens: float) -> None:
        """A request routed here ended (the cluster's count of requests in flight)."""
        self.load.num_assigned -= 1
        self.load.outstanding_tokens = max(self.load.outstanding_tokens - remaining_tokens, 0.0)
        self.load_changed()

    def check(self) -> None:
        """The block invariant (as EngineCore.check_blocks): every block free, cached, or held by a live request."""
        self.scheduler.check()
