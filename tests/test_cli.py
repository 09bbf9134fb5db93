"""The `kvflow` command line: generate, chat, and argument errors (exit 2, no traceback)."""
import io
import os
import subprocess
import sys

import pytest

from kvflow.engine.llm_engine import LLMEngine
from kvflow.entrypoints.cli import main
from tests.conftest import needs_default_model

needs_model = needs_default_model

GREEDY = ["--max-tokens", "8", "--temperature", "0"]
SMALL = ["--kv-cache-memory", "0.05", "--max-model-len", "1024"]   # a small engine for in-process runs


def _cli_cmd() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "kvflow")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "kvflow"]


@needs_model
def test_generate_subprocess_paris():
    r = subprocess.run(_cli_cmd() + ["generate", "The capital of France is", *GREEDY],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris"), r.stdout
    assert "Traceback" not in r.stderr


@needs_model
def test_generate_stream_matches_plain(capsys):
    assert main(["generate", "The capital of France is", *GREEDY, *SMALL]) == 0
    plain = capsys.readouterr()
    assert "Paris" in plain.out
    assert main(["generate", "The capital of France is", *GREEDY, *SMALL, "--stream", "-v"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == plain.out
    assert "loaded" in streamed.err and "loaded" not in plain.err   # -v logs to stderr only


@needs_model
def test_generate_stop_string(capsys):
    assert main(["generate", "The capital of France is", *GREEDY, *SMALL, "--stop", "."]) == 0
    assert capsys.readouterr().out == " Paris\n"


@needs_model
def test_chat_piped(capsys, monkeypatch):
    prompts = []
    real_add = LLMEngine.add_request

    def spy(self, request_id, prompt, token_ids, params):
        prompts.append(prompt)
        return real_add(self, request_id, prompt, token_ids, params)

    monkeypatch.setattr(LLMEngine, "add_request", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\n\nWhat is 2+2?\n/reset\nBye\n/exit\nnever read\n"))
    assert main(["chat", "--max-tokens", "6", "--temperature", "0", "--stop", "\n",
                 "--system", "You are terse.", *SMALL]) == 0
    out = capsys.readouterr().out
    replies = out.split("\n")[:-1]
    assert len(replies) == 3 and all(r.strip() for r in replies), out
    assert len(prompts) == 3
    assert all("You are terse." in p for p in prompts)
    # the second turn carries the first exchange; /reset dropped it for the third
    assert "Hi there" in prompts[1] and replies[0].strip() in prompts[1] and "What is 2+2?" in prompts[1]
    assert "Hi there" not in prompts[2] and "Bye" in prompts[2]
    assert "never read" not in "".join(prompts)


@needs_model
def test_chat_eof_without_input(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--max-tokens", "4", *SMALL]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv", [
    ["generate", "x", "--temperature", "-1"],
    ["generate", "x", "--top-p", "0"],
    ["generate", "x", "--max-tokens", "0"],
    ["generate", "x", "--model", "/no/such/model"],
    ["generate", "x", "--model", "/no/such/model.gguf"],
    ["generate", "x", "--kv-cache-memory", "-1"],
    ["generate", "x", "--temperature", "hot"],
    ["chat", "--top-k", "-5"],
    ["generate"],
    [],
])
def test_bad_args_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_bad_args_subprocess():
    r = subprocess.run([sys.executable, "-m", "kvflow", "generate", "x", "--temperature", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "kvflow: error: temperature" in r.stderr and "Traceback" not in r.stderr
