"""Best-of-n sampling: draw n responses from a policy, keep the one the reward model scores highest.

No training; its KL to the sampling policy is known in closed form, log n - (n - 1) / n (Stiennon et al. 2020,
arXiv 2009.01325, App. G; Gao et al. 2022, arXiv 2210.10760), which makes it the usual baseline for RL at a
given KL budget.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from agents.sampler import rollout
from rewards.base import call_reward
from textenv.vector_env import TextGenVectorEnv


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) in nats: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(policy, envs: TextGenVectorEnv, reward_fn, n: int, prompt_indices: np.ndarray,
              generator: torch.Generator, temperature: float = 1.0) -> tuple[list[str], list[float]]:
    """For each prompt index, the highest-scoring of n sampled responses and its score.

    `envs` supplies the prompts and sampling budget; its own reward is ignored (pass a cheap one): every
    candidate is scored by `reward_fn` in one batched call per rollout.
    """
    B = envs.num_envs
    prompts = envs.setup.prompts
    best: list[tuple[float, str]] = [(-math.inf, "")] * len(prompt_indices)
    flat = np.repeat(np.asarray(prompt_indices), n)  # (len * n,) each prompt n times
    for start in range(0, len(flat), B):
        index = flat[start : start + B]
        keep = len(index)
        index = np.resize(index, B)  # pad the last rollout by wrapping; the padding is dropped
        batch = rollout(policy, envs, generator, temperature=temperature, prompt_index=index)
        scores = call_reward(reward_fn, [prompts[i] for i in index[:keep]], batch.responses[:keep])
        for j, (score, response) in enumerate(zip(scores, batch.responses[:keep])):
            slot = (start + j) // n
            if score > best[slot][0]:
                best[slot] = (score, response)
    return [r for _, r in best], [s for s, _ in best]
