"""Small-number arithmetic with an exact, verifiable reward."""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from textenv.data.corpus import arithmetic_answer, arithmetic_key, arithmetic_problem, arithmetic_question, split_of
from textenv.tasks.base import Task

_QUESTION = re.compile(r"(\d+) ([+-]) (\d+) =")
_INTEGER = re.compile(r"-?\d+")


def answer_of(prompt: str) -> int:
    """The answer to the last "a op b =" question in ``prompt``."""
    questions = _QUESTION.findall(prompt)
    if not questions:
        raise ValueError(f"no 'a + b =' or 'a - b =' question in prompt {prompt!r}")
    a, op, b = questions[-1]
    return arithmetic_answer(int(a), op, int(b))


@functools.cache
def _few_shot_prefix() -> str:
    rng = random.Random("arithmetic/few-shot")
    lines = []
    while len(lines) < 4:
        a, op, b = arithmetic_problem(rng)
        if split_of(arithmetic_key(a, op, b)) == "train":
            lines.append(f"{arithmetic_question(a, op, b)} {arithmetic_answer(a, op, b)}\n")
    return "".join(lines)


@dataclass(frozen=True)
class ArithmeticTask(Task):
    """Answer an addition or subtraction question; the reward is exact.

    - Prompt: "Q: 37 + 48 =" or "Q: 52 - 7 =": operands 0..99, answers 0..198, drawn from
      six difficulty levels (1-digit + 1-digit 20%, 2-digit + 1-digit 20%, 2-digit +
      2-digit 25%, and the same for "-" at 10/10/15%) so a tiny model gets some right.
      Splits are by the ordered problem ("3 + 4" and "4 + 3" fall independently).
    - Response: " 85" -- a space and the number (the corpus's worksheet lines).
    - Gold: 1.0 if the first integer in the completion (regex ``-?\\d+``) equals the answer
      to the prompt's question, else 0.0 (also 0.0 with no integer). No partial credit.
    - Few-shot: four solved train questions, one per line, then the prompt.
    - Defaults: max_prompt_tokens=16, max_new_tokens=8.
    """

    name: str = "arithmetic"
    env_id: str = "textenv/Arithmetic-v0"
    max_prompt_tokens: int = 16
    max_new_tokens: int = 8

    def _example(self, rng: random.Random, split: str) -> tuple[str, str] | None:
        a, op, b = arithmetic_problem(rng)
        if split_of(arithmetic_key(a, op, b)) != split:
            return None
        return arithmetic_question(a, op, b), f" {arithmetic_answer(a, op, b)}"

    def score(self, prompt: str, completion: str) -> float:
        found = _INTEGER.search(completion)
        return 1.0 if found is not None and int(found.group()) == answer_of(prompt) else 0.0

    def few_shot(self, prompt: str) -> str:
        return _few_shot_prefix() + prompt
