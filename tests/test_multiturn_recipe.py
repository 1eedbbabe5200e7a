"""The recipe on multi-turn envs: SFT's masks, the losses' masks, the RM on conversations, every stage on a user's
registered env id, and PPO's resume after SIGKILL on a multi-turn task."""

from __future__ import annotations

import json
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import textenv  # noqa: F401  (registers the ids)
from agents.core import (
    IGNORE,
    clipped_policy_loss,
    compute_gae,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    sft_loss,
)
from agents.episodes import make_episodes, turn_demonstrations
from tests.conftest import kill_after_checkpoint
from textenv.embedded import default_tokenizer
from textenv.models import build_model

USER_ID = "tests.user_envs:TestLab/SayYes-v0"  # a user's env, registered by importing its module


def test_sft_examples_train_on_the_agents_tokens_only_and_are_the_envs_stream():
    tok = default_tokenizer()
    examples = turn_demonstrations("textenv/Calculator-v0", tok, "train", 3)
    env = gym.make("textenv/Calculator-v0").unwrapped
    for i, (ids, labels) in enumerate(examples):
        expert = env.turns.demonstration(np.random.default_rng(i))  # the same episode: seed 0 + i
        # the agent playing the expert's turns token by token produces exactly these ids in the env
        env.reset(seed=i)
        for m in (m for m in expert if m["role"] == "assistant"):
            for token in env.chat.encode(m["content"]) + [env.chat.end_of_turn]:
                obs, *_ = env.step(token)
        n = int(obs["attention_mask"].sum())
        assert ids == obs["input_ids"][:n].tolist()
        agent = obs["agent_mask"][:n].astype(bool)
        assert [t for t, a in zip(ids, agent) if a] == [t for t in labels if t != IGNORE]
        assert all(lab == IGNORE for lab, a in zip(labels, agent) if not a)  # system, user, tool tokens: no loss
        contents = "".join(m["content"] + tok.eos_token for m in expert if m["role"] == "assistant")
        assert tok.decode([t for t in labels if t != IGNORE]) == contents


def test_perturbing_the_logits_at_env_tokens_changes_no_loss_and_no_kl():
    """The PPO, GRPO, RLOO and SFT losses and the KL, as the trainers compute them on a multi-turn batch, read the
    agent's tokens only: noise on the logits that predict the env's tokens (and on values there) changes nothing."""
    tok = default_tokenizer()
    torch.manual_seed(0)
    policy, ref = build_model("tiny", tok, seed=0).eval(), build_model("tiny", tok, seed=1).eval()
    episodes = make_episodes("textenv/GuessNumber-v0", num_envs=4, tokenizer=tok, reward="gold")
    batch, _ = episodes.play(policy, generator=torch.Generator().manual_seed(0), temperature=1.0, seed=0)
    mask = batch.agent_mask.bool()  # (B, T)
    assert (~mask & batch.response_mask.bool()).any(), "the batch has env tokens between agent turns"
    P = batch.prompt_ids.shape[1]
    with torch.no_grad():
        z = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, P - 1 : -1]  # (B, T, V)
        ref_logp = logprobs_from_logits(ref(input_ids=batch.input_ids).logits[:, P - 1 : -1], batch.response_ids)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)) * 5 * (~mask)[..., None]
    advantages = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    seq_adv = torch.randn(len(mask), 1, generator=torch.Generator().manual_seed(3))

    def losses(logits):
        logp = logprobs_from_logits(logits, batch.response_ids)  # (B, T)
        ppo = clipped_policy_loss(logp, batch.logprobs, advantages, mask, 0.2)[0]
        grpo = clipped_policy_loss(logp, batch.logprobs, seq_adv, mask, 0.2)[0] + \
            masked_mean(kl_estimate(logp, ref_logp, "k3"), mask)
        rloo = torch.where(mask, logp, 0.0).sum(1)  # the sequence log-prob RLOO's ratio reads
        kl = torch.where(mask, kl_estimate(logp, ref_logp), 0.0).sum(1)
        return ppo, grpo, rloo, kl

    for a, b in zip(losses(z), losses(z + noise)):
        assert torch.equal(a, b)
    # GAE's advantages and returns on the agent's tokens do not read values or rewards at the env's tokens
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(4))
    junk = torch.where(mask, 0.0, torch.randn(mask.shape, generator=torch.Generator().manual_seed(5)) * 100)
    for a, b in zip(compute_gae(batch.rewards, values, mask), compute_gae(batch.rewards + junk, values + junk, mask)):
        assert torch.equal(a, b)
    # SFT: the labels of a multi-turn demonstration are the agent's tokens; noise on the logits that predict the
    # others (their label is IGNORE) changes no loss
    ids, labels = turn_demonstrations("textenv/GuessNumber-v0", tok, "train", 1)[0]
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits  # (1, L, V)
    predicts_env = torch.cat([labels[:, 1:] == IGNORE, torch.ones(1, 1, dtype=torch.bool)], 1)  # (1, L)
    noisy = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(6)) * 5 * predicts_env[..., None]
    assert torch.equal(sft_loss(logits, labels), sft_loss(noisy, labels))


