"""Training plumbing shared by every stage (pretrain, SFT, reward model, PPO): run folders, metrics, checkpoints.

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

import ctypes
import json
import math
import os
import platform
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from safetensors.torch import load_file, save_model
from transformers import PreTrainedModel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.tensorboard import SummaryWriter


def bf16_is_fast() -> bool:
    """Whether bfloat16 autocast speeds training up on this machine, the trainers' default for it: on a CUDA GPU that
    supports bf16, and on a CPU with AMX tiles, where oneDNN multiplies bf16 on them. A CPU without AMX (AVX512-BF16
    alone) multiplies bf16 at about half its fp32 speed (166 vs 330 GFLOP/s on this project's 2-core dev machine),
    and there autocast made pretraining, SFT and the reward model about 2x slower, so they default to fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported()  # the test inductor uses to pick its AMX kernels


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS; process-wide, so the
    `textenv` command calls it once at startup (a script that calls the trainers directly may too).

    By default glibc serves a large block (from 128 KiB, the threshold growing with what is freed, up to 32 MiB)
    with a fresh mmap and unmaps it on free, and trims the heap's free top: every step's activation tensors then
    come back as new pages, zero-filled through page faults. Measured on one PPO update epoch of the anchor
    setting (2 threads): 24k-140k minor faults an epoch, ~0 with these settings, and 4-5% less time per PPO
    iteration (paired, same process); peak RSS unchanged. Returns False, changing nothing, off glibc or where the
    user set malloc's tunables already (GLIBC_TUNABLES or MALLOC_*_ environment variables)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    libc = ctypes.CDLL(None)  # the running process's C library
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    # mmap only blocks over 32 MiB (the largest threshold glibc accepts on 64-bit); trim only past 1 GiB free
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


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


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warmup to the optimizer's lr, then cosine decay to min_lr_ratio * lr at total_steps (as in nanoGPT)."""

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, lr_factor)


def _write_json_atomic(path: Path, obj: Any) -> None:
    # write-then-rename: a reader (or a crash) never sees half a file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
        differ = config_changes(json.loads(config_file.read_text()), config)
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


def save_model_folder(model, tokenizer, folder: str | Path) -> Path:
    """`model` and `tokenizer` as one save_pretrained folder (safetensors), written beside its place and then
    renamed, so a crash never leaves half a model folder. Only the main process writes; returns the folder."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if distributed_state().is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        extract_model_from_parallel(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def is_complete(out_dir: str | Path) -> bool:
    """True once a stage has written its summary.json (the last thing it writes)."""
    return (Path(out_dir) / "summary.json").exists()


def write_summary(out_dir: str | Path, summary: dict) -> None:
    """Mark the stage complete: summary.json, written atomically by the main process."""
    if distributed_state().is_main_process:
        _write_json_atomic(Path(out_dir) / "summary.json", summary)


class RunLogger:
    """metrics.jsonl + TensorBoard. On resume from step s, the lines a crashed run logged after s are dropped first,
    so the resumed run re-logs them once: no duplicates, no gaps. A fresh run (resume_step=None) starts empty."""

    def __init__(self, out_dir: str | Path, resume_step: int | None):
        self.enabled = distributed_state().is_main_process
        if not self.enabled:
            return
        self.path = Path(out_dir) / "metrics.jsonl"
        keep_until = -1 if resume_step is None else resume_step
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= keep_until]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
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


def _save_model(model, folder: Path) -> None:
    model = extract_model_from_parallel(model)
    if isinstance(model, PreTrainedModel):
        model.save_pretrained(folder)  # safetensors + config: plain transformers can load it
    else:  # a bare module, e.g. PPO's value head on the policy trunk
        folder.mkdir(parents=True, exist_ok=True)
        save_model(model, str(folder / "model.safetensors"))


def save_checkpoint(ckpt_dir: str | Path, models, optimizer, scheduler, state: dict) -> None:
    """Write model(s)/optimizer/scheduler/state (+ RNG states) to `ckpt_dir`, atomically.

    `models` is one model (saved at the top of the folder) or a dict {name: model} (one subfolder each, e.g.
    PPO's policy and value). Everything goes to `<ckpt_dir>.tmp` first; then the previous checkpoint is moved to
    `<ckpt_dir>.old`, the new one renamed into place, and the old one deleted. A crash at any moment leaves a
    complete checkpoint at `ckpt_dir` or (between the two renames) at `<ckpt_dir>.old`, which `load_checkpoint`
    falls back to.
    """
    ckpt_dir, dist = Path(ckpt_dir), distributed_state()
    if dist.is_main_process:
        tmp, old = ckpt_dir.with_name(ckpt_dir.name + ".tmp"), ckpt_dir.with_name(ckpt_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
        for name, model in (models.items() if isinstance(models, dict) else [("", models)]):
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


def _load_weights(model, folder: Path) -> None:
    model = extract_model_from_parallel(model)
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # save_pretrained stores a tied tensor once (lm_head.weight is wte.weight): missing is fine iff it shares storage
    ptrs = {name: t.data_ptr() for name, t in model.state_dict().items()}
    loaded = {ptrs[name] for name in weights if name in ptrs}
    missing = [name for name in missing if ptrs[name] not in loaded]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint(ckpt_dir: str | Path, models, optimizer, scheduler) -> dict | None:
    """Restore a `save_checkpoint` folder in place (weights, optimizer, scheduler, RNG); return its state dict,
    or None when there is no checkpoint. Only safetensors and `torch.load(weights_only=True)`: no pickle."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "trainer_state.json").exists():
        ckpt_dir = ckpt_dir.with_name(ckpt_dir.name + ".old")  # a crash between the two renames of a save
        if not (ckpt_dir / "trainer_state.json").exists():
            return None
    for name, model in (models.items() if isinstance(models, dict) else [("", models)]):
        _load_weights(model, ckpt_dir / name)
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    _set_rng_state(state.pop("rng"))
    return state
