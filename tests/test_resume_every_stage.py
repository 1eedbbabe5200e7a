"""SIGKILL in mid-run, then a rerun with the same command, for every stage with a checkpoint (#21): the resumed run
ends with the uninterrupted run's weights, bit for bit, and the same metrics.jsonl and samples.jsonl rows (timings
aside), nothing lost or duplicated. PPO's own test is in test_ppo.py (single-turn) and test_multiturn_recipe.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_after_checkpoint

TIMING = ("time/", "charts/tokens_per_s", "charts/rollout_tokens_per_s", "charts/elapsed")


def stage_args(stage: str, run, tmp_path) -> list[str]:
    """A tiny run of `stage`, on the session's tiny pipeline run (its tokenizer, pretrained and SFT models and
    comparisons). Pretraining and SFT read small files: generating the embedded corpus and training a tokenizer on
    it, or validating on the task's whole valid split, would cost each of the three runs seconds that test nothing
    about resuming."""
    sft, rl_common = str(run / "sft" / "model"), ["--reward", "tests.conftest:length_reward", "--num-prompts", "2",
                                                   "--num-generations", "2", "--num-minibatches", "2",
                                                   "--iterations", "5", "--save-every", "1", "--sample-every", "1",
                                                   "--max-new-tokens", "6", "--device", "cpu"]
    return {
        "pretrain": ["--preset", "tiny", "--data", str(small_corpus(tmp_path)), "--tokenizer",
                     str(run / "pretrain" / "model"), "--max-steps", "12", "--save-every", "1", "--eval-every", "4",
                     "--warmup-steps", "1", "--batch-size", "4", "--seq-len", "32"],
        "sft": ["--model", str(run / "pretrain" / "model"), "--data", str(small_demonstrations(tmp_path)),
                "--max-steps", "12", "--save-every", "1", "--eval-every",
                "4", "--warmup-steps", "1", "--batch-size", "4"],
        "reward_model": ["--data", str(run / "comparisons"), "--model", sft, "--batch-size", "2", "--save-every", "1",
                         "--eval-every", "4", "--n-eval-samples", "8", "--n-reference", "32"],
        "dpo": ["--policy", sft, "--comparisons", str(run / "comparisons"), "--max-steps", "12", "--save-every", "1",
                "--batch-size", "4", "--warmup-steps", "1"],
        "grpo": ["--policy", sft, *rl_common],
        "rloo": ["--policy", sft, *rl_common],
    }[stage]


def run_here(stage: str, argv: list[str]) -> None:
    """The stage's `python -m agents.<stage>` entry point, run in this process."""
    import importlib

    from agents.run import cli

    module = importlib.import_module(f"agents.{stage}")
    config, fn = {"pretrain": ("PretrainConfig", "pretrain"), "sft": ("SFTConfig", "sft"),
                  "reward_model": ("RMConfig", "train_reward_model"), "dpo": ("DPOConfig", "dpo"),
                  "grpo": ("GRPOConfig", "grpo"), "rloo": ("RLOOConfig", "rloo"), "ppo": ("PPOConfig", "ppo")}[stage]
    getattr(module, fn)(cli(getattr(module, config), argv))


def small_corpus(tmp_path):
    from textenv.data.corpus import generate_corpus

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(generate_corpus(n_docs=300, seed=0)))
    return path


def small_demonstrations(tmp_path):
    from textenv.tasks import get_task

    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in get_task("sentiment").demonstrations("train", n=80)))
    return path


def rows(path) -> list[dict]:
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
            for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stage,lora", [("pretrain", False), ("sft", False), ("reward_model", False), ("dpo", False),
                                        ("grpo", False), ("rloo", False), ("sft", True), ("grpo", True)])
def test_sigkill_then_rerun_equals_the_uninterrupted_run(tiny_run, tmp_path, stage, lora):
    """With LoRA (rank 4) too, in a supervised and an RL trainer (DPO's LoRA checkpoint is SFT's code): the
    checkpoint holds the adapter and its optimizer state, model/ the adapter."""
    args = stage_args(stage, tiny_run, tmp_path) + (["--lora.rank", "4"] if lora else [])
    command = [sys.executable, "-m", f"agents.{stage}", *args]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the killed run is a process of its own; the uninterrupted run and the rerun are this one's, as in
    # test_ppo.py: the same entry point, the same files on disk, without two more imports of transformers
    run_here(stage, [*args, "--out-dir", str(straight)])
    kill_after_checkpoint([*command, "--out-dir", str(killed)], killed)
    if lora:  # the checkpoint holds what trains, not the base
        saved = [load_file(f) for f in (killed / "checkpoint").rglob("model.safetensors")]
        assert saved and all(k and all("lora_" in name for name in k) for k in saved)
    run_here(stage, [*args, "--out-dir", str(killed)])
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(straight / "model" / weights), load_file(killed / "model" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert rows(killed / name) == rows(straight / name), name


def test_collect_killed_in_mid_sampling_then_rerun_writes_the_same_comparisons(tiny_run, tmp_path):
    """Collection keeps no checkpoint: a killed run has written nothing but its config (the comparisons are written
    atomically at the end), and the rerun starts over to the uninterrupted run's rows, byte for byte. The killed run
    is a process of its own; the rerun and the uninterrupted run are this one's (the same code, no second import)."""
    from agents.comparisons import CollectConfig, collect_comparisons

    args = dict(policy=str(tiny_run / "sft" / "model"), num_prompts=64, k=4, prompts_per_batch=4)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    proc = subprocess.Popen([sys.executable, "-m", "agents.comparisons", *flags, "--out-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, deadline = b"", time.time() + 120
    while time.time() < deadline and b"sampling:" not in seen and proc.poll() is None:  # its progress bar is up
        seen += os.read(proc.stderr.fileno(), 1 << 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "config.json").exists(), "the run was killed before it started"
    assert not (killed / "summary.json").exists() and not (killed / "comparisons.jsonl").exists()
    collect_comparisons(CollectConfig(**args, out_dir=str(killed)))
    collect_comparisons(CollectConfig(**args, out_dir=str(straight)))
    assert (killed / "comparisons.jsonl").read_bytes() == (straight / "comparisons.jsonl").read_bytes()


def test_a_missing_comparisons_folder_is_named_not_sent_to_the_hub(tmp_path):
    from agents.preferences import load_preferences

    with pytest.raises(ValueError, match="no such file or folder"):
        load_preferences(str(tmp_path / "run" / "collect"))
