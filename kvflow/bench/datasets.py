"""Workloads for `kvflow bench serve`: what each request asks for.

`random` (vLLM's random dataset): per request, an input length and an output length drawn uniformly
from [L*(1-r), L*(1+r)] (integers, both ends included). The prompt is the text of that many random
token ids, decoded with the model's tokenizer, re-encoded and trimmed or topped up until it is
`input_len` tokens long; `prompt_len` is the token count of the final text as the server will see it.

`chat`: a synthetic conversation mix built from fixed word lists, deterministic for a seed:
  - 45% short questions: one user turn ("What is photosynthesis?"), 16-64 output tokens;
  - 35% medium instructions: a brief system prompt, then one user turn with an instruction and a
    50-150-word passage, 64-160 output tokens;
  - 20% long context: a shared system prompt of ~300 tokens (the same text in every such request, so
    servers with prefix caching can reuse it), 1-4 prior user/assistant turns of 20-80 words each,
    and a follow-up question, 32-128 output tokens.
`multitenant` (sample_multitenant): several tenants, each with its own long system prompt (300-600
tokens), and multi-turn sessions: turn k of a session is its tenant's system prompt, the session's k-1
earlier turns (user messages and fixed synthetic answers) and a new user message; every request carries
the session id as the OpenAI `user` field and asks for a fixed number of output tokens. A session's turns
come in order, spread over the run and interleaved with other sessions'.

`chat_output_len` replaces every output length with one fixed value. For `/v1/chat/completions` the
chat and multitenant requests carry the messages and `prompt_len` counts the tokens of the chat template's rendering;
for `/v1/completions` the conversation is rendered as plain "Role: text" lines ending in
"Assistant:".
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class RequestSpec:
    """One request of the workload: prompt text (or chat messages) and how many tokens to generate."""
    prompt: str
    prompt_len: int
    output_len: int
    messages: list[dict] | None = None
    user: str | None = None              # sent as the OpenAI `user` field when set (multitenant: the session)


def range_bounds(length: int, ratio: float) -> tuple[int, int]:
    """[L*(1-r), L*(1+r)] as integers, at least 1 (as vLLM)."""
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))


def _random_text(tok, rng: random.Random, n: int) -> str:
    """Text that encodes to about `n` tokens, from random token ids."""
    vocab = tok.vocab_size
    ids = [rng.randrange(vocab) for _ in range(n)]
    text = ""
    for _ in range(8):
        text = tok.decode(ids)
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) == n:
            break
        if len(ids) > n:
            ids = ids[:n]
        else:
            ids = ids + [rng.randrange(vocab) for _ in range(n - len(ids))]
    return text


def sample_random(tok, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                  seed: int = 0) -> list[RequestSpec]:
    """vLLM's random dataset: random-token prompts of about `input_len` tokens."""
    rng = random.Random(seed)
    in_lo, in_hi = range_bounds(input_len, range_ratio)
    out_lo, out_hi = range_bounds(output_len, range_ratio)
    lens = [(rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)) for _ in range(num_prompts)]
    specs = []
    for n_in, n_out in lens:
        text = _random_text(tok, rng, n_in)
        specs.append(RequestSpec(text, len(tok.encode(text)), n_out))
    return specs


# ---- chat mix ----------------------------------------------------------------------------------------

_WORDS = ("time year people way day man thing woman life child world school state family student group "
          "country problem hand part place case week company system program question work government "
          "number night point home water room mother area money story fact month lot right study book "
          "eye job word business issue side kind head house service friend father power hour game line "
          "end member law car city community name president team minute idea kid body information back "
          "parent face others level office door health person art war history party result change "
          "morning reason research girl guy moment air teacher force education river garden market "
          "light music energy bridge forest village engine signal cloud harbor library winter summer "
          "simple quick careful bright quiet strong early late small large local public").split()
