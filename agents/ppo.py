"""Stage 4 of the InstructGPT recipe: token-level PPO in a TextGenVectorEnv, with a per-token KL penalty to the
frozen SFT policy. Read it top to bottom; the formulas live, tested, in `agents/core.py`.

References: Ziegler et al. 2019 (arXiv 1909.08593), Ouyang et al. 2022 (arXiv 2203.02155), and Huang et al.,
"The N Implementation Details of RLHF with PPO" (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo).

    python -m agents.ppo --policy runs/x/sft/model --reward runs/x/rm/model --out-dir runs/x/ppo
    torchrun --nproc_per_node 2 -m agents.ppo --policy runs/x/sft/model ...  # data-parallel

Under N processes each plays num_envs / N of the episodes, every process then holds the whole batch, and each
takes 1/N of every minibatch's rows with the gradients summed over the processes: the same updates as one process
with the same seed, up to float rounding (agents/distributed.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.common import (
    RunLogger,
    check_run_dir,
    distributed_state,
    is_complete,
    load_checkpoint,
    save_checkpoint,
    save_model_folder,
    write_summary,
)
from agents.core import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    explained_variance,
    kl_estimate,
    logprobs_and_entropy,
    masked_mean,
    masked_whiten,
    per_token_rewards,
)
from agents.decoding import position_ids_from_mask
from agents.gpt2 import frozen_forward, lean_forward
from agents.distributed import (
    gather_rollout,
    gather_rows,
    process_device,
    rank_rows,
    rollout_uniforms,
    sum_gradients,
    sum_over_processes,
)
from agents.sampler import Rollout, rollout
from rewards.base import as_reward_fn
from rewards.hf import SequenceClassifierReward
from textenv.models import load_causal_lm, load_sequence_classifier
from textenv.tasks import get_task
from textenv.tokenizer import load_tokenizer
from textenv.vector_env import TextGenVectorEnv


@dataclass
class PPOConfig:
    policy: str = "runs/default/sft/model"
    """Hub id or folder of the SFT policy; it is also the frozen reference for the KL penalty."""
    reward: str = "runs/default/rm/model"
    """The reward: a sequence-classification folder or hub id (our learned RM or an HF classifier), a
    'module:attr' callable, or 'gold' for the task's gold scorer."""
    out_dir: str = "runs/default/ppo"
    """Run folder: config, metrics.jsonl, tb/, samples.jsonl, checkpoint/, and the final policy in model/."""
    task: str = "sentiment"
    """Embedded task whose train prompts are used and whose gold score is logged beside the proxy score."""
    prompts: str | None = None
    """Other prompts (a .jsonl/.csv/.parquet/.txt file or hub id) instead of the task's."""
    reward_label: str | None = None
    """For a classifier reward with several labels: the label whose logit is the reward (e.g. POSITIVE)."""
    value_model: str | None = None
    """Folder of the value model's initialisation (a sequence-classification model). Default: the reward model
    (InstructGPT), or the policy with a new scalar head when the reward is not a model."""
    shared_value_head: bool = False
    """Memory-saving option: a value head on the policy's trunk instead of a separate value model."""
    num_envs: int = 64
    """Episodes per rollout (the batch), over all processes: one prompt per sub-env, num_envs / N sub-envs in each
    of N processes."""
    max_new_tokens: int | None = None
    """Response budget; default: the task's."""
    temperature: float = 0.7
    """Sampling temperature; log-probs for the loss and the KL use logits divided by it too."""
    iterations: int = 20
    """PPO iterations (rollout + update)."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Minibatches per epoch."""
    micro_batch_size: int | None = 8
    """Rows per forward/backward pass in each process: a minibatch is processed in micro-batches whose
    token-weighted gradients add up to the minibatch's (the same update, up to float rounding), which caps the
    activation memory (the (rows, T, V) logits dominate it). None: a process's whole share of a minibatch at once."""
    lr: float = 1e-4
    """Adam learning rate, annealed linearly to 0."""
    adam_eps: float = 1e-5
    """Adam epsilon: 1e-5 as in the original TF code; PyTorch's 1e-8 makes early steps more aggressive."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping."""
    clip_coef: float = 0.2
    """PPO ratio clipping."""
    vf_clip_coef: float = 0.2
    """Value clipping around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount; 1 in RLHF: the score arrives at the last token."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.3
    """Initial coefficient of the per-token KL penalty."""
    kl_target: float | None = 6.0
    """Adaptive controller target KL in nats per response (Ziegler et al.); None keeps kl_coef fixed."""
    kl_horizon: int = 1000
    """Adaptive controller horizon in episodes. Ziegler et al. used 10000 over millions of episodes; our runs
    are a few thousand episodes, and a horizon that long would leave the coefficient where it started."""
    missing_eos_penalty: float | None = -1.0
    """Score given instead of the reward to a response with no EOS; None keeps the reward."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards before GAE."""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT): weight of a pretraining LM loss mixed into every minibatch; 0 disables it."""
    ptx_data: str | None = None
    """Text for PPO-ptx (as pretrain's --data); default: the embedded corpus."""
    ptx_seq_len: int = 64
    """Tokens per PPO-ptx sequence."""
    sample_every: int = 10
    """Write a table of sample responses to samples.jsonl every this many iterations (and at the end)."""
    save_every: int = 10
    """Checkpoint every this many iterations; a rerun with the same config resumes from the last one."""
    seed: int = 0
    """Seed: prompts, sampling and minibatch order derive from (seed, iteration), so resuming needs no stream."""
    device: str | None = None
    """torch device; default: this process's (cuda, cuda:<local rank> under a multi-GPU launch, else cpu)."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        for name in ("num_envs", "iterations", "update_epochs", "num_minibatches", "save_every", "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} is not divisible by num_minibatches={self.num_minibatches}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class NonFiniteError(RuntimeError):
    """A loss, reward or gradient became NaN/inf; the run stops and the last good checkpoint stays as it was."""


class ValueHead(torch.nn.Module):
    """A scalar head on the policy's last hidden state (the shared-trunk, memory-saving option); zero-init so
    the first values are 0 rather than noise."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)


def policy_forward(policy, input_ids, attention_mask, P: int, temperature: float, hidden: bool = False,
                   vocab_size: int | None = None, entropy: bool = True):
    """Temperature-scaled log-probs, entropies (None unless `entropy`) and last hidden states (None unless
    `hidden`) of the response tokens.

    `policy`: a causal LM, or a `GPT2Forward` of one (a frozen reference's, with packed weights). The logits at
    position P-1+t predict response token t; only those T positions go through the LM head, and a GPT-2 runs
    through the lean forward (agents/gpt2.py), which computes only them in its last block.
    `vocab_size`: the env's number of actions. A model whose embedding is padded past its tokenizer (Pythia,
    Qwen) has more logits than actions; the sampler drops the extra ones, so the loss must too, or the ratio
    and the KL are off by the probability mass on tokens that can never be sampled.
    """
    L = input_ids.shape[1]
    lean = lean_forward(policy)
    if lean is not None:
        states = lean.response_hidden(input_ids, attention_mask, P)  # (B, T, E); a shared prompt runs once
        logits = lean.apply_head(states)  # (B, T, V)
    else:
        out = policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),  # correct positions under left padding
            logits_to_keep=L - P + 1,
            output_hidden_states=hidden,
        )
        logits = out.logits[:, :-1]  # (B, T, V)
        states = out.hidden_states[-1][:, P - 1 : -1] if hidden else None  # (B, T, H)
    z = logits[..., :vocab_size]  # (B, T, V)
    z = z if temperature == 1.0 else z / temperature  # scaled once, for both below
    logp, ent = logprobs_and_entropy(z, input_ids[:, P:], entropy)  # (B, T) each; entropy without a graph
    return logp, ent, states if hidden else None


