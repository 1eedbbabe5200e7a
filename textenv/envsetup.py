"""What TextGenEnv and TextGenVectorEnv share: resolving their arguments into tokens, spaces and a reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces
from transformers import PreTrainedTokenizerBase

from rewards.base import RewardFn, as_reward_fn
from textenv.prompts import fitted_budget, load_prompts, render_prompts, tokenize_prompts
from textenv.tokenizer import load_tokenizer


@dataclass
class EnvSetup:
    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]  # as the policy sees them: chat prompts rendered, truncated ones decoded from their kept tokens
    prompt_ids: np.ndarray  # (N, P) int64, left-padded
    prompt_mask: np.ndarray  # (N, P) int64
    reward_fn: RewardFn
    max_prompt_tokens: int
    max_new_tokens: int
    vocab_size: int
    eos_token_id: int  # the token that ends an episode: EOS, or with chat prompts the template's end-of-turn token
    pad_token_id: int
    observation_space: spaces.Dict
    action_space: spaces.Discrete

    def decode_response(self, response_ids: np.ndarray) -> str:
        """The completion text of a response: special tokens (EOS, PAD) dropped."""
        return self.tokenizer.decode(response_ids.tolist(), skip_special_tokens=True)


MAX_TOKENS = 1 << 16  # a budget past this is a mistake (every env holds (P + T) ids): refused, not allocated
MAX_VOCAB = 1 << 24  # an action space past 16.7M token ids is a mistake (the largest tokenizers have ~256k)


def positive_int(name: str, value: Any, limit: int | None = None, unit: str = "tokens") -> int:
    """`value` as an int in [1, limit]; ValueError naming `name` and the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name}={value} is over textenv's limit of {limit} {unit}")
    return int(value)


def check_options(options: Any, allowed: tuple[str, ...]) -> dict:
    """reset()'s `options` as a dict ({} for None); ValueError naming a key the env does not take."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict (or None), got {options!r}")
    unknown = sorted(set(options) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"options {unknown} are not reset() options of this env; it takes {list(allowed)}")
    return options


def make_setup(
    *,
    task: str | None,
    prompts: Any,
    tokenizer: Any,
    reward_fn: Any,
    max_new_tokens: int | None,
    max_prompt_tokens: int | None,
    truncation_side: str | None,
    vocab_size: int | None,
    prompt_column: str,
    prompt_format: str,
    reward_kwargs: dict | None,
    trust_remote_code: bool,
) -> EnvSetup:
    if not isinstance(prompt_column, str):
        raise TypeError(f"prompt_column must be a column name (a str), got {prompt_column!r}")
    budget_given = max_prompt_tokens is not None
    if task is not None:
        from textenv.embedded import default_tokenizer
        from textenv.tasks import get_task

        spec = get_task(task)
        prompts = spec if prompts is None else prompts
        tokenizer = default_tokenizer() if tokenizer is None else tokenizer
        reward_fn = spec.gold if reward_fn is None else reward_fn
        max_new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
        max_prompt_tokens = spec.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
    missing = [n for n, v in (("prompts", prompts), ("tokenizer", tokenizer), ("reward_fn", reward_fn)) if v is None]
    if missing:
        raise ValueError(f"no {', '.join(missing)} given: pass them, or task= one of the embedded tasks")
    max_new_tokens = positive_int("max_new_tokens", 48 if max_new_tokens is None else max_new_tokens, MAX_TOKENS)
    max_prompt_tokens = positive_int("max_prompt_tokens", 64 if max_prompt_tokens is None else max_prompt_tokens,
                                      MAX_TOKENS)

    tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    vocab_size = len(tokenizer) if vocab_size is None else positive_int("vocab_size", vocab_size, MAX_VOCAB, "ids")
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")

    sources = load_prompts(prompts, column=prompt_column)
    texts, end_of_turn = render_prompts(sources, tokenizer, prompt_format)
    if not budget_given:
        templated = end_of_turn is not None and all(isinstance(p, str) for p in sources)
        max_prompt_tokens = min(fitted_budget(texts, tokenizer, max_prompt_tokens, templated), MAX_TOKENS)
    prompt_ids, prompt_mask = tokenize_prompts(texts, tokenizer, max_prompt_tokens, truncation_side)
    lengths = prompt_mask.sum(1)
    for i in np.flatnonzero(lengths == max_prompt_tokens):  # possibly truncated: show the policy's view
        kept = tokenizer.decode(prompt_ids[i].tolist())
        if kept != texts[i]:
            texts[i] = kept

    width = max_prompt_tokens + max_new_tokens
    observation_space = spaces.Dict(
        {
            "input_ids": spaces.Box(0, vocab_size - 1, shape=(width,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(width,), dtype=np.int64),
        }
    )
    reward = as_reward_fn(reward_fn, **(reward_kwargs or {}))
    return EnvSetup(
        tokenizer=tokenizer,
        prompts=texts,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        reward_fn=reward,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        vocab_size=vocab_size,
        eos_token_id=int(tokenizer.eos_token_id if end_of_turn is None else end_of_turn),
        pad_token_id=int(tokenizer.pad_token_id),
        observation_space=observation_space,
        action_space=spaces.Discrete(vocab_size),
    )


def check_action(action: Any, n: int) -> int:
    """One token id from an action: a Python or NumPy integer (0-d arrays too) in [0, n)."""
    if isinstance(action, np.ndarray) and action.ndim == 0:
        action = action[()]
    if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
        raise TypeError(f"action must be an integer token id, got {action!r} ({type(action).__name__})")
    if not 0 <= action < n:
        raise ValueError(f"action {int(action)} is outside the action space Discrete({n})")
    return int(action)


def check_prompt_index(index: Any, n: int) -> int:
    """A prompt index chosen through reset options: an integer in [0, n)."""
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"prompt_index must be an int, got {index!r} ({type(index).__name__})")
    if not 0 <= index < n:
        raise ValueError(f"prompt_index {int(index)} is out of range for {n} prompts")
    return int(index)
