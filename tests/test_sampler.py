"""The KV-cached sampler: its sampling distribution, and rollouts that agree with a plain full-forward loop."""

from __future__ import annotations

import math

import pytest
import torch

from agents.sampler import rollout, sample_from_logits
from tests.conftest import length_reward
from textenv import TextGenVectorEnv
from textenv.models.tokens import position_ids_from_mask


def draw(logits, n=20000, **kw):
    g = torch.Generator().manual_seed(0)
    tokens = sample_from_logits(logits.expand(n, -1), g, **kw)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n


def test_inverse_cdf_sampler_matches_the_distribution():
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]])
    freq = draw(logits)
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64), atol=0.015)
    assert freq[3] == 0  # a zero-probability token is never drawn
    # temperature 2: p_i proportional to sqrt(p_i)
    want = torch.tensor([math.sqrt(0.5), 0.5, 0.5, 0.0], dtype=torch.float64)
    assert torch.allclose(draw(logits, temperature=2.0), want / want.sum(), atol=0.015)
    assert draw(logits, top_k=1)[0] == 1.0
    assert draw(logits, top_p=0.4)[0] == 1.0
    assert torch.allclose(draw(logits, top_p=0.6)[:3], torch.tensor([2 / 3, 1 / 3, 0], dtype=torch.float64), atol=0.015)
    with pytest.raises(ValueError, match="temperature"):
        sample_from_logits(logits, None, temperature=0.0)


def test_sampler_is_deterministic_given_the_generator():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    a = sample_from_logits(logits, torch.Generator().manual_seed(3))
    b = sample_from_logits(logits, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def greedy_full_forward(model, prompt_ids, prompt_mask, steps, eos):
    """Reference: recompute the whole left-padded sequence every step (no cache), greedy."""
    ids, mask = prompt_ids.clone(), prompt_mask.clone()
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids[:, prompt_ids.shape[1] :]


def test_rollout_matches_full_forward_and_env(tiny_model, env_kwargs, tokenizer):
    envs = TextGenVectorEnv(num_envs=6, **env_kwargs)
    # near-zero temperature makes sampling greedy, so the KV-cached path must pick the same tokens as a
    # full forward over the left-padded sequence: this checks the cache and the position ids under padding.
    r = rollout(tiny_model, envs, torch.Generator().manual_seed(0), temperature=1e-5, seed=4)
    want = greedy_full_forward(tiny_model, r.prompt_ids, r.prompt_mask, env_kwargs["max_new_tokens"],
                               tokenizer.eos_token_id)
    lengths = r.response_mask.sum(1)
    for i in range(6):
        n = int(lengths[i])
        assert torch.equal(r.response_ids[i, :n], want[i, :n])
        assert bool(r.terminated[i]) == (want[i, n - 1].item() == tokenizer.eos_token_id)
        assert (r.response_ids[i, n:] == tokenizer.pad_token_id).all()
    assert r.responses == [tokenizer.decode(r.response_ids[i, : int(lengths[i])].tolist(), skip_special_tokens=True)
                           for i in range(6)]
    assert r.scores.tolist() == length_reward(r.prompts, r.responses)


def test_rollout_with_early_eos_scores_each_episode_once(tiny_model, env_kwargs, tokenizer):
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return [1.0] * len(completions)

    model = _eos_biased(tiny_model, tokenizer.eos_token_id)
    envs = TextGenVectorEnv(num_envs=16, **{**env_kwargs, "reward_fn": reward})
    r = rollout(model, envs, torch.Generator().manual_seed(0), seed=0)
    assert sum(calls) == 16  # throw-away episodes after an early EOS never reach the reward
    assert r.terminated.any() and (r.response_mask.sum(1) < env_kwargs["max_new_tokens"]).any()
    assert (r.scores == 1.0).all()


def _eos_biased(model, eos):
    """A copy of `model` whose logits favour EOS, so that episodes end early and at different steps."""
    import copy

    model = copy.deepcopy(model)
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 2.5
    model.register_forward_hook(lambda m, args, out: out.__class__(logits=out.logits + bias, cache=out.cache))
    return model
