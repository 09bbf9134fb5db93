"""`kvflow bench serve`: metrics, arrivals, datasets and option checks as pure functions, then end to
end against a real `kvflow serve` started here on a tiny random-weight model (the client's measurements
are what is tested, not the model; llama.cpp's server is a peer in benchmarks/serve.py only)."""
import argparse
import asyncio
import json
import math

import httpx
import pytest

from kvflow.bench.datasets import RequestSpec, range_bounds, sample_chat, sample_random
from kvflow.bench.metrics import RequestResult, compute_metrics, throughput_bins, tpot
from kvflow.bench.serve import (BenchConfig, add_cli_args, arrival_times, main, parse_goodput, request_body,
                                run_benchmark, send_request)
from kvflow.tokenizer import Tokenizer
from tests.server_process import Server, free_port


@pytest.fixture(scope="module")
def tok(default_model_path):
    return Tokenizer.from_pretrained(default_model_path)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_cli_args(p)
    return p.parse_args(argv)


# ---- metrics -----------------------------------------------------------------------------------------

def _results():
    return [RequestResult(success=True, prompt_len=10, output_tokens=11, ttft=0.1, e2e=1.1, itl=[0.1] * 10),
            RequestResult(success=True, prompt_len=20, output_tokens=3, ttft=0.3, e2e=0.5, itl=[0.1, 0.1]),
            RequestResult(success=True, prompt_len=30, output_tokens=1, ttft=0.2, e2e=0.2),
            RequestResult(success=False, error="boom", prompt_len=40, ttft=0.0, e2e=0.01)]


