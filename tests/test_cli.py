"""The `kvflow` command line: generate, chat, and argument errors (exit 2, no traceback)."""
import argparse
import dataclasses
import io
import os
import subprocess
import sys

import pytest

from kvflow import config
from kvflow.config import EngineConfig
from kvflow.engine.llm_engine import LLMEngine
from kvflow.entrypoints.cli import main, make_parser
from kvflow.entrypoints.cli_args import CLIError, add_engine_args, engine_kwargs
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
    ["generate", "x", "--max-num-seqs", "0"],          # config validation (ValueError)
    ["generate", "x", "--block-size", "0"],
    ["serve", "--max-num-batched-tokens", "-1"],
    ["serve", "--max-body-bytes", "0"],                # server limits
    ["serve", "--sse-keepalive", "-1"],
    ["serve", "--max-engine-restarts", "-1"],
    ["serve", "--max-queue-wait", "-5"],
    ["generate", "x", "--kv-cache-dtype", "fp8"],      # not among the choices
    ["generate", "x", "--swap-space", "-0.5"],
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


# ---- the engine flags, generated from the config fields ----------------------------------------------------

TODAYS_FLAGS = ["--model", "--dtype", "--device", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                "--kv-cache-memory", "--no-prefix-caching", "--seed", "--kv-cache-dtype", "--quantization",
                "--preemption-mode", "--swap-space", "--kv-store-dir", "--kv-store-max", "-v", "--verbose"]


def _engine_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p


def _parse(*argv) -> argparse.Namespace:
    return make_parser().parse_args(["generate", "x", *argv])


def test_every_config_field_has_a_flag():
    options = _engine_parser()._option_string_actions
    names = []
    for section in config.SECTIONS.values():
        for f in dataclasses.fields(section):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag in options, f"config field {f.name} has no flag {flag}"
            assert options[flag].help, flag
            if f.type in ("bool", bool):
                assert "--no-" + flag[2:] in options
            names.append(f.name)
    assert sorted(engine_kwargs(_engine_parser().parse_args([]))) == sorted(names)
    for flag in TODAYS_FLAGS + ["--block-size", "--num-kv-blocks", "--num-swap-blocks", "--num-threads"]:
        assert flag in options, flag


def test_defaults_round_trip():
    args = _parse()
    assert args.seed is None                   # sampling stays unseeded; the engine gets 0
    kw = engine_kwargs(args)
    assert kw["seed"] == 0
    assert EngineConfig.from_kwargs(**kw) == EngineConfig()


def test_gib_flags_convert_to_bytes():
    kw = engine_kwargs(_parse("--kv-cache-memory", "0.05", "--swap-space", "0", "--kv-store-max", "2"))
    assert kw["kv_cache_memory_bytes"] == int(0.05 * (1 << 30))
    assert kw["swap_space_bytes"] == 0
    assert kw["kv_store_max_bytes"] == 2 << 30
    for flag, value in [("--kv-cache-memory", "0"), ("--swap-space", "-1"), ("--kv-store-max", "0"),
                        ("--kv-cache-memory", "inf")]:
        with pytest.raises(CLIError, match=flag):
            engine_kwargs(_parse(flag, value))


def test_flags_set_fields():
    kw = engine_kwargs(_parse("--block-size", "32", "--num-threads", "2", "--seed", "7", "--quantization", "int4",
                              "--preemption-mode", "swap", "--kv-store-dir", "/tmp/kv", "--max-num-seqs", "8"))
    c = EngineConfig.from_kwargs(**kw)
    assert (c.cache.block_size, c.parallel.num_threads, c.model.seed) == (32, 2, 7)
    assert (c.model.quantization, c.scheduler.preemption_mode, c.cache.kv_store_dir) == ("int4", "swap", "/tmp/kv")
    assert c.scheduler.max_num_seqs == 8


@pytest.mark.parametrize("argv", [["--dtype", "fp16"], ["--kv-cache-dtype", "fp8"], ["--quantization", "int2"],
                                  ["--preemption-mode", "never"], ["--block-size", "big"]])
def test_choices_and_types_enforced(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2
    assert "invalid" in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [([], True), (["--no-prefix-caching"], False),
                                           (["--no-enable-prefix-caching"], False),
                                           (["--enable-prefix-caching"], True),
                                           (["--no-prefix-caching", "--enable-prefix-caching"], True)])
def test_prefix_caching_flags(argv, expected):
    assert engine_kwargs(_parse(*argv))["enable_prefix_caching"] is expected


def test_config_error_names_the_problem(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--max-num-seqs", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kvflow: error: ") and "max_num_seqs" in err and "Traceback" not in err

