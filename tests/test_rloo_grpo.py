"""RLOO / REINFORCE and GRPO: the group advantages against hand-computed tables, smoke runs, resume, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import agents.groups
import agents.grpo
import agents.lora
import agents.rloo
from agents.core import group_advantages, grpo_advantages, kl_estimate
from agents.grpo import GRPOConfig, grpo
from agents.rloo import RLOOConfig, rloo

KEYS = ("objective/scores", "objective/gold", "objective/entropy", "losses/policy_loss", "losses/approx_kl",
        "losses/clipfrac", "charts/tokens_per_s", "charts/rollout_tokens_per_s", "time/rollout_s", "time/update_s",
        "time/iteration_s")


# ---- pure functions ----

def test_rloo_baseline_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # leave-one-out means: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    want = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    torch.testing.assert_close(group_advantages(r, 4, "rloo"), want)
    torch.testing.assert_close(group_advantages(r, 4, "mean"), torch.tensor([-2.0, -1.0, 0.0, 3.0]))
    torch.testing.assert_close(group_advantages(r, 4, "none"), r)


def test_rloo_two_groups_stay_apart():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 4.0])
    second = torch.tensor([0 - 8 / 3, 0 - 8 / 3, 4 - 4 / 3, 4 - 4 / 3])
    torch.testing.assert_close(group_advantages(r, 4, "rloo"),
                               torch.cat([torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0, 4]), second]))
    # k = 2: the leave-one-out baseline is the other response, A = r_i - r_j
    torch.testing.assert_close(group_advantages(r, 2, "rloo"), torch.tensor([-1.0, 1.0, -3.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(r, 2, "mean"), torch.tensor([-0.5, 0.5, -1.5, 1.5, 0.0, 0.0, 0.0, 0.0]))


def test_grpo_normalisation_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 2.0, 2.0, 2.0, 4.0])
    # group 1: mean 3, deviations (-2, -1, 0, 3), unbiased var 14 / 3; group 2: mean 2.5, var (3 * 0.25 + 2.25) / 3 = 1
    std1, std2 = math.sqrt(14 / 3), 1.0
    want = torch.tensor([-2 / (std1 + 1e-4), -1 / (std1 + 1e-4), 0.0, 3 / (std1 + 1e-4),
                         -0.5 / (std2 + 1e-4), -0.5 / (std2 + 1e-4), -0.5 / (std2 + 1e-4), 1.5 / (std2 + 1e-4)])
    torch.testing.assert_close(grpo_advantages(r, 4), want)
    torch.testing.assert_close(grpo_advantages(r, 4, scale_rewards=False),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0, -0.5, -0.5, -0.5, 1.5]))


def test_grpo_identical_rewards_give_zero_not_nan():
    adv = grpo_advantages(torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0, 3.0, 1.0, 3.0]), 4)
    assert torch.equal(adv[:4], torch.zeros(4))
    assert torch.isfinite(adv).all() and (adv[4:].abs() > 0.8).all()


def test_k3_kl_values():
    # k3 = exp(ref - logp) - (ref - logp) - 1
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    want = torch.tensor([[0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1, 0.0]])  # 0.19315, 0.30685, 0
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), want)


def test_group_functions_reject_bad_groups():
    r = torch.arange(6.0)
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(r, 1, "rloo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo_advantages(r, 1)
    with pytest.raises(ValueError, match="baseline 'median'"):
        group_advantages(r, 2, "median")
    torch.testing.assert_close(group_advantages(r, 1, "none"), r)  # vanilla REINFORCE needs no group


# ---- configs ----

def test_configs_reject_bad_input():
    with pytest.raises(ValueError, match="num_generations"):
        RLOOConfig(num_generations=1)
    with pytest.raises(ValueError, match="num_generations"):
        RLOOConfig(num_generations=1, baseline="mean")
    RLOOConfig(num_generations=1, baseline="none", num_minibatches=1)  # plain REINFORCE: no group needed
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=1)
    for cls in (RLOOConfig, GRPOConfig):
        with pytest.raises(ValueError, match="num_minibatches=4"):
            cls(num_prompts=3, num_generations=2, num_minibatches=4)  # 6 responses in 4 minibatches
    with pytest.raises(ValueError, match="baseline"):
        RLOOConfig(baseline="median")


# ---- runs ----

def tiny(cls, policy_folder, out_dir, **kw):
    # missing_eos_penalty=None: in 6 tokens the tiny model rarely samples EOS, and a group of equal penalties
    # has no advantage at all; the length reward differs within a group
    base = dict(
        policy=str(policy_folder), reward="tests.conftest:length_reward", out_dir=str(out_dir), num_prompts=2,
        num_generations=4, num_minibatches=2, update_epochs=2, iterations=2, max_new_tokens=6, save_every=1,
        sample_every=1, lr=1e-3, missing_eos_penalty=None, device="cpu",
    )
    return cls(**{**base, **kw})


def check_run(policy_folder, run, final, keys):
    before, after = load_file(policy_folder / "model.safetensors"), load_file(final / "model.safetensors")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2]
    for row in lines:
        for key in keys:
            assert key in row and math.isfinite(row[key]), key
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for s in samples if s["iteration"] == 1]
    assert len(set(prompts[:4])) == 1 and len(set(prompts[4:8])) == 1  # rows g*k .. g*k+k-1 share a prompt
    assert (run / "summary.json").exists() and (run / "model" / "tokenizer.json").exists()


def test_rloo_smoke_run(policy_folder, tmp_path):
    final = rloo(tiny(RLOOConfig, policy_folder, tmp_path / "run"))
    check_run(policy_folder, tmp_path / "run", final, KEYS + ("objective/kl", "objective/rlhf_reward"))


def test_grpo_smoke_run(policy_folder, tmp_path):
    final = grpo(tiny(GRPOConfig, policy_folder, tmp_path / "run"))
    check_run(policy_folder, tmp_path / "run", final, KEYS + ("objective/kl", "losses/kl_loss"))


def test_grpo_beta_zero_loads_no_reference(policy_folder, tmp_path, monkeypatch):
    loaded = []
    real = agents.groups.load_causal_lm  # GRPO's and RLOO's setup loads the policy, agents.lora the reference
    for module in (agents.groups, agents.lora):
        monkeypatch.setattr(module, "load_causal_lm", lambda path: loaded.append(path) or real(path))
    grpo(tiny(GRPOConfig, policy_folder, tmp_path / "run", beta=0.0, iterations=1))
    assert loaded == [str(policy_folder)]  # the policy only
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "objective/kl" not in row and row["losses/kl_loss"] == 0.0
    loaded.clear()
    grpo(tiny(GRPOConfig, policy_folder, tmp_path / "beta", beta=0.04, iterations=1))
    assert loaded == [str(policy_folder)] * 2  # policy and reference


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_micro_batches_make_the_same_update(policy_folder, tmp_path, algo):
    """Gradient accumulation (responses weighted for RLOO, tokens for GRPO) is the minibatch's update."""
    cls, train = (RLOOConfig, rloo) if algo == "rloo" else (GRPOConfig, grpo)
    kw = dict(iterations=1, update_epochs=1, num_minibatches=1, lr=1e-4)
    whole = train(tiny(cls, policy_folder, tmp_path / "whole", micro_batch_size=None, **kw))
    micro = train(tiny(cls, policy_folder, tmp_path / "micro", micro_batch_size=3, **kw))  # 8 rows: 3 + 3 + 2
    a, b = load_file(whole / "model.safetensors"), load_file(micro / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    before = load_file(policy_folder / "model.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a)


class Killed(Exception):
    pass


def test_crash_then_resume_equals_uninterrupted(policy_folder, tmp_path, monkeypatch):
    """A run killed after logging iteration 3 but before its checkpoint resumes from iteration 2 and ends with
    the same weights and metrics as a run that never stopped."""
    straight = rloo(tiny(RLOOConfig, policy_folder, tmp_path / "straight", iterations=3))
    real = agents.rloo.save_checkpoint

    def dies_at_third_save(ckpt_dir, models, optimizer, scheduler, state):
        if state["iteration"] == 3:
            raise Killed
        real(ckpt_dir, models, optimizer, scheduler, state)

    monkeypatch.setattr(agents.rloo, "save_checkpoint", dies_at_third_save)
    with pytest.raises(Killed):
        rloo(tiny(RLOOConfig, policy_folder, tmp_path / "killed", iterations=3))
    killed = tmp_path / "killed"
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    monkeypatch.setattr(agents.rloo, "save_checkpoint", real)
    resumed = rloo(tiny(RLOOConfig, policy_folder, killed, iterations=3))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (tmp_path / "straight", killed)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    for key in ("objective/scores", "objective/kl", "losses/policy_loss"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
