"""Data-parallel plumbing for the RL trainers (PPO, GRPO, RLOO) under `accelerate launch` / `torchrun`.

The scheme makes N processes take the steps one process takes with the same seed and global batch B:

  1. rollout: process r plays the episodes of global rows [r*B/N, (r+1)*B/N) (`rank_rows`): their prompts come from
     the same seeds (sub-env i is seeded with seed + i) and their tokens from the same U[0, 1) numbers
     (`rollout_uniforms`: drawn for all B rows from the iteration's generator, each process keeping its rows), so
     the episodes are those of one process, up to float rounding of the logits. Reference log-probs and values are
     computed there too, on the process's own rows.
  2. `gather_rollout` / `gather_rows`: every process then holds the whole batch, so the global quantities (advantage
     whitening, the KL controller's update, the metrics) are computed identically everywhere, with no more
     communication.
  3. update: each process takes its share (`rank_rows`) of every global minibatch's rows, weighs its loss by the
     GLOBAL minibatch's token count, and `sum_gradients` all-reduces the gradients (a sum): the minibatch's gradient,
     which one process would have computed, on every process, so every optimizer step is the same everywhere.

Gradients are summed by hand rather than by wrapping the models in DDP: the trainers call submodules directly
(`value_model.base_model`, `score`, the shared value head), PPO-ptx runs a second forward of the policy, and
micro-batches accumulate, all of which DDP's forward-hook bookkeeping would have to be told about. One all-reduce
of one flat buffer per optimizer step is what DDP does (with overlap) for a single bucket.

In one process every function here returns at once: no copies, no collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.tensor import DTensor

from agents.sampler import Rollout


def rank_rows(n: int, state: PartialState) -> slice:
    """This process's share of n rows: [r*n/N, (r+1)*n/N) for process r of N. ValueError unless N divides n."""
    if n % state.num_processes:
        raise ValueError(f"{n} rows do not split evenly over {state.num_processes} processes")
    share = n // state.num_processes
    return slice(state.process_index * share, (state.process_index + 1) * share)


def rollout_uniforms(generator: torch.Generator, rows: int, steps: int) -> torch.Tensor:
    """(rows, steps) U[0, 1) numbers for `rollout(uniforms=...)`, drawn as the sampler itself draws them from
    `generator` (step by step, one per row): in one process a rollout given these samples exactly what
    `rollout(generator=generator)` samples, and a process that keeps only its rows samples them as one process does."""
    return torch.rand(steps, rows, generator=generator).T  # (rows, steps)


def gather_rows(state: PartialState, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's rows from every process, concatenated in process order: process r's rows are global rows
    [r*n, (r+1)*n) for n rows per process, as `rank_rows` assigns them. The results are on `state.device` (NCCL
    gathers device tensors only). Every process must call this with tensors of the same shapes and dtypes."""
    if state.num_processes == 1:
        return list(tensors)
    out = []
    for t in tensors:
        t = t.to(state.device).contiguous()
        wire = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo has no bool all-gather
        parts = [torch.empty_like(wire) for _ in range(state.num_processes)]
        dist.all_gather(parts, wire)
        out.append(torch.cat(parts).to(t.dtype))
    return out


def gather_rollout(state: PartialState, batch: Rollout) -> Rollout:
    """The global batch from every process's `Rollout` (rows in process order, texts included)."""
    if state.num_processes == 1:
        return batch
    if batch.messages is not None:
        raise ValueError("multi-turn episodes run in one process for now: their streams' lengths differ per process")
    fields = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "agent_mask", "logprobs", "rewards",
              "scores", "terminated")
    tensors = gather_rows(state, *(getattr(batch, f) for f in fields))
    texts = [None] * state.num_processes
    dist.all_gather_object(texts, (batch.prompts, batch.responses))
    prompts, responses = ([s for part in texts for s in part[i]] for i in (0, 1))
    return Rollout(**dict(zip(fields, tensors)), prompts=prompts, responses=responses)


def sum_gradients(state: PartialState, params: list[torch.nn.Parameter]) -> None:
    """Replace every replicated parameter's gradient by its sum over the processes (one all-reduce of one flat
    buffer); a sharded one's the engine has summed already.
    With each process's loss divided by the global minibatch's token count, the sum is the global gradient, the
    same on every process. A parameter without a gradient on some process must have none on all."""
    if state.num_processes == 1:
        return
    # a sharded parameter's gradient was reduce-scattered (summed) by FSDP2 in the backward (agents/sharding.py)
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_processes(state: PartialState, x: torch.Tensor) -> torch.Tensor:
    """x summed over the processes (a copy; x itself in one process)."""
    if state.num_processes == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def process_device(device: str | None, state: PartialState) -> torch.device:
    """The device this process computes on: `device`, or by default the state's (cuda:<local rank> under a multi-GPU
    launch, cuda in one process when there is one, else cpu). Under several processes a `device` other than the
    state's is refused: every process would use that one device (any "cpu" is the CPU processes' own)."""
    if device is None:
        return state.device
    requested = torch.device(device)
    if requested.type == "cpu" and state.device.type == "cpu":
        return state.device
    if state.num_processes > 1 and requested != state.device:
        raise ValueError(f"device={device!r} under {state.num_processes} processes: leave it unset (this process's "
                         f"device is {state.device})")
    return requested
