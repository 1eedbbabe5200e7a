"""The run helper: what every stage does around its training loop, in one order, and the plumbing under it.

Every stage calls, in this order:
  1. `start_run(cfg, stage)`: pin the configuration (a run folder holding another one is refused, naming the changed
     fields), then report whether the run is complete; a complete run is skipped (nothing is trained or written);
  2. `load_checkpoint` (resume), `RunLogger` (metrics, cut back to the checkpoint), `save_checkpoint` in its loop;
  3. `finish_run(...)`: the final model folder, then summary.json (the mark of completion), then the checkpoint is
     deleted: a complete stage is never resumed.
A stage's own command line is `cli(ConfigClass)`, which names the new flag for a renamed one.

A run folder holds:
  config.json           the run's configuration; a rerun with another configuration is refused
  metrics.jsonl         one JSON object per log call, {"step": s, "train/loss": ..., ...}
  tb/                   the same scalars for TensorBoard
  checkpoint/           model (safetensors) + optimizer.pt + scheduler.pt + trainer_state.json, replaced atomically
  summary.json          written last, atomically: the stage is complete (`is_complete`)

Only the main process writes (under `accelerate launch`/`torchrun` every rank runs this code); the model weights and
optimizer state are identical on all ranks under DDP, so rank 0's copy is the checkpoint. Nothing in a checkpoint
depends on the number of processes (full weights, the optimizer's full state, a step counter from which the
trainers recompute the global batch), so a run saved by N processes resumes on M.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import extract_model_from_parallel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedModel

from agents.lora import is_adapted, merged_copy
from agents.sharding import full_state_dict, is_sharded, load_full_into_sharded, load_sharded, save_sharded


def multi_cpu() -> bool:
    """True when this is one of several processes (torchrun and accelerate launch set WORLD_SIZE) and there is no CUDA
    device: then the process group must be a CPU (gloo) one. Accelerate forms one only when asked (`cpu=True`);
    without it, `torchrun --nproc_per_node 2` on a CPU machine gives two independent 1-process runs that train on
    half batches each and write the same run folder."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def distributed_state() -> PartialState:
    """This run's process group (Accelerate's shared state, created on the first call: every trainer makes this
    call first, through `check_run_dir`, so that a later `Accelerator(cpu=multi_cpu())` finds the same group)."""
    return PartialState(cpu=multi_cpu())


SHARDED_DIR = "dcp"  # a sharded run's checkpoint: each process's shards of weights and optimizer state (DCP)

# A pipeline run folder: a subfolder per stage (the other algorithms' defaults follow it: runs/default/grpo, ...),
# each with its result in model/ (collect: comparisons/). One map, so that no caller spells the layout out.
STAGE_DIRS = {"pretrain": "pretrain", "sft": "sft", "collect": "comparisons", "rm": "rm", "ppo": "ppo"}


def stage_dir(run: str | Path, stage: str) -> Path:
    """The folder of `stage` in the pipeline run folder `run`."""
    return Path(run) / STAGE_DIRS[stage]


def stage_model(run: str | Path, stage: str) -> Path:
    """The model folder that `stage` of the pipeline run `run` writes (pretrain, sft, rm, ppo)."""
    return stage_dir(run, stage) / "model"


