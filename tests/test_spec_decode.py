"""Speculative decoding (kvflow/spec): greedy outputs equal to greedy without speculation (fp32) across
batches, prefix hits, chunked prefill and preemption; the rejection sampler keeps the target's distribution
(chi-square on fixed seeds, so the tests cannot flake); drafts under a grammar; bad configs; nothing leaks."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.sampling.sampler import SamplingBatch
from kvflow.spec.config import SpeculativeConfig
from kvflow.spec.ngram import lookup
from kvflow.spec.rejection import verify
from kvflow.structured import StructuredOutputsParams as S

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
# 99.9th percentile of chi-square: df 4 (5 categories), df 9 (10 categories)
CHI2_999 = {4: 18.47, 9: 27.88}


def repetitive(n_repeats=3, seed=0):
    g = np.random.default_rng(seed)
    base = g.integers(3, 300, size=24).tolist()
    return base * n_repeats


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def prompts():
    return [{"prompt_token_ids": repetitive(3, s)} for s in range(4)] + [{"prompt_token_ids": list(range(5, 40))}]


@pytest.fixture(scope="module")
def reference(model, prompts):
    llm = LLM(model=model, dtype="float32", block_size=8)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24),
                                                         use_tqdm=False)]


def run(llm, prompts, **kw):
    params = SamplingParams(temperature=0, max_tokens=24, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def spec(llm):
    return llm.engine.core.scheduler.spec


@pytest.mark.parametrize("adaptive", [True, False])
def test_greedy_equals_no_speculation(model, prompts, reference, adaptive):
    llm = LLM(model=model, dtype="float32", block_size=8, speculative_config={**NGRAM, "adaptive": adaptive})
    assert run(llm, prompts) == reference
    assert run(llm, prompts) == reference          # again: every prompt a prefix hit
    assert spec(llm).num_verifications > 0 and spec(llm).num_accepted > 0


def test_greedy_equal_with_chunked_prefill_and_preemption(model, prompts, reference):
    for mode in ("recompute", "swap"):
        llm = LLM(model=model, dtype="float32", block_size=8, max_num_batched_tokens=12, num_kv_blocks=22,
                  preemption_mode=mode, num_swap_blocks=64, speculative_config=NGRAM)
        assert run(llm, prompts) == reference
        assert llm.engine.core.scheduler.num_preemptions > 0, mode
        assert spec(llm).num_verifications > 0


def test_stop_and_max_tokens_are_never_passed(model, prompts, reference):
    llm = LLM(model=model, dtype="float32", block_size=8, speculative_config=NGRAM)
    for ref, out in zip(reference, run(llm, prompts, stop_token_ids=[reference[0][5]])):
        if reference[0][5] in ref:
            assert out == ref[:ref.index(reference[0][5]) + 1]
    short = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in short] == [r[:7] for r in reference]


def test_logprobs_are_the_targets(model, prompts):
    base = LLM(model=model, dtype="float32", block_size=8)
    fast = LLM(model=model, dtype="float32", block_size=8, speculative_config=NGRAM)
    p = SamplingParams(temperature=0, max_tokens=16, logprobs=2)
    a, b = (m.generate(prompts[:2], p, use_tqdm=False) for m in (base, fast))
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.keys() == ly.keys()
            for t in lx:
                assert abs(lx[t].logprob - ly[t].logprob) < 1e-3
    assert spec(fast).num_accepted > 0


def chi2(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square statistic over categories with counts in a and b."""
    keep = (a + b) > 0
    a, b = a[keep].astype(float), b[keep].astype(float)
    ka, kb = np.sqrt(b.sum() / a.sum()), np.sqrt(a.sum() / b.sum())
    return float((((ka * a - kb * b) ** 2) / (a + b)).sum())


def assert_same_distribution(with_spec: np.ndarray, without: np.ndarray, positions) -> None:
    """Per position, the tokens sampled with and without speculation ([samples, tokens]) come from the same
    distribution: chi-square over the tokens seen 10 times or more (the rest pooled), 99.9% threshold."""
    for pos in positions:
        cats = sorted(set(without[:, pos]) | set(with_spec[:, pos]))
        a = np.array([(without[:, pos] == c).sum() for c in cats])
        b = np.array([(with_spec[:, pos] == c).sum() for c in cats])
        common = (a + b) >= 10
        a = np.append(a[common], a[~common].sum())
        b = np.append(b[common], b[~common].sum())
        df = len(a) - 1
        assert chi2(a, b) < CHI2_999.get(df, 3 * df + 10), (pos, a, b)


def assert_speculation_keeps_the_distribution(model: str, prompt: list, cfg: dict, positions) -> None:
    """The first three tokens under temperature 1 and top-k 5, 400 seeded samples, without and with `cfg`:
    the same distribution at `positions`; both accepted and rejected drafts must have happened."""
    dists = []
    for c in (None, cfg):
        llm = LLM(model=model, dtype="float32", block_size=8, speculative_config=c, max_num_seqs=128)
        out = llm.generate(prompt, SamplingParams(n=400, seed=0, temperature=1.0, top_k=5, max_tokens=3),
                           use_tqdm=False)[0]
        dists.append(np.array([o.token_ids for o in out.outputs]))
        if c:
            s = spec(llm)
            assert s.num_accepted > 30 and s.num_proposed - s.num_accepted > 30   # both outcomes exercised
    assert_same_distribution(dists[1], dists[0], positions)


