"""TextGenEnv: the checkers, determinism, pickling, episode mechanics and bad input."""

from __future__ import annotations

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import textenv
from rewards import RewardError
from tests.conftest import PROMPTS, length_reward
from textenv import TextGenEnv, TextGenVectorEnv


def make_env(env_id, tokenizer, **kwargs):
    if "task" not in textenv.ENV_IDS[env_id]:  # the generic ids
        kwargs = dict(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=length_reward, **kwargs)
    return gym.make(env_id, **kwargs)


@pytest.mark.parametrize("env_id", list(textenv.ENV_IDS))
def test_checkers_pass(env_id, tokenizer):
    env = make_env(env_id, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped, skip_render_check=False)
        sb3_check_env(env, warn=True)
    env.close()
    env.close()  # twice is fine


def run_episode(env, seed, action_seed):
    rng = np.random.default_rng(action_seed)
    obs, info = env.reset(seed=seed)
    trace = [(obs, info)]
    while True:
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        trace.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            return trace


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray) and a.dtype == object:  # vector infos: final_obs dicts, strings
        assert b.dtype == object and a.shape == b.shape
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert type(a) is type(b) and a == b, (a, b)


@pytest.mark.parametrize("env_id", list(textenv.ENV_IDS))
def test_same_seed_same_episode_and_pickle(env_id, tokenizer):
    env = make_env(env_id, tokenizer)
    first = run_episode(env, seed=3, action_seed=7)
    assert_same(first, run_episode(env, seed=3, action_seed=7))
    clone = pickle.loads(pickle.dumps(env))
    assert_same(first, run_episode(clone, seed=3, action_seed=7))


def test_rgb_array_render_and_sb3_make_vec_env(env_kwargs, tokenizer):
    env = gym.make("textenv/TextGen-v1", **env_kwargs, render_mode="rgb_array").unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env, skip_render_check=False)  # through gym.make, so the checker also tries "ansi"
    env.reset(seed=0)
    blank = env.render()
    env.step(tokenizer(" fun")["input_ids"][0])
    frame = env.render()
    assert frame.shape == blank.shape == (160, 480, 3) and frame.dtype == np.uint8
    assert (frame < 128).any() and not np.array_equal(frame, blank)  # text drawn, and the new token shows
    vec = TextGenVectorEnv(num_envs=2, **env_kwargs, render_mode="rgb_array")
    vec.reset(seed=0)
    assert [f.shape for f in vec.render()] == [(160, 480, 3)] * 2
    # SB3's make_vec_env asks a string id for render_mode="rgb_array" (and only retries without it on TypeError)
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env("textenv/TextGen-v1", n_envs=2, env_kwargs={**env_kwargs})
    assert venv.reset().keys() == {"input_ids", "attention_mask"}
    venv.close()


def test_episode_mechanics(env_kwargs, tokenizer):
    env = TextGenEnv(**{**env_kwargs, "prompts": ["the film was"], "max_prompt_tokens": 8}, render_mode="ansi")
    P, T = 8, 6
    obs, info = env.reset(seed=0)
    prompt = "the film was"
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert obs["attention_mask"].tolist() == [0] * (P - n_prompt) + [1] * n_prompt + [0] * T
    token = tokenizer(" fun")["input_ids"][0]
    obs, reward, terminated, truncated, info = env.step(token)
    assert obs["input_ids"][P] == token and obs["attention_mask"][P] == 1
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert type(reward) is float and type(terminated) is bool
    assert env.render() == f"{prompt}\u2502 fun"
    obs, reward, terminated, truncated, info = env.step(tokenizer.eos_token_id)
    assert terminated and not truncated
    assert info["response"] == " fun" and info["prompt"] == prompt
    assert reward == 4.0  # length_reward of " fun"; EOS is not part of the text
    with pytest.raises(ResetNeeded, match="ended"):
        env.step(token)


def test_truncation_at_max_new_tokens(env_kwargs, tokenizer):
    env = TextGenEnv(**env_kwargs)
    env.reset(seed=1)
    token = tokenizer(" fun")["input_ids"][0]
    for _ in range(5):
        assert env.step(token)[2:4] == (False, False)
    _, reward, terminated, truncated, info = env.step(token)
    assert (terminated, truncated) == (False, True)
    assert info["response"] == " fun" * 6 and reward == 24.0


