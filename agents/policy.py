"""What the RL trainers (PPO, GRPO, RLOO) share around their loops: the forwards of the policy, the reference and
the value model over a rollout's rows, their RNG streams, the finiteness check, the samples table.

A GPT-2 or Llama-family model runs through the lean forward (`textenv.models.lean.LeanForward`), which computes
only the response positions in its last block; any other model runs its HF forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from agents.core import logprobs_and_entropy
from agents.distributed import gather_rows, sum_gradients, sum_over_processes
from agents.lora import is_adapted
from agents.sampler import Rollout
from textenv.models.lean import lean_forward
from textenv.models.tokens import position_ids_from_mask, scale_logits


class NonFiniteError(RuntimeError):
    """A loss, reward or gradient became NaN/inf; the run stops and the last good checkpoint stays as it was."""


def policy_forward(policy, input_ids, attention_mask, P: int, temperature: float, hidden: bool = False,
                   vocab_size: int | None = None, entropy: bool = True):
    """Temperature-scaled log-probs, entropies (None unless `entropy`) and last hidden states (None unless
    `hidden`) of the response tokens.

    `policy`: a causal LM, or a `LeanForward` of one (a frozen reference's, with packed weights). The logits at
    position P-1+t predict response token t; only those T positions go through the LM head, and a GPT-2 or
    Llama-family model runs through the lean forward (textenv/models/lean.py), which computes only them in its last
    block.
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
    z = scale_logits(logits[..., :vocab_size], temperature)  # (B, T, V) scaled once, for both below
    logp, ent = logprobs_and_entropy(z, input_ids[:, P:], entropy)  # (B, T) each; entropy without a graph
    return logp, ent, states if hidden else None


def value_forward(value_model, input_ids, attention_mask, P: int) -> torch.Tensor:
    """Per-token values V(prompt + response[:t]) from a sequence-classification model's `score` head: (B, T)."""
    lean = lean_forward(value_model)
    if lean is not None:  # the lean forward computes only the T positions in its last block
        return lean.apply_head(lean.response_hidden(input_ids, attention_mask, P)).squeeze(-1)  # (B, T)
    model = value_model.get_base_model() if is_adapted(value_model) else value_model  # LoRA: the adapted classifier
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state  # (B, L, H)
    return model.score(hidden[:, P - 1 : -1]).squeeze(-1)  # (B, T)


def chunked(fn, rows: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over chunks of `rows` rows of the tensors, concatenated: a no-grad forward's memory stays that of a chunk."""
    return torch.cat([fn(*(t[i : i + rows] for t in tensors)) for i in range(0, len(tensors[0]), rows)])


def iteration_generator(seed: int, iteration: int, stream: int) -> torch.Generator:
    """An RNG that is a pure function of (seed, iteration, stream): resuming at an iteration replays it exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 16 + stream)


def check_finite(iteration: int, **values: torch.Tensor) -> None:
    for name, value in values.items():
        if not torch.isfinite(value).all():
            raise NonFiniteError(
                f"non-finite {name} at iteration {iteration + 1}; stopping before the update, "
                "the last checkpoint is intact (try a lower lr or a larger kl_coef)"
            )


def prompt_budget(cfg, tokenizer) -> int | None:
    """The prompt budget of an RL run: `cfg.max_prompt_tokens` if set; else, with a user's `cfg.prompts`, the
    longest of those prompts in tokens as the policy sees them (`cfg.prompt_format`), so that none is cut; else None
    (the embedded task's budget, grown to fit a chat template's rendering)."""
    if cfg.max_prompt_tokens is not None or cfg.prompts is None:
        return cfg.max_prompt_tokens
    from textenv.prompts import load_prompts, render_prompts

    texts, _ = render_prompts(load_prompts(cfg.prompts), tokenizer, cfg.prompt_format)
    return max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in texts)


def minibatch_step(dist, params: list, optimizer, max_grad_norm: float, iteration: int,
                   mb_stats: torch.Tensor) -> torch.Tensor:
    """The end of a minibatch in every RL trainer: under N processes the gradients and the loss statistics are
    summed into the global minibatch's (`agents.distributed`); the gradient norm is clipped; non-finite values stop
    the run before the step (checked after the sums, so every process stops at the same minibatch); the optimizer
    steps. Returns the global statistics with the gradient norm appended, for the iteration's means."""
    sum_gradients(dist, params)
    mb_stats = sum_over_processes(dist, mb_stats)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # sharded parameters: the global norm
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    check_finite(iteration, loss=mb_stats, grad_norm=grad_norm)
    optimizer.step()
    return torch.cat([mb_stats, grad_norm.detach()[None]])


def gather_gold(dist, local_gold: list[float] | None) -> list[float] | None:
    """Every process's episodes' gold scores, in rank order (None stays None: no gold applies)."""
    if local_gold is None:
        return None
    return gather_rows(dist, torch.tensor(local_gold, dtype=torch.float64))[0].tolist()


def gold_metrics(gold: list[float] | None) -> dict:
    """`objective/gold`, the mean gold score, where a gold applies (None: a user's own prompts; nothing logged)."""
    return {} if gold is None else {"objective/gold": float(np.mean(gold))}


def progress(metrics: dict) -> dict:
    """The progress bar's figures: the proxy score, the gold where there is one, the KL where there is one."""
    names = (("score", "objective/scores"), ("gold", "objective/gold"), ("kl", "objective/kl"))
    return {short: f"{metrics[key]:.2f}" for short, key in names if key in metrics}


def write_samples(path: Path, iteration: int, batch: Rollout, gold: list[float] | None, n: int) -> None:
    """Append the first n responses of `batch`, with their scores and gold scores (where a gold applies), to
    samples.jsonl (a multi-turn episode's conversation too, as "messages")."""
    with path.open("a") as f:
        for i in range(min(n, len(batch.prompts))):
            row = {"iteration": iteration, "prompt": batch.prompts[i], "response": batch.responses[i],
                   "score": batch.scores[i].item(), **({} if gold is None else {"gold": gold[i]})}
            if batch.messages is not None:
                row["messages"] = batch.messages[i]
            f.write(json.dumps(row) + "\n")
