"""The main job: the four stages of the recipe end to end, then an evaluation and report.md.

    textenv pipeline                          # sentiment task, small preset, runs/default, CPU, offline
    textenv pipeline --preset tiny --out-dir runs/smoke
    textenv pipeline --ppo.iterations 100     # any stage's setting, by its config's field name

Stages write to <out_dir>/pretrain, sft, comparisons, rm, ppo; a stage whose folder holds summary.json is done and
skipped, and an interrupted stage resumes from its checkpoint. <out_dir>/pipeline.json pins the configuration: a
rerun with another one is refused unless --overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from agents.comparisons import CollectConfig, collect_comparisons
from agents.episodes import is_multi_turn
from agents.evaluate import EvalConfig, evaluate
from agents.ppo import PPOConfig, ppo
from agents.pretrain import PretrainConfig, pretrain
from agents.report import write_report
from agents.reward_model import RMConfig, train_reward_model
from agents.run import check_run_dir, is_complete, stage_dir, stage_model
from agents.sft import SFTConfig, sft
from textenv.models import PRESETS

# Per-preset budgets: "tiny" is the smoke test (well under a minute), "small" the default (minutes on 2 cores).
BUDGETS = {
    "tiny": dict(pretrain_steps=30, sft_steps=20, num_prompts=32, k=4, ppo_iterations=2, num_envs=16, eval_prompts=16),
    "small": dict(pretrain_steps=None, sft_steps=None, num_prompts=None, k=4, ppo_iterations=None, num_envs=None,
                  eval_prompts=128),
    "medium": dict(pretrain_steps=None, sft_steps=None, num_prompts=None, k=4, ppo_iterations=None, num_envs=None,
                   eval_prompts=128),
}

# On a multi-turn task (small and medium presets), where the user left the stage's default.
MULTI_TURN = dict(sft_lr=1e-3, sft_epochs=3.0, num_prompts=1024, ppo_lr=3e-5)


@dataclass
class PipelineConfig:
    out_dir: str = "runs/default"
    """Run folder; each stage gets a subfolder."""
    task: str = "sentiment"
    """Embedded task (one of textenv.tasks.TASKS), or a multi-turn env id whose turn logic writes demonstrations
    (textenv/Calculator-v0: tool use; textenv/GuessNumber-v0; a user's 'module:Id')."""
    preset: str = "small"
    """Model size for the pretrained model (and so for SFT, RM and PPO): tiny, small or medium."""
    arch: str = "gpt2"
    """Architecture of the pretrained model (and so of SFT, RM and PPO): gpt2, or llama (RoPE, RMSNorm, SwiGLU,
    grouped-query attention) of the same size."""
    seed: int = 0
    """Seed of every stage."""
    overwrite: bool = False
    """Delete a run with another configuration in --out-dir instead of refusing."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Stage 1 settings (out_dir, preset, arch and seed are set by the pipeline)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Stage 2 settings (out_dir, model, task and seed are set by the pipeline)."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """Stage 3a settings (out_dir, policy, task and seed are set by the pipeline)."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Stage 3b settings (out_dir, data, model, task, policy and seed are set by the pipeline)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Stage 4 settings (out_dir, policy, reward, task and seed are set by the pipeline)."""
    eval_prompts: int | None = None
    """Test prompts in the final comparison; default: the preset's budget."""


def stage_configs(cfg: PipelineConfig) -> dict:
    """The five stage configs with the pipeline's paths, task, seed and preset budget filled in."""
    is_multi_turn(cfg.task)  # ValueError naming the known tasks and ids
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    out, budget = Path(cfg.out_dir), BUDGETS[cfg.preset]
    r = dataclasses.replace

    # A preset's budget applies where the user left a field at its default.
    pre = r(cfg.pretrain, out_dir=str(stage_dir(out, "pretrain")), preset=cfg.preset, arch=cfg.arch,
            seed=cfg.seed)
    if budget["pretrain_steps"] and cfg.pretrain.max_steps == PretrainConfig.max_steps:
        pre = r(pre, max_steps=budget["pretrain_steps"], eval_every=10, save_every=10, warmup_steps=5)
    sft_cfg = r(cfg.sft, out_dir=str(stage_dir(out, "sft")), model=str(stage_model(out, "pretrain")), task=cfg.task,
                seed=cfg.seed)
    multi_turn = is_multi_turn(cfg.task)
    if budget["sft_steps"] and cfg.sft.max_steps is None:
        sft_cfg = r(sft_cfg, max_steps=budget["sft_steps"], eval_every=10, save_every=10, warmup_steps=2)
    elif multi_turn and (cfg.sft.lr, cfg.sft.epochs) == (SFTConfig.lr, SFTConfig.epochs):
        # copying a number from the conversation (the calculator's argument, its result) appears abruptly, after
        # about 6,000 demonstrations at lr 1e-3 on the small preset (an induction-head-like transition); one epoch
        # at 3e-4 stays short of it
        sft_cfg = r(sft_cfg, lr=MULTI_TURN["sft_lr"], epochs=MULTI_TURN["sft_epochs"])
    collect = r(cfg.collect, out_dir=str(stage_dir(out, "collect")), policy=str(stage_model(out, "sft")), task=cfg.task,
                seed=cfg.seed)
    if budget["num_prompts"] and cfg.collect.num_prompts == CollectConfig.num_prompts:
        collect = r(collect, num_prompts=budget["num_prompts"])
    elif multi_turn and cfg.collect.num_prompts == CollectConfig.num_prompts:  # K whole conversations per episode
        collect = r(collect, num_prompts=MULTI_TURN["num_prompts"])
    rm = r(cfg.rm, out_dir=str(stage_dir(out, "rm")), data=str(stage_dir(out, "collect")),
           model=str(stage_model(out, "sft")), task=cfg.task, policy=str(stage_model(out, "sft")), seed=cfg.seed)
    if cfg.preset == "tiny" and cfg.rm.n_eval_samples == RMConfig.n_eval_samples:
        rm = r(rm, n_eval_samples=16)
    ppo_cfg = r(cfg.ppo, out_dir=str(stage_dir(out, "ppo")), policy=str(stage_model(out, "sft")),
                reward=str(stage_model(out, "rm")), task=cfg.task, seed=cfg.seed)
    if multi_turn and cfg.ppo.lr == PPOConfig.lr:
        # the calculator's SFT policy is near-deterministic (0.13 nats per agent token): at lr 1e-4 PPO rose to gold
        # 0.95 and then collapsed in one update (iteration 9: KL 0.75 -> 14.8, gold -> 0); 3e-5 climbs steadily
        ppo_cfg = r(ppo_cfg, lr=MULTI_TURN["ppo_lr"])
    if budget["ppo_iterations"] and cfg.ppo.iterations == PPOConfig.iterations:
        ppo_cfg = r(ppo_cfg, iterations=budget["ppo_iterations"], num_envs=budget["num_envs"], save_every=1,
                    sample_every=1)
    return {"pretrain": pre, "sft": sft_cfg, "collect": collect, "rm": rm, "ppo": ppo_cfg}


def check_out_dir(out: Path) -> None:
    """Fail early, naming the folder, when --out cannot be written."""
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    if not probe.is_dir():
        raise ValueError(f"--out {str(out)!r} is not writable: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise ValueError(f"--out {str(out)!r} is not writable: {probe} is read-only")


def run_pipeline(cfg: PipelineConfig) -> Path:
    out = Path(cfg.out_dir)
    check_out_dir(out)
    configs = stage_configs(cfg)
    pinned = {"task": cfg.task, "preset": cfg.preset, "arch": cfg.arch, "seed": cfg.seed,
              **{name: json.loads(json.dumps(dataclasses.asdict(c), default=str)) for name, c in configs.items()}}
    check_run_dir(out, pinned, cfg.overwrite)  # refuses a foreign folder or another configuration
    runners = {"pretrain": pretrain, "sft": sft, "collect": collect_comparisons, "rm": train_reward_model, "ppo": ppo}
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for name, runner in runners.items():
        folder = stage_dir(out, name)
        if is_complete(folder, "comparisons" if name == "collect" else "model"):
            print(f"[pipeline] {name}: already complete in {folder}, skipped")
            continue
        start = time.perf_counter()
        runner(configs[name])
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        timings_file.write_text(json.dumps(timings, indent=2))
        summary = json.loads((folder / "summary.json").read_text())
        figures = ", ".join(f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float))
        print(f"[pipeline] {name}: done in {timings[name]:.0f} s ({figures})")

    start = time.perf_counter()
    n = cfg.eval_prompts or BUDGETS[cfg.preset]["eval_prompts"]
    common = dict(task=cfg.task, reward=str(stage_model(out, "rm")), num_prompts=n,
                  temperature=configs["ppo"].temperature, seed=cfg.seed)
    sft_model = str(stage_model(out, "sft"))
    # a multi-turn env has no few-shot document: the base model plays it through the chat template as is
    base = "pretrained (zero-shot)" if is_multi_turn(cfg.task) else "pretrained (few-shot)"
    evals = {
        base: evaluate(EvalConfig(policy=str(stage_model(out, "pretrain")), few_shot=True, **common)),
        "SFT": evaluate(EvalConfig(policy=sft_model, reference=sft_model, **common)),
        "PPO": evaluate(EvalConfig(policy=str(stage_model(out, "ppo")), reference=sft_model, **common)),
    }
    (out / "eval.json").write_text(json.dumps(evals, indent=2))
    timings["eval"] = time.perf_counter() - start
    timings_file.write_text(json.dumps(timings, indent=2))
    summaries = {name: json.loads((stage_dir(out, name) / "summary.json").read_text()) for name in runners}
    report = write_report(out, evals, summaries, timings)
    for name, e in evals.items():
        print(f"[pipeline] {name:>22}: gold {e['gold_mean']:+.3f}  proxy {e.get('proxy_mean', float('nan')):+.3f}  "
              f"KL {e.get('kl_to_reference', float('nan')):.2f}")
    print(f"[pipeline] total {sum(timings.values()):.0f} s; report: {report}")
    return report
