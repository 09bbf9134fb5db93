"""Tests for kvflow.sampling: SamplingParams validation and the batched Sampler."""
import math

import pytest
import torch

from kvflow.sampling.params import SamplingParams
from kvflow.sampling.sampler import Sampler, SamplingBatch, apply_penalties

sampler = Sampler()


def make_batch(params, logits, prompt=None, output=None, gens=None, stops=None):
    B, V = logits.shape
    if isinstance(params, SamplingParams):
        params = [params] * B
    return SamplingBatch.build(
        params,
        prompt_ids=prompt or [[] for _ in range(B)],
        output_ids=output or [[] for _ in range(B)],
        generators=gens or [None] * B,
        stop_ids=stops or [set() for _ in range(B)],
        vocab_size=V,
    )


def sample(params, logits, **kw):
    return sampler(logits, make_batch(params, logits, **kw))


# ------------------------------------------------------------------ SamplingParams
BAD_VALUES = [
    ("n", 0), ("n", -1), ("n", 1.5), ("n", True),
    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -3),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("nan")),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 2.0), ("min_tokens", 17),  # 17 > default max_tokens 16
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.5), ("logprobs", True),
    ("seed", 1.5), ("seed", "1"), ("seed", True),
    ("stop", ""), ("stop", [""]), ("stop", [1]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", 5), ("stop_token_ids", [True]),
    ("ignore_eos", 1), ("skip_special_tokens", None),
    ("logit_bias", {"a": 1.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {3: 101}), ("logit_bias", [1]),
    ("logit_bias", {3: "x"}),
    # every int crosses to the engine core as a msgpack int64 (issue 19)
    ("seed", 2 ** 64), ("seed", 2 ** 63), ("seed", -2 ** 63 - 1), ("top_k", 2 ** 64), ("stop_token_ids", [2 ** 64]),
    ("min_tokens", 2 ** 64), ("max_tokens", 2 ** 64), ("n", 2 ** 64), ("logit_bias", {2 ** 64: 1.0}),
]


def test_seed_leaves_room_for_every_sample():
    SamplingParams(seed=2 ** 63 - 1)
    SamplingParams(n=3, seed=2 ** 63 - 3)
    with pytest.raises(ValueError, match="^seed "):
        SamplingParams(n=2, seed=2 ** 63 - 1)           # the second sample would use seed + 1


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_params_messages_and_normalisation():
    with pytest.raises(ValueError, match=r"^temperature must be non-negative, got -1.0$"):
        SamplingParams(temperature=-1.0)
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and not p.greedy
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(7, 9), temperature=0, max_tokens=None,
                       min_tokens=100, logprobs=20, seed=-3)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [7, 9] and p.greedy
    assert isinstance(p.temperature, float)
    assert p.all_stop_token_ids({2}) == {2, 7, 9}
    assert SamplingParams(ignore_eos=True, stop_token_ids=[5]).all_stop_token_ids({2}) == {5}


def test_build_skips_unused_tensors():
    b = make_batch(SamplingParams(), torch.zeros(3, 10))
    assert b.all_random and not b.all_greedy
    for name in ("top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "output_counts", "seen_mask", "suppress_rows", "num_logprobs"):
        assert getattr(b, name) is None, name
    # Truncation settings on greedy rows are ignored.
    b = make_batch(SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2), torch.zeros(2, 10))
    assert b.all_greedy and b.top_k is None and b.top_p is None and b.min_p is None


# ------------------------------------------------------------------ greedy & truncation
def test_greedy_is_argmax_and_logits_untouched():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    before = logits.clone()
    out = sample(SamplingParams(temperature=0.0), logits)
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None
    assert torch.equal(logits, before)


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.0), SamplingParams()]
    out = sample(params, logits)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()


@pytest.mark.parametrize("kw", [dict(top_k=1, temperature=5.0), dict(top_p=1e-6, temperature=5.0),
                                dict(top_k=1, top_p=0.9, temperature=3.0)])
