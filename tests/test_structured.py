"""Structured output in the engine (kvflow/structured): every output satisfies its constraint, under n > 1,
preemption by either mode, prefix hits, chunked prefill, stop strings and max_tokens; greedy outputs that
the constraint does not change stay equal; bad specs are ValueErrors naming the field; nothing leaks.

A random-weight tiny model at temperature 1 spreads its probability over the whole vocabulary, which is the
hard case for a mask: anything the grammar lets through, it will sample."""
from __future__ import annotations

import json
import re

import pytest

from kvflow import LLM, SamplingParams
from kvflow.structured import StructuredOutputsParams as S
from kvflow.structured.backend import GrammarCompiler

jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["Paris", "London", "Rome"]
GBNF = 'root ::= "x=" [0-9]+ ";"'
PROMPTS = ["The quick brown fox", "Paris is the capital", "def hello(): return"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model=model, dtype="float32", block_size=8)


def check(spec: S, text: str) -> None:
    if spec.json is not None:
        jsonschema.validate(json.loads(text), spec.json)
    elif spec.json_object:
        assert isinstance(json.loads(text), dict)
    elif spec.regex is not None:
        assert re.fullmatch(spec.regex, text), text
    elif spec.choice is not None:
        assert text in spec.choice
    else:
        assert re.fullmatch(r"x=[0-9]+;", text), text


SPECS = [S(json=PERSON), S(regex=REGEX), S(choice=CHOICES), S(grammar=GBNF)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_every_sample_satisfies_the_constraint(llm, spec):
    outs = llm.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=200, structured_outputs=spec),
                        use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", (c.text, c.finish_reason)
            check(spec, c.text)


def test_json_object_outputs_are_objects_or_unfinished_prefixes(llm):
    """Any object: a random model's strings rarely end, so unfinished outputs (length) are allowed here; the
    ones that end parse as objects."""
    outs = llm.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=64,
                                                structured_outputs=S(json_object=True)), use_tqdm=False)
    texts = [c for o in outs for c in o.outputs]
    for c in texts:
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_constraint_holds_under_preemption(model, mode):
    llm = LLM(model=model, dtype="float32", block_size=8, num_kv_blocks=24, preemption_mode=mode, num_swap_blocks=64,
              max_num_batched_tokens=16)
    spec = S(json=PERSON)
    outs = llm.generate(PROMPTS * 3, SamplingParams(temperature=1.0, seed=3, max_tokens=120, structured_outputs=spec),
                        use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        check(spec, o.outputs[0].text)


def test_constraint_holds_with_prefix_hits_and_chunked_prefill(model):
    llm = LLM(model=model, dtype="float32", block_size=8, max_num_batched_tokens=8)
    long_prompt = " ".join(PROMPTS * 4)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=60, structured_outputs=S(regex=REGEX))
    first = llm.generate([long_prompt], params, use_tqdm=False)[0]
    again = llm.generate([long_prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].text == first.outputs[0].text
    check(params.structured_outputs, first.outputs[0].text)


@pytest.fixture(scope="module")
def default_llm(default_model_path):
    return LLM(model=default_model_path, num_threads=2)


def test_greedy_equals_unconstrained_when_the_constraint_allows_it(default_llm):
    """On the default model (real text; a random model picks lone UTF-8 bytes, which no text regex allows)."""
    prompts = ["The capital of France is", "def add(a, b):"]
    free = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    anything = S(regex=r"[\s\S]*")       # every text satisfies it: the mask takes nothing the model would pick
    constrained = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                               structured_outputs=anything), use_tqdm=False)
    for a, b in zip(free, constrained):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_logprobs_are_of_the_constrained_distribution(llm):
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=0, max_tokens=10, logprobs=5,
                                                    structured_outputs=S(choice=["yes", "no"])), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text in ("yes", "no")
    tok = llm.get_tokenizer()
    first = c.logprobs[0]
    allowed = {t for t, lp in first.items() if lp.logprob > float("-inf")}
    assert allowed and all(("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t]))) for t in allowed)
    assert abs(sum(2.718281828 ** lp.logprob for t, lp in first.items() if t in allowed) - 1.0) < 1e-3 or \
        len(allowed) >= 5


def test_max_tokens_ends_an_unfinished_json_with_length(llm):
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=0, max_tokens=3,
                                                    structured_outputs=S(json=PERSON)), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text.startswith("{")


def test_stop_string_ends_a_constrained_request(llm):
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=50, stop=["-"],
                                                    structured_outputs=S(regex=REGEX)), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and re.fullmatch("[0-9]{3}", out.outputs[0].text)


def test_jump_forward_gives_valid_output_and_appends_forced_tokens(model):
    llm = LLM(model=model, dtype="float32", block_size=8, jump_forward=True)
    spec = S(json={"type": "object", "properties": {"a_rather_long_key_name": {"enum": ["some fixed value"]},
                                                    "n": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a_rather_long_key_name", "n"], "additionalProperties": False})
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=2, max_tokens=80, structured_outputs=spec),
                        use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        check(spec, o.outputs[0].text)
    assert llm.engine.core.structured.num_jump_forward_tokens > 10


@pytest.mark.parametrize("spec, field", [
    (dict(regex="[a-z"), "structured_outputs.regex"),
    (dict(json={"type": "foo"}), "structured_outputs.json"),
    (dict(grammar='root ::= ("a" '), "structured_outputs.grammar"),
    (dict(grammar="start: undefined_rule"), "structured_outputs.grammar"),
])
def test_bad_specs_are_value_errors_naming_the_field(llm, spec, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(PROMPTS[:1], SamplingParams(structured_outputs=S(**spec)), use_tqdm=False)
    assert not llm.engine.core.has_unfinished()


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of"), (dict(regex="a", choice=["a"]), "exactly one of"),
    (dict(choice=[]), "structured_outputs.choice"), (dict(json="{not json"), "structured_outputs.json"),
    (dict(json=[1]), "structured_outputs.json"),
])
def test_malformed_params(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        S(**kwargs)
    with pytest.raises(ValueError, match="unknown fields: bogus"):
        S.from_dict({"regex": "a", "bogus": 1})


def test_compile_time_limit_is_a_value_error():
    import threading
    gate = threading.Event()

    class Slow:
        def compile(self, spec):
            gate.wait(5)
            return object()
    compiler = GrammarCompiler(lambda: Slow(), timeout_s=0.05)
    try:
        with pytest.raises(ValueError, match="took more than 0.05 s to compile"):
            compiler.check(S(regex="a+"))
    finally:
        gate.set()
        compiler.shutdown()


def test_abort_while_compiling_and_the_batch_goes_on(llm):
    core = llm.engine.core
    from kvflow.engine.wire import EngineCoreRequest
    core.add_request(EngineCoreRequest("c1", [5, 6, 7], SamplingParams(max_tokens=4, structured_outputs=S(
        regex="[a-z]{1,3}z")), [], 4, 0.0))
    core.abort_requests(["c1"])
    assert not core.has_unfinished()
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert all(o.finished for o in outs)


def test_default_model_json(default_llm):
    """The default model's vocabulary (a GGUF tokenizer) under a schema, greedy."""
    spec = S(json=PERSON)
    outs = default_llm.generate(["A person as JSON:"], SamplingParams(temperature=0, max_tokens=60,
                                                                     structured_outputs=spec), use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "stop"
    check(spec, outs[0].outputs[0].text)
