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


class SayYes:
    """A user's multi-turn turn logic: the env asks for "yes" twice; each turn that says it earns 1.0 (paid on that
    turn), and the episode ends after the second turn. With an expert, so that SFT has demonstrations."""

    def start(self, rng):
        self.n = int(rng.integers(1, 4))
        return [{"role": "user", "content": "say yes" + " please" * self.n}]

    def respond(self, messages):
        said = float("yes" in messages[-1]["content"])
        if sum(m["role"] == "assistant" for m in messages) == 2:
            return {"reward": said, "done": True}
        return {"message": {"role": "user", "content": "again" + " and again" * self.n}, "reward": said}

    def demonstration(self, rng):
        messages = self.start(rng)
        messages.append({"role": "assistant", "content": "yes"})
        messages.append(self.respond(messages)["message"])
        messages.append({"role": "assistant", "content": "yes"})
        return messages


MULTITURN_IDS = {"TestLab/SayYes-v0": {"turns": "tests.user_envs:SayYes", "max_turns": 2, "max_turn_tokens": 4,
                                       "max_tokens": 64}}
for env_id, kwargs in MULTITURN_IDS.items():
    if env_id not in registry:
        register(id=env_id, entry_point="textenv.multiturn:MultiTurnEnv", kwargs=kwargs)
