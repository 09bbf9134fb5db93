"""Tokenizer: a thin wrapper over a fast `tokenizers.Tokenizer` plus chat templating.

Loads from a Hugging Face folder (tokenizer.json + configs) or from a GGUF file; needs no
`transformers` at run time. Chat templates are rendered with a sandboxed jinja2 environment
configured the way Hugging Face renders them.
"""
import json
import os
import re
from datetime import datetime
from functools import lru_cache

import tokenizers


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _pick_template(value) -> str | None:
    """chat_template may be a string or a list of {"name", "template"} (use "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (HF assistant-mask marker): render the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")

    class SafeNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace
            for name in dict(*args[1:], **kwargs):
                _check_name(name)
            jinja2.utils.Namespace.__init__(*args, **kwargs)

        def __setitem__(self, name, value):
            _check_name(name)
            super().__setitem__(name, value)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = SafeNamespace
    return env.from_string(source)


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, extra_eos_token_ids=(),
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None,
                 pad_token_id: int | None = None, chat_template: str | None = None,
                 template_tokens: dict | None = None):
        self._tok = tokenizer
        if bos_token_id is None and bos_token is not None:
            bos_token_id = tokenizer.token_to_id(bos_token)
        if eos_token_id is None and eos_token is not None:
            eos_token_id = tokenizer.token_to_id(eos_token)
        extra = [int(i) for i in extra_eos_token_ids]
        if eos_token_id is None and extra:
            eos_token_id = extra[0]
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id  # primary end-of-sequence id
        self.eos_token_ids: set[int] = {i for i in [eos_token_id, *extra] if i is not None}
        self.bos_token = bos_token if bos_token is not None else self._id_str(bos_token_id)
        self.eos_token = eos_token if eos_token is not None else self._id_str(eos_token_id)
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token  # None: leave it to tokenizer.json's post-processor
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self._template_tokens = {k: v for k, v in (template_tokens or {}).items() if v is not None}
        # What does the post-processor itself add around a sequence?
        specials = tokenizer.encode("", add_special_tokens=True).ids
        self._post_bos = bos_token_id is not None and specials[:1] == [bos_token_id]
        self._post_eos = (eos_token_id is not None and specials[-1:] == [eos_token_id]
                          and (len(specials) > 1 or not self._post_bos))
        added = tokenizer.get_added_tokens_decoder()
        self.all_special_ids: set[int] = {i for i, t in added.items() if t.special}
        self.all_special_ids |= {i for i in (bos_token_id, *self.eos_token_ids) if i is not None}

    def _id_str(self, token_id):
        return None if token_id is None else self._tok.id_to_token(token_id)

    # ---- loading ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """A Hugging Face folder, or a .gguf file."""
        if os.path.isdir(path):
            return cls.from_hf_folder(path)
        if str(path).endswith(".gguf"):
            return cls.from_gguf(path)
        raise FileNotFoundError(f"no tokenizer at {path!r}: expected a folder with "
                                "tokenizer.json or a .gguf file")

    @classmethod
    def from_hf_folder(cls, path: str) -> "Tokenizer":
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"tokenizer.json not found in {path!r} (only fast "
                                    "tokenizers are supported; a folder needs tokenizer.json)")
        tok = tokenizers.Tokenizer.from_file(tok_path)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen_cfg = _read_json(os.path.join(path, "generation_config.json"))
        model_cfg = _read_json(os.path.join(path, "config.json"))
        template = None
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if template is None:
            template = _pick_template(
                _read_json(os.path.join(path, "chat_template.json")).get("chat_template"))
        if template is None:
            template = _pick_template(cfg.get("chat_template"))
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        bos_id = tok.token_to_id(bos) if bos is not None else None
        if bos_id is None and bos is None:
            bos_id = (_as_id_list(model_cfg.get("bos_token_id")) or [None])[0]
        extra = _as_id_list(gen_cfg.get("eos_token_id")) + _as_id_list(model_cfg.get("eos_token_id"))
        pad = _token_str(cfg.get("pad_token"))
        template_tokens = {k: _token_str(v) for k, v in cfg.items() if k.endswith("_token")}
        return cls(tok, bos_token=bos, eos_token=eos, bos_token_id=bos_id,
                   extra_eos_token_ids=extra, add_bos_token=cfg.get("add_bos_token"),
                   add_eos_token=cfg.get("add_eos_token"),
                   pad_token_id=tok.token_to_id(pad) if pad is not None else None,
                   chat_template=template, template_tokens=template_tokens)

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        from kvflow.models.gguf import gguf_tokenizer, read_gguf
        reader = read_gguf(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) \
            else path_or_reader
        tok, meta = gguf_tokenizer(reader)
        extra = []  # llama.cpp also ends generation on end-of-turn / end-of-message tokens
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            field = reader.fields.get(key)
            if field is not None:
                extra.append(int(field.contents()))
        return cls(tok, bos_token=meta.get("bos_token"), eos_token=meta.get("eos_token"),
                   bos_token_id=meta.get("bos_token_id"), eos_token_id=meta.get("eos_token_id"),
                   extra_eos_token_ids=extra, add_bos_token=bool(meta.get("add_bos_token")),
                   add_eos_token=bool(meta.get("add_eos_token")),
                   pad_token_id=meta.get("pad_token_id"), chat_template=meta.get("chat_template"),
                   template_tokens={"bos_token": meta.get("bos_token"),
                                    "eos_token": meta.get("eos_token")})

    # ---- encode / decode -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and not self._post_bos:
                ids = [self.bos_token_id] + ids
            elif self.add_bos_token is False and self._post_bos:
                ids = ids[1:]
            if self.add_eos_token and self.eos_token_id is not None and not self._post_eos:
                ids = ids + [self.eos_token_id]
            elif self.add_eos_token is False and self._post_eos:
                ids = ids[:-1]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str | None]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat ------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """Render a conversation to a prompt string (tokenize it with add_special_tokens=False
        if the template already writes the BOS token)."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; pass a plain text "
                             "prompt (generate/complete) instead of chat messages")
        _check_messages(messages)
        if tools is not None and not (isinstance(tools, list)
                                      and all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of dicts (JSON schemas) or None")
        import jinja2
        context = {**self._template_tokens, "bos_token": self.bos_token or "",
                   "eos_token": self.eos_token or "", **kwargs}
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                **context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed to render: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """The rendered chat prompt and its token ids (the template writes the BOS itself when the model
        wants one, so no special tokens are added on top)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return text, self.encode(text, add_special_tokens=False)

    def template_uses(self, name: str) -> bool:
        """Whether the chat template reads `name`: a variable it is given (`tools`), or a message field
        it looks up (`tool_calls`). Tells the server whether to render tools itself."""
        return bool(self.chat_template) and _template_uses(self.chat_template, name)


@lru_cache(maxsize=64)
def _template_uses(source: str, name: str) -> bool:
    from jinja2 import meta
    env = _compile_template(source).environment
    if name in meta.find_undeclared_variables(env.parse(source)):
        return True
    return re.search(rf"(\.{name}\b|\[\s*['\"]{name}['\"]\s*\])", source) is not None


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] needs a string 'role': {m!r}")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise ValueError(f"messages[{i}] needs a string 'content': {m!r}")