def test_bad_actions_leave_env_usable(env_kwargs):
    env = TextGenEnv(**env_kwargs)
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(5)
    env.reset(seed=0)
    for bad, err in [(-1, ValueError), (env.action_space.n, ValueError), (2.0, TypeError), ("3", TypeError),
                     (True, TypeError)]:
        with pytest.raises(err, match="action"):
            env.step(bad)
    obs, *_ = env.step(np.int64(5))  # still usable; numpy ints and 0-d arrays are fine
    env.step(np.array(5))


def test_tokenizer_without_pad_or_with_pad_equal_eos(env_kwargs, tokenizer):
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no PAD token"):
        TextGenEnv(**{**env_kwargs, "tokenizer": no_pad})
    assert no_pad.pad_token is None  # the caller's tokenizer is not mutated
    same = copy.deepcopy(tokenizer)
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="same id"):
        TextGenEnv(**{**env_kwargs, "tokenizer": same})
    assert same.pad_token == same.eos_token
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        TextGenEnv(**{**env_kwargs, "tokenizer": no_eos})


def test_overlong_prompts(env_kwargs, tokenizer):
    long_prompt = "the film was good and fun. the book was bad and slow."
    ids = tokenizer(long_prompt)["input_ids"]
    assert len(ids) > 8
    kwargs = {**env_kwargs, "prompts": [long_prompt], "max_prompt_tokens": 8}
    obs, _ = TextGenEnv(**kwargs).reset(seed=0)  # default: keep the last tokens
    assert obs["input_ids"][:8].tolist() == ids[-8:]
    obs, _ = TextGenEnv(**kwargs, truncation_side="right").reset(seed=0)
    assert obs["input_ids"][:8].tolist() == ids[:8]
    env = TextGenEnv(**kwargs)
    env.reset(seed=0)
    *_, info = env.step(tokenizer.eos_token_id)
    assert info["prompt"] == tokenizer.decode(ids[-8:])  # the reward sees what the policy saw
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens, more than max_prompt_tokens=8"):
        TextGenEnv(**kwargs, truncation_side=None)
    with pytest.raises(ValueError, match="truncation_side"):
        TextGenEnv(**kwargs, truncation_side="middle")


@pytest.mark.parametrize(
    "prompts, err, match",
    [([], ValueError, "no prompts"), (["ok", 3], TypeError, r"prompts\[1\] is a int"),
     (["ok", ""], ValueError, r"prompts\[1\] .* has no tokens"), (42, TypeError, "prompts must be")],
)
def test_bad_prompt_sources(env_kwargs, prompts, err, match):
    with pytest.raises(err, match=match):
        TextGenEnv(**{**env_kwargs, "prompts": prompts})


def test_bad_sizes_and_render_mode(env_kwargs):
    for name, value in [("max_new_tokens", 0), ("max_prompt_tokens", -3), ("vocab_size", 10)]:
        with pytest.raises(ValueError, match=name):
            TextGenEnv(**{**env_kwargs, name: value})
    with pytest.raises(ValueError, match="render_mode"):
        TextGenEnv(**env_kwargs, render_mode="human")
    with pytest.raises(ValueError, match="reward_fn"):
        TextGenEnv(prompts=PROMPTS, tokenizer=env_kwargs["tokenizer"])


@pytest.mark.parametrize(
    "reward, match",
    [
        (lambda p, c: [float("nan")] * len(c), "nan at index 0"),
        (lambda p, c: [1.0, 2.0], "2 scores for 1 completions"),
        (lambda p, c: ["high"], r"'high' \(str\) at index 0"),
        (lambda p, c: 1 / 0, "raised ZeroDivisionError"),
        (lambda p, c: None, "returned NoneType"),
    ],
)
def test_bad_reward_leaves_env_usable(env_kwargs, tokenizer, reward, match):
    env = TextGenEnv(**{**env_kwargs, "reward_fn": reward})
    obs, _ = env.reset(seed=0)
    with pytest.raises(RewardError, match=match) as excinfo:
        env.step(tokenizer.eos_token_id)
    assert "<lambda>" in str(excinfo.value)  # names the reward
    env.setup.reward_fn = length_reward  # fix the reward; the failed step changed nothing
    obs2, reward_value, terminated, _, _ = env.step(tokenizer.eos_token_id)
    np.testing.assert_array_equal(obs2["input_ids"][:16], obs["input_ids"][:16])
    assert terminated and reward_value == 0.0


