"""CommonGen-like constrained generation: one sentence that uses three given words."""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from textenv.data import scenes
from textenv.data.corpus import concept_key, concepts_in_train, split_of
from textenv.tasks.base import Task

_CONCEPTS = re.compile(r"Words: ([^.\n]*)\. Sentence:")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
# Closed-class words; a real sentence has some (a bag of nouns has none).
FUNCTION_WORDS = frozenset(
    "a an the some two three this that these those in on at near by of to with and or but from "
    "into onto over under after before during is are was were be been it its he she they his her "
    "their him them there then while as for not no".split())
MIN_WORDS, MAX_WORDS = 4, 20
MIN_FUNCTION_SHARE = 0.25
_PUNCTUATION = frozenset(".,!?'-;:\"")


def concepts_of(prompt: str) -> list[str]:
    """The concept words of the last "Words: a, b, c. Sentence:" in ``prompt``."""
    found = _CONCEPTS.findall(prompt)
    if not found:
        raise ValueError(f"no 'Words: ... Sentence:' in prompt {prompt!r}")
    return [c.strip().lower() for c in found[-1].split(",") if c.strip()]


def inflections(word: str) -> frozenset[str]:
    """``word`` and its regular plural/-s, -ing and -ed forms (dog->dogs, run->running, chase->chased)."""
    forms = {word, word + "s", word + "es", word + "ing", word + "ed", word + "d",
             word + word[-1] + "ing", word + word[-1] + "ed"}
    if word.endswith("e"):
        forms.add(word[:-1] + "ing")
    if word.endswith("y"):
        forms |= {word[:-1] + "ies", word[:-1] + "ied"}
    return frozenset(forms)


def coverage(concepts: list[str], line: str) -> float:
    """Fraction of ``concepts`` present in ``line`` as whole words (case-insensitive, inflected)."""
    words = set(_WORD.findall(line.lower()))
    return sum(1 for c in concepts if words & inflections(c)) / len(concepts)


def fluency(line: str) -> float:
    """Product of four factors in [0, 1]; 1.0 for a plain sentence of 4..20 words.

    - length: 1 for 4..20 words; n/4 below (0 for no words); max(0, 1 - (n-20)/20) above.
    - distinct: distinct / total over non-function words (repeating "dog dog" costs).
    - grammar: min(1, share of function words / 0.25) (a list of nouns scores 0).
    - clean: share of non-space characters that are letters or . , ! ? ' - ; : "
    """
    words = _WORD.findall(line.lower())
    n = len(words)
    if n == 0:
        return 0.0
    if n < MIN_WORDS:
        length = n / MIN_WORDS
    elif n > MAX_WORDS:
        length = max(0.0, 1 - (n - MAX_WORDS) / MAX_WORDS)
    else:
        length = 1.0
    content = [w for w in words if w not in FUNCTION_WORDS]
    distinct = len(set(content)) / len(content) if content else 1.0
    grammar = min(1.0, (n - len(content)) / n / MIN_FUNCTION_SHARE)
    chars = [ch for ch in line if not ch.isspace()]
    clean = sum(1 for ch in chars if ch.isalpha() or ch in _PUNCTUATION) / len(chars)
    return length * distinct * grammar * clean


@functools.cache
def _few_shot_prefix() -> str:
    rng = random.Random("commongen/few-shot")
    lines = []
    while len(lines) < 3:
        example = CommonGenTask()._example(rng, "train")
        if example is not None:
            lines.append(f"{example[0]}{example[1]}\n")
    return "".join(lines)


@dataclass(frozen=True)
class CommonGenTask(Task):
    """Write one sentence that uses three given concept words.

    - Prompt: "Words: dog, ball, park. Sentence:" -- three base-form concepts (people,
      animals, verbs, objects, places) of a scene, in random order. Splits are by concept
      set; no valid/test triple ever appears together in the corpus or in train data.
    - Response: " A dog chases a red ball in the park." -- one line.
    - Gold, on the completion's first line only (text before the first newline):
      ``coverage * fluency`` in [0, 1], where coverage is the fraction of concepts present
      as whole words (case-insensitive; regular plural/-s, -ing and -ed forms count, e.g.
      dog->dogs, run->running, chase->chased, berry->berries; irregular forms do not) and
      fluency is the product of the length, distinct, grammar and clean factors of
      ``fluency()``. Demonstrations score 1.0.
    - Few-shot: three solved train prompts, one per line, then the prompt.
    - Defaults: max_prompt_tokens=24, max_new_tokens=24.
    """

    name: str = "commongen"
    env_id: str = "textenv/CommonGen-v0"
    max_prompt_tokens: int = 24
    max_new_tokens: int = 24

    def _example(self, rng: random.Random, split: str) -> tuple[str, str] | None:
        sentence, all_concepts = scenes.scene(rng)
        concepts = rng.sample(all_concepts, 3)
        if split_of(concept_key(concepts)) != split:
            return None
        # train text must not hold a held-out triple among its other words either
        if split == "train" and not concepts_in_train(all_concepts):
            return None
        return scenes.concept_prompt(concepts), " " + sentence

    def score(self, prompt: str, completion: str) -> float:
        line = completion.split("\n", 1)[0]
        return coverage(concepts_of(prompt), line) * fluency(line)

    def few_shot(self, prompt: str) -> str:
        return _few_shot_prefix() + prompt