_TOPICS = ("photosynthesis", "the water cycle", "the French Revolution", "black holes", "compound interest",
           "the printing press", "plate tectonics", "vaccines", "the Roman Empire", "machine learning",
           "supply and demand", "the immune system", "volcanoes", "the Silk Road", "electric motors",
           "climate zones", "the human heart", "prime numbers", "jazz music", "coral reefs",
           "the internet", "bees", "tides", "the Renaissance", "solar panels", "glaciers", "democracy",
           "sourdough bread", "chess openings", "the speed of light")
_QUESTIONS = ("What is {t}?", "Why does {t} matter?", "Explain {t} in one sentence.",
              "Who first studied {t}?", "How would you describe {t} to a child?",
              "Give me three facts about {t}.", "What is the most surprising thing about {t}?")
_INSTRUCTIONS = ("Summarize the following text.", "Rewrite the text below in a formal tone.",
                 "List the three main points of this passage.", "Write a short title for this paragraph.",
                 "Explain the passage below to a ten-year-old.", "Find the weakest argument in this text.")
_FOLLOW_UPS = ("Can you say more about that?", "How does this relate to {t}?", "What should I read next?",
               "Can you give an example?", "Is there a common misconception here?")
_BRIEF_SYSTEM = "You are a helpful assistant."


def _sentences(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    out, i = [], 0
    while i < len(words):
        k = rng.randint(6, 14)
        chunk = words[i:i + k]
        out.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) + "." if len(chunk) > 1
                   else chunk[0].capitalize() + ".")
        i += k
    return " ".join(out)


def _shared_system_prompt() -> str:
    """~300 tokens, identical in every long-context request (fixed seed, independent of the workload's)."""
    head = ("You are a careful and friendly assistant for a public library. Answer questions clearly, "
            "cite the shelf section when you recommend a book, and keep answers short unless asked "
            "for detail. If you are not sure, say so. Library notes follow. ")
    return head + _sentences(random.Random(1234), 220)


def _chat_conversation(rng: random.Random) -> tuple[list[dict], tuple[int, int]]:
    """One conversation of the mix and its output-length range."""
    kind = rng.random()
    topic = rng.choice(_TOPICS)
    if kind < 0.45:
        return [{"role": "user", "content": rng.choice(_QUESTIONS).format(t=topic)}], (16, 64)
    if kind < 0.80:
        text = rng.choice(_INSTRUCTIONS) + "\n\n" + _sentences(rng, rng.randint(50, 150))
        return [{"role": "system", "content": _BRIEF_SYSTEM}, {"role": "user", "content": text}], (64, 160)
    messages = [{"role": "system", "content": _shared_system_prompt()}]
    for _ in range(rng.randint(1, 4)):
        question = rng.choice(_QUESTIONS).format(t=rng.choice(_TOPICS))
        messages.append({"role": "user", "content": question + " " + _sentences(rng, rng.randint(20, 50))})
        messages.append({"role": "assistant", "content": _sentences(rng, rng.randint(30, 80))})
    messages.append({"role": "user", "content": rng.choice(_FOLLOW_UPS).format(t=topic)})
    return messages, (32, 128)


