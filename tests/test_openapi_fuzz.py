"""Schemathesis over the server's own OpenAPI spec (issue 19): every operation gets generated requests,
valid and not, and every answer must be no 5xx (`not_a_server_error`), of a content type the spec
declares (`content_type_conformance`), and of the schema it declares (`response_schema_conformance`).

The server is the in-process app of test_server_hardening.py on the tiny model, with four sequences at
a time and a long queue (a generated batch of prompts is not refused as busy: a 503 is a failure). The
run is bounded: derandomized (the same cases every run), 20 examples per operation and mode, no
shrinking, a timeout per request, a time budget (50 s; the run takes about 15 s on 2 cores), and
`max_tokens` and `n` capped in generated bodies (the fuzz is about the API, not about generating long
answers on 2 cores).

Each operation is driven by its own Hypothesis test over `operation.as_strategy()`, inputs valid by the
spec then invalid ones, and every failure is collected, so that one run reports all of them. The spec's
request schemas are looser than the server's checks (most generated bodies get a 400), so requests that
succeed, whole and streamed, go through the same checks first (`VALID`). (schemathesis's
`from_fixture` pytest integration sets `node._nodeid`, which pytest 9 no longer has.)
"""
from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance  # noqa: E402

from tests.test_server_hardening import KEY, InProcessServer  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 20                # per operation and mode (valid, invalid)
REQUEST_TIMEOUT_S = 20           # per request (a request waits at most for a few short generations)
MAX_TOKENS = 8                   # the largest max_tokens a generated body keeps
MAX_N = 2                        # the largest n a generated body keeps
BUDGET_S = 50.0                  # the whole run
HEADERS = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "hi"}]
VALID = [                        # (operation, path parameters, body): each answered 200
    ("GET /v1/models/{model_id}", {"model_id": "tiny-llama"}, None),
    ("POST /tokenize", None, {"prompt": "hello"}),
    ("POST /detokenize", None, {"tokens": [5, 6]}),
    *[("POST /v1/completions", None, {"prompt": p, "max_tokens": 3, "stream": s, "logprobs": 1})
      for p in ("hello", [5, 6, 7]) for s in (False, True)],
    *[("POST /v1/chat/completions", None, {"messages": MSGS, "max_tokens": 3, "stream": s, "logprobs": True,
                                           "top_logprobs": 2}) for s in (False, True)],
    *[("POST /v1/responses", None, {"input": "hi", "max_output_tokens": 3, "stream": s}) for s in (False, True)],
]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    srv = InProcessServer(tiny_model_dir("llama_gqa"), max_num_seqs=4, max_queue_len=256, keepalive_s=0.1)
    yield srv
    srv.stop()


def cap_generation(case) -> None:
    """Keep a generated body cheap to answer: small max_tokens (and its aliases) and n."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if type(body.get(key)) is int and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if type(body.get("n")) is int and body["n"] > MAX_N:
            body["n"] = MAX_N


def test_openapi_fuzz(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses",
            "GET /health"} <= {op.label for op in operations}
    failures: list[str] = []
    calls = 0
    start = time.monotonic()
    by_label = {op.label: op for op in operations}
    for label, path_parameters, body in VALID:
        case = by_label[label].Case(path_parameters=path_parameters, body=body) if body is not None else \
            by_label[label].Case(path_parameters=path_parameters)
        response = case.call_and_validate(headers=HEADERS, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, (label, body, response.text)
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                nonlocal calls
                cap_generation(case)
                calls += 1
                try:
                    case.call_and_validate(headers=HEADERS, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
                except AssertionError as e:          # a schemathesis FailureGroup: the checks that failed
                    failures.append(f"{op.label} ({mode.value}): {e}")
            try:
                run()
            except Unsatisfiable:
                # an operation without inputs (GET /health) has no invalid request to generate
                assert mode is GenerationMode.NEGATIVE, op.label
    elapsed = time.monotonic() - start
    assert not failures, f"{len(failures)} of {calls} cases failed:\n" + "\n".join(failures[:10])
    assert calls >= len(operations) and elapsed < BUDGET_S, (calls, elapsed)