def test_rejection_sampler_keeps_the_target_distribution():
    """One draft against a fixed target p over 5 tokens, 20,000 times (one batch, one seeded generator): the
    first emitted token follows p, and after an accepted draft the bonus token follows the next row's p."""
    V, draft, N = 5, 3, 20000
    p0, p1 = [0.1, 0.2, 0.3, 0.15, 0.25], [0.4, 0.1, 0.1, 0.2, 0.2]
    logits = torch.log(torch.tensor([p0, p1] * N))
    gen = torch.Generator().manual_seed(1234)
    batch = SamplingBatch.build([SamplingParams(temperature=1.0)] * (2 * N), [[0]] * (2 * N), [[], [draft]] * N,
                                [gen] * (2 * N), [set()] * (2 * N), V)
    tokens, _, _ = verify(logits, batch, [(2 * i, [draft], gen) for i in range(N)])
    first = np.bincount([t[0] for t in tokens], minlength=V)
    bonus = np.bincount([t[1] for t in tokens if len(t) == 2], minlength=V)
    for counts, p in ((first, p0), (bonus, p1)):
        expected = np.array(p) * counts.sum()
        stat = float((((counts - expected) ** 2) / expected).sum())
        assert stat < CHI2_999[4], (counts, stat)


def test_sampling_distribution_unchanged_by_speculation(model):
    """The first three generated tokens under temperature 1 and top-k 5, over 400 seeds, with and without
    speculation: the same distribution (chi-square per position, 99.9% threshold; fixed seeds). The prompt is
    the model's own greedy continuation, so that n-gram drafts are plausible and get accepted or rejected."""
    start = list(range(5, 20))
    base = LLM(model=model, dtype="float32", block_size=8)
    greedy = base.generate([{"prompt_token_ids": start}], SamplingParams(temperature=0, max_tokens=120),
                           use_tqdm=False)[0].outputs[0].token_ids
    prompt = [{"prompt_token_ids": start + greedy}]
    assert_speculation_keeps_the_distribution(
        model, prompt, {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False}, (1, 2))


def test_drafts_checked_against_the_grammar(model):
    """Drafts from a prompt that the grammar partly allows: refused drafts are cut before verification, the
    verified ones are masked per position, every output matches."""
    llm = LLM(model=model, dtype="float32", block_size=8, speculative_config=NGRAM)
    words = "(the|cat|sat|on|mat)"
    spec_ = S(regex=rf"{words}( {words}){{3,12}}\\.")
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat."
    outs = llm.generate([prompt] * 2, SamplingParams(temperature=1.0, seed=3, max_tokens=60, n=4,
                                                     structured_outputs=spec_), use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop" and re.fullmatch(spec_.regex, c.text), c.text
    assert spec(llm).num_verifications > 0


def test_ngram_lookup():
    t = np.array([1, 2, 3, 4, 5, 1, 2, 3])
    assert lookup(t, 1, 4, 3) == [4, 5, 1]
    assert lookup(t, 1, 4, 1) == [4]
    assert lookup(np.array([1, 2, 3]), 1, 4, 3) == []
    assert lookup(np.array([9, 1, 9, 2, 9]), 1, 1, 2) == [2, 9]        # the latest match


@pytest.mark.parametrize("cfg, field", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "speculative_config.prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 1}, "unknown fields: k"),
    ("{not json", "speculative_config is not valid JSON"),
])
def test_bad_configs(cfg, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SpeculativeConfig.parse(cfg)
    with pytest.raises(ValueError, match=re.escape(field)):
        LLM(model="unused", speculative_config=cfg)


def test_config_from_the_command_line_json():
    c = SpeculativeConfig.parse(json.dumps(NGRAM))
    assert c.method == "ngram" and c.num_speculative_tokens == 4


def test_a_request_whose_drafts_keep_failing_pauses_longer_each_time():
    from kvflow.spec.adaptive import MIN_VERIFICATIONS, PAUSE_STEPS, SpecController
    from kvflow.spec.config import SpeculativeConfig
    ctl = SpecController(SpeculativeConfig("ngram", 4))
    pauses = []
    for _ in range(3):
        while ctl.draft_len("r", 1) > 0:           # drafts, every one rejected, until it pauses
            ctl.observe("r", 4, 0)
        steps = 1
        while ctl.draft_len("r", 1) == 0:
            steps += 1
        pauses.append(steps)
    assert pauses == [PAUSE_STEPS, 2 * PAUSE_STEPS, 4 * PAUSE_STEPS]
    for _ in range(MIN_VERIFICATIONS):             # drafts that are accepted again reset the back-off
        ctl.observe("r", 4, 4)
    assert ctl.stats["r"].strikes == 0
    ctl.rate = 0.01                                # a proposer that rarely agrees: new requests start paused
    ctl.num_verifications = 100
    assert ctl.draft_len("new", 1) == 0 and ctl.stats["new"].pause == PAUSE_STEPS - 1
