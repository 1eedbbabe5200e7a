"""Trainer runs under accelerate launch / torchrun for tests/test_distributed.py: what every process ends each with.

    accelerate launch --config_file configs/accelerate/ddp.yaml tests/distributed_worker.py JOBS.json
    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py JOBS.json  # the same

JOBS.json is a list of jobs, run one after the other in the same process group (one launch, so the ~10 s of
starting and importing is paid once): {"stage": "sft" | "rm" | "pretrain" | "dpo" | "ppo" | "grpo" | "rloo",
"config": {the stage's config fields}, "report_dir": str, "stop_after_save": bool}. The trainer runs unchanged; the
only hook is a wrapper around the `load_checkpoint` it calls once, right after `accelerator.prepare` (the RL trainers:
right after building the optimizer), which keeps the model(s) and optimizer objects it is given (the very ones then
trained) and the step it resumed from. Each process then writes <report_dir>/rank<r>.json: the world size, the
resumed step, the sha256 of its model's parameters (PPO: {"policy": ..., "value": ...}) and of its optimizer
state (a sharded model's gathered), and how many weights it held (a sharded model: its shards).
stop_after_save makes every process leave the run right after the first checkpoint is written, as a run killed at
that moment would (the report then says "stopped": true).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from torch.distributed.tensor import DTensor

import agents.dpo
import agents.grpo
import agents.ppo
import agents.pretrain
import agents.reward_model
import agents.rloo
import agents.sft
from agents.run import distributed_state

# stage: (module, config class, trainer, the checkpoint state's step counter)
STAGES = {
    "sft": (agents.sft, agents.sft.SFTConfig, agents.sft.sft, "step"),
    "rm": (agents.reward_model, agents.reward_model.RMConfig, agents.reward_model.train_reward_model, "step"),
    "pretrain": (agents.pretrain, agents.pretrain.PretrainConfig, agents.pretrain.pretrain, "step"),
    "dpo": (agents.dpo, agents.dpo.DPOConfig, agents.dpo.dpo, "step"),
    "ppo": (agents.ppo, agents.ppo.PPOConfig, agents.ppo.ppo, "iteration"),
    "grpo": (agents.grpo, agents.grpo.GRPOConfig, agents.grpo.grpo, "iteration"),
    "rloo": (agents.rloo, agents.rloo.RLOOConfig, agents.rloo.rloo, "iteration"),
}


class Stop(Exception):
    pass


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor's full value: a sharded (FSDP2) one gathered from every process (a collective), else itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def params_sha256(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes (gathered, if sharded), in named_parameters order (a tied weight counted
    once)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(whole(p.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def optimizer_sha256(optimizer) -> str:
    h = hashlib.sha256()
    for index, state in sorted(optimizer.state_dict()["state"].items()):
        for key, value in sorted(state.items()):
            h.update(f"{index}.{key}".encode())
            h.update(whole(value.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def nested(config_cls, config: dict) -> dict:
    """`config` (a config's `dataclasses.asdict`, through JSON) with its nested configs (`lora`) rebuilt."""
    hints = typing.get_type_hints(config_cls)
    return {k: hints[k](**v) if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) else v
            for k, v in config.items()}


def run_job(stage: str, config: dict, report_dir: str, stop_after_save: bool) -> None:
    module, config_cls, run, step_key = STAGES[stage]
    seen = {}
    real_load, real_save = module.load_checkpoint, module.save_checkpoint

    def spy_load(ckpt_dir, models, optimizer, scheduler):
        state = real_load(ckpt_dir, models, optimizer, scheduler)
        seen.update(model=models, optimizer=optimizer, resumed_step=state[step_key] if state else None)
        return state

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)  # ends with a barrier: the checkpoint is complete on disk for every process
        raise Stop

    module.load_checkpoint = spy_load
    module.save_checkpoint = save_then_stop if stop_after_save else real_save
    try:
        run(config_cls(**nested(config_cls, config)))
        stopped = False
    except Stop:
        stopped = True
    finally:
        module.load_checkpoint, module.save_checkpoint = real_load, real_save
    state = distributed_state()
    models = seen["model"]
    params = ({name: params_sha256(m) for name, m in models.items()} if isinstance(models, dict)
              else params_sha256(extract_model_from_parallel(models)))
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel()  # this process's share of the weights
               for m in (models.values() if isinstance(models, dict) else [models]) for p in m.parameters())
    report = {"world_size": state.num_processes, "resumed_step": seen["resumed_step"], "stopped": stopped,
              "params": params, "optimizer": optimizer_sha256(seen["optimizer"]), "numel_held": held}
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    Path(report_dir, f"rank{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run_job(job["stage"], job["config"], job["report_dir"], job["stop_after_save"])
    torch.distributed.destroy_process_group()
