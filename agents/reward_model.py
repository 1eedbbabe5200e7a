"""Stage 3 of the InstructGPT recipe: a reward model learned from ranked comparisons.

A transformer with a scalar head (`AutoModelForSequenceClassification`, num_labels=1) reads
`rewards.hf.reward_model_text(prompt, response)` and returns its score at the last non-PAD token. Following
InstructGPT (arXiv 2203.02155, section 3.5), each of a prompt's K ranked responses is forwarded once and all
C(K, 2) pairs are formed from those K scores, as ONE batch element (training on the pairs as separate examples
overfits, since each response then appears in K - 1 gradient updates):

    loss = -1 / C(K, 2) * E_(x, y_w, y_l) [log sigmoid(r(x, y_w) - r(x, y_l))]

After training the scores are shifted (and with normalize_std scaled) so that reference responses (a sample of
the comparisons' responses: the SFT policy's samples) score mean 0 (std 1), and that affine map is folded into
the weights: the saved folder, loaded with plain `AutoModelForSequenceClassification.from_pretrained`, already
gives normalised scores and plugs into any env as `reward_fn="runs/rm/model"`.

    python -m agents.reward_model --data runs/comparisons --model runs/sft/model --out-dir runs/rm
    torchrun --nproc_per_node 2 -m agents.reward_model --data runs/comparisons --model runs/sft/model --out-dir runs/rm

Under N processes (data-parallel, DDP) each takes every N-th prompt of the global batch with all of its responses;
every process has batch_size / N prompts and the loss is a mean over prompts, so DDP's mean of the processes'
losses is the global batch's and N processes compute the same update as one. Held-out evaluation and the
normalisation's reference scores are split the same way and added up; the fresh-sample evaluation and every write
happen on the main process.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, reduce
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from agents.core import ranking_loss, ranking_pairs
from agents.data import batch_indices
from agents.episodes import episode_prompts
from agents.label_store import agreement
from agents.lora import LoRAConfig, is_adapted, merged_copy, with_lora
from agents.preferences import load_preferences, sample_responses
from agents.run import (
    RunLogger,
    adamw,
    cli,
    cosine_schedule,
    distributed_state,
    finish_run,
    load_checkpoint,
    multi_cpu,
    run_config,
    save_checkpoint,
    seed_everything,
    start_run,
)
from rewards.hf import SequenceClassifierReward, reward_model_text, reward_shift
from textenv.chat import check_prompt_format
from textenv.models import bf16_is_fast, disable_dropout, load_sequence_classifier
from textenv.models.loading import is_adapter_folder
from textenv.models.tokens import pad_rows, position_ids_from_mask
from textenv.prompts import render_unrendered
from textenv.tokenizer import load_tokenizer


@dataclass
class RMConfig:
    out_dir: str = "runs/default/rm"
    """Run folder: config, metrics.jsonl, tb/, checkpoint/, summary.json and the final model/ (model + tokenizer)."""
    data: str | list[str] = "runs/default/comparisons"
    """Comparisons: a collect_comparisons run folder, a save_to_disk folder, a .jsonl/.csv/.parquet file or a hub
    id, in any layout `agents.preferences.load_preferences` reads; several (`--data A B`) train on all their rows:
    e.g. people's rankings from `textenv label` (RUN/labels/rankings.jsonl) beside the simulated annotator's."""
    model: str = "runs/default/sft/model"
    """Initialisation: the SFT folder, or any HF model id/folder (a fresh scalar head is put on top)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (needs distinct PAD and EOS). Default: `model`'s."""
    prompt_format: str = "auto"
    """How a comparison's prompt is read, as the env shows it to the policy: "chat" (a plain prompt as a user message
    through the tokenizer's chat template), "text" (as it is), or "auto" ("chat" for an instruct checkpoint's
    tokenizer: a chat template other than textenv's embedded one). A prompt rendered already (textenv's own
    comparisons) is kept as it is."""
    task: str | None = "sentiment"
    """Task whose valid prompts and gold score evaluate the RM on fresh policy samples (Spearman); None: skip."""
    policy: str | None = None
    """Causal LM that draws those fresh samples. Default: `model` (the SFT policy the RM starts from)."""
    n_eval_samples: int = 256
    """Fresh samples (one per valid prompt) for the Spearman correlation with the gold."""
    eval_fraction: float = 0.1
    """Fraction of the prompts held out to measure pairwise accuracy."""
    epochs: int = 1
    """Passes over the training comparisons (InstructGPT: 1; more overfits)."""
    batch_size: int = 16
    """Prompts per optimizer step over all processes, each with all of its responses and pairs."""
    lr: float = 1e-3
    """Peak AdamW learning rate (betas 0.9, 0.95)."""
    weight_decay: float = 0.0
    """AdamW weight decay on 2-D parameters."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at min_lr_ratio * lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this."""
    bf16: bool = field(default_factory=bf16_is_fast)
    """Training forward passes under bfloat16 autocast (weights and optimizer state stay fp32). Default: on where it
    is faster than fp32 (a CUDA GPU with bf16, a CPU with AMX; `textenv.models.bf16_is_fast`), off elsewhere.
    Scoring for the normalisation and the evaluations is always fp32."""
    max_length: int | None = None
    """Keep the last max_length tokens of an input. Default: the model's context length."""
    normalize_std: bool = False
    """Also scale the scores to std 1 on the reference responses (the shift to mean 0 is always applied)."""
    n_reference: int = 2048
    """Reference responses for the normalisation: a seeded sample of all the comparisons' responses."""
    score_batch_size: int = 128
    """Sequences per forward when scoring without gradients (normalisation, evaluation)."""
    log_every: int = 10
    """Log training loss, pairwise accuracy and lr every this many steps."""
    eval_every: int = 100
    """Held-out loss and accuracy every this many steps (and at the end)."""
    save_every: int = 100
    """Checkpoint every this many steps; a rerun with the same config resumes from the last one."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapter on the reward model's trunk (its score head trains in full); rank 0 (the default) trains all."""
    seed: int = 0
    """Seed for the head's initialisation, the held-out split, the data order and the fresh samples."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        check_prompt_format(self.prompt_format)
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("epochs", "batch_size", "score_batch_size", "n_eval_samples", "n_reference"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")



def shown_rows(rows: list[dict], tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> list[dict]:
    """The comparison rows with each prompt as the env shows it to the policy, what the RM reads in the RL stages:
    an instruct checkpoint's template wraps a plain prompt and keeps a rendered one (textenv's own comparisons), per
    `prompt_format` (`textenv.prompts.render_unrendered`). New dicts: the rows given are left as they are."""
    prompts = sorted({row["prompt"] for row in rows})
    shown = dict(zip(prompts, render_unrendered(prompts, tokenizer, prompt_format)[0]))
    return [{**row, "prompt": shown[row["prompt"]]} for row in rows]


def encode(tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str],
           max_length: int) -> list[list[int]]:
    """Token ids of the RM inputs, as `rewards.hf.SequenceClassifierReward` makes them: the last max_length kept."""
    ids = tokenizer([reward_model_text(p, r) for p, r in zip(prompts, responses)])["input_ids"]
    return [row[-max_length:] for row in ids]


def forward_scores(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, side: str = "right") -> torch.Tensor:
    """(B,) float32 scores. The model reads its score at the last non-PAD token (GPT-2 style). Under left padding
    the position ids must skip the padding, so they are passed (the model must take `position_ids`)."""
    device = next(model.parameters()).device
    kwargs = {"position_ids": position_ids_from_mask(mask).to(device)} if side == "left" else {}
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits[:, 0].float()


@torch.no_grad()
def score_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str],
                *, batch_size: int = 64, max_length: int | None = None, side: str = "right") -> torch.Tensor:
    """(N,) scores of (prompt, response) pairs, in eval mode (restored afterwards)."""
    max_length = max_length or model.config.max_position_embeddings
    rows = encode(tokenizer, prompts, responses, max_length)
    was_training = model.training
    model.eval()
    out = [forward_scores(model, *pad_rows(rows[i : i + batch_size], tokenizer.pad_token_id, side), side).cpu()
           for i in range(0, len(rows), batch_size)]
    model.train(was_training)
    return torch.cat(out)


# Models whose score head has no bias: the LayerNorm that feeds the head directly, whose bias can carry the shift.
# (The Llama family's RMSNorm has no bias: its shift is kept in the config, see `fold_normalization`.)
FINAL_LAYER_NORM = {"gpt2": "transformer.ln_f", "gpt_neo": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def score_head(model: PreTrainedModel) -> torch.nn.Linear:
    """The single-output Linear that makes the score (GPT-2/Llama `score`, BERT `classifier`, RoBERTa
    `classifier.out_proj`): the last one registered."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not heads:
        raise ValueError(f"{type(model).__name__} ({model.config.model_type}) has no single-output Linear score head")
    return heads[-1]


