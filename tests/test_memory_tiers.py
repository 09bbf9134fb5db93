"""Copy-on-write sharing of n samples' prompt blocks, and preemption by swap as well as recompute.

Greedy outputs are the invariant: whatever path a request's KV takes (shared, copied on write,
swapped out and back, recomputed), its tokens must not change. conftest checks after every test
that every device and swap block is free, cached or held exactly as often as live requests hold it.
"""
import pytest

from kvflow import LLM, SamplingParams
from kvflow.scheduler.scheduler import PreemptionCost
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
LENGTHS = [17, 16, 33, 5, 60, 9]


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def reference(model):
    llm = LLM(model=model, dtype="float32", block_size=8, enable_prefix_caching=False)
    prompts = random_prompts(LENGTHS, seed=11)
    return prompts, [llm.generate(as_inputs([p]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


# ---- copy-on-write ---------------------------------------------------------------------------------------

def test_samples_share_the_prompt_and_copy_on_write(model, reference):
    prompts, ref = reference
    n, T = 4, GREEDY.max_tokens
    llm = LLM(model=model, dtype="float32", block_size=8, enable_prefix_caching=False)
    sched, kv = llm.engine.core.scheduler, llm.engine.kv
    for prompt, expect in zip(prompts, ref):
        before, copies = sched.num_scheduled_tokens, kv.num_cow_copies
        out = llm.generate(as_inputs([prompt]), SamplingParams(n=n, temperature=0, max_tokens=T, ignore_eos=True),
                           use_tqdm=False)[0]
        assert [c.token_ids for c in out.outputs] == [expect] * n
        # the prompt is computed once; each other sample recomputes only the prompt's last token
        assert sched.num_scheduled_tokens - before == len(prompt) + (n - 1) + n * (T - 1)
        tail_shared = (len(prompt) - 1) % 8 != 0     # the last prompt token lands in a shared partial block
        assert kv.num_cow_copies - copies >= (n - 1 if tail_shared else 0)


def test_seeded_samples_unchanged_by_sharing(model):
    prompt = random_prompts([21], seed=4)[0]
    llm = LLM(model=model, dtype="float32", block_size=8)
    params = SamplingParams(n=3, temperature=1.0, top_k=20, max_tokens=12, seed=7, ignore_eos=True)
    shared = [c.token_ids for c in llm.generate(as_inputs([prompt]), params, use_tqdm=False)[0].outputs]
    # sample i of a seeded request draws from seed + i: alone, it must give the same tokens
    alone = [llm.generate(as_inputs([prompt]), SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=7 + i,
                                                              ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
             for i in range(3)]
    assert shared == alone
    assert len({tuple(t) for t in shared}) > 1


def test_sample_zero_finishing_at_prefill_leaves_nothing_to_share(model):
    prompt = random_prompts([19], seed=2)[0]
    llm = LLM(model=model, dtype="float32", block_size=8)
    out = llm.generate(as_inputs([prompt]), SamplingParams(n=3, temperature=0, max_tokens=1, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1 and all(len(c.token_ids) == 1 for c in out.outputs)


# ---- swap tier -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_preemption_modes_keep_outputs(model, reference, mode):
    prompts, ref = reference
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=24, preemption_mode=mode,
              enable_prefix_caching=False)
    outs = llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)
    assert token_ids(outs) == ref
    sched = llm.engine.core.scheduler
    assert sched.num_preemptions > 0
    if mode == "swap":
        assert sched.num_swapped_out == sched.num_preemptions
    elif mode == "recompute":
        assert sched.num_swapped_out == 0
    stats = llm.engine.core.stats()
    assert stats.num_swapped_out == sched.num_swapped_out and stats.num_preemptions == sched.num_preemptions
    assert llm.engine.kv.swap_pool.num_free == len(llm.engine.kv.swap_pool.blocks)


def test_full_swap_tier_falls_back_to_recompute(model, reference):
    prompts, ref = reference
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=24, preemption_mode="swap",
              num_swap_blocks=3)
    assert token_ids(llm.generate(as_inputs(prompts), GREEDY, use_tqdm=False)) == ref
    sched = llm.engine.core.scheduler
    assert 0 < sched.num_swapped_out < sched.num_preemptions


def test_swap_with_shared_blocks_and_prefix_cache(model, reference):
    prompts, ref = reference
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=30, preemption_mode="swap",
              max_num_batched_tokens=24)
    outs = llm.generate(as_inputs(prompts), SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[r, r] for r in ref]
    assert llm.engine.core.scheduler.num_swapped_out > 0


def test_abort_while_swapped_frees_both_tiers(model):
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=12, preemption_mode="swap",
              enable_prefix_caching=False)
    engine = llm.engine
    for i, p in enumerate(random_prompts([30, 30, 30], seed=8)):
        engine.add_request(f"r{i}", None, p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    kv = engine.kv
    while not kv.swapped:
        engine.step()
    swapped = list(kv.swapped)
    engine.abort_request(swapped[0])
    while engine.has_unfinished_requests():
        engine.step()
    assert kv.pool.num_free == kv.num_blocks and kv.swap_pool.num_free == len(kv.swap_pool.blocks)


def test_cost_model_prefers_the_cheaper_path():
    cost = PreemptionCost(block_bytes=1 << 20, prefill_tokens_per_s=2000.0, swap_bytes_per_s=1e9)
    # 400 tokens in 25 blocks, 25 MiB of KV: 2 x 26 ms to move, 200 ms to recompute
    assert cost.swap_s(25) < cost.recompute_s(400)
    assert cost.swap_s(400) > cost.recompute_s(10)   # a big cache, few tokens behind it


def test_bad_preemption_settings_name_the_field(model):
    with pytest.raises(ValueError, match="preemption_mode"):
        LLM(model=model, preemption_mode="sometimes")
    with pytest.raises(ValueError, match="num_swap_blocks"):
        LLM(model=model, num_swap_blocks=-1)
