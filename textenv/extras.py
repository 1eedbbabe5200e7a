"""Environments people already have, as turn logic for `MultiTurnEnv` (optional extras).

- `TextArenaGame`: a single-player TextArena game (`pip install 'textenv[textarena]'`); registered as
  ``textenv/TextArena-v0`` (GuessTheNumber-v0 unless ``turn_kwargs={"game": ...}`` names another).
- `ReasoningGymTask`: one of reasoning-gym's procedural datasets as a verifiable task (`pip install
  'textenv[reasoning-gym]'`); registered as ``textenv/ReasoningGym-v0`` (basic_arithmetic unless told otherwise).

Both are plain clients of `textenv.multiturn.Turns` (`start(rng)`, `respond(messages)`): the env, its token
stream, chat template, limits and checks are `MultiTurnEnv`'s, as for any user's turn logic.
"""

from __future__ import annotations

import importlib
import random
from contextlib import contextmanager

import numpy as np


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0]:
            raise
        raise ModuleNotFoundError(f"{module} is not installed: pip install 'textenv[{extra}]'") from None


class TextArenaGame:
    """A single-player TextArena game (https://github.com/LeonGuertler/TextArena) as turn logic.

    The opening is the game's prompt as a user message; each agent turn is the game's action (the whole reply:
    TextArena's games find their move in it, e.g. "[5]"); the env's reply is what the game then tells the player
    (hints, invalid-move notices), joined into one user message. The game's final reward is paid on the turn that
    ends it; every other turn pays 0. The game is made unwrapped, so each reply holds only what is new (TextArena's
    default wrappers would resend the whole history as one observation).

    TextArena games draw from Python's global `random`, which their reset seeds. Every call into the game here runs
    on the episode's own `random` state, so sub-envs of a vector env do not share one stream and the caller's
    `random` is left as it was: `reset(seed=s)` replays the game exactly.
    """

    def __init__(self, game: str = "GuessTheNumber-v0", **game_kwargs):
        ta = _require("textarena", "textarena")
        if not isinstance(game, str) or game not in ta.envs.registration.ENV_REGISTRY:
            raise ValueError(f"game={game!r} is not a TextArena env id (e.g. 'GuessTheNumber-v0', 'TowerOfHanoi-v0'"
                             ", 'FrozenLake-v0'; textarena.envs.registration.ENV_REGISTRY lists them)")
        self.game, self.game_kwargs = game, dict(game_kwargs)
        self._env, self._random = None, None  # the game being played and its `random` state

    @contextmanager
    def _own_random(self):
        outside = random.getstate()
        random.setstate(self._random)
        try:
            yield
        finally:
            self._random = random.getstate()
            random.setstate(outside)

    def start(self, rng: np.random.Generator) -> list[dict]:
        ta = _require("textarena", "textarena")  # not kept on self: a module does not pickle
        env = ta.make(self.game, **self.game_kwargs)
        while isinstance(env, ta.Wrapper):
            env = env.env
        self._env, self._random = env, random.Random(int(rng.integers(2**31))).getstate()
        with self._own_random():
            try:
                env.reset(num_players=1, seed=int(rng.integers(2**31)))
            except (AssertionError, ValueError) as exc:
                raise ValueError(f"TextArena game {self.game!r} cannot be played by one player ({exc})") from None
            _, observation = env.get_observation()
        return [{"role": "user", "content": self._text(observation)}]

    def respond(self, messages: list[dict]) -> dict:
        with self._own_random():
            done, _ = self._env.step(action=messages[-1]["content"])
            if done:
                rewards, _ = self._env.close()
                return {"reward": float((rewards or {0: 0.0})[0]), "done": True}
            _, observation = self._env.get_observation()
        return {"message": {"role": "user", "content": self._text(observation)}}

    @staticmethod
    def _text(observation) -> str:
        """The game's messages to the player since its last action (the echo of that action left out)."""
        return "\n".join(message for sender, message, _ in observation if sender != 0) or "(no reply)"


class ReasoningGymTask:
    """A reasoning-gym procedural dataset (https://github.com/open-thought/reasoning-gym) as a verifiable task.

    An episode is one entry, drawn with the env's `rng` from `size` entries generated from `seed`: the question is
    the opening user message (after `system`, if given); the agent's reply is scored by the dataset's own
    `score_answer` (0 to 1). The answer is the whole reply, or with `answer_tag="answer"` the text inside its last
    <answer>...</answer>. With `attempts` > 1 a wrong answer gets "That is not correct. Try again." and another
    turn; the score of the last answer is paid when the episode ends (a correct one ends it).
    """

    def __init__(self, dataset: str = "basic_arithmetic", size: int = 10_000, seed: int = 0, attempts: int = 1,
                 answer_tag: str | None = None, system: str | None = None, **dataset_kwargs):
        rg = _require("reasoning_gym", "reasoning-gym")
        from textenv.envsetup import positive_int

        if not isinstance(dataset, str) or dataset not in rg.factory.DATASETS:
            raise ValueError(f"dataset={dataset!r} is not a reasoning-gym dataset; they are "
                             f"{sorted(rg.factory.DATASETS)}")
        self.size, self.attempts = positive_int("size", size, unit="entries"), positive_int("attempts", attempts)
        if answer_tag is not None and not (isinstance(answer_tag, str) and answer_tag.isidentifier()):
            raise ValueError(f"answer_tag must be None or a tag name such as 'answer', got {answer_tag!r}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be None or a str, got {system!r}")
        self.dataset = rg.create_dataset(dataset, size=self.size, seed=seed, **dataset_kwargs)
        self.answer_tag, self.system = answer_tag, system
        self._entry, self._tries = None, 0

    def start(self, rng: np.random.Generator) -> list[dict]:
        self._entry, self._tries = self.dataset[int(rng.integers(self.size))], 0
        opening = [{"role": "user", "content": self._entry["question"]}]
        return ([{"role": "system", "content": self.system}] if self.system else []) + opening

    def demonstration(self, rng: np.random.Generator) -> list[dict]:
        """An expert's conversation: the question, then the dataset's answer (in the answer tag, if one is set), so
        SFT can teach the format."""
        messages = self.start(rng)
        answer = self._entry["answer"]
        content = answer if self.answer_tag is None else f"<{self.answer_tag}>{answer}</{self.answer_tag}>"
        return [*messages, {"role": "assistant", "content": content}]

    def answer(self, reply: str) -> str | None:
        """The answer in an agent's reply (None: no <answer_tag> in it)."""
        if self.answer_tag is None:
            return reply.strip()
        opened, closed = f"<{self.answer_tag}>", f"</{self.answer_tag}>"
        start = reply.rfind(opened)
        end = reply.find(closed, start + len(opened)) if start >= 0 else -1
        return reply[start + len(opened) : end].strip() if end >= 0 else None

    def respond(self, messages: list[dict]) -> dict:
        self._tries += 1
        answer = self.answer(messages[-1]["content"])
        score = 0.0 if answer is None else float(self.dataset.score_answer(answer=answer, entry=self._entry))
        if score >= 1.0 or self._tries == self.attempts:
            return {"reward": score, "done": True}
        return {"message": {"role": "user", "content": "That is not correct. Try again."}}