def test_truncation_to_one_token_equals_greedy(kw):
    torch.manual_seed(2)
    logits = torch.randn(64, 100)
    assert sample(SamplingParams(**kw), logits).token_ids == logits.argmax(-1).tolist()


def test_min_p_excludes_unlikely_tokens():
    probs = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.08, 0.07, 0.05])
    logits = probs.log().repeat(4000, 1)
    out = torch.tensor(sample(SamplingParams(min_p=0.4), logits).token_ids)
    allowed = probs >= 0.4 * probs.max()            # tokens 0, 1, 2
    assert allowed[out].all()
    assert set(out.tolist()) == set(allowed.nonzero().flatten().tolist())


def _check_frequencies(token_ids, expected, n):
    freq = torch.bincount(torch.tensor(token_ids), minlength=expected.numel()).double() / n
    tol = 5 * (expected * (1 - expected) / n).sqrt() + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=4),
                                dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, top_k=5, top_p=0.9)])
def test_sampling_matches_distribution(kw):
    torch.manual_seed(3)
    V, N = 12, 20000
    base = torch.randn(V, dtype=torch.float64) * 1.5
    p = torch.softmax(base / kw["temperature"], dim=0)
    order = p.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[: kw.get("top_k", V)]] = True
    if "top_p" in kw:  # keep the smallest prefix (by descending prob) whose mass reaches top_p
        q = torch.where(keep, p, 0.0)
        q = q / q.sum()
        cum = q[order].cumsum(0)
        keep_p = torch.zeros(V, dtype=torch.bool)
        keep_p[order[: int((cum < kw["top_p"]).sum()) + 1]] = True
        keep &= keep_p
    expected = torch.where(keep, p, 0.0)
    expected /= expected.sum()
    out = sample(SamplingParams(**kw), base.float().repeat(N, 1))
    _check_frequencies(out.token_ids, expected, N)


# ------------------------------------------------------------------ seeds
def _seeded_run(seed, others, steps=8, V=1000, pos=0):
    torch.manual_seed(99 + others)  # the global stream differs between runs on purpose
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for step in range(steps):
        logits = torch.zeros(others + 1, V)
        params = [SamplingParams()] * (others + 1)
        gens = [None] * (others + 1)
        gens[pos] = gen
        tokens.append(sample(params, logits, gens=gens).token_ids[pos])
    return tokens


def test_seeded_row_is_batch_independent():
    alone = _seeded_run(1234, others=0)
    assert alone == _seeded_run(1234, others=5, pos=3) == _seeded_run(1234, others=2, pos=0)
    assert alone != _seeded_run(4321, others=0)


def test_seeded_request_params_reproducible_with_truncation():
    torch.manual_seed(5)
    logits = torch.randn(1, 200)
    p = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=7)
    runs = []
    for others in (0, 3):
        gen = torch.Generator().manual_seed(p.seed)
        batch_logits = torch.cat([logits, torch.randn(others, 200)])
        params = [p] + [SamplingParams(top_k=3)] * others
        runs.append([sample(params, batch_logits, gens=[gen] + [None] * others).token_ids[0] for _ in range(10)])
    assert runs[0] == runs[1]


# ------------------------------------------------------------------ penalties & min_tokens
def _penalised(params, logits, prompt, output):
    return apply_penalties(logits.clone(), make_batch(params, logits, prompt=prompt, output=output))


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt, output = [[0]], [[1, 1, 3]]
    rep = _penalised(SamplingParams(repetition_penalty=2.0), logits, prompt, output)
    assert torch.allclose(rep, torch.tensor([[1.0, -2.0, 0.5, 1.5, -2.0]]))
    freq = _penalised(SamplingParams(frequency_penalty=0.5), logits, prompt, output)
    assert torch.allclose(freq, torch.tensor([[2.0, -2.0, 0.5, 2.5, -2.0]]))
    pres = _penalised(SamplingParams(presence_penalty=0.25), logits, prompt, output)
    assert torch.allclose(pres, torch.tensor([[2.0, -1.25, 0.5, 2.75, -2.0]]))
    allp = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, temperature=0)
    assert torch.allclose(_penalised(allp, logits, prompt, output), torch.tensor([[1.0, -3.25, 0.5, 0.75, -2.0]]))
    assert sample(SamplingParams(temperature=0), logits).token_ids == [3]
    assert sample(allp, logits, prompt=prompt, output=output).token_ids == [0]  # penalties apply to greedy rows