def render_plain(messages: list[dict]) -> str:
    """A conversation as plain text for /v1/completions."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\nAssistant:"


def sample_chat(tok, num_prompts: int, seed: int = 0, output_len: int | None = None,
                chat: bool = True) -> list[RequestSpec]:
    """The synthetic chat mix (see the module docstring); `chat=False` renders it as plain text."""
    rng = random.Random(seed)
    specs = []
    for _ in range(num_prompts):
        messages, (lo, hi) = _chat_conversation(rng)
        n_out = rng.randint(lo, hi)
        text = render_plain(messages)
        if chat:
            n_in = len(tok.encode_chat(messages)[1]) if tok.chat_template else len(tok.encode(text))
            specs.append(RequestSpec(text, n_in, output_len or n_out, messages))
        else:
            specs.append(RequestSpec(text, len(tok.encode(text)), output_len or n_out))
    return specs


# ---- multi-tenant sessions ---------------------------------------------------------------------------

_TENANTS = ("Northwind Bank", "Brightside Health", "Atlas Logistics", "Juniper Schools", "Harbor Insurance",
            "Cedar Travel", "Orbit Telecom", "Maple Grocers", "Summit Legal", "Riverbend City Council",
            "Pioneer Energy", "Lumen Software")
_ROLES = ("customer support assistant", "help-desk agent", "internal knowledge assistant", "front-desk assistant",
          "policy assistant", "booking assistant")


def _tenant_system_prompt(tok, tenant: int, n_tokens: int) -> str:
    """Tenant `tenant`'s system prompt: a tenant-specific head, then policy notes, about `n_tokens` tokens
    (whole sentences; deterministic for the tenant and length, independent of the workload's seed)."""
    rng = random.Random(7919 * (tenant + 1) + n_tokens)
    name = _TENANTS[tenant % len(_TENANTS)] + (f" {tenant // len(_TENANTS) + 1}" if tenant >= len(_TENANTS) else "")
    text = (f"You are the {rng.choice(_ROLES)} of {name}. Answer in a friendly, concise way, follow the "
            f"policies below exactly, never invent account details, and hand over to a person when asked. "
            f"Policies and notes of {name} follow.")
    while len(tok.encode(text, add_special_tokens=False)) < n_tokens:
        text += " " + _sentences(rng, 12)
    return text


def sample_multitenant(tok, num_sessions: int, turns: int = 4, tenants: int = 6, output_len: int = 32,
                       seed: int = 0, chat: bool = True, system_len: tuple[int, int] = (300, 600),
                       user_words: tuple[int, int] = (15, 45), answer_words: tuple[int, int] = (30, 90),
                       ) -> list[RequestSpec]:
    """Multi-tenant multi-turn sessions, every request tagged with its session (`RequestSpec.user`).

    `tenants` system prompts of `system_len` tokens (uniform); each of `num_sessions` sessions belongs to a
    tenant (tenants dealt in turn, then shuffled) and has `turns` turns. Turn k's prompt is the tenant's
    system prompt, the session's k-1 earlier turns (user message, then a fixed synthetic assistant answer
    of `answer_words` words) and a new user message (a question plus `user_words` words); every request
    asks for `output_len` tokens. So a session's turn k+1 starts with the whole of its turn k's prompt,
    and every session of a tenant starts with the tenant's system prompt.

    Order: each session starts at a point u ~ U(0, 0.5) of the run and its turns follow at a stride
    ~ U(0.8, 1) * (1 - u) / turns; the requests are sorted by that key, so a session's turns come in
    order, spread over the run, interleaved with other sessions'. Deterministic for `seed`."""
    if num_sessions < 1 or turns < 1 or tenants < 1 or output_len < 1:
        raise ValueError(f"num_sessions, turns, tenants and output_len must be >= 1, got "
                         f"{num_sessions}, {turns}, {tenants}, {output_len}")
    rng = random.Random(seed)
    systems = [_tenant_system_prompt(tok, t, rng.randint(*system_len)) for t in range(tenants)]
    owners = [s % tenants for s in range(num_sessions)]
    rng.shuffle(owners)
    keyed = []
    for s, tenant in enumerate(owners):
        user = f"t{tenant}-s{s}"
        start = rng.uniform(0.0, 0.5)
        stride = rng.uniform(0.8, 1.0) * (1.0 - start) / turns
        messages = [{"role": "system", "content": systems[tenant]}]
        for k in range(turns):
            question = rng.choice(_QUESTIONS).format(t=rng.choice(_TOPICS))
            messages.append({"role": "user",
                             "content": question + " " + _sentences(rng, rng.randint(*user_words))})
            turn = list(messages)
            text = render_plain(turn)
            if chat:
                n_in = len(tok.encode_chat(turn)[1]) if tok.chat_template else len(tok.encode(text))
                spec = RequestSpec(text, n_in, output_len, turn, user=user)
            else:
                spec = RequestSpec(text, len(tok.encode(text)), output_len, user=user)
            keyed.append((start + k * stride, s, k, spec))
            messages.append({"role": "assistant", "content": _sentences(rng, rng.randint(*answer_words))})
    keyed.sort(key=lambda x: x[:3])
    return [spec for *_, spec in keyed]
