"""The KV-cached sampler: its sampling distribution, and rollouts that agree with a plain full-forward loop."""

from __future__ import annotations

import math

import numpy as np
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


class Chatty:
    """Turn logic whose replies differ in length from turn to turn and env to env, and never end the episode."""

    def start(self, rng):
        self.k = int(rng.integers(1, 4))
        return [{"role": "user", "content": "tell me" + " more" * self.k}]

    def respond(self, messages):
        self.k = self.k % 3 + 1
        return {"message": {"role": "user", "content": "go on" + " and on" * self.k}, "reward": float(self.k)}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "hf"])
def test_multiturn_rollout_logits_equal_an_uncached_forward_over_the_final_stream(arch):
    """Replies enter the KV cache as batched chunks (masked slots for rows without one); every agent token's
    log-prob equals the uncached forward's over that row's final stream (GPT-2 and Llama: the lean decoder; a
    Llama with GELU has no lean trunk: HF's decoder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agents.sampler import rollout_turns
    from textenv.embedded import default_tokenizer
    from textenv.models import build_model
    from textenv.multiturn import MultiTurnEnv

    tok = default_tokenizer()
    torch.manual_seed(0)
    if arch == "gpt2":
        model = build_model("tiny", tok, seed=0).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                             hidden_act="gelu" if arch == "hf" else "silu")).eval()
    envs = [MultiTurnEnv(Chatty, max_turns=4, max_turn_tokens=3, max_tokens=128) for _ in range(4)]
    r = rollout_turns(model, envs, torch.Generator().manual_seed(0), temperature=0.8, seeds=range(7, 11))
    turns = [sum(m["role"] == "assistant" for m in msgs) for msgs in r.messages]
    assert turns == [4, 4, 4, 4] and not r.terminated.any()  # every episode ran to max_turns, env replies in between
    lengths = r.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the streams differ in length: replies of different lengths"
    for i in range(4):
        # the row's stream: its opening (left-padded in the prompt columns), then the rest
        ids = torch.cat([r.prompt_ids[i][r.prompt_mask[i] == 1], r.response_ids[i][r.response_mask[i] == 1]])
        assert ids.tolist() == envs[i]._ids[: len(ids)].tolist()  # the env's own stream, token for token
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float() / 0.8  # (n, V) uncached, unpadded
        opening = int(r.prompt_mask[i].sum())
        agent = opening + torch.nonzero(r.agent_mask[i]).squeeze(1)  # (K,) stream columns of the agent's tokens
        assert agent.tolist() == np.flatnonzero(envs[i]._agent).tolist()
        want = torch.log_softmax(logits[agent - 1], -1).gather(1, ids[agent][:, None]).squeeze(1)
        torch.testing.assert_close(r.logprobs[i][r.agent_mask[i] == 1], want, atol=2e-4, rtol=0)
        # the turn rewards (1 to 3 each) are paid at agent tokens, the turns' last
        assert r.rewards[i].sum() >= 4 and (r.rewards[i][r.agent_mask[i] == 0] == 0).all()
