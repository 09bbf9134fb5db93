"""LLMEngine: the in-process engine (Frontend + EngineCore in one process), behind `LLM`."""
from __future__ import annotations

import atexit
import weakref

from kvflow.config import EngineConfig
from kvflow.engine.core import EngineCore
from kvflow.engine.frontend import Frontend
from kvflow.outputs import RequestOutput
from kvflow.request import RequestStatus
from kvflow.sampling.params import SamplingParams


class LLMEngine(Frontend):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.core = EngineCore.build(config, self.model_path, self.model_config, self.dtype, self.max_model_len,
                                     self.num_kv_blocks, self.reader)
        self.kv = self.core.kv
        self.reader = None             # the weights are loaded: let the parsed file go
        if config.kv_store_dir:        # persist the prefix cache even if nobody calls shutdown()
            atexit.register(_shutdown_at_exit, weakref.ref(self))

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        for req in self.make_requests(request_id, prompt, prompt_token_ids, params):
            self.core.add_request(req)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        results, to_abort = self.process(self.core.step())
        if to_abort:                   # a stop string ended these: the core stops them too
            self.core.abort_requests(to_abort, RequestStatus.FINISHED_STOPPED)
        return results

    def reset_prefix_cache(self) -> None:
        self.kv.pool.reset_prefix_cache()

    def check_blocks(self) -> None:
        self.core.check_blocks()

    def shutdown(self) -> None:
        """Write the prefix cache to the disk tier (when kv_store_dir is set) and wait for the writes."""
        self.core.shutdown()


def _shutdown_at_exit(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()
