"""Stage 2 of the InstructGPT recipe: supervised fine-tuning (SFT) on (prompt, response) demonstrations.

The loss is next-token cross-entropy on the response tokens only (Ouyang et al. 2022): prompt and response are
tokenized separately (the prompt exactly as the RL environment tokenizes it: no special tokens, long prompts
keep their end), their ids concatenated, EOS appended to the response as a trained target -- the policy must learn
to stop -- and labels are -100 on the prompt and the padding. An instruct checkpoint (a tokenizer with its own chat
template) sees each prompt as the env shows it, a user message through the template (`--prompt-format`), and learns
to end with the template's end-of-turn token instead.

Multi-turn: a conversation (a multi-turn env id's expert demonstrations, or a user's `--messages-column`) is
encoded as the env streams it (`textenv.chat.ChatFormat.stream`: the opening and each env reply through the chat
template, each assistant turn's tokens and its end-of-turn token), the loss on the assistant's tokens only.

    python -m agents.sft --model runs/pretrain/model --out-dir runs/sft                 # embedded sentiment task
    python -m agents.sft --model gpt2-folder --data demos.jsonl --out-dir runs/sft-mine  # a user's demonstrations
    python -m agents.sft --model runs/pretrain/model --task textenv/Calculator-v0      # a multi-turn env's expert
    python -m agents.sft --model runs/pretrain/model --data chats.jsonl --messages-column messages  # transcripts
    torchrun --nproc_per_node 2 -m agents.sft --model runs/pretrain/model --out-dir runs/sft  # data-parallel (DDP)

Under N processes each takes every N-th demonstration of the global batch, and the loss is normalised by the
global count of response tokens, so N processes compute the same update as one (up to float rounding).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from agents.core import IGNORE, sft_loss
from agents.data import batch_indices, collate, encode_conversation, encode_pairs, load_pairs
from agents.episodes import is_multi_turn, turn_demonstrations
from agents.lora import LoRAConfig, with_lora
from agents.run import (
    RunLogger,
    adamw,
    cli,
    cosine_schedule,
    finish_run,
    load_checkpoint,
    multi_cpu,
    run_config,
    save_checkpoint,
    seed_everything,
    start_run,
)
from agents.sharding import check_parallel, is_sharded, pad_share, prepare_model
from textenv.chat import ChatFormat, check_prompt_format
from textenv.models import bf16_is_fast, load_causal_lm
from textenv.records import load_conversations
from textenv.tasks.base import POOL_SIZES
from textenv.tokenizer import load_tokenizer

VALID_EVERY_NTH_RECORD = 20  # a user's file: 5% held out for validation


@dataclass
class SFTConfig:
    out_dir: str = "runs/default/sft"
    """Run folder: config, metrics.jsonl, tb/, checkpoint/, and the final model/ (model + tokenizer)."""
    model: str = "runs/default/pretrain/model"
    """The causal LM to fine-tune: the pretrain stage's model folder, any local HF folder or a hub id. Its
    tokenizer is loaded from the same place and needs distinct PAD and EOS tokens."""
    task: str = "sentiment"
    """Embedded task whose demonstrations to learn (sentiment, arithmetic, commongen), or a multi-turn env id
    (textenv/Calculator-v0, a user's 'module:Id') whose turn logic writes expert conversations; ignored when `data`
    is set."""
    data: str | None = None
    """A .jsonl/.csv/.parquet file or datasets hub id of demonstrations (instead of `task`); 5% is held out."""
    prompt_column: str = "prompt"
    """Column of `data` holding the prompts."""
    response_column: str = "response"
    """Column of `data` holding the responses."""
    messages_column: str | None = None
    """Train on conversations instead: the column of `data` whose every record is a list of {"role", "content"}
    messages, rendered through the model's tokenizer's chat template as a multi-turn env streams them, the loss on
    the assistant's tokens only."""
    prompt_format: str = "auto"
    """How a demonstration's str prompt reaches the model, as the RL env shows it: "chat" (a user message through the
    tokenizer's chat template, the response closed by its end-of-turn token), "text" (as it is, closed by EOS), or
    "auto" ("chat" for an instruct checkpoint: a chat template other than textenv's embedded one)."""
    max_prompt_tokens: int | None = None
    """Longer prompts keep their last tokens (the end is what the response continues). Default: 64, grown to the
    longest rendering when an instruct template wraps the prompts (the RL env's default rule)."""
    max_response_tokens: int = 64
    """Responses are cut to this many tokens, EOS included (a cut response loses its EOS: it did not end there)."""
    batch_size: int = 16
    """Demonstrations per optimizer step, over all processes."""
    epochs: float = 1.0
    """Passes over the demonstrations (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides `epochs`."""
    lr: float = 3e-4
    """Peak AdamW learning rate (betas 0.9, 0.95)."""
    weight_decay: float = 0.0
    """AdamW weight decay on 2-D parameters."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at min_lr_ratio * lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this."""
    bf16: bool = field(default_factory=bf16_is_fast)
    """Forward passes under bfloat16 autocast (weights and optimizer state stay fp32). Default: on where it is faster
    than fp32 (a CUDA GPU with bf16, a CPU with AMX; `textenv.models.bf16_is_fast`), off elsewhere."""
    log_every: int = 10
    """Log the training loss, lr and tokens/s every this many steps."""
    eval_every: int = 50
    """Validation loss every this many steps (and always at the end, on the whole valid split)."""
    eval_batches: int = 8
    """Validation batches per periodic evaluation."""
    save_every: int = 100
    """Checkpoint every this many steps; a rerun with the same config resumes from the last one."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapter (--lora.rank 8, ...): train an adapter instead of every weight; rank 0 (the default) trains all."""
    parallel: str = "ddp"
    """Under several processes: "ddp" replicates the model and averages gradients; "fsdp" shards every weight,
    gradient and optimizer state over the processes (PyTorch FSDP2, one unit per transformer block;
    agents/sharding.py). One process: the plain model either way."""
    seed: int = 0
    """Seed for the data order."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        check_prompt_format(self.prompt_format)
        check_parallel(self.parallel, self.lora.rank)
        if (self.max_prompt_tokens is not None and self.max_prompt_tokens < 1) or self.max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")
        if self.data is None:
            is_multi_turn(self.task)  # ValueError naming the unknown task and the known ones


def hold_out(records: list) -> tuple[list, list]:
    """(train, valid) of a user's records: every 20th held out for validation."""
    return ([r for i, r in enumerate(records) if i % VALID_EVERY_NTH_RECORD != 0],
            [r for i, r in enumerate(records) if i % VALID_EVERY_NTH_RECORD == 0])


def load_examples(cfg: SFTConfig, tokenizer) -> tuple[list, list]:
    """(train, valid) examples, each (ids, labels) with labels IGNORE where no loss reads: the task's own splits,
    or a user's records with every 20th held out. A multi-turn env id's are its expert conversations as the env's
    token stream, the loss on the agent's (assistant) tokens only."""
    if cfg.data is None and is_multi_turn(cfg.task):
        return tuple(turn_demonstrations(cfg.task, tokenizer, split, POOL_SIZES[split]) for split in ("train", "valid"))
    if cfg.data is not None and cfg.messages_column is not None:
        chat = ChatFormat(tokenizer)
        examples = [encode_conversation(chat, m) for m in load_conversations(cfg.data, cfg.messages_column)]
        if len(examples) < 2:
            raise ValueError(f"{cfg.data} has {len(examples)} conversation(s); need at least 2 (train and valid)")
        return hold_out(examples)
    if cfg.data is None:
        from textenv.tasks import get_task

        task = get_task(cfg.task)
        train, valid = task.demonstrations("train"), task.demonstrations("valid")
    else:
        pairs = load_pairs(cfg.data, cfg.prompt_column, cfg.response_column)
        if len(pairs) < 2:
            raise ValueError(f"{cfg.data} has {len(pairs)} demonstration(s); need at least 2 (train and valid)")
        train, valid = hold_out(pairs)
    return tuple(encode_pairs(tokenizer, ds, cfg.max_prompt_tokens, cfg.max_response_tokens, cfg.prompt_format)
                 for ds in (train, valid))


@torch.no_grad()
def evaluate(model, examples: list, batch_size: int, pad_token_id: int, accelerator: Accelerator, bf16: bool) -> float:
    """Mean loss per response token over `examples`; each process takes every num_processes-th example.
    The unwrapped model: the processes may run different numbers of batches, which DDP's forward must not see; a
    sharded model's forward is a collective, so there every process runs as many, blank rows (no targets) filling
    the short ones."""
    model = accelerator.unwrap_model(model)
    model.eval()
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    if is_sharded(model):
        blank = (examples[0][0], [IGNORE] * len(examples[0][1]))
        mine = pad_share(mine, len(examples), accelerator.num_processes, batch_size, blank)
    total = torch.zeros(2, device=accelerator.device)  # (sum of token losses, token count)
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(mine[i : i + batch_size], pad_token_id).items()}
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
        total[0] += sft_loss(logits, batch["labels"], reduction="sum")
        total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item()


