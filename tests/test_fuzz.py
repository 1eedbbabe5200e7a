"""A seeded fuzz of an outside user's mistakes (#21): over 1,000 generated bad inputs to the env constructors
(single-turn, vector, multi-turn), to reset/step and to the data readers. Each must end in a documented error
(ValueError or TypeError, RewardError and TurnError included, or gymnasium's ResetNeeded) raised by textenv's own
code, whose message names the bad value or its argument; never a traceback from inside a dependency, never a hang,
never a written file. The one error left to a dependency is Gymnasium's own for a bad `reset(seed=...)`
(`gymnasium.error.Error`, raised by `Env.reset` for every Gymnasium env, naming the seed)."""

from __future__ import annotations

import itertools
import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
from gymnasium.error import Error as GymError
from gymnasium.error import ResetNeeded

from tests.conftest import PROMPTS, length_reward
from textenv.env import TextGenEnv
from textenv.multiturn import MultiTurnEnv
from textenv.records import load_pairs, load_text_source
from textenv.vector_env import TextGenVectorEnv

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(str(ROOT / p) for p in ("textenv", "rewards", "agents"))
DOCUMENTED = (ValueError, TypeError, ResetNeeded)
NUMBERS = [0, -1, -(10**9), 10**12, 2.5, "8", True, math.nan, math.inf, [], {}, b"8", 1j]


class Echo:
    def start(self, rng):
        return [{"role": "user", "content": "hi"}]

    def respond(self, messages):
        return {"message": {"role": "user", "content": "again"}}


