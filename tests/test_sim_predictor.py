"""A learned output-length predictor in the simulator (kvflow/sim/features.py): the real model computes the
features it reads, the real scheduler ranks by its estimates, as in the real engine."""
from __future__ import annotations

import numpy as np
import pytest

from kvflow.config import EngineConfig
from kvflow.entrypoints.llm import LLM
from kvflow.models.loader import load_model_config
from kvflow.predict.base import LengthEstimate, model_identity
from kvflow.predict.learned import LearnedPredictor, fit
from kvflow.sampling.params import SamplingParams
from kvflow.sim.cluster import simulate
from kvflow.sim.parallel import simulate_parallel
from kvflow.sim.workload import SimRequest, read_trace, write_trace

from .conftest import needs_default_model, random_prompts
from .test_sim import all_blocks_back, fixed_profile

PROMPT_LENS = [40, 12, 70, 25, 55, 18]
OUTPUT_LEN = 200


@pytest.fixture(scope="module")
def predictor_file(tiny_model_dir, tmp_path_factory):
    """A predictor trained on the tiny model's own features of 40 prompts, lengths growing with the prompt's:
    its estimates differ from prompt to prompt (fitted weights, not a test double)."""
    model = tiny_model_dir("llama_gqa")
    lens = [8 + 5 * i for i in range(40)]
    prompts = random_prompts(lens, seed=7)
    llm = LLM(model=model, dtype="float32")
    core = llm.engine.core
    core.features_log = {}
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False)
    log = [core.features_log[o.request_id] for o in outs]
    core.features_log = None
    embed = np.stack([np.asarray(f["embed"], np.float32) for f in log])
    hidden = np.stack([np.asarray(f["hidden"], np.float32) for f in log])
    lengths = np.array([4 * n for n in lens])
    p = fit(embed, hidden, lengths, np.array(lens), epochs=60, seed=0,
            identity=model_identity(model, load_model_config(model)))
    path = str(tmp_path_factory.mktemp("predictor") / "lengths.npz")
    p.save(path)
    return model, path


def _record_predictions(monkeypatch) -> list[tuple[int, tuple[str, ...], list[float]]]:
    """(prompt length, features given, estimate) of every LearnedPredictor.predict call (the real method runs)."""
    calls = []
    real = LearnedPredictor.predict

    def spy(self, prompt_len, client, features):
        est = real(self, prompt_len, client, features)
        calls.append((prompt_len, tuple(sorted(features)), list(est.probs)))
        return est
    monkeypatch.setattr(LearnedPredictor, "predict", spy)
    return calls


def test_the_simulator_predicts_lengths_as_the_real_engine_does(predictor_file, tmp_path, monkeypatch):
    model, path = predictor_file
    prompts = random_prompts(PROMPT_LENS, seed=3)
    trace = str(tmp_path / "trace.jsonl")
    write_trace([SimRequest(0.0, p, OUTPUT_LEN) for p in prompts], trace)
    settings = dict(model=model, dtype="float32", length_predictor=path, scheduling_policy="sjf", max_num_seqs=1,
                    block_size=8)

    calls = _record_predictions(monkeypatch)       # the real engine, on the same prompts
    with LLM(**settings) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True), use_tqdm=False)
    real_calls = list(calls)
    real_order = [len(o.prompt_token_ids) for o in sorted(outs, key=lambda o: o.metrics.first_token_time)]

    calls.clear()
    sim, rec = simulate(EngineConfig.from_kwargs(**settings), fixed_profile(), read_trace(trace))
    all_blocks_back(sim)
    sim_order = [r.prompt_len for r in sorted(rec.results(), key=lambda r: r.ttft)]
    assert sim.features is not None and sim.features.num_computed == len(prompts)

    # each request: one estimate from "embed" when it arrives, one from "hidden" after its prefill
    key = lambda c: (c[0], c[1])                               # noqa: E731
    assert sorted(map(key, calls)) == sorted(map(key, real_calls))
    assert sorted(map(key, calls)) == sorted((n, f) for n in PROMPT_LENS for f in (("embed",), ("hidden",)))
    real_probs = {key(c): c[2] for c in real_calls}
    for c in calls:
        assert c[2] == pytest.approx(real_probs[key(c)], abs=1e-4), key(c)
    means = {round(LengthEstimate(c[2]).mean(), 3) for c in calls}
    assert len(means) > len(PROMPT_LENS)                      # the estimates differ from prompt to prompt
    # one seat, shortest predicted first: the simulation serves the prompts in the real engine's order
    assert sim_order == real_order
    assert sim_order != PROMPT_LENS                           # (not the arrival order)


def test_a_learned_predictor_needs_the_models_token_ids_and_one_process(predictor_file, tmp_path):
    model, path = predictor_file
    config = EngineConfig.from_kwargs(model=model, dtype="float32", length_predictor=path, scheduling_policy="sjf")
    with pytest.raises(ValueError, match="vocabulary"):       # the tiny model has 512 ids
        simulate(config, fixed_profile(), [SimRequest(0.0, [5, 900, 7], 4)])
    with pytest.raises(ValueError, match="workers"):
        simulate_parallel(config, fixed_profile(), [SimRequest(0.0, [5, 6, 7], 4)], workers=2)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        simulate(EngineConfig.from_kwargs(model=model, length_predictor=str(tmp_path / "missing.npz")),
                 fixed_profile(), [])



@needs_default_model
def test_a_predictor_file_of_another_model_is_refused(predictor_file):
    _, path = predictor_file
    other = EngineConfig.from_kwargs(length_predictor=path)      # the default model, not the one it was trained for
    with pytest.raises(ValueError, match="was trained for model"):
        simulate(other, fixed_profile(), [])
