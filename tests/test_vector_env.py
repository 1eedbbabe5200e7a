"""TextGenVectorEnv equals N TextGenEnvs under SyncVectorEnv, in every autoreset mode, and batches rewards."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import textenv
from tests.test_env import assert_same
from textenv import TextGenEnv, TextGenVectorEnv


def episode_ending_actions(rng, n, vocab, eos, p_eos=0.3):
    """Random tokens with EOS often enough that episodes have different lengths."""
    actions = rng.integers(2, vocab, size=n)
    actions[rng.random(n) < p_eos] = eos
    return actions


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_env_equals_sync_of_single_envs(env_kwargs, tokenizer, mode):
    n = 5
    vec = TextGenVectorEnv(num_envs=n, autoreset_mode=mode, **env_kwargs)
    ref = SyncVectorEnv([lambda: TextGenEnv(**env_kwargs) for _ in range(n)], autoreset_mode=mode)
    assert vec.metadata["autoreset_mode"] == mode
    assert vec.observation_space == ref.observation_space and vec.action_space == ref.action_space
    assert_same(vec.reset(seed=11), ref.reset(seed=11))
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(40):
        actions = episode_ending_actions(rng, n, len(tokenizer), tokenizer.eos_token_id)
        got, want = vec.step(actions), ref.step(actions)
        assert_same(got, want)
        ends += int((got[2] | got[3]).sum())
    assert ends > 10  # many episodes of different lengths ended, some by EOS, some by truncation
    assert_same(vec.reset(), ref.reset())  # unseeded resets continue the same streams


def test_disabled_mode_with_reset_mask(env_kwargs, tokenizer):
    n = 3
    vec = TextGenVectorEnv(num_envs=n, autoreset_mode="Disabled", **env_kwargs)
    ref = SyncVectorEnv([lambda: TextGenEnv(**env_kwargs) for _ in range(n)], autoreset_mode=AutoresetMode.DISABLED)
    assert_same(vec.reset(seed=2), ref.reset(seed=2))
    eos = tokenizer.eos_token_id
    actions = np.array([eos, 5, 5])
    assert_same(vec.step(actions), ref.step(actions))
    with pytest.raises(ResetNeeded, match=r"envs \[0\] ended"):
        vec.step(np.array([5, 5, 5]))
    mask = np.array([True, False, False])
    assert_same(vec.reset(options={"reset_mask": mask}), ref.reset(options={"reset_mask": mask}))
    assert_same(vec.step(np.array([5, 5, 5])), ref.step(np.array([5, 5, 5])))


def test_one_reward_call_per_step(env_kwargs, tokenizer):
    calls = []

    def counting_reward(prompts, completions):
        calls.append(len(completions))
        return [0.5] * len(completions)

    vec = TextGenVectorEnv(num_envs=4, **{**env_kwargs, "reward_fn": counting_reward})
    vec.reset(seed=0)
    eos = tokenizer.eos_token_id
    _, rewards, terminated, _, infos = vec.step(np.array([eos, 7, eos, eos]))
    assert calls == [3]
    assert rewards.tolist() == [0.5, 0.0, 0.5, 0.5] and terminated.tolist() == [True, False, True, True]
    assert infos["_response"].tolist() == [True, False, True, True] and infos["response"][0] == ""


def test_vector_bad_input(env_kwargs, tokenizer):
    vec = TextGenVectorEnv(num_envs=2, **env_kwargs)
    with pytest.raises(ResetNeeded):
        vec.step(np.array([5, 5]))
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        vec.step(np.array([5]))
    with pytest.raises(TypeError, match="dtype float64"):
        vec.step(np.array([5.0, 5.0]))
    with pytest.raises(ValueError, match="action 9999 of env 1"):
        vec.step(np.array([5, 9999]))
    vec.step(np.array([5, 5]))  # still usable
    for bad in [0, -1, 2.5, True]:
        with pytest.raises(ValueError, match="num_envs"):
            TextGenVectorEnv(num_envs=bad, **env_kwargs)
    with pytest.raises(ValueError, match="autoreset_mode"):
        TextGenVectorEnv(num_envs=2, autoreset_mode="sometimes", **env_kwargs)
    vec.close()
    vec.close()


def test_bad_reward_in_vector_env_leaves_it_usable(env_kwargs, tokenizer):
    state = {"fail": True}

    def flaky(prompts, completions):
        if state["fail"]:
            return [1.0] * len(completions) + [2.0]
        return [1.0] * len(completions)

    vec = TextGenVectorEnv(num_envs=2, **{**env_kwargs, "reward_fn": flaky})
    obs, _ = vec.reset(seed=0)
    eos = tokenizer.eos_token_id
    with pytest.raises(ValueError, match="2 scores for 1 completions"):
        vec.step(np.array([eos, 5]))
    state["fail"] = False
    obs2, rewards, terminated, _, _ = vec.step(np.array([eos, 5]))
    assert terminated.tolist() == [True, False] and rewards.tolist() == [1.0, 0.0]
    assert obs2["attention_mask"][1].sum() == obs["attention_mask"][1].sum() + 1  # one step, not two


@pytest.mark.parametrize("env_id", [e for e, kw in textenv.ENV_IDS.items() if "task" in kw])
def test_make_vec_uses_native_vector_env(env_id):
    envs = gym.make_vec(env_id, num_envs=4)
    assert isinstance(envs.unwrapped, TextGenVectorEnv)
    obs, _ = envs.reset(seed=0)
    assert obs["input_ids"].shape[0] == 4
    envs.close()


def test_reset_with_chosen_prompts(env_kwargs, tokenizer):
    vec = TextGenVectorEnv(num_envs=3, **env_kwargs)
    single = TextGenEnv(**env_kwargs)
    obs, infos = vec.reset(seed=0, options={"prompt_index": np.array([2, 2, 5])})
    assert infos["prompt_index"].tolist() == [2, 2, 5]
    for i, index in enumerate([2, 2, 5]):
        single_obs, info = single.reset(options={"prompt_index": index})
        assert info["prompt_index"] == index
        np.testing.assert_array_equal(single_obs["input_ids"], obs["input_ids"][i])
    with pytest.raises(ValueError, match="prompt_index 99 is out of range"):
        vec.reset(options={"prompt_index": np.array([0, 1, 99])})
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        vec.reset(options={"prompt_index": np.array([0, 1])})
    with pytest.raises(TypeError, match="prompt_index must be an int"):
        single.reset(options={"prompt_index": 1.5})
