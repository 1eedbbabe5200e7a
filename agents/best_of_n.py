"""Best-of-n sampling: draw n responses from a policy, keep the one the reward model scores highest.

No training; its KL to the sampling policy is known in closed form, log n - (n - 1) / n (Stiennon et al. 2020,
arXiv 2009.01325, App. G; Gao et al. 2022, arXiv 2210.10760), which makes it the usual baseline for RL at a
given KL budget. `best_of_n` picks one n; `best_of_n_curve` reads every n = 1, 2, 4, ... off one set of samples;
`best_of_n_expected` is the unbiased estimate of best-of-n from N >= n samples (Gao et al. 2022, App. I), which
averages over every n-subset instead of reading the first n.
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


def sample_candidates(policy, envs: TextGenVectorEnv, n: int, prompt_indices: np.ndarray, generator: torch.Generator,
                      reward_fns: list, temperature: float = 1.0) -> tuple[list[list[str]], list[np.ndarray]]:
    """n responses to each of the prompts `prompt_indices` of `envs` ((prompts, n) texts) and their scores under each
    of `reward_fns` (one (prompts, n) array each), scored in one batched call per rollout of envs.num_envs.
    `envs` supplies the prompts and sampling budget; its own reward is ignored (pass a cheap one)."""
    B, prompts = envs.num_envs, envs.setup.prompts
    flat = np.repeat(np.asarray(prompt_indices), n)  # (prompts * n,) each prompt n times
    texts: list[str] = []
    scores: list[list[float]] = [[] for _ in reward_fns]
    for start in range(0, len(flat), B):
        index = flat[start : start + B]
        keep = len(index)
        index = np.resize(index, B)  # pad the last rollout by wrapping; the padding is dropped
        batch = rollout(policy, envs, generator, temperature=temperature, prompt_index=index)
        responses = batch.responses[:keep]
        texts += responses
        for out, fn in zip(scores, reward_fns):
            out += call_reward(fn, [prompts[i] for i in index[:keep]], responses)
    grid = [texts[i * n : (i + 1) * n] for i in range(len(prompt_indices))]
    return grid, [np.asarray(s).reshape(len(prompt_indices), n) for s in scores]


def best_of_n(policy, envs: TextGenVectorEnv, reward_fn, n: int, prompt_indices: np.ndarray,
              generator: torch.Generator, temperature: float = 1.0) -> tuple[list[str], list[float]]:
    """For each prompt index, the highest-scoring of n sampled responses (the first of equal ones) and its score."""
    texts, (scores,) = sample_candidates(policy, envs, n, prompt_indices, generator, [reward_fn], temperature)
    pick = scores.argmax(1)  # (prompts,)
    return [row[j] for row, j in zip(texts, pick)], scores[np.arange(len(pick)), pick].tolist()


def best_of_n_curve(gold: np.ndarray, proxy: np.ndarray) -> list[dict]:
    """Best-of-n by the proxy for n = 1, 2, 4, ... up to the samples there are, from (prompts, n_max) gold and proxy
    scores of the same samples: the proxy's favourite among each prompt's first n, its mean gold and proxy score,
    and the analytic KL."""
    rows, n, prompts = [], 1, np.arange(len(gold))
    while n <= gold.shape[1]:
        pick = proxy[:, :n].argmax(1)  # (prompts,)
        rows.append({"n": n, "kl": best_of_n_kl(n), "gold": float(gold[prompts, pick].mean()),
                     "proxy": float(proxy[prompts, pick].mean())})
        n *= 2
    return rows


def best_of_n_expected(gold: np.ndarray, proxy: np.ndarray, n: int) -> tuple[float, float]:
    """The mean over prompts of E[gold] and E[proxy] of best-of-n by the proxy, where each prompt's n candidates are
    a uniformly random n-subset of its N samples: exact over all C(N, n) subsets, so unbiased and far less noisy
    than one draw (Gao et al. 2022, arXiv 2210.10760, App. I; Nakano et al. 2021). gold, proxy: (prompts, N) scores
    of the same samples. Sorted by the proxy (ties by sample order), the sample of rank i (0-based, ascending) is the
    subset's favourite exactly when it is in the subset with n - 1 of the i below it: C(i, n-1) / C(N, n)."""
    gold, proxy = np.asarray(gold, float), np.asarray(proxy, float)
    if gold.shape != proxy.shape or gold.ndim != 2:
        raise ValueError(f"gold and proxy must be (prompts, N) arrays of one shape, got {gold.shape} and {proxy.shape}")
    N = gold.shape[1]
    if not 1 <= n <= N:
        raise ValueError(f"n must be in [1, {N}] (the samples per prompt), got {n}")
    order = np.argsort(proxy, axis=1, kind="stable")  # (prompts, N) ascending
    total = math.comb(N, n)
    weight = np.array([math.comb(i, n - 1) / total for i in range(N)])  # (N,) sums to 1
    by_rank = [np.take_along_axis(x, order, axis=1) for x in (gold, proxy)]
    return float((by_rank[0] @ weight).mean()), float((by_rank[1] @ weight).mean())