def run_config(cfg) -> dict:
    """What must match for a rerun to resume: every field but where the run lives, whether to overwrite and (for
    stages that have them) the device and how the processes split the model (`parallel`), which may change between
    a crash and a resume."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("out_dir", "overwrite", "device", "parallel")}


def start_run(cfg, stage: str, result: str = "model") -> tuple[Path, bool]:
    """Every stage's first call: pin `cfg` in `cfg.out_dir` (`check_run_dir`: a changed configuration is refused
    unless cfg.overwrite), then (out_dir, complete). A complete run has nothing to do: the stage returns its result."""
    out_dir = check_run_dir(cfg.out_dir, {"stage": stage, **run_config(cfg)}, cfg.overwrite)
    complete = is_complete(out_dir, result)
    if complete and distributed_state().is_main_process:
        print(f"{out_dir} is complete (summary.json); nothing to do")
    return out_dir, complete


def finish_run(out_dir: Path, model, tokenizer, summary: dict, extra_models: dict | None = None,
               merge: bool = False) -> Path:
    """Every stage's last call: `model` and `tokenizer` as out_dir/model (a save_pretrained folder; a LoRA model's is
    its PEFT adapter folder, and with `merge` out_dir/merged holds the base with the adapter merged in), each of
    `extra_models` {name: module} as out_dir/name, then summary.json, then the checkpoint is deleted. Every process
    calls it; the main one writes. Returns out_dir/model."""
    final = save_model_folder(model, tokenizer, out_dir / "model")
    dist = distributed_state()
    gathered = {name: full_state_dict(m) for name, m in (extra_models or {}).items() if is_sharded(m)}  # collectives
    if dist.is_main_process:
        trained = extract_model_from_parallel(model)
        if merge and is_adapted(trained):
            merged = merged_copy(trained)
            _replace_folder(out_dir / "merged", lambda tmp: (_save_model(merged, tmp), tokenizer.save_pretrained(tmp)))
        for name, extra in (extra_models or {}).items():
            if name in gathered:
                _replace_folder(out_dir / name,
                                lambda tmp, m=extra, w=gathered[name]: m.save_pretrained(tmp, state_dict=w))
            else:
                _replace_folder(out_dir / name, lambda tmp, m=extra: _save_model(m, tmp, final=True))
        _write_json_atomic(out_dir / "summary.json", {**summary, "model": str(final)})
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # a complete stage is never resumed
    dist.wait_for_everyone()  # the model and summary are on disk when a stage returns, in every process
    return final


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float) -> LambdaLR:
    """Linear warmup to the optimizer's lr, then cosine decay to min_lr_ratio * lr at total_steps (as in nanoGPT)."""

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, lr_factor)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D parameters only (GPT-3 / nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def _write_json_atomic(path: Path, obj: Any) -> None:
    # write-then-rename: a reader (or a crash) never sees half a file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# Fields renamed so that one concept has one name in every stage: old name -> (new name, old value -> new value). A run
# folder pinned under an old name keeps working (its config.json is read as if written with the new names, and is
# rewritten with them); an old command-line flag fails with a message naming the new one (`cli`).
RENAMED = {
    "grad_clip": ("max_grad_norm", lambda v: v),
    "mixed_precision": ("bf16", lambda v: v == "bf16"),
    "n_prompts": ("num_prompts", lambda v: v),
}
RENAMED_FLAGS = {
    "grad-clip": "--max-grad-norm",
    "mixed-precision": "--bf16 or --no-bf16",
    "n-prompts": "--num-prompts",
    "out": "--out-dir (pipeline) or --out-file (eval)",
}


def upgrade_config(config: dict) -> dict:
    """A pinned config with every renamed field (at any depth) under its new name, values converted."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            value = upgrade_config(value)
        if key in RENAMED:
            key, convert = RENAMED[key]
            value = convert(value)
        out[key] = value
    return out


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'field: old -> new' for every field of the pinned `old` config that `new` changes or drops, nested dicts
    included. A field only `new` has was added by a newer textenv (at its default): it is not a change, so a run
    folder made before an upgrade still resumes or re-reports."""
    changes = []
    for key in sorted(old):
        name, missing = f"{prefix}{key}", object()
        value = new.get(key, missing)
        if isinstance(old[key], dict) and isinstance(value, dict):
            changes += config_changes(old[key], value, f"{name}.")
        elif value is missing:
            changes.append(f"{name}: {old[key]!r} -> (no such field)")
        elif value != old[key]:
            changes.append(f"{name}: {old[key]!r} -> {value!r}")
    return changes


def check_run_dir(out_dir: str | Path, config: dict, overwrite: bool = False) -> Path:
    """Create `out_dir` for a run with `config` (a JSON-able dict), refusing to mix runs.

    - holds a config.json with other values -> ValueError naming the fields (overwrite=True: the old run is deleted);
      fields that only `config` has (added by a newer textenv) are no change, see `config_changes`
    - exists, is non-empty and has no config.json (not a run folder) -> ValueError, even with overwrite
    Every rank checks (so every rank raises the same error); only the main process writes.
    """
    out_dir, state = Path(out_dir), distributed_state()
    config = json.loads(json.dumps(config))  # normalise (tuples -> lists, Paths rejected) to compare with the file
    config_file = out_dir / "config.json"
    delete_old = False
    if config_file.exists():
        differ = config_changes(upgrade_config(json.loads(config_file.read_text())), config)
        if differ and not overwrite:
            details = ", ".join(differ)
            raise ValueError(
                f"{out_dir} holds a run with a different configuration ({details}); "
                "use another out_dir, or overwrite=True to delete that run"
            )
        delete_old = overwrite
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and is not a run folder (no config.json); refusing to write into it")
    state.wait_for_everyone()  # nobody writes before every rank has checked
    if state.is_main_process:
        if delete_old:
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(config_file, config)
    state.wait_for_everyone()
    return out_dir


def _replace_folder(folder: Path, write) -> None:
    """`write(tmp)` into a folder beside `folder`, then renamed into its place: a crash never leaves half of it."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def save_model_folder(model, tokenizer, folder: str | Path) -> Path:
    """`model` and `tokenizer` as one save_pretrained folder (safetensors), written atomically. Only the main
    process writes; returns the folder."""
    folder = Path(folder)
    if is_sharded(model):  # gathered to full tensors (a collective), written once
        weights = full_state_dict(model)
        if distributed_state().is_main_process:
            _replace_folder(folder, lambda tmp: (model.save_pretrained(tmp, state_dict=weights),
                                                 tokenizer.save_pretrained(tmp)))
    elif distributed_state().is_main_process:
        _replace_folder(folder, lambda tmp: (_save_model(model, tmp, final=True), tokenizer.save_pretrained(tmp)))
    return folder


def is_complete(out_dir: str | Path, result: str = "model") -> bool:
    """True once a stage has written its summary.json (the last thing it writes), beside its `result` folder
    (model/; collect: comparisons/). A summary that is no JSON object, or one without its result, is a damaged
    folder: ValueError naming it and the way out."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.exists():
        return False
    way_out = "delete summary.json to run the stage again, or rerun with --overwrite"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not a stage summary (damaged?): {way_out}")
    if not (out_dir / result).is_dir():
        raise ValueError(f"{path} says the stage is complete, but {out_dir / result} is missing: {way_out}")
    return True


def write_summary(out_dir: str | Path, summary: dict) -> None:
    """Mark the stage complete: summary.json, written atomically by the main process."""
    if distributed_state().is_main_process:
        _write_json_atomic(Path(out_dir) / "summary.json", summary)


# The append-only files of a run folder, each with the key that numbers its rows: cut back together on a resume.
APPEND_ONLY = {"metrics.jsonl": "step", "samples.jsonl": "iteration"}


def cut_back(path: Path, key: str, keep_until: int) -> None:
    """Keep the rows of a JSONL file whose `key` is <= keep_until (all of them go for -1), atomically. A partial
    last line (what a crash in mid-write leaves) is dropped; any other line that is not a JSON object with `key`
    is an error naming the file and the line."""
    if not path.exists():
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason}); delete it, or rerun with --overwrite") from None
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row[key]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):  # a crash in mid-write: the row is re-logged by the resumed run
                break
            raise ValueError(f"{path}, line {number}: not a JSON row with a {key!r} ({line[:60]!r}); delete the "
                             "file, or rerun with --overwrite") from None
        if step <= keep_until:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLogger:
    """metrics.jsonl + TensorBoard. On resume from step s, the rows a crashed run wrote after s are dropped first
    from every append-only file (metrics.jsonl, samples.jsonl: `APPEND_ONLY`), so the resumed run writes them once:
    no duplicates, no gaps. A fresh run (resume_step=None) starts them empty."""

    def __init__(self, out_dir: str | Path, resume_step: int | None):
        self.enabled = distributed_state().is_main_process
        if not self.enabled:
            return
        self.path = Path(out_dir) / "metrics.jsonl"
        keep_until = -1 if resume_step is None else resume_step
        for name, key in APPEND_ONLY.items():
            cut_back(Path(out_dir) / name, key, keep_until)
        self.path.touch()
        # purge_step: TensorBoard drops the crashed run's events at steps >= purge_step
        self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=keep_until + 1)
        self.file = self.path.open("a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _rng_state() -> dict:
    """Every RNG as JSON-able lists (so trainer_state.json needs no pickle)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state()  # ('MT19937', keys (624,), pos, has_gauss, cached_gaussian)
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if rng["cuda"] and torch.cuda.is_available():
        # one state per GPU the saving process saw; a resume may see fewer (8 GPUs -> 1): restore those it has
        for i, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(state, dtype=torch.uint8), i)


BASE_SUMS = "base_sums.safetensors"  # a LoRA checkpoint's fingerprint of the frozen base it was trained on


def _save_model(model, folder: Path, final: bool = False) -> None:
    model = extract_model_from_parallel(model)
    if isinstance(model, PreTrainedModel) or (final and is_adapted(model)):
        model.save_pretrained(folder)  # safetensors + config (a LoRA model: its adapter): transformers/peft load it
    elif is_adapted(model):  # a LoRA model's checkpoint: what trains (the adapter, a classifier's head), not the base
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(folder / "model.safetensors"))
        save_file(_base_sums(model), str(folder / BASE_SUMS))
    else:  # a bare module, e.g. PPO's value head on the policy trunk
        folder.mkdir(parents=True, exist_ok=True)
        save_model(model, str(folder / "model.safetensors"))


def _base_sums(model) -> dict[str, torch.Tensor]:
    """{"sums": each frozen parameter's sum in float64, in name order}: a LoRA checkpoint keeps the adapter only and a
    resume reloads the base from the run's source, so a base changed in between is caught by this, not trained on."""
    return {"sums": torch.stack([p.detach().double().sum() for _, p in sorted(model.named_parameters())
                                 if not p.requires_grad])}


def save_checkpoint(ckpt_dir: str | Path, models, optimizer, scheduler, state: dict) -> None:
    """Write model(s)/optimizer/scheduler/state (+ RNG states) to `ckpt_dir`, atomically.

    `models` is one model (saved at the top of the folder) or a dict {name: model} (one subfolder each, e.g.
    PPO's policy and value). A LoRA (PEFT) model's folder holds what trains, the adapter and a classifier's head, and
    a fingerprint of the frozen base, which a resume reloads from the run's source and checks against it.
    Everything goes to `<ckpt_dir>.tmp` first; then the previous checkpoint is moved to
    `<ckpt_dir>.old`, the new one renamed into place, and the old one deleted. A crash at any moment leaves a
    complete checkpoint at `ckpt_dir` or (between the two renames) at `<ckpt_dir>.old`, which `load_checkpoint`
    falls back to.
    """
    ckpt_dir, dist = Path(ckpt_dir), distributed_state()
    tmp, old = ckpt_dir.with_name(ckpt_dir.name + ".tmp"), ckpt_dir.with_name(ckpt_dir.name + ".old")
    sharded = any(is_sharded(m) for m in _named(models).values())
    if sharded:  # every process writes its shards (agents/sharding.py), into a folder the main process empties first
        if dist.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.wait_for_everyone()
        save_sharded(tmp / SHARDED_DIR, _as_module(models), _torch_optimizer(optimizer))
        dist.wait_for_everyone()
    if dist.is_main_process:
        if not sharded:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
            for name, model in _named(models).items():
                _save_model(model, tmp / name)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json_atomic(tmp / "trainer_state.json", {**state, "rng": _rng_state()})
        if ckpt_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    dist.wait_for_everyone()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (one, or a save_pretrained folder's shards)."""
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def _load_weights(model, folder: Path) -> None:
    model = extract_model_from_parallel(model)
    weights = load_file(folder / "model.safetensors") if is_adapted(model) else _read_weights(folder)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # save_pretrained stores a tied tensor once (lm_head.weight is wte.weight): missing is fine iff it shares storage
    ptrs = {name: t.data_ptr() for name, t in model.state_dict().items()}
    loaded = {ptrs[name] for name in weights if name in ptrs}
    missing = [name for name in missing if ptrs[name] not in loaded]
    if (folder / BASE_SUMS).exists():  # a LoRA checkpoint holds what trains; the base comes from the run's source
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n in missing]
        saved = load_file(folder / BASE_SUMS)["sums"]
        if not torch.allclose(saved, _base_sums(model)["sums"], rtol=1e-9, atol=0.0):
            raise ValueError(f"checkpoint {folder} holds a LoRA adapter trained on another base model than the one "
                             "this run loaded (its source folder changed since): restore that folder, or rerun with "
                             "--overwrite to start the stage over")
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")


def _named(models) -> dict:
    """A checkpoint's models by subfolder: {name: model}, or {"": model} for one at the top."""
    return models if isinstance(models, dict) else {"": models}


def _as_module(models) -> torch.nn.Module:
    """One module whose parameter names are the checkpoint's: several models under their names (a ModuleDict)."""
    return torch.nn.ModuleDict(models) if isinstance(models, dict) else models


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def _full_weights(model, folder: Path) -> dict[str, torch.Tensor]:
    """A save_pretrained folder's weights by the model's own names, a tied tensor stored once given under each name
    that shares it (lm_head.weight is wte.weight)."""
    weights = _read_weights(folder)
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for names in tied.values():
        stored = [n for n in names if n in weights]
        for name in names:
            if stored and name not in weights:
                weights[name] = weights[stored[0]]
    return weights


def load_checkpoint(ckpt_dir: str | Path, models, optimizer, scheduler) -> dict | None:
    """Restore a `save_checkpoint` folder in place (weights, optimizer, scheduler, RNG); return its state dict,
    or None when there is no checkpoint. Only safetensors and `torch.load(weights_only=True)`: no pickle."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "trainer_state.json").exists():
        ckpt_dir = ckpt_dir.with_name(ckpt_dir.name + ".old")  # a crash between the two renames of a save
        if not (ckpt_dir / "trainer_state.json").exists():
            return None
    try:
        if (ckpt_dir / SHARDED_DIR).is_dir():  # written by a sharded run: DCP reshards it for this one
            load_sharded(ckpt_dir / SHARDED_DIR, _as_module(models), _torch_optimizer(optimizer))
        elif any(is_sharded(m) for m in _named(models).values()):  # a replicated run's checkpoint, into shards
            saved = torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu")
            weights = {(f"{name}." if name else "") + k: v for name, m in _named(models).items()
                       for k, v in _full_weights(m, ckpt_dir / name).items()}
            load_full_into_sharded(_as_module(models), _torch_optimizer(optimizer), weights, saved)
        else:
            for name, model in _named(models).items():
                _load_weights(model, ckpt_dir / name)
            optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint {ckpt_dir} is damaged ({type(exc).__name__}: {exc}); delete it to start the "
                         "stage over, or rerun with --overwrite") from exc
    _set_rng_state(state.pop("rng"))
    return state


def cli(config_cls, argv: list[str] | None = None, **tyro_kwargs):
    """`config_cls` from the command line (tyro: one flag per field, its docstring as the help). A flag whose field
    was renamed (`RENAMED_FLAGS`), at any depth (--grad-clip, --pretrain.grad-clip), fails with a message naming the
    new flag instead of argparse's "unrecognized arguments"."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    for arg in argv:
        match = re.fullmatch(r"--(?:[\w-]+\.)*([\w-]+)(=.*)?", arg)
        old = match and match.group(1).replace("_", "-")
        if old in RENAMED_FLAGS:
            raise SystemExit(f"error: {arg.split('=')[0]} was renamed: use {RENAMED_FLAGS[old]} "
                             "(one name per setting in every stage; run folders made with the old name still resume)")
    return tyro.cli(config_cls, args=argv, **tyro_kwargs)
