"""EngineCore: the step loop of one replica.

    SchedulerOutput = scheduler.schedule()
    RunnerOutput    = runner.execute(SchedulerOutput)
    outputs         = scheduler.update_from_output(SchedulerOutput, RunnerOutput)

It speaks in token ids only (`EngineCoreRequest` in, `EngineCoreOutput` out: kvflow/engine/wire.py), so the
same core runs in this process (LLM) or behind a process boundary (the server's engine-core process).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from kvflow.config import ResolvedConfig
from kvflow.engine.block_ops import apply_block_ops
from kvflow.engine.model_runner import ModelRunner
from kvflow.engine.wire import EngineCoreOutput, EngineCoreRequest, EngineStats
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.request import Request, RequestStatus
from kvflow.sampling.params import SamplingParams
from kvflow.scheduler.policy import make_policy
from kvflow.scheduler.scheduler import PreemptionCost, Scheduler

logger = logging.getLogger("kvflow")

LOADING_WAIT_S = 5e-4        # a step with nothing to run but KV being read from a tier sleeps this long


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler):
        self.runner, self.scheduler, self.kv = runner, scheduler, scheduler.kv
        self._features_log: dict | None = None
        self._sync_feature_collection()

    @property
    def features_log(self) -> dict | None:
        """None, or a dict in which every request's predictor features are kept by request id: {"embed":
        mean input embedding, "hidden": last prompt token's final hidden state} (`kvflow predict train`)."""
        return self._features_log

    @features_log.setter
    def features_log(self, log: dict | None) -> None:
        self._features_log = log
        self._sync_feature_collection()

    def _sync_feature_collection(self) -> None:
        wanted = set(self.scheduler.predictor.features) if self.scheduler.predictor is not None else set()
        if self._features_log is not None:
            wanted |= {"embed", "hidden"}
        self._features = wanted
        self.runner.collect_hidden = "hidden" in wanted

    @classmethod
    def build(cls, rc: ResolvedConfig, reader=None) -> EngineCore:
        """Load the weights, allocate the KV cache and its tiers, and measure the swap tier's bandwidth."""
        from kvflow.models.loader import load_model
        cfg = rc.config
        if cfg.parallel.num_threads:
            torch.set_num_threads(cfg.parallel.num_threads)
        torch.manual_seed(cfg.model.seed)
        t0 = time.perf_counter()
        logger.info("loading %s (%s, %s%s) ...", rc.model_path, rc.arch.model_type, rc.dtype,
                    f", {cfg.model.quantization}" if cfg.model.quantization else "")
        dtype = getattr(torch, rc.dtype)
        model = load_model(rc.model_path, rc.arch, dtype, cfg.model.device, rc.max_model_len, reader,
                           cfg.model.quantization)
        bs = cfg.cache.block_size
        runner = ModelRunner(model, rc.arch, dtype, cfg.model.device, rc.num_kv_blocks, bs, cfg.cache.kv_cache_dtype)
        runner.allocate_swap(rc.num_swap_blocks)
        disk = None
        if cfg.cache.kv_store_dir:
            from kvflow.memory.disk_store import DiskKVStore, model_identity
            identity = model_identity(rc.model_path, {
                "model": dataclasses.asdict(rc.arch), "dtype": str(dtype), "kv_cache_dtype": cfg.cache.kv_cache_dtype,
                "block_size": bs, "quantization": cfg.model.quantization})
            disk = runner.kv_store = DiskKVStore(cfg.cache.kv_store_dir, identity, runner.block_spec(),
                                                 cfg.cache.kv_store_max_bytes)
        kv = KVCacheManager(rc.num_kv_blocks, bs, cfg.cache.enable_prefix_caching, rc.num_swap_blocks, disk)
        cost = PreemptionCost(runner.block_bytes, swap_bytes_per_s=runner.measure_swap_bandwidth())
        sc = cfg.scheduler
        predictor = None
        if sc.length_predictor is not None:
            from kvflow.predict.base import make_predictor, model_identity
            predictor = make_predictor(sc.length_predictor, model_identity(rc.model_path, rc.arch))
        scheduler = Scheduler(kv, sc.max_num_seqs, sc.max_num_batched_tokens, rc.max_model_len, sc.preemption_mode,
                              cost, policy=make_policy(sc.scheduling_policy, client_weights=sc.client_weights),
                              predictor=predictor, tpot_slo_ms=sc.tpot_slo_ms,
                              enable_chunked_prefill=sc.enable_chunked_prefill, kv_reservation=sc.kv_reservation,
                              async_recovery=sc.async_recovery)
        logger.info("loaded %s (%s, %s) in %.1fs; KV cache: %d blocks of %d tokens", rc.model_path,
                    rc.arch.model_type, rc.dtype, time.perf_counter() - t0, rc.num_kv_blocks, bs)
        return cls(runner, scheduler)

    def add_request(self, r: EngineCoreRequest) -> None:
        features = {}
        if "embed" in self._features:
            features["embed"] = self.runner.embed_features(r.prompt_token_ids)
        if self._features_log is not None:
            self._features_log[r.request_id] = dict(features)
        self.scheduler.add_request(Request(r.request_id, list(r.prompt_token_ids), r.params, set(r.stop_ids),
                                           r.max_tokens, r.arrival_time, fork_from=r.fork_from,
                                           priority=r.priority, client=r.client), features)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            self.runner.execute(sched)         # block ops and finished ids still apply
            if self.scheduler.num_loading:     # KV on its way from a tier: let the reader work
                time.sleep(LOADING_WAIT_S)
            elif self.scheduler.waiting and not self.scheduler.running:   # would spin forever: fail loudly
                req = self.scheduler.waiting[0]
                raise RuntimeError(f"cannot schedule request {req.request_id!r} ({req.num_tokens} tokens) with "
                                   f"{self.kv.pool.num_free} of {self.kv.num_blocks} KV blocks free")
            return []
        t0 = time.perf_counter()
        result = self.runner.execute(sched)
        seconds = time.perf_counter() - t0
        self.scheduler.record_step(sched, seconds)
        num_tokens, cost = sched.num_scheduled_tokens, self.scheduler.cost
        if num_tokens >= 4 * len(sched) and num_tokens >= 64:   # mostly prefill: refine the estimate
            cost.prefill_tokens_per_s += 0.2 * (num_tokens / seconds - cost.prefill_tokens_per_s)
        if self._features_log is not None:
            for rid, hidden in result.prompt_hidden.items():
                self._features_log.setdefault(rid, {})["hidden"] = np.asarray(hidden, dtype=np.float32)
        return self.scheduler.update_from_output(sched, result)

    def warm_up(self) -> None:
        """Run one small request through every stage, so that the first user request does not pay
        for first-call costs (allocator growth, kernel selection); its prefix is then forgotten."""
        t0 = time.perf_counter()
        self.add_request(EngineCoreRequest("warm-up", list(range(1, 33)), SamplingParams(max_tokens=4, ignore_eos=True),
                                           [], 4, time.monotonic()))
        while self.has_unfinished():
            self.step()
        self.reset_prefix_cache()
        self.kv.num_queries = self.kv.num_hits = 0
        logger.info("warmed up in %.1fs", time.perf_counter() - t0)

    def reset_prefix_cache(self) -> None:
        self.kv.pool.reset_prefix_cache()

    def shutdown(self) -> None:
        """Persist the prefix blocks still cached in memory to the disk tier (if on) and wait for its writes."""
        store = self.kv.disk
        if store is None:
            return
        apply_block_ops(self.runner, self.kv.take_ops())     # pending spills first
        for h, block in list(self.kv.pool.cached.items()):
            if h not in store:
                store.save_async(h, self.runner.read_block(block.block_id))
        store.close()
        self.kv.disk = self.runner.kv_store = None

    def stats(self) -> EngineStats:
        kv, sched = self.kv, self.scheduler
        return EngineStats(len(sched.running), len(sched.waiting), 1.0 - kv.pool.num_free / kv.num_blocks,
                           kv.num_queries, kv.num_hits, sched.num_preemptions, sched.num_swapped_out,
                           kv.num_cow_copies, kv.num_disk_hits, sched.policy.queue_lengths(), sched.predictor_error,
                           sched.token_budget)

    def check_blocks(self) -> None:
        """Assert that every KV block is free, cached, or held by a live request (tests call this)."""
        self.scheduler.check()
