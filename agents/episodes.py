"""Where the RL stages play, behind one call: an embedded task's prompts in a `TextGenVectorEnv`, or a registered
multi-turn env id (`textenv/Calculator-v0`, or a user's `module:Id` as `gymnasium.make` takes it) in MultiTurnEnvs.

`make_episodes(task, ...)` builds either; `Episodes.play` returns a `Rollout` in the one layout (prompt columns,
then the response or the rest of the conversation, with the agent's tokens marked) and each episode's gold score:
the task's gold scorer, or a multi-turn env's own return (its turn logic's rewards, and its reward_fn's if it was
registered with one). A multi-turn env plays without the trainer's reward inside it: a learned reward model (the
proxy) scores the whole conversation, paid at its last agent token, so the gold stays the env's own.

Multi-turn episodes have no prompt list: an episode is its env seed. A split's episodes are seeds
`SPLIT_SEEDS[split] + i`, disjoint between the splits, so "prompt index i" of a multi-turn task is episode seed i.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from agents.core import at_last_token
from agents.data import encode_conversation
from agents.sampler import Rollout, rollout, rollout_turns
from rewards.base import as_reward_fn, call_reward
from textenv.multiturn import multiturn_spec
from textenv.tasks import get_task
from textenv.vector_env import TextGenVectorEnv

SPLIT_SEEDS = {"train": 0, "valid": 1 << 40, "test": 2 << 40}  # a multi-turn split's episode seeds start here
POOL = 4000  # train episodes a group sampler draws from (as an embedded task's train prompts)


def is_multi_turn(task: str) -> bool:
    """Whether `task` names a registered multi-turn env id rather than an embedded task (ValueError if neither)."""
    if multiturn_spec(task) is not None:
        return True
    get_task(task)  # ValueError naming the known tasks
    return False


@dataclass
class Episodes:
    """The env an RL stage plays in; `play` is its one call."""

    envs: object  # a TextGenVectorEnv, or a list of MultiTurnEnvs
    multi_turn: bool
    task: object | None  # the embedded task whose gold scorer is logged (single-turn on its own prompts), else None
    reward_fn: object | None  # the reward; multi-turn: it scores each conversation (None: the env's own return)
    P: int  # prompt columns: exactly (single-turn), at most (multi-turn: the opening)
    T: int  # sampler steps at most: the response budget, or a multi-turn stream's max_tokens
    V: int  # actions (the env's vocabulary)
    num_prompts: int  # distinct prompts (single-turn) or train episodes (multi-turn) to draw groups from

    @property
    def num_envs(self) -> int:
        return len(self.envs) if self.multi_turn else self.envs.num_envs

    def play(self, policy, *, uniforms: torch.Tensor | None = None, generator: torch.Generator | None = None,
             temperature: float, seed: int, prompt_index: np.ndarray | None = None) -> tuple[Rollout, list[float]]:
        """One episode per env with `policy`, each row's tokens picked by its row of `uniforms` (num_envs, T), or
        drawn from `generator`.
        Single-turn: sub-env i seeded with seed + i, its prompt `prompt_index[i]` (or drawn by the env). Multi-turn:
        sub-env i reset with seed `prompt_index[i]` (an episode of a split, see `SPLIT_SEEDS`), or seed + i.
        Returns (rollout, gold per episode); the gold is None on a user's own prompts, where the task's gold scorer
        does not apply (so no `objective/gold` is logged)."""
        if not self.multi_turn:
            batch = rollout(policy, self.envs, generator, uniforms=uniforms, temperature=temperature, seed=seed,
                            prompt_index=prompt_index)
            return batch, None if self.task is None else self.task.gold(batch.prompts, batch.responses)
        seeds = seed + np.arange(self.num_envs) if prompt_index is None else np.asarray(prompt_index)
        batch = rollout_turns(policy, self.envs, generator, uniforms=uniforms, temperature=temperature, seeds=seeds)
        gold = batch.scores.tolist()  # the env's own return
        if self.reward_fn is not None:  # the proxy's score of each conversation, paid at its last agent token
            scores = torch.tensor(call_reward(self.reward_fn, batch.prompts, batch.responses), dtype=torch.float32)
            batch = dataclasses.replace(batch, rewards=at_last_token(scores, batch.agent_mask), scores=scores)
        return batch, gold


def episode_prompts(task: str, split: str, n: int, seed: int = 0) -> list:
    """n prompts of a split: an embedded task's prompt strings (`Task.prompts`), or a multi-turn env id's episode
    seeds (what `Episodes.play` takes as `prompt_index`)."""
    if is_multi_turn(task):
        return [SPLIT_SEEDS[split] + seed * n + i for i in range(n)]
    return get_task(task).prompts(split, n=n, seed=seed)


def make_episodes(task: str, *, num_envs: int, tokenizer, reward: str | None, reward_label: str | None = None,
                  device=None, prompts: str | None = None, prompt_format: str = "auto",
                  max_new_tokens: int | None = None, max_prompt_tokens: int | None = None) -> Episodes:
    """`num_envs` envs of `task` (an embedded task or a multi-turn env id) for `tokenizer`'s policy. `reward`: a
    reward `rewards.as_reward_fn` takes, "gold" for the task's gold scorer (multi-turn: the env's own rewards), or
    None for no reward at all (single-turn scores 0; multi-turn: the env's own). `prompt_format`: how str prompts
    reach the policy (`textenv.TextGenEnv`'s argument)."""
    spec = multiturn_spec(task)
    proxy = None
    if reward is not None and reward != "gold":
        proxy = as_reward_fn(reward, label=reward_label, device=device)
    if spec is None:
        t = get_task(task)
        reward_fn = t.gold if reward == "gold" else proxy or (lambda p, c: [0.0] * len(c))
        envs = TextGenVectorEnv(num_envs=num_envs, task=task, prompts=prompts, tokenizer=tokenizer,
                                reward_fn=reward_fn, max_new_tokens=max_new_tokens,
                                max_prompt_tokens=max_prompt_tokens, prompt_format=prompt_format)
        s = envs.setup
        return Episodes(envs, False, t if prompts is None else None, reward_fn, s.max_prompt_tokens, s.max_new_tokens,
                        s.vocab_size, len(s.prompts))
    for name, value in (("prompts", prompts), ("max_new_tokens", max_new_tokens),
                        ("max_prompt_tokens", max_prompt_tokens)):
        if value is not None:
            raise ValueError(f"{name}={value!r} applies to single-turn tasks; the multi-turn env {task!r} takes its "
                             "openings and limits (max_turns, max_turn_tokens, max_tokens) from its registration")
    if prompt_format == "text":
        raise ValueError(f"prompt_format='text' applies to single-turn tasks; the multi-turn env {task!r} speaks "
                         "through the chat template")
    envs = [gym.make(task, tokenizer=tokenizer).unwrapped for _ in range(num_envs)]
    L = envs[0].max_tokens
    return Episodes(envs, True, None, proxy, L, L, envs[0].vocab_size, POOL)


def turn_demonstrations(task: str, tokenizer, split: str, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """SFT examples (ids, labels) of a multi-turn env id: the turn logic's expert conversations (its
    `demonstration(rng)`), encoded as the env's stream (`ChatFormat.stream`), labels IGNORE off the agent's tokens.
    Episode i of a split uses rng seed SPLIT_SEEDS[split] + seed * n + i."""
    env = gym.make(task, tokenizer=tokenizer).unwrapped
    expert = getattr(env.turns, "demonstration", None)
    if not callable(expert):
        raise ValueError(f"{task}: its turn logic {type(env.turns).__name__} has no demonstration(rng) method, so "
                         "there are no demonstrations to learn; give SFT --data with your own")
    out = []
    for i in range(n):
        ids, labels = encode_conversation(env.chat, expert(np.random.default_rng(SPLIT_SEEDS[split] + seed * n + i)))
        if len(ids) > env.max_tokens:
            raise ValueError(f"{task}: a demonstration renders to {len(ids)} tokens, over the env's max_tokens="
                             f"{env.max_tokens}")
        out.append((ids, labels))
    return out
