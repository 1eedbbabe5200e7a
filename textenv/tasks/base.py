"""The one interface shared by the pipeline, the env and the benchmarks: an embedded `Task`."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

SPLITS = ("train", "valid", "test")
# Default pool sizes: a few thousand items to tune on, a few hundred to select and evaluate on.
POOL_SIZES = {"train": 4000, "valid": 500, "test": 500}


@dataclass(frozen=True)
class Task(ABC):
    """An offline task: a prompt distribution, demonstrations and a gold ("human") reward.

    - ``prompts(split, n, seed)``: ``n`` distinct prompt strings of ``split`` ("train",
      "valid" or "test"; defaults 4000/500/500). The splits are disjoint whatever the seeds:
      an item's split is a fixed function of its key (``textenv.data.corpus.split_of``),
      and draws from other splits are skipped. Same arguments, same list.
    - ``demonstrations(split, n, seed)``: ``n`` dicts ``{"prompt": str, "response": str}``
      with distinct prompts, written by the same generators as the pretraining corpus;
      ``prompt + response`` is the demonstrated text. For SFT.
    - ``gold(prompts, completions, **kwargs)``: one Python float per pair; the simulated
      human or exact rule, in the reward protocol of ``rewards.base`` (kwargs are ignored).
      A completion is the generated text only, without the prompt.
    - ``few_shot(prompt)``: the prompt wrapped in a document that steers a base (pretrained
      only) LM into the task, GPT-2 style; its continuation is scored like a completion.

    ``max_prompt_tokens`` and ``max_new_tokens`` are the env's default budgets in tokens.
    A subclass implements ``_example``, ``score`` and ``few_shot``.
    """

    name: str
    env_id: str
    max_prompt_tokens: int
    max_new_tokens: int

    @abstractmethod
    def _example(self, rng: random.Random, split: str) -> tuple[str, str] | None:
        """One (prompt, response) draw, or None when the draw belongs to another split."""

    @abstractmethod
    def score(self, prompt: str, completion: str) -> float:
        """The gold score of one completion."""

    @abstractmethod
    def few_shot(self, prompt: str) -> str:
        """A document-style prompt that makes a base LM do the task."""

    def prompts(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[str]:
        return [prompt for prompt, _ in self._draw("prompts", split, n, seed)]

    def demonstrations(self, split: str = "train", n: int | None = None,
                       seed: int = 0) -> list[dict[str, str]]:
        return [{"prompt": p, "response": r} for p, r in self._draw("demonstrations", split, n, seed)]

    def gold(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        if isinstance(prompts, str) or isinstance(completions, str):
            raise TypeError("gold() takes lists of strings (one per sample), got a str")
        if len(prompts) != len(completions):
            raise ValueError(f"gold() got {len(prompts)} prompts but {len(completions)} completions")
        return [float(self.score(p, c)) for p, c in zip(prompts, completions)]

    def _draw(self, stream: str, split: str, n: int | None, seed: int) -> list[tuple[str, str]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        n = POOL_SIZES[split] if n is None else n
        if not isinstance(n, int):
            raise TypeError(f"n must be an int or None, got {n!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        # A str seed is hashed with sha512 by random.Random: stable across runs and platforms,
        # and prompts/demonstrations come from independent streams.
        rng = random.Random(f"{self.name}/{stream}/{split}/{seed}")
        out: dict[str, str] = {}
        for _ in range(100 * n + 10_000):  # bound: a split's universe of distinct prompts may be small
            example = self._example(rng, split)
            if example is not None and example[0] not in out:
                out[example[0]] = example[1]
                if len(out) == n:
                    return list(out.items())
        raise ValueError(f"task {self.name!r} found only {len(out)} distinct {split} prompts, "
                         f"fewer than n={n}")
