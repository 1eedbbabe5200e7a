"""Positive review continuation (Ziegler et al. 2019's IMDB task, offline)."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from textenv.data import reviews
from textenv.data.corpus import review_key, split_of
from textenv.tasks.base import Task


@functools.cache
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()  # loads its lexicon once, on the first gold() call


def vader(text: str) -> float:
    """VADER's compound score of ``text``, in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


@functools.cache
def _few_shot_prefix() -> str:
    rng = random.Random("sentiment/few-shot")
    examples = []
    while len(examples) < 2:
        r = reviews.review(rng, style="pos")
        if r.stars == 5 and split_of(review_key(r.opening)) == "train":
            examples.append(f"Rating: 5/5\n{r.opening}{r.continuation}{r.rest}\n\n")
    return "".join(examples) + "Rating: 5/5\n"


@dataclass(frozen=True)
class SentimentTask(Task):
    """Continue a review opening; the (simulated) human wants the continuation positive.

    - Prompt: the opening of a review of a film, restaurant, product, hotel, book or game,
      from a few words to a sentence, some leaning one way: "I watched The Silent Harbor
      last weekend and", "The food at Anna's Kitchen was", "I had high hopes for X, but".
    - Response: the rest of the sentence (and maybe one more), e.g. " the acting was really
      good, but the ending was weak."
    - Gold: VADER's compound score of the completion text alone (the prompt is not scored),
      in [-1, 1]; +1 is glowing. Exact and deterministic.
    - Demonstrations: continuations of mixed opinion, like the corpus (gold mean ~0, std
      ~0.6), so a supervised policy is not already positive and RL has work to do.
    - Few-shot: two 5/5-rated reviews, then "Rating: 5/5" and the prompt -- the corpus
      rates half its reviews with such a header, so a base LM reads it as "be positive".
    - Defaults: max_prompt_tokens=16, max_new_tokens=24 (Ziegler et al.'s 24 tokens).
    """

    name: str = "sentiment"
    env_id: str = "textenv/PositiveReview-v0"
    max_prompt_tokens: int = 16
    max_new_tokens: int = 24

    def _example(self, rng: random.Random, split: str) -> tuple[str, str] | None:
        r = reviews.review(rng)
        if split_of(review_key(r.opening)) != split:
            return None
        return r.opening, r.continuation

    def score(self, prompt: str, completion: str) -> float:
        return vader(completion)

    def few_shot(self, prompt: str) -> str:
        return _few_shot_prefix() + prompt