@torch.no_grad()
def fold_normalization(model: PreTrainedModel, mean: float, std: float = 1.0) -> None:
    """Edit `model` IN PLACE so that it scores (r - mean) / std, where r is its current score.

    The gain 1/std multiplies the head (weight and bias). The shift goes into the head's bias if it has one; else
    into the bias of the final LayerNorm h = LN(x) that feeds the head (GPT-2, GPT-Neo, GPT-NeoX): adding
    delta * w / ||w||^2 to it adds exactly delta to w.h. Either way plain transformers scores the normalised reward.
    A model with neither (the Llama family: a bias-free head after an RMSNorm) keeps the shift in its config, as
    `reward_shift`, which textenv's reward adapter adds (`rewards.hf.reward_shift`); plain transformers reads its
    score without it.
    """
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    head, delta = score_head(model), -mean / std
    head.weight.mul_(1 / std)
    if head.bias is not None:
        head.bias.mul_(1 / std).add_(delta)
    elif model.config.model_type in FINAL_LAYER_NORM:
        norm = model.get_submodule(FINAL_LAYER_NORM[model.config.model_type])
        w = head.weight[0]  # (H,)
        norm.bias.add_(delta * w / w.dot(w))
    else:  # score = gain * r + shift: the old shift is scaled with the rest
        model.config.reward_shift = reward_shift(model.config) / std + delta


