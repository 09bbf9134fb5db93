"""`kvflow eval perplexity`: the engine's perplexity (prompt logprobs through LLM.generate) against
transformers' on the same tokens and windows (fp32), the windowing, and the CLI on a license file."""
import json
import math
import os

import pytest
import torch

from kvflow import LLM
from kvflow.entrypoints.cli import main
from kvflow.eval import perplexity
from kvflow.eval.perplexity import windows

transformers = pytest.importorskip("transformers")

LICENSE = "/usr/share/common-licenses/Apache-2.0"


def license_text() -> str:
    assert os.path.isfile(LICENSE), f"{LICENSE} is missing (Debian's base-files ships it): the test needs a real text"
    with open(LICENSE, encoding="utf-8") as f:
        return f.read()


def hf_perplexity(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The same windows scored by transformers: every token once, from the logits at the position before it."""
    nll, count = 0.0, 0
    for begin, end, first in windows(len(ids), max_length, stride):
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0]
        lp = torch.log_softmax(logits.double(), dim=-1)
        for j in range(first - begin, end - begin):
            nll -= lp[j - 1, ids[begin + j]].item()
            count += 1
    return math.exp(nll / count), count


def test_windows_score_every_token_once():
    for n, length, stride in [(10, 4, 2), (10, 4, 3), (9, 10, 5), (100, 32, 7), (100, 32, 31), (2, 2, 1)]:
        wins = windows(n, length, stride)
        scored = [t for _, e, first in wins for t in range(first, e)]
        assert scored == list(range(1, n)), (n, length, stride)
        assert all(e - b <= length and b <= first - 1 for b, e, first in wins)
        assert wins[-1][1] == n


def test_tiny_model_matches_transformers(tiny_model_dir):
    folder = tiny_model_dir("qwen2_bias")
    llm = LLM(model=folder, dtype="float32", block_size=8, max_num_batched_tokens=24)
    ids = llm.get_tokenizer().encode(license_text())[:300]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for length, stride in [(48, 16), (64, 63)]:
        res = perplexity(llm, ids, max_length=length, stride=stride)
        ref, count = hf_perplexity(hf, ids, length, stride)
        assert res.num_tokens == count == len(ids) - 1
        assert res.num_windows == len(windows(len(ids), length, stride))
        assert abs(res.ppl - ref) / ref < 1e-4, (res.ppl, ref)
        assert abs(math.log(res.ppl) - res.nll) < 1e-9


def test_default_model_matches_transformers(hf_smollm2):
    llm = LLM(dtype="float32", quantization=None, max_model_len=128, kv_cache_memory_bytes=32 << 20)
    res = perplexity(llm, license_text(), max_length=64, stride=32, num_tokens=256)
    ref, count = hf_perplexity(hf_smollm2, llm.get_tokenizer().encode(license_text())[:256], 64, 32)
    assert res.num_tokens == count == 255 and res.num_windows == 7
    assert abs(res.ppl - ref) / ref < 1e-4, (res.ppl, ref)
    assert 2 < res.ppl < 40          # a license text is ordinary English for this model


def test_bad_arguments(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("qwen2_bias"), dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="max_length"):
        perplexity(llm, "some text here", max_length=64)     # longer than max_model_len - 1
    with pytest.raises(ValueError, match="stride"):
        perplexity(llm, "some text here", max_length=8, stride=8)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(llm, [5])


def test_cli_on_license_file(tiny_model_dir, capsys):
    folder = tiny_model_dir("qwen2_bias")
    args = ["eval", "perplexity", "--file", LICENSE, "--model", folder, "--dtype", "float32",
            "--max-length", "64", "--num-tokens", "200"]
    license_text()
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["num_tokens"] == 199 and d["max_length"] == 64 and d["stride"] == 32 and d["num_windows"] == 6
    assert d["dtype"] == "float32" and d["kv_cache_dtype"] == "auto" and d["ppl"] > 1
    llm = LLM(model=folder, dtype="float32")
    assert abs(d["ppl"] - perplexity(llm, license_text(), 64, num_tokens=200).ppl) < 1e-6 * d["ppl"]
    assert main(args + ["--kv-cache-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("perplexity: ") and lines[1].startswith("tokens: 199 ") and lines[2].startswith("seconds: ")
    assert abs(float(lines[0].split()[1]) - d["ppl"]) / d["ppl"] < 0.05   # int8 KV: close to the fp32 cache
    with pytest.raises(SystemExit) as e:
        main(["eval", "perplexity", "--file", "/nonexistent/file.txt", "--model", folder])
    assert e.value.code == 2
    assert "nonexistent" in capsys.readouterr().err
