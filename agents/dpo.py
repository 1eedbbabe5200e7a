"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290): RLHF without a reward model or PPO.

The KL-regularised RL objective max E[r] - beta KL(pi || pi_ref) has the closed-form optimum
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so r(x, y) = beta log pi(y|x) / pi_ref(y|x) + beta log Z(x) and
the Bradley-Terry likelihood of the stage-3 comparisons becomes a loss on the policy itself (paper eq. 7):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

log pi(y|x) is the sum of the response tokens' log-probs (EOS included), at temperature 1: the objective's KL is
to the model's own distribution, sampling temperature is a choice made later. pi_ref is the frozen SFT policy
(which is also the initialisation); its log-probs are computed once, before training, then the reference is freed.

    python -m agents.dpo --policy runs/default/sft/model --comparisons runs/default/comparisons --out-dir runs/dpo
    torchrun --nproc_per_node 2 -m agents.dpo ...  # data-parallel (DDP)

Under N processes each takes every N-th pair of the global batch; the loss is a mean over pairs, and every process
holds batch_size / N of them, so DDP's average of the gradients is the global batch's: the same steps as one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from agents.core import IGNORE, check_dpo_args, dpo_loss, logprobs_from_logits
from agents.data import batch_indices, encode_pair
from agents.lora import LoRAConfig, with_lora
from agents.preferences import load_preferences
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
from agents.sharding import check_parallel, prepare_model
from textenv.chat import check_prompt_format
from textenv.models import load_causal_lm
from textenv.models.tokens import check_temperature, position_ids_from_mask
from textenv.prompts import fitted_budget, render_unrendered
from textenv.tokenizer import load_tokenizer

PAIRINGS = ("best_vs_worst", "all")


