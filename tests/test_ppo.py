"""PPO: the implementation details that the RLHF references agree on, a smoke run, resume and failure stops."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from agents.core import clipped_policy_loss, clipped_value_loss, kl_estimate
from agents.ppo import NonFiniteError, PPOConfig, policy_forward, ppo, value_forward
from agents.sampler import rollout
from tests.conftest import kill_after_checkpoint
from textenv import TextGenVectorEnv
from textenv.embedded import default_tokenizer
from textenv.models import load_sequence_classifier


def tiny_config(policy_folder, out_dir, **kw):
    base = dict(
        policy=str(policy_folder), reward="tests.conftest:length_reward", out_dir=str(out_dir), num_envs=8,
        num_minibatches=2, update_epochs=2, iterations=3, max_new_tokens=6, save_every=1, sample_every=1,
        lr=1e-3, device="cpu",
    )
    return PPOConfig(**{**base, **kw})


def test_first_minibatch_kl_zero_ratio_one(policy_folder):
    from textenv.models import load_causal_lm

    policy, ref = load_causal_lm(policy_folder), load_causal_lm(policy_folder)
    envs = TextGenVectorEnv(num_envs=8, task="sentiment", tokenizer=default_tokenizer(),
                            reward_fn=lambda p, c: [0.0] * len(c), max_new_tokens=6)
    batch = rollout(policy.eval(), envs, torch.Generator().manual_seed(0), temperature=0.7, seed=0)
    P = envs.setup.max_prompt_tokens
    with torch.no_grad():
        full_logp, _, _ = policy_forward(policy, batch.input_ids, batch.attention_mask, P, 0.7)
        ref_logp, _, _ = policy_forward(ref, batch.input_ids, batch.attention_mask, P, 0.7)
    mask = batch.response_mask.float()
    assert torch.equal(kl_estimate(full_logp, ref_logp) * mask, torch.zeros_like(mask))  # same computation: exact
    # PPO's "old" log-probs are the sampler's (KV-cached, one token at a time): equal up to float rounding
    logp = batch.logprobs
    assert torch.equal(logp * mask, logp) and (logp[mask.bool()] < 0).all()
    torch.testing.assert_close(kl_estimate(logp, ref_logp) * mask, torch.zeros_like(mask), atol=1e-5, rtol=0)
    policy.train()  # the update runs in train mode: with dropout off, the ratio is 1
    new_logp, _, _ = policy_forward(policy, batch.input_ids, batch.attention_mask, P, 0.7)
    ratio = torch.exp(new_logp - logp)[mask.bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    _, clipfrac, approx_kl = clipped_policy_loss(new_logp, logp, torch.randn_like(logp), mask, 0.2)
    assert clipfrac.item() == 0.0 and approx_kl.item() < 1e-10


def test_padded_vocabulary_log_probs_match_the_sampler():
    """A model with more logits than tokenizer entries (a padded embedding, as Pythia's or Qwen's): the sampler
    never draws the extra ids, so the loss's log-probs must leave them out too, or the first ratio is not 1."""
    from transformers import GPT2LMHeadModel

    from textenv.models import preset_config

    tok = default_tokenizer()
    config = preset_config("tiny", tok)
    config.vocab_size = len(tok) + 8
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        policy.transformer.wte.weight[len(tok) :] = 0.5  # tied head: the padding rows get real probability mass
    envs = TextGenVectorEnv(num_envs=4, task="sentiment", tokenizer=tok, reward_fn=lambda p, c: [0.0] * len(c),
                            max_new_tokens=5)
    batch = rollout(policy, envs, torch.Generator().manual_seed(0), temperature=0.7, seed=0)
    P, mask = envs.setup.max_prompt_tokens, batch.response_mask.bool()
    with torch.no_grad():
        kept, _, _ = policy_forward(policy, batch.input_ids, batch.attention_mask, P, 0.7, vocab_size=len(tok))
        every, _, _ = policy_forward(policy, batch.input_ids, batch.attention_mask, P, 0.7)
    torch.testing.assert_close(kept[mask], batch.logprobs[mask], atol=1e-5, rtol=0)
    assert (every[mask] < kept[mask] - 1e-3).all()  # the padding rows' mass, which the sampler never draws


