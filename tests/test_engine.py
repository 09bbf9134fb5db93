"""Engine behaviour: batch invariance, chunked prefill, preemption, prefix caching, seeds, stops, errors.

Greedy outputs of one engine configuration are the reference for the others: whatever the batch,
the chunking, the KV budget or the cache state, a request's greedy output must not change."""
import pytest

from kvflow import LLM, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LENGTHS = [3, 9, 16, 17, 40, 77, 120, 5]


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model=model, dtype="float32", block_size=8)


@pytest.fixture(scope="module")
def reference(llm):
    """Each prompt alone, greedy."""
    prompts = random_prompts(LENGTHS, seed=3)
    return prompts, [llm.generate(as_inputs([p]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def test_batch_invariance(llm, reference):
    prompts, ref = reference
    outs = llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    assert token_ids(outs) == ref
    for o in outs:                 # timing metrics are filled in, in order
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.ttft > 0
    # a different neighbourhood: reversed order, with extra requests of other lengths in between
    extra = random_prompts([50, 2, 33], seed=9)
    outs = llm.generate(as_inputs(prompts[::-1] + extra), GREEDY, use_tqdm=False)
    assert token_ids(outs)[:len(prompts)] == ref[::-1]


def test_chunked_prefill_and_tiny_budget(model, reference):
    prompts, ref = reference
    llm = LLM(model=model, dtype="float32", block_size=8, max_num_batched_tokens=7, max_num_seqs=3)
    assert token_ids(llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)) == ref


def test_preemption_finishes_every_request_unchanged(model, reference):
    prompts, ref = reference
    # 40 blocks of 8 tokens: far less than the batch needs at once, enough for the largest request alone
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=40, enable_prefix_caching=False)
    outs = llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    assert token_ids(outs) == ref
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    assert llm.engine.kv.pool.num_free == 40


def test_preemption_with_prefix_cache_and_chunks(model, reference):
    prompts, ref = reference
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=30, max_num_batched_tokens=16)
    assert token_ids(llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)) == ref
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_prefix_cache_hits_give_same_outputs(model):
    llm = LLM(model=model, dtype="float32", block_size=8)
    shared = random_prompts([64], seed=5)[0]
    tails = random_prompts([3, 11, 20], seed=6)
    prompts = [shared + t for t in tails]
    cold = LLM(model=model, dtype="float32", block_size=8, enable_prefix_caching=False)
    ref = token_ids(cold.generate(as_inputs(prompts), GREEDY, use_tqdm=False))
    first = llm.generate(as_inputs(prompts[:1]), GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    outs = llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    assert token_ids(outs) == ref
    assert all(o.num_cached_tokens == 64 for o in outs)
    # the whole prompt cached: the last token is still computed, to produce logits
    again = llm.generate(as_inputs(prompts[:1]), GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == ref[0]
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // 8 * 8


def test_prefix_cache_evicts_lru_when_blocks_run_out(model):
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=16)
    a, b = random_prompts([64, 64], seed=7)
    ref_a = llm.generate(as_inputs([a]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.generate(as_inputs([b]), GREEDY, use_tqdm=False)   # needs blocks: evicts a's cached blocks
    assert llm.engine.kv.pool.num_evictions > 0
    out = llm.generate(as_inputs([a]), GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_a
    llm.reset_prefix_cache()
    again = llm.generate(as_inputs([a]), GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == ref_a


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm, reference):
    prompts, _ = reference
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(as_inputs(prompts[:1]), seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    mixed = llm.generate(as_inputs(prompts), [seeded] + [others] * (len(prompts) - 1), use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99, ignore_eos=True)
    assert llm.generate(as_inputs(prompts[:1]), other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_parallel_sampling_n(llm, reference):
    prompts, ref = reference
    out = llm.generate(as_inputs(prompts[:1]), SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7,
                                                              ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate(as_inputs(prompts[:1]), SamplingParams(n=2, temperature=0, max_tokens=24,
                                                                 ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in greedy.outputs] == [ref[0], ref[0]]


def test_max_tokens_min_tokens_and_stop_token_ids(llm, reference):
    prompts, ref = reference
    stop_tok = ref[0][5]
    out = llm.generate(as_inputs(prompts[:1]), SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_tok],
                                                              ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = ref[0].index(stop_tok)
    assert out.token_ids == ref[0][:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    out = llm.generate(as_inputs(prompts[:1]), SamplingParams(temperature=0, max_tokens=24, min_tokens=first + 2,
                                                              stop_token_ids=[stop_tok], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2
    out = llm.generate(as_inputs(prompts[:1]), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) <= 4


def test_logprobs(llm, reference):
    prompts, ref = reference
    out = llm.generate(as_inputs(prompts[:1]), SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                              ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[0][:6]
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and lp[tok].rank == 1           # greedy: the sampled token is the most likely
        values = [v.logprob for v in lp.values()]
        assert len(lp) == 3 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert out.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)))


def test_stop_strings_are_cut(llm):
    tok = llm.get_tokenizer()
    prompt = tok.encode("The quick brown fox")
    full = llm.generate(as_inputs([prompt]), GREEDY, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(as_inputs([prompt]), SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(as_inputs([prompt]), SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True,
                                                           include_stop_str_in_output=True), use_tqdm=False)[0]
    assert out.outputs[0].text == text[:text.index(stop) + len(stop)]


def test_max_model_len_caps_output(model):
    llm = LLM(model=model, dtype="float32", block_size=8, max_model_len=32)
    out = llm.generate(as_inputs(random_prompts([30], seed=2)), SamplingParams(temperature=0, max_tokens=100,
                                                                               ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, params, match", [
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ({"prompt_token_ids": [1, 2, 100000]}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": list(range(3, 400)) * 3}, SamplingParams(), "max_model_len"),
    (12, SamplingParams(), "prompt"),
])
def test_invalid_requests_raise_and_leak_nothing(model, prompt, params, match):
    llm = LLM(model=model, dtype="float32", block_size=8, max_model_len=512)
    with pytest.raises(ValueError, match=match):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}, prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(as_inputs([[5, 6, 7]]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_request_larger_than_kv_cache_is_refused(model):
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate(as_inputs([[5] * 40]), GREEDY, use_tqdm=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float16"), "float16"), (dict(dtype="int3"), "dtype"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(block_size=-1), "block_size"), (dict(bogus=1), "bogus"), (dict(max_model_len=10**6), "max_model_len"),
])
def test_invalid_engine_args(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(model=model, **kwargs)


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(model=str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"]}')
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3"):
        LLM(model=str(tmp_path))


def test_truncated_safetensors(model, tmp_path):
    import shutil
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model}/{f}", tmp_path / f)
    data = open(f"{model}/model.safetensors", "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(model=str(tmp_path), dtype="float32")


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="messages"):
        llm.chat([{"role": "user"}], use_tqdm=False)


def test_abort_frees_blocks_and_other_requests_finish(llm, reference):
    prompts, ref = reference
    engine = llm.engine
    for i, p in enumerate(prompts[:3]):
        engine.add_request(f"abort-{i}", None, p, GREEDY)
    for _ in range(3):
        engine.step()
    engine.abort_request("abort-1")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == {"abort-0": ref[0], "abort-2": ref[2]}
    assert all(b.ref_count == 0 for b in engine.kv.pool.blocks)


def test_interrupted_generate_leaks_nothing(llm, reference, monkeypatch):
    prompts, _ = reference
    calls = {"n": 0}
    step = llm.engine.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step()
    monkeypatch.setattr(llm.engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert all(b.ref_count == 0 for b in llm.engine.kv.pool.blocks)


def test_duplicate_request_id_is_refused(llm):
    engine = llm.engine
    engine.add_request("dup", None, [5, 6, 7], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", None, [8, 9], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()


def test_sliding_window_bounds_the_context(tiny_model_dir, tmp_path):
    """Sliding-window attention is not implemented: contexts stay within the window, where it is exact."""
    import json
    import shutil
    src = tiny_model_dir("mistral")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", tmp_path / f)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert LLM(model=str(tmp_path), dtype="float32").engine.max_model_len == 64
    with pytest.raises(ValueError, match="sliding window"):
        LLM(model=str(tmp_path), dtype="float32", max_model_len=128)
