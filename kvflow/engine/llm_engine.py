"""LLMEngine: the synchronous engine behind `LLM`, built from an input processor, an output processor and
an engine-core client: the core in this process, or replicas as Ray actors (`replicas=N`, kvflow/cluster)."""
from __future__ import annotations

import atexit
import time
import weakref

from kvflow.config import EngineConfig
from kvflow.engine.core import EngineCore
from kvflow.engine.core_client import InprocClient
from kvflow.engine.input_processor import InputProcessor, open_model
from kvflow.engine.output_processor import OutputProcessor
from kvflow.outputs import RequestOutput
from kvflow.sampling.params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        if config.serverless.serverless:
            raise ValueError("serverless: replicas that Ray Serve scales with the load serve the HTTP API "
                             "(`kvflow serve --serverless`); LLM runs one engine here, or replicas=N on Ray")
        self.config = config
        self.resolved, reader, self.tokenizer = open_model(config)
        rc = self.resolved
        self.model_path, self.model_config, self.max_model_len = rc.model_path, rc.arch, rc.max_model_len
        self.input_processor = InputProcessor(rc, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        if config.distributed:                # replicas or prefill/decode workers as Ray actors
            from kvflow.engine.core_client import make_client
            self.core = None
            self.client = make_client(rc)
            self.client.wait_ready_sync(600.0)
        else:
            self.core = EngineCore.build(rc, reader, self.input_processor.grammars)   # the parsed GGUF goes with it
            self.client = InprocClient(self.core)
        if config.cache.kv_store_dir:                 # persist the prefix cache even if nobody calls shutdown()
            atexit.register(_shutdown_at_exit, weakref.ref(self))

    @property
    def kv(self):
        return self.core.kv

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, priority: int = 0, user: str | None = None) -> None:
        reqs = self.input_processor.process(request_id, prompt_token_ids, params, time.monotonic(), priority, user)
        self.output_processor.add_request(request_id, prompt, reqs)
        sent = 0
        try:
            for req in reqs:
                self.client.add_request(req)
                sent += 1
        except BaseException:                 # refused (early rejection): nothing of it is left behind
            child_ids = self.output_processor.abort(request_id)
            if sent:
                self.client.abort_requests(child_ids)
            raise

    def abort_request(self, request_id: str) -> None:
        self.client.abort_requests(self.output_processor.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.client.has_unfinished()

    def step(self) -> list[RequestOutput]:
        results, stopped = self.output_processor.process(self.client.step(), time.monotonic())
        self.client.stop_requests(stopped)
        return results

    def reset_prefix_cache(self) -> None:
        self.client.reset_prefix_cache()

    def check_blocks(self) -> None:
        """Assert the block invariant (every block free, cached, or held by a live request), on every replica."""
        if self.core is not None:
            self.core.check_blocks()
            return
        for r in self.client.check_blocks():
            assert r["ok"], r["error"]
            assert r["requests"] or not r["blocks_in_use"], f"blocks held with no request in flight: {r}"

    def shutdown(self) -> None:
        """Write the prefix cache to the disk tier (when kv_store_dir is set) and wait for the writes."""
        self.client.shutdown()


def _shutdown_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()
