"""The `textenv` command: one subcommand per stage, the whole pipeline, sampling and evaluation.

Every subcommand's flags and --help text are generated (by tyro) from its dataclass config and the docstring
under each field.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Union


@dataclass
class SampleConfig:
    run: str = "runs/default"
    """A pipeline run folder: its pretrained (few-shot), SFT and PPO policies answer side by side."""
    prompts: tuple[str, ...] = ()
    """Prompts to answer; none: read prompts interactively from stdin (an empty line quits)."""
    temperature: float = 0.7
    """Sampling temperature."""
    max_new_tokens: int | None = None
    """Response budget; default: the run's task's."""
    seed: int = 0
    """Sampling seed."""


def sample(cfg: SampleConfig) -> None:
    import json
    from pathlib import Path

    import torch

    from agents.run import stage_model
    from agents.sampler import rollout
    from textenv.models import load_causal_lm
    from textenv.tasks import get_task
    from textenv.tokenizer import load_tokenizer
    from textenv.vector_env import TextGenVectorEnv

    run = Path(cfg.run)
    pinned = run / "config.json"
    if not pinned.exists():
        raise ValueError(f"{cfg.run!r} is not a pipeline run folder (no config.json)")
    task = get_task(json.loads(pinned.read_text())["task"])
    stages = {"pretrained (few-shot)": stage_model(run, "pretrain"), "SFT": stage_model(run, "sft"),
              "PPO": stage_model(run, "ppo")}
    models = {name: load_causal_lm(path).eval() for name, path in stages.items() if path.exists()}
    if not models:
        raise ValueError(f"{cfg.run!r} holds no trained policy yet")
    tokenizer = load_tokenizer(next(p for p in stages.values() if p.exists()))
    T = cfg.max_new_tokens or task.max_new_tokens

    def answer(prompt: str) -> None:
        print(f"\n>>> {prompt}")
        for name, model in models.items():
            shown = task.few_shot(prompt) if name.startswith("pretrained") else prompt
            envs = TextGenVectorEnv(num_envs=1, prompts=[shown], tokenizer=tokenizer, reward_fn=task.gold,
                                    max_prompt_tokens=min(len(tokenizer(shown)["input_ids"]),
                                                          model.config.max_position_embeddings - T),
                                    max_new_tokens=T)
            r = rollout(model, envs, torch.Generator().manual_seed(cfg.seed), temperature=cfg.temperature)
            response = r.responses[0].split("\n")[0] if name.startswith("pretrained") else r.responses[0]
            print(f"  [{name:>21}] gold {task.gold([prompt], [response])[0]:+.2f} | {response}")

    for prompt in cfg.prompts:
        answer(prompt)
    if not cfg.prompts:
        print("Type a prompt and press enter (empty line to quit).")
        for line in sys.stdin:
            if not line.strip():
                break
            answer(line.rstrip("\n"))


def main(argv: list[str] | None = None) -> None:
    """The `textenv` command. A user's mistake (a ValueError, TypeError or OSError: a bad value, a changed config,
    a missing file) prints its message and exits with status 2; `--traceback` (or TEXTENV_TRACEBACK=1) shows the
    whole traceback instead."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in argv or os.environ.get("TEXTENV_TRACEBACK") == "1"
    argv = [arg for arg in argv if arg != "--traceback"]
    try:
        run_command(argv)
    except (ValueError, TypeError, OSError) as exc:
        if traceback:
            raise
        print(f"textenv: error: {exc}\n(--traceback shows where it was raised)", file=sys.stderr)
        raise SystemExit(2) from None


def run_command(argv: list[str]) -> None:
    """Parse `argv` into a subcommand's config and run it; errors propagate (`main` is the command's face)."""
    import tyro

    from agents.comparisons import CollectConfig, collect_comparisons
    from agents.dpo import DPOConfig, dpo
    from agents.evaluate import EvalConfig, evaluate
    from agents.grpo import GRPOConfig, grpo
    from agents.labeling import LabelConfig, label
    from agents.pipeline import PipelineConfig, run_pipeline
    from agents.ppo import PPOConfig, ppo
    from agents.pretrain import PretrainConfig, pretrain
    from agents.reward_model import RMConfig, train_reward_model
    from agents.rloo import RLOOConfig, rloo
    from agents.run import cli
    from agents.sb3_lm import SB3PPOConfig, sb3_ppo
    from agents.sft import SFTConfig, sft
    from textenv.models import keep_freed_memory

    def show_eval(cfg: EvalConfig) -> None:
        result = evaluate(cfg)
        for key, value in result.items():
            if key != "samples":
                print(f"{key:>16}: {value}")

    commands = {
        "pipeline": (PipelineConfig, run_pipeline, "Run all four stages on an embedded task and write report.md."),
        "pretrain": (PretrainConfig, pretrain, "Stage 1: pretrain a causal LM (next-token prediction)."),
        "sft": (SFTConfig, sft, "Stage 2: supervised fine-tuning on prompt/response demonstrations."),
        "collect": (CollectConfig, collect_comparisons,
                    "Stage 3a: sample K responses per prompt; the simulated annotator ranks them."),
        "label": (LabelConfig, label, "Stage 3a by people: a local page where labelers rank K responses per prompt."),
        "rm": (RMConfig, train_reward_model, "Stage 3b: train a reward model on ranked comparisons."),
        "ppo": (PPOConfig, ppo, "Stage 4: token-level PPO with a KL penalty to the SFT policy."),
        "rloo": (RLOOConfig, rloo,
                 "RLOO / REINFORCE: k responses per prompt, leave-one-out baseline, KL in the reward."),
        "grpo": (GRPOConfig, grpo,
                 "GRPO: group-normalised advantages, PPO clipping, k3 KL in the loss, no value model."),
        "sb3-ppo": (SB3PPOConfig, sb3_ppo, "Interop: Stable-Baselines3's own PPO fine-tunes the LM policy in the env."),
        "dpo": (DPOConfig, dpo, "DPO: train the SFT policy on the comparisons directly (no reward model, no PPO)."),
        "eval": (EvalConfig, show_eval, "Gold/proxy score, KL to a reference, perplexity and diversity of a policy."),
        "sample": (SampleConfig, sample, "Answer prompts with a run's policies side by side (or interactively)."),
    }
    subcommands = Union[  # noqa: UP007  (tyro reads a typing.Union of annotated subcommands)
        tuple(Annotated[cls, tyro.conf.subcommand(name=name, description=text)]
              for name, (cls, _, text) in commands.items())
    ]
    config = cli(
        subcommands,
        argv,
        prog="textenv",
        description="textenv: the InstructGPT recipe (pretrain, SFT, reward model, PPO) as Gymnasium text "
                    "environments.",
    )
    for cls, run, _ in commands.values():
        if type(config) is cls:
            keep_freed_memory()  # a process-wide malloc setting, so the command's to make (textenv/models/runtime.py)
            run(config)
            return


if __name__ == "__main__":
    main()
