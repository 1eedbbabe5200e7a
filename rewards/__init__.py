"""Pluggable rewards: one batched protocol, ``fn(prompts, completions, **kwargs) -> list[float]``.

See `rewards.base` for the protocol and adapters and `rewards.hf` for Hugging Face classifiers and our learned
reward models.
"""

from rewards.base import RewardError, RewardFn, WeightedSum, as_reward_fn, call_reward, import_string, reward_name

__all__ = ["RewardError", "RewardFn", "WeightedSum", "as_reward_fn", "call_reward", "import_string", "reward_name"]