@torch.no_grad()
def evaluate_pairs(model, tokenizer, rows: list[dict], batch_size: int, max_length: int) -> dict[str, float]:
    """Held-out ranking loss and pairwise accuracy; with gold scores, the annotator ceiling: how often the gold
    itself orders the pairs as the (noisy) labels do. Ties count 1/2 in both.

    Every process calls it (with the unwrapped model): each scores every num_processes-th row, and the sums
    (per-prompt losses, prompts, correct pairs, pairs, gold-agreeing pairs) are added up over the processes."""
    state = distributed_state()
    mine = rows[state.process_index :: state.num_processes]
    with_gold = all("gold" in row for row in rows)
    sums = torch.zeros(5, dtype=torch.float64)
    if mine:  # fewer rows than processes leaves some with none
        prompts = [row["prompt"] for row in mine for _ in row["responses"]]
        scores = score_texts(model, tokenizer, prompts, [r for row in mine for r in row["responses"]],
                             batch_size=batch_size, max_length=max_length)  # (N,)
        winners, losers, prompt = ranking_pairs([row["ranking"] for row in mine], [row.get("tiers") for row in mine])
        diff = scores[winners] - scores[losers]  # (P,)
        sums[0] = ranking_loss(scores, winners, losers, prompt).item() * len(mine)  # a mean over prompts
        sums[1], sums[3] = len(mine), len(diff)
        sums[2] = ((diff > 0).double() + 0.5 * (diff == 0).double()).sum()
        if with_gold:
            gold = torch.tensor([g for row in mine for g in row["gold"]])
            gold_diff = gold[winners] - gold[losers]
            sums[4] = ((gold_diff > 0).double() + 0.5 * (gold_diff == 0).double()).sum()
    loss, n_prompts, correct, pairs, agree = reduce(sums.to(state.device), reduction="sum").tolist()
    out = {"loss": loss / n_prompts, "accuracy": correct / pairs, "pairs": int(pairs)}
    if with_gold:
        out["ceiling"] = agree / pairs
    return out


