"""prompt_logprobs (vLLM semantics) against Hugging Face transformers' logits in fp32: whole prompts,
chunked prefill, n > 1, preemption, prefix caching (no hits while prompt logprobs are pending)."""
import pytest
import torch

from kvflow import LLM, SamplingParams
from tests.conftest import random_prompts

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LENGTHS = [1, 2, 9, 17, 40, 100]


def hf_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of the prompt [P, V] (fp32)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long)).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def assert_prompt_logprobs(out, ref: torch.Tensor, k: int, tokenizer=None) -> None:
    """out.prompt_logprobs against ref [P, V]: entry i holds token i's logprob (from position i - 1) and its
    rank, plus the top-k tokens; ranks are checked up to near-ties."""
    prompt = out.prompt_token_ids
    pl = out.prompt_logprobs
    assert pl is not None and len(pl) == len(prompt)
    assert pl[0] is None
    for i in range(1, len(prompt)):
        d, row, tok = pl[i], ref[i - 1], prompt[i]
        assert tok in d, f"position {i}: the prompt token {tok} is missing"
        assert len(d) in (k, k + 1) and (len(d) == k + 1 or k > 0)
        for tid, lp in d.items():
            assert abs(lp.logprob - row[tid].item()) < TOL, f"position {i}, token {tid}: {lp.logprob} vs {row[tid]}"
        lo = int((row > row[tok] + TOL).sum()) + 1
        hi = int((row > row[tok] - TOL).sum())
        assert lo <= d[tok].rank <= max(lo, hi), f"position {i}: rank {d[tok].rank}, expected {lo}..{hi}"
        if k:
            top = sorted((lp.logprob for tid, lp in d.items() if tid != tok or len(d) == k), reverse=True)[:k]
            ref_top = row.topk(k).values
            assert torch.allclose(torch.tensor(top), ref_top, atol=TOL)
            ranks = sorted(lp.rank for tid, lp in d.items() if tid != tok or len(d) == k)
            assert ranks == list(range(1, k + 1))
        if tokenizer is not None:
            assert d[tok].decoded_token == tokenizer.decode([tok], skip_special_tokens=False)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def hf(model):
    return transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=11)


@pytest.fixture(scope="module")
def refs(hf, prompts):
    return [hf_logprobs(hf, p) for p in prompts]


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.mark.parametrize("budget", [2048, 7], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers(model, prompts, refs, budget):
    # budget 7: every prompt over 7 tokens is computed in chunks that send their logprobs step by step
    llm = LLM(model=model, dtype="float32", block_size=8, max_num_batched_tokens=budget, max_num_seqs=3)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=5)
    outs = llm.generate(as_inputs(prompts), params, use_tqdm=False)
    for out, ref in zip(outs, refs):
        assert_prompt_logprobs(out, ref, 5, llm.get_tokenizer())
        assert len(out.outputs[0].token_ids) == 3
    # prompt_logprobs=0: only the prompt token itself; requests without it get None
    outs = llm.generate(as_inputs(prompts[3:5]), [SamplingParams(max_tokens=1, prompt_logprobs=0),
                                                  SamplingParams(max_tokens=1)], use_tqdm=False)
    assert_prompt_logprobs(outs[0], refs[3], 0)
    assert all(len(d) == 1 for d in outs[0].prompt_logprobs[1:])
    assert outs[1].prompt_logprobs is None


def test_n_samples_and_preemption(model, prompts, refs):
    """n > 1 gives the parent one list (from the first sample); a tiny KV cache preempts requests in the
    middle of their prompt or their decode, and the prompt logprobs are neither lost nor repeated."""
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=24, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    params = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=40, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(as_inputs(prompts[2:]), params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for out, ref in zip(outs, refs[2:]):
        assert len(out.outputs) == 3
        assert_prompt_logprobs(out, ref, 2)


def test_prefix_cache_takes_no_hits_for_prompt_logprobs(model, prompts, refs):
    llm = LLM(model=model, dtype="float32", block_size=8)
    p, ref = prompts[-1], refs[-1]
    plain = SamplingParams(temperature=0, max_tokens=2)
    assert llm.generate(as_inputs([p]), plain, use_tqdm=False)[0].num_cached_tokens == 0
    assert llm.generate(as_inputs([p]), plain, use_tqdm=False)[0].num_cached_tokens == 96   # a hit
    out = llm.generate(as_inputs([p]), SamplingParams(max_tokens=2, prompt_logprobs=3), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert_prompt_logprobs(out, ref, 3)
    # its own blocks are cached as usual: a longer prompt sharing the prefix hits them
    llm.reset_prefix_cache()
    llm.generate(as_inputs([p]), SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    out = llm.generate(as_inputs([p + [5, 6, 7]]), plain, use_tqdm=False)[0]
    assert out.num_cached_tokens == 96


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_prompt_logprobs_validation(bad):
    with pytest.raises(ValueError, match="^prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)


def test_default_model_matches_transformers(hf_smollm2):
    llm = LLM(dtype="float32", quantization=None, max_num_batched_tokens=16)
    tok = llm.get_tokenizer()
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
            "capital of Germany.")
    ids = tok.encode(text)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=4),
                       use_tqdm=False)[0]
    assert_prompt_logprobs(out, hf_logprobs(hf_smollm2, ids), 4, tok)


def test_prompt_logprobs_cross_the_process_boundary(model):
    """The engine-core process's msgpack wire format carries prompt logprobs (tuples become lists)."""
    import time

    from kvflow.engine.wire import decode, encode
    llm = LLM(model=model, dtype="float32", block_size=8, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("r", None, list(range(10, 30)), SamplingParams(max_tokens=2, prompt_logprobs=1))
    direct, wired = [], []
    while engine.core.has_unfinished():
        outs = engine.core.step()
        direct += [o.prompt_logprobs for o in outs]
        wired += decode(encode(outs))
    assert any(o.new_token_ids == [] and o.prompt_logprobs for o in wired)   # a chunk that sampled nothing
    assert [o.prompt_logprobs and [[list(e[0][0]), e[1]] for e in o.prompt_logprobs] for o in wired] == \
           [p and [[list(e[0][0]), e[1]] for e in p] for p in direct]
    final = engine.output_processor.process(wired, time.monotonic())[0][-1]
    assert final.finished and len(final.prompt_logprobs) == 20 and final.prompt_logprobs[0] is None
    assert all(len(d) in (1, 2) for d in final.prompt_logprobs[1:])