def test_logprobs_equal_plain_hf_forward_and_ignore_left_padding(policy_folder):
    from textenv.models import load_causal_lm

    policy = load_causal_lm(policy_folder).eval()
    tok = default_tokenizer()
    prompts, responses = ["The film was", "I watched this movie last night and it"], [" good and fun.", " bored me"]
    P = 12
    rows = []
    for p, r in zip(prompts, responses):
        p_ids, r_ids = tok(p)["input_ids"], tok(r)["input_ids"]
        rows.append((p_ids, r_ids))
    T = max(len(r) for _, r in rows)
    ids = torch.full((2, P + T), tok.pad_token_id)
    mask = torch.zeros(2, P + T, dtype=torch.long)
    for i, (p_ids, r_ids) in enumerate(rows):
        ids[i, P - len(p_ids) : P] = torch.tensor(p_ids)
        ids[i, P : P + len(r_ids)] = torch.tensor(r_ids)
        mask[i, P - len(p_ids) : P + len(r_ids)] = 1
    with torch.no_grad():
        logp, _, _ = policy_forward(policy, ids, mask, P, temperature=0.5)
        for i, (p_ids, r_ids) in enumerate(rows):  # each alone, unpadded, through a plain HF forward
            x = torch.tensor([p_ids + r_ids])
            logits = policy(input_ids=x).logits[0, len(p_ids) - 1 : -1] / 0.5
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, : len(r_ids)], want, atol=1e-5, rtol=1e-5)


def test_nothing_after_eos_carries_loss(policy_folder):
    torch.manual_seed(0)
    logp = torch.randn(2, 4, requires_grad=True)
    values = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    pg, _, _ = clipped_policy_loss(logp, logp.detach() + 0.1, torch.randn(2, 4), mask, 0.2)
    vf, _ = clipped_value_loss(values, values.detach() + 0.1, torch.randn(2, 4), mask, 0.2)
    (pg + vf).backward()
    assert (logp.grad[0, 2:] == 0).all() and (values.grad[0, 2:] == 0).all()
    assert (logp.grad[1] != 0).all() and (values.grad[1] != 0).all()


