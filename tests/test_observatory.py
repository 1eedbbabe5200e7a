"""ProxyReward: the env's own (gold) reward only in info, the proxy as the reward; both checkers; pickling."""

from __future__ import annotations

import pickle
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import textenv  # noqa: F401  (registers the ids)
from tests.conftest import PROMPTS, length_reward
from textenv.env import TextGenEnv
from textenv.observatory import ProxyReward


def short(prompts, completions, **kwargs):
    """A proxy that disagrees with the gold (length_reward): minus the length."""
    return [-float(len(c)) for c in completions]


def flat(prompts, completions, **kwargs):
    return [0.5] * len(completions)


def single(tokenizer):
    return TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=length_reward, max_new_tokens=4,
                      max_prompt_tokens=16)


def test_both_checkers_pass(tokenizer):
    """Warnings as errors, but for Gymnasium's note that the env checked is a wrapper (it says so of any wrapper)."""
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    for make in (lambda: ProxyReward(gym.make("textenv/PositiveReview-v0").unwrapped, short),
                 lambda: ProxyReward(gym.make("textenv/Calculator-v0").unwrapped, "tests.test_observatory:flat")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", message=".*is different from the unwrapped version")
            check_env(make())
            sb3_check_env(make())


def test_the_gold_is_in_info_only_and_the_reward_is_the_proxy(tokenizer):
    env = ProxyReward(single(tokenizer), short)
    tokens = tokenizer(" the film was good", add_special_tokens=False)["input_ids"][:4]
    for episode in range(2):
        _, info = env.reset(seed=episode)
        assert info["episodes"] == episode and info["proxy_return"] == 0.0
        rewards = []
        for token in tokens:
            _, reward, terminated, truncated, info = env.step(token)
            rewards.append(reward)
            if terminated or truncated:
                break
        response = info["response"]
        assert rewards[:-1] == [0.0] * (len(rewards) - 1) and rewards[-1] == -len(response)  # the proxy pays
        assert info["gold_reward"] == info["gold_return"] == float(len(response))  # the gold, in info only
    assert info["episodes"] == 2 and info["gap"] == pytest.approx(info["proxy_mean"] - info["gold_mean"])
    assert info["gold_mean"] == float(len(response)) and info["proxy_mean"] == -len(response)
    copy = pickle.loads(pickle.dumps(env))
    assert copy.episodes == 2 and copy.reset(seed=0)[0]["input_ids"].tolist() == env.reset(seed=0)[0][
        "input_ids"].tolist()


def test_a_multi_turn_env_keeps_its_turn_rewards_as_the_gold():
    env = ProxyReward(gym.make("textenv/Calculator-v0").unwrapped, flat)
    env.reset(seed=0)
    inner = env.unwrapped
    question = inner.turns.question
    chat = inner.chat
    for text in (f"<calc> {question}</calc>", None):
        if text is None:  # the second turn answers with the calculator's result
            text = f"answer: {inner.turns.value}"
        for token in chat.encode(text) + [chat.end_of_turn]:
            _, reward, terminated, truncated, info = env.step(token)
            if terminated or truncated:
                break
    assert terminated and reward == 0.5  # the proxy's score of the conversation
    assert info["gold_reward"] == 1.0 and info["gold_return"] == 1.0  # the turn logic's: the answer was right