def test_metrics_from_hand_made_results():
    m = compute_metrics(_results(), duration=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 15)   # the failed one excluded
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(7.5)
    assert m["total_token_throughput"] == pytest.approx(37.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(298.0)          # linear interpolation between 200 and 300
    # TPOT = (E2E - TTFT) / (out - 1): 1.0/10 and 0.2/2; the 1-token request has none
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["median_e2el_ms"] == pytest.approx(500.0)
    assert "goodput" not in m


def test_tpot_formula():
    assert tpot(RequestResult(success=True, output_tokens=5, ttft=0.2, e2e=1.0)) == pytest.approx(0.2)
    assert tpot(RequestResult(success=True, output_tokens=1, ttft=0.2, e2e=0.2)) is None


def test_goodput_counts_requests_meeting_every_slo():
    rs = _results()
    assert compute_metrics(rs, 2.0, {"ttft": 250})["goodput"] == pytest.approx(1.0)     # requests 1 and 3
    assert compute_metrics(rs, 2.0, {"ttft": 250, "tpot": 50})["goodput"] == pytest.approx(0.5)  # only 3
    assert compute_metrics(rs, 2.0, {"e2el": 600})["goodput"] == pytest.approx(1.0)     # 2 and 3; failed never
    assert compute_metrics(rs, 2.0, {"e2el": 0})["goodput"] == 0.0


def test_metrics_with_no_completed_request():
    m = compute_metrics([RequestResult(error="x")], 1.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["mean_ttft_ms"] == 0.0


def test_throughput_bins():
    reqs = [{"success": True, "start_time": 0.0, "ttft": 0.5, "itl": [0.4, 0.4, 0.4], "output_tokens": 8},
            {"success": False, "start_time": 0.0, "ttft": 0.0, "itl": [], "output_tokens": 0}]
    assert throughput_bins(reqs) == [4.0, 4.0]   # chunks at 0.5, 0.9 | 1.3, 1.7; 2 tokens each
    assert throughput_bins(reqs, duration=1.5) == [4.0, 8.0]


# ---- arrivals ----------------------------------------------------------------------------------------

def test_arrivals_infinite_rate_all_at_once():
    assert arrival_times(5, math.inf) == [0.0] * 5


def test_arrivals_seeded_and_mean_matches_rate():
    a, b = arrival_times(50, 4.0, seed=3), arrival_times(50, 4.0, seed=3)
    assert a == b and a != arrival_times(50, 4.0, seed=4)
    assert a[0] == 0.0 and a == sorted(a)
    for burstiness in (1.0, 0.5, 3.0):
        t = arrival_times(20001, 10.0, burstiness, seed=0)
        assert t[-1] / 20000 == pytest.approx(0.1, rel=0.05)


# ---- datasets ----------------------------------------------------------------------------------------

def test_random_dataset_lengths_and_determinism(tok):
    specs = sample_random(tok, 20, 40, 10, range_ratio=0.5, seed=1)
    lo, hi = range_bounds(40, 0.5)
    assert (lo, hi) == (20, 60)
    assert all(lo - 2 <= s.prompt_len <= hi + 2 for s in specs)        # re-encoding may shift by a token
    assert all(s.prompt_len == len(tok.encode(s.prompt)) for s in specs)
    assert all(5 <= s.output_len <= 15 for s in specs)
    assert len({s.output_len for s in specs}) > 1
    assert specs == sample_random(tok, 20, 40, 10, range_ratio=0.5, seed=1)
    assert specs != sample_random(tok, 20, 40, 10, range_ratio=0.5, seed=2)
    fixed = sample_random(tok, 5, 32, 8, seed=0)
    assert {s.output_len for s in fixed} == {8} and all(31 <= s.prompt_len <= 33 for s in fixed)


def test_chat_dataset_deterministic_mix(tok):
    specs = sample_chat(tok, 40, seed=0)
    assert specs == sample_chat(tok, 40, seed=0) and specs != sample_chat(tok, 40, seed=1)
    assert all(s.messages and s.messages[-1]["role"] == "user" for s in specs)
    turns = {len(s.messages) for s in specs}
    assert 1 in turns and max(turns) >= 4                     # short questions and long-context turns
    assert all(16 <= s.output_len <= 160 for s in specs)
    plain = sample_chat(tok, 40, seed=0, output_len=12, chat=False)
    assert all(p.messages is None and p.prompt.endswith("Assistant:") and p.output_len == 12 for p in plain)
    assert [p.prompt for p in plain] == [s.prompt for s in specs]


# ---- options and request bodies ----------------------------------------------------------------------

def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:2000"]) == {"ttft": 500, "tpot": 50.5, "e2el": 2000}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["ttft:-1"], ["tpot:inf"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


@pytest.mark.parametrize("argv, option", [
    (["--goodput", "ttft=5"], "--goodput"), (["--random-range-ratio", "1.5"], "--random-range-ratio"),
    (["--request-rate", "0"], "--request-rate"), (["--burstiness", "0"], "--burstiness"),
    (["--max-concurrency", "0"], "--max-concurrency"), (["--endpoint", "/v1/embeddings"], "--endpoint"),
    (["--dataset-name", "sharegpt"], "--dataset-name"), (["--num-prompts", "0"], "--num-prompts"),
    (["--extra-body", "{bad"], "--extra-body"), (["--extra-body", "[1]"], "--extra-body")])
def test_bad_options_raise_value_error_naming_the_option(argv, option):
    with pytest.raises(ValueError, match=option):
        main(parse(argv))


def test_request_body(tok):
    from kvflow.bench.serve import eos_logit_bias
    spec = RequestSpec("hi there", 2, 7)
    bias = eos_logit_bias(tok)
    assert bias[str(tok.eos_token_id)] == -100
    body = request_body(spec, BenchConfig(), "m", bias)
    assert body["prompt"] == "hi there" and body["max_tokens"] == 7 and body["stream"] is True
    assert body["ignore_eos"] is True and body["logit_bias"] == bias and body["temperature"] == 0.0
    chat = request_body(spec, BenchConfig(endpoint="/v1/chat/completions", extra_body={"top_k": 1}), "m", bias)
    assert chat["messages"] == [{"role": "user", "content": "hi there"}] and chat["top_k"] == 1
    plain = request_body(spec, BenchConfig(ignore_eos=False), "m", bias)
    assert "ignore_eos" not in plain and "logit_bias" not in plain


def test_unreachable_server_is_an_error_message(capsys):
    assert main(parse(["--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1"])) == 1
    assert "cannot list the models" in capsys.readouterr().err


def test_connection_errors_are_recorded_not_raised(tok):
    cfg = BenchConfig(base_url=f"http://127.0.0.1:{free_port()}", model="m", warmup=0, num_prompts=3,
                      random_input_len=8, random_output_len=2, api_key="secret")
    result = asyncio.run(run_benchmark(cfg, tok=tok, log=lambda s: None))
    assert result["summary"]["completed"] == 0 and result["summary"]["failed"] == 3
    assert result["config"]["api_key"] == "***"                   # never saved
    assert all(r["error"].startswith("ConnectError") for r in result["requests"])


# ---- stream parsing (a mock transport) ---------------------------------------------------------------

def _sse(*chunks, status=200, done=True) -> httpx.MockTransport:
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
    return httpx.MockTransport(lambda request: httpx.Response(status, content="".join(lines).encode()))


def _send(transport, body=None) -> RequestResult:
    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_request(client, "http://x/v1/completions", body or {"max_tokens": 9}, 5)
    return asyncio.run(go())


def _text(t, finish=None):
    return {"choices": [{"index": 0, "text": t, "finish_reason": finish}]}


def test_stream_with_usage_chunk():
    r = _send(_sse(_text("a"), _text(""), _text("b"), _text("c", "length"),
                   {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}))
    assert r.success and r.text == "abc" and r.output_tokens == 4 and r.output_tokens_from == "usage"
    assert r.ttft > 0 and len(r.itl) == 2 and r.e2e >= r.ttft and r.prompt_len == 5


def test_stream_without_usage_counts_max_tokens_or_chunks():
    def delta(d, f=None):
        return {"choices": [{"index": 0, "delta": d, "finish_reason": f}]}
    r = _send(_sse(delta({"role": "assistant"}), delta({"content": "ab"}), delta({"content": "c"}),
                   delta({}, "length")))
    assert r.success and r.text == "abc" and r.output_tokens == 9 and r.output_tokens_from == "max_tokens"
    assert len(r.itl) == 1                                    # the role-only chunk is not a token
    r = _send(_sse(_text("a"), _text("b"), _text("", "stop")))
    assert r.success and r.output_tokens == 2 and r.output_tokens_from == "chunks"


@pytest.mark.parametrize("transport, error", [
    (_sse({"error": {"message": "out of memory"}}), "out of memory"),
    (_sse(_text("a"), _text("b")), "finish_reason"),          # stream cut short
    (_sse(_text("a", "length"), done=False, status=500), "HTTP 500"),
    (_sse(_text("", "stop")), "without any text")])
def test_stream_failures_are_recorded(transport, error):
    r = _send(transport)
    assert not r.success and error in r.error


# ---- end to end against kvflow's own server -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def tiny_tok(tiny_model):
    return Tokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def kvflow_server(tmp_path_factory, tiny_model):
    srv = Server(tmp_path_factory.mktemp("kvflow_server"), "--model", tiny_model, "--dtype", "float32")
    yield srv.url
    srv.stop()


@pytest.mark.server
def test_end_to_end_completions(kvflow_server, tiny_model, tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(parse(["--base-url", kvflow_server, "--tokenizer", tiny_model, "--num-prompts", "4",
                     "--random-input-len", "32", "--random-output-len", "8", "--goodput", "ttft:60000",
                     "--save-result", str(out_json), "--plot", str(out_png)]))
    assert rc == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    s = result["summary"]
    assert s["completed"] == 4 and s["failed"] == 0
    assert s["total_output_tokens"] == 32          # EOS ignored (and banned through logit_bias): exactly 8 each
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    assert all(r["ttft"] > 0 and r["e2e"] >= r["ttft"] and r["output_tokens"] == 8 for r in result["requests"])
    assert all(r["finish_reason"] == "length" and len(r["itl"]) <= 7 for r in result["requests"])
    assert result["config"]["request_rate"] == "inf" and result["config"]["model"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.server
def test_end_to_end_chat_with_rate_and_concurrency(kvflow_server, tiny_tok):
    # seed 4: three conversations that fit the tiny model's 1,024 tokens (49, 389 and 515 of them; its
    # tokenizer spells most words letter by letter, so a long-context one would not)
    cfg = BenchConfig(base_url=kvflow_server, endpoint="/v1/chat/completions", dataset_name="chat",
                      num_prompts=3, chat_output_len=6, request_rate=20.0, max_concurrency=2, warmup=0, seed=4)
    result = asyncio.run(run_benchmark(cfg, tok=tiny_tok, log=lambda s: None))
    assert result["summary"]["completed"] == 3
    assert all(r["output_tokens"] == 6 and r["finish_reason"] == "length" for r in result["requests"])


@pytest.mark.server
def test_http_errors_are_recorded_not_raised(kvflow_server, tiny_tok):
    cfg = BenchConfig(base_url=kvflow_server, num_prompts=2, random_input_len=8, random_output_len=2,
                      warmup=0, extra_body={"max_tokens": -1})        # the server answers 400
    result = asyncio.run(run_benchmark(cfg, tok=tiny_tok, log=lambda s: None))
    assert result["summary"]["failed"] == 2
    assert all(r["error"].startswith("RuntimeError: HTTP 400") and "max_tokens" in r["error"]
               for r in result["requests"]), result["requests"]


@pytest.mark.server
def test_warmup_failure_raises(kvflow_server, tiny_tok):
    cfg = BenchConfig(base_url=kvflow_server, num_prompts=1, random_input_len=8, random_output_len=2,
                      extra_body={"max_tokens": -1})
    with pytest.raises(RuntimeError, match="warm-up"):
        asyncio.run(run_benchmark(cfg, tok=tiny_tok, log=lambda s: None))