def value_forward(value_model, input_ids, attention_mask, P: int) -> torch.Tensor:
    """Per-token values V(prompt + response[:t]) from a sequence-classification model's `score` head: (B, T)."""
    lean = lean_forward(value_model)
    if lean is not None:  # the lean forward computes only the T positions in its last block
        return lean.apply_head(lean.response_hidden(input_ids, attention_mask, P)).squeeze(-1)  # (B, T)
    hidden = value_model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state  # (B, L, H)
    return value_model.score(hidden[:, P - 1 : -1]).squeeze(-1)  # (B, T)


def predict_values(value_model, states, input_ids, attention_mask, P: int) -> torch.Tensor:
    """(B, T) values: from the policy's hidden `states` with the shared head, else a forward of the value model."""
    if states is not None:  # shared_value_head: the policy forward already computed the trunk
        return value_model.score(states).squeeze(-1)
    return value_forward(value_model, input_ids, attention_mask, P)


def value_states(policy, cfg: PPOConfig, input_ids, attention_mask, P: int):
    """The policy's hidden states for the shared value head (B, T, H), or None with a separate value model."""
    if not cfg.shared_value_head:
        return None
    return policy_forward(policy, input_ids, attention_mask, P, cfg.temperature, hidden=True, entropy=False)[2]