@dataclass
class DPOConfig:
    out_dir: str = "runs/default/dpo"
    """Run folder: config, metrics.jsonl, tb/, checkpoint/, summary.json and the final model/ (model + tokenizer)."""
    policy: str = "runs/default/sft/model"
    """The SFT policy folder: the initialisation AND the frozen reference pi_ref (its tokenizer is loaded too)."""
    comparisons: str = "runs/default/comparisons"
    """Preferences, anything `agents.preferences.load_preferences` reads: a collect run folder, a save_to_disk
    folder, a .jsonl/.csv/.parquet file (ranked, TRL or Anthropic-HH layout) or a hub id."""
    pairs: str = "best_vs_worst"
    """Which pairs a ranking of K responses gives: "best_vs_worst" (one per prompt: the widest, so most reliably
    labelled, gap, and every prompt weighs the same) or "all" (the C(K, 2) pairs as separate examples: more data,
    but each response enters K - 1 updates, which InstructGPT (arXiv 2203.02155, sec. 3.5) found to overfit)."""
    beta: float = 0.1
    """KL strength: the implicit reward is beta * log pi/pi_ref (paper: 0.1; smaller drifts further from pi_ref)."""
    loss_type: str = "sigmoid"
    """"sigmoid": DPO's Bradley-Terry loss; "ipo": (h - 1/(2 beta))^2 (Azar et al. 2023, arXiv 2310.12036), which
    does not push the margin h to infinity on deterministic preferences."""
    label_smoothing: float = 0.0
    """cDPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf): the probability that a label is flipped, in
    [0, 0.5); sigmoid loss only."""
    temperature: float = 1.0
    """Divides the logits of the sequence log-probs. Keep 1: DPO's optimum is stated for the model's own
    distribution; another value trains the tempered distribution instead."""
    prompt_format: str = "auto"
    """How a prompt reaches the policy, as in SFT and the env: "chat" (a user message through its tokenizer's chat
    template, each response closed by the template's end-of-turn token), "text" (as it is, responses closed by EOS),
    or "auto" ("chat" for an instruct checkpoint: a chat template other than textenv's embedded one). A prompt
    rendered already (textenv's own comparisons hold the rendering the env showed) is kept as it is."""
    max_prompt_tokens: int = 64
    """Longer prompts keep their last tokens (as the env tokenizes them); a budget a chat template's rendering
    would exceed grows to fit it, so that truncation never cuts the template's own tokens (a system prompt)."""
    max_response_tokens: int = 64
    """Responses are cut to this many tokens, EOS included (a cut response loses its EOS, as in SFT)."""
    batch_size: int = 16
    """Preference pairs per optimizer step, over all processes."""
    epochs: float = 1.0
    """Passes over the pairs (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides `epochs`."""
    lr: float = 1e-5
    """Peak AdamW learning rate (betas 0.9, 0.95); DPO wants a small one (paper: 1e-6, batch 64). Untuned here."""
    warmup_steps: int = 10
    """Linear warmup steps, then constant (the paper's schedule)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this."""
    bf16: bool = False
    """Forward passes under bfloat16 autocast (the reference's too); fp32 by default: log-prob differences are small."""
    log_every: int = 10
    """Log the loss, implicit rewards, lr and tokens/s (averaged since the last log) every this many steps."""
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
        check_dpo_args(self.beta, self.label_smoothing, self.loss_type)
        check_parallel(self.parallel, self.lora.rank)
        if self.pairs not in PAIRINGS:
            raise ValueError(f"pairs must be one of {PAIRINGS}, got {self.pairs!r}")
        check_temperature(self.temperature)
        check_prompt_format(self.prompt_format)
        for name in ("max_prompt_tokens", "max_response_tokens", "batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def preference_pairs(rows: list[dict], pairs: str) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts from ranked rows (`ranking` lists indices into `responses`, best first)."""
    out = []
    for row in rows:
        ranked = [row["responses"][j] for j in row["ranking"]]
        tier = row.get("tiers") or range(len(ranked))  # a person's ties: equal tiers make no pair
        if pairs == "best_vs_worst":
            out.append((row["prompt"], ranked[0], ranked[-1]))  # the loader keeps only rows with 2 tiers or more
        else:
            out += [(row["prompt"], w, ranked[j]) for i, w in enumerate(ranked) for j in range(i + 1, len(ranked))
                    if tier[i] != tier[j]]
    return out


def encode_triples(tokenizer, texts: list[tuple[str, str, str]], cfg: DPOConfig) -> list[tuple[list[int], ...]]:
    """`encode_triple` of each (prompt, chosen, rejected), the prompts as the env shows them to the policy
    (`textenv.prompts.render_unrendered`: an instruct checkpoint's template wraps a plain prompt, per
    `cfg.prompt_format`) and each response closed as the env closes it (the template's end-of-turn token, or EOS)."""
    prompts, end_token = render_unrendered([p for p, _, _ in texts], tokenizer, cfg.prompt_format)
    budget = fitted_budget(prompts, tokenizer, cfg.max_prompt_tokens, end_token is not None) if prompts else 0
    return [encode_triple(tokenizer, prompt, chosen, rejected, cfg, budget, end_token)
            for prompt, (_, chosen, rejected) in zip(prompts, texts)]


def encode_triple(tokenizer, prompt: str, chosen: str, rejected: str, cfg: DPOConfig,
                  max_prompt_tokens: int | None = None, end_token: int | None = None) -> tuple[list[int], ...]:
    """(prompt ids, chosen ids, rejected ids), each response + its end token (`end_token`, EOS by default) exactly as
    SFT encodes it (`agents.data.encode_pair`). `max_prompt_tokens`: default `cfg.max_prompt_tokens`."""
    budget = cfg.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
    ids_w, labels_w = encode_pair(tokenizer, prompt, chosen, budget, cfg.max_response_tokens, end_token)
    ids_l, _ = encode_pair(tokenizer, prompt, rejected, budget, cfg.max_response_tokens, end_token)
    n = labels_w.count(IGNORE)
    if n == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens: the policy would condition on nothing")
    return ids_w[:n], ids_w[n:], ids_l[n:]


def collate(triples: list[tuple[list[int], ...]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The B chosen rows then the B rejected rows, one forward for both (2B, P + T): prompts left-padded to P so
    response token t sits at column P + t for every row, responses right-padded to T; response_mask (2B, T)."""
    rows = [(p, w) for p, w, _ in triples] + [(p, lo) for p, _, lo in triples]
    P, T = max(len(p) for p, _ in rows), max(len(r) for _, r in rows)
    input_ids = torch.full((len(rows), P + T), pad_token_id, dtype=torch.long)  # (2B, P + T)
    attention_mask = torch.zeros((len(rows), P + T), dtype=torch.long)  # (2B, P + T)
    for i, (p, r) in enumerate(rows):
        input_ids[i, P - len(p) : P + len(r)] = torch.tensor(p + r)
        attention_mask[i, P - len(p) : P + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": attention_mask[:, P:]}


def sequence_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """(2B,) sum of the response tokens' log-probs, through the model's HF forward (which DDP and autocast wrap):
    the logits at column P - 1 + t predict response token t, so only T + 1 positions reach the LM head."""
    T = batch["response_mask"].shape[1]
    P = batch["input_ids"].shape[1] - T
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"]),  # correct under left padding
                   logits_to_keep=T + 1).logits[:, :-1]  # (2B, T, V)
    logp = logprobs_from_logits(logits.float(), batch["input_ids"][:, P:], temperature)  # (2B, T)
    return (logp * batch["response_mask"]).sum(-1)  # (2B,)


@torch.no_grad()
def reference_logps(path: str, triples: list, cfg: DPOConfig, pad_token_id: int, accelerator) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected) of every pair, computed once: no reference forward per step.
    Every process computes all of them (one no-grad pass) and the reference is freed before training."""
    reference = load_causal_lm(path).to(accelerator.device).eval()
    out = []
    for i in range(0, len(triples), cfg.batch_size):
        batch = _to(collate(triples[i : i + cfg.batch_size], pad_token_id), accelerator.device)
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=cfg.bf16):
            out.append(sequence_logps(reference, batch, cfg.temperature).view(2, -1).T)  # (b, 2)
    return torch.cat(out).cpu()  # (N, 2)


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def dpo(cfg: DPOConfig) -> Path:
    """Run (or resume, or skip if already complete) DPO; return the final model folder out_dir/model."""
    out_dir, complete = start_run(cfg, "dpo")
    if complete:
        return out_dir / "model"
    t_start = time.time()
    accelerator = Accelerator(cpu=multi_cpu())  # a CPU (gloo) group when several processes share no GPU
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {accelerator.num_processes} processes")
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(cfg.policy)  # checks PAD and EOS exist and differ
    prefs = load_preferences(cfg.comparisons)
    triples = encode_triples(tokenizer, preference_pairs(prefs.rows, cfg.pairs), cfg)
    if len(triples) < cfg.batch_size:
        raise ValueError(f"only {len(triples)} preference pairs, fewer than batch_size={cfg.batch_size}")
    max_steps = cfg.max_steps or max(1, round(cfg.epochs * (len(triples) // cfg.batch_size)))
    ref_logps = reference_logps(cfg.policy, triples, cfg, tokenizer.pad_token_id, accelerator)  # (N, 2)

    # dropout off: log-probs must be deterministic. With LoRA the reference above is this base with the adapter off
    model = with_lora(load_causal_lm(cfg.policy), cfg.lora, "CAUSAL_LM")
    model = prepare_model(accelerator, model, cfg.parallel)  # DDP, or FSDP2 shards (agents/sharding.py)
    optimizer = adamw(model, cfg.lr, 0.0, fused=accelerator.device.type in ("cpu", "cuda"))
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, max_steps, min_lr_ratio=1.0)  # warmup, then constant
    optimizer = accelerator.prepare(optimizer)  # the scheduler stays ours (see pretrain.py)

    resumed = load_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler)
    start = resumed["step"] if resumed else 0
    elapsed_before = resumed["elapsed_s"] if resumed else 0.0
    logger = RunLogger(out_dir, resume_step=start if resumed else None)
    if accelerator.is_main_process:
        print(f"dpo: {len(triples)} pairs ({cfg.pairs}) from {len(prefs.rows)} {prefs.layout} rows, {max_steps} steps, "
              f"on {accelerator.device}" + (f", resuming at step {start}" if resumed else ""))

    model.train()
    # (loss, chosen, rejected, accuracy, margin) since the last log, kept in the checkpoint (see sft.py)
    window, n_sum = resumed.get("log_window", [[0.0] * 5, 0]) if resumed else [[0.0] * 5, 0]
    sums = torch.tensor(window, device=accelerator.device)
    t_timed, n_tokens, last_metrics = time.time(), 0, {}
    pbar = tqdm(total=max_steps, initial=start, desc="dpo", disable=not accelerator.is_main_process)
    for step in range(start, max_steps):
        idx = batch_indices(len(triples), cfg.batch_size, step, cfg.seed)
        idx = idx[accelerator.process_index :: accelerator.num_processes]  # this process's share of the batch
        batch = _to(collate([triples[i] for i in idx], tokenizer.pad_token_id), accelerator.device)
        mb_ref = ref_logps[idx].to(accelerator.device)  # (b, 2)
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=cfg.bf16):
            logps = sequence_logps(model, batch, cfg.temperature).view(2, -1)  # (2, b): chosen row, rejected row
        loss, chosen_r, rejected_r = dpo_loss(logps[0], logps[1], mb_ref[:, 0], mb_ref[:, 1], cfg.beta,
                                              cfg.label_smoothing, cfg.loss_type)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss.detach(), chosen_r.mean(), rejected_r.mean(),
                             (chosen_r > rejected_r).float().mean(), (chosen_r - rejected_r).mean()])
        n_sum += 1
        n_tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes  # ~ all processes' tokens
        done = step + 1
        pbar.update(1)

        last = done == max_steps
        if done % cfg.log_every == 0 or last:
            means = (accelerator.reduce(sums, reduction="mean") / n_sum).tolist()
            last_metrics = dict(zip(("losses/dpo_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                     "rewards/margins"), means))
            logger.log(done, {**last_metrics, "charts/lr": scheduler.get_last_lr()[0],
                              "charts/tokens_per_s": n_tokens / (time.time() - t_timed)})
            pbar.set_postfix(loss=f"{means[0]:.3f}", acc=f"{means[3]:.2f}")
            sums, n_sum = torch.zeros_like(sums), 0
            t_timed, n_tokens = time.time(), 0
        if done % cfg.save_every == 0 and not last:
            ckpt = {"step": done, "config": run_config(cfg), "elapsed_s": elapsed_before + time.time() - t_start,
                    "log_window": [accelerator.reduce(sums, reduction="mean").tolist(), n_sum]}
            save_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler, ckpt)
            t_timed, n_tokens = time.time(), 0
    pbar.close()
    logger.close()

    return finish_run(out_dir, model, tokenizer, {
        "stage": "dpo", "wall_time_s": elapsed_before + time.time() - t_start, "steps": max_steps,
        "pairs": len(triples), "layout": prefs.layout, "skipped_rows": prefs.skipped, **last_metrics},
        merge=cfg.lora.merge)


if __name__ == "__main__":
    dpo(cli(DPOConfig))
