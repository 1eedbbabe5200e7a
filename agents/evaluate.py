"""Evaluate any policy on any task: gold and proxy scores, KL to a reference policy, perplexity, diversity.

    textenv eval --policy runs/default/ppo/model --reference runs/default/sft/model --reward runs/default/rm/model
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from agents.core import IGNORE, kl_estimate, sft_loss
from agents.data import collate, encode_pairs
from agents.episodes import episode_prompts, is_multi_turn, make_episodes, turn_demonstrations
from agents.policy import policy_forward
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
    """Embedded task: its prompts and gold scorer; or a multi-turn env id: its episodes and own return."""
    reference: str | None = None
    """Folder of a reference policy (the SFT model) for KL(policy || reference); None skips the KL."""
    reward: str | None = None
    """A proxy reward to score the samples with, beside the gold score: a sequence-classification folder or hub id
    (a learned reward model), or a 'module:attr' batched callable."""
    few_shot: bool = False
    """Prompt with the task's few-shot document (for a pretrained-only model) and cut the answer at a newline. A
    multi-turn env has no such document: the model plays through the chat template as is (a zero-shot row)."""
    prompt_format: str = "auto"
    """How a str prompt reaches the policy: "chat" (a user message through its tokenizer's chat template), "text" (as
    it is), or "auto" ("chat" for an instruct checkpoint: a chat template other than textenv's embedded one). The
    few-shot document is always text."""
    split: str = "test"
    """Which prompts: train, valid or test."""
    num_prompts: int = 128
    """How many prompts (one response each)."""
    temperature: float = 0.7
    """Sampling temperature (the KL is computed at this temperature too)."""
    max_new_tokens: int | None = None
    """Response budget; default: the task's."""
    batch_size: int = 64
    """Episodes per rollout."""
    seed: int = 0
    """Sampling seed."""
    out_file: str | None = None
    """Write the metrics and samples to this JSON file."""
    device: str | None = None
    """torch device for the policy, the reference and the proxy; default: cuda if available, else cpu."""


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the responses' whitespace tokens (Li et al. 2016, arXiv 1510.03055)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def perplexity(model, tokenizer, examples: list, batch_size: int = 32, prompt_format: str = "auto") -> float:
    """exp(mean NLL) of the demonstrations' trained tokens, encoded as SFT encodes them: (prompt, response) dicts
    (the response's tokens and its end token, given the prompt as the env shows it: `agents.data.encode_pairs`), or
    (ids, labels) pairs (a multi-turn stream's agent tokens)."""
    limit = model.config.max_position_embeddings
    rows = encode_pairs(tokenizer, examples, limit, limit, prompt_format) if isinstance(examples[0], dict) else examples
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
        nll += sft_loss(logits, batch["labels"], reduction="sum").item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return float(np.exp(nll / count))


@torch.no_grad()
def evaluate(cfg: EvalConfig) -> dict:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy).to(device).eval()
    reference = load_causal_lm(cfg.reference).to(device).eval() if cfg.reference else None
    proxy = as_reward_fn(cfg.reward, device=device) if cfg.reward else None
    if is_multi_turn(cfg.task):
        result = evaluate_turns(cfg, policy, reference, proxy, tokenizer)
    else:
        result = evaluate_prompts(cfg, policy, reference, proxy, tokenizer)
    if cfg.out_file:
        Path(cfg.out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out_file).write_text(json.dumps({"config": asdict(cfg), **result}, indent=2))
    return result


def kl_to_reference(policy, reference, batch, V: int, temperature: float) -> list[float]:
    """Each episode's k1 KL(policy || reference) in nats, summed over the tokens the agent sampled."""
    device = next(policy.parameters()).device
    ids, mask, P = batch.input_ids.to(device), batch.attention_mask.to(device), batch.prompt_ids.shape[1]
    logp = policy_forward(policy, ids, mask, P, temperature, vocab_size=V, entropy=False)[0]  # (B, T)
    ref_logp = policy_forward(reference, ids, mask, P, temperature, vocab_size=V, entropy=False)[0]
    return torch.where(batch.agent_mask.to(device).bool(), kl_estimate(logp, ref_logp), 0.0).sum(1).tolist()


