"""Pure tensor math of every algorithm: masked statistics, KL penalties, GAE, advantages, and each loss (PPO's
clipped policy and value losses, SFT's masked cross-entropy, the reward model's ranking loss, DPO's).

Conventions: B batch, T response length, V vocabulary. `mask` is a float or bool (B, T) tensor, 1 for real response
tokens (up to and including EOS) and 0 for padding after EOS. Masked-out entries never influence any statistic, even
when they hold nan/inf (we select with `torch.where`, never multiply by the mask), and every per-token output is 0
there. References:
  GAE: Schulman et al. 2015, https://arxiv.org/abs/1506.02438
  PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347
  RLHF with a KL penalty: Ziegler et al. 2019, https://arxiv.org/abs/1909.08593
  N implementation details: https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo
  KL approximators: http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# the log-prob of a sampled token at a temperature lives on the model floor, beside the decoders that sample it
from textenv.models.tokens import (  # noqa: F401  (re-exported: the algorithms' one log-prob)
    entropy_from_logits,
    logprobs_and_entropy,
    logprobs_from_logits,
)


def _bool_mask(mask: Tensor) -> Tensor:
    mask = mask.bool()
    if not mask.any():
        raise ValueError("mask has no true entry; masked statistics are undefined")
    return mask


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask), over all entries (dim=None) or along `dim`; every slice needs a true entry."""
    mask = _bool_mask(mask)
    total = torch.where(mask, x, 0.0).sum() if dim is None else torch.where(mask, x, 0.0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    if (count == 0).any():
        raise ValueError(f"mask has an all-false slice along dim={dim}")
    return total / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries, mean((x - mean)^2), times n / (n - 1) when `unbiased` (Bessel)."""
    mask = _bool_mask(mask)
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("unbiased variance needs at least 2 true mask entries")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean/unbiased var over masked entries; masked-out entries come back as 0.

    With shift_mean=False the mean is added back (only the scale changes), as in the N details blog / TRL, which
    use it for rewards. Masked-out entries are returned as 0 so they can never leak into a later sum.
    """
    mask = _bool_mask(mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimator of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL divergence").

    With log r = ref_logp - logp: k1 = -log r (unbiased, can be < 0); k2 = 0.5 (log r)^2 (biased, low variance,
    >= 0); k3 = (r - 1) - log r (unbiased, >= 0). Ziegler et al. 2019 and the N details blog penalise with k1.
    """
    log_r = ref_logp - logp  # (B, T)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected 'k1', 'k2' or 'k3'")


def at_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """(B, T): each row's score at its last true mask entry, 0 elsewhere (a multi-turn mask may have holes)."""
    mask = mask.bool()
    if not mask.any(1).all():
        raise ValueError(f"rows {torch.nonzero(~mask.any(1)).flatten().tolist()} have an all-zero mask")
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # (B,)
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    return out.scatter_(1, last[:, None], scores[:, None])


def per_token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, kl_kind: str = "k1"
) -> tuple[Tensor, Tensor]:
    """r_t = -kl_coef * KL_t on every real token, plus the env's reward where it was paid (Ziegler et al. 2019,
    arXiv 1909.08593; N details blog "Reward model / KL penalty"). `scores` (B, T) holds each step's reward at the
    token that earned it: a single-turn episode's score at its last token (`at_last_token`), a multi-turn episode's
    turn rewards at each turn's last agent token. Returns (rewards, non_score_reward), both (B, T), 0 off the mask.
    """
    mask = mask.bool()
    kl = kl_estimate(logp, ref_logp, kl_kind)  # (B, T)
    non_score_reward = torch.where(mask, -kl_coef * kl, 0.0)  # (B, T)
    rewards = non_score_reward + torch.where(mask, scores.to(non_score_reward.dtype), 0.0)
    return rewards, non_score_reward


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2015, arXiv 1506.02438, eq. 16), backwards over the masked tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},

    where t+1 is the next masked-in token: masked-out positions are skipped, so in a multi-turn stream the env's
    tokens between two agent turns are not steps (the agent does not act there), and V_{t+1} = A_{t+1} = 0 past the
    last one (the episode terminates: no bootstrap). Rewards and values at masked positions are ignored;
    advantages and returns (A + V) are 0 there. Returns (advantages, returns).
    """
    mask = mask.bool()
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V of the next masked-in token
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_adv = torch.where(mask[:, t], delta + gamma * lam * next_adv, next_adv)  # (B,) carried over a hole
        next_value = torch.where(mask[:, t], values[:, t], next_value)  # (B,)
        advantages[:, t] = torch.where(mask[:, t], next_adv, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)  # (B, T)
    return advantages, returns


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over masked entries; nan if Var[returns] == 0 (1 is perfect)."""
    var_y = masked_var(returns, mask, unbiased=False).item()
    if var_y == 0:
        return math.nan
    return 1.0 - masked_var(returns - values, mask, unbiased=False).item() / var_y


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_coef: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a masked mean over tokens:

        loss = mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))),  ratio = exp(logp - old_logp).

    Returns (loss, clipfrac, approx_kl), the last two detached: clipfrac = fraction of tokens where the clipped term
    is active, approx_kl = mean(0.5 * (logp - old_logp)^2), the k2 estimator logged by the N details blog.
    """
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)  # (B, T)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_coef_v: float
) -> tuple[Tensor, Tensor]:
    """0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)) over masked tokens (N details blog,
    "Value function loss clipping"). Returns (loss, vf_clipfrac), vf_clipfrac detached."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_coef_v, clip_coef_v)  # (B, T)
    vf_loss1 = (values - returns) ** 2  # (B, T)
    vf_loss2 = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return loss, vf_clipfrac


