"""The embedded multi-turn worlds: turn logic for `textenv.multiturn.MultiTurnEnv`, offline, each with a gold score
and an expert that writes demonstrations (so that SFT can teach the format).

- `GuessNumber`: the env thinks of a number and answers each guess with "higher" or "lower".
- `Calculator`: an arithmetic question; the agent may call a calculator, `<calc>17*23</calc>`, whose result the
  env returns as a tool message, before it answers `answer: 396`.
"""

from __future__ import annotations

import operator
import re

import numpy as np

_INT = re.compile(r"-?\d+")


class GuessNumber:
    """Guess a number in [low, high]: reward 1.0 on the turn that names it (the episode ends), else 0 and a hint.
    Gold: 1.0 if the conversation found the number. The expert bisects, so it needs at most ceil(log2(n)) + 1
    turns; with the defaults (1 to 16, 8 turns) every episode can be solved."""

    def __init__(self, low: int = 1, high: int = 16):
        if not low < high:
            raise ValueError(f"GuessNumber needs low < high, got low={low}, high={high}")
        self.low, self.high, self.secret = int(low), int(high), None

    def start(self, rng: np.random.Generator) -> list[dict]:
        self.secret = int(rng.integers(self.low, self.high + 1))
        return [{"role": "system", "content": f"Guess my number from {self.low} to {self.high}. Answer with a number."}]

    def respond(self, messages: list[dict]) -> dict:
        found = _INT.findall(messages[-1]["content"])
        if not found:
            return {"message": {"role": "user", "content": "Answer with a number."}}
        guess = int(found[0])
        if guess == self.secret:
            return {"reward": 1.0, "done": True}
        return {"message": {"role": "user", "content": "higher" if guess < self.secret else "lower"}}

    def gold(self, messages: list[dict]) -> float:
        """1.0 if the conversation's last agent turn named the number (call after the episode, same object)."""
        found = _INT.findall(messages[-1]["content"]) if messages[-1]["role"] == "assistant" else []
        return float(bool(found) and int(found[0]) == self.secret)

    def demonstration(self, rng: np.random.Generator) -> list[dict]:
        """An expert's conversation: bisection until the number is found."""
        messages, lo, hi = self.start(rng), self.low, self.high
        while True:
            guess = (lo + hi) // 2
            messages.append({"role": "assistant", "content": str(guess)})
            reply = self.respond(messages)
            if reply.get("done"):
                return messages
            messages.append(reply["message"])
            lo, hi = (guess + 1, hi) if reply["message"]["content"] == "higher" else (lo, guess - 1)


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_CALL = re.compile(r"<calc>\s*(-?\d+(?:\s*[-+*]\s*-?\d+)*)\s*</calc>")
_ANSWER = re.compile(r"answer:\s*(-?\d+)")


class Calculator:
    """Arithmetic with a calculator tool: "What is a op b op c?" (two operations of +, -, *; operands 2 to 99).
    The agent may call `<calc>expression</calc>` (integers with + - * only); the env answers with a tool message
    "= value". `answer: N` ends the episode with reward 1.0 if N is right, else 0.0; a turn with neither gets a
    reminder. Gold: the final answer's correctness.

    The expert writes `<calc> a op b op c</calc>` and `answer: value`: a number the agent copies then has a space
    before it where it is copied from and where it is written, so (with a GPT-2-style pre-tokenizer) its tokens are
    the same in both places, and the copy is one of tokens, not of text across two tokenizations.

    `demo_tool_rate`: the fraction of the expert's demonstrations that use the calculator. The others answer from
    memory with a precedence slip (left to right: 2+3*4 = 20), as a demonstrator who trusts his head half the time
    would: SFT then learns a policy that sometimes skips the tool, and RL has the tool's use to learn."""

    def __init__(self, max_operand: int = 99, demo_tool_rate: float = 1.0):
        if not 0.0 <= demo_tool_rate <= 1.0:
            raise ValueError(f"demo_tool_rate must be in [0, 1], got {demo_tool_rate!r}")
        self.max_operand, self.demo_tool_rate, self.question, self.value = int(max_operand), demo_tool_rate, None, None

    def start(self, rng: np.random.Generator) -> list[dict]:
        a, b, c = (int(x) for x in rng.integers(2, self.max_operand + 1, size=3))
        op1, op2 = (str(o) for o in rng.choice(["+", "-", "*"], size=2))
        self.question = f"{a}{op1}{b}{op2}{c}"
        self.value = _evaluate(self.question)
        return [{"role": "system", "content": "Use <calc>expression</calc> to compute, then reply answer: number."},
                {"role": "user", "content": f"What is {self.question}?"}]

    def respond(self, messages: list[dict]) -> dict:
        text = messages[-1]["content"]
        answer = _ANSWER.search(text)
        if answer:
            return {"reward": float(int(answer.group(1)) == self.value), "done": True}
        call = _CALL.search(text)
        if call:
            return {"message": {"role": "tool", "content": f"= {_evaluate(call.group(1))}"}}
        return {"message": {"role": "user", "content": "Use <calc>expression</calc> or reply answer: number."}}

    def gold(self, messages: list[dict]) -> float:
        """1.0 if the conversation's final answer is the question's value (call after the episode, same object)."""
        answer = _ANSWER.search(messages[-1]["content"]) if messages[-1]["role"] == "assistant" else None
        return float(answer is not None and int(answer.group(1)) == self.value)

    def demonstration(self, rng: np.random.Generator) -> list[dict]:
        """An expert's conversation: one calculator call, then the answer it returned (or, 1 - demo_tool_rate of the
        time, an answer from memory, computed left to right)."""
        messages = self.start(rng)
        if rng.random() >= self.demo_tool_rate:
            a, op1, b, op2, c = re.findall(r"\d+|[-+*]", self.question)
            guess = _OPS[op2](_OPS[op1](int(a), int(b)), int(c))  # left to right: the slip
            messages.append({"role": "assistant", "content": f"answer: {guess}"})
            return messages
        messages.append({"role": "assistant", "content": f"<calc> {self.question}</calc>"})
        messages.append(self.respond(messages)["message"])
        messages.append({"role": "assistant", "content": f"answer: {self.value}"})
        return messages


def _evaluate(expression: str) -> int:
    """An integer expression of + - * with the usual precedence, without eval()."""
    tokens = re.findall(r"\d+|[-+*]", expression.replace(" ", ""))
    terms, sign, product, expect_number, negative = [], 1, None, True, False
    for tok in tokens:
        if expect_number:
            if tok == "-":
                negative = not negative
                continue
            value = -int(tok) if negative else int(tok)
            product = value if product is None else product * value
            negative, expect_number = False, False
        elif tok == "*":
            expect_number = True
        else:
            terms.append(sign * product)
            sign, product, expect_number = (1 if tok == "+" else -1), None, True
    terms.append(sign * product)
    return sum(terms)