def test_prompt_files(env_kwargs, tmp_path):
    import json

    import datasets

    rows = [{"prompt": p, "other": 1} for p in PROMPTS]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for source in ["p.jsonl", "p.txt", "p.csv", "p.parquet"]:
        env = TextGenEnv(**{**env_kwargs, "prompts": str(tmp_path / source)})
        assert env.setup.prompts == PROMPTS, source
    assert TextGenEnv(**{**env_kwargs, "prompts": ds}).setup.prompts == PROMPTS
    with pytest.raises(ValueError, match="no column 'text'"):
        TextGenEnv(**{**env_kwargs, "prompts": str(tmp_path / "p.jsonl"), "prompt_column": "text"})
    with pytest.raises(ValueError, match="does not exist"):
        TextGenEnv(**{**env_kwargs, "prompts": str(tmp_path / "missing.jsonl")})


@pytest.mark.parametrize("kwargs, error, match", [
    ({"tokenizer": "runs/nowhere/sft/model"}, ValueError, r"tokenizer 'runs/nowhere/sft/model': no such folder"),
    ({"tokenizer": "./missing"}, ValueError, "no such folder"),
    ({"reward_fn": "runs/nowhere/rm/model"}, ValueError, "sequence classifier 'runs/nowhere/rm/model': no such folder"),
    ({"reward_fn": "tests.conftest.length_reward"}, ValueError, r"did you mean 'tests.conftest:length_reward'\?"),
    ({"prompts": "The movie was"}, ValueError, r"a single prompt must be given as a list: prompts=\['The movie was'\]"),
    ({"prompts": "   "}, ValueError, "a single prompt must be given as a list"),
    ({"prompts": "data.json"}, ValueError, r"must end in one of .jsonl, .csv, .parquet, .txt"),
])
def test_ordinary_mistakes_name_the_fix(env_kwargs, tmp_path, kwargs, error, match):
    """Ordinary mistakes fail with the fix named, not inside the hub client or datasets (#21 item 4)."""
    with pytest.raises(error, match=match):
        TextGenEnv(**{**env_kwargs, **kwargs})
    with pytest.raises(ValueError, match="is a folder"):
        TextGenEnv(**{**env_kwargs, "prompts": str(tmp_path)})


def test_fuzzed_mistakes_from_the_outside_user_report(env_kwargs, tmp_path, tokenizer):
    """#21 item 8's crashes from inside dependencies, each now an error that names the value."""
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000000 is over textenv's limit of 65536 tokens"):
        TextGenEnv(**{**env_kwargs, "max_new_tokens": 10**12})
    with pytest.raises(ValueError, match=r"max_prompt_tokens=1000000000000 is over"):
        TextGenEnv(**{**env_kwargs, "max_prompt_tokens": 10**12})
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        TextGenEnv(**{**env_kwargs, "prompts": str(latin)})
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        TextGenEnv(**{**env_kwargs, "prompts": str(jsonl)})
    garbage = tmp_path / "prompts.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match="is not a readable parquet file"):
        TextGenEnv(**{**env_kwargs, "prompts": str(garbage)})
    not_a_model = tmp_path / "comparisons"
    not_a_model.mkdir()
    (not_a_model / "data.arrow").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a model folder \\(no config.json\\)"):
        TextGenEnv(**{**env_kwargs, "reward_fn": str(not_a_model)})
    env = TextGenEnv(**{**env_kwargs, "reward_fn": lambda p, c: [10**400] * len(c), "max_new_tokens": 1})
    env.reset(seed=0)
    with pytest.raises(RewardError, match="beyond a float's range"):
        env.step(tokenizer.eos_token_id)
