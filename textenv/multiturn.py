"""MultiTurnEnv: an environment that answers back. One action is one token; the env's turns are the user's code."""

from __future__ import annotations

import copy
import importlib
import math
import numbers
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from rewards.base import as_reward_fn, call_reward, import_string
from textenv.chat import ChatFormat, check_message
from textenv.envsetup import MAX_TOKENS, MAX_VOCAB, check_action, check_options, positive_int
from textenv.tokenizer import load_tokenizer


class Turns(Protocol):
    """An environment's dynamics, written by its author: the opening messages, and the answer to each agent turn."""

    def start(self, rng: np.random.Generator) -> list[dict]:
        """The opening messages of a new episode ([{"role": "system" | "user", "content": str}, ...]); draw any
        randomness from `rng` (the env's `np_random`), so that `reset(seed=s)` replays the episode."""

    def respond(self, messages: list[dict]) -> dict:
        """Called when an agent turn ends; `messages` is the conversation so far (a copy), the agent's turn last.
        Returns {"message": {"role": "user" | "tool" | "system", "content": str}, "reward": float, "done": bool};
        "reward" defaults to 0.0, "done" to False, and a "message" is needed unless done."""


class TurnError(ValueError):
    """The env's turn logic raised, or returned something the env cannot use; the episode is over (reset())."""


def make_turns(turns: Any, turn_kwargs: dict | None) -> Any:
    """A turn-logic object from a class or factory (called with `turn_kwargs`), a "module:Class" string (the same,
    imported: keeps registered kwargs JSON-able), or an object with `start` and `respond`."""
    if isinstance(turns, str):
        turns = import_string(turns)
    if isinstance(turns, type) or (callable(turns) and not callable(getattr(turns, "respond", None))):
        turns = turns(**(turn_kwargs or {}))
    elif turn_kwargs:
        raise ValueError(f"turn_kwargs={turn_kwargs!r} given with a turn-logic object ({type(turns).__name__}): pass "
                         "its class or a 'module:Class' string to have it built with them")
    for method in ("start", "respond"):
        if not callable(getattr(turns, method, None)):
            raise TypeError(f"turns must have start(rng) and respond(messages) methods; {type(turns).__name__} has no "
                            f"{method}(): see textenv.multiturn.Turns")
    return turns


def multiturn_spec(env_id: str) -> gym.envs.registration.EnvSpec | None:
    """The registration of a multi-turn env id, e.g. "textenv/Calculator-v0" or a user's "module:Id" (the module is
    imported first, as `gymnasium.make` does); None for a name that is no env id (an embedded task's, "sentiment")
    or a registered env that is not a MultiTurnEnv. An unknown id raises, naming it."""
    if "/" not in env_id and ":" not in env_id:
        return None
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ValueError(f"env id {env_id!r}: cannot import module {module!r} ({exc}); it must be importable "
                             "and register the id") from None
    if name not in gym.registry:
        known = sorted(k for k, v in gym.registry.items()  # without importing every registered env's module
                       if v.entry_point == "textenv.multiturn:MultiTurnEnv" or _is_multiturn(v.entry_point, False))
        raise ValueError(f"no registered env {name!r}; the multi-turn ids are {known} (a user's own: 'module:Id', "
                         "the module registering it)")
    spec = gym.spec(name)
    return spec if _is_multiturn(spec.entry_point) else None


def _is_multiturn(entry_point, load: bool = True) -> bool:
    if isinstance(entry_point, str):
        entry_point = import_string(entry_point) if load and ":" in entry_point else None
    return isinstance(entry_point, type) and issubclass(entry_point, MultiTurnEnv)


