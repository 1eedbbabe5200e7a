"""Shared fixtures: a small tokenizer and prompt set built in milliseconds, so env tests need no corpus."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from textenv.models import build_model
from textenv.tokenizer import train_tokenizer

WORDS = {
    "subject": ["film", "movie", "book", "song", "show", "play"],
    "verdict": ["good", "bad", "great", "awful", "fine", "dull"],
    "extra": ["fun", "slow", "long", "short", "warm", "cold"],
}
TEXTS = [f"the {s} was {v} and {e}." for s, v, e in itertools.product(*WORDS.values())]
PROMPTS = [f"the {s} was" for s in WORDS["subject"]] + ["I think that the show", "a"]


def length_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """A deterministic toy reward: the completion's length in characters."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="session", autouse=True)
def sb3_logs_in_a_temporary_folder(tmp_path_factory):
    """Tests that call SB3's learn() themselves: its logger folder (by default a new tempdir/SB3-<time> per call,
    never removed) goes under pytest's own temporary folder."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3")))
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TEXTS * 10, vocab_size=600)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return build_model("tiny", tokenizer, seed=0).eval()


@pytest.fixture(scope="session")
def policy_folder(tmp_path_factory):
    """A tiny policy (an 'SFT' model) saved as a transformers folder with the embedded tokenizer and so its chat
    template. Tests train from it into their own folders; none may change it."""
    from textenv.embedded import default_tokenizer

    folder = tmp_path_factory.mktemp("policy")
    tok = default_tokenizer()
    build_model("tiny", tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def env_kwargs(tokenizer):
    return dict(prompts=PROMPTS, tokenizer=tokenizer, reward_fn=length_reward, max_new_tokens=6, max_prompt_tokens=16)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`textenv pipeline --preset tiny`, once per session: finished pretrain/sft/comparisons/rm/ppo folders. Tests
    read it and may rerun its stages; none may change it."""
    from agents.cli import main

    out = tmp_path_factory.mktemp("pipeline") / "run"
    main(["pipeline", "--preset", "tiny", "--out-dir", str(out)])
    return out


def kill_after_checkpoint(command: list[str], out_dir, at: int = 2) -> None:
    """Run `command` (a stage writing to `out_dir`) and SIGKILL it once its checkpoint records `at` steps or
    iterations: what a crash leaves. Fails if the run ended first."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out_dir / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            saved = json.loads(state.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or in mid-write
            saved = {}
        if saved.get("step", saved.get("iteration", 0)) >= at:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out_dir / "summary.json").exists(), "the run finished before it could be killed"


def step_beside(envs, singles: list, actions) -> None:
    """Step a vector env and its N single envs with the same actions, (steps, N): each live single env's step equals
    its row of the vector env's (observation, reward, terminated, truncated). A single env whose episode ended is
    not stepped again (the vector env autoresets that row on its next step)."""
    for step in actions:
        obs, rewards, term, trunc, _ = envs.step(np.asarray(step))
        for i, env in enumerate(singles):
            if env._done:
                continue
            o, r, te, tr, _ = env.step(int(step[i]))
            assert np.array_equal(o["input_ids"], obs["input_ids"][i])
            assert (r, te, tr) == (rewards[i], term[i], trunc[i])
