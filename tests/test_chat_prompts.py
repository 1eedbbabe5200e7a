"""Chat prompts in the single-turn envs: a message list is rendered by the tokenizer's own chat template, token for
token, the episode ends at the template's end-of-turn token, and the reward reads the prompt the policy saw."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from tests.conftest import step_beside
from tests.test_multiturn import CHATML, LLAMA3, with_template
from textenv import TextGenEnv, TextGenVectorEnv
from textenv.embedded import default_tokenizer

CHATS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
         [{"role": "user", "content": "Say yes."}]]


def seen(prompts, completions, **kwargs):
    """A reward that records what it was given."""
    seen.calls.append((list(prompts), list(completions)))
    return [float(len(c)) for c in completions]


@pytest.fixture(params=["chatml", "llama3"])
def chat_tokenizer(request, tokenizer):
    if request.param == "chatml":
        return with_template(tokenizer, CHATML, ["<|im_start|>", "<|im_end|>"]), "<|im_end|>"
    return with_template(tokenizer, LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"]), "<|eot_id|>"


def test_the_prompt_is_the_templates_rendering_and_the_turn_ends_at_its_end_of_turn(chat_tokenizer):
    tok, end_of_turn = chat_tokenizer
    seen.calls = []
    env = TextGenEnv(prompts=CHATS, tokenizer=tok, reward_fn=seen, max_new_tokens=8, max_prompt_tokens=64)
    for i, messages in enumerate(CHATS):
        obs, _ = env.reset(options={"prompt_index": i})
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert obs["input_ids"][obs["attention_mask"] == 1][: len(expected)].tolist() == list(expected)
        # EOS is an ordinary token in a chat episode; the template's end-of-turn token ends it
        word = tok("blue", add_special_tokens=False)["input_ids"]
        for token in [*word, tok.eos_token_id]:
            assert env.step(token)[2:4] == (False, False)
        _, reward, terminated, truncated, info = env.step(tok.convert_tokens_to_ids(end_of_turn))
        assert (terminated, truncated) == (True, False)
        assert info["prompt"] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert seen.calls[-1] == ([info["prompt"]], ["blue"]) and reward == 4.0


def test_vector_env_equals_single_envs_and_both_checkers_pass():
    tok = default_tokenizer()  # the embedded template closes turns with EOS
    kwargs = dict(prompts=CHATS, tokenizer=tok, reward_fn=seen, max_new_tokens=6, max_prompt_tokens=48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make("textenv/TextGen-v1", **kwargs).unwrapped, skip_render_check=False)
        sb3_check_env(TextGenEnv(**kwargs), warn=True)
    envs, singles = TextGenVectorEnv(num_envs=2, **kwargs), [TextGenEnv(**kwargs) for _ in range(2)]
    obs, _ = envs.reset(options={"prompt_index": np.array([0, 1])})
    for i, e in enumerate(singles):
        assert np.array_equal(e.reset(options={"prompt_index": i})[0]["input_ids"], obs["input_ids"][i])
    actions = np.random.default_rng(0).integers(2, len(tok), size=(6, 2))
    actions[3, 0] = tok.eos_token_id  # row 0 ends at step 4, row 1 at the length limit
    step_beside(envs, singles, actions)


def test_a_jsonl_column_of_message_lists(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"prompt": m}) + "\n" for m in CHATS))
    env = gym.make("textenv/TextGen-v1", prompts=str(path), tokenizer=default_tokenizer(), reward_fn=seen).unwrapped
    assert env.setup.prompts[1] == "user:\nSay yes.<|endoftext|>\nassistant:\n"


@pytest.mark.parametrize("prompts, error, match", [
    ([CHATS[0], "a plain prompt"], TypeError, r"prompts\[1\] is a str .* among message lists"),
    ([[]], ValueError, r"prompts\[0\] is an empty message list"),
    ([[{"role": "robot", "content": "hi"}]], ValueError, r"prompts\[0\], message 0: role 'robot'"),
    ([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]], ValueError,
     "ends with an assistant message"),
    ([{"role": "user", "content": "hi"}], TypeError, r"prompts\[0\] is a dict"),
])
def test_bad_chat_prompts_name_the_fix(prompts, error, match):
    with pytest.raises(error, match=match):
        TextGenEnv(prompts=prompts, tokenizer=default_tokenizer(), reward_fn=seen)


def test_a_tokenizer_without_a_template_names_the_fix(tokenizer):
    with pytest.raises(ValueError, match="has no chat template"):
        TextGenEnv(prompts=CHATS, tokenizer=tokenizer, reward_fn=seen)