class MultiTurnEnv(gym.Env):
    """
    ## Description
    An episode is a conversation between the agent and the env's turn logic (`turns`, the user's code: a game that
    answers each move, a tool that returns a result, a simulated user, a grader). The agent emits one token per step;
    its turn ends with the end-of-turn token (the chat template's, e.g. ChatML's `<|im_end|>`, or EOS). The env then
    calls `turns.respond(messages)`, and its reply is rendered through the tokenizer's chat template and appended to
    the token stream by the env, not as actions. The stream is exact by construction: the agent's tokens are kept as
    sampled, never re-tokenized, and the env's chunks are the template's own rendering (`textenv.chat`).

    ## Action Space
    `Discrete(V)`: the token id to append, V = `vocab_size` (default: the tokenizer's length).

    ## Observation Space
    `Dict(input_ids=Box(0, V-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64), agent_mask=Box(0, 1, (L,),
    int64))`, L = `max_tokens`. The stream is left-aligned: its n tokens fill columns [0, n) (attention_mask 1),
    PAD after; position ids are the column indices. `agent_mask` is 1 at the tokens the agent produced (its
    end-of-turn tokens included): what a trainer may train on. Everything else (the opening, the env's replies, the
    template's role markers and generation prompts) is 0.

    ## Rewards
    Per turn: the "reward" that `respond` returns, paid on the step that ends the agent's turn. At the episode's
    end, if `reward_fn` is given, its score of the whole conversation is added: `reward_fn([opening], [rest])`, the
    opening's rendered text and the rest of the stream decoded with its special tokens (what a reward model reads).
    0.0 on every other step.

    ## Starting State
    `reset()` calls `turns.start(self.np_random)` and renders its messages with the generation prompt.

    An agent turn that reaches `max_turn_tokens` without the end-of-turn token is closed by the env: it counts as a
    turn, the turn logic answers it, and the env's chunk starts with the end-of-turn token (agent_mask 0: the agent
    did not emit it).

    ## Episode End
    - Termination: `respond` returns done=True.
    - Truncation (never a crash): the agent has had `max_turns` turns; the stream is full (`max_tokens`); or the
      env's reply does not fit in the stream with room for one agent token (it is then not appended, and
      `info["messages"]` does not hold it).
    Turn logic that raises or returns a malformed reply raises `TurnError` naming it; the episode is then over and
    `reset()` starts a new one. Stepping before `reset()` or after the episode ended raises `ResetNeeded`.

    ## Info
    Every step: `{"turn": the agent turns completed}`. The last step adds `"messages"`, the conversation (the agent's
    turns as decoded text, special tokens dropped).

    ## Arguments
    - `turns`: the turn logic: a class or factory (called with `turn_kwargs`), a `"module:Class"` string, or an
      object with `start(rng)` and `respond(messages)` (`textenv.multiturn.Turns`).
    - `tokenizer`: a hub id, folder or tokenizer with a chat template and distinct PAD and EOS; default: the
      embedded tokenizer and its template (`textenv.chat.EMBEDDED_CHAT_TEMPLATE`).
    - `reward_fn`: optional, any reward `rewards.as_reward_fn` takes (a callable, "module:attr", a model folder or
      hub id, a dict of them to weights), scoring the whole conversation at the end.
    - `max_turns` (8), `max_turn_tokens` (32), `max_tokens` (256): the limits above.
    - `end_of_turn`: the token id that ends an agent turn; default: the template's (see `textenv.chat.ChatFormat`).
    - `vocab_size`, `reward_kwargs`, `turn_kwargs`, `render_mode` (None or "ansi": the stream's text).

    ## Version History
    - v0: initial release.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, turns: Any, tokenizer: Any = None, reward_fn: Any = None, max_turns: int = 8,
                 max_turn_tokens: int = 32, max_tokens: int = 256, end_of_turn: int | None = None,
                 vocab_size: int | None = None, reward_kwargs: dict | None = None, turn_kwargs: dict | None = None,
                 render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        for name, value in (("max_turns", max_turns), ("max_turn_tokens", max_turn_tokens), ("max_tokens", max_tokens)):
            positive_int(name, value, MAX_TOKENS, "tokens" if name != "max_turns" else "turns")
        self.render_mode = render_mode
        self.turns = make_turns(turns, turn_kwargs)
        if tokenizer is None:
            from textenv.embedded import default_tokenizer

            tokenizer = default_tokenizer()
        self.tokenizer = load_tokenizer(tokenizer)
        self.chat = ChatFormat(self.tokenizer, end_of_turn)
        self.reward_fn = None if reward_fn is None else as_reward_fn(reward_fn, **(reward_kwargs or {}))
        self.max_turns, self.max_turn_tokens, self.max_tokens = int(max_turns), int(max_turn_tokens), int(max_tokens)
        V = len(self.tokenizer) if vocab_size is None else positive_int("vocab_size", vocab_size, MAX_VOCAB, "ids")
        if V < len(self.tokenizer):
            raise ValueError(f"vocab_size must be an int >= the tokenizer's {len(self.tokenizer)} tokens, got {V!r}")
        self.vocab_size = int(V)
        L = self.max_tokens
        box = lambda high: spaces.Box(0, high, (L,), np.int64)  # noqa: E731
        self.observation_space = spaces.Dict(input_ids=box(V - 1), attention_mask=box(1), agent_mask=box(1))
        self.action_space = spaces.Discrete(V)
        self._ids = np.full(L, self.tokenizer.pad_token_id, dtype=np.int64)  # (L,) the stream, PAD after it
        self._agent = np.zeros(L, dtype=np.int64)  # (L,) 1 at the agent's tokens
        self._n = 0  # tokens in the stream
        self._opening = 0  # tokens of the opening (and first generation prompt)
        self._turn_start = 0  # column where the current agent turn began
        self._turn = 0  # agent turns completed
        self._messages: list[dict] = []
        self._done = True  # until reset()
        self._started = False

    def _obs(self) -> dict[str, np.ndarray]:
        mask = (np.arange(self.max_tokens) < self._n).astype(np.int64)
        return {"input_ids": self._ids.copy(), "attention_mask": mask, "agent_mask": self._agent.copy()}

    def _append(self, tokens: list[int], agent: bool) -> None:
        self._ids[self._n : self._n + len(tokens)] = tokens
        self._agent[self._n : self._n + len(tokens)] = int(agent)
        self._n += len(tokens)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        check_options(options, ())
        super().reset(seed=seed)
        self._done, self._started = True, True  # until the opening is in place
        name = type(self.turns).__name__
        try:
            opening = self.turns.start(self.np_random)
        except Exception as exc:
            raise TurnError(f"{name}.start raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(opening, (list, tuple)) or not opening:
            raise TurnError(f"{name}.start must return a non-empty list of messages, got {opening!r}")
        messages = [check_message(m, f"{name}.start, message {i}") for i, m in enumerate(opening)]
        tokens = self.chat.opening(messages)
        if len(tokens) >= self.max_tokens:
            raise ValueError(f"the opening of {name} renders to {len(tokens)} tokens, leaving no room for the agent in "
                             f"max_tokens={self.max_tokens}; raise max_tokens")
        self._ids[:] = self.tokenizer.pad_token_id
        self._agent[:] = 0
        self._n = 0
        self._append(tokens, agent=False)
        self._opening = self._turn_start = self._n
        self._turn, self._messages, self._done = 0, messages, False
        return self._obs(), {"turn": 0}

    def step(self, action):
        if not self._started:
            raise ResetNeeded("call reset() before step()")
        if self._done:
            raise ResetNeeded("the episode has ended (terminated or truncated); call reset() before step()")
        token = check_action(action, self.vocab_size)
        self._append([token], agent=True)
        reward, terminated, truncated = 0.0, False, False
        if token == self.chat.end_of_turn:
            reward, terminated, truncated = self._end_turn(closed_by_env=False)
        elif self._n == self.max_tokens:
            truncated = True
        elif self._n - self._turn_start == self.max_turn_tokens:  # the env closes the turn; the logic answers it
            reward, terminated, truncated = self._end_turn(closed_by_env=True)
        info: dict[str, Any] = {"turn": self._turn}
        if terminated or truncated:
            self._done = True
            if self.reward_fn is not None:
                opening, rest = self.transcript()
                reward += call_reward(self.reward_fn, [opening], [rest])[0]
            info["messages"] = copy.deepcopy(self._messages)
        return self._obs(), float(reward), terminated, truncated, info

    def transcript(self) -> tuple[str, str]:
        """The stream as a reward reads it: (the opening's text, the rest decoded with its special tokens)."""
        return (self.tokenizer.decode(self._ids[: self._opening].tolist()),
                self.tokenizer.decode(self._ids[self._opening : self._n].tolist()))

    def _end_turn(self, closed_by_env: bool) -> tuple[float, bool, bool]:
        """The agent's turn is over: the turn logic answers; its reply goes into the stream. A turn the env closes
        (max_turn_tokens) gets its end-of-turn token from the env, as the first token of the env's chunk."""
        end = self._n if closed_by_env else self._n - 1
        text = self.tokenizer.decode(self._ids[self._turn_start : end].tolist(), skip_special_tokens=True)
        self._messages.append({"role": "assistant", "content": text})
        self._turn += 1
        self._done = True  # a TurnError below ends the episode
        result = self._respond()
        message, reward, done = result.get("message"), result.get("reward", 0.0), result.get("done", False)
        if done:
            return reward, True, False
        if self._turn == self.max_turns:
            return reward, False, True
        try:
            chunk = [self.chat.end_of_turn] * closed_by_env + self.chat.reply(self._messages, message)
        except ValueError as exc:
            raise TurnError(f"{type(self.turns).__name__}.respond: {exc}") from None
        if self._n + len(chunk) >= self.max_tokens:  # no room for the reply and one agent token
            return reward, False, True
        self._append(chunk, agent=False)
        self._messages.append(message)
        self._turn_start, self._done = self._n, False
        return reward, False, False

    def _respond(self) -> dict:
        name = f"{type(self.turns).__name__}.respond"
        try:
            result = self.turns.respond(copy.deepcopy(self._messages))
        except Exception as exc:
            raise TurnError(f"{name} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, dict) or set(result) - {"message", "reward", "done"}:
            raise TurnError(f"{name} must return a dict with keys message, reward, done; got {result!r}")
        reward, done = result.get("reward", 0.0), result.get("done", False)
        if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
            raise TurnError(f"{name} returned reward {reward!r}: it must be a finite number")
        if not isinstance(done, (bool, np.bool_)):
            raise TurnError(f"{name} returned done={done!r}: it must be a bool")
        message = result.get("message")
        if done:
            if message is not None:
                raise TurnError(f"{name} returned done=True with a message: a finished episode has no reply")
        else:
            if message is None:
                raise TurnError(f"{name} returned no message and done=False: the agent would have nothing to answer")
            try:
                message = check_message(message, name)
            except ValueError as exc:
                raise TurnError(str(exc)) from None
            if message["role"] == "assistant":
                raise TurnError(f"{name} returned an assistant message: the env answers as user, tool or system")
        return {"message": message, "reward": float(reward), "done": bool(done)}

    def render(self) -> str | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' to the env")
            return None
        return self.tokenizer.decode(self._ids[: self._n].tolist())
