"""Best-of-n: the analytic KL and the selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.best_of_n import best_of_n, best_of_n_kl
from textenv import TextGenVectorEnv


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.19315
    assert best_of_n_kl(16) == pytest.approx(1.8351, abs=1e-4)  # 2.77259 - 0.9375
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl(0)


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
