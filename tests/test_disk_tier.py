"""The disk tier of the prefix cache: evicted blocks spill to files, later requests load them, the store
survives a restart of the engine, and a corrupted, truncated or foreign file is never loaded."""
import logging
import os
import shutil

import pytest

from kvflow import LLM, SamplingParams
from kvflow.memory.disk_store import SUFFIX
from kvflow.memory.kv_cache_manager import extend_block_hashes
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def as_inputs(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def run(llm, prompt):
    return llm.generate(as_inputs([prompt]), GREEDY, use_tqdm=False)[0]


def files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(SUFFIX))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def long_prompt():
    return random_prompts([100], seed=21)[0]


@pytest.fixture(scope="module")
def cold(model, long_prompt):
    """The long prompt's output with no cache at all."""
    return run(LLM(model=model, dtype="float32", block_size=8, enable_prefix_caching=False), long_prompt)


def make(model, store, **kw):
    return LLM(model=model, dtype="float32", block_size=8, kv_store_dir=str(store), **kw)


def test_evicted_blocks_spill_and_load_back(model, long_prompt, cold, tmp_path):
    llm = make(model, tmp_path, num_kv_blocks=20)
    assert run(llm, long_prompt).outputs[0].token_ids == cold.outputs[0].token_ids
    for p in random_prompts([120, 120], seed=5):          # these evict the long prompt's blocks
        run(llm, p)
    llm.engine.kv.disk.flush()
    assert llm.engine.kv.pool.num_evictions > 0 and files(tmp_path)
    again = run(llm, long_prompt)
    assert again.outputs[0].token_ids == cold.outputs[0].token_ids
    assert again.num_cached_tokens == 96                   # 12 of its 12 full blocks (the 13th is partial)
    assert llm.engine.kv.num_disk_hits > 0
    llm.shutdown()


def test_store_survives_a_restart(model, long_prompt, cold, tmp_path):
    with make(model, tmp_path) as first:
        run(first, long_prompt)                            # no eviction: written at shutdown
    assert len(files(tmp_path)) == 13                      # 111 tokens computed: 13 full blocks
    second = make(model, tmp_path)
    out = run(second, long_prompt)
    assert out.outputs[0].token_ids == cold.outputs[0].token_ids
    assert out.num_cached_tokens == 96 and second.engine.kv.num_disk_hits == 96
    second.shutdown()


def test_another_model_never_shares_entries(model, long_prompt, tmp_path):
    with make(model, tmp_path) as first:
        run(first, long_prompt)
    # the same architecture with different weights: another identity, another folder
    other = str(tmp_path / "other-model")
    shutil.copytree(model, other)
    st = next(f for f in os.listdir(other) if f.endswith(".safetensors"))
    with open(os.path.join(other, st), "r+b") as f:
        f.seek(os.path.getsize(f.name) - 8)
        f.write(b"\x01" * 8)
    with make(other, tmp_path) as llm:
        assert run(llm, long_prompt).num_cached_tokens == 0
        assert llm.engine.kv.num_disk_hits == 0
    assert len([d for d in os.listdir(tmp_path) if d != "other-model"]) == 2   # one folder per identity


def test_corrupted_truncated_and_foreign_files_are_ignored(model, long_prompt, cold, tmp_path, caplog):
    with make(model, tmp_path) as first:
        run(first, long_prompt)
        hashes = extend_block_hashes([], long_prompt, first.engine.kv.block_size)[:12]
    store_dir = os.path.dirname(files(tmp_path)[0])
    path = {h: os.path.join(store_dir, f"{h & (2 ** 64 - 1):016x}{SUFFIX}") for h in hashes}
    with open(path[hashes[3]], "r+b") as f:               # flip a payload byte: checksum mismatch
        f.seek(-5, os.SEEK_END)
        b = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    with open(path[hashes[6]], "r+b") as f:               # cut in half
        f.truncate(os.path.getsize(path[hashes[6]]) // 2)
    shutil.copy(path[hashes[0]], path[hashes[9]])          # a valid file, but of another block
    with open(path[hashes[11]], "wb") as f:                # not ours at all
        f.write(b"garbage")
    caplog.set_level(logging.WARNING, logger="kvflow")
    llm = make(model, tmp_path)
    out = run(llm, long_prompt)
    assert out.outputs[0].token_ids == cold.outputs[0].token_ids
    assert out.num_cached_tokens == 3 * 8                  # the prefix stops at the first bad file
    assert "checksum mismatch" in caplog.text
    store = llm.engine.kv.disk
    for h, reason in ((hashes[6], "truncated"), (hashes[9], "holds another block"),
                      (hashes[11], "not a kvflow KV block file")):
        caplog.clear()
        store.index[h] = 1                                 # as if listed at start: the file is read and refused
        assert store.load(h) is None
        assert reason in caplog.text
    assert store.num_rejected == 4
    llm.shutdown()


def test_size_cap_evicts_least_recently_used(model, tmp_path):
    llm = make(model, tmp_path, num_kv_blocks=20)
    store = llm.engine.kv.disk
    store.max_bytes = 10 * (llm.engine.core.runner.block_bytes + 1024)
    for p in random_prompts([120, 120, 120], seed=31):
        run(llm, p)
    llm.shutdown()
    sizes = [os.path.getsize(f) for f in files(tmp_path)]
    assert sizes and sum(sizes) <= store.max_bytes
    assert store.num_written > len(sizes)                 # older blocks were written, then evicted
