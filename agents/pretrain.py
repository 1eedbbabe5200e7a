"""Stage 1 of the InstructGPT recipe: pretrain a causal LM on plain text (next-token prediction).

Documents are tokenized, joined with EOS and packed into blocks of seq_len + 1 tokens (x = block[:-1],
y = block[1:], as in nanoGPT); every 100th block is held out for validation. The batch at step s is a pure
function of (seed, s), so a checkpoint needs only the step counter to resume the data stream exactly.

    python -m agents.pretrain --out-dir runs/pretrain            # our GPT-2 "small", on the generated corpus
    accelerate launch -m agents.pretrain --out-dir runs/pretrain  # the same, data-parallel (DDP)
    torchrun --nproc_per_node 2 -m agents.pretrain --out-dir runs/pretrain  # the same

Under N processes each takes every N-th block of the global batch; every block has seq_len targets, so DDP's mean
of the processes' mean losses is the global batch's mean, and N processes compute the same update as one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from agents.data import batch_indices, load_text_source, pack_blocks
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
from agents.sharding import check_parallel, is_sharded, padded_share, prepare_model
from textenv.embedded import default_tokenizer
from textenv.models import ARCHS, PRESETS, bf16_is_fast, build_model, load_causal_lm
from textenv.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class PretrainConfig:
    out_dir: str = "runs/default/pretrain"
    """Run folder: config, metrics.jsonl, tb/, checkpoint/, and the final model/ (model + tokenizer)."""
    preset: str = "small"
    """Model size to build from scratch: one of textenv.models.PRESETS (tiny, small, medium)."""
    arch: str = "gpt2"
    """Architecture to build from scratch: gpt2, or llama (RoPE, RMSNorm, SwiGLU, grouped-query attention: the
    structure of Llama 3.x, Qwen and Mistral) of the same width and depth (textenv.models.ARCHS)."""
    model: str | None = None
    """Hub id or local folder of a causal LM to continue pretraining instead of building `preset`."""
    tokenizer: str | None = None
    """Hub id or folder of a tokenizer (needs distinct PAD and EOS). Default: `model`'s tokenizer if `model` is
    set, else a byte-level BPE (vocab 4096) trained on the data."""
    data: str | None = None
    """A .txt file (documents separated by blank lines), a .jsonl/.csv/.parquet file with a `text` column, or a
    datasets hub id. Default: the embedded generated corpus (~2.4M tokens)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    batch_size: int = 16
    """Sequences per optimizer step, over all processes."""
    max_steps: int = 300
    """Optimizer steps."""
    lr: float = 2e-3
    """Peak AdamW learning rate (betas 0.9, 0.95)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on 2-D parameters (matmuls, embeddings) only; biases and LayerNorms are not decayed."""
    warmup_steps: int = 30
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
    eval_every: int = 100
    """Validation loss/perplexity every this many steps (and always at the end, on the whole valid split)."""
    eval_batches: int = 8
    """Validation batches per periodic evaluation."""
    save_every: int = 100
    """Checkpoint every this many steps; a rerun with the same config resumes from the last one."""
    parallel: str = "ddp"
    """Under several processes: "ddp" replicates the model and averages gradients; "fsdp" shards every weight,
    gradient and optimizer state over the processes (PyTorch FSDP2, one unit per transformer block;
    agents/sharding.py). One process: the plain model either way."""
    seed: int = 0
    """Seed for initialisation and the data order."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        check_parallel(self.parallel)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {list(ARCHS)}")
        if self.model is None and self.seq_len > PRESETS[self.preset]["n_positions"]:
            raise ValueError(f"seq_len={self.seq_len} exceeds the {self.preset} preset's context length")


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, accelerator: Accelerator, bf16: bool) -> float:
    """Mean next-token loss over `blocks`; each process takes every num_processes-th block.
    The unwrapped model: the processes may run different numbers of batches, which DDP's forward must not see; a
    sharded model's forward is a collective, so there every process runs as many, blank blocks (no targets) filling
    the short ones."""
    model = accelerator.unwrap_model(model)
    model.eval()
    mine = blocks[accelerator.process_index :: accelerator.num_processes]  # (n, T + 1)
    targets = mine[:, 1:]  # (n, T)
    if is_sharded(model):  # blank blocks: the first block's tokens, no targets
        blank = padded_share(len(blocks), accelerator.num_processes, batch_size) - len(mine)
        mine = torch.cat([mine, blocks[:1].expand(blank, -1)])
        targets = torch.cat([targets, torch.full((blank, targets.shape[1]), -100, dtype=targets.dtype)])
    total = torch.zeros(2, device=accelerator.device)  # (sum of token losses, token count)
    for i in range(0, len(mine), batch_size):
        block = mine[i : i + batch_size].to(accelerator.device)  # (B, T + 1)
        target = targets[i : i + batch_size].to(accelerator.device)  # (B, T), -100 on blank blocks
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16):
            logits = model(input_ids=block[:, :-1]).logits  # (B, T, V)
        total[0] += F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
        total[1] += (target != -100).sum()
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item()


def _tokenizer(cfg: PretrainConfig, out_dir: Path, docs: list[str], accelerator: Accelerator):
    if cfg.tokenizer is not None or cfg.model is not None:
        return load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.data is None:
        # The embedded corpus gets the embedded tokenizer, so that our policies fit the spaces of the
        # registered envs (gym.make("textenv/PositiveReview-v0")).
        return default_tokenizer()
    path = out_dir / "tokenizer"  # trained once per run folder; a resumed run reloads it
    if accelerator.is_main_process and not path.exists():
        tmp = out_dir / "tokenizer.tmp"
        train_tokenizer(docs, vocab_size=4096).save_pretrained(tmp)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return load_tokenizer(path)


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume, or skip if already complete) stage 1; return the final model folder out_dir/model."""
    out_dir, complete = start_run(cfg, "pretrain")
    if complete:
        return out_dir / "model"
    t_start = time.time()
    accelerator = Accelerator(cpu=multi_cpu())
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {accelerator.num_processes} processes")
    # The same seed on every process: nothing here is random per process (dropout is off; the batch at a step is a
    # function of (seed, step)), and every process must build the same initial model.
    seed_everything(cfg.seed)

    docs = load_text_source(cfg.data)
    tokenizer = _tokenizer(cfg, out_dir, docs, accelerator)
    train_blocks, valid_blocks = pack_blocks(tokenizer, docs, cfg.seq_len)  # (N, T + 1) each
    if len(train_blocks) < cfg.batch_size:
        raise ValueError(f"only {len(train_blocks)} training blocks of {cfg.seq_len + 1} tokens, fewer than "
                         f"batch_size={cfg.batch_size}; give more data or lower seq_len/batch_size")
    if cfg.model is None:
        model = build_model(cfg.preset, tokenizer, seed=cfg.seed, arch=cfg.arch)  # dropout off
    else:
        model = load_causal_lm(cfg.model)  # dropout off
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {cfg.model} only "
                             f"{model.get_input_embeddings().num_embeddings} embeddings")
    model = prepare_model(accelerator, model, cfg.parallel)  # DDP, or FSDP2 shards (agents/sharding.py)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, fused=accelerator.device.type in ("cpu", "cuda"))
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    # the scheduler stays ours: accelerate's wrapper would step it num_processes times per step
    optimizer = accelerator.prepare(optimizer)

    resumed = load_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler)
    start = resumed["step"] if resumed else 0
    elapsed_before = resumed["elapsed_s"] if resumed else 0.0  # wall time of the runs this one resumes
    logger = RunLogger(out_dir, resume_step=start if resumed else None)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if accelerator.is_main_process:
        print(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(train_blocks)} train / "
              f"{len(valid_blocks)} valid blocks of {cfg.seq_len} tokens, on {accelerator.device}"
              + (f", resuming at step {start}" if resumed else ""))

    model.train()
    valid_loss = math.nan
    # the train/loss window since the last log, kept in the checkpoint so that a resumed run logs what an
    # uninterrupted one does (a checkpoint written before it was kept restarts the window)
    window, n_loss = resumed.get("loss_window", [0.0, 0]) if resumed else [0.0, 0]
    loss_sum = torch.tensor(window, device=accelerator.device)
    t_timed, n_timed = time.time(), 0  # training steps since t_timed (evaluation and saving excluded)
    pbar = tqdm(total=cfg.max_steps, initial=start, desc="pretrain", disable=not accelerator.is_main_process)
    for step in range(start, cfg.max_steps):
        idx = batch_indices(len(train_blocks), cfg.batch_size, step, cfg.seed)
        idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share of the batch
        block = train_blocks[idx].to(accelerator.device)  # (B, T + 1)
        x, y = block[:, :-1], block[:, 1:]  # (B, T) each: predict token t + 1 from tokens <= t
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=cfg.bf16):
            logits = model(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, n_loss, n_timed = loss_sum + loss.detach(), n_loss + 1, n_timed + 1
        done = step + 1  # steps completed: what metrics and checkpoints are keyed by
        pbar.update(1)

        last = done == cfg.max_steps
        if done % cfg.log_every == 0 or last:
            train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / n_loss
            tokens_per_s = n_timed * tokens_per_step / (time.time() - t_timed)
            logger.log(done, {"train/loss": train_loss, "charts/lr": scheduler.get_last_lr()[0],
                              "charts/tokens_per_s": tokens_per_s})
            pbar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            loss_sum, n_loss = torch.zeros_like(loss_sum), 0
            t_timed, n_timed = time.time(), 0
        if done % cfg.eval_every == 0 or last:
            subset = valid_blocks if last else valid_blocks[: cfg.eval_batches * cfg.batch_size]
            valid_loss = evaluate(model, subset, cfg.batch_size, accelerator, cfg.bf16)
            logger.log(done, {"valid/loss": valid_loss, "valid/perplexity": math.exp(valid_loss)})
            t_timed, n_timed = time.time(), 0
        if done % cfg.save_every == 0 and not last:
            ckpt = {"step": done, "config": run_config(cfg), "elapsed_s": elapsed_before + time.time() - t_start,
                    "loss_window": [accelerator.reduce(loss_sum, reduction="mean").item(), n_loss]}
            save_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler, ckpt)
            t_timed, n_timed = time.time(), 0
    pbar.close()
    logger.close()

    return finish_run(out_dir, model, tokenizer, {
        "stage": "pretrain",
        "wall_time_s": elapsed_before + time.time() - t_start,
        "steps": cfg.max_steps,
        "tokens_seen": cfg.max_steps * tokens_per_step,
        "valid_loss": valid_loss,
        "valid_perplexity": math.exp(valid_loss),
    })


if __name__ == "__main__":
    pretrain(cli(PretrainConfig))
