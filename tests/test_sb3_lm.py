"""The SB3 interop path with an LM policy: SB3's own PPO fine-tunes a causal LM through our env."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from safetensors.torch import load_file
from stable_baselines3 import PPO
from transformers import AutoModelForCausalLM

import textenv  # noqa: F401  (registers the ids)
from agents.sb3_lm import LMActorCriticPolicy, LMFeaturesExtractor, SB3PPOConfig, TruncationIsTermination, sb3_ppo

P, T = 5, 3


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory, tokenizer, tiny_model):
    folder = tmp_path_factory.mktemp("lm")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hand_built_obs(pad: int) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Two observations in the env's layout and the real tokens of each: a 3-token prompt left-padded into
    [0, P) with one response token at column P; a full 5-token prompt with no response yet."""
    ids = np.array([[pad, pad, 10, 20, 30, 40, pad, pad], [11, 12, 13, 14, 15, pad, pad, pad]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask}, [[10, 20, 30, 40], [11, 12, 13, 14, 15]]


def obs_space(vocab_size: int) -> spaces.Dict:
    return spaces.Dict({"input_ids": spaces.Box(0, vocab_size - 1, (P + T,), np.int64),
                        "attention_mask": spaces.Box(0, 1, (P + T,), np.int64)})


def test_extractor_is_last_real_token_hidden_state(lm_folder, tokenizer, tiny_model):
    obs, real = hand_built_obs(tokenizer.pad_token_id)
    extractor = LMFeaturesExtractor(obs_space(len(tokenizer)), model=str(lm_folder))
    with torch.no_grad():  # float obs, as SB3's preprocess_obs hands them over
        features = extractor({k: torch.as_tensor(v, dtype=torch.float32) for k, v in obs.items()})  # (2, H)
        expected = torch.stack([tiny_model.transformer(torch.tensor([r])).last_hidden_state[0, -1] for r in real])
    assert features.shape == (2, tiny_model.config.n_embd)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_policy_starts_as_the_lm(lm_folder, tokenizer, tiny_model):
    V = len(tokenizer)
    policy = LMActorCriticPolicy(obs_space(V), spaces.Discrete(V), lambda _: 1e-5,
                                 features_extractor_kwargs=dict(model=str(lm_folder)))
    assert policy.action_net is policy.features_extractor.lm.lm_head  # one head: what SB3 trains is what we save
    obs, real = hand_built_obs(tokenizer.pad_token_id)
    obs_t, _ = policy.obs_to_tensor(obs)
    with torch.no_grad():
        logp = policy.get_distribution(obs_t).distribution.logits  # (2, V) normalised log-probs
        values = policy.predict_values(obs_t)  # (2, 1)
        expected = torch.stack([tiny_model(torch.tensor([r])).logits[0, -1].log_softmax(-1) for r in real])
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(values, torch.zeros(2, 1))  # zero-initialised value head
    with pytest.raises(ValueError, match="ortho_init"):  # SB3's default init would overwrite the LM
        LMActorCriticPolicy(obs_space(V), spaces.Discrete(V), lambda _: 1e-5, ortho_init=True,
                            features_extractor_kwargs=dict(model=str(lm_folder)))


def test_plain_sb3_ppo_trains_the_lm(lm_folder, env_kwargs):
    env = gym.make("textenv/TextGen-v1", **env_kwargs)
    model = PPO(LMActorCriticPolicy, env, n_steps=64, batch_size=32, n_epochs=2, learning_rate=1e-3, seed=0,
                device="cpu", policy_kwargs=dict(features_extractor_kwargs=dict(model=str(lm_folder))))
    lm = model.policy.features_extractor.lm
    before = {name: p.detach().clone() for name, p in lm.named_parameters()}
    model.learn(total_timesteps=128)
    assert model.num_timesteps == 128
    after = dict(lm.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])  # the (tied) head
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    assert model.policy.value_net.weight.abs().sum() > 0  # the value head left zero


def test_truncation_is_reported_as_termination(env_kwargs, tokenizer):
    env = TruncationIsTermination(gym.make("textenv/TextGen-v1", **env_kwargs))
    env.reset(seed=0)
    ends = [env.step(tokenizer.pad_token_id)[2:4] for _ in range(env_kwargs["max_new_tokens"])]  # never EOS
    assert ends == [(False, False)] * 5 + [(True, False)]


def test_sb3_ppo_end_to_end(lm_folder, tmp_path):
    cfg = SB3PPOConfig(policy=str(lm_folder), reward="tests.conftest:length_reward", out_dir=str(tmp_path / "run"),
                       n_envs=2, n_steps=24, batch_size=24, n_epochs=1, total_timesteps=96, lr=1e-3, device="cpu")
    final = sb3_ppo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [48, 96]  # one line per rollout of n_envs * n_steps tokens
    for r in rows:  # PositiveReview responses are 24 tokens at most: each rollout finishes episodes
        assert {"objective/scores", "objective/gold", "charts/tokens_per_s"} <= r.keys()
        assert all(math.isfinite(v) for v in r.values())
    loaded = AutoModelForCausalLM.from_pretrained(final)
    initial = load_file(lm_folder / "model.safetensors")
    trained = loaded.state_dict()
    assert not torch.equal(initial["transformer.wte.weight"], trained["transformer.wte.weight"])
    assert (tmp_path / "run" / "summary.json").exists() and (final / "tokenizer.json").exists()


def test_a_policy_smaller_than_its_tokenizer_is_refused_with_the_fix(tiny_model, tokenizer, tmp_path):
    """(#21 item 3) A model whose embedding is smaller than len(tokenizer) (an added token) cannot be SB3's action
    net over every token: the error says how to resize, instead of the env's vocab_size error."""
    import copy

    bigger = copy.deepcopy(tokenizer)
    bigger.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tiny_model.save_pretrained(tmp_path / "lm")
    bigger.save_pretrained(tmp_path / "lm")
    cfg = SB3PPOConfig(policy=str(tmp_path / "lm"), reward="tests.conftest:length_reward",
                       out_dir=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ValueError, match=r"has \d+ logits but its tokenizer \d+ tokens .*resize_token_embeddings"):
        sb3_ppo(cfg)
