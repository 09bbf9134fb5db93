"""A deterministic, varied set of instruction prompts whose natural answers are short, medium or long.

Prompts are templates x topics. Each template has a `kind`:
  short:  one word, yes/no, a synonym, a number, a letter;
  medium: two-sentence summaries, a short paragraph, a haiku, three facts;
  long:   detailed essays, step-by-step explanations, stories, lists of 20 items, code.
Topics are plain nouns, so that every template reads naturally with every topic. The topics are split
once and for all between "train" and "test" (every fourth topic is a test topic), so no prompt of the
test split shares its topic with a training prompt.

`make_items(n, seed, split)` returns `PromptItem`s (chat messages, kind, template, topic);
`make_prompts(n, seed, split)` returns only the chat messages lists, in the same order. Used to train and
evaluate the length predictor (kvflow/predict/train.py) and to build "short questions vs long
generations" mixes for scheduling benchmarks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SHORT = [
    "In one word, what colour do you most associate with a {t}? Reply with the word only.",
    "Answer only yes or no: is a {t} usually bigger than a shoebox?",
    "Give a single synonym for the word '{t}'. Reply with the word only.",
    "How many letters are in the word '{t}'? Reply with a number only.",
    "What is the plural of '{t}'? Answer with one word.",
    "What is the first letter of the word '{t}'? Answer with one letter.",
    "On a scale of 1 to 10, how useful is a {t} in daily life? Reply with just the number.",
    "Name one word that rhymes with '{t}'. Only the word, nothing else.",
    "Translate the word '{t}' into French. Reply with the translation only.",
    "True or false: a {t} can be found in most homes. Answer with one word.",
    "Which category fits '{t}' best: animal, object, place, food, or idea? Answer with one word.",
    "Is '{t}' a noun? Answer yes or no.",
    "Answer with a single word: is a {t} alive or not alive?",
    "Roughly how many kilograms does a typical {t} weigh? Reply with a number only.",
]

MEDIUM = [
    "Summarize what a {t} is in two sentences.",
    "Write a short paragraph about the {t}.",
    "Give three quick facts about the {t}, one short line each.",
    "In two or three sentences, explain why people care about the {t}.",
    "Write a haiku about a {t}.",
    "Describe a {t} to a five-year-old in a few sentences.",
    "Write a one-paragraph product description for a {t}.",
]

LONG = [
    "Write a detailed essay about the {t}, with an introduction, several body paragraphs and a conclusion.",
    "Explain step by step, in detail, how a {t} works or is made.",
    "Write a long story in which a {t} plays a central role. Give the characters names and dialogue.",
    "List 20 interesting facts about the {t}, numbered from 1 to 20, with a sentence of explanation each.",
    "Write a Python program that simulates a {t}, with classes, comments explaining each part, and an "
    "example of use.",
    "Write a comprehensive beginner's guide to the {t}, with sections, headings and examples.",
    "Compare the {t} with two related things in a detailed analysis of at least five paragraphs.",
    "Write a detailed lesson plan for teaching a class about the {t}, with goals, activities and a quiz.",
    "Describe the history of the {t} from its origins to today, in detail.",
]

TEMPLATES: dict[str, list[str]] = {"short": SHORT, "medium": MEDIUM, "long": LONG}

TOPICS = [
    "river", "bicycle", "coffee", "volcano", "library", "guitar", "umbrella", "telescope", "bridge", "forest",
    "camera", "lighthouse", "honey", "glacier", "castle", "piano", "tomato", "submarine", "desert", "clock",
    "penguin", "candle", "satellite", "garden", "train", "mountain", "violin", "compass", "bakery", "island",
    "computer", "rainbow", "elephant", "kite", "hospital", "microscope", "orange", "tornado", "museum", "pencil",
    "dolphin", "windmill", "cheese", "airport", "butterfly", "hammer", "lake", "robot", "chocolate", "tree",
    "owl", "battery", "market", "snowflake", "helicopter", "mirror", "bread", "cave", "whale", "lantern",
    "spider", "newspaper", "farm", "diamond", "bee", "tractor", "ocean", "wallet", "moon", "sandwich",
    "horse", "keyboard", "school", "pyramid", "apple", "rocket", "beach", "printer", "fox", "chair",
    "tea", "stadium", "magnet", "cloud", "shark", "backpack", "city", "carrot", "bell", "tiger",
    "ship", "blanket", "planet", "rice", "lion", "thermometer", "village", "potato", "eagle", "ladder",
    "salt", "engine", "jungle", "book", "wolf", "bottle", "storm", "mushroom", "car", "spoon",
    "frog", "phone", "waterfall", "pizza", "turtle", "door", "star", "garlic", "bus", "shoe",
]

TEST_TOPICS = TOPICS[::4]
TRAIN_TOPICS = [t for i, t in enumerate(TOPICS) if i % 4]


@dataclass(frozen=True)
class PromptItem:
    messages: list[dict]      # [{"role": "user", "content": ...}]
    kind: str                 # "short", "medium" or "long": what the template asks for
    template: int             # the template's index in TEMPLATES[kind]
    topic: str

    @property
    def text(self) -> str:
        return self.messages[0]["content"]


def make_items(n: int, seed: int = 0, split: str = "train",
               kinds: dict[str, float] | None = None) -> list[PromptItem]:
    """`n` prompts of `split`'s topics, kinds drawn with the weights `kinds` (default: 40% short,
    20% medium, 40% long). Each (template, topic) pair is used once before any is repeated.
    Deterministic in (n, seed, split, kinds)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kinds = kinds or {"short": 0.4, "medium": 0.2, "long": 0.4}
    rng = random.Random(f"{seed}-{split}")
    topics = TRAIN_TOPICS if split == "train" else TEST_TOPICS
    # per kind, a shuffled deck of its (template, topic) pairs, reshuffled when used up
    decks: dict[str, list[tuple[int, str]]] = {k: [] for k in kinds}
    names, weights = list(kinds), [kinds[k] for k in kinds]
    items = []
    for _ in range(n):
        kind = rng.choices(names, weights)[0]
        if not decks[kind]:
            decks[kind] = [(i, t) for i in range(len(TEMPLATES[kind])) for t in topics]
            rng.shuffle(decks[kind])
        i, topic = decks[kind].pop()
        content = TEMPLATES[kind][i].format(t=topic)
        items.append(PromptItem([{"role": "user", "content": content}], kind, i, topic))
    return items


def make_prompts(n: int, seed: int = 0, split: str = "train",
                 kinds: dict[str, float] | None = None) -> list[list[dict]]:
    """The chat messages lists of `make_items(n, seed, split, kinds)` (the same prompts, in order)."""
    return [it.messages for it in make_items(n, seed, split, kinds)]
