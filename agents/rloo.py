"""REINFORCE with a baseline, and RLOO (REINFORCE Leave-One-Out), in a TextGenVectorEnv: k responses per prompt,
each response's advantage is its score minus the mean score of the other k - 1. No value model, no GAE: the whole
response is one action (Ahmadian et al. 2024), so its advantage is one number per sequence.

References: Williams 1992 (REINFORCE); Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"
(https://openreview.net/forum?id=r1lgTGL5DE); Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs" (arXiv 2402.14740); TRL's RLOOTrainer (KL in the reward).
The baselines are tested in `agents/core.py::group_advantages`.

    python -m agents.rloo --policy runs/x/sft/model --reward runs/x/rm/model --out-dir runs/x/rloo
    torchrun --nproc_per_node 2 -m agents.rloo ...  # data-parallel, as PPO (agents/distributed.py)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from agents.core import clipped_policy_loss, group_advantages, kl_estimate
from agents.distributed import rank_rows
from agents.groups import sample_groups, setup_groups
from agents.lora import LoRAConfig
from agents.policy import (
    check_finite,
    gold_metrics,
    iteration_generator,
    minibatch_step,
    policy_forward,
    progress,
    write_samples,
)
from agents.run import RunLogger, cli, finish_run, load_checkpoint, save_checkpoint, start_run
from agents.sharding import check_parallel
from textenv.chat import check_prompt_format
from textenv.models.tokens import check_temperature


@dataclass
class RLOOConfig:
    policy: str = "runs/default/sft/model"
    """Hub id or folder of the SFT policy; it is also the frozen reference for the KL penalty."""
    reward: str = "runs/default/rm/model"
    """The reward: a sequence-classification folder or hub id, a 'module:attr' callable, or 'gold' for the task's
    gold scorer."""
    out_dir: str = "runs/default/rloo"
    """Run folder: config, metrics.jsonl, tb/, samples.jsonl, checkpoint/, and the final policy in model/."""
    task: str = "sentiment"
    """Embedded task whose train prompts are used and whose gold score is logged beside the proxy score; or a
    multi-turn env id (textenv/Calculator-v0, a user's 'module:Id'), whose own return is the gold."""
    prompts: str | None = None
    """Other prompts (a .jsonl/.csv/.parquet/.txt file or hub id) instead of the task's."""
    prompt_format: str = "auto"
    """How a str prompt reaches the policy: "chat" (a user message through its tokenizer's chat template, the episode
    ending at the template's end-of-turn token), "text" (as it is), or "auto" ("chat" for an instruct checkpoint: a
    chat template other than textenv's embedded one)."""
    reward_label: str | None = None
    """For a classifier reward with several labels: the label whose logit is the reward (e.g. POSITIVE)."""
    baseline: Literal["rloo", "mean", "none"] = "rloo"
    """'rloo': the mean of the other k - 1 scores (unbiased); 'mean': the group mean; 'none': vanilla REINFORCE."""
    num_prompts: int = 16
    """Prompts per iteration, over all processes, drawn with replacement (a prompt drawn twice makes two
    independent groups). Each of N processes plays num_prompts * num_generations / N of the responses."""
    num_generations: int = 4
    """Group size k: responses sampled per prompt; the batch is num_prompts * k responses."""
    max_new_tokens: int | None = None
    """Response budget; default: the task's."""
    max_prompt_tokens: int | None = None
    """Prompt budget in tokens (longer prompts keep their last tokens); default: the task's, or with --prompts the
    longest of them, so that none is cut."""
    temperature: float = 0.7
    """Sampling temperature; log-probs for the loss and the KL use logits divided by it too."""
    iterations: int = 20
    """Iterations (rollout + update)."""
    update_epochs: int = 1
    """Passes over each rollout. The first minibatch of the first pass is on-policy (ratio 1): its gradient is
    the plain REINFORCE one; later ones reuse the samples under the clipped ratio."""
    num_minibatches: int = 4
    """Minibatches (optimizer steps) per epoch."""
    micro_batch_size: int | None = 8
    """Rows per forward/backward pass in each process (gradient accumulation, as in PPO); None: a whole minibatch
    at once."""
    lr: float = 1e-4
    """Adam learning rate, annealed linearly to 0."""
    adam_eps: float = 1e-5
    """Adam epsilon: 1e-5 as in the original TF code; PyTorch's 1e-8 makes early steps more aggressive."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping."""
    clip_coef: float = 0.2
    """Clipping of the sequence-level ratio when samples are reused (update_epochs > 1, later minibatches)."""
    kl_coef: float = 0.3
    """beta of the KL penalty subtracted from each response's score before the baseline: r - beta * sum_t
    (logp - ref_logp). 0.3 is PPO's initial coefficient here (TRL's RLOOConfig uses 0.05); 0 skips the
    reference model (and the objective/kl metric)."""
    missing_eos_penalty: float | None = -1.0
    """Score given instead of the reward to a response with no EOS; None keeps the reward."""
    sample_every: int = 10
    """Write a table of sample responses to samples.jsonl every this many iterations (and at the end)."""
    save_every: int = 10
    """Checkpoint every this many iterations; a rerun with the same config resumes from the last one."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapter on the policy; the reference is then the policy with its adapter disabled (no second copy). Rank 0
    (the default) trains every weight."""
    parallel: str = "ddp"
    """Under several processes: "ddp" replicates the policy and sums gradients; "fsdp" shards its weights, gradients
    and optimizer state over the processes (PyTorch FSDP2, one unit per transformer block; agents/sharding.py) and
    samples from a replica synced from the shards each iteration. The frozen reference and reward model are
    replicated either way. One process: the plain model either way."""
    shard_reference: bool = False
    """With parallel="fsdp" under several processes: shard the frozen reference too (1/N of its weights per process;
    it then runs the HF forward, all-gathering each block, instead of the lean forward on packed weights). False:
    every process holds the whole reference, the faster choice."""
    seed: int = 0
    """Seed: prompts, sampling and minibatch order derive from (seed, iteration), so resuming needs no stream."""
    device: str | None = None
    """torch device; default: this process's (cuda, cuda:<local rank> under a multi-GPU launch, else cpu)."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        check_prompt_format(self.prompt_format)
        check_parallel(self.parallel, self.lora.rank)
        for name in ("num_prompts", "iterations", "update_epochs", "num_minibatches", "save_every", "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.baseline not in ("rloo", "mean", "none"):
            raise ValueError(f"baseline must be 'rloo', 'mean' or 'none', got {self.baseline!r}")
        if self.num_generations < (1 if self.baseline == "none" else 2):  # a group of 1 has no baseline to take
            raise ValueError(f"num_generations (group size k) must be >= 2 for baseline={self.baseline!r}, "
                             f"got {self.num_generations}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if (self.num_prompts * self.num_generations) % self.num_minibatches:
            raise ValueError(f"num_prompts * num_generations = {self.num_prompts * self.num_generations} is not "
                             f"divisible by num_minibatches={self.num_minibatches}")
        check_temperature(self.temperature)
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


def rloo(cfg: RLOOConfig) -> Path:
    out_dir, complete = start_run(cfg, "rloo")
    if complete:
        return out_dir / "model"
    s = setup_groups(cfg, reference=cfg.kl_coef > 0)  # models, env, optimizer: as the other critic-free algorithm
    dist, device, tokenizer, policy, ref_forward = s.dist, s.device, s.tokenizer, s.policy, s.ref_forward
    episodes, mine, B, V, mb_size, rows = s.episodes, s.mine, s.B, s.episodes.V, s.mb_size, s.rows
    params, optimizer, scheduler = s.params, s.optimizer, s.scheduler
    k = cfg.num_generations
    models = {"policy": policy}
    state = load_checkpoint(out_dir / "checkpoint", models, optimizer, scheduler)
    start = 0 if state is None else state["iteration"]
    logger = RunLogger(out_dir, resume_step=None if state is None else start)

    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"rloo[{cfg.baseline}]",
               unit="it", disable=not dist.is_main_process)
    for iteration in bar:
        t0 = time.perf_counter()
        # ---- 1. rollout: k responses to each of num_prompts prompts; group g is rows g*k .. g*k + k-1 ----
        g = sample_groups(s.sampling_policy(), ref_forward, episodes, num_prompts=cfg.num_prompts, k=k,
                          iteration=iteration, seed=cfg.seed, temperature=cfg.temperature,
                          missing_eos_penalty=cfg.missing_eos_penalty, rows=rows, mine=mine, dist=dist, device=device)
        batch, P, input_ids, attention_mask = g.batch, g.P, g.input_ids, g.attention_mask  # (B, P+T)
        mask, scores, logp, ref_logp = g.mask, g.scores, g.logp, g.ref_logp  # (B, T), (B,), (B, T), (B, T) or None
        with torch.no_grad():
            kl = torch.zeros_like(scores)  # (B,)
            if ref_logp is not None:  # k1 KL of each response, in nats (TRL's RLOOTrainer)
                kl = torch.where(mask.bool(), kl_estimate(logp, ref_logp), 0.0).sum(1)  # (B,) agent tokens only
            rlhf_reward = scores - cfg.kl_coef * kl  # (B,) KL-penalised sequence reward, before the baseline
            advantages = group_advantages(rlhf_reward, k, cfg.baseline)  # (B,)
        old_seq_logp = logp.sum(1)  # (B,) log pi_old(response); logp is 0 off the agent's tokens
        check_finite(iteration, scores=scores, kl=kl)
        t_rollout = time.perf_counter() - t0

        # ---- 2. update: the whole response is one action; the loss is a mean over responses ----
        # Sequence-level ratio exp(sum_t logp - old) and a sequence mean (as TRL's original RLOOTrainer): while the
        # ratio is 1 the gradient is -mean_i A_i sum_t grad log pi(y_it), the REINFORCE estimator itself, where
        # each response weighs the same. A token mean would weigh a response by its length (Dr. GRPO's length bias).
        # Each process takes rows `my_mb` of every minibatch, weighted by their share of the whole minibatch's
        # responses, and the gradients are summed over the processes (see ppo.py).
        policy.train()
        order_rng = iteration_generator(cfg.seed, iteration, 1)
        my_mb = rank_rows(mb_size, dist)
        stats = []
        for _epoch in range(cfg.update_epochs):
            order = torch.randperm(B, generator=order_rng)
            for start_i in range(0, B, mb_size):
                # in row order, a group's rows fall in the same micro-batches, where their prompt runs once
                # (LeanForward.response_hidden); the minibatch's gradient is the same sum up to rounding
                mb = order[start_i : start_i + mb_size].sort().values.to(device)
                optimizer.zero_grad(set_to_none=True)
                mb_stats = torch.zeros(4, device=device)
                mb_mine = mb[my_mb]
                for j in range(0, len(mb_mine), rows):  # gradient accumulation: each micro-batch's share of responses
                    mu = mb_mine[j : j + rows]
                    weight = len(mu) / mb_size
                    new_logp, entropy, _ = policy_forward(policy, input_ids[mu], attention_mask[mu], P, cfg.temperature,
                                                          vocab_size=V)
                    new_seq_logp = torch.where(mask[mu].bool(), new_logp, 0.0).sum(1, keepdim=True)  # (rows, 1)
                    pg_loss, clipfrac, approx_kl = clipped_policy_loss(  # per response: clipfrac, approx_kl too
                        new_seq_logp, old_seq_logp[mu, None], advantages[mu, None], torch.ones_like(new_seq_logp),
                        cfg.clip_coef
                    )
                    loss = weight * pg_loss
                    loss.backward()
                    # the entropy is a token mean over the minibatch, however its rows fall into micro-batches
                    mb_entropy = (entropy * mask[mu]).sum() / mask[mb].sum()
                    mb_stats += torch.stack([weight * pg_loss, weight * clipfrac, weight * approx_kl,
                                             mb_entropy]).detach()
                # N processes: the gradients and statistics summed to the global minibatch's; clip, check, step
                stats.append(minibatch_step(dist, params, optimizer, cfg.max_grad_norm, iteration, mb_stats))
        scheduler.step()
        t_update = time.perf_counter() - t0 - t_rollout

        # ---- 3. log, sample, checkpoint ----
        pg, cf, akl, ent, gn = torch.stack(stats).mean(0).tolist()
        gold = g.gold
        n_tokens = int(mask.sum())
        metrics = {
            "objective/scores": batch.scores.mean().item(),
            **gold_metrics(gold),
            "objective/entropy": -logp.sum(1).mean().item(),  # Monte-Carlo, nats per response
            "objective/rlhf_reward": rlhf_reward.mean().item(),
            "losses/policy_loss": pg,
            "losses/clipfrac": cf,  # fraction of responses
            "losses/approx_kl": akl,  # k2 of the sequence ratio, nats per response
            "losses/entropy": ent,
            "losses/grad_norm": gn,
            "charts/episode_length": mask.sum(1).mean().item(),
            "charts/eos_rate": batch.terminated.float().mean().item(),
            "charts/lr": scheduler.get_last_lr()[0],
            "charts/tokens_per_s": n_tokens / (t_rollout + t_update),
            "charts/rollout_tokens_per_s": n_tokens / t_rollout,
            "time/rollout_s": t_rollout,
            "time/update_s": t_update,
        }
        if ref_logp is not None:
            metrics["objective/kl"] = kl.mean().item()
            metrics["objective/non_score_reward"] = -cfg.kl_coef * kl.mean().item()
        metrics["time/iteration_s"] = time.perf_counter() - t0
        logger.log(iteration + 1, metrics)
        bar.set_postfix(progress(metrics))
        done = iteration + 1 == cfg.iterations
        if ((iteration + 1) % cfg.sample_every == 0 or done) and dist.is_main_process:
            write_samples(out_dir / "samples.jsonl", iteration + 1, batch, gold, n=8)
        if (iteration + 1) % cfg.save_every == 0 or done:
            save_checkpoint(out_dir / "checkpoint", models, optimizer, scheduler, {"iteration": iteration + 1})
    logger.close()

    return finish_run(out_dir, policy, tokenizer, {"iterations": cfg.iterations}, merge=cfg.lora.merge)


def main() -> None:
    rloo(cli(RLOOConfig))


if __name__ == "__main__":
    main()
