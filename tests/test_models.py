"""Every model family, token for token against Hugging Face transformers on the same weights (fp32, greedy).

Greedy decoding may only differ from the reference at a near-tie (two logits equal to fp32 rounding);
there the sequences legitimately part ways and the comparison of that sequence stops."""
import os

import pytest
import torch

from kvflow import LLM, SamplingParams
from tests.conftest import TINY_MODELS, disable_cpu_kernels, random_prompts

transformers = pytest.importorskip("transformers")

MAX_TOKENS = 20
LENGTHS = [1, 5, 17, 33, 64, 100]


def hf_greedy(model, prompts: list[list[int]], max_tokens: int):
    """Reference greedy continuations and the logits of every step, one prompt at a time (no padding)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    results = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        results.append((out.sequences[0, len(p):].tolist(), [s[0] for s in out.logits]))
    return results


def assert_greedy_match(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            gap = (ref_logits[i][b] - ref_logits[i][a]).item()
            assert gap < 1e-4, f"token {i}: kvflow {a}, transformers {b}, logit gap {gap:.2e} (not a tie)"
            return
    assert len(ours) == len(ref), f"kvflow gave {len(ours)} tokens, transformers {len(ref)}"


@pytest.mark.parametrize("kernels", ["cpu-kernels", "pytorch-ops"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_matches_transformers(tiny_model_dir, name, kernels, monkeypatch):
    """Both CPU paths: kvflow's kernels (the default) and the PyTorch ops they replace (other devices)."""
    if kernels == "pytorch-ops":
        disable_cpu_kernels(monkeypatch)
    folder = tiny_model_dir(name)
    prompts = random_prompts(LENGTHS, seed=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref = hf_greedy(hf, prompts, MAX_TOKENS)
    # a small block size and token budget so that prompts span many blocks and prefill is chunked
    llm = LLM(model=folder, dtype="float32", block_size=8, max_num_batched_tokens=48)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    for out, (ref_ids, ref_logits) in zip(outs, ref):
        assert_greedy_match(out.outputs[0].token_ids, ref_ids, ref_logits)


SMOL_TEXTS = ["The capital of France is", "def fibonacci(n):",
              "Once upon a time, in a land far away, there lived a dragon who loved to read books about",
              "1, 2, 3, 4,"]


def test_smollm2_gguf_matches_transformers(hf_smollm2):
    llm = LLM(dtype="float32", quantization=None)        # dequantized, as transformers loads it
    tok = llm.get_tokenizer()
    prompts = [tok.encode(t) for t in SMOL_TEXTS]
    ref = hf_greedy(hf_smollm2, prompts, 16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for out, (ref_ids, ref_logits) in zip(outs, ref):
        assert_greedy_match(out.outputs[0].token_ids, ref_ids, ref_logits)
    assert outs[0].outputs[0].text.startswith(" Paris")


def test_smollm2_hf_folder_matches_its_gguf(smollm2_hf_folder):
    """The same model saved as a Hugging Face folder: same tokens, same text, same chat prompt."""
    params = SamplingParams(temperature=0, max_tokens=12)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    gguf_llm = LLM(dtype="float32", quantization=None)
    ref = gguf_llm.generate(SMOL_TEXTS, params, use_tqdm=False)
    ref_chat = gguf_llm.chat(messages, params, use_tqdm=False)[0]
    del gguf_llm
    folder_llm = LLM(model=smollm2_hf_folder, dtype="float32")
    outs = folder_llm.generate(SMOL_TEXTS, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [o.prompt_token_ids for o in ref]
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in ref]
    chat = folder_llm.chat(messages, params, use_tqdm=False)[0]
    assert chat.prompt_token_ids == ref_chat.prompt_token_ids
    assert chat.outputs[0].text == ref_chat.outputs[0].text and "Paris" in chat.outputs[0].text


def test_sharded_bf16_checkpoint_loads_like_the_single_file(tiny_model_dir, tmp_path):
    """Many safetensors shards, stored in bf16, give the same model as the bf16-rounded single file."""
    import shutil
    folder = tiny_model_dir("qwen2_bias")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(folder, f), tmp_path / f)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    prompts = [{"prompt_token_ids": p} for p in random_prompts([7, 30], seed=4)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sharded = LLM(model=str(tmp_path), dtype="float32").generate(prompts, params, use_tqdm=False)
    ref = hf_greedy(hf.float(), [p["prompt_token_ids"] for p in prompts], 8)
    for out, (ref_ids, ref_logits) in zip(sharded, ref):
        assert_greedy_match(out.outputs[0].token_ids, ref_ids, ref_logits)


def _dequantized_transformers_model(folder: str, method: str):
    """transformers' model on exactly the weights kvflow's `method` layers hold (their dequantized values),
    and the layers' layouts (kvflow's loader, with the kernels as they are set now)."""
    from kvflow.models.loader import load_model, load_model_config
    cfg = load_model_config(folder)
    model = load_model(folder, cfg, torch.float32, "cpu", cfg.max_position_embeddings, quantization=method)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    weights = {"lm_head.weight": model.lm_head.dequantize()}
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        qkv = layer.self_attn.qkv_proj.dequantize().split([q, kv, kv])
        gate_up = layer.mlp.gate_up_proj.dequantize().chunk(2)
        for name, w in zip(("q_proj", "k_proj", "v_proj"), qkv):
            weights[f"{prefix}self_attn.{name}.weight"] = w
        weights[f"{prefix}self_attn.o_proj.weight"] = layer.self_attn.o_proj.dequantize()
        weights[f"{prefix}mlp.gate_proj.weight"], weights[f"{prefix}mlp.up_proj.weight"] = gate_up
        weights[f"{prefix}mlp.down_proj.weight"] = layer.mlp.down_proj.dequantize()
    assert not hf.load_state_dict(weights, strict=False).unexpected_keys     # the norms and embedding stay
    layouts = {m.layout for m in model.modules() if hasattr(m, "layout")}
    return hf, layouts


@pytest.mark.parametrize("kernels", ["cpu-kernels", "pytorch-ops"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_tiny_model_matches_transformers_on_its_weights(tiny_model_dir, method, kernels, monkeypatch):
    """The quantized layers on both CPU paths: kvflow's weight kernels (VNNI CPUs), and with the kernels
    off the layout built for PyTorch's int8 / int4 matmuls (the reference path). transformers runs the
    weights they hold; fed kvflow's greedy tokens, it gives each the same log-probability, and ranks it
    first but for near-ties."""
    from kvflow.kernels import kernel_ops_for
    if kernels == "pytorch-ops":
        disable_cpu_kernels(monkeypatch)
    folder = tiny_model_dir("llama_gqa")
    hf, layouts = _dequantized_transformers_model(folder, method)
    tiles = kernel_ops_for("cpu", "int4_linear") is not None
    assert layouts == ({"tiles"} if tiles else {"aten"})
    # measured: int8 through PyTorch's kernel 1.5e-6 (fp32 all along), kvflow's kernels 3e-4 (two int8 terms
    # per activation), PyTorch's int4 kernel 1e-2 (it takes bf16 activations)
    tol = 3e-3 if tiles else 1e-4 if method == "int8" else 5e-2
    prompts = random_prompts([3, 150], seed=2)         # 150 rows: that prompt takes the dense path
    llm = LLM(model=folder, dtype="float32", quantization=method)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True),
                        use_tqdm=False)
    for p, out in zip(prompts, outs):
        ids = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([p + ids[:-1]])).logits[0, len(p) - 1:].float()
        ref = logits.log_softmax(-1)
        ours = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, ids)])
        got = ref[torch.arange(len(ids)), torch.tensor(ids)]
        assert (ours - got).abs().max() < tol
        assert (ref.max(-1).values - got).max() < tol          # kvflow's token is first, or within tol of it