def evaluate_turns(cfg: EvalConfig, policy, reference, proxy, tokenizer) -> dict:
    """A multi-turn env id: num_prompts episodes of the split (their seeds, `agents.episodes.SPLIT_SEEDS`) played to
    the end; gold = the env's own return; the KL sums over the agent's tokens only. `few_shot` plays the model as
    is (the chat template is its only prompt): a base model's zero-shot row."""
    seeds = episode_prompts(cfg.task, cfg.split, cfg.num_prompts)
    B = min(cfg.batch_size, len(seeds))
    episodes = make_episodes(cfg.task, num_envs=B, tokenizer=tokenizer, reward=None)
    generator = torch.Generator().manual_seed(cfg.seed)
    gold, kls, ended, prompts, responses, messages = [], [], [], [], [], []
    for start in range(0, len(seeds), B):
        index = np.resize(seeds[start : start + B], B)  # the last batch wraps around; extras are dropped
        batch, batch_gold = episodes.play(policy, generator=generator, temperature=cfg.temperature, seed=0,
                                          prompt_index=index)
        keep = min(B, len(seeds) - start)
        gold += batch_gold[:keep]
        ended += batch.terminated[:keep].tolist()
        prompts, responses, messages = prompts + batch.prompts[:keep], responses + batch.responses[:keep], \
            messages + batch.messages[:keep]
        if reference is not None:
            kls += kl_to_reference(policy, reference, batch, episodes.V, cfg.temperature)[:keep]
    agent_texts = [" ".join(m["content"] for m in c if m["role"] == "assistant") for c in messages]
    result = {
        "policy": cfg.policy, "task": cfg.task, "few_shot": cfg.few_shot, "n": len(seeds),
        "gold_mean": float(np.mean(gold)), "gold_std": float(np.std(gold)),
        "eos_rate": float(np.mean(ended)),  # episodes the turn logic ended (not a turn or length limit)
        "turns_mean": float(np.mean([sum(m["role"] == "assistant" for m in c) for c in messages])),
        "distinct_1": distinct_n(agent_texts, 1),
        "distinct_2": distinct_n(agent_texts, 2),
        "perplexity": perplexity(policy, tokenizer, turn_demonstrations(cfg.task, tokenizer, cfg.split,
                                                                        min(256, cfg.num_prompts * 2))),
    }
    return with_samples(result, proxy, prompts, responses, gold, kls, messages)


def evaluate_prompts(cfg: EvalConfig, policy, reference, proxy, tokenizer) -> dict:
    """An embedded task: one response to each of num_prompts prompts of the split."""
    task = get_task(cfg.task)
    prompts = task.prompts(cfg.split, n=cfg.num_prompts)
    shown = [task.few_shot(p) for p in prompts] if cfg.few_shot else prompts
    T = cfg.max_new_tokens or task.max_new_tokens
    # few-shot documents are long: give them the model's whole context but the response budget
    P = (min(max(len(tokenizer(s)["input_ids"]) for s in shown), policy.config.max_position_embeddings - T)
         if cfg.few_shot else None)  # None: the task's, grown to fit a chat template's rendering
    B = min(cfg.batch_size, len(prompts))
    envs = TextGenVectorEnv(
        num_envs=B, task=None if cfg.few_shot else cfg.task, prompts=shown, tokenizer=tokenizer,
        reward_fn=lambda p, c: [0.0] * len(c), max_prompt_tokens=P, max_new_tokens=T,
        prompt_format="text" if cfg.few_shot else cfg.prompt_format,
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
            kls += kl_to_reference(policy, reference, batch, envs.setup.vocab_size, cfg.temperature)[:keep]
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
        "perplexity": perplexity(policy, tokenizer, task.demonstrations(cfg.split, n=min(256, cfg.num_prompts * 2)),
                                 prompt_format=cfg.prompt_format),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
    }
    seen = prompts if cfg.few_shot else envs.setup.prompts  # a proxy reads the prompt as PPO's env shows it
    return with_samples(result, proxy, seen, responses, gold, kls)


def with_samples(result: dict, proxy, prompts: list[str], responses: list[str], gold: list[float], kls: list[float],
                 messages: list[list[dict]] | None = None) -> dict:
    """`result` with the proxy's mean score, the mean KL (if measured) and the samples table (each sample with its
    conversation, for a multi-turn task)."""
    proxy_scores = call_reward(proxy, prompts, responses) if proxy else None
    if proxy_scores is not None:
        result["proxy_mean"] = float(np.mean(proxy_scores))
    if kls:
        result["kl_to_reference"] = float(np.mean(kls))
    result["samples"] = [
        {"prompt": p, "response": r, **({"messages": messages[i]} if messages else {}), "gold": g,
         **({"proxy": proxy_scores[i]} if proxy_scores else {})}
        for i, (p, r, g) in enumerate(zip(prompts, responses, gold))
    ]
    return result