def chunked(fn, rows: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over chunks of `rows` rows of the tensors, concatenated: a no-grad forward's memory stays that of a chunk."""
    return torch.cat([fn(*(t[i : i + rows] for t in tensors)) for i in range(0, len(tensors[0]), rows)])


def iteration_generator(seed: int, iteration: int, stream: int) -> torch.Generator:
    """An RNG that is a pure function of (seed, iteration, stream): resuming at an iteration replays it exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 16 + stream)


def ppo(cfg: PPOConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    if is_complete(out_dir) and not cfg.overwrite:
        return out_dir / "model"
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "overwrite", "device")}
    check_run_dir(out_dir, config, cfg.overwrite)
    dist = distributed_state()  # this process among N (N = 1 without a launcher); only the main one writes
    device = process_device(cfg.device, dist)
    if (cfg.num_envs // cfg.num_minibatches) % dist.num_processes:
        raise ValueError(f"a minibatch of num_envs / num_minibatches = {cfg.num_envs // cfg.num_minibatches} rows "
                         f"does not split evenly over {dist.num_processes} processes")
    # the same seed everywhere: a new value head must start the same in every process; what differs per process
    # (its prompts and sampling numbers) is its rows' share of the global draws (agents/distributed.py)
    torch.manual_seed(cfg.seed)

    # --- models: policy (trained), reference (frozen SFT), value (trained), reward (inside the env) ---
    tokenizer = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy).to(device)  # dropout off: log-probs are reproducible
    ref_policy = load_causal_lm(cfg.policy).to(device).eval().requires_grad_(False)
    task = get_task(cfg.task)
    # model kwargs reach only a model adapter; a 'module:attr' callable ignores them
    reward_fn = task.gold if cfg.reward == "gold" else as_reward_fn(cfg.reward, label=cfg.reward_label, device=device)
    reward_is_model = isinstance(reward_fn, SequenceClassifierReward)
    if cfg.shared_value_head:
        value_model = ValueHead(policy.config.hidden_size).to(device)
    else:
        value_init = cfg.value_model or (cfg.reward if reward_is_model else cfg.policy)
        value_model = load_sequence_classifier(value_init, num_labels=1).to(device)  # new head on a causal LM
        value_model.config.pad_token_id = tokenizer.pad_token_id
    B = cfg.num_envs
    mine = rank_rows(B, dist)  # this process's episodes: global rows [mine.start, mine.stop)
    envs = TextGenVectorEnv(
        num_envs=mine.stop - mine.start,
        task=cfg.task,
        prompts=cfg.prompts,
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        max_new_tokens=cfg.max_new_tokens,
    )
    P, T, V = envs.setup.max_prompt_tokens, envs.setup.max_new_tokens, envs.setup.vocab_size
    mb_size = B // cfg.num_minibatches
    rows = cfg.micro_batch_size or B
    # the frozen reference through the lean forward (GPT-2) on weights packed once for the run (agents/gpt2.py)
    ref_forward = frozen_forward(ref_policy, pack_rows=rows * (P + T))
    ptx_blocks = load_ptx_blocks(cfg, tokenizer) if cfg.ptx_coef > 0 else None

    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for the whole step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / cfg.iterations)  # linear anneal
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_target is not None
        else FixedKLController(cfg.kl_coef)
    )
    models = {"policy": policy, "value": value_model}
    state = load_checkpoint(out_dir / "checkpoint", models, optimizer, scheduler)
    start = 0 if state is None else state["iteration"]
    if state is not None:
        kl_ctl.load_state_dict(state["kl_ctl"])
    logger = RunLogger(out_dir, resume_step=None if state is None else start)

    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="ppo", unit="it",
               disable=not dist.is_main_process)
    for iteration in bar:
        t0 = time.perf_counter()
        # ---- 1. rollout: one episode per sub-env; the env pays the reward model's score at the last token ----
        # This process plays global rows `mine`: sub-env i is seeded with seed + i and row i's tokens are picked by
        # row i of the (B, T) uniforms, so N processes play the episodes one process plays.
        policy.eval()
        uniforms = rollout_uniforms(iteration_generator(cfg.seed, iteration, 0), B, T)  # (B, T)
        local = rollout(
            policy, envs, uniforms=uniforms[mine], temperature=cfg.temperature,
            seed=(cfg.seed * 1_000_003 + iteration) * B + mine.start,
        )
        local_ids, local_mask = local.input_ids.to(device), local.attention_mask.to(device)  # (b, P+T)
        with torch.no_grad():  # the reference log-probs of this process's rows
            ref_logp = chunked(lambda ids, am: policy_forward(ref_forward, ids, am, P, cfg.temperature, vocab_size=V, entropy=False)[0],
                               rows, local_ids, local_mask)  # (b, T)
        # The values ("old" values: GAE's baseline, the value clipping's centre). The value model does not change
        # before the update's first optimizer step, so the rows of epoch 0's first minibatch take theirs from that
        # minibatch's own value forward (the one its value loss needs): they are not computed here. With one
        # minibatch (TRL's default) that saves the rollout's whole value forward. A shared value head reads the
        # policy's trunk, which the update's value pass does not run: all its values are computed here.
        order_rng = iteration_generator(cfg.seed, iteration, 1)
        first_order = torch.randperm(B, generator=order_rng)  # epoch 0's minibatch order
        deferred = torch.zeros(B, dtype=torch.bool)  # (B,) global rows whose values the update computes
        deferred[first_order[:mb_size]] = not cfg.shared_value_head
        here = torch.nonzero(~deferred[mine]).squeeze(1).to(device)  # (n,) this process's rows computed now
        values = torch.zeros(len(local_ids), T, device=device)  # (b, T) 0 on deferred rows until the update
        if len(here):
            with torch.no_grad():
                # the weights are packed for this forward only (a shared ValueHead stays as it is)
                value_fwd = frozen_forward(value_model, pack_rows=rows * (P + T))
                values[here] = chunked(lambda ids, am: predict_values(value_fwd, value_states(policy, cfg, ids, am, P), ids, am, P),
                                       rows, local_ids[here], local_mask[here])  # (n, T)
        # from here on every process holds the whole batch and computes the same advantages, KL and metrics
        batch = gather_rollout(dist, local)
        ref_logp, values = gather_rows(dist, ref_logp, values)  # (B, T) each
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # (B, P+T)
        mask = batch.response_mask.to(device).float()  # (B, T) 1 up to and including EOS
        scores = batch.scores.to(device)  # (B,)
        if cfg.missing_eos_penalty is not None:  # the EOS trick: a truncated response gets a fixed penalty
            scores = torch.where(batch.terminated.to(device), scores, torch.full_like(scores, cfg.missing_eos_penalty))
        with torch.no_grad():
            # the "old" log-probs are the sampler's: same model, same temperature, so a full forward of the policy
            # would only repeat them (up to float rounding) at the cost of a third of the rollout
            logp = batch.logprobs.to(device)  # (B, T)
            # per-token reward: -kl_coef * (logp - ref_logp), plus the score at the last real token
            rewards, non_score_reward = per_token_rewards(scores, logp, ref_logp, mask, kl_ctl.value)  # (B, T)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
        kl = (kl_estimate(logp, ref_logp) * mask).sum(1)  # (B,) k1 KL of each response, in nats
        check_finite(iteration, scores=scores, kl=kl)
        t_rollout = time.perf_counter() - t0

        # ---- 2. update: epochs x minibatches of the clipped PPO objective ----
        # This process takes rows `my_mb` of each global minibatch; its loss is weighted by the GLOBAL minibatch's
        # token count and the gradients are summed over the processes (agents/distributed.py).
        policy.train()  # dropout is off, so train mode changes nothing but intent
        my_mb = rank_rows(mb_size, dist)
        advantages = returns = None  # (B, T) each, from the first minibatch on, once every value is known
        stats = []
        for epoch in range(cfg.update_epochs):
            order = first_order if epoch == 0 else torch.randperm(B, generator=order_rng)
            for start_i in range(0, B, mb_size):
                first = epoch == 0 and start_i == 0  # no optimizer step yet: the models are the rollout's
                mb = order[start_i : start_i + mb_size].to(device)
                mb_tokens = mask[mb].sum()
                optimizer.zero_grad(set_to_none=True)
                # gradient accumulation over micro-batches: each one's masked means weighted by its share of the
                # minibatch's tokens, so the summed gradient is that of the minibatch's token mean
                micro = mb[my_mb].split(rows)
                vf_stats = torch.zeros(2, device=device)  # value loss, value clipfrac
                if not cfg.shared_value_head:  # the value loss, on the value model's own forward
                    fill = torch.zeros_like(values) if first else None  # the deferred rows' values, from this pass
                    for mu in micro:
                        new_values = value_forward(value_model, input_ids[mu], attention_mask[mu], P)  # (b, T)
                        if first:  # the rollout's value forward for these rows; GAE is per row, so their returns too
                            fill[mu] = old_values = new_values.detach()
                            mu_returns = compute_gae(rewards[mu], old_values, mask[mu], cfg.gamma, cfg.gae_lambda)[1]
                        else:
                            old_values, mu_returns = values[mu], returns[mu]
                        vf_loss, vf_clipfrac = clipped_value_loss(new_values, old_values, mu_returns, mask[mu], cfg.vf_clip_coef)
                        weight = mask[mu].sum() / mb_tokens
                        (weight * cfg.vf_coef * vf_loss).backward()
                        vf_stats += weight * torch.stack([vf_loss.detach(), vf_clipfrac])
                    if first:
                        values = values + sum_over_processes(dist, fill)  # every process's deferred rows
                if first:  # all values known: the advantages, whitened over the whole batch
                    check_finite(iteration, values=values)
                    with torch.no_grad():
                        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
                        advantages = masked_whiten(advantages, mask)
                pg_stats = torch.zeros(4, device=device)  # policy loss, clipfrac, approx KL, entropy
                for mu in micro:
                    mu_mask = mask[mu]
                    weight = mu_mask.sum() / mb_tokens
                    new_logp, entropy, mu_states = policy_forward(
                        policy, input_ids[mu], attention_mask[mu], P, cfg.temperature, cfg.shared_value_head, V
                    )
                    pg_loss, clipfrac, approx_kl = clipped_policy_loss(new_logp, logp[mu], advantages[mu], mu_mask, cfg.clip_coef)
                    loss = pg_loss
                    if cfg.shared_value_head:  # the value head reads this forward's trunk
                        new_values = value_model.score(mu_states).squeeze(-1)  # (b, T)
                        vf_loss, vf_clipfrac = clipped_value_loss(new_values, values[mu], returns[mu], mu_mask, cfg.vf_clip_coef)
                        loss = loss + cfg.vf_coef * vf_loss
                        vf_stats += weight * torch.stack([vf_loss.detach(), vf_clipfrac])
                    (weight * loss).backward()
                    pg_stats += weight * torch.stack([pg_loss, clipfrac, approx_kl, masked_mean(entropy, mu_mask)]).detach()
                if ptx_blocks is not None:  # PPO-ptx: keep the pretraining distribution's log-likelihood up
                    # (a non-finite ptx loss shows up in the gradient norm)
                    loss = cfg.ptx_coef * ptx_loss(policy, ptx_blocks, mb_size, my_mb, order_rng, device)
                    loss.backward()
                sum_gradients(dist, params)  # the global minibatch's gradient, in every process
                mb_stats = sum_over_processes(dist, torch.cat([pg_stats, vf_stats]))  # the global minibatch's token means
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                # checked after the sums, so that every process stops at the same minibatch, before the step
                check_finite(iteration, loss=mb_stats, grad_norm=grad_norm)
                optimizer.step()
                stats.append(torch.cat([mb_stats, grad_norm.detach()[None]]))
        scheduler.step()
        kl_ctl.update(kl.mean().item(), B)
        t_update = time.perf_counter() - t0 - t_rollout

        # ---- 3. log, sample, checkpoint ----
        pg, cf, akl, ent, vf, vcf, gn = torch.stack(stats).mean(0).tolist()
        gold = gather_rows(dist, torch.tensor(task.gold(local.prompts, local.responses), dtype=torch.float64))[0].tolist()
        n_tokens = int(mask.sum())
        metrics = {
            "objective/scores": batch.scores.mean().item(),
            "objective/gold": float(np.mean(gold)),
            "objective/kl": kl.mean().item(),
            "objective/entropy": -(logp * mask).sum(1).mean().item(),  # Monte-Carlo, nats per response
            "objective/non_score_reward": (non_score_reward * mask).sum(1).mean().item(),
            "objective/rlhf_reward": (scores + (non_score_reward * mask).sum(1)).mean().item(),
            "objective/kl_coef": kl_ctl.value,
            "losses/policy_loss": pg,
            "losses/value_loss": vf,
            "losses/clipfrac": cf,
            "losses/vf_clipfrac": vcf,
            "losses/approx_kl": akl,
            "losses/entropy": ent,
            "losses/grad_norm": gn,
            "losses/explained_variance": explained_variance(values, returns, mask),
            "charts/episode_length": mask.sum(1).mean().item(),
            "charts/eos_rate": batch.terminated.float().mean().item(),
            "charts/lr": scheduler.get_last_lr()[0],
            "charts/tokens_per_s": n_tokens / (t_rollout + t_update),
            # generation + reference + reward (+ value, except the deferred rows whose value forward is in the update)
            "charts/rollout_tokens_per_s": n_tokens / t_rollout,
            "time/rollout_s": t_rollout,
            "time/update_s": t_update,
        }
        metrics["time/iteration_s"] = time.perf_counter() - t0  # rollout + update + scoring and metrics
        logger.log(iteration + 1, metrics)
        bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", gold=f"{metrics['objective/gold']:.2f}", kl=f"{metrics['objective/kl']:.2f}")
        done = iteration + 1 == cfg.iterations
        if ((iteration + 1) % cfg.sample_every == 0 or done) and dist.is_main_process:
            write_samples(out_dir / "samples.jsonl", iteration + 1, batch, gold, n=8)
        if (iteration + 1) % cfg.save_every == 0 or done:
            save_checkpoint(out_dir / "checkpoint", models, optimizer, scheduler, {"iteration": iteration + 1, "kl_ctl": kl_ctl.state_dict()})
    logger.close()

    final = save_model_folder(policy, tokenizer, out_dir / "model")
    write_summary(out_dir, {"iterations": cfg.iterations, "final_kl_coef": kl_ctl.value})
    dist.wait_for_everyone()  # the model and summary are on disk when ppo() returns, in every process
    return final


def check_finite(iteration: int, **values: torch.Tensor) -> None:
    for name, value in values.items():
        if not torch.isfinite(value).all():
            raise NonFiniteError(
                f"non-finite {name} at iteration {iteration + 1}; stopping before the update, "
                "the last checkpoint is intact (try a lower lr or a larger kl_coef)"
            )


def write_samples(path: Path, iteration: int, batch: Rollout, gold: list[float], n: int) -> None:
    import json

    with path.open("a") as f:
        for i in range(min(n, len(batch.prompts))):
            row = {"iteration": iteration, "prompt": batch.prompts[i], "response": batch.responses[i],
                   "score": batch.scores[i].item(), "gold": gold[i]}
            f.write(json.dumps(row) + "\n")


def load_ptx_blocks(cfg: PPOConfig, tokenizer) -> torch.Tensor:
    from agents.data import load_text_source
    from agents.pretrain import pack_blocks

    blocks, _ = pack_blocks(tokenizer, load_text_source(cfg.ptx_data), cfg.ptx_seq_len)
    return blocks


def ptx_loss(policy, blocks: torch.Tensor, n: int, mine: slice, generator: torch.Generator, device) -> torch.Tensor:
    """Next-token cross-entropy on n random pretraining blocks (InstructGPT's PPO-ptx term, as a loss): this
    process's blocks `mine` of the n, their token losses summed and divided by all n blocks' token count, so that
    the processes' gradients sum to the mean's. Every process draws all n (the generator stays in step)."""
    idx = torch.randint(len(blocks), (n,), generator=generator)[mine]
    x = blocks[idx].to(device)  # (n / N, S+1)
    logits = policy(input_ids=x[:, :-1]).logits  # (n / N, S, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum") / (n * (x.shape[1] - 1))


def main() -> None:
    import tyro

    ppo(tyro.cli(PPOConfig))


if __name__ == "__main__":
    main()
