"""What the critic-free algorithms (GRPO, RLOO) share: their setup (`setup_groups`) and their rollout
(`sample_groups`): k responses to each of num_prompts prompts.

Group g is rows g*k .. g*k + k-1 of the batch. Under N processes each plays its global rows of the batch, with
their prompts and sampling numbers, and the batch is then gathered, so every process holds all of it (as in
ppo.py; see agents/distributed.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState

from agents.distributed import gather_rollout, gather_rows, process_device, rank_rows, rollout_uniforms
from agents.episodes import Episodes, make_episodes
from agents.lora import reference_policy, with_lora
from agents.policy import chunked, gather_gold, iteration_generator, policy_forward, prompt_budget
from agents.run import distributed_state
from agents.sampler import Rollout
from agents.sharding import shard_blocks, shards, sync_replica
from textenv.models import load_causal_lm
from textenv.models.lean import frozen_forward
from textenv.tokenizer import load_tokenizer


@dataclass
class GroupSetup:
    """GRPO's and RLOO's models, env and optimizer, built the same way (`setup_groups`)."""

    dist: PartialState  # this process among N (N = 1 without a launcher); only the main one writes
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module  # trained
    ref_forward: object  # the frozen SFT reference (its lean forward on packed weights), or None
    episodes: Episodes  # this process's sub-envs (an embedded task's, the reward inside, or a multi-turn env id's)
    mine: slice  # this process's responses: global rows [mine.start, mine.stop)
    B: int  # responses per iteration, num_prompts * k
    mb_size: int  # rows per minibatch
    rows: int  # rows per micro-batch (forward/backward pass)
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: torch.nn.Module  # what the rollout samples from: the policy, or (sharded) a plain replica of it

    def sampling_policy(self) -> torch.nn.Module:
        """The model to sample this iteration's rollout from: the policy itself, or under `parallel="fsdp"` its
        replica with the shards' current weights (`agents.sharding.sync_replica`)."""
        return self.policy if self.sampler is self.policy else sync_replica(self.sampler, self.policy)


def setup_groups(cfg, reference: bool) -> GroupSetup:
    """The policy, the reference (only if `reference`: a KL term or penalty), the env with the reward inside,
    AdamW with a linear anneal, for a GRPO or RLOO config."""
    dist = distributed_state()
    device = process_device(cfg.device, dist)
    B = cfg.num_prompts * cfg.num_generations
    if (B // cfg.num_minibatches) % dist.num_processes:
        raise ValueError(f"a minibatch of num_prompts * num_generations / num_minibatches = {B // cfg.num_minibatches} "
                         f"rows does not split evenly over {dist.num_processes} processes")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.policy)
    policy = with_lora(load_causal_lm(cfg.policy), cfg.lora, "CAUSAL_LM").to(device)  # dropout off
    ref_policy = reference_policy(policy, cfg.policy, device) if reference else None  # LoRA: adapter off
    mine = rank_rows(B, dist)
    episodes = make_episodes(cfg.task, num_envs=mine.stop - mine.start, tokenizer=tokenizer, reward=cfg.reward,
                             reward_label=cfg.reward_label, device=device, prompts=cfg.prompts,
                             prompt_format=cfg.prompt_format, max_new_tokens=cfg.max_new_tokens,
                             max_prompt_tokens=prompt_budget(cfg, tokenizer))
    P, T = episodes.P, episodes.T
    mb_size = B // cfg.num_minibatches
    rows = cfg.micro_batch_size or mb_size
    # speed: the frozen reference through the lean forward (GPT-2, the Llama family), its weights packed once for
    # the run (a LoRA policy's adapter-off reference runs its HF forward)
    sharded = shards(cfg.parallel, dist.num_processes)  # N processes, parallel="fsdp": the models sharded
    if ref_policy is not None and sharded and cfg.shard_reference:
        ref_policy = shard_blocks(ref_policy)  # its forward is then a collective: every process runs as many
    ref_forward = None if ref_policy is None else frozen_forward(ref_policy, pack_rows=rows * (P + T))
    # sharded: the policy too, the rollout sampling from a synced replica
    sampler = policy
    if sharded:
        sampler, policy = copy.deepcopy(policy), shard_blocks(policy, gradients="sum")
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for the whole step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / cfg.iterations)  # linear anneal
    return GroupSetup(dist, device, tokenizer, policy, ref_forward, episodes, mine, B, mb_size, rows, params,
                      optimizer, scheduler, sampler)


@dataclass
class GroupBatch:
    """A rollout of groups, gathered over the processes, as the update reads it (all on the training device)."""

    batch: Rollout  # the whole batch
    gold: list[float] | None  # (B,) each episode's gold score; None on a user's own prompts
    P: int  # prompt columns of this batch (multi-turn: its longest opening)
    input_ids: torch.Tensor  # (B, P+T)
    attention_mask: torch.Tensor  # (B, P+T)
    mask: torch.Tensor  # (B, T) float, the agent's tokens: up to and including EOS (multi-turn: its turns)
    scores: torch.Tensor  # (B,) the env's scores, a response without EOS given missing_eos_penalty instead
    logp: torch.Tensor  # (B, T) the sampler's log-probs: the "old" ones (see ppo.py)
    ref_logp: torch.Tensor | None  # (B, T) the reference's log-probs, None without a reference


def sample_groups(policy, ref_policy, episodes: Episodes, *, num_prompts: int, k: int, iteration: int, seed: int,
                  temperature: float, missing_eos_penalty: float | None, rows: int, mine: slice, dist,
                  device: torch.device) -> GroupBatch:
    """Play one iteration's groups; `rows` chunks the reference forward, `mine` are this process's global rows.
    `ref_policy`: the frozen reference (a causal LM or a `LeanForward` of one), or None. A group's k episodes
    share a prompt (multi-turn: an env seed, so the same opening)."""
    B, V = num_prompts * k, episodes.V
    policy.eval()
    prompt_ids = torch.randint(episodes.num_prompts, (num_prompts,), generator=iteration_generator(seed, iteration, 2))
    uniforms = rollout_uniforms(iteration_generator(seed, iteration, 0), B, episodes.T)  # (B, T)
    local, local_gold = episodes.play(
        policy, uniforms=uniforms[mine], temperature=temperature, seed=(seed * 1_000_003 + iteration) * B + mine.start,
        prompt_index=np.repeat(prompt_ids.numpy(), k)[mine],
    )
    P = local.prompt_ids.shape[1]
    ref_logp = None
    if ref_policy is not None:  # this process's rows, then everyone's
        with torch.no_grad():
            ref_logp = chunked(lambda ids, am: policy_forward(ref_policy, ids, am, P, temperature, vocab_size=V,
                                                              entropy=False)[0],
                               rows, local.input_ids.to(device), local.attention_mask.to(device))  # (b, T)
        ref_logp = gather_rows(dist, ref_logp)[0]  # (B, T)
    batch = gather_rollout(dist, local)
    gold = gather_gold(dist, local_gold)
    scores = batch.scores.to(device)  # (B,) each episode's return
    if missing_eos_penalty is not None:  # the EOS trick: a truncated episode gets a fixed penalty instead
        scores = torch.where(batch.terminated.to(device), scores, torch.full_like(scores, missing_eos_penalty))
    return GroupBatch(
        batch=batch, gold=gold, P=P, input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device), mask=batch.agent_mask.to(device).float(), scores=scores,
        logp=batch.logprobs.to(device), ref_logp=ref_logp,
    )