def bad_files(tmp: Path) -> list[str]:
    """Files and folders a user may point a reader at by mistake."""
    (tmp / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (tmp / "garbage.parquet").write_bytes(b"not parquet")
    (tmp / "garbage.jsonl").write_text("{not json\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "list.jsonl").write_text("[1, 2]\n")
    (tmp / "nocolumn.jsonl").write_text('{"other": "x"}\n')
    (tmp / "number.jsonl").write_text('{"prompt": 5, "response": 6, "text": 7}\n')
    (tmp / "data.json").write_text("{}")
    (tmp / "folder").mkdir()
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "data.arrow").write_bytes(b"x")
    names = ["latin.txt", "latin.jsonl", "garbage.parquet", "garbage.jsonl", "empty.jsonl", "empty.txt", "list.jsonl",
             "nocolumn.jsonl", "number.jsonl", "data.json", "folder", "notamodel", "missing.jsonl", "missing.csv"]
    return [str(tmp / n) for n in names]


def bad_values(tmp: Path) -> dict[str, list]:
    files = bad_files(tmp)
    return {
        "max_new_tokens": NUMBERS,
        "max_prompt_tokens": NUMBERS,
        "vocab_size": [*NUMBERS, 10],  # 10: fewer than the tokenizer's tokens
        "truncation_side": ["middle", 3, "", []],
        "prompts": ["", "   ", "The movie was", 123, [], [1, 2], [""], [None], {"a": 1}, b"bytes", *files],
        "reward_fn": [123, "nope.module:fn", "tests.conftest.length_reward", "tests.conftest:no_such", [], 2.5,
                      str(tmp / "notamodel"), str(tmp / "folder"), str(tmp / "missing_rm"), {"tests.conftest:x": "1"}],
        "tokenizer": [123, str(tmp / "missing_tok"), str(tmp / "folder"), [], 2.5],
        "prompt_column": [123, [], None],
        "render_mode": ["human", 3],
    }


def multiturn_bad_values() -> dict[str, list]:
    return {"max_turns": NUMBERS, "max_turn_tokens": NUMBERS, "max_tokens": NUMBERS, "vocab_size": NUMBERS,
            "turns": [123, "nope.module:X", "tests.test_fuzz:Nope", object(), 2.5, None],
            "render_mode": ["human", 3], "end_of_turn": ["x", [], 2.5]}


def names(value, arg: str) -> list[str]:
    """What a message may say to name `value` (or, for unprintable values, its argument)."""
    out = [arg, repr(value), str(value)]
    if isinstance(value, str) and value.strip():
        out.append(Path(value).name)
    if isinstance(value, dict):  # a dict of rewards: naming the bad key names it
        out += [str(k) for k in value]
    return out


def check(fn, named: list[list[str]]) -> None:
    """fn() must raise a documented error from our code whose message names one of the bad inputs."""
    def hang(*_):
        raise TimeoutError("hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (every exception is judged below)
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename
        seeding = isinstance(exc, GymError) and where.endswith("gymnasium/utils/seeding.py")
        if not (isinstance(exc, DOCUMENTED) or seeding):
            raise AssertionError(f"undocumented {type(exc).__name__} from {where}: {exc}") from None
        if not (where.startswith(OURS) or seeding):
            raise AssertionError(f"{type(exc).__name__} raised inside a dependency ({where}): {exc}") from None
        message = str(exc).lower()
        assert any(n and n.lower() in message for group in named for n in group), \
            f"message names no bad input: {exc}"
    else:
        raise AssertionError("accepted")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tree(folder: Path) -> set:
    return {(str(p), p.stat().st_size) for p in folder.rglob("*")}


def test_a_thousand_generated_bad_inputs_end_in_errors_that_name_them(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    valid = dict(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=length_reward, max_new_tokens=4,
                 max_prompt_tokens=16)
    bad = bad_values(tmp_path)
    before = tree(tmp_path)
    rng = random.Random(0)
    cases = [((k, v),) for k, vs in bad.items() for v in vs]  # every bad value alone
    pairs = [((a, va), (b, vb)) for a, b in itertools.combinations(bad, 2) for va in bad[a] for vb in bad[b]]
    cases += rng.sample(pairs, 600)  # two at once: the error must name one of them
    failures = []
    for case in cases:
        kwargs = {**valid, **dict(case)}
        named = [names(v, k) for k, v in case]
        cls = TextGenVectorEnv if rng.random() < 0.3 else TextGenEnv
        extra = {"num_envs": 2} if cls is TextGenVectorEnv else {}
        try:
            check(lambda cls=cls, kwargs=kwargs, extra=extra: cls(**kwargs, **extra), named)
        except AssertionError as exc:
            failures.append(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in case)}): {exc}")
    n = len(cases)

    # reset and step with bad arguments, on envs that work
    env, venv = TextGenEnv(**valid), TextGenVectorEnv(num_envs=2, **valid)
    V = env.action_space.n
    actions = [-1, V, V + 10**6, 2.5, "a", None, [1, 2], np.array([1, 2]), math.nan, np.float32(1.5), True]
    fresh = TextGenEnv(**valid)
    for a in actions:
        cases_step = [(lambda a=a: fresh.step(a), [names(a, "action"), ["reset"]])]
        env.reset(seed=0)
        cases_step.append((lambda a=a: env.step(a), [names(a, "action")]))
        venv.reset(seed=0)
        cases_step.append((lambda a=a: venv.step(np.array([a, a], dtype=object)), [names(a, "action")]))
        for fn, named in cases_step:
            n += 1
            try:
                check(fn, named)
            except AssertionError as exc:
                failures.append(f"step({a!r}): {exc}")
    for options in [{"prompt_index": -1}, {"prompt_index": 10**9}, {"prompt_index": 2.5}, {"prompt_index": "0"},
                    {"bogus": 1}, {"prompt_index": [0, 1, 2]}, "opts", 5]:
        for target in (env, venv):
            n += 1
            try:
                check(lambda o=options, t=target: t.reset(seed=0, options=o), [names(options, "options"),
                                                                              *[names(v, k) for k, v in (
                                                                                  options.items()
                                                                                  if isinstance(options, dict)
                                                                                  else [])]])
            except AssertionError as exc:
                failures.append(f"{type(target).__name__}.reset(options={options!r}): {exc}")
    for seed in (-1, "x", 2.5, [1]):
        n += 1
        try:
            check(lambda s=seed: env.reset(seed=s), [names(seed, "seed")])
        except AssertionError as exc:
            failures.append(f"reset(seed={seed!r}): {exc}")

    # the multi-turn env's constructor, alone and in pairs
    mbad = multiturn_bad_values()
    mcases = [((k, v),) for k, vs in mbad.items() for v in vs]
    mpairs = [((a, va), (b, vb)) for a, b in itertools.combinations(mbad, 2) for va in mbad[a] for vb in mbad[b]]
    mcases += rng.sample(mpairs, 250)
    for case in mcases:
        kwargs = {"turns": Echo, "tokenizer": None, **dict(case)}
        n += 1
        try:
            check(lambda kw=kwargs: MultiTurnEnv(**kw), [names(v, k) for k, v in case])
        except AssertionError as exc:
            failures.append(f"MultiTurnEnv({', '.join(f'{k}={v!r}' for k, v in case)}): {exc}")

    # the data readers
    for source in [*bad_files_again(tmp_path), 123, "", "   "]:
        for fn in (lambda s=source: load_pairs(s), lambda s=source: load_text_source(s)):
            n += 1
            try:
                check(fn, [names(source, "source")])
            except AssertionError as exc:
                failures.append(f"reader({source!r}): {exc}")
    assert tree(tmp_path) == before, "a bad input wrote a file"
    assert n >= 1000, n
    assert not failures, f"{len(failures)} of {n} bad inputs:\n" + "\n".join(failures[:300])


def bad_files_again(tmp: Path) -> list[str]:
    """The readers' share of `bad_files` (already written): every file but the model-ish folders."""
    return [str(p) for p in sorted(tmp.iterdir()) if p.name not in ("notamodel",)] + [str(tmp / "missing.jsonl")]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_limits_name_themselves(tokenizer, value):
    with pytest.raises(ValueError, match="max_new_tokens"):
        TextGenEnv(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=length_reward, max_new_tokens=value)
