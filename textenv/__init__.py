"""textenv: the ChatGPT/InstructGPT recipe as Gymnasium text environments.

Importing this package registers the environment ids:

- ``textenv/TextGen-v1``: the generic env; bring your own prompts, tokenizer and reward. An instruct checkpoint's
  tokenizer (a chat template of its own) gets str prompts through that template (``prompt_format="auto"``).
- ``textenv/TextGen-v0``: the same with str prompts always as they are (``prompt_format="text"``), as before v1.
- ``textenv/PositiveReview-v0``, ``textenv/Arithmetic-v0``, ``textenv/CommonGen-v0``: the embedded tasks
  (offline, no downloads); see `textenv.tasks`.

Each id has ``TextGenVectorEnv`` as its ``vector_entry_point``, so ``gym.make_vec(id, num_envs=N)`` is natively
batched.

Multi-turn ids (`textenv.multiturn.MultiTurnEnv`, the env answers each agent turn; `gym.make_vec` steps them in a
`SyncVectorEnv`):

- ``textenv/GuessNumber-v0``: guess a number from 1 to 16; the env answers "higher" or "lower".
- ``textenv/Calculator-v0``: arithmetic (one-digit operands, two operations) with a calculator tool the agent calls
  as ``<calc> 7*2+3</calc>``; its expert uses the tool in half of its demonstrations.
- ``textenv/TextArena-v0``: a single-player TextArena game (``turn_kwargs={"game": ...}``; GuessTheNumber-v0);
  needs ``pip install 'textenv[textarena]'``.
- ``textenv/ReasoningGym-v0``: a reasoning-gym dataset as a verifiable task (``turn_kwargs={"dataset": ...}``;
  basic_arithmetic); needs ``pip install 'textenv[reasoning-gym]'``.
"""

from gymnasium.envs.registration import register, registry

__all__ = ["MultiTurnEnv", "TextGenEnv", "TextGenVectorEnv"]
__version__ = "0.1.0"

# (id, kwargs); versioned ids, entry points as "module:Class" strings.
ENV_IDS = {
    "textenv/TextGen-v1": {},
    "textenv/TextGen-v0": {"prompt_format": "text"},  # str prompts as they are, whatever the tokenizer, as before v1
    # the embedded tokenizer (these ids' default) has the embedded template, which "auto" leaves in plain text
    "textenv/PositiveReview-v0": {"task": "sentiment"},
    "textenv/Arithmetic-v0": {"task": "arithmetic"},
    "textenv/CommonGen-v0": {"task": "commongen"},
}

MULTITURN_IDS = {
    "textenv/GuessNumber-v0": {"turns": "textenv.turns:GuessNumber", "max_turns": 8, "max_turn_tokens": 16,
                               "max_tokens": 128},
    "textenv/Calculator-v0": {"turns": "textenv.turns:Calculator",
                              "turn_kwargs": {"max_operand": 9, "demo_tool_rate": 0.5},
                              "max_turns": 4, "max_turn_tokens": 24, "max_tokens": 128},
    # optional extras (textenv.extras): making one without its package installed names the pip command
    "textenv/TextArena-v0": {"turns": "textenv.extras:TextArenaGame", "turn_kwargs": {"game": "GuessTheNumber-v0"},
                             "max_turns": 10, "max_turn_tokens": 16, "max_tokens": 512},
    "textenv/ReasoningGym-v0": {"turns": "textenv.extras:ReasoningGymTask",
                                "turn_kwargs": {"dataset": "basic_arithmetic", "size": 10_000, "seed": 0},
                                "max_turns": 1, "max_turn_tokens": 32, "max_tokens": 128},
}

for _env_id, _kwargs in MULTITURN_IDS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point="textenv.multiturn:MultiTurnEnv", kwargs=_kwargs, disable_env_checker=False)

for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:  # importlib.reload must not warn about re-registration
        register(
            id=_env_id,
            entry_point="textenv.env:TextGenEnv",
            vector_entry_point="textenv.vector_env:TextGenVectorEnv",
            kwargs=_kwargs,
            disable_env_checker=False,
        )


def __getattr__(name: str):
    # PEP 562: the env classes load on first use, so importing the model floor (`textenv.models`, which `rewards/`
    # stands on) does not import the envs, which stand on `rewards/`
    if name == "TextGenEnv":
        from textenv.env import TextGenEnv

        return TextGenEnv
    if name == "MultiTurnEnv":
        from textenv.multiturn import MultiTurnEnv

        return MultiTurnEnv
    if name == "TextGenVectorEnv":
        from textenv.vector_env import TextGenVectorEnv

        return TextGenVectorEnv
    raise AttributeError(f"module 'textenv' has no attribute {name!r}")
