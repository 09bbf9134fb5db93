"""`kvflow bench serve --dataset-name multitenant` (kvflow/bench/datasets.py sample_multitenant): the workload's
shape as pure functions, with the default model's tokenizer (no server, no model weights run)."""
import argparse
from collections import Counter

import pytest

from kvflow.bench.datasets import RequestSpec, sample_multitenant
from kvflow.bench.serve import DATASETS, BenchConfig, add_cli_args, build_dataset, config_from_args, request_body
from kvflow.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(default_model_path):
    return Tokenizer.from_pretrained(default_model_path)


@pytest.fixture(scope="module")
def specs(tok):
    return sample_multitenant(tok, num_sessions=12, turns=3, tenants=4, output_len=32, seed=5)


def _system(spec):
    return spec.messages[0]["content"]


def _turns(specs):
    """session -> its specs in list order."""
    out = {}
    for s in specs:
        out.setdefault(s.user, []).append(s)
    return out


def test_sessions_turns_tenants_and_lengths(tok, specs):
    assert len(specs) == 12 * 3
    sessions = _turns(specs)
    assert len(sessions) == 12 and all(len(v) == 3 for v in sessions.values())
    assert all(s.output_len == 32 and s.user for s in specs)
    systems = {_system(s) for s in specs}
    assert len(systems) == 4                                            # one system prompt per tenant
    for text in systems:
        assert 300 <= len(tok.encode(text, add_special_tokens=False)) <= 600 + 40
    per_tenant = Counter(_system(v[0]) for v in sessions.values())      # tenants dealt in turn
    assert sorted(per_tenant.values()) == [3, 3, 3, 3]
    for s in specs:
        assert s.messages[0]["role"] == "system" and s.messages[-1]["role"] == "user"
        assert s.prompt_len == len(tok.encode_chat(s.messages)[1])


def test_turn_k_extends_turn_k_minus_1_in_order(tok, specs):
    for user, turns in _turns(specs).items():
        assert len({_system(t) for t in turns}) == 1                    # a session keeps its tenant
        for k, t in enumerate(turns):
            assert len(t.messages) == 2 + 2 * k                         # system, k (user, answer) pairs, user
            assert [m["role"] for m in t.messages[1:]] == ["user", "assistant"] * k + ["user"]
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.messages[:len(prev.messages)] == prev.messages  # history kept, answers fixed
            a = tok.encode_chat(prev.messages)[1]
            b = tok.encode_chat(nxt.messages)[1]
            assert b[:len(a)] == a                                      # the whole earlier prompt is a prefix
            assert nxt.prompt_len > prev.prompt_len


def test_turns_are_spread_over_the_run_and_interleaved(specs):
    positions = {}
    for i, s in enumerate(specs):
        positions.setdefault(s.user, []).append(i)
    # not session after session: some session's consecutive turns have other requests between them
    gaps = [b - a for p in positions.values() for a, b in zip(p, p[1:])]
    assert max(gaps) > 1 and sum(gaps) / len(gaps) > 2
    first = [p[0] for p in positions.values()]
    assert max(first) > len(specs) // 4                                 # sessions start at different times


def test_deterministic_for_a_seed(tok, specs):
    again = sample_multitenant(tok, num_sessions=12, turns=3, tenants=4, output_len=32, seed=5)
    assert again == specs
    other = sample_multitenant(tok, num_sessions=12, turns=3, tenants=4, output_len=32, seed=6)
    assert [s.prompt for s in other] != [s.prompt for s in specs]


def test_plain_text_for_completions(tok):
    plain = sample_multitenant(tok, num_sessions=2, turns=2, tenants=1, output_len=8, seed=0, chat=False)
    assert all(s.messages is None and s.user for s in plain)
    assert all(s.prompt.startswith("System: ") and s.prompt.endswith("\nAssistant:") for s in plain)
    assert all(s.prompt_len == len(tok.encode(s.prompt)) for s in plain)


def test_bad_arguments(tok):
    for kw in ({"num_sessions": 0}, {"turns": 0}, {"tenants": 0}, {"output_len": 0}):
        with pytest.raises(ValueError):
            sample_multitenant(tok, **{"num_sessions": 2, **kw})


def test_bench_serve_dataset_name_and_user_field(tok):
    assert "multitenant" in DATASETS
    p = argparse.ArgumentParser()
    add_cli_args(p)
    args = p.parse_args(["--dataset-name", "multitenant", "--num-prompts", "10", "--multitenant-turns", "3",
                         "--multitenant-tenants", "2", "--multitenant-output-len", "16",
                         "--endpoint", "/v1/chat/completions"])
    cfg = config_from_args(args)
    specs = build_dataset(cfg, tok)
    assert len(specs) == 10 and all(s.output_len == 16 for s in specs)      # 4 sessions of 3 turns, trimmed
    assert len({s.messages[0]["content"] for s in specs}) <= 2
    body = request_body(specs[0], cfg, "m", None)
    assert body["user"] == specs[0].user and body["messages"] == specs[0].messages
    assert "user" not in request_body(RequestSpec("hi", 1, 2), BenchConfig(), "m", None)   # unchanged default
    with pytest.raises(ValueError, match="--multitenant-turns"):
        config_from_args(p.parse_args(["--dataset-name", "multitenant", "--multitenant-turns", "0"]))
