"""Hand-computed numerics for agents.core (SB3 test_gae.py style): tiny tensors, expected values worked in comments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agents.core import (
    AdaptiveKLController,
    FixedKLController,
    at_last_token,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    logprobs_and_entropy,
    logprobs_from_logits,
    masked_first_eos,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    truncate_after_eos,
)

T = torch.tensor
# Row 0: EOS at index 2, one padding position. Row 1: no padding (truncated at the length limit).
MASK = T([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), T(b, dtype=torch.float32), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------- GAE
def gae_inputs(pad_reward=100.0, pad_value=9.0):
    rewards = T([[0.0, 0.0, 1.0, pad_reward], [1.0, 1.0, 1.0, 1.0]])
    values = T([[0.5, 0.6, 0.7, pad_value], [0.0, 0.0, 0.0, 0.0]])
    return rewards, values


def test_gae_gamma1_eos_mid_sequence():
    adv, ret = compute_gae(*gae_inputs(), MASK, gamma=1.0, lam=0.95)
    # row 0, terminal after t=2 (no bootstrap from V_3 = 9):
    # t=2: delta = 1 + 0 - 0.7 = 0.3;                   A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1;                 A1 = 0.1 + 0.95 * 0.3   = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;                 A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # row 1, V = 0, so delta = r = 1:  A3 = 1, A2 = 1.95, A1 = 1 + 0.95 * 1.95 = 2.8525,
    #                                  A0 = 1 + 0.95 * 2.8525 = 3.709875
    close(adv, [[0.46575, 0.385, 0.3, 0.0], [3.709875, 2.8525, 1.95, 1.0]])
    close(ret, [[0.96575, 0.985, 1.0, 0.0], [3.709875, 2.8525, 1.95, 1.0]])  # A + V, 0 after EOS


def test_gae_gamma09():
    adv, ret = compute_gae(*gae_inputs(), MASK, gamma=0.9, lam=0.95)  # gamma * lam = 0.855
    # t=2: delta = 1 - 0.7 = 0.3;                       A2 = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03;              A1 = 0.03 + 0.855 * 0.3    = 0.2865
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04;              A0 = 0.04 + 0.855 * 0.2865 = 0.2849575
    # row 1: A3 = 1, A2 = 1.855, A1 = 1 + 0.855 * 1.855 = 2.586025, A0 = 1 + 0.855 * 2.586025 = 3.211051375
    close(adv, [[0.2849575, 0.2865, 0.3, 0.0], [3.211051375, 2.586025, 1.855, 1.0]])
    close(ret, [[0.7849575, 0.8865, 1.0, 0.0], [3.211051375, 2.586025, 1.855, 1.0]])


def test_gae_lam1_is_monte_carlo_return_minus_value():
    adv, ret = compute_gae(*gae_inputs(), MASK, gamma=1.0, lam=1.0)
    # row 0: reward-to-go = [1, 1, 1]; A = G - V = [0.5, 0.4, 0.3]; returns = G.
    close(adv[0], [0.5, 0.4, 0.3, 0.0])
    close(ret, [[1.0, 1.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0]])


def test_gae_ignores_everything_after_eos():
    ref = compute_gae(*gae_inputs(), MASK, gamma=0.9, lam=0.95)
    for pad in (-1e6, math.inf, math.nan):
        out = compute_gae(*gae_inputs(pad_reward=pad, pad_value=pad), MASK, gamma=0.9, lam=0.95)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b)


def test_gae_over_agent_tokens_skips_the_env_tokens_of_a_multi_turn_stream():
    # agent tokens at 0, 1 (turn 1, reward 0.5 at its last token) and 4, 5 (turn 2, reward 1); 2, 3 are the env's
    # reply, whose rewards and values (nan: never read) are skipped, as is the padding at 6
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    nan = math.nan
    rewards = T([[0.0, 0.5, nan, nan, 0.0, 1.0, nan]])
    values = T([[0.2, 0.3, nan, nan, 0.4, 0.6, nan]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=5: delta = 1 + 0 - 0.6 = 0.4;                   A5 = 0.4
    # t=4: delta = 0 + 0.6 - 0.4 = 0.2;                 A4 = 0.2 + 0.95 * 0.4 = 0.58
    # t=3, 2: the env's tokens, skipped (0)
    # t=1: delta = 0.5 + V4 - V1 = 0.5 + 0.4 - 0.3 = 0.6;   A1 = 0.6 + 0.95 * 0.58 = 1.151
    # t=0: delta = 0 + 0.3 - 0.2 = 0.1;                 A0 = 0.1 + 0.95 * 1.151 = 1.19345
    close(adv, [[1.19345, 1.151, 0.0, 0.0, 0.58, 0.4, 0.0]])
    close(ret, [[1.39345, 1.451, 0.0, 0.0, 0.98, 1.0, 0.0]])
    _, mc = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)  # lam 1: the return to go, 1.5 then 1
    close(mc, [[1.5, 1.5, 0.0, 0.0, 1.0, 1.0, 0.0]])


# -------------------------------------------------------------------------------------------------- KL + rewards
def test_kl_estimators():
    logp, ref = T([-1.0, -2.0]), T([-2.0, -1.0])  # log r = ref - logp = [-1, 1]
    close(kl_estimate(logp, ref, "k1"), [1.0, -1.0])  # -log r
    close(kl_estimate(logp, ref, "k2"), [0.5, 0.5])  # 0.5 (log r)^2
    # k3 = r - 1 - log r: e^-1 - 1 + 1 = 0.36787944;  e - 1 - 1 = 0.71828183
    close(kl_estimate(logp, ref, "k3"), [0.36787944, 0.71828183])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_estimate(a, b, "k3") >= 0).all() and (kl_estimate(a, b, "k2") >= 0).all()
    with pytest.raises(ValueError, match="'k4'"):
        kl_estimate(logp, ref, "k4")


def test_per_token_rewards_score_at_last_real_token():
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    logp = T([[-1.0, -2.0, -1.0, -5.0], [-1.0, -3.0, -3.0, -3.0]])
    ref = T([[-1.5, -1.0, -1.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    scores = at_last_token(T([2.0, -1.0]), mask)
    close(scores, [[0.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    rewards, non_score = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref = [[0.5, -1, 0, (5 masked)], [1, ...]];  non_score = -0.1 * k1
    close(non_score, [[-0.05, 0.1, 0.0, 0.0], [-0.1, 0.0, 0.0, 0.0]])
    # + score at index mask.sum() - 1: row 0 -> t=2 (0 + 2), row 1 -> t=0 (-0.1 - 1)
    close(rewards, [[-0.05, 0.1, 2.0, 0.0], [-1.1, 0.0, 0.0, 0.0]])
    # k2 = 0.5 * k1^2 = [0.125, 0.5, 0] -> -0.1 * k2
    _, non_score2 = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1, kl_kind="k2")
    close(non_score2[0], [-0.0125, -0.05, 0.0, 0.0])


def test_turn_rewards_stay_where_they_were_paid_and_last_token_skips_holes():
    # a multi-turn row: agent tokens at 0, 1 and 4 (2, 3 are the env's reply); turn rewards at 1 and 4
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    close(at_last_token(T([3.0]), mask), [[0.0, 0.0, 0.0, 0.0, 3.0, 0.0]])
    scores = T([[0.0, 0.5, 9.0, 9.0, 1.0, 0.0]])  # 9.0: at env tokens, never paid
    logp, ref = torch.full((1, 6), -1.0), torch.full((1, 6), -2.0)  # k1 = 1 everywhere
    rewards, non_score = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    close(non_score, [[-0.1, -0.1, 0.0, 0.0, -0.1, 0.0]])
    close(rewards, [[-0.1, 0.4, 0.0, 0.0, 0.9, 0.0]])
    with pytest.raises(ValueError, match="all-zero"):
        at_last_token(T([1.0, 1.0]), T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------ masked stats
def test_masked_stats_and_whiten_ignore_masked_entries():
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    for pad in (100.0, -1e6, math.nan):
        x = T([[2.0, 4.0, 6.0, pad]])
        close(masked_mean(x, mask), 4.0)
        close(masked_var(x, mask), 4.0)  # (4 + 0 + 4) / 2
        close(masked_var(x, mask, unbiased=False), 8.0 / 3.0)
        close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])  # (x - 4) / 2, masked entry -> 0
        close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])  # (x - 4) / 2 + 4
        assert masked_whiten(x, mask.bool()).isfinite().all()  # bool mask works too
    close(masked_mean(T([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]]), T([[1, 1, 0], [1, 0, 0]]), dim=1), [2.0, 2.0])


def test_masked_stats_errors():
    x, empty = torch.ones(2, 3), torch.zeros(2, 3)
    for fn in (masked_mean, masked_var, masked_whiten):
        with pytest.raises(ValueError, match="no true entry"):
            fn(x, empty)
    with pytest.raises(ValueError, match="all-false slice"):
        masked_mean(x, T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), dim=1)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_explained_variance():
    ret, mask = T([[1.0, 2.0, 3.0, 50.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, mask) == pytest.approx(0.0)
    # residual [-0.5, 0, 0.5]: var 1/6; var(returns) = 2/3 -> 1 - 0.25 = 0.75
    assert explained_variance(T([[1.5, 2.0, 2.5, -7.0]]), ret, mask) == pytest.approx(0.75)
    assert math.isnan(explained_variance(ret, T([[2.0, 2.0, 2.0, 9.0]]), mask))


# ------------------------------------------------------------------------------------------------ log-probs
def test_logprobs_and_entropy_by_hand():
    logits = T([[[0.0, math.log(3.0)]]])  # softmax = [1/4, 3/4]
    close(logprobs_from_logits(logits, T([[1]])), [[math.log(0.75)]])
    # T=2: exp(logits / 2) = [1, sqrt 3] -> p1 = sqrt3 / (1 + sqrt3) = 0.6339746
    close(logprobs_from_logits(logits, T([[1]]), temperature=2.0), [[math.log(0.6339746)]])
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623352
    close(entropy_from_logits(logits), [[0.5623352]])
    close(entropy_from_logits(torch.zeros(1, 1, 7)), [[math.log(7.0)]])  # uniform: ln V
    logp, ent = logprobs_and_entropy(logits, T([[1]]))  # both from one logsumexp
    close(logp, [[math.log(0.75)]])
    close(ent, [[0.5623352]])
    assert logprobs_and_entropy(logits, T([[1]]), entropy=False)[1] is None


def test_entropy_carries_no_graph():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    logp, ent = logprobs_and_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    assert logp.requires_grad and not ent.requires_grad  # logged only: no (B, T, V) graph kept for it


def test_logprobs_match_manual_softmax():
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 3, 5, generator=g), torch.randint(0, 5, (2, 3), generator=g)
    for temp in (1.0, 0.7):
        p = torch.exp(logits / temp) / torch.exp(logits / temp).sum(-1, keepdim=True)  # (B, T, V)
        manual = torch.log(p.gather(-1, tokens[..., None]).squeeze(-1))  # (B, T)
        close(logprobs_from_logits(logits, tokens, temperature=temp), manual.tolist(), atol=1e-5)
        close(entropy_from_logits(logits, temp), (-(p * p.log()).sum(-1)).tolist(), atol=1e-5)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=repr(bad)):
            logprobs_from_logits(logits, tokens, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            entropy_from_logits(logits, temperature=bad)


# --------------------------------------------------------------------------------------------------- PPO losses
def test_policy_loss_ratio_one():
    logp, mask = T([[-1.0, -2.0, -3.0, -4.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    adv = T([[1.0, -2.0, 3.0, 99.0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, logp.clone(), adv, mask, clip_coef=0.2)
    close(loss, -2.0 / 3.0)  # -mean(1, -2, 3)
    close(clipfrac, 0.0)
    close(approx_kl, 0.0)


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 4)
    logp = T([[math.log(1.5), math.log(0.5), math.log(0.5), 7.0]])  # ratios 1.5, 0.5, 0.5, (masked)
    adv, mask = T([[1.0, 1.0, -1.0, 5.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, old, adv, mask, clip_coef=0.2)
    # t0: A=1,  r=1.5: max(-1.5, -1.2) = -1.2 (clipped);   t1: A=1,  r=0.5: max(-0.5, -0.8) = -0.5 (not clipped)
    # t2: A=-1, r=0.5: max(0.5, 0.8) = 0.8 (clipped)     -> loss = (-1.2 - 0.5 + 0.8) / 3 = -0.3, clipfrac 2/3
    close(loss, -0.3)
    close(clipfrac, 2.0 / 3.0)
    # 0.5 * mean(ln1.5^2, ln.5^2, ln.5^2) = 0.5 * (0.1644019 + 2 * 0.4804530) / 3 = 0.1875513
    close(approx_kl, 0.1875513)
    logp.requires_grad_(True)
    loss, _, _ = clipped_policy_loss(logp, old, adv, mask, clip_coef=0.2)
    loss.backward()  # only t1 is unclipped: d/dlogp (-A r) / 3 = -1 * 0.5 / 3
    close(logp.grad, [[0.0, -0.5 / 3.0, 0.0, 0.0]])


def test_value_loss_clipping_by_hand():
    old = torch.ones(1, 4)
    values, returns = T([[1.5, 1.1, 0.5, 8.0]]), T([[2.0, 0.0, 1.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    loss, vf_clipfrac = clipped_value_loss(values, old, returns, mask, clip_coef_v=0.2)
    # t0: (1.5-2)^2 = 0.25, clip -> 1.2: (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    # t1: (1.1-0)^2 = 1.21, inside the band -> 1.21
    # t2: (0.5-1)^2 = 0.25, clip -> 0.8: 0.04 -> 0.25 (unclipped term is larger)
    close(loss, 0.5 * (0.64 + 1.21 + 0.25) / 3)  # 0.35
    close(vf_clipfrac, 1.0 / 3.0)


# ------------------------------------------------------------------------------------------------ KL controllers
def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl=8: e = clip(8/6 - 1 = 0.333, +-0.2) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512
    assert ctl.update(8.0, 256) == pytest.approx(0.100512, abs=1e-12)
    # kl=3: e = clip(-0.5) = -0.2 -> 0.100512 * (1 - 0.00512) = 0.100512 * 0.99488 = 0.09999737856
    assert ctl.update(3.0, 256) == pytest.approx(0.09999737856, abs=1e-12)
    # kl=6.6: e = 0.1 (unclipped) -> * (1 + 0.1 * 100 / 10000) = * 1.001 -> 0.10009737593856
    assert ctl.update(torch.tensor(6.6, dtype=torch.float64), 100) == pytest.approx(0.10009737593856, abs=1e-12)
    # huge error is clipped: same factor as kl=8
    ctl2 = AdaptiveKLController(0.1, 6.0, 10000)
    ctl2.update(1e9, 256)
    assert ctl2.value == pytest.approx(0.100512, abs=1e-12)
    state = json.loads(json.dumps(ctl.state_dict()))
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(state)
    assert restored.state_dict() == ctl.state_dict()


def test_fixed_kl_controller_and_validation():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.value == 0.05
    ctl.load_state_dict(json.loads(json.dumps({"value": 0.2})))
    assert ctl.state_dict() == {"value": 0.2}
    for args in [(0.0, 6, 100), (0.1, -6, 100), (0.1, 6, 0), (0.1, math.nan, 100)]:
        with pytest.raises(ValueError):
            AdaptiveKLController(*args)
    assert FixedKLController(0.0).value == 0.0  # no penalty
    for bad in (-1.0, math.inf):
        with pytest.raises(ValueError, match="kl_coef"):
            FixedKLController(bad)


# ---------------------------------------------------------------------------------------------------------- EOS
def test_masked_first_eos_and_truncate():
    eos, pad = 2, 0
    tokens = T([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 0, 3, 0]])
    # first EOS included; no EOS -> all real; EOS at t=0; no EOS but padded -> real up to (not incl.) the first PAD
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    mask = masked_first_eos(tokens, eos, pad)
    assert mask.dtype == torch.float32 and mask.tolist() == expected
    assert truncate_after_eos(tokens, eos, pad).tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 0, 0, 0]]
    assert masked_first_eos(T([[5, 2, 2, 2]]), 2, 2).tolist() == [[1, 1, 0, 0]]  # eos == pad (GPT-2)
    assert masked_first_eos(T([[5, 0, 3, 2]]), 2).tolist() == [[1, 1, 1, 1]]  # no pad id: only EOS ends a row


def test_token_log_prob_gradient_matches_autograd():
    """The fused log-prob's hand-written backward against autograd through log_softmax (float64, padded vocab
    slice included: a non-contiguous view, as policy_forward passes)."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 4, 12, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 9, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = full.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(a[..., :9], tokens)
    (logp * weights).sum().backward()
    b = full.clone().requires_grad_()
    log_p = torch.log_softmax(b[..., :9], -1)
    expected = log_p.gather(-1, tokens[..., None]).squeeze(-1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(logp, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, -(log_p.exp() * log_p).sum(-1).detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    assert (a.grad[..., 9:] == 0).all()
    assert torch.autograd.gradcheck(lambda z: logprobs_and_entropy(z, tokens, entropy=False)[0],
                                    (a.detach()[..., :9].clone().requires_grad_(),))
