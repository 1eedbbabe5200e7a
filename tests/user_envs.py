"""Env ids a user registers in their own module, for tests/test_algorithms_runner.py ('tests.user_envs:<id>')."""

from gymnasium.envs.registration import register, registry


def terse(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """A plain batched reward: minus a tenth of the completion's word count."""
    return [-len(c.split()) / 10 for c in completions]


IDS = {
    "TestLab/TerseReview-v0": {"task": "sentiment", "max_new_tokens": 6, "reward_fn": "tests.user_envs:terse"},
    "TestLab/LongPrompts-v0": {"task": "sentiment", "max_prompt_tokens": 8},  # a kwarg the runner cannot honour
    "TestLab/CallableReward-v0": {"task": "sentiment", "reward_fn": terse},  # not recordable in a run's config
    "TestLab/HalfToken-v0": {"task": "sentiment", "max_new_tokens": 0.5},
}
for env_id, kwargs in IDS.items():
    if env_id not in registry:
        register(id=env_id, entry_point="textenv.env:TextGenEnv",
                 vector_entry_point="textenv.vector_env:TextGenVectorEnv", kwargs=kwargs)