def fresh_sample_eval(rm: PreTrainedModel, rm_tokenizer, policy_path: str, task_name: str, n: int, seed: int,
                      batch_size: int) -> dict[str, float]:
    """Spearman correlation of the RM with the gold on fresh policy samples of the task's valid prompts, and the
    RM's mean and std there (about 0 and 1 after normalisation when the policy is the SFT policy)."""
    from scipy.stats import spearmanr

    samples = sample_responses(policy_path, task_name, episode_prompts(task_name, "valid", n, seed), 1,
                               batch_size, 1.0, seed)
    seen, responses, gold = ([s[0] for s in samples], [s[1][0] for s in samples], [s[2][0] for s in samples])
    rm_scores = SequenceClassifierReward(rm, rm_tokenizer, batch_size=batch_size)(seen, responses)
    # a rank correlation with a constant is undefined (a weak policy that solves no arithmetic prompt): NaN, said
    # plainly rather than through scipy's ConstantInputWarning
    constant = np.ptp(rm_scores) == 0 or np.ptp(gold) == 0
    spearman = math.nan if constant else float(spearmanr(rm_scores, gold).statistic)
    return {"spearman": spearman, "rm_mean": float(np.mean(rm_scores)),
            "rm_std": float(np.std(rm_scores)), "gold_mean": float(np.mean(gold)), "samples": n}


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by prompt, so that no held-out prompt is trained on; seeded."""
    prompts = sorted({row["prompt"] for row in rows})
    n_eval = max(1, round(eval_fraction * len(prompts)))
    if n_eval >= len(prompts):
        raise ValueError(f"only {len(prompts)} distinct prompts: too few to hold out {eval_fraction:.0%} of them")
    held_out = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:n_eval]}
    return [r for r in rows if r["prompt"] not in held_out], [r for r in rows if r["prompt"] in held_out]


def load_rm_init(name_or_path: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """`name_or_path` with a scalar head (a fresh one unless it already is a 1-label classifier), dropout off. A
    PEFT adapter folder (a LoRA SFT run's model/) is its base with the adapter merged in."""
    if is_adapter_folder(name_or_path):
        model = load_sequence_classifier(name_or_path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return disable_dropout(model)


def train_reward_model(cfg: RMConfig) -> Path:
    """Train (or resume, or skip if complete) the RM, normalise it, evaluate it; return out_dir/model."""
    out_dir, complete = start_run(cfg, "reward_model")
    if complete:
        return out_dir / "model"
    t_start = time.time()
    accelerator = Accelerator(cpu=multi_cpu())
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {accelerator.num_processes} processes")
    device, is_main = accelerator.device, accelerator.is_main_process
    # The same seed on every process: the fresh head's initialisation must be the same everywhere (DDP also
    # broadcasts rank 0's weights), the split and the data order are functions of the seed, and the one sampling
    # step (the fresh-sample evaluation) runs on the main process only.
    seed_everything(cfg.seed)
    prefs = load_preferences(cfg.data)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    rows = shown_rows(prefs.rows, tokenizer, cfg.prompt_format)  # each prompt as the env shows it to the policy
    train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    model = with_lora(load_rm_init(cfg.model, tokenizer), cfg.lora, "SEQ_CLS")  # rank 0: the model itself
    model.train()
    max_length = cfg.max_length or min(tokenizer.model_max_length, model.config.max_position_embeddings)
    # tokenized once: row b's responses, each a token-id list
    train_ids = [encode(tokenizer, [row["prompt"]] * len(row["responses"]), row["responses"], max_length)
                 for row in train_rows]
    max_steps = cfg.epochs * (len(train_rows) // cfg.batch_size)
    if max_steps < 1:
        raise ValueError(f"only {len(train_rows)} training prompts, fewer than batch_size={cfg.batch_size}")
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, fused=device.type in ("cpu", "cuda"))
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler stays ours (see pretrain.py)
    resumed = load_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler)
    start = resumed["step"] if resumed else 0
    train_time = resumed["train_time_s"] if resumed else 0.0  # of the runs this one resumes
    logger = RunLogger(out_dir, resume_step=start if resumed else None)
    if is_main:
        print(f"reward model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"{len(train_rows)} train / "
              f"{len(eval_rows)} held-out prompts ({prefs.layout} layout, {sum(prefs.skipped.values())} rows skipped), "
              f"{max_steps} steps on {device}, {accelerator.num_processes} process(es)"
              + (f", resuming at step {start}" if resumed else ""))

    # (loss, correct pairs, pairs) of this process summed over the n_sums steps since the last log, kept in the
    # checkpoint (each process restarts from its share of the processes' sum), so a resumed run logs the same
    window, n_sums = resumed.get("log_window", [[0.0] * 3, 0]) if resumed else [[0.0] * 3, 0]
    sums = torch.tensor(window, device=device)
    valid: dict[str, float] = {}
    t_loop, eval_time = time.time(), 0.0  # evaluation time is left out of the training time
    pbar = tqdm(total=max_steps, initial=start, desc="reward model", disable=not is_main)
    for step in range(start, max_steps):
        idx = batch_indices(len(train_rows), cfg.batch_size, step, cfg.seed)
        idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share of the prompts
        ids, mask = pad_rows([seq for b in idx for seq in train_ids[b]], tokenizer.pad_token_id)  # (N, T), N = sum K_b
        winners, losers, prompt = (t.to(device) for t in ranking_pairs([train_rows[b]["ranking"] for b in idx],
                                                                            [train_rows[b].get("tiers") for b in idx]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            scores = forward_scores(model, ids, mask)  # (N,) fp32, each response forwarded once
        loss = ranking_loss(scores, winners, losers, prompt)  # mean over this process's prompts
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        correct = (scores[winners] > scores[losers]).sum()
        sums += torch.stack([loss.detach(), correct.float(), torch.tensor(float(len(winners)), device=device)])
        n_sums, done = n_sums + 1, step + 1
        pbar.update(1)
        if done % cfg.log_every == 0 or done == max_steps:
            loss_total, n_correct, n_pairs = reduce(sums, reduction="sum").tolist()  # over the processes
            train_loss, train_acc = loss_total / (n_sums * accelerator.num_processes), n_correct / n_pairs
            logger.log(done, {"train/loss": train_loss, "train/accuracy": train_acc,
                              "charts/lr": scheduler.get_last_lr()[0]})
            pbar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.3f}")
            sums, n_sums = torch.zeros_like(sums), 0
        if done % cfg.eval_every == 0 or done == max_steps:
            t_eval = time.time()
            valid = evaluate_pairs(accelerator.unwrap_model(model), tokenizer, eval_rows, cfg.score_batch_size,
                                   max_length)
            logger.log(done, {f"valid/{k}": v for k, v in valid.items() if k != "pairs"})
            eval_time += time.time() - t_eval
        if done % cfg.save_every == 0 and done != max_steps:
            save_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler,
                            {"step": done, "config": run_config(cfg),
                             "train_time_s": train_time + time.time() - t_loop - eval_time,
                             "log_window": [(reduce(sums, reduction="sum") / accelerator.num_processes).tolist(),
                                            n_sums]})
    pbar.close()
    logger.close()
    train_time += time.time() - t_loop - eval_time
    model = accelerator.unwrap_model(model)
    # a LoRA RM is merged before its normalisation is folded in: model/ is the plain, normalised model the RL stages
    # read, adapter/ the trained adapter (its base's head unnormalised)
    adapter = model if is_adapted(model) else None
    if adapter is not None:
        model = merged_copy(adapter)

    # Normalise on reference responses: the SFT samples the comparisons were made of. Each process scores every
    # num_processes-th of them; all processes get all the scores (in process order: the same everywhere).
    pairs = [(row["prompt"], r) for row in rows for r in row["responses"]]
    pick = np.random.default_rng(cfg.seed).permutation(len(pairs))[: cfg.n_reference]
    mine = pick[accelerator.process_index :: accelerator.num_processes]
    scores = score_texts(model, tokenizer, [pairs[i][0] for i in mine], [pairs[i][1] for i in mine],
                         batch_size=cfg.score_batch_size, max_length=max_length).tolist() if len(mine) else []
    reference = torch.tensor(gather_object(scores))  # (n_reference,)
    mean, std = reference.mean().item(), reference.std().item()
    fold_normalization(model, mean, std if cfg.normalize_std else 1.0)  # everywhere: the processes stay identical
    summary = {}
    if is_main:  # the fresh-sample evaluation samples on the main process; the others wait for it in finish_run
        summary = {
            "stage": "reward_model", "layout": prefs.layout, "source_rows": prefs.n_source_rows,
            "skipped_rows": sum(prefs.skipped.values()), "skipped_by_reason": prefs.skipped,
            "train_prompts": len(train_rows), "heldout_prompts": len(eval_rows), "heldout_pairs": valid["pairs"],
            "steps": max_steps, "train_time_s": train_time, "heldout_loss": valid["loss"],
            # annotator_ceiling None: no gold in the data
            "heldout_accuracy": valid["accuracy"], "annotator_ceiling": valid.get("ceiling"),
            "accuracy_over_ceiling": valid["accuracy"] / valid["ceiling"] if "ceiling" in valid else None,
            "normalization": {"mean": mean, "std": std, "gain_applied": cfg.normalize_std, "reference": len(pick)},
        }
        people = [row for row in prefs.rows if "labeler" in row]  # rankings made on `textenv label`'s page
        if people:  # how far the labelers agree with each other and with the gold: a ceiling for the RM
            summary["labelers"] = agreement(people)
        if cfg.task is not None:
            fresh = fresh_sample_eval(model, tokenizer, cfg.policy or cfg.model, cfg.task, cfg.n_eval_samples, cfg.seed,
                                      cfg.score_batch_size)
            summary.update({f"fresh_{k}": v for k, v in fresh.items()})
        summary.update(wall_time_s=time.time() - t_start)
    final = finish_run(out_dir, model, tokenizer, summary, extra_models={"adapter": adapter} if adapter else None)
    if is_main:
        print(json.dumps({**summary, "model": str(final)}))
    return final


if __name__ == "__main__":
    train_reward_model(cli(RMConfig))
