"""Fully sharded data parallel training (PyTorch FSDP2, `torch.distributed.fsdp.fully_shard`) for pretraining, SFT,
DPO, PPO, GRPO and RLOO, and its checkpoints.

`--parallel fsdp` under N > 1 processes shards each transformer block (the classes a model lists in
`_no_split_modules`: GPT2Block, LlamaDecoderLayer, ...) and then the rest of the model (embeddings, final norm,
head) over the processes: every process holds 1/N of every weight, gradient and optimizer state, and FSDP2
all-gathers a block's weights for its forward and backward and reduce-scatters its gradients: averaged over the
processes for pretraining, SFT and DPO, as DDP averages them, and summed for the RL trainers, as
`agents.distributed.sum_gradients` sums them, so each trainer's loss scaling is the same sharded or not.
`--parallel ddp` (the default) replicates. In one process both are the plain model.
https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html

A sharded model's forward is a collective: every process must run the same number of forwards (`pad_share`); the RL
trainers sample from a plain replica (`sync_replica`).

Checkpoints: a sharded run writes its weights and optimizer state with `torch.distributed.checkpoint` (DCP), each
process its shards, under checkpoint/dcp/; a replicated run writes safetensors + optimizer.pt. Either resumes under
any number of processes and either `parallel`: DCP reshards on load, and a replicated checkpoint is loaded into a
sharded run through its full (FQN-keyed) state dict. The final model/ is gathered to full tensors and written
once, by the main process, as a plain `save_pretrained` folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

PARALLELS = ("ddp", "fsdp")


def check_parallel(parallel: str, lora_rank: int = 0) -> str:
    if parallel not in PARALLELS:
        raise ValueError(f"parallel must be one of {PARALLELS}, got {parallel!r}")
    if parallel == "fsdp" and lora_rank:
        raise ValueError("parallel='fsdp' with LoRA (lora.rank > 0) is not supported yet: an adapter is small enough "
                         "to replicate, so use parallel='ddp'")
    return parallel


def shards(parallel: str, num_processes: int) -> bool:
    """Whether this launch shards its trained models: `parallel` "fsdp" under several processes."""
    return parallel == "fsdp" and num_processes > 1


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_blocks(model: torch.nn.Module, gradients: str = "mean") -> torch.nn.Module:
    """`fully_shard` each transformer block, then the root (what is left: embeddings, final norm, head), in place.
    The blocks are the modules whose class the model names in `_no_split_modules`, the unit HF itself never splits
    across devices. A sequence classifier's trunk and `score` head are units of their own, since the RL trainers
    call them one at a time (`agents.policy.value_forward`); a causal LM's head stays in the root, where a tied
    one shares the embedding's weight. `gradients`: "mean" over the processes (as DDP), or "sum" (the RL trainers
    weigh each process's loss by the global minibatch's token count, `agents/distributed.py`)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if gradients not in ("mean", "sum"):
        raise ValueError(f"gradients must be 'mean' or 'sum', got {gradients!r}")
    units = set(model._no_split_modules or ())
    for module in model.modules():
        if type(module).__name__ in units:
            fully_shard(module)
    if not model.can_generate():  # a sequence classifier: trunk, then head, each its own unit
        fully_shard(model.base_model)
        fully_shard(model.score)
    fully_shard(model)
    if gradients == "sum":
        for module in model.modules():
            if isinstance(module, FSDPModule):  # a plain SUM reduce-scatter (gloo has no pre-multiplied sum)
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    return model


def prepare_model(accelerator, model: torch.nn.Module, parallel: str) -> torch.nn.Module:
    """The model ready to train under this launch: FSDP2-sharded (`parallel` "fsdp", several processes), else
    prepared by Accelerate (DDP under several processes, the model itself in one). Build the optimizer after this
    call: FSDP2 replaces the parameters."""
    if shards(parallel, accelerator.num_processes):
        return shard_blocks(model.to(accelerator.device))
    return accelerator.prepare(model)


def sync_replica(replica: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """`replica` (a plain copy of a sharded `model`, taken before sharding) loaded with the model's current weights,
    gathered from the shards (a collective). The RL trainers sample from it: decoding runs one step per token until
    this process's own episodes end, a number of forwards that differs between processes, so the sampling model
    must not be a collective one; the replica also keeps the lean decoder (as verl's rollout engine gets the FSDP
    weights synced each iteration). The shards, their gradients and optimizer state stay 1/N per process."""
    replica.load_state_dict(full_state_dict(model))
    return replica


def padded_share(total: int, num_processes: int, batch_size: int) -> int:
    """How many rows each process runs so that all run the same number of forwards (a sharded model's forward is a
    collective): the longest share of `total` rows, rounded up to whole batches."""
    longest = -(-total // num_processes)
    return -(-longest // batch_size) * batch_size


def pad_share(rows: list, total: int, num_processes: int, batch_size: int, blank) -> list:
    """A process's share of `total` rows padded with `blank` rows to `padded_share`."""
    return rows + [blank] * (padded_share(total, num_processes, batch_size) - len(rows))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict, gathered from the shards onto the model's device (a collective: every process
    calls it, every process gets it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def save_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Each process writes its shards of the weights and the optimizer state to `folder` (DCP; a collective)."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Restore a `save_sharded` folder into `model` and `optimizer`, sharded or not, under any number of processes
    (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():  # one process, no process group: DCP says it loads as one process, as meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_into_sharded(model: torch.nn.Module, optimizer, weights: dict[str, torch.Tensor], saved: dict) -> None:
    """A replicated checkpoint into a sharded run: its full `weights` (safetensors, FQN-keyed) and its optimizer's
    `saved` state dict (`optimizer.state_dict()`, keyed by position), which each process shards into `model` and
    `optimizer`. The positions map to names through the optimizer's own groups: both optimizers were built by the
    same `agents.run.adamw` over the same model, so group g's i-th parameter is the same one in both."""
    names = {p: n for n, p in model.named_parameters()}
    state, groups = {}, []
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        fqns = [names[p] for p in group["params"]]
        state.update({fqn: saved["state"][i] for i, fqn in zip(saved_group["params"], fqns, strict=True)
                      if i in saved["state"]})
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": fqns})
    optim_state = {"state": state, "param_groups": groups}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
