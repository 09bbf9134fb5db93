"""A learned output-length predictor in the simulator: the model features it reads, from the real model.

A learned predictor (`--length-predictor FILE`, kvflow/predict/learned.py) reads two features of the model's
own activations: "embed", the mean of the prompt's input embeddings, known when the request arrives, and
"hidden", the final hidden state of the prompt's last token, known when its prefill ends. The simulated
runner has no model, so the simulation asks the real one: `PromptFeatures` runs kvflow's engine (the model
named by `--model`, in the config's dtype) on each simulated prompt once, one prefill, and reads the features
from the engine core's `features_log`, as `kvflow predict train` does when it collects a training set. The
simulated engine then hands them to the real Scheduler where the real engine core does: "embed" with the
request (`Scheduler.add_request`), "hidden" in the RunnerOutput of the step that computes the prompt's last
token (`RunnerOutput.prompt_hidden`; kvflow/sim/runner.py). So each simulated request gets the estimate the
real engine would give it, up to the last bits of a float.

Its price: one real prefill per distinct prompt (prompts repeat in multi-turn sessions and traces: the last
CACHE_SIZE are kept), so such a simulation runs at the model's prefill speed on this machine, not at the
simulator's. The prompts' token ids must be the model's: a workload whose ids reach past its vocabulary is
refused (the synthetic workloads draw below the default model's; a trace of another model's ids is not).
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np

from kvflow.config import EngineConfig, default_model_path
from kvflow.predict.base import LengthPredictor, make_predictor, model_identity

CACHE_SIZE = 4096          # prompts whose features are kept (a session's turns, a trace's repeats)


def learned_predictor(config: EngineConfig) -> LengthPredictor | None:
    """The engines' length predictor when the config names a file (None otherwise: the scheduler makes the
    online one itself), checked against the model it was trained for (`--model`, as kvflow.config.resolve
    checks it). ValueError / FileNotFoundError naming what is wrong."""
    spec = config.scheduler.length_predictor
    if spec in (None, "online"):
        return None
    from kvflow.models.loader import load_model_config
    path = config.model.model or default_model_path()
    return make_predictor(spec, model_identity(path, load_model_config(path)))


class PromptFeatures:
    """The features `wanted` ("embed", "hidden") of prompts, computed by the real model (an in-process LLM)."""

    def __init__(self, wanted: tuple[str, ...], model: str | None, dtype: str, **engine_kwargs):
        from kvflow.entrypoints.llm import LLM
        self.wanted = tuple(wanted)
        self.llm = LLM(model=model, dtype=dtype, **engine_kwargs)
        self.vocab_size = self.llm.engine.model_config.vocab_size
        self._cache: OrderedDict[tuple[int, ...], dict[str, np.ndarray]] = OrderedDict()
        self.num_computed = 0              # prefills run (the rest came from the cache)

    def __call__(self, prompt: list[int]) -> dict[str, np.ndarray]:
        key = tuple(prompt)
        got = self._cache.get(key)
        if got is not None:
            self._cache.move_to_end(key)
            return got
        top = max(prompt)
        if top >= self.vocab_size:
            raise ValueError(f"workload: a prompt has token id {top}, past the vocabulary of the model the length "
                             f"predictor reads ({self.vocab_size} ids): a learned predictor needs the model's own "
                             f"token ids (--model)")
        from kvflow.sampling.params import SamplingParams
        core = self.llm.engine.core
        core.features_log = {}
        try:
            out = self.llm.generate([{"prompt_token_ids": list(prompt)}], SamplingParams(max_tokens=1),
                                    use_tqdm=False)[0]
            log = core.features_log[out.request_id]
        finally:
            core.features_log = None
        got = {k: np.asarray(log[k], np.float32) for k in self.wanted}
        self.num_computed += 1
        self._cache[key] = got
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return got


def prompt_features(config: EngineConfig, wanted: tuple[str, ...]) -> PromptFeatures:
    """The config's model's PromptFeatures, one per model and settings in this process (`kvflow sim compare`
    simulates many configurations of one model: it loads once)."""
    m = config.model
    return _prompt_features(tuple(wanted), m.model, m.dtype, m.max_model_len, m.seed, config.parallel.num_threads)


@functools.lru_cache(maxsize=2)
def _prompt_features(wanted, model, dtype, max_model_len, seed, num_threads) -> PromptFeatures:
    return PromptFeatures(wanted, model, dtype, max_model_len=max_model_len, seed=seed, num_threads=num_threads)