def sft(cfg: SFTConfig) -> Path:
    """Run (or resume, or skip if already complete) stage 2; return the final model folder out_dir/model."""
    out_dir, complete = start_run(cfg, "sft")
    if complete:
        return out_dir / "model"
    t_start = time.time()
    accelerator = Accelerator(cpu=multi_cpu())
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {accelerator.num_processes} processes")
    # The same seed on every process: nothing here is random per process (dropout is off; the batch at a step is a
    # function of (seed, step)), and every process must hold the same model.
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(cfg.model)  # checks PAD and EOS exist and differ
    train, valid = load_examples(cfg, tokenizer)
    if len(train) < cfg.batch_size:
        raise ValueError(f"only {len(train)} training demonstrations, fewer than batch_size={cfg.batch_size}")
    max_steps = cfg.max_steps or max(1, round(cfg.epochs * (len(train) // cfg.batch_size)))

    model = with_lora(load_causal_lm(cfg.model), cfg.lora, "CAUSAL_LM")  # dropout off; rank 0: the model itself
    model = prepare_model(accelerator, model, cfg.parallel)  # DDP, or FSDP2 shards (agents/sharding.py)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, fused=accelerator.device.type in ("cpu", "cuda"))
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    optimizer = accelerator.prepare(optimizer)  # the scheduler stays ours (see pretrain.py)

    resumed = load_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler)
    start = resumed["step"] if resumed else 0
    elapsed_before = resumed["elapsed_s"] if resumed else 0.0
    logger = RunLogger(out_dir, resume_step=start if resumed else None)
    if accelerator.is_main_process:
        print(f"sft: {len(train)} train / {len(valid)} valid demonstrations, {max_steps} steps, on {accelerator.device}"
              + (f", resuming at step {start}" if resumed else ""))

    model.train()
    valid_loss = math.nan
    # the train/loss window since the last log, kept in the checkpoint so that a resumed run logs what an
    # uninterrupted one does (a checkpoint written before it was kept restarts the window)
    window, n_loss = resumed.get("loss_window", [0.0, 0]) if resumed else [0.0, 0]
    loss_sum = torch.tensor(window, device=accelerator.device)
    # non-pad tokens this process trained on since t_timed (evaluation and saving excluded), summed over processes
    # when logged
    t_timed, n_tokens = time.time(), torch.zeros((), dtype=torch.long, device=accelerator.device)
    pbar = tqdm(total=max_steps, initial=start, desc="sft", disable=not accelerator.is_main_process)
    for step in range(start, max_steps):
        idx = batch_indices(len(train), cfg.batch_size, step, cfg.seed)
        idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share of the batch
        batch = {k: v.to(accelerator.device)
                 for k, v in collate([train[i] for i in idx], tokenizer.pad_token_id).items()}
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=cfg.bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
        # Sum over this process's response tokens / the count over all processes' (x num_processes, as DDP averages
        # the gradients): the mean over the global batch's tokens, as in one process, however the tokens fall on
        # the processes (a mean per process would weigh a process's tokens by 1 / its count; see
        # https://huggingface.co/blog/gradient_accumulation for the same issue with gradient accumulation).
        n_targets = accelerator.reduce((batch["labels"][:, 1:] != IGNORE).sum(), reduction="sum")
        loss = sft_loss(logits, batch["labels"], reduction="sum") * accelerator.num_processes / n_targets
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, n_loss = loss_sum + loss.detach(), n_loss + 1
        n_tokens += batch["attention_mask"].sum()
        done = step + 1
        pbar.update(1)

        last = done == max_steps
        if done % cfg.log_every == 0 or last:
            train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / n_loss
            tokens_per_s = accelerator.reduce(n_tokens, reduction="sum").item() / (time.time() - t_timed)
            logger.log(done, {"train/loss": train_loss, "charts/lr": scheduler.get_last_lr()[0],
                              "charts/tokens_per_s": tokens_per_s})
            pbar.set_postfix(loss=f"{train_loss:.3f}")
            loss_sum, n_loss = torch.zeros_like(loss_sum), 0
            t_timed, n_tokens = time.time(), torch.zeros_like(n_tokens)
        if done % cfg.eval_every == 0 or last:
            subset = valid if last else valid[: cfg.eval_batches * cfg.batch_size]
            valid_loss = evaluate(model, subset, cfg.batch_size, tokenizer.pad_token_id, accelerator, cfg.bf16)
            logger.log(done, {"valid/loss": valid_loss, "valid/perplexity": math.exp(valid_loss)})
            t_timed, n_tokens = time.time(), torch.zeros_like(n_tokens)
        if done % cfg.save_every == 0 and not last:
            ckpt = {"step": done, "config": run_config(cfg), "elapsed_s": elapsed_before + time.time() - t_start,
                    "loss_window": [accelerator.reduce(loss_sum, reduction="mean").item(), n_loss]}
            save_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler, ckpt)
            t_timed, n_tokens = time.time(), torch.zeros_like(n_tokens)
    pbar.close()
    logger.close()

    return finish_run(out_dir, model, tokenizer, {
        "stage": "sft",
        "wall_time_s": elapsed_before + time.time() - t_start,
        "steps": max_steps,
        "train_demonstrations": len(train),
        "valid_loss": valid_loss,
        "valid_perplexity": math.exp(valid_loss),
    }, merge=cfg.lora.merge)


if __name__ == "__main__":
    sft(cli(SFTConfig))
