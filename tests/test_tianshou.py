"""#21 item 10: tianshou's PPO trains in an embedded id, with the wrapper the README gives (tianshou's buffer needs
the same info keys on every step; textenv puts prompt/response on an episode's last step only). Optional extra:
skipped where tianshou is not installed (`pip install 'textenv[tianshou]'`)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenv  # noqa: F401  (registers the ids)

ts = pytest.importorskip("tianshou")


class SameInfoKeys(gym.Wrapper):
    """The README's wrapper: every step's info has `prompt` and `response`."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info.setdefault("prompt", "")
        info.setdefault("response", "")
        return obs, reward, terminated, truncated, info


class LastTokenNet(torch.nn.Module):
    """A tiny causal LM's output at each row's last real token: the actor's logits, or (width 1) a value."""

    def __init__(self, vocab: int, width: int, seed: int):
        from transformers import GPT2Config, GPT2Model

        super().__init__()
        torch.manual_seed(seed)
        self.lm = GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=vocab, n_positions=64))
        self.head = torch.nn.Linear(32, width)

    def features(self, obs) -> torch.Tensor:
        ids, mask = torch.as_tensor(obs.input_ids), torch.as_tensor(obs.attention_mask)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state  # (B, L, H)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each row's last real column
        return hidden[torch.arange(len(ids)), last]  # (B, H)


class Actor(ts.utils.net.common.AbstractDiscreteActor):
    def __init__(self, vocab: int):
        super().__init__(output_dim=vocab)
        self.net = LastTokenNet(vocab, vocab, seed=0)

    def get_preprocess_net(self):
        return ts.utils.net.common.ModuleWithVectorOutput.from_module(self.net.lm, 32)

    def forward(self, obs, state=None, info=None):
        return self.net.head(self.net.features(obs)), state


class Critic(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.net = LastTokenNet(vocab, 1, seed=1)

    def forward(self, obs, state=None, info=None):
        return self.net.head(self.net.features(obs))


def test_tianshou_ppo_trains_in_an_embedded_id(tokenizer):
    from tianshou.algorithm.modelfree.ppo import PPO
    from tianshou.algorithm.modelfree.reinforce import DiscreteActorPolicy
    from tianshou.algorithm.optim import AdamOptimizerFactory
    from tianshou.data import Collector, VectorReplayBuffer
    from tianshou.env import DummyVectorEnv
    from tianshou.trainer import OnPolicyTrainerParams
    from tianshou.utils.net.discrete import dist_fn_categorical_from_logits

    def make():
        return SameInfoKeys(gym.make("textenv/PositiveReview-v0", tokenizer=tokenizer, max_new_tokens=4))

    envs = DummyVectorEnv([make] * 4)
    env = make()
    vocab = int(env.action_space.n)
    actor = Actor(vocab)
    before = [p.detach().clone() for p in actor.parameters()]
    policy = DiscreteActorPolicy(actor=actor, dist_fn=dist_fn_categorical_from_logits, action_space=env.action_space,
                                 observation_space=env.observation_space)
    algorithm = PPO(policy=policy, critic=Critic(vocab), optim=AdamOptimizerFactory(lr=1e-3))
    collector = Collector(algorithm, envs, VectorReplayBuffer(64, len(envs)))
    result = algorithm.run_training(OnPolicyTrainerParams(
        training_collector=collector, max_epochs=1, epoch_num_steps=32, collection_step_num_env_steps=32,
        update_step_num_repetitions=1, batch_size=16, test_collector=None, test_step_num_episodes=0,
        show_progress=False, verbose=False))
    assert result.update_step >= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, actor.parameters()))  # PPO updated the actor
    assert np.isfinite(collector.buffer.rew[: len(collector.buffer)]).all()
