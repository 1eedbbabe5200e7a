"""Best-of-n: the analytic KL and the selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.best_of_n import best_of_n, best_of_n_expected, best_of_n_kl
from textenv import TextGenVectorEnv


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.19315
    assert best_of_n_kl(16) == pytest.approx(1.8351, abs=1e-4)  # 2.77259 - 0.9375
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl(0)


def test_best_of_n_expected_by_hand():
    # one prompt, N = 3 samples with proxy 1 < 2 < 3 and gold 10, 30, 20. Best-of-2 over the 3 pairs:
    # {0,1} -> 1 (gold 30), {0,2} -> 2 (20), {1,2} -> 2 (20): E[gold] = 70 / 3, E[proxy] = (2 + 3 + 3) / 3
    gold, proxy = np.array([[10.0, 30.0, 20.0]]), np.array([[1.0, 2.0, 3.0]])
    assert best_of_n_expected(gold, proxy, 1) == pytest.approx((20.0, 2.0))  # the plain means
    assert best_of_n_expected(gold, proxy, 2) == pytest.approx((70 / 3, 8 / 3))
    assert best_of_n_expected(gold, proxy, 3) == pytest.approx((20.0, 3.0))  # the proxy's favourite of all
    # against brute force over every subset, on random scores with ties in the proxy (ties go to the later sample)
    import itertools

    rng = np.random.default_rng(0)
    gold, proxy = rng.normal(size=(4, 7)), rng.integers(0, 3, size=(4, 7)).astype(float)
    for n in (2, 4):
        picks = [[g[max(s, key=lambda j: (p[j], j))] for s in itertools.combinations(range(7), n)]
                 for g, p in zip(gold, proxy)]
        assert best_of_n_expected(gold, proxy, n)[0] == pytest.approx(np.mean(picks))
    with pytest.raises(ValueError, match="n must be in"):
        best_of_n_expected(gold, proxy, 8)


def test_best_of_n_keeps_the_highest_scoring_candidate(tiny_model, env_kwargs):
    def score(prompts, completions):
        return [float(len(c)) for c in completions]

    envs = TextGenVectorEnv(num_envs=6, **{**env_kwargs, "reward_fn": lambda p, c: [0.0] * len(c)})
    responses, scores = best_of_n(tiny_model, envs, score, n=4, prompt_indices=np.array([0, 3, 5]),
                                  generator=torch.Generator().manual_seed(0))
    assert len(responses) == 3 and scores == [float(len(r)) for r in responses]
    # against all 12 candidates drawn with the same generator, in the same order
    flat = np.resize(np.repeat([0, 3, 5], 4), 12)
    from agents.sampler import rollout

    g = torch.Generator().manual_seed(0)
    candidates = (rollout(tiny_model, envs, g, prompt_index=flat[:6]).responses
                  + rollout(tiny_model, envs, g, prompt_index=flat[6:]).responses)
    for k in range(3):
        assert scores[k] == max(len(c) for c in candidates[4 * k : 4 * k + 4])
