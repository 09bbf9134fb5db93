"""The model-based proposers (kvflow/spec/draft_model.py, layer_skip.py): greedy outputs equal to greedy
without speculation (fp32) across a batch of prompt lengths, prefix hits, chunked prefill and preemption by
either mode; a draft equal to the target (or an early exit through every layer) accepts every draft; the
first tokens' distribution under sampling is unchanged (chi-square on fixed seeds); lookahead slots; bad
configs name the field. The block invariant is checked after every test by conftest."""
from __future__ import annotations

import re

import pytest

from kvflow import LLM, SamplingParams
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.request import Request
from kvflow.spec.config import SpeculativeConfig
from tests.conftest import random_prompts
from tests.test_spec_decode import assert_speculation_keeps_the_distribution

LENGTHS = (3, 9, 17, 33, 61)


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def other_draft(tiny_model_dir):
    return tiny_model_dir("llama_mqa_tied")        # another architecture, same vocabulary, unrelated weights


@pytest.fixture(scope="module")
def prompts():
    return [{"prompt_token_ids": p} for p in random_prompts(LENGTHS, seed=7)]


@pytest.fixture(scope="module")
def reference(target, prompts):
    llm = LLM(model=target, dtype="float32", block_size=8)
    return run(llm, prompts)


def run(llm, prompts, max_tokens=24):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def spec(llm):
    return llm.engine.core.scheduler.spec


def draft_model(path, k=4, **kw):
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k, **kw}


def layer_skip(n, k=3, **kw):
    return {"method": "layer_skip", "num_layers": n, "num_speculative_tokens": k, **kw}


def test_draft_equal_to_target_accepts_everything(target, prompts, reference):
    llm = LLM(model=target, dtype="float32", block_size=8, speculative_config=draft_model(target, adaptive=False))
    assert run(llm, prompts) == reference
    s = spec(llm)
    assert s.num_verifications > 20 and s.num_accepted >= 0.95 * s.num_proposed, (s.num_accepted, s.num_proposed)
    before = s.num_proposed
    assert run(llm, prompts) == reference          # again: every prompt a prefix hit
    assert s.num_proposed > before and s.num_accepted >= 0.95 * s.num_proposed


def test_other_draft_model_is_lossless(target, other_draft, prompts, reference):
    """An unrelated draft: most drafts are rejected, every output is still the target's."""
    llm = LLM(model=target, dtype="float32", block_size=8, speculative_config=draft_model(other_draft, k=3))
    assert run(llm, prompts) == reference
    assert run(llm, prompts) == reference
    s = spec(llm)
    assert s.num_verifications > 0 and s.num_proposed > s.num_accepted


def test_layer_skip_through_every_layer_accepts_everything(target, prompts, reference):
    llm = LLM(model=target, dtype="float32", block_size=8, speculative_config=layer_skip(2, adaptive=False))
    assert run(llm, prompts) == reference
    assert run(llm, prompts) == reference
    s = spec(llm)
    assert s.num_verifications > 20 and s.num_accepted >= 0.95 * s.num_proposed, (s.num_accepted, s.num_proposed)
    assert llm.engine.core.runner.proposer.num_layers == 2


def test_layer_skip_early_exit_is_lossless(target, prompts, reference):
    llm = LLM(model=target, dtype="float32", block_size=8, speculative_config=layer_skip(1, k=4))
    assert run(llm, prompts) == reference
    s = spec(llm)
    assert s.num_verifications > 0 and s.num_proposed > s.num_accepted


def test_layer_skip_default_depth(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("llama_gqa"), dtype="float32",
              speculative_config={"method": "layer_skip", "num_speculative_tokens": 2})
    assert llm.engine.core.runner.proposer.num_layers == 1          # a quarter of 2 layers, at least one


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("method", ["draft_model", "layer_skip"])
def test_chunked_prefill_and_preemption(target, other_draft, prompts, reference, mode, method):
    cfg = draft_model(target) if method == "draft_model" else layer_skip(2)
    llm = LLM(model=target, dtype="float32", block_size=8, max_num_batched_tokens=12, num_kv_blocks=12,
              preemption_mode=mode, num_swap_blocks=64, speculative_config=cfg)
    assert run(llm, prompts) == reference
    sched = llm.engine.core.scheduler
    assert sched.num_preemptions > 0 and (sched.num_swapped_out > 0) == (mode == "swap")
    s = spec(llm)
    assert s.num_verifications > 0 and s.num_accepted >= 0.9 * s.num_proposed, (s.num_accepted, s.num_proposed)