def test_penalties_only_touch_rows_that_ask():
    logits = torch.tensor([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5]])
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0), SamplingParams()]
    out = _penalised(params, logits, [[0], [0]], [[1, 2], [1, 2]])
    assert torch.allclose(out[0], torch.tensor([2.0 / 1.5, -1.5 - 1.0, 0.5 / 1.5 - 1.0]))
    assert torch.equal(out[1], logits[1])


def test_min_tokens_suppresses_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).repeat(2, 1)   # eos=1 is the argmax, stop id 2 next
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    stops = [p.all_stop_token_ids({1})] * 2
    out = sample(p, logits, output=[[0], [0, 0, 0]], stops=stops)
    assert out.token_ids == [3, 1]      # row 0: still short of min_tokens; row 1: reached it
    out = sample(SamplingParams(min_tokens=3, stop_token_ids=[2]), torch.zeros(1000, 4),
                 output=[[]] * 1000, stops=[{1, 2}] * 1000)
    assert not {1, 2} & set(out.token_ids)


def test_logit_bias_shifts_only_its_rows_and_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).repeat(2, 1)
    biased = SamplingParams(temperature=0.0, logit_bias={"2": 2.0, 1: -100})   # JSON keys arrive as strings
    assert biased.logit_bias == {2: 2.0, 1: -100.0}
    out = sample([biased, SamplingParams(temperature=0.0, logprobs=1)], logits)
    assert out.token_ids == [2, 1]
    assert out.logprobs[1][0][1] == pytest.approx(torch.log_softmax(logits[1], -1)[1].item())   # raw logprobs
    assert SamplingParams(logit_bias={}).logit_bias is None


# ------------------------------------------------------------------ logprobs & dtypes
def test_logprobs_from_raw_logits_sorted_top_n():
    torch.manual_seed(6)
    logits = torch.randn(3, 40)
    params = [SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.3, top_k=10),
              SamplingParams(), SamplingParams(logprobs=0, temperature=0)]
    out = sample(params, logits, prompt=[[1, 2, 3]] * 3)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None and out.ranks[1] is None
    tok, lp = out.logprobs[0][0]
    assert tok == out.token_ids[0] and math.isclose(lp, ref[0, tok].item(), rel_tol=1e-5, abs_tol=1e-6)
    top = out.logprobs[0][1:]
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert torch.allclose(torch.tensor([v for _, v in top]), ref[0].topk(5).values)
    assert out.ranks[0] == int((ref[0] > ref[0, tok]).sum()) + 1
    assert out.logprobs[2] == [(out.token_ids[2], pytest.approx(ref[2].max().item(), abs=1e-6))]
    assert out.ranks[2] == 1


def test_bf16_logits_accepted():
    torch.manual_seed(7)
    logits = torch.randn(8, 64).to(torch.bfloat16)
    greedy = sample(SamplingParams(temperature=0, logprobs=2), logits)
    assert greedy.token_ids == logits.float().argmax(-1).tolist()
    out = sample(SamplingParams(top_k=5, top_p=0.9, min_p=0.05, logprobs=1), logits)
    assert all(0 <= t < 64 for t in out.token_ids) and len(out.logprobs[0]) == 2


def test_shape_errors():
    batch = make_batch(SamplingParams(), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="vocab"):
        sampler(torch.zeros(2, 11), batch)
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(3, 10), batch)
    with pytest.raises(ValueError, match="output_ids"):
        SamplingBatch.build([SamplingParams()], [[]], [], [None], [set()], 10)