def test_reward_model_scores_conversations_alike_under_left_and_right_padding_and_in_the_env(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from agents.reward_model import score_texts
    from textenv.multiturn import MultiTurnEnv
    from textenv.turns import GuessNumber

    tok = default_tokenizer()
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tok), num_labels=1,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(config).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    episodes = make_episodes("textenv/GuessNumber-v0", num_envs=4, tokenizer=tok, reward="gold")
    batch, _ = episodes.play(build_model("tiny", tok, seed=0).eval(), generator=torch.Generator().manual_seed(0),
                             temperature=1.0, seed=0)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # conversations of different lengths: padding
    right = score_texts(rm, tok, batch.prompts, batch.responses, side="right")
    left = score_texts(rm, tok, batch.prompts, batch.responses, side="left")
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    one_by_one = torch.cat([score_texts(rm, tok, [p], [r]) for p, r in zip(batch.prompts, batch.responses)])
    torch.testing.assert_close(one_by_one, right, atol=1e-5, rtol=0)
    # the RM adapter in the env scores the whole conversation at its end, beside the turn logic's reward
    env = MultiTurnEnv(GuessNumber, reward_fn=str(tmp_path / "rm"), max_turns=2, max_turn_tokens=4, max_tokens=64)
    env.reset(seed=0)
    for token in env.chat.encode("99") + [env.chat.end_of_turn] + env.chat.encode("98") + [env.chat.end_of_turn]:
        obs, reward, terminated, truncated, info = env.step(token)
    assert truncated and not terminated  # two wrong guesses: max_turns
    n, opening = int(obs["attention_mask"].sum()), env._opening
    text = [tok.decode(obs["input_ids"][:opening].tolist())], [tok.decode(obs["input_ids"][opening:n].tolist())]
    assert reward == pytest.approx(score_texts(rm, tok, *text).item(), abs=1e-5)