def test_stop_and_max_tokens_with_a_draft_model(target, prompts, reference):
    llm = LLM(model=target, dtype="float32", block_size=8, speculative_config=draft_model(target))
    short = run(llm, prompts, max_tokens=7)
    assert short == [r[:7] for r in reference]
    stop = reference[1][5]
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop]), use_tqdm=False)
    for ref, o in zip(reference, out):
        ids = o.outputs[0].token_ids
        assert ids == (ref[:ref.index(stop) + 1] if stop in ref else ref)


def test_sampling_distribution_unchanged_by_a_draft_model(target):
    """The first three tokens under temperature 1 and top-k 5, over 400 seeds, with and without an int8 copy of
    the target as the draft: the same distribution (chi-square per position, 99.9% threshold, fixed seeds)."""
    prompt = [{"prompt_token_ids": list(range(5, 20))}]
    assert_speculation_keeps_the_distribution(
        target, prompt, draft_model(target, k=3, quantization="int8", adaptive=False), (0, 1, 2))


def test_lookahead_slots():
    """allocate_slots with lookahead: room for the step's tokens plus the drafts' positions; a table with
    lookahead blocks swaps out and back in whole."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False, num_swap_blocks=8)
    req = Request("r", list(range(5)), SamplingParams(max_tokens=8), set(), 8, 0.0)
    assert kv.allocate_slots(req, 5, lookahead=4)
    assert len(kv.table("r")) == 3                    # 9 slots
    assert not kv.allocate_slots(req, 5, lookahead=40)
    assert len(kv.table("r")) == 3                    # nothing taken when it does not fit
    req.num_computed_tokens = 5
    assert kv.swap_out(req) and kv.swap_in(req, 1)    # 6 tokens need 2 blocks; the 3 held come back
    ops = kv.take_ops()
    assert [len(op.src) for op in ops] == [len(op.dst) for op in ops] == [3, 3]
    assert len(kv.table("r")) == 3
    kv.forget(req)


def test_draft_kv_reused_across_prefix_hits(target, prompts, reference):
    """The draft cache is tracked by content: a second run over cached prompts does not recompute them."""
    llm = LLM(model=target, dtype="float32", block_size=8, speculative_config=draft_model(target, adaptive=False))
    proposer = llm.engine.core.runner.proposer
    computed = []
    forward = proposer._forward

    def counting(segments):
        computed.append(sum(len(s.token_ids) for s in segments))
        return forward(segments)
    proposer._forward = counting
    assert run(llm, prompts[-1:]) == reference[-1:]
    first = sum(computed)
    computed.clear()
    assert run(llm, prompts[-1:]) == reference[-1:]
    assert sum(computed) < first - LENGTHS[-1] // 2, (sum(computed), first)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    import torch
    folder = str(tmp_path_factory.mktemp("vocab256"))
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("cfg, field", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model is required"),
    ({"method": "draft_model", "model": "/no/such/model", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "draft_model", "model": "MODEL", "num_speculative_tokens": 2, "draft_model": "x"},
     "unknown fields: draft_model"),
    ({"method": "draft_model", "model": "MODEL", "num_speculative_tokens": 2, "quantization": "fp4"},
     "speculative_config.quantization"),
    ({"method": "draft_model", "model": "MODEL", "num_speculative_tokens": 2, "quantization": "gguf"},
     "speculative_config.model must be a .gguf"),
    ({"method": "ngram", "model": "MODEL", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "layer_skip", "num_speculative_tokens": 2, "num_layers": 0}, "speculative_config.num_layers"),
])
def test_bad_configs(target, cfg, field):
    cfg = {k: target if v == "MODEL" else v for k, v in cfg.items()}
    with pytest.raises(ValueError, match=re.escape(field)):
        SpeculativeConfig.parse(cfg)
    with pytest.raises(ValueError, match=re.escape(field)):
        LLM(model=target, speculative_config=cfg)


def test_bad_models(target, small_vocab_model):
    with pytest.raises(ValueError, match=r"speculative_config\.model .*vocabulary of 256"):
        LLM(model=target, dtype="float32", speculative_config=draft_model(small_vocab_model))
    with pytest.raises(ValueError, match=r"speculative_config\.num_layers \(3\) must be at most the model's 2"):
        LLM(model=target, dtype="float32", speculative_config=layer_skip(3))
