"""Training data for the trainers: the step -> batch map, pretraining blocks and SFT's (prompt, response) encoding.

Readers of users' files live in `textenv.records` (the envs read prompts with them too).
"""

from __future__ import annotations

import numpy as np
import torch

from agents.core import IGNORE
from textenv.models.tokens import pad_rows
from textenv.records import load_pairs, load_text_source  # noqa: F401  (the trainers' readers, re-exported)

DEFAULT_PROMPT_TOKENS = 64  # SFT's prompt budget unless told, as the env's default (textenv.envsetup)
VALID_EVERY_NTH_BLOCK = 100  # pretraining: 1% of the blocks, spread over the whole corpus


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The example indices of the batch at `step`: a pure function of (seed, step), so resuming needs only the step.

    Each epoch is a fresh seeded permutation of range(n), cut into n // batch_size batches (the remainder is dropped
    for that epoch; another permutation puts those examples elsewhere next epoch).
    """
    if n < batch_size:
        raise ValueError(f"only {n} training examples, fewer than batch_size={batch_size}")
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[i * batch_size : (i + 1) * batch_size]


def pack_blocks(tokenizer, docs: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize, join with EOS, cut into blocks of seq_len + 1; return (train, valid) int64 (N, seq_len + 1)."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int64)
    n_blocks = len(stream) // (seq_len + 1)
    if n_blocks < 2:
        raise ValueError(f"the data has {len(stream)} tokens, too few for two blocks of seq_len + 1 = {seq_len + 1}")
    blocks = torch.from_numpy(stream[: n_blocks * (seq_len + 1)].reshape(n_blocks, seq_len + 1))
    is_valid = torch.arange(n_blocks) % VALID_EVERY_NTH_BLOCK == 0
    return blocks[~is_valid], blocks[is_valid]


def encode_pair(tokenizer, prompt: str, response: str, max_prompt_tokens: int, max_response_tokens: int,
                end_token: int | None = None):
    """(input ids, labels) of one demonstration: labels are IGNORE on the prompt, the response ids and the token that
    ends the response after (`end_token`: the chat template's end-of-turn token for a rendered chat prompt, EOS
    otherwise). `prompt` is the text the env shows the policy, tokenized as the env does."""
    end_token = tokenizer.eos_token_id if end_token is None else end_token
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [end_token]
    response_ids = response_ids[:max_response_tokens]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def encode_pairs(tokenizer, pairs: list[dict], max_prompt_tokens: int | None, max_response_tokens: int,
                 prompt_format: str = "auto") -> list[tuple[list[int], list[int]]]:
    """`encode_pair` of each {"prompt", "response"} record, the prompts rendered as the env renders them
    (`textenv.prompts.render_prompts`: an instruct checkpoint's template wraps them, per `prompt_format`).
    `max_prompt_tokens` None: the env's default rule, 64 grown to fit the template's renderings
    (`textenv.prompts.fitted_budget`)."""
    from textenv.prompts import fitted_budget, render_prompts

    prompts = [d["prompt"] for d in pairs]
    texts, end_token = render_prompts(prompts, tokenizer, prompt_format)
    if max_prompt_tokens is None:
        templated = end_token is not None and all(isinstance(p, str) for p in prompts)
        max_prompt_tokens = fitted_budget(texts, tokenizer, DEFAULT_PROMPT_TOKENS, templated)
    return [encode_pair(tokenizer, text, d["response"], max_prompt_tokens, max_response_tokens, end_token)
            for text, d in zip(texts, pairs)]


def encode_conversation(chat, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation as a multi-turn env streams it (`ChatFormat.stream`): labels are the
    agent's (assistant) tokens, IGNORE on the opening and the env's replies."""
    ids, agent = chat.stream(messages)
    return ids, [t if a else IGNORE for t, a in zip(ids, agent)]


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels): input_ids / attention_mask / labels, each (B, L) with L the longest."""
    input_ids, attention_mask = pad_rows([ids for ids, _ in examples], pad_token_id)
    labels, _ = pad_rows([lab for _, lab in examples], IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
