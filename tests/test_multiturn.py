"""MultiTurnEnv: checkers, determinism, pickling, the exact token stream under three chat templates, every limit's
truncation, and turn logic that misbehaves."""

from __future__ import annotations

import copy
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import textenv  # noqa: F401  (registers the ids)
from tests.conftest import step_beside
from textenv.chat import ChatFormat
from textenv.multiturn import MultiTurnEnv, TurnError
from textenv.turns import Calculator, GuessNumber, _evaluate

IDS = ["textenv/GuessNumber-v0", "textenv/Calculator-v0"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def with_template(tokenizer, template: str, specials: list[str]):
    """A copy of the test tokenizer with a chat template and its special tokens (built offline)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


@pytest.fixture
def chatml(tokenizer):
    return with_template(tokenizer, CHATML, ["<|im_start|>", "<|im_end|>"])


@pytest.fixture
def llama3(tokenizer):
    return with_template(tokenizer, LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"])


def say(env: MultiTurnEnv, text: str):
    """The agent's turn: the tokens of `text`, then the end-of-turn token; returns the last step's result."""
    for token in [*env.chat.encode(text), env.chat.end_of_turn]:
        out = env.step(token)
        if out[2] or out[3]:
            break
    return out


@pytest.mark.parametrize("env_id", IDS)
def test_checkers_pass(env_id):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(env_id).unwrapped)
        sb3_check_env(gym.make(env_id).unwrapped)


@pytest.mark.parametrize("env_id", IDS)
def test_determinism_and_pickle(env_id):
    env = gym.make(env_id).unwrapped
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    env.reset(seed=3)
    say(env, "7")  # mid-episode: the clone continues the same conversation
    clone = pickle.loads(pickle.dumps(env))
    for e in (env, clone):
        obs, reward, terminated, truncated, info = say(e, "<calc>2*3</calc>" if "Calc" in env_id else "9")
        e.result = (obs["input_ids"].tolist(), reward, terminated, truncated, info["turn"])
    assert env.result == clone.result


def test_vector_env_equals_single_envs_with_turns_of_different_lengths():
    n, seeds = 3, [0, 1, 2]
    envs = gym.make_vec("textenv/GuessNumber-v0", num_envs=n, vectorization_mode="sync")
    singles = [gym.make("textenv/GuessNumber-v0").unwrapped for _ in range(n)]
    obs, _ = envs.reset(seed=seeds)
    for e, s in zip(singles, seeds):
        e.reset(seed=s)
    chat = singles[0].chat
    # each sub-env gets guesses of different token lengths, so their turns end on different steps
    plans = [[*chat.encode(text), chat.end_of_turn] * 6 for text in ("8", "12 maybe", "3")]
    step_beside(envs, singles, np.array([plan[: min(map(len, plans))] for plan in plans]).T)


@pytest.mark.parametrize("template", ["embedded", "chatml", "llama3"])
def test_stream_is_the_templates_rendering_and_the_agent_mask_is_exact(template, chatml, llama3):
    tok = {"embedded": None, "chatml": chatml, "llama3": llama3}[template]
    env = MultiTurnEnv(Calculator, tokenizer=tok, max_tokens=256, max_turn_tokens=64)
    demo = Calculator().demonstration(np.random.default_rng(5))
    env.reset(seed=5)  # the same draws as the demonstration's
    agent_tokens = []
    for message in demo:
        if message["role"] == "assistant":
            obs, reward, terminated, _, info = say(env, message["content"])
            agent_tokens += [*env.chat.encode(message["content"]), env.chat.end_of_turn]
    assert terminated and reward == 1.0 and info["messages"] == demo
    n = int(obs["attention_mask"].sum())
    stream = obs["input_ids"][:n].tolist()
    rendered = env.chat.encode(env.chat.render(demo, False))
    assert stream == rendered[:n], "the stream is the template's rendering of the final conversation"
    assert env.tokenizer.decode(rendered[n:]).strip() == "", "only the template's closing whitespace is left"
    assert obs["input_ids"][obs["agent_mask"] == 1].tolist() == agent_tokens  # exactly the agent's tokens
    assert (obs["agent_mask"][n:] == 0).all()


def test_a_template_that_rewrites_history_keeps_what_the_policy_saw(tokenizer):
    # renders every assistant turn but the last one as "(...)", as reasoning-stripping templates do
    forgetful = ("{% for m in messages %}{{ m['role'] }}:\n{% if m['role'] == 'assistant' and not loop.last %}(...)"
                 "{% else %}{{ m['content'] }}{% endif %}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:\n{% endif %}")
    tok = with_template(tokenizer, forgetful, [])
    env = MultiTurnEnv(GuessNumber, tokenizer=tok, max_tokens=256)
    env.reset(seed=0)
    first = [*env.chat.encode(" 8"), env.chat.end_of_turn]
    say(env, " 8")
    obs, *_ = say(env, " 4")
    kept = obs["input_ids"][obs["agent_mask"] == 1].tolist()
    assert kept[: len(first)] == first  # the first guess stays as sampled, though the template now hides it


def test_truncation_at_every_limit():
    class Never:  # a conversation that never ends on its own
        def start(self, rng):
            return [{"role": "user", "content": "talk"}]

        def respond(self, messages):
            return {"message": {"role": "user", "content": "more"}, "reward": 0.5}

    env = MultiTurnEnv(Never, max_turns=3)
    env.reset(seed=0)
    results = [say(env, "hi") for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True] and results[-1][4]["turn"] == 3  # max_turns
    assert [r[1] for r in results] == [0.5, 0.5, 0.5]  # the turn reward is paid on the turn's last step

    env = MultiTurnEnv(Never, max_turn_tokens=4)
    env.reset(seed=0)
    word = env.chat.encode("hi")[0]
    outs = [env.step(word) for _ in range(4)]  # max_turn_tokens without the end-of-turn token: the env closes it
    assert [o[4]["turn"] for o in outs] == [0, 0, 0, 1] and outs[-1][1] == 0.5 and not outs[-1][3]
    obs = outs[-1][0]
    closed = int(obs["attention_mask"].sum()) - 1 - len(env.chat.reply(env._messages[:-1], {"role": "user",
                                                                                            "content": "more"}))
    assert obs["input_ids"][closed] == env.chat.end_of_turn and obs["agent_mask"][closed] == 0
    assert obs["agent_mask"][closed - 4 : closed].tolist() == [1, 1, 1, 1]

    env = MultiTurnEnv(Never, max_tokens=24)
    obs, _ = env.reset(seed=0)
    room = 24 - int(obs["attention_mask"].sum())
    outs = [env.step(word) for _ in range(room)]
    assert outs[-1][3] and not any(o[3] for o in outs[:-1])  # the stream is full
    with pytest.raises(gym.error.ResetNeeded):
        env.step(word)

    env = MultiTurnEnv(Never)
    opening = int(env.reset(seed=0)[0]["attention_mask"].sum())
    turn = len(env.chat.encode("hi")) + 1
    reply = int(say(env, "hi")[0]["attention_mask"].sum()) - opening - turn
    env = MultiTurnEnv(Never, max_tokens=opening + turn + reply)  # the reply would leave no room for the agent
    obs, _ = env.reset(seed=0)
    before = int(obs["attention_mask"].sum())
    obs, reward, terminated, truncated, info = say(env, "hi")
    assert truncated and not terminated and info["messages"][-1]["role"] == "assistant"
    assert int(obs["attention_mask"].sum()) == before + len(env.chat.encode("hi")) + 1  # the reply was not appended


class Faulty:
    def __init__(self, reply):
        self.reply = reply

    def start(self, rng):
        return [{"role": "user", "content": "go"}]

    def respond(self, messages):
        if self.reply == "raise":
            raise KeyError("boom")
        return self.reply


@pytest.mark.parametrize("reply, match", [
    ("raise", r"Faulty.respond raised KeyError: 'boom'"),
    ("text", "must return a dict"),
    ({"message": "higher"}, "a message must be a dict"),
    ({"message": {"role": "user", "content": 3}}, "content must be a str"),
    ({"message": {"role": "robot", "content": "x"}}, "role 'robot' is not one of"),
    ({"message": {"role": "assistant", "content": "x"}}, "answers as user, tool or system"),
    ({"reward": float("nan"), "done": True}, "reward nan"),
    ({"reward": 1.0}, "no message and done=False"),
    ({"message": {"role": "user", "content": "a<|endoftext|>b"}}, "may not contain the end-of-turn token"),
])
def test_bad_turn_logic_names_itself_and_reset_recovers(reply, match):
    env = MultiTurnEnv(Faulty, turn_kwargs={"reply": reply})
    env.reset(seed=0)
    with pytest.raises(TurnError, match=match):
        say(env, "hi")
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)
    env.turns.reply = {"reward": 1.0, "done": True}
    env.reset(seed=0)
    assert say(env, "hi")[1:3] == (1.0, True)


def test_bad_arguments_name_the_fix(tokenizer):
    class StartOnly:
        def start(self, rng):
            return []

    with pytest.raises(TypeError, match="StartOnly has no respond"):
        MultiTurnEnv(StartOnly)
    with pytest.raises(ValueError, match="no chat template"):
        MultiTurnEnv(GuessNumber, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_turns must be a positive int"):
        MultiTurnEnv(GuessNumber, max_turns=0)
    with pytest.raises(ValueError, match="leaving no room for the agent"):
        MultiTurnEnv(GuessNumber, max_tokens=8).reset(seed=0)


@pytest.mark.parametrize("turns", [GuessNumber, Calculator])
def test_the_experts_solve_their_worlds_and_gold_agrees(turns):
    for seed in range(5):
        world = turns()
        demo = world.demonstration(np.random.default_rng(seed))
        assert world.gold(demo) == 1.0
        env = MultiTurnEnv(turns, max_tokens=256)
        env.reset(seed=seed)
        rewards = [say(env, m["content"])[1] for m in demo if m["role"] == "assistant"]
        assert rewards[-1] == 1.0 and env.turns.gold(demo) == 1.0
    assert Calculator().gold([{"role": "assistant", "content": "answer: 5"}]) == 0.0  # no question: no value


def test_calculator_evaluates_with_precedence():
    assert _evaluate("17*23+5") == 396 and _evaluate("2-3*4") == -10 and _evaluate("-2*-3") == 6


def test_end_of_turn_is_the_templates_special_token(chatml, llama3):
    assert ChatFormat(chatml).end_of_turn == chatml.convert_tokens_to_ids("<|im_end|>")
    assert ChatFormat(llama3).end_of_turn == llama3.convert_tokens_to_ids("<|eot_id|>")
    from textenv.embedded import default_tokenizer

    assert ChatFormat(default_tokenizer()).end_of_turn == default_tokenizer().eos_token_id