def test_every_stage_accepts_a_user_registered_multi_turn_id(policy_folder, tmp_path):
    from agents.comparisons import CollectConfig, collect_comparisons
    from agents.evaluate import EvalConfig, evaluate
    from agents.grpo import GRPOConfig, grpo
    from agents.ppo import PPOConfig, ppo
    from agents.rloo import RLOOConfig, rloo
    from agents.sft import SFTConfig, sft

    policy = str(policy_folder)
    sft(SFTConfig(model=policy, task=USER_ID, out_dir=str(tmp_path / "sft"), max_steps=2, batch_size=4,
                  warmup_steps=1))
    collect_comparisons(CollectConfig(policy=policy, task=USER_ID, out_dir=str(tmp_path / "collect"), num_prompts=4,
                                      k=2, prompts_per_batch=2))
    rows = [json.loads(line) for line in (tmp_path / "collect" / "comparisons.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["prompt"].startswith("user:\nsay yes") for r in rows)
    common = dict(policy=policy, task=USER_ID, reward="gold", iterations=1, device="cpu")
    ppo(PPOConfig(**common, out_dir=str(tmp_path / "ppo"), num_envs=4, num_minibatches=2, update_epochs=1))
    grpo(GRPOConfig(**common, out_dir=str(tmp_path / "grpo"), num_prompts=2, num_generations=2, num_minibatches=2))
    rloo(RLOOConfig(**common, out_dir=str(tmp_path / "rloo"), num_prompts=2, num_generations=2, num_minibatches=2))
    for run in ("ppo", "grpo", "rloo"):
        assert (tmp_path / run / "model" / "model.safetensors").exists()
        sample = json.loads((tmp_path / run / "samples.jsonl").read_text().splitlines()[0])
        assert sample["messages"][0]["role"] == "user" and sample["messages"][1]["role"] == "assistant"
    result = evaluate(EvalConfig(policy=policy, task=USER_ID, reference=policy, num_prompts=4))
    assert result["n"] == 4 and result["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert 0.0 <= result["gold_mean"] <= 2.0 and result["samples"][0]["messages"][0]["content"].startswith("say yes")


def test_a_single_turn_setting_on_a_multi_turn_id_names_the_fix():
    with pytest.raises(ValueError, match="max_new_tokens=8 applies to single-turn tasks"):
        make_episodes("textenv/Calculator-v0", num_envs=2, tokenizer=default_tokenizer(), reward="gold",
                      max_new_tokens=8)
    with pytest.raises(ValueError, match="no registered env 'mylab/Nope-v0'"):
        make_episodes("mylab/Nope-v0", num_envs=2, tokenizer=default_tokenizer(), reward="gold")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        make_episodes("no_such_module:mylab/Nope-v0", num_envs=2, tokenizer=default_tokenizer(), reward="gold")


def test_ppo_on_a_multi_turn_task_resumes_after_sigkill_as_if_uninterrupted(policy_folder, tmp_path):
    from agents.ppo import PPOConfig, ppo

    def config(out):
        return PPOConfig(policy=str(policy_folder), task="textenv/GuessNumber-v0", reward="gold", out_dir=str(out),
                         num_envs=4, num_minibatches=2, update_epochs=2, iterations=4, save_every=1, sample_every=1,
                         lr=1e-3, device="cpu")

    ppo(config(tmp_path / "straight"))
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "agents.ppo", "--policy", str(policy_folder), "--task", "textenv/GuessNumber-v0",
            "--reward", "gold", "--out-dir", str(killed), "--num-envs", "4", "--num-minibatches", "2",
            "--update-epochs", "2", "--iterations", "4", "--save-every", "1", "--sample-every", "1", "--lr", "0.001",
            "--device", "cpu"]
    kill_after_checkpoint(args, killed)
    ppo(config(killed))
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, key in (("metrics.jsonl", "step"), ("samples.jsonl", "iteration")):
        rows = [json.loads(line) for line in (killed / name).read_text().splitlines()]
        assert sorted({r[key] for r in rows}) == [1, 2, 3, 4]
        straight = [json.loads(line) for line in (tmp_path / "straight" / name).read_text().splitlines()]
        if name == "samples.jsonl":  # the same conversations, nothing lost or duplicated
            assert rows == straight


def test_sft_on_a_users_transcripts_trains_on_the_assistant_tokens(policy_folder, tmp_path):
    """--data with --messages-column: a user's conversations in the env's message format, through the model's chat
    template, the same stream a multi-turn env builds."""
    from agents.sft import SFTConfig, load_examples, sft

    expert = gym.make("textenv/Calculator-v0").unwrapped.turns
    chats = [expert.demonstration(np.random.default_rng(i)) for i in range(40)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    cfg = SFTConfig(model=str(policy_folder), data=str(data), messages_column="messages",
                    out_dir=str(tmp_path / "sft"), max_steps=2, batch_size=4, warmup_steps=1)
    tok = default_tokenizer()
    train, valid = load_examples(cfg, tok)
    assert len(train) + len(valid) == 40 and len(valid) == 2  # every 20th held out
    env = gym.make("textenv/Calculator-v0").unwrapped
    assert train[0] == tuple(map(list, zip(*[(t, t if a else IGNORE)
                                              for t, a in zip(*env.chat.stream(chats[1]))])))
    sft(cfg)
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="role 'robot' is not one of"):
        load_examples(SFTConfig(model=str(policy_folder), data=str(bad), messages_column="messages"), tok)