def _check_positive(**kw: float) -> None:
    for name, v in kw.items():
        if not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv 1909.08593) adaptive KL coefficient:

        e = clip(KL / target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        _check_positive(init_kl_coef=init_kl_coef, target=target, horizon=horizon)
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface; `update` leaves `value` unchanged."""

    def __init__(self, kl_coef: float):
        if not (math.isfinite(float(kl_coef)) and float(kl_coef) >= 0):  # 0: no penalty (pure reward optimisation)
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def masked_first_eos(tokens: Tensor, eos_token_id: int, pad_token_id: int | None = None) -> Tensor:
    """Float (B, T) mask: 1 up to and including the first EOS, 0 after it.

    A row with no EOS ends before its first PAD (a generator that already padded), else it is all 1s (truncated at
    the length limit). The EOS check comes first, so eos_token_id == pad_token_id (GPT-2 style) is fine.
    """
    is_eos = tokens == eos_token_id  # (B, T)
    is_pad = (tokens == pad_token_id) & ~is_eos if pad_token_id is not None else torch.zeros_like(is_eos)
    after_eos = torch.cat([torch.zeros_like(is_eos[:, :1]), is_eos[:, :-1]], dim=1)  # (B, T): previous token is EOS
    ended = torch.cumsum((after_eos | is_pad).int(), dim=1) > 0  # (B, T)
    return (~ended).float()


def truncate_after_eos(tokens: Tensor, eos_token_id: int, pad_token_id: int) -> Tensor:
    """`tokens` with every position after the first EOS set to PAD (N details blog, "truncate_token")."""
    return torch.where(masked_first_eos(tokens, eos_token_id, pad_token_id).bool(), tokens, pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Critic-free advantages (RLOO / REINFORCE, GRPO): one scalar per sequence, the baseline taken from the other samples
# of the same prompt. Layout: the k completions of a prompt are consecutive rows (np.repeat(prompt_ids, k)), so
# scores (B,) reshape to (B // k, k) groups.
# ---------------------------------------------------------------------------------------------------------------


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B // k, k); ValueError unless scores is 1-D and B is a multiple of k >= 1."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch of {scores.shape[0]} scores")
    return scores.reshape(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, baseline: str = "rloo") -> Tensor:
    """REINFORCE advantages A_i = r_i - b_i within each group of k samples of one prompt, (B,):

    - "rloo": b_i = mean_{j != i} r_j, the leave-one-out mean (Kool et al. 2019, "Buy 4 REINFORCE samples, get a
      baseline for free!"; Ahmadian et al. 2024, arXiv 2402.14740). It does not depend on r_i, so the
      estimator stays unbiased; A_i = k / (k - 1) * (r_i - mean_group).
    - "mean": b_i = mean_group (includes r_i itself: biased by a factor (k - 1) / k, but the usual simplification).
    - "none": b_i = 0, vanilla REINFORCE (Williams 1992).
    """
    r = _groups(scores, group_size)  # (G, k)
    if baseline == "rloo":
        if group_size < 2:
            raise ValueError(f"the leave-one-out baseline needs group_size >= 2, got {group_size}")
        b = (r.sum(1, keepdim=True) - r) / (group_size - 1)  # (G, k)
    elif baseline == "mean":
        b = r.mean(1, keepdim=True)  # (G, 1)
    elif baseline == "none":
        b = torch.zeros_like(r)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; expected 'rloo', 'mean' or 'none'")
    return (r - b).flatten()  # (B,)


def grpo_advantages(scores: Tensor, group_size: int, scale_rewards: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, arXiv 2402.03300, sec. 4.1.2), (B,):

        A_i = (r_i - mean_group) / (std_group + eps),

    std the unbiased (Bessel) one, eps 1e-4, as TRL's GRPOTrainer. A group of identical rewards gets 0, not NaN.
    scale_rewards=False keeps only r_i - mean_group: Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) shows the std
    division up-weights prompts that are too easy or too hard (small std) and recommends dropping it.
    """
    r = _groups(scores, group_size)  # (G, k)
    if group_size < 2:
        raise ValueError(f"a group standard deviation needs group_size >= 2, got {group_size}")
    advantages = r - r.mean(1, keepdim=True)  # (G, k)
    if scale_rewards:
        advantages = advantages / (r.std(1, keepdim=True) + eps)
    return advantages.flatten()  # (B,)


# ---------------------------------------------------------------------------------------------------------------
# The other stages' losses: SFT's masked next-token cross-entropy, the reward model's ranking loss over all pairs of
# a ranking (InstructGPT), and DPO's (Rafailov et al. 2023) with its IPO and cDPO variants.
# ---------------------------------------------------------------------------------------------------------------

IGNORE = -100  # the label of a position that no loss reads (prompt tokens, padding): F.cross_entropy's ignore_index


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the token at t + 1 given tokens <= t, over positions whose label is not IGNORE."""
    logits, targets = logits[:, :-1], labels[:, 1:]  # (B, L - 1, V), (B, L - 1)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


def ranking_pairs(rankings: list[list[int]],
                  tiers: list[list[int] | None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winners, losers, prompt) (P,) int64 for all C(K, 2) pairs of every ranking (best first). Indices point into
    the flat list of all responses, prompt b's at offset sum_{c < b} K_c; `prompt` is each pair's prompt index.
    `tiers[b]` (optional, one per ranked position, non-decreasing): positions of one tier are tied, and a tied pair
    is no pair (a person may rank two responses equal)."""
    winners, losers, prompt, offset = [], [], [], 0
    for b, ranking in enumerate(rankings):
        tier = tiers[b] if tiers is not None and tiers[b] is not None else range(len(ranking))
        for i in range(len(ranking)):
            for j in range(i + 1, len(ranking)):
                if tier[i] == tier[j]:
                    continue
                winners.append(offset + ranking[i])
                losers.append(offset + ranking[j])
                prompt.append(b)
        offset += len(ranking)
    return torch.tensor(winners), torch.tensor(losers), torch.tensor(prompt)


def ranking_loss(scores: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
                 prompt: torch.Tensor) -> torch.Tensor:
    """mean over prompts of mean over their pairs of -log sigmoid(r_w - r_l): each prompt weighs the same however
    many pairs it has (the 1 / C(K, 2) of InstructGPT's loss). scores (N,), the rest (P,) from `ranking_pairs`."""
    pair_loss = -F.logsigmoid(scores[winners] - scores[losers])  # (P,)
    n_prompts = int(prompt.max()) + 1
    total = torch.zeros(n_prompts, dtype=pair_loss.dtype, device=pair_loss.device).index_add_(0, prompt, pair_loss)
    return (total / torch.bincount(prompt, minlength=n_prompts)).mean()


LOSS_TYPES = ("sigmoid", "ipo")


def check_dpo_args(beta: float, label_smoothing: float, loss_type: str) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing} applies to loss_type='sigmoid' only, not {loss_type!r}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """(mean loss, chosen rewards, rejected rewards) from (B,) sequence log-probs; the implicit rewards
    beta * (logp - ref_logp) are detached (they are for logging). With h the log-ratio margin:
    sigmoid: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h) (ls = 0: paper eq. 7; ls > 0: cDPO);
    ipo: (h - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17)."""
    check_dpo_args(beta, label_smoothing, loss_type)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)  # (B,)
    else:
        losses = (h - 1 / (2 * beta)) ** 2  # (B,)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return losses.mean(), chosen_rewards, rejected_rewards
