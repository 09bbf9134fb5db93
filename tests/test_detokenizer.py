import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from kvflow.detokenizer import IncrementalDetokenizer
from kvflow.tokenizer import Tokenizer

TEXTS = ["Hello world, this is a test.", "emoji 🎉👍🏽🇫🇷 party", "中文测试，日本語のテキスト、한국어",
         "naïve café Ångström Ærø", "def f(x):\n    return x ** 2  # square\n",
         "  lots   of\tspaces \n\n end  ", "mixed: a🎉b中c\u00e9d", "The capital of France is Paris."]


@pytest.fixture(scope="module")
def smol(default_model_path):
    return Tokenizer.from_gguf(default_model_path)


@pytest.fixture(scope="module")
def spm():
    """A Llama-2 style SentencePiece BPE with byte fallback, trained on ASCII text, so CJK and
    emoji go through <0xXX> byte tokens and a token decoded alone loses its leading space."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = ["Hello world, this is a test. The capital of France is Paris.",
              "def f(x):\n    return x ** 2  # square", "lots of spaces and end"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300,
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>",
                     add_bos_token=True)


def _stream(tok, prompt_ids, out_ids, chunk=1, **kw):
    detok = IncrementalDetokenizer(tok, prompt_ids, **kw)
    deltas, stop = [], None
    for i in range(0, len(out_ids), chunk):
        delta, stop = detok.step(out_ids[i:i + chunk])
        deltas.append(delta)
        if stop is not None:
            break
    else:
        deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return detok, deltas, stop


@pytest.mark.parametrize("prompt", ["", "Question: say something.\nAnswer:"])
@pytest.mark.parametrize("name", ["smol", "spm"])
def test_stream_matches_decode(request, name, prompt):
    tok = request.getfixturevalue(name)
    prompt_ids = tok.encode(prompt) if prompt else []
    for text in TEXTS:
        out = tok.encode(text, add_special_tokens=False)
        # what the output means in context (SentencePiece strips the first space of a sequence)
        expected = tok.decode(prompt_ids + out)[len(tok.decode(prompt_ids)):]
        for chunk in (1, 3):
            detok, deltas, _ = _stream(tok, prompt_ids, out, chunk=chunk)
            assert detok.text == expected, (text, chunk)
            assert detok.output_token_ids == out
            if "\ufffd" not in expected:
                assert not any("\ufffd" in d for d in deltas), (text, deltas)
        if name == "smol" or not prompt:
            assert detok.text == tok.decode(out)


def test_multibyte_chars_are_held_back(spm):
    out = spm.encode("a🎉b", add_special_tokens=False)
    assert len(out) >= 6  # the emoji is four <0xXX> byte tokens
    _, deltas, _ = _stream(spm, [], out)
    assert [d for d in deltas if d] == ["a", "🎉", "b"]


def test_leading_space_kept_with_context(spm):
    ids = spm.encode("The capital of France is Paris.", add_special_tokens=False)
    k = next(i for i, t in enumerate(spm.convert_ids_to_tokens(ids)) if t.startswith("▁Par"))
    assert not spm.decode(ids[k:k + 1]).startswith(" ")  # decoded alone, the space is lost
    detok, deltas, _ = _stream(spm, [spm.bos_token_id] + ids[:k], ids[k:])
    assert deltas[0].startswith(" Par") and detok.text == " Paris."


def test_random_byte_soup_matches_decode(smol):
    rng = random.Random(0)
    out = [rng.randrange(200, smol.vocab_size) for _ in range(300)]
    detok, _, _ = _stream(smol, smol.encode("Hi"), out)
    assert detok.text == smol.decode(out)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(smol, skip):
    im_end = smol.encode("<|im_end|>", add_special_tokens=False)
    out = smol.encode("Hi there", add_special_tokens=False) + im_end
    prompt = smol.encode(smol.apply_chat_template([{"role": "user", "content": "hey"}]),
                         add_special_tokens=False)
    detok, _, _ = _stream(smol, prompt, out, skip_special_tokens=skip)
    assert detok.text == ("Hi there" if skip else "Hi there<|im_end|>")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(smol, include):
    text = "The answer is 42. ###END### and then more text"
    out = smol.encode(text, add_special_tokens=False)
    assert not any("###END###" in t for t in smol.convert_ids_to_tokens(out))
    detok, deltas, stop = _stream(smol, smol.encode("Q:"), out, stop=["###END###", "zzz"],
                                  include_stop_str_in_output=include)
    assert stop == "###END###" == detok.stop_reason and detok.finished
    assert detok.text == ("The answer is 42. ###END###" if include else "The answer is 42. ")
    assert not any("#" in d for d in deltas[:-1])  # the partial match was never streamed
    with pytest.raises(RuntimeError, match="finished"):
        detok.step([1])


# ---- exact delta behaviour, with byte / char level fake tokenizers ---------------------------
class ByteTok:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if not (skip_special_tokens and i == 0)).decode("utf-8", "replace")


def _b(s):
    return list(s.encode("utf-8"))


def test_partial_stop_held_then_released():
    d = IncrementalDetokenizer(ByteTok(), [], stop=["END"])
    assert [d.step(_b(c))[0] for c in "xEN"] == ["x", "", ""]
    assert d.pending_text == "EN" and d.text == "x"
    assert d.step(_b("Z")) == ("ENZ", None)
    assert d.step(_b("EN")) == ("", None)
    assert d.flush() == "EN" and d.text == "xENZEN"


def test_overlapping_partial_stop():
    d = IncrementalDetokenizer(ByteTok(), _b("prompt"), stop=["abc"])
    deltas = [d.step(_b(c)) for c in "ababc"]
    assert deltas == [("", None), ("", None), ("ab", None), ("", None), ("", "abc")]
    assert d.text == "ab"


def test_stop_inside_one_step_and_earliest_wins():
    d = IncrementalDetokenizer(ByteTok(), [], stop=["cd", "bc"], include_stop_str_in_output=True)
    assert d.step(_b("abcdef")) == ("abc", "bc")
    d = IncrementalDetokenizer(ByteTok(), [], stop=["STOP"])
    assert d.step(_b("STOP now")) == ("", "STOP") and d.text == ""


def test_stop_across_multibyte_and_utf8_hold():
    d = IncrementalDetokenizer(ByteTok(), [], stop=["é!"])
    e = _b("é")
    assert d.step(_b("caf")) == ("caf", None)
    assert d.step(e[:1]) == ("", None)  # half a character: nothing yet
    assert d.step(e[1:]) == ("", None)  # "é" may start the stop string
    assert d.step(_b("!")) == ("", "é!") and d.text == "caf"


def test_flush_emits_trailing_invalid_bytes():
    d = IncrementalDetokenizer(ByteTok(), [])
    assert d.step(_b("ok") + [0xE2]) == ("", None)
    assert d.flush() == "ok\ufffd" and d.flush() == ""


def test_bad_stop_strings():
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(ByteTok(), [], stop=[""])
