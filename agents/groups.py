"""What the critic-free algorithms (GRPO, RLOO) share: their setup (`setup_groups`) and their rollout
(`sample_groups`): k responses to each of num_prompts prompts.

Group g is rows g*k .. g*k + k-1 of the batch. Under N processes each plays its global rows of the batch, with
their prompts and sampling numbers, and the batch is then gathered, so every process holds all of it (as in
ppo.py; see agents/distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState

from agents.distributed import gather_rollout, gather_rows, process_device, rank_rows, rollout_uniforms
from agents.policy import chunked, iteration_generator, policy_forward, prompt_budget
from agents.run import distributed_state
from agents.sampler import Rollout, rollout
from rewards.base import as_reward_fn
from textenv.models import load_causal_lm
from textenv.models.gpt2 import frozen_forward
from textenv.tasks import Task, get_task
from textenv.tokenizer import load_tokenizer
from textenv.vector_env import TextGenVectorEnv


@dataclass
class GroupSetup:
    """GRPO's and RLOO's models, env and optimizer, built the same way (`setup_groups`)."""

    dist: PartialState  # this process among N (N = 1 without a launcher); only the main one writes
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module  # trained
    ref_forward: object  # the frozen SFT reference (its lean forward on packed weights), or None
    task: Task  # its gold score is logged beside the proxy
    envs: TextGenVectorEnv  # this process's sub-envs; the reward model sits inside
    mine: slice  # this process's responses: global rows [mine.start, mine.stop)
    B: int  # responses per iteration, num_prompts * k
    P: int  # prompt tokens
    V: int  # actions (the env's vocabulary)
    mb_size: int  # rows per minibatch
    rows: int  # rows per micro-batch (forward/backward pass)
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


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
    policy = load_causal_lm(cfg.policy).to(device)  # dropout off: log-probs are reproducible
    ref_policy = load_causal_lm(cfg.policy).to(device).eval().requires_grad_(False) if reference else None
    task = get_task(cfg.task)
    reward_fn = task.gold if cfg.reward == "gold" else as_reward_fn(cfg.reward, label=cfg.reward_label, device=device)
    mine = rank_rows(B, dist)
    envs = TextGenVectorEnv(num_envs=mine.stop - mine.start, task=cfg.task, prompts=cfg.prompts, tokenizer=tokenizer,
                            reward_fn=reward_fn, max_new_tokens=cfg.max_new_tokens,
                            max_prompt_tokens=prompt_budget(cfg, tokenizer))
    P, T, V = envs.setup.max_prompt_tokens, envs.setup.max_new_tokens, envs.setup.vocab_size
    mb_size = B // cfg.num_minibatches
    rows = cfg.micro_batch_size or mb_size
    # speed: the frozen reference through the lean forward (GPT-2), its weights packed once for the run
    ref_forward = None if ref_policy is None else frozen_forward(ref_policy, pack_rows=rows * (P + T))
    params = list(policy.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for the whole step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / cfg.iterations)  # linear anneal
    return GroupSetup(dist, device, tokenizer, policy, ref_forward, task, envs, mine, B, P, V, mb_size, rows, params,
                      optimizer, scheduler)


@dataclass
class GroupBatch:
    """A rollout of groups, gathered over the processes, as the update reads it (all on the training device)."""

    batch: Rollout  # the whole batch
    local: Rollout  # this process's rows of it
    input_ids: torch.Tensor  # (B, P+T)
    attention_mask: torch.Tensor  # (B, P+T)
    mask: torch.Tensor  # (B, T) float, 1 up to and including EOS
    scores: torch.Tensor  # (B,) the env's scores, a response without EOS given missing_eos_penalty instead
    logp: torch.Tensor  # (B, T) the sampler's log-probs: the "old" ones (see ppo.py)
    ref_logp: torch.Tensor | None  # (B, T) the reference's log-probs, None without a reference


def sample_groups(policy, ref_policy, envs, *, num_prompts: int, k: int, iteration: int, seed: int,
                  temperature: float, missing_eos_penalty: float | None, rows: int, mine: slice, dist,
                  device: torch.device) -> GroupBatch:
    """Play one iteration's groups; `rows` chunks the reference forward, `mine` are this process's global rows.
    `ref_policy`: the frozen reference (a causal LM or a `GPT2Forward` of one), or None."""
    B, P, T, V = num_prompts * k, envs.setup.max_prompt_tokens, envs.setup.max_new_tokens, envs.setup.vocab_size
    policy.eval()
    prompt_ids = torch.randint(len(envs.setup.prompts), (num_prompts,),
                               generator=iteration_generator(seed, iteration, 2))
    uniforms = rollout_uniforms(iteration_generator(seed, iteration, 0), B, T)  # (B, T)
    local = rollout(
        policy, envs, uniforms=uniforms[mine], temperature=temperature,
        seed=(seed * 1_000_003 + iteration) * B + mine.start, prompt_index=np.repeat(prompt_ids.numpy(), k)[mine],
    )
    ref_logp = None
    if ref_policy is not None:  # this process's rows, then everyone's
        with torch.no_grad():
            ref_logp = chunked(lambda ids, am: policy_forward(ref_policy, ids, am, P, temperature, vocab_size=V,
                                                              entropy=False)[0],
                               rows, local.input_ids.to(device), local.attention_mask.to(device))  # (b, T)
        ref_logp = gather_rows(dist, ref_logp)[0]  # (B, T)
    batch = gather_rollout(dist, local)
    scores = batch.scores.to(device)  # (B,)
    if missing_eos_penalty is not None:  # the EOS trick: a truncated response gets a fixed penalty
        scores = torch.where(batch.terminated.to(device), scores, torch.full_like(scores, missing_eos_penalty))
    return GroupBatch(
        batch=batch, local=local, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
        mask=batch.response_mask.to(device).float(), scores=scores, logp=batch.logprobs.to(device), ref_logp=ref_logp,
    )
