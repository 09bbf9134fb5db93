"""Beam search (kvflow/engine/beam_search.py): token for token against Hugging Face's
`generate(num_beams=W, ...)` on the same weights (fp32), beams sharing KV blocks by fork, pruned beams
freed, and the inputs it refuses."""
import json
import os
import shutil
from collections import Counter

import pytest
import torch

from kvflow import LLM, BeamSearchParams, SamplingParams
from kvflow.engine.beam_search import BeamSearch, run_beam_search
from tests.conftest import random_prompts

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = [5, 17, 30]


def hf_beam_search(model, prompt: list[int], width: int, max_new_tokens: int, length_penalty: float,
                   early_stopping, eos) -> tuple[list[list[int]], list[float]]:
    """HF's W best hypotheses of one prompt (no padding): their tokens (prompt + generated) and scores."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         num_beams=width, num_return_sequences=width, max_new_tokens=max_new_tokens,
                         length_penalty=length_penalty, early_stopping=early_stopping, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()     # generated tokens of each hypothesis
    seqs = [out.sequences[i, :len(prompt) + lengths[i]].tolist() for i in range(width)]
    return seqs, out.sequences_scores.tolist()


def assert_matches_hf(llm, hf, prompts, width, max_new_tokens, length_penalty, early_stopping, eos):
    params = BeamSearchParams(width, max_new_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                              include_stop_str_in_output=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert len(outs) == len(prompts)
    reasons = Counter()
    for p, out in zip(prompts, outs):
        ref_seqs, ref_scores = hf_beam_search(hf, p, width, max_new_tokens, length_penalty, early_stopping, eos)
        assert [s.tokens for s in out.sequences] == ref_seqs
        assert [s.score for s in out.sequences] == pytest.approx(ref_scores, rel=1e-4, abs=1e-4)
        for s in out.sequences:
            n = len(s.output_token_ids)
            assert s.cum_logprob == pytest.approx(sum(s.logprobs), abs=1e-5)
            assert s.score == pytest.approx(s.cum_logprob / n ** length_penalty, rel=1e-6)
            if s.finish_reason == "stop":
                assert s.tokens[-1] in eos and s.stop_reason == s.tokens[-1]
            else:
                assert s.finish_reason == "length" and n == max_new_tokens
            reasons[s.finish_reason] += 1
    return reasons


@pytest.fixture(scope="module")
def gqa(tiny_model_dir):
    folder = tiny_model_dir("llama_gqa")
    return (LLM(model=folder, dtype="float32", block_size=8),
            transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, tmp_path_factory):
    """llama_gqa with a second eos: of the tokens its beams often produce, the one that ends the most
    hypotheses of a small search, so that hypotheses end by eos in every test below."""
    src = tiny_model_dir("llama_gqa")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    counts = Counter()
    for p in prompts:
        seqs, _ = hf_beam_search(hf, p, 4, 12, 1.0, False, None)
        for s in seqs:
            counts.update(set(s[len(p):]))

    def num_ended(token):
        return sum(len(s) - len(p) < 12 or s[-1] == token for p in prompts
                   for s in hf_beam_search(hf, p, 2, 12, 1.0, False, [2, token])[0])
    token = max((t for t, _ in counts.most_common(3)), key=num_ended)
    folder = str(tmp_path_factory.mktemp("llama_gqa_eos"))
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), folder)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = [2, token]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return LLM(model=folder, dtype="float32", block_size=8), hf, [2, token]


@pytest.mark.parametrize("width,max_new_tokens,length_penalty,early_stopping", [
    (2, 8, 1.0, False), (4, 10, 0.5, True), (5, 6, -1.0, "never")])
def test_matches_transformers(gqa, width, max_new_tokens, length_penalty, early_stopping):
    llm, hf = gqa
    assert_matches_hf(llm, hf, random_prompts(PROMPT_LENGTHS, seed=1), width, max_new_tokens, length_penalty,
                      early_stopping, [2])


@pytest.mark.parametrize("width,length_penalty,early_stopping", [
    (2, 1.0, False), (3, 0.0, True), (4, 2.0, "never"), (4, 2.0, False), (6, -0.5, False), (3, 1.0, True)])
def test_matches_transformers_with_eos(eos_model, width, length_penalty, early_stopping):
    """Hypotheses end by eos here: the finished list, its length penalty and both stopping rules count."""
    llm, hf, eos = eos_model
    reasons = assert_matches_hf(llm, hf, random_prompts(PROMPT_LENGTHS, seed=1), width, 12, length_penalty,
                                early_stopping, eos)
    assert reasons["stop"] > 0


def test_eos_is_left_out_of_tokens_by_default(eos_model):
    llm, _, eos = eos_model
    prompts = [{"prompt_token_ids": p} for p in random_prompts(PROMPT_LENGTHS, seed=1)]
    kept = llm.beam_search(prompts, BeamSearchParams(3, 12, include_stop_str_in_output=True))
    plain = llm.beam_search(prompts, BeamSearchParams(3, 12))
    n_stop = 0
    for a, b in zip(kept, plain):
        for s, t in zip(a.sequences, b.sequences):
            if s.finish_reason == "stop":
                n_stop += 1
                assert t.tokens == s.tokens[:-1] and s.stop_reason == s.tokens[-1] in eos
                assert t.logprobs == s.logprobs[:-1] and t.cum_logprob == s.cum_logprob
            else:
                assert t.tokens == s.tokens
            assert t.text == llm.get_tokenizer().decode(t.tokens)
    assert n_stop > 0


def test_ignore_eos_runs_to_max_tokens(eos_model):
    llm, hf, eos = eos_model
    prompts = random_prompts(PROMPT_LENGTHS[:2], seed=1)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(3, 9, ignore_eos=True))
    for p, out in zip(prompts, outs):
        ref, _ = hf_beam_search(hf, p, 3, 9, 1.0, False, None)
        assert [s.tokens for s in out.sequences] == ref
        assert all(s.finish_reason == "length" and len(s.output_token_ids) == 9 for s in out.sequences)


def test_string_prompts_and_width_one(gqa):
    llm, _ = gqa
    tok = llm.get_tokenizer()
    [out] = llm.beam_search("Paris is the capital of", BeamSearchParams(1, 6, ignore_eos=True))
    greedy = llm.generate("Paris is the capital of", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0]
    assert len(out.sequences) == 1
    assert out.sequences[0].tokens == tok.encode("Paris is the capital of") + greedy.outputs[0].token_ids


class _WatchedClient:
    """The engine's client, checked before every step: the engine holds only the searches' live beams and
    the pruned parents still needed for a fork; records KV blocks in use and requests held."""

    def __init__(self, engine, searches):
        self.engine, self.client, self.searches = engine, engine.client, searches
        self.peak_blocks = self.peak_requests = 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def step(self):
        held = set(self.engine.core.scheduler.requests)
        wanted = {rid for s in self.searches for rid in s.request_ids()}
        assert held <= wanted, f"pruned beams still hold blocks: {sorted(held - wanted)}"
        outs = self.client.step()
        in_use = sum(1 for b in self.engine.kv.pool.blocks if b.ref_count)
        self.peak_blocks = max(self.peak_blocks, in_use)
        self.peak_requests = max(self.peak_requests, len(self.engine.core.scheduler.requests))
        return outs


def test_beams_share_blocks_and_pruned_beams_free_theirs(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("llama_gqa"), dtype="float32", block_size=8, enable_prefix_caching=False)
    engine, width, max_tokens = llm.engine, 4, 12
    prompt = random_prompts([64], seed=3)[0]          # 8 full blocks
    ids = iter(range(10 ** 6))
    search = BeamSearch(prompt, BeamSearchParams(width, max_tokens, ignore_eos=True), [2], max_tokens,
                        lambda: f"b{next(ids)}")
    watched = _WatchedClient(engine, [search])
    cow_before = engine.kv.num_cow_copies
    run_beam_search(watched, [search])
    assert len(search.result().sequences) == width
    assert not engine.core.scheduler.requests          # every beam ended
    # each of the W beams alone would hold its 8 prompt blocks plus 2 of its own (76 tokens: 10 blocks);
    # forked beams hold the prompt once, and only their own tail blocks
    per_sequence = -(-(len(prompt) + max_tokens) // 8)
    assert watched.peak_blocks <= 8 + 2 * width * 2 < width * per_sequence
    assert engine.kv.num_cow_copies > cow_before      # forks wrote into shared tail blocks: copied on write
    assert watched.peak_requests <= 2 * width          # live beams plus pruned parents awaiting their children


def test_an_error_mid_search_aborts_every_beam(gqa):
    llm, _ = gqa
    engine = llm.engine

    class Failing:
        def __init__(self):
            self.n = 0

        def __getattr__(self, name):
            return getattr(engine.client, name)

        def step(self):
            self.n += 1
            if self.n == 4:
                raise RuntimeError("boom")
            return engine.client.step()

    prompts = random_prompts([9, 20], seed=2)
    params = BeamSearchParams(3, 10)
    before = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    searches = [BeamSearch(p, params, [2], 10, lambda c=iter(range(1000)), i=i: f"e{i}-{next(c)}")
                for i, p in enumerate(prompts)]
    with pytest.raises(RuntimeError, match="boom"):
        run_beam_search(Failing(), searches)
    assert not engine.core.scheduler.requests
    # the engine still serves, and gives what it gave before the failed search
    again = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert [[s.tokens for s in o.sequences] for o in again] == [[s.tokens for s in o.sequences] for o in before]


@pytest.mark.parametrize("kwargs,field", [
    (dict(beam_width=0, max_tokens=4), "beam_width"), (dict(beam_width=2, max_tokens=0), "max_tokens"),
    (dict(beam_width=2.0, max_tokens=4), "beam_width"), (dict(beam_width=2, max_tokens=4, temperature=0.7),
                                                         "temperature"),
    (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty"),
    (dict(beam_width=2, max_tokens=4, early_stopping="sometimes"), "early_stopping"),
    (dict(beam_width=2, max_tokens=4, ignore_eos=1), "ignore_eos")])
def test_bad_params(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        BeamSearchParams(**kwargs)


def test_bad_inputs_are_refused_before_anything_runs(gqa):
    llm, _ = gqa
    with pytest.raises(ValueError, match="^beam_width must be <= 10"):     # 2W logprobs, at most 20
        llm.beam_search({"prompt_token_ids": [5, 6]}, BeamSearchParams(11, 4, ignore_eos=True))
    with pytest.raises(ValueError, match="^prompt is empty"):
        llm.beam_search([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": []}], BeamSearchParams(2, 4))
    with pytest.raises(ValueError, match="^prompt_token_ids"):
        llm.beam_search({"prompt_token_ids": [5, 10 ** 6]}, BeamSearchParams(2, 4))
    with pytest.raises(ValueError, match="^params must be a BeamSearchParams"):
        llm.beam_search("hello", SamplingParams())
    assert not llm.engine.core.scheduler.requests


# ---- the completions API: use_beam_search, n the beam width ------------------------------------------------

@pytest.fixture(scope="module")
def beam_server(tiny_model_dir):
    from tests.test_server_hardening import InProcessServer
    # 2 seats for 3 beams per prompt: beams wait for seats and run ahead of each other
    srv = InProcessServer(tiny_model_dir("llama_gqa"), max_num_seqs=2, max_queue_len=16,
                          engine_kw=dict(dtype="float32", block_size=8))
    yield srv
    srv.stop()


@pytest.mark.server
def test_completions_beam_search_matches_transformers(beam_server, gqa):
    from tests.test_server_hardening import post
    _, hf = gqa
    prompts = random_prompts([7, 19], seed=4)
    r = post(beam_server, "/v1/completions", {"prompt": prompts, "n": 3, "max_tokens": 8, "use_beam_search": True,
                                              "length_penalty": 0.5, "include_stop_str_in_output": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    tok = beam_server.engine.tokenizer
    for i, p in enumerate(prompts):
        ref, _ = hf_beam_search(hf, p, 3, 8, 0.5, False, [2])
        for j, c in enumerate(body["choices"][3 * i:3 * i + 3]):
            assert c["text"] == tok.decode(ref[j][len(p):])
            assert c["finish_reason"] == ("stop" if len(ref[j]) - len(p) < 8 else "length")
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert body["usage"]["completion_tokens"] == sum(len(s) - len(p) for p in prompts
                                                     for s in hf_beam_search(hf, p, 3, 8, 0.5, False, [2])[0])
    assert beam_server.call(lambda: dict(beam_server.engine.beam_streams)) == {}


@pytest.mark.server
@pytest.mark.parametrize("extra,param", [
    ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"), ({"best_of": 4}, "best_of"), ({"temperature": 0.8}, "temperature"),
    ({"stop": ["x"]}, "stop"), ({"top_p": 0.5}, "top_p"), ({"n": 11}, "n"), ({"early_stopping": "maybe"},
                                                                            "early_stopping"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"max_tokens": 10 ** 6}, "max_tokens")])
def test_completions_beam_search_refusals(beam_server, extra, param):
    from tests.test_server_hardening import assert_error, post
    body = {"prompt": "hello", "n": 2, "max_tokens": 4, "use_beam_search": True, **extra}
    err = assert_error(post(beam_server, "/v1/completions", body), 400)
    assert err["param"] == param, err


@pytest.mark.server
def test_a_client_that_goes_away_aborts_its_beams(beam_server):
    import time

    import httpx

    from tests.test_server_hardening import KEY, post
    body = {"prompt": "The quick brown fox", "n": 4, "max_tokens": 900, "use_beam_search": True, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{beam_server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=0.5)
    deadline = time.monotonic() + 20
    while beam_server.call(lambda: len(beam_server.engine.beam_streams)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert beam_server.call(lambda: len(beam_server.engine.beam_streams)) == 0
    r = post(beam_server, "/v1/completions", {**body, "max_tokens": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


@pytest.mark.server
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "length_penalty": 0.5}, "length_penalty"),
    ("/v1/completions", {"prompt": "hi", "early_stopping": True}, "early_stopping"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "use_beam_search": True},
     "use_beam_search")])
def test_beam_fields_without_beam_search_are_refused(beam_server, path, body, param):
    from tests.test_server_hardening import assert_error, post
    err = assert_error(post(beam_server, path, {**body, "max_tokens": 2}), 400)
    assert err["param"] == param, err
