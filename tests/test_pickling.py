"""#21's pickling matrix: every registered id, and the generic id with each kind of reward (callable, import
string, GPT-2 RM folder, HF classifier folder, weighted sum), survives pickle, deepcopy and an async vector env
(worker processes), and the copies pay the single env's rewards."""

from __future__ import annotations

import copy
import importlib.util
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2ForSequenceClassification,
)

import textenv
from tests.conftest import PROMPTS, length_reward

STEPS = 4  # tokens per episode before EOS / end of turn


@pytest.fixture(scope="module")
def reward_folders(tmp_path_factory, tokenizer):
    """A GPT-2 reward model (one scalar head; its lean forward packs weights that do not pickle) and a BERT
    classifier with two labels, each a save_pretrained folder with its own tokenizer."""
    root = tmp_path_factory.mktemp("rewards")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tokenizer), n_positions=64, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    words = ["the", "film", "was", "good", "bad", "and", "slow", "fun"]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    bert_tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    BertForSequenceClassification(BertConfig(vocab_size=len(bert_tok), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                                             num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                             label2id={"NEGATIVE": 0, "POSITIVE": 1})).save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    return root


REWARDS = {
    "callable": lambda root: dict(reward_fn=length_reward),
    "import string": lambda root: dict(reward_fn="tests.conftest:length_reward"),
    "GPT-2 RM folder": lambda root: dict(reward_fn=str(root / "rm")),
    "HF classifier folder": lambda root: dict(reward_fn=str(root / "bert"), reward_kwargs={"label": "POSITIVE"}),
    "weighted sum": lambda root: dict(reward_fn={str(root / "rm"): 1.0, "tests.conftest:length_reward": 0.5}),
}


def play(env, seed: int, actions: list[int]) -> tuple[list, list[float]]:
    """One episode of a single env: (its observations' token ids, its rewards)."""
    obs, _ = env.reset(seed=seed)
    ids, rewards = [obs["input_ids"].tolist()], []
    for a in actions:
        obs, reward, terminated, truncated, _ = env.step(a)
        ids.append(obs["input_ids"].tolist())
        rewards.append(reward)
        if terminated or truncated:
            break
    return ids, rewards


def actions_for(env) -> list[int]:
    """A few ordinary tokens, then the token that ends the episode (single-turn) or the turn (multi-turn)."""
    u = env.unwrapped
    end = u.chat.end_of_turn if hasattr(u, "chat") else u.setup.eos_token_id
    return [*range(40, 40 + STEPS), end]


def same(a: tuple[list, list[float]], b: tuple[list, list[float]]) -> bool:
    return a[0] == b[0] and np.allclose(a[1], b[1], atol=1e-6)


def check_copies_and_workers(make, seeds=(0, 1)):
    """pickle and deepcopy of a single env, and an AsyncVectorEnv of `make` (Gymnasium's default context: fork on
    Linux), play each seed's episode as the original does. The original scores first, in this process: a GPT-2 RM
    packs its weights then, and torch's thread pool starts, which a forked worker must survive."""
    env = make()
    actions = actions_for(env)
    want = [play(env, s, actions) for s in seeds]
    for clone in (pickle.loads(pickle.dumps(env)), copy.deepcopy(env)):
        assert all(same(play(clone, s, actions), w) for s, w in zip(seeds, want))
    envs = gym.vector.AsyncVectorEnv([make] * len(seeds))
    try:
        obs, _ = envs.reset(seed=list(seeds))
        rewards = []
        for a in actions:
            envs.step_async(np.full(len(seeds), a))
            obs, reward, terminated, truncated, _ = envs.step_wait(timeout=60)  # a hung worker fails, not hangs
            rewards.append(reward)
            if terminated.all() or truncated.all():
                break
    finally:
        envs.close(terminate=True)
    for i, (ids, single) in enumerate(want):
        assert obs["input_ids"][i].tolist() == ids[len(rewards)]
        assert np.allclose([r[i] for r in rewards], single, atol=1e-6)


@pytest.mark.parametrize("kind", list(REWARDS))
def test_the_generic_id_with_every_reward_kind(kind, reward_folders, tokenizer):
    kwargs = dict(prompts=PROMPTS, tokenizer=tokenizer, max_new_tokens=STEPS + 2, **REWARDS[kind](reward_folders))
    check_copies_and_workers(lambda: gym.make("textenv/TextGen-v1", **kwargs))


EXTRA_PACKAGES = {"textenv/TextArena-v0": "textarena", "textenv/ReasoningGym-v0": "reasoning_gym"}


@pytest.mark.parametrize("env_id", [*textenv.ENV_IDS, *textenv.MULTITURN_IDS])
def test_every_registered_id(env_id, tokenizer):
    if env_id in EXTRA_PACKAGES and importlib.util.find_spec(EXTRA_PACKAGES[env_id]) is None:
        pytest.skip(f"{EXTRA_PACKAGES[env_id]} is not installed")
    kwargs = dict(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=length_reward) if \
        "task" not in textenv.ENV_IDS.get(env_id, {"task": None}) else {}
    check_copies_and_workers(lambda: gym.make(env_id, **kwargs))
