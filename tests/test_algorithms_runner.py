"""benchmarks/algorithms.py over tasks x budgets, end to end on the session's `tiny` main job (about 15 s on 2
cores): the two targets are the embedded task and a user's id registered on it, so one main job serves both."""

import csv
import json
import sys

import pytest

from benchmarks import algorithms

USER_ID = "tests.user_envs:TestLab/TerseReview-v0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """The session's tiny sentiment run (read only: every benchmark here writes to its own --out-dir)."""
    root = tmp_path_factory.mktemp("algorithms")
    (root / "sentiment").symlink_to(tiny_run, target_is_directory=True)
    return root


def run_benchmark(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["algorithms", *args])
    algorithms.main()


def test_tasks_by_budgets(runs, monkeypatch):
    out = runs / "bench"
    run_benchmark(monkeypatch, "--tasks", "sentiment", USER_ID, "--runs", str(runs / "sentiment"),
                  str(runs / "sentiment"), "--iterations", "1", "2", "--algos", "ppo", "bon", "--seeds", "0",
                  "--eval-prompts", "8", "--bon-max", "4", "--episodes-per-iteration", "8", "--out-dir", str(out))
    rows = list(csv.DictReader((out / "results.csv").open()))
    expected = ["ppo@1", "ppo@2", "bon-1", "bon-2", "bon-4"]
    tasks = ("sentiment", "TestLab/TerseReview-v0")
    assert [(r["task"], r["algo"]) for r in rows] == [(t, a) for t in tasks for a in expected]
    assert [r["iterations"] for r in rows[:2]] == ["1", "2"]
    for task, folder in zip(tasks, ("sentiment", "TestLab_TerseReview-v0")):  # a folder per target
        # each budget trained its own run, for as many iterations as it says
        for n in (1, 2):
            lines = (out / folder / f"ppo_it{n}_seed0" / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == n
        assert all((out / folder / name).exists()
                   for name in ("results.md", "gold_vs_kl.png", "curves.png", "summary.json"))
        assert f"## {task}" in (out / "results.md").read_text()


def test_a_run_folder_of_another_task_is_refused(runs, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="main job of task 'sentiment', not 'arithmetic'"):
        run_benchmark(monkeypatch, "--tasks", "arithmetic", "--runs", str(runs / "sentiment"), "--algos", "bon",
                      "--eval-prompts", "4", "--bon-max", "2", "--out-dir", str(tmp_path / "x"))
    with pytest.raises(SystemExit):  # argparse: 2 tasks, 1 folder
        run_benchmark(monkeypatch, "--tasks", "sentiment", "arithmetic", "--runs", str(runs / "sentiment"))


def test_a_user_registered_env_id(runs, monkeypatch):
    """The id's reward and response budget are what PPO trains on and what the proxy column reports."""
    out = runs / "user_env"
    run_benchmark(monkeypatch, "--tasks", USER_ID, "--runs", str(runs / "sentiment"),
                  "--iterations", "1", "--algos", "ppo", "bon", "--seeds", "0", "--eval-prompts", "8", "--bon-max", "2",
                  "--episodes-per-iteration", "8", "--out-dir", str(out))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["algo"] for r in rows] == ["ppo", "bon-1", "bon-2"]
    # the proxy is terse(): minus a tenth of the words of at most 6 tokens, never the learned RM's score
    assert all(-0.6 <= float(r["proxy"]) <= 0 for r in rows), rows
    config = json.loads((out / "ppo_seed0" / "config.json").read_text())
    assert (config["task"], config["reward"], config["max_new_tokens"]) == ("sentiment", "tests.user_envs:terse", 6)
    lengths = [json.loads(line)["charts/episode_length"]
               for line in (out / "ppo_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < max(lengths) <= 6
    assert json.loads((out / "summary.json").read_text())["task"] == "TestLab/TerseReview-v0"


@pytest.mark.parametrize("name, message", [
    ("CartPole-v1", "needs a TextGenEnv"),
    ("textenv/TextGen-v1", "has task=None; the runner needs an embedded task"),
    ("TestLab/NoSuchEnv-v0", "neither an embedded task"),
    ("tests.user_envs:TestLab/LongPrompts-v0", r"sets \['max_prompt_tokens'\]"),
    ("tests.user_envs:TestLab/CallableReward-v0", "reward_fn is a function; register it as a string"),
    ("tests.user_envs:TestLab/HalfToken-v0", "max_new_tokens must be a positive int, got 0.5"),
])
def test_what_the_runner_cannot_honour_is_refused(name, message):
    with pytest.raises(ValueError, match=message):
        algorithms.resolve_target(name)


def test_embedded_tasks_and_their_ids_resolve():
    assert algorithms.resolve_target("arithmetic") == algorithms.Target("arithmetic", "arithmetic",
                                                                        "textenv/Arithmetic-v0")
    target = algorithms.resolve_target("textenv/PositiveReview-v0")
    assert (target.task, target.reward, target.folder) == ("sentiment", None, "textenv_PositiveReview-v0")
