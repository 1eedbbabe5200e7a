"""Instruct checkpoints: a tokenizer with a chat template of its own prompts its model through that template
everywhere (the env, SFT, sampling, evaluation), str prompts as user messages; the embedded base model, whose
template exists for the multi-turn envs, keeps plain text; `prompt_format` overrides either way."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import textenv  # noqa: F401  (registers the ids)
from agents.core import IGNORE
from agents.data import encode_pairs
from tests.test_multiturn import CHATML, with_template
from textenv import TextGenEnv
from textenv.chat import ChatFormat
from textenv.embedded import default_tokenizer
from textenv.models import build_model

# ChatML with a default system prompt, as Qwen2.5's template writes one: 20-odd tokens before the user's
SYSTEM = "You are a helpful assistant who answers every question briefly and kindly."
INSTRUCT = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
            + CHATML)
PROMPTS = ["I think that the show", "The food was"]


def count(reward_prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture
def instruct(tokenizer):
    return with_template(tokenizer, INSTRUCT, ["<|im_start|>", "<|im_end|>"])


def user_rendering(tok, prompt: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


def test_str_prompts_reach_an_instruct_model_through_its_template_uncut(instruct):
    env = TextGenEnv(prompts=PROMPTS, tokenizer=instruct, reward_fn=count, max_new_tokens=4)
    im_end = instruct.convert_tokens_to_ids("<|im_end|>")
    for i, prompt in enumerate(PROMPTS):
        obs, _ = env.reset(options={"prompt_index": i})
        expected = user_rendering(instruct, prompt)
        assert len(expected) > 16  # the system prompt alone is longer than the bare prompts
        assert obs["input_ids"][obs["attention_mask"] == 1].tolist() == expected  # the default budget cut nothing
        assert env.step(instruct.eos_token_id)[2:4] == (False, False)  # EOS is an ordinary token here
        _, reward, terminated, _, info = env.step(im_end)
        assert terminated and info["prompt"] == instruct.decode(expected) and reward == float(len(info["response"]))


def test_text_format_the_v0_ids_and_the_embedded_base_model_keep_plain_text(instruct):
    plain = TextGenEnv(prompts=PROMPTS, tokenizer=instruct, reward_fn=count, max_prompt_tokens=16,
                       prompt_format="text")
    v0 = gym.make("textenv/TextGen-v0", prompts=PROMPTS, tokenizer=instruct, reward_fn=count,
                  max_prompt_tokens=16).unwrapped
    bare = instruct(PROMPTS[0], add_special_tokens=False)["input_ids"]
    for env in (plain, v0):
        obs, _ = env.reset(options={"prompt_index": 0})
        assert obs["input_ids"][obs["attention_mask"] == 1].tolist() == bare
        assert env.step(instruct.eos_token_id)[2]  # EOS ends a plain-text episode
    base = default_tokenizer()  # has the embedded template, for the multi-turn envs
    auto, text = (TextGenEnv(prompts=PROMPTS, tokenizer=base, reward_fn=count, prompt_format=f)
                  for f in ("auto", "text"))
    assert np.array_equal(auto.setup.prompt_ids, text.setup.prompt_ids) and auto.setup.prompts == PROMPTS
    chat = TextGenEnv(prompts=PROMPTS, tokenizer=base, reward_fn=count, prompt_format="chat")
    assert chat.setup.prompts[0] == "user:\nI think that the show<|endoftext|>\nassistant:\n"


def test_bad_prompt_formats_name_the_value_and_the_fix(tokenizer, instruct):
    from agents.episodes import make_episodes
    from agents.sft import SFTConfig

    with pytest.raises(ValueError, match=r"prompt_format must be one of \('auto', 'text', 'chat'\), got 'jinja'"):
        TextGenEnv(prompts=PROMPTS, tokenizer=instruct, reward_fn=count, prompt_format="jinja")
    with pytest.raises(ValueError, match="prompt_format='chat' but tokenizer .* has no chat template"):
        TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=count, prompt_format="chat")
    with pytest.raises(ValueError, match=r"prompts\[0\] is a message list, which only a chat template renders"):
        TextGenEnv(prompts=[[{"role": "user", "content": "hi"}]], tokenizer=instruct, reward_fn=count,
                   prompt_format="text")
    with pytest.raises(ValueError, match="prompt_format='text' applies to single-turn tasks"):
        make_episodes("textenv/GuessNumber-v0", num_envs=1, tokenizer=default_tokenizer(), reward=None,
                      prompt_format="text")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        SFTConfig(prompt_format="plain")


def test_sft_encodes_a_demonstration_as_the_env_streams_the_same_reply(instruct):
    pairs = [{"prompt": p, "response": " it was good"} for p in PROMPTS]
    chat = ChatFormat(instruct)
    for (ids, labels), pair in zip(encode_pairs(instruct, pairs, None, 64), pairs):
        stream, agent = chat.stream([{"role": "user", "content": pair["prompt"]},
                                     {"role": "assistant", "content": pair["response"]}])
        assert ids == stream and labels == [t if a else IGNORE for t, a in zip(stream, agent)]
        assert ids[-1] == instruct.convert_tokens_to_ids("<|im_end|>")
    (ids, labels), = encode_pairs(instruct, pairs[:1], 64, 64, prompt_format="text")
    bare = instruct(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert ids[: len(bare)] == bare and ids[-1] == instruct.eos_token_id and labels[: len(bare)] == [IGNORE] * len(bare)


def test_dpo_encodes_a_pair_as_the_env_streams_each_reply_whether_or_not_the_prompt_came_rendered(instruct):
    """A user's preference file holds plain prompts; textenv's own comparisons hold the rendering the env showed.
    DPO encodes both as the env streams the reply (system prompt, user turn, generation prompt, the response, the
    template's end-of-turn token), never wrapping a rendered prompt twice; "text" keeps plain text and EOS."""
    from agents.dpo import DPOConfig, encode_triples

    chat = ChatFormat(instruct)
    rendered = chat.render([{"role": "user", "content": PROMPTS[0]}], True)
    triples = [(PROMPTS[0], " it was good", " bad"), (rendered, " it was good", " bad")]
    encoded = encode_triples(instruct, triples, DPOConfig())
    stream, _ = chat.stream([{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": " it was good"}])
    for prompt, chosen, rejected in encoded:
        assert prompt + chosen == stream and len(prompt) > 16  # the system prompt is there, uncut by the budget of 64
        assert rejected[-1] == chosen[-1] == instruct.convert_tokens_to_ids("<|im_end|>")
    (prompt, chosen, _), = encode_triples(instruct, triples[:1], DPOConfig(prompt_format="text"))
    assert prompt == instruct(PROMPTS[0], add_special_tokens=False)["input_ids"] and chosen[-1] == instruct.eos_token_id


def test_the_reward_model_reads_each_comparison_prompt_as_the_env_shows_it(instruct):
    """The RM scores the env's rendered prompt in the RL stages, so it trains on that: a plain prompt (a user's
    preference file) is rendered, a rendered one (textenv's own comparisons) kept; the rows given stay as they were."""
    from agents.reward_model import shown_rows

    rendered = ChatFormat(instruct).render([{"role": "user", "content": PROMPTS[1]}], True)
    rows = [{"prompt": PROMPTS[0], "responses": ["a", "b"], "ranking": [0, 1]},
            {"prompt": rendered, "responses": ["c", "d"], "ranking": [1, 0]}]
    shown = shown_rows(rows, instruct, "auto")
    assert [r["prompt"] for r in shown] == [instruct.decode(user_rendering(instruct, PROMPTS[0])), rendered]
    assert rows[0]["prompt"] == PROMPTS[0] and shown[1]["responses"] == ["c", "d"]
    assert [r["prompt"] for r in shown_rows(rows, instruct, "text")] == [PROMPTS[0], rendered]


@pytest.fixture
def instruct_folder(instruct, tmp_path):
    folder = tmp_path / "instruct"
    build_model("tiny", instruct, seed=0).save_pretrained(folder)
    instruct.save_pretrained(folder)
    return folder


def test_every_stage_prompts_an_instruct_folder_through_its_template(instruct_folder, instruct, tmp_path):
    from agents.comparisons import CollectConfig, collect_comparisons
    from agents.dpo import DPOConfig, dpo
    from agents.evaluate import EvalConfig, evaluate
    from agents.ppo import PPOConfig, ppo
    from agents.sft import SFTConfig, load_examples, sft
    from textenv.tasks import get_task

    policy, opening = str(instruct_folder), "<|im_start|>system\n" + SYSTEM
    cfg = SFTConfig(model=policy, out_dir=str(tmp_path / "sft"), max_steps=2, batch_size=4, warmup_steps=1)
    train, _ = load_examples(cfg, instruct)
    demo = get_task("sentiment").demonstrations("train")[0]
    assert train[0][0][: len(user_rendering(instruct, demo["prompt"]))] == user_rendering(instruct, demo["prompt"])
    sft(cfg)
    collect_comparisons(CollectConfig(policy=policy, out_dir=str(tmp_path / "collect"), num_prompts=4, k=2,
                                      prompts_per_batch=2))
    rows = [json.loads(line) for line in (tmp_path / "collect" / "comparisons.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith(opening) and r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    dpo(DPOConfig(policy=policy, comparisons=str(tmp_path / "collect"), out_dir=str(tmp_path / "dpo"), batch_size=2,
                  max_steps=1, pairs="all"))  # on the rendered prompts as they are
    ppo(PPOConfig(policy=policy, reward="gold", iterations=1, device="cpu", out_dir=str(tmp_path / "ppo"),
                  num_envs=4, num_minibatches=2, update_epochs=1))
    sample = json.loads((tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith(opening)
    result = evaluate(EvalConfig(policy=policy, num_prompts=4, batch_size=4))
    assert result["samples"][0]["prompt"].startswith(opening) and np.isfinite(result["perplexity"])
    text = evaluate(EvalConfig(policy=policy, num_prompts=4, batch_size=4, prompt_format="text"))
    assert not text["samples"][0]["prompt"].startswith("<|im_start|>")
    assert text["perplexity"] != result["perplexity"]  # the demonstrations were scored in another encoding
