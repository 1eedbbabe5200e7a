"""The optional extras (textenv.extras): TextArena's single-player games and reasoning-gym's datasets as multi-turn
ids, held to what every id is held to (both checkers, determinism, pickling, vector == singles), played to a win, and
the reasoning-gym id taken through the recipe's stages like any other id. Skipped where the extra is not installed."""

from __future__ import annotations

import copy
import pickle
import random
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import textenv  # noqa: F401  (registers the ids)
from tests.conftest import step_beside
from tests.test_multiturn import say

EXTRAS = [pytest.param("textenv/TextArena-v0", "textarena", id="textarena"),
          pytest.param("textenv/ReasoningGym-v0", "reasoning_gym", id="reasoning-gym")]


@pytest.mark.parametrize("env_id, package", EXTRAS)
def test_checkers_determinism_and_pickle(env_id, package):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    pytest.importorskip(package)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(env_id).unwrapped)
        sb3_check_env(gym.make(env_id).unwrapped)
    env = gym.make(env_id).unwrapped
    a, _ = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    env.reset(seed=5)
    clone, copied = pickle.loads(pickle.dumps(env)), copy.deepcopy(env)
    results = [say(e, "[7]")[:4] for e in (env, clone, copied)]
    assert all(np.array_equal(r[0]["input_ids"], results[0][0]["input_ids"]) and r[1:] == results[0][1:]
               for r in results)


def guesses(env, seed: int) -> tuple[float, int, list[str]]:
    """Bisection on TextArena's GuessTheNumber (1-20) through the token env: (the last reward, turns, replies)."""
    env.reset(seed=seed)
    lo, hi, replies = 1, 20, []
    while True:
        guess = (lo + hi) // 2
        _, reward, terminated, truncated, info = say(env, f"I guess [{guess}]")
        if terminated or truncated:
            return reward, info["turn"], replies
        replies.append(env._messages[-1]["content"])
        lo, hi = (guess + 1, hi) if "higher" in replies[-1] else (lo, guess - 1)


def test_textarena_game_is_won_by_bisection_and_leaves_the_callers_random_alone():
    pytest.importorskip("textarena")
    env = gym.make("textenv/TextArena-v0").unwrapped
    random.seed(123)
    expected = random.Random(123).random()
    reward, turns, replies = guesses(env, seed=0)
    assert reward == 1.0 and 1 <= turns <= 5
    assert all(r in ("The target number is higher.", "The target number is lower.") for r in replies)
    assert random.random() == expected  # the game ran on the episode's own `random` state
    assert guesses(env, seed=0) == (reward, turns, replies)  # replayed exactly
    # an invalid move is the game's reply, not an error; its final reward is paid on the turn that ends it
    env.reset(seed=0)
    _, reward, terminated, _, _ = say(env, "no number here")
    assert (reward, terminated) == (0.0, False) and "invalid move" in env._messages[-1]["content"]


def test_textarena_vector_env_equals_single_envs():
    pytest.importorskip("textarena")
    seeds = [0, 1, 2]
    envs = gym.make_vec("textenv/TextArena-v0", num_envs=3, vectorization_mode="sync")
    singles = [gym.make("textenv/TextArena-v0").unwrapped for _ in seeds]
    obs, _ = envs.reset(seed=seeds)
    for e, s in zip(singles, seeds):
        e.reset(seed=s)
    chat = singles[0].chat
    plans = [[*chat.encode(text), chat.end_of_turn] * 4 for text in ("[10]", "my guess is [3]", "[15]")]
    step_beside(envs, singles, np.array([plan[: min(map(len, plans))] for plan in plans]).T)


def test_reasoning_gym_scores_with_the_datasets_own_verifier():
    pytest.importorskip("reasoning_gym")
    env = gym.make("textenv/ReasoningGym-v0").unwrapped
    env.reset(seed=0)
    entry = env.turns._entry
    assert env._messages == [{"role": "user", "content": entry["question"]}]
    _, reward, terminated, _, info = say(env, entry["answer"])
    assert (reward, terminated) == (1.0, True) and info["messages"][-1]["content"] == entry["answer"]
    env.reset(seed=0)
    assert say(env, "12345678")[1:3] == (0.0, True)
    # two attempts, the answer in a tag: a wrong first answer gets another turn
    env = gym.make("textenv/ReasoningGym-v0", max_turns=2,
                   turn_kwargs={"dataset": "basic_arithmetic", "attempts": 2, "answer_tag": "answer"}).unwrapped
    env.reset(seed=1)
    answer = env.turns._entry["answer"]
    assert say(env, f"<answer>{answer}1</answer>")[1:3] == (0.0, False)
    assert env._messages[-1] == {"role": "user", "content": "That is not correct. Try again."}
    assert say(env, f"it is <answer>{answer}</answer>")[1:3] == (1.0, True)


def test_reasoning_gym_goes_through_the_recipe_like_any_id(policy_folder, tmp_path):
    pytest.importorskip("reasoning_gym")
    from agents.grpo import GRPOConfig, grpo
    from agents.sft import SFTConfig, sft

    task = "textenv/ReasoningGym-v0"
    sft(SFTConfig(model=str(policy_folder), task=task, out_dir=str(tmp_path / "sft"), max_steps=2, batch_size=4,
                  warmup_steps=1))
    grpo(GRPOConfig(policy=str(tmp_path / "sft" / "model"), task=task, reward="gold", iterations=1, device="cpu",
                    out_dir=str(tmp_path / "grpo"), num_prompts=2, num_generations=2, num_minibatches=2))
    assert (tmp_path / "grpo" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("env_id, kwargs, match", [
    ("textenv/TextArena-v0", {"game": "NoSuchGame-v0"}, "is not a TextArena env id"),
    ("textenv/ReasoningGym-v0", {"dataset": "no_such_data"}, "is not a reasoning-gym dataset"),
    ("textenv/ReasoningGym-v0", {"attempts": 0}, "attempts must be a positive int"),
    ("textenv/ReasoningGym-v0", {"answer_tag": "<a>"}, "answer_tag must be None or a tag name"),
])
def test_bad_arguments_name_the_fix(env_id, kwargs, match):
    pytest.importorskip("textarena" if "Arena" in env_id else "reasoning_gym")
    with pytest.raises(ValueError, match=match):
        gym.make(env_id, turn_kwargs=kwargs)


@pytest.mark.parametrize("env_id, package, extra", [("textenv/TextArena-v0", "textarena", "textarena"),
                                                    ("textenv/ReasoningGym-v0", "reasoning_gym", "reasoning-gym")])
def test_a_missing_extra_names_the_pip_command(monkeypatch, env_id, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # import now fails as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'textenv\[{extra}\]'"):
        gym.make(env_id)
