"""EngineCore: the step loop of one replica (scheduler + KV-cache manager + model runner).

It speaks in token ids only. Each `step()` schedules work, runs one forward pass, applies the
token-level stop rules and returns one EngineCoreOutput per request that made progress. Plain data
in and out, so the same core can run in-process (LLM) or behind a process boundary (server).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from kvflow.config import EngineConfig, ModelConfig
from kvflow.engine.model_runner import ModelRunner
from kvflow.memory.disk_store import DiskKVStore, model_identity
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.models.loader import load_model
from kvflow.request import Request, RequestStatus
from kvflow.scheduler.scheduler import PreemptionCost, Scheduler

logger = logging.getLogger("kvflow")


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list | None = None     # per new token: ([(id, logprob)] sampled first, then top-N; rank)
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    # prompt logprobs computed this step (a prompt chunk may send them with no new token), in the
    # new_logprobs format, one entry per prompt token from the second on. Keep new fields at the END:
    # core_process encodes these fields positionally.
    prompt_logprobs: list | None = None


@dataclass
class EngineStats:
    """A snapshot of the core's load, sent to the frontend with every step (Prometheus gauges)."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0          # fraction of KV blocks held by requests
    prefix_cache_queries: int = 0        # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int = 0
    num_preemptions: int = 0             # cumulative
    num_swapped_out: int = 0             # of those, preempted by swapping out (the rest: recompute)
    num_cow_copies: int = 0              # blocks copied on write by forked samples, cumulative
    disk_hit_tokens: int = 0             # prompt tokens loaded from the disk tier, cumulative


class EngineCore:
    def __init__(self, runner: ModelRunner, kv: KVCacheManager, scheduler: Scheduler, device: str = "cpu"):
        self.runner, self.kv, self.scheduler = runner, kv, scheduler
        self.device = device
        self.requests: dict[str, Request] = {}

    @classmethod
    def build(cls, config: EngineConfig, path: str, mcfg: ModelConfig, dtype: torch.dtype, max_model_len: int,
              num_blocks: int, reader=None) -> EngineCore:
        """Load the weights and allocate the KV cache (the Frontend has sized it)."""
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        model = load_model(path, mcfg, dtype, config.device, max_model_len, reader, config.quantization)
        bs = config.block_size
        runner = ModelRunner(model, mcfg, dtype, config.device, num_blocks, bs, config.kv_cache_dtype)
        num_swap = config.num_swap_blocks
        if num_swap is None:
            num_swap = config.swap_space_bytes // runner.block_bytes
        runner.allocate_swap(num_swap)
        kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching, num_swap)
        if config.kv_store_dir:
            identity = model_identity(path, {"model": dataclasses.asdict(mcfg), "dtype": str(dtype),
                                             "kv_cache_dtype": config.kv_cache_dtype, "block_size": bs,
                                             "quantization": getattr(config, "quantization", None)})
            kv.disk = runner.kv_store = DiskKVStore(config.kv_store_dir, identity, runner.block_spec(),
                                                    config.kv_store_max_bytes)
        cost = PreemptionCost(runner.block_bytes, swap_bytes_per_s=runner.measure_swap_bandwidth())
        scheduler = Scheduler(kv, config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                              config.preemption_mode, cost)
        logger.info("loaded %s (%s, %s) in %.1fs; KV cache: %d blocks of %d tokens", path, mcfg.model_type,
                    dtype, time.perf_counter() - t0, num_blocks, bs)
        return cls(runner, kv, scheduler, config.device)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        if req.params.seed is not None and req.generator is None:   # its own stream, on the engine's device
            req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        if req.fork_of is not None:            # share the prompt blocks of the request's sample 0
            req.fork_source = self.requests.get(req.fork_of)
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.scheduler.finish(req, status)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        batch = self.scheduler.schedule()
        if not batch.requests:
            self.runner.apply_block_ops(batch.block_ops)
            if self.scheduler.waiting and not self.scheduler.running:   # would spin forever: fail loudly
                req = self.scheduler.waiting[0]
                raise RuntimeError(f"cannot schedule request {req.request_id!r} ({req.num_tokens} tokens) with "
                                   f"{self.kv.pool.num_free} of {self.kv.num_blocks} KV blocks free")
            return []
        t0 = time.perf_counter()
        sampled = self.runner.execute(batch)
        num_tokens = sum(batch.num_new_tokens)
        if num_tokens >= 4 * len(batch.requests) and num_tokens >= 64:   # mostly prefill: refine the estimate
            cost = self.scheduler.cost
            cost.prefill_tokens_per_s += 0.2 * (num_tokens / (time.perf_counter() - t0) - cost.prefill_tokens_per_s)
        now = time.monotonic()
        finished = set(map(id, self.scheduler.update(batch, sampled)))
        outputs = []
        for req, token in zip(batch.requests, sampled):
            prompt_logprobs, req.new_prompt_logprobs = req.new_prompt_logprobs, None
            if token is None and prompt_logprobs is None:
                continue
            if token is not None and req.first_token_time is None:
                req.first_token_time = now
            done = id(req) in finished
            outputs.append(EngineCoreOutput(
                request_id=req.request_id, new_token_ids=[token] if token is not None else [],
                new_logprobs=req.logprobs[-1:] if req.logprobs is not None and token is not None else None,
                finish_reason=req.status.value if done else None,
                stop_reason=req.stop_reason, num_cached_tokens=req.num_cached_tokens,
                first_scheduled_time=req.first_scheduled_time, num_preemptions=req.num_preemptions,
                prompt_logprobs=prompt_logprobs))
            if done:
                del self.requests[req.request_id]
        return outputs

    def warm_up(self) -> None:
        """Run one small request through every stage, so that the first user request does not pay
        for first-call costs (allocator growth, kernel selection); its prefix is then forgotten."""
        from kvflow.sampling.params import SamplingParams
        self.add_request(Request("warm-up", list(range(1, 33)), SamplingParams(max_tokens=4, ignore_eos=True),
                                 set(), 4))
        while self.has_unfinished():
            self.step()
        self.kv.pool.reset_prefix_cache()
        self.kv.num_queries = self.kv.num_hits = 0

    def shutdown(self) -> None:
        """Persist the prefix blocks still cached in memory to the disk tier (if on) and wait for its writes."""
        store = self.kv.disk
        if store is None:
            return
        self.runner.apply_block_ops(self.kv.take_ops())
        for h, block in list(self.kv.pool.cached.items()):
            if h not in store:
                store.save_async(h, self.runner.read_block(block.block_id))
        store.close()
        self.kv.disk = self.runner.kv_store = None

    def stats(self) -> EngineStats:
        kv, sched = self.kv, self.scheduler
        return EngineStats(len(sched.running), len(sched.waiting), 1.0 - kv.pool.num_free / kv.num_blocks,
                           kv.num_queries, kv.num_hits, sched.num_preemptions, sched.num_swapped_out,
                           kv.num_cow_copies, kv.num_disk_hits)

    def check_blocks(self) -> None:
        """Assert that every KV block is free, cached, or held by a live request (tests call this)."""
        self.scheduler.check()
