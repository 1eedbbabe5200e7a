"""The interop path: Stable-Baselines3 trains in our env with its own algorithm and policy."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO

import textenv  # noqa: F401  (registers the ids)


def test_sb3_ppo_learns_in_an_embedded_task():
    env = gym.make("textenv/Arithmetic-v0")
    model = PPO("MultiInputPolicy", env, n_steps=128, batch_size=64, n_epochs=2, seed=0, device="cpu", verbose=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=384)
    assert model.num_timesteps >= 384
    changed = [not np.allclose(a.numpy(), b.detach().numpy()) for a, b in zip(before, model.policy.parameters())]
    assert any(changed)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(int(action))
