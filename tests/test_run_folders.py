"""Every stage opens its run folder in one order (agents/run.py): pin the configuration, then check completeness.
A finished folder with the same configuration is skipped; with another one it is refused, naming the changed
fields, and nothing in it changes. Renamed fields keep old run folders working; renamed flags name the new one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agents.comparisons import collect_comparisons
from agents.dpo import DPOConfig, dpo
from agents.grpo import GRPOConfig, grpo
from agents.pipeline import PipelineConfig, stage_configs
from agents.ppo import ppo
from agents.pretrain import pretrain
from agents.reward_model import RMConfig, train_reward_model
from agents.rloo import RLOOConfig, rloo
from agents.run import cli, stage_dir, stage_model
from agents.sb3_lm import SB3PPOConfig, sb3_ppo
from agents.sft import SFTConfig, sft

STAGES = ("pretrain", "sft", "collect", "rm", "ppo", "grpo", "rloo", "dpo", "sb3_ppo")


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory) -> dict:
    """stage -> (its function, the config of a finished run folder): the tiny pipeline's five, and the other four
    trained here for an iteration or two from its SFT policy and reward model."""
    configs = stage_configs(PipelineConfig(out_dir=str(tiny_run), preset="tiny"))
    runners = {"pretrain": pretrain, "sft": sft, "collect": collect_comparisons, "rm": train_reward_model, "ppo": ppo}
    out = {name: (run, configs[name]) for name, run in runners.items()}
    root, policy, reward = (tmp_path_factory.mktemp("algorithms"), str(stage_model(tiny_run, "sft")),
                            str(stage_model(tiny_run, "rm")))
    group = dict(policy=policy, reward=reward, num_prompts=4, num_generations=2, num_minibatches=1, iterations=1,
                 max_new_tokens=6, device="cpu")
    out["grpo"] = (grpo, GRPOConfig(out_dir=str(root / "grpo"), **group))
    out["rloo"] = (rloo, RLOOConfig(out_dir=str(root / "rloo"), **group))
    out["dpo"] = (dpo, DPOConfig(out_dir=str(root / "dpo"), policy=policy,
                                 comparisons=str(stage_dir(tiny_run, "collect")), batch_size=4, max_steps=2))
    out["sb3_ppo"] = (sb3_ppo, SB3PPOConfig(out_dir=str(root / "sb3_ppo"), policy=policy, reward=reward, n_envs=2,
                                            n_steps=16, batch_size=16, n_epochs=1, total_timesteps=32, device="cpu"))
    for name in ("grpo", "rloo", "dpo", "sb3_ppo"):
        run, cfg = out[name]
        run(cfg)
    return out


def snapshot(folder: Path) -> dict:
    """Every file of a run folder but config.json (rewritten as it is) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != "config.json"}


@pytest.mark.parametrize("stage", STAGES)
def test_a_finished_run_is_skipped_unchanged_and_refused_changed(finished, stage):
    run, cfg = finished[stage]
    folder = Path(cfg.out_dir)
    assert (folder / "summary.json").exists() and not (folder / "checkpoint").exists()
    before = snapshot(folder)
    run(cfg)  # the same configuration: complete, nothing to do
    assert snapshot(folder) == before
    with pytest.raises(ValueError, match=r"different configuration \(seed: 0 -> 1\)"):
        run(dataclasses.replace(cfg, seed=1))
    assert snapshot(folder) == before


def test_a_run_pinned_under_old_field_names_still_resumes(finished):
    """grad_clip -> max_grad_norm, mixed_precision -> bf16 (its values 'bf16'/'no'), n_prompts -> num_prompts."""
    for stage, renames in (("sft", {"max_grad_norm": ("grad_clip", lambda v: v)}),
                           ("rm", {"max_grad_norm": ("grad_clip", lambda v: v),
                                   "bf16": ("mixed_precision", lambda v: "bf16" if v else "no")}),
                           ("collect", {"num_prompts": ("n_prompts", lambda v: v)})):
        run, cfg = finished[stage]
        pinned = Path(cfg.out_dir) / "config.json"
        config = json.loads(pinned.read_text())
        for new, (old, to_old) in renames.items():
            config[old] = to_old(config.pop(new))
        pinned.write_text(json.dumps(config))
        before = snapshot(Path(cfg.out_dir))
        run(cfg)  # the old names read as the new ones: no change, the finished run is skipped
        assert snapshot(Path(cfg.out_dir)) == before
        assert set(renames) <= set(json.loads(pinned.read_text())), "the pinned config is rewritten with the new names"


@pytest.mark.parametrize("config_cls, flag, new", [
    (SFTConfig, "--grad-clip", "--max-grad-norm"),
    (RMConfig, "--mixed-precision=bf16", "--bf16"),
    (PipelineConfig, "--collect.n-prompts", "--num-prompts"),
    (PipelineConfig, "--out", "--out-dir"),
])
def test_an_old_flag_names_the_new_one(config_cls, flag, new):
    with pytest.raises(SystemExit, match=f"{flag.split('=')[0]} was renamed: use {new}"):
        cli(config_cls, [flag, "1"])


def test_a_resume_cuts_every_append_only_file_back_to_the_checkpoint(tmp_path):
    """metrics.jsonl and samples.jsonl alike (#21): rows past the checkpoint go, and so does a partial last line
    (a crash in mid-write); a corrupt line elsewhere is an error naming the file and the line."""
    from agents.run import RunLogger

    rows = lambda key, steps: "".join(json.dumps({key: s, "x": 1}) + "\n" for s in steps)  # noqa: E731
    (tmp_path / "metrics.jsonl").write_text(rows("step", [1, 2, 3]) + '{"step": 4, "x"')
    (tmp_path / "samples.jsonl").write_text(rows("iteration", [1, 1, 2, 3, 3]))
    RunLogger(tmp_path, resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == rows("step", [1, 2])
    assert (tmp_path / "samples.jsonl").read_text() == rows("iteration", [1, 1, 2])
    RunLogger(tmp_path, resume_step=None).close()  # a fresh run starts them empty
    assert (tmp_path / "samples.jsonl").read_text() == ""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON row with a 'step'"):
        RunLogger(tmp_path, resume_step=2)


def test_damaged_run_folders_name_the_file_and_the_way_out(finished, tmp_path):
    """(#21 item 7) 'complete' means a summary and the result folder; a damaged checkpoint is named."""
    import shutil

    import torch

    from agents.run import load_checkpoint, save_checkpoint

    run, cfg = finished["sft"]
    copy = tmp_path / "sft"
    shutil.copytree(cfg.out_dir, copy)
    cfg = dataclasses.replace(cfg, out_dir=str(copy))
    shutil.rmtree(copy / "model")
    with pytest.raises(ValueError, match=r"says the stage is complete, but .*model is missing: delete summary.json"):
        run(cfg)
    (copy / "summary.json").write_text("{garbage")
    with pytest.raises(ValueError, match=r"summary.json is not a stage summary \(damaged\?\)"):
        run(cfg)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 1})
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # what a full disk or a kill in mid-copy leaves
    with pytest.raises(ValueError, match=r"checkpoint .* is damaged \(SafetensorError"):
        load_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler)