def test_value_model_reads_per_token_values(policy_folder):
    value_model = load_sequence_classifier(policy_folder, num_labels=1).eval()
    value_model.config.pad_token_id = 0
    ids = torch.tensor([[0, 0, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        v = value_forward(value_model, ids, mask, P=4)  # (1, 2): values before response tokens 0 and 1
        # V(prompt + response[:1]) is the classifier's score of the unpadded [5, 6, 7]
        full = value_model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, 0]
    assert v.shape == (1, 2)
    torch.testing.assert_close(v[0, 1], full, atol=1e-5, rtol=1e-5)


def test_smoke_run_changes_every_parameter(policy_folder, tmp_path):
    final = ppo(tiny_config(policy_folder, tmp_path / "run"))
    before = load_file(policy_folder / "model.safetensors")
    after = load_file(final / "model.safetensors")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2, 3]
    for row in lines:
        for key in ("objective/kl", "objective/scores", "objective/entropy", "objective/non_score_reward",
                    "losses/policy_loss", "losses/value_loss", "losses/approx_kl", "losses/clipfrac",
                    "losses/explained_variance", "charts/tokens_per_s", "objective/kl_coef", "objective/gold"):
            assert key in row and row[key] == row[key], key  # present and not NaN
    value_after = load_file(tmp_path / "run" / "value_model" / "model.safetensors")
    assert any(not torch.equal(value_after[k], v)
               for k, v in load_file(policy_folder / "model.safetensors").items() if k in value_after)
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert json.loads(samples[0]).keys() == {"iteration", "prompt", "response", "score", "gold"}


def test_value_warmup_trains_only_the_value_model_first(policy_folder, tmp_path, monkeypatch):
    """With value_warmup_iterations=2 the policy keeps its initial weights (and so its rollouts keep KL 0) through
    iterations 1 and 2 while the value model trains; iteration 3 trains both."""
    import agents.ppo as ppo_module

    saved = []  # (policy, value model) weights at each iteration's checkpoint
    real_save = ppo_module.save_checkpoint

    def recording_save(ckpt_dir, models, *args, **kw):
        saved.append({name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in models.items()})
        return real_save(ckpt_dir, models, *args, **kw)

    monkeypatch.setattr(ppo_module, "save_checkpoint", recording_save)
    ppo(tiny_config(policy_folder, tmp_path / "run", value_warmup_iterations=2))
    initial = load_file(policy_folder / "model.safetensors")
    assert len(saved) == 3
    for it in (0, 1):  # after iterations 1 and 2: the policy as it started, the value model moving
        assert all(torch.equal(saved[it]["policy"][k], initial[k]) for k in initial), it
    value_keys = saved[0]["value"].keys()
    assert any(not torch.equal(saved[0]["value"][k], saved[1]["value"][k]) for k in value_keys)
    assert any(not torch.equal(saved[2]["policy"][k], initial[k]) for k in initial)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [abs(r["objective/kl"]) < 1e-4 for r in rows] == [True, True, True]  # iteration 3's rollout: unchanged
    for bad in (dict(value_warmup_iterations=3), dict(value_warmup_iterations=-1),
                dict(value_warmup_iterations=1, shared_value_head=True)):
        with pytest.raises(ValueError, match="value_warmup_iterations"):
            tiny_config(policy_folder, tmp_path / "refused", **bad)


def test_micro_batches_make_the_same_update(policy_folder, tmp_path):
    """Gradient accumulation over micro-batches is the minibatch's update, up to float rounding."""
    kw = dict(iterations=1, update_epochs=1, num_minibatches=1, lr=1e-4)
    whole = ppo(tiny_config(policy_folder, tmp_path / "whole", micro_batch_size=None, **kw))
    micro = ppo(tiny_config(policy_folder, tmp_path / "micro", micro_batch_size=3, **kw))  # 8 rows: 3 + 3 + 2
    a, b = load_file(whole / "model.safetensors"), load_file(micro / "model.safetensors")
    before = load_file(policy_folder / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert any(not torch.equal(a[k], before[k]) for k in a)


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_values_are_the_rollout_value_models(policy_folder, tmp_path, monkeypatch, num_minibatches):
    """GAE's values equal a plain forward of the value model as it was at the rollout, on every row: those of
    epoch 0's first minibatch come from the update's own value forward (with grad), the others from the rollout's
    no-grad forward (with num_minibatches=1 there are none)."""
    import copy

    import agents.ppo as ppo_module

    seen = {}
    real_load, real_gather, real_gae = (ppo_module.load_sequence_classifier, ppo_module.gather_rollout,
                                        ppo_module.compute_gae)

    def load(*args, **kw):
        model = real_load(*args, **kw)
        seen["value_model"] = copy.deepcopy(model)  # before any update
        return model

    def gather(dist, batch):
        seen.setdefault("batch", batch)
        return real_gather(dist, batch)

    def gae(rewards, values, *args, **kw):
        if values.shape[0] == 8:  # the whole batch's call, after the first minibatch's value pass
            seen.setdefault("values", values.clone())
        return real_gae(rewards, values, *args, **kw)

    monkeypatch.setattr(ppo_module, "load_sequence_classifier", load)
    monkeypatch.setattr(ppo_module, "gather_rollout", gather)
    monkeypatch.setattr(ppo_module, "compute_gae", gae)
    ppo(tiny_config(policy_folder, tmp_path / "run", iterations=1, num_minibatches=num_minibatches, micro_batch_size=3))
    batch, value_model = seen["batch"], seen["value_model"]
    value_model.config.pad_token_id = 0
    mask = batch.response_mask.bool()
    with torch.no_grad():
        expected = value_forward(value_model.eval(), batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1])
    torch.testing.assert_close(seen["values"][mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert (seen["values"][mask] != 0).all()


def test_shared_value_head_runs(policy_folder, tmp_path):
    ppo(tiny_config(policy_folder, tmp_path / "run", shared_value_head=True, iterations=1, ptx_coef=0.5))
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_sigkill_then_resume_equals_uninterrupted(policy_folder, tmp_path):
    cfg = tiny_config(policy_folder, tmp_path / "straight", iterations=4)
    ppo(cfg)
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "agents.ppo", "--policy", str(policy_folder), "--reward", cfg.reward,
            "--out-dir", str(killed), "--num-envs", "8", "--num-minibatches", "2", "--update-epochs", "2",
            "--iterations", "4", "--max-new-tokens", "6", "--save-every", "1", "--sample-every", "1",
            "--lr", "0.001", "--device", "cpu"]
    kill_after_checkpoint(args, killed)
    ppo(tiny_config(policy_folder, killed, iterations=4))
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


SCORED = {"n": 0}


def overflowing_reward(prompts, completions, **kw):
    """Length reward for the first 16 completions (two iterations of 8 envs), then a finite score whose square
    overflows float32, so the value loss turns inf in iteration 3."""
    SCORED["n"] += len(completions)
    return [3e38 if SCORED["n"] > 16 else float(len(c)) for c in completions]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(policy_folder, tmp_path):
    SCORED["n"] = 0
    with pytest.raises(NonFiniteError, match="non-finite .* at iteration 3"):
        ppo(tiny_config(policy_folder, tmp_path / "run", iterations=4, reward="tests.test_ppo:overflowing_reward",
                        missing_eos_penalty=None))
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["iteration"] == 2
    weights = load_file(ckpt / "policy" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("num_labels", [1, 2])
def test_any_classifier_reward_trains_by_default(policy_folder, tmp_path, capsys, num_labels):
    """The value model starts from the reward model when it can (one output, the policy's vocabulary), else from
    the policy with a fresh scalar head (an HF classifier with two labels used to fail loading as one output)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = default_tokenizer()
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tok), n_positions=64, num_labels=num_labels,
                        pad_token_id=tok.pad_token_id, id2label={i: f"L{i}" for i in range(num_labels)})
    reward = tmp_path / "classifier"
    GPT2ForSequenceClassification(config).save_pretrained(reward)
    tok.save_pretrained(reward)
    label = None if num_labels == 1 else "L1"
    ppo(tiny_config(policy_folder, tmp_path / "run", reward=str(reward), reward_label=label, iterations=1))
    chosen = str(reward) if num_labels == 1 else str(policy_folder)
    assert f"ppo: value model initialised from {chosen}" in capsys.readouterr().out
    assert (tmp_path / "run" / "value_model" / "model.safetensors").exists()


def test_user_prompts_longer_than_the_tasks_budget_are_not_cut(policy_folder, tmp_path):
    """(#21 item 11) With --prompts, the prompt budget follows the prompts (the sentiment task's is 16 tokens):
    the policy sees every prompt whole; --max-prompt-tokens still sets it by hand."""
    tok = default_tokenizer()
    long_prompt = "the film was " + "very " * 40 + "long and"
    path = tmp_path / "prompts.txt"
    path.write_text(long_prompt + "\nthe book was\n")
    n = len(tok(long_prompt, add_special_tokens=False)["input_ids"])
    assert n > 16
    ppo(tiny_config(policy_folder, tmp_path / "run", prompts=str(path), iterations=1, sample_every=1))
    seen = {json.loads(line)["prompt"] for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()}
    assert long_prompt in seen  # whole, not its last 16 tokens
    ppo(tiny_config(policy_folder, tmp_path / "cut", prompts=str(path), iterations=1, max_prompt_tokens=8))
    seen = {json.loads(line)["prompt"] for line in (tmp_path / "cut" / "samples.jsonl").read_text().splitlines()}
    assert long_prompt not in seen and any(long_prompt.endswith(s) for s in seen)
    # the sentiment task's gold scorer does not apply to a user's prompts: no gold is claimed, in metrics or samples
    for run in ("run", "cut"):
        for name in ("metrics.jsonl", "samples.jsonl"):
            rows = [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]
            assert rows and not any("objective/gold" in r or "gold" in r for r in rows), (run, name)


def test_a_refused_kl_setting_writes_no_run_folder(policy_folder, tmp_path):
    """The KL controller's checks run when the config is built, so a bad value never reaches a run folder (whose
    recorded config a corrected rerun would then clash with); a fixed coefficient of 0 turns the penalty off."""
    for bad in (dict(kl_coef=0.0), dict(kl_coef=-0.1, kl_target=None), dict(kl_horizon=0)):
        with pytest.raises(ValueError, match="kl_coef|horizon"):
            tiny_config(policy_folder, tmp_path / "run", **bad)
    assert not (tmp_path / "run").exists()
    assert tiny_config(policy_folder, tmp_path / "run", kl_coef=0.0, kl_target=None).kl_coef == 0.0
