"""The rollout of the critic-free algorithms (GRPO, RLOO): k responses to each of num_prompts prompts.

Group g is rows g*k .. g*k + k-1 of the batch. Under N processes each plays its global rows of the batch, with
their prompts and sampling numbers, and the batch is then gathered, so every process holds all of it (as in
ppo.py; see agents/distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents.distributed import gather_rollout, gather_rows, rollout_uniforms
from agents.policy import chunked, iteration_generator, policy_forward
from agents.sampler import Rollout, rollout


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
    prompt_ids = torch.randint(len(envs.setup.prompts), (num_prompts,), generator=iteration_generator(seed, iteration, 2))
    uniforms = rollout_uniforms(iteration_generator(seed, iteration, 0), B, T)  # (B, T)
    local = rollout(
        policy, envs, uniforms=uniforms[mine], temperature=temperature,
        seed=(seed * 1_000_003 + iteration) * B + mine.start, prompt_index=np.repeat(prompt_ids.numpy(), k)[mine],
    )
    ref_logp = None
    if ref_policy is not None:  # this process's rows, then everyone's
        with torch.no_grad():
            ref_logp = chunked(lambda ids, am: policy_forward(ref_policy, ids, am, P, temperature, vocab_size=V, entropy=False)[0],
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
