"""Evaluate any policy on any task: gold and proxy scores, KL to a reference policy, perplexity, diversity.

    textenv eval --policy runs/default/ppo/model --reference runs/default/sft/model --reward runs/default/rm/model
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from agents.core import kl_estimate, logprobs_from_logits
from agents.decoding import position_ids_from_mask
from agents.sampler import rollout
from rewards.base import as_reward_fn, call_reward
from textenv.models import load_causal_lm
from textenv.tasks import get_task
from textenv.tokenizer import load_tokenizer
from textenv.vector_env import TextGenVectorEnv


@dataclass
class EvalConfig:
    policy: str
    """Hub id or folder of the causal LM to evaluate."""
    task: str = "sentiment"
    """Embedded task: its prompts and gold scorer."""
    reference: str | None = None
    """Folder of a reference policy (the SFT model) for KL(policy || reference); None skips the KL."""
    reward: str | None = None
    """A proxy reward to score the samples with, beside the gold score: a sequence-classification folder or hub id
    (a learned reward model), or a 'module:attr' batched callable."""
    few_shot: bool = False
    """Prompt with the task's few-shot document (for a pretrained-only model) and cut the answer at a newline."""
    split: str = "test"
    """Which prompts: train, valid or test."""
    n_prompts: int = 128
    """How many prompts (one response each)."""
    temperature: float = 0.7
    """Sampling temperature (the KL is computed at this temperature too)."""
    max_new_tokens: int | None = None
    """Response budget; default: the task's."""
    batch_size: int = 64
    """Episodes per rollout."""
    seed: int = 0
    """Sampling seed."""
    out: str | None = None
    """Write the metrics and samples to this JSON file."""
    device: str | None = None
    """torch device for the policy, the reference and the proxy; default: cuda if available, else cpu."""


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the responses' whitespace tokens (Li et al. 2016, arXiv 1510.03055)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sequence_logprobs(model, input_ids, attention_mask, P: int, temperature: float, vocab_size: int | None = None) -> torch.Tensor:
    """(B, T) log-probs of the response tokens (columns P:) under `model` at `temperature`, over the first
    `vocab_size` logits (the env's actions; see `agents.ppo.policy_forward`)."""
    T = input_ids.shape[1] - P
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=T + 1,
    ).logits[:, :-1, :vocab_size]  # (B, T, V)
    return logprobs_from_logits(logits, input_ids[:, P:], temperature)


@torch.no_grad()
def perplexity(model, tokenizer, pairs: list[dict], batch_size: int = 32) -> float:
    """exp(mean NLL) of the demonstrations' response tokens (EOS included) given their prompts."""
    nll, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        rows = [
            (tokenizer(p["prompt"])["input_ids"], tokenizer(p["response"])["input_ids"] + [tokenizer.eos_token_id])
            for p in pairs[start : start + batch_size]
        ]
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # (B, L) right-padded
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (a, b) in enumerate(rows):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
            mask[i, : len(a) + len(b)] = 1
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]  # (B, L-1, V)
        target = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        nll, count = nll + loss.item(), count + int((target != -100).sum())
    return float(np.exp(nll / count))


def evaluate(cfg: EvalConfig) -> dict:
    task = get_task(cfg.task)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy).to(device).eval()
    reference = load_causal_lm(cfg.reference).to(device).eval() if cfg.reference else None
    proxy = as_reward_fn(cfg.reward, device=device) if cfg.reward else None
    prompts = task.prompts(cfg.split, n=cfg.n_prompts)
    shown = [task.few_shot(p) for p in prompts] if cfg.few_shot else prompts
    T = cfg.max_new_tokens or task.max_new_tokens
    # few-shot documents are long: give them the model's whole context but the response budget
    P = min(max(len(tokenizer(s)["input_ids"]) for s in shown), policy.config.max_position_embeddings - T) if cfg.few_shot else task.max_prompt_tokens
    B = min(cfg.batch_size, len(prompts))
    envs = TextGenVectorEnv(
        num_envs=B, prompts=shown, tokenizer=tokenizer, reward_fn=lambda p, c: [0.0] * len(c),
        max_prompt_tokens=P, max_new_tokens=T,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    responses, kls, eos = [], [], []
    for start in range(0, len(prompts), B):
        index = np.arange(start, start + B) % len(prompts)  # the last batch wraps around; extras are dropped
        batch = rollout(policy, envs, generator, temperature=cfg.temperature, prompt_index=index)
        keep = min(B, len(prompts) - start)
        responses += batch.responses[:keep]
        eos += batch.terminated[:keep].tolist()
        if reference is not None and not cfg.few_shot:
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logp = sequence_logprobs(policy, ids, mask, P, cfg.temperature, envs.setup.vocab_size)
            ref_logp = sequence_logprobs(reference, ids, mask, P, cfg.temperature, envs.setup.vocab_size)
            kls += (kl_estimate(logp, ref_logp) * batch.response_mask.to(device)).sum(1)[:keep].tolist()
    if cfg.few_shot:  # the document trick has no EOS: the answer is the first line
        responses = [r.split("\n")[0] for r in responses]
    gold = task.gold(prompts, responses)
    result = {
        "policy": cfg.policy,
        "task": cfg.task,
        "few_shot": cfg.few_shot,
        "n": len(prompts),
        "gold_mean": float(np.mean(gold)),
        "gold_std": float(np.std(gold)),
        "eos_rate": float(np.mean(eos)),
        "perplexity": perplexity(policy, tokenizer, task.demonstrations(cfg.split, n=min(256, cfg.n_prompts * 2))),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
    }
    proxy_scores = call_reward(proxy, prompts, responses) if proxy else None
    if proxy_scores is not None:
        result["proxy_mean"] = float(np.mean(proxy_scores))
    if kls:
        result["kl_to_reference"] = float(np.mean(kls))
    result["samples"] = [
        {"prompt": p, "response": r, "gold": g, **({"proxy": proxy_scores[i]} if proxy_scores else {})}
        for i, (p, r, g) in enumerate(zip(prompts, responses, gold))
    ]
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({"config": asdict(cfg), **result}, indent=2))
    return result
