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
from kvflow.structured.backend import GrammarCompiler, grammar_compiler
from kvflow.structured.manager import StructuredOutputManager

logger = logging.getLogger("kvflow")

LOADING_WAIT_S = 5e-4        # a step with nothing to run but KV being read from a tier sleeps this long


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, structured: StructuredOutputManager | None = None):
        self.runner, self.scheduler, self.kv = runner, scheduler, scheduler.kv
        self.structured = structured
        # a KV connector sees each step's schedule before the forward pass (a prefill worker sends the KV it
        # computes to its decode worker: kvflow/disagg/connector.py)
        self.kv_connector = None
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
    def build(cls, rc: ResolvedConfig, reader=None, grammars: GrammarCompiler | None = None) -> EngineCore:
        """Load the weights, allocate the KV cache and its tiers, and measure the swap tier's bandwidth.
        `grammars`: the frontend's grammar compiler, shared when the core runs in its process."""
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
                              async_recovery=sc.async_recovery, speculative=cfg.speculative.parsed)
        if cfg.speculative.parsed is not None:
            from kvflow.spec.base import make_proposer
            runner.proposer = make_proposer(cfg.speculative.parsed, runner)
            runner.proposer.token_budget = sc.max_num_batched_tokens
        logger.info("loaded %s (%s, %s) in %.1fs; KV cache: %d blocks of %d tokens", rc.model_path,
                    rc.arch.model_type, rc.dtype, time.perf_counter() - t0, rc.num_kv_blocks, bs)
        return cls(runner, scheduler, structured_manager(rc, reader, grammars))

    def add_request(self, r: EngineCoreRequest) -> None:
        features = {}
        if "embed" in self._features:
            features["embed"] = self.runner.embed_features(r.prompt_token_ids)
        if self._features_log is not None:
            self._features_log[r.request_id] = dict(features)
        req = Request(r.request_id, list(r.prompt_token_ids), r.params, set(r.stop_ids), r.max_tokens,
                      r.arrival_time, fork_from=r.fork_from, priority=r.priority, client=r.client)
        if r.output_token_ids:                 # resumed: its outputs so far are computed again, not sent again
            req.output_token_ids = list(r.output_token_ids)
            req.all_token_ids += r.output_token_ids
            req.num_prompt_logprobs = len(req.prompt_token_ids)
        if r.params.structured_outputs is None:
            self.scheduler.add_request(req, features)
        elif self.structured is None:
            raise ValueError("structured_outputs: this engine core has no grammar engine")
        else:                                  # it waits for its grammar outside the scheduler
            self.structured.add(req, features, time.monotonic())

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        if self.structured is not None:
            self.structured.remove(request_ids)
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.structured and len(self.structured))

    def step(self) -> list[EngineCoreOutput]:
        failed = self._admit_compiled() if self.structured is not None and len(self.structured) else []
        sched = self.scheduler.schedule()
        if self.kv_connector is not None:
            self.kv_connector.start_step(sched)
        if self.structured is not None and self.structured.matchers:
            for rid in self.structured.fill_bitmasks(sched):
                failed.append(self._end_constrained(rid, "its grammar engine hit a limit"))
        if not sched.req_ids:
            self.runner.execute(sched)         # block ops and finished ids still apply
            if self.scheduler.num_loading or (self.structured is not None and len(self.structured)):
                time.sleep(LOADING_WAIT_S)     # KV on its way from a tier, or a grammar compiling
            elif self.scheduler.waiting and not self.scheduler.running:   # would spin forever: fail loudly
                req = self.scheduler.waiting[0]
                raise RuntimeError(f"cannot schedule request {req.request_id!r} ({req.num_tokens} tokens) with "
                                   f"{self.kv.pool.num_free} of {self.kv.num_blocks} KV blocks free")
            return failed
        t0 = time.perf_counter()
        result = self.runner.execute(sched)
        seconds = time.perf_counter() - t0
        if self.scheduler.spec is not None and result.draft_tokens:     # the proposer's part of the step
            self.scheduler.spec.observe_draft(result.draft_seconds, result.draft_tokens)
            seconds -= result.draft_seconds
        self.scheduler.record_step(sched, seconds)
        num_tokens, cost = sched.num_scheduled_tokens, self.scheduler.cost
        if num_tokens >= 4 * len(sched) and num_tokens >= 64:   # mostly prefill: refine the estimate
            cost.prefill_tokens_per_s += 0.2 * (num_tokens / seconds - cost.prefill_tokens_per_s)
        if self._features_log is not None:
            for rid, hidden in result.prompt_hidden.items():
                self._features_log.setdefault(rid, {})["hidden"] = np.asarray(hidden, dtype=np.float32)
        outputs = self.scheduler.update_from_output(sched, result)
        if self.structured is not None and self.structured.matchers:
            self._advance_constrained(outputs)
        return failed + outputs

    # ---- structured output (kvflow/structured) ---------------------------------------------------------------

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Requests whose grammar compiled go to the scheduler; those whose compile failed end (aborted)."""
        ready, failed = self.structured.take_ready(time.monotonic())
        for req, features in ready:
            self.scheduler.add_request(req, features)
        outputs = []
        for req, why in failed:
            logger.warning("request %s: %s", req.request_id, why)
            outputs.append(EngineCoreOutput(req.request_id, [], finish_reason=RequestStatus.FINISHED_ABORTED.value,
                                            stop_reason=why))
        return outputs

    def _abort_constrained(self, request_id: str, why: str) -> None:
        """A constrained request whose grammar cannot go on ends, aborted (its neighbours step on)."""
        logger.warning("request %s ends: %s", request_id, why)
        self.structured.remove([request_id])
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)

    def _end_constrained(self, request_id: str, why: str) -> EngineCoreOutput:
        self._abort_constrained(request_id, why)
        return EngineCoreOutput(request_id, [], finish_reason=RequestStatus.FINISHED_ABORTED.value, stop_reason=why)

    def _advance_constrained(self, outputs: list[EngineCoreOutput]) -> None:
        """Matchers follow the new tokens; a finished grammar ends its request; forced tokens are appended
        (jump-forward) to the step's output, for requests that ask no logprobs (forced tokens have none)."""
        sm, sched = self.structured, self.scheduler
        problems = sm.advance(outputs)
        for out in outputs:
            rid = out.request_id
            if rid in problems:
                self._abort_constrained(rid, problems[rid])
                out.finish_reason = RequestStatus.FINISHED_ABORTED.value
                continue
            if out.finish_reason is not None or rid not in sm.matchers:
                continue
            req = sched.requests[rid]
            if req.spec_token_ids:                 # drafts the grammar refuses are never verified
                del req.spec_token_ids[sm.valid_drafts(rid, req.spec_token_ids):]
            if req.params.logprobs is not None:    # forced tokens would have no logprobs: sample them
                continue
            forced, status, ending = sm.jump_forward(rid, req.max_tokens - req.num_output_tokens), None, False
            if sm.is_terminated(rid):              # only the end may follow: append it, no step needed
                forced, ending = forced + [sm.end_token(req.stop_ids)], True
            if forced:
                req.spec_token_ids = []            # drafted after the sampled token, not after the forced ones
                appended, status = sched.append_forced(rid, forced)
                out.new_token_ids = out.new_token_ids + appended
                if status is None and ending:      # ignore_eos: the grammar still ends it
                    status = RequestStatus.FINISHED_STOPPED
                    sched.finish_requests([rid], status)
            if status is not None:
                sm.remove([rid])
                out.finish_reason, out.stop_reason = status.value, req.stop_reason

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
        compiling = len(self.structured) if self.structured is not None else 0
        stats = EngineStats(len(sched.running), len(sched.waiting) + compiling, 1.0 - kv.pool.num_free / kv.num_blocks,
                            kv.num_queries, kv.num_hits, sched.num_preemptions, sched.num_swapped_out,
                            kv.num_cow_copies, kv.num_disk_hits, sched.policy.queue_lengths(), sched.predictor_error,
                            sched.token_budget, *((sched.spec.num_proposed, sched.spec.num_accepted,
                                                   sched.spec.num_verifications) if sched.spec else ()))
        stats.prefill_tokens_per_s = sched.cost.prefill_tokens_per_s
        return stats

    def check_blocks(self) -> None:
        """Assert that every KV block is free, cached, or held by a live request (tests call this)."""
        self.scheduler.check()


def structured_manager(rc: ResolvedConfig, reader=None, compiler: GrammarCompiler | None = None
                       ) -> StructuredOutputManager:
    """The engine core's structured-output manager; its grammar engine (and the tokenizer it indexes) is
    built on the compile thread when the first request asks for structured output."""
    so = rc.config.structured

    def load_tokenizer():
        from kvflow.tokenizer import Tokenizer
        return Tokenizer.from_gguf(reader) if reader is not None else Tokenizer.from_hf_folder(rc.model_path)
    if compiler is None:
        compiler = grammar_compiler(so, load_tokenizer, rc.arch.vocab_size, rc.arch.eos_token_ids)
    return StructuredOutputManager(compiler, rc.arch.vocab_size, so.jump_forward)
