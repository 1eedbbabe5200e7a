"""Stage 4 of the InstructGPT recipe: token-level PPO in a TextGenVectorEnv, with a per-token KL penalty to the
frozen SFT policy. Read it top to bottom; the formulas live, tested, in `agents/core.py`.

References: Ziegler et al. 2019 (arXiv 1909.08593), Ouyang et al. 2022 (arXiv 2203.02155), and Huang et al.,
"The N Implementation Details of RLHF with PPO" (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo).

    python -m agents.ppo --policy runs/x/sft/model --reward runs/x/rm/model --out-dir runs/x/ppo
    torchrun --nproc_per_node 2 -m agents.ppo --policy runs/x/sft/model ...  # data-parallel

The loop reads in textbook order: 1. rollout, 2. values, 3. rewards and GAE, 4. epochs of minibatch updates,
5. log. Comments marked `speed:` explain an optimisation a reader may skip; `N processes:` what matters only under
several processes.

Under N processes each plays num_envs / N of the episodes, every process then holds the whole batch, and each
takes 1/N of every minibatch's rows with the gradients summed over the processes: the same updates as one process
with the same seed, up to float rounding (agents/distributed.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agents.core import (
    AdaptiveKLController,
    FixedKLController,
    at_last_token,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_whiten,
    per_token_rewards,
)
from agents.data import load_text_source, pack_blocks
from agents.distributed import (
    gather_rollout,
    gather_rows,
    process_device,
    rank_rows,
    rollout_uniforms,
    sum_over_processes,
)
from agents.episodes import make_episodes
from agents.lora import LoRAConfig, reference_policy, with_lora
from agents.policy import (  # noqa: F401  (NonFiniteError: the error a user catches, importable from here)
    NonFiniteError,
    check_finite,
    chunked,
    gather_gold,
    gold_metrics,
    iteration_generator,
    minibatch_step,
    policy_forward,
    progress,
    prompt_budget,
    value_forward,
    write_samples,
)
from agents.run import RunLogger, cli, distributed_state, finish_run, load_checkpoint, save_checkpoint, start_run
from agents.sharding import check_parallel, shard_blocks, shards, sync_replica
from rewards.hf import SequenceClassifierReward
from textenv.chat import check_prompt_format
from textenv.models import load_causal_lm, load_sequence_classifier
from textenv.models.lean import frozen_forward
from textenv.models.tokens import check_temperature
from textenv.tokenizer import load_tokenizer


@dataclass
class PPOConfig:
    policy: str = "runs/default/sft/model"
    """Hub id or folder of the SFT policy; it is also the frozen reference for the KL penalty."""
    reward: str = "runs/default/rm/model"
    """The reward: a sequence-classification folder or hub id (our learned RM or an HF classifier), a
    'module:attr' callable, or 'gold' for the task's gold scorer."""
    out_dir: str = "runs/default/ppo"
    """Run folder: config, metrics.jsonl, tb/, samples.jsonl, checkpoint/, and the final policy in model/."""
    task: str = "sentiment"
    """Embedded task whose train prompts are used and whose gold score is logged beside the proxy score; or a
    multi-turn env id (textenv/Calculator-v0, a user's 'module:Id'), whose own return is the gold."""
    prompts: str | None = None
    """Other prompts (a .jsonl/.csv/.parquet/.txt file or hub id) instead of the task's."""
    prompt_format: str = "auto"
    """How a str prompt reaches the policy: "chat" (a user message through its tokenizer's chat template, the episode
    ending at the template's end-of-turn token), "text" (as it is), or "auto" ("chat" for an instruct checkpoint: a
    chat template other than textenv's embedded one)."""
    reward_label: str | None = None
    """For a classifier reward with several labels: the label whose logit is the reward (e.g. POSITIVE)."""
    value_model: str | None = None
    """Folder of the value model's initialisation (a sequence-classification model). Default: the reward model
    (InstructGPT) when it is a one-output model that reads the policy's tokens (the same vocabulary); else the
    policy with a new scalar head (an HF classifier with several labels or its own tokenizer, a callable reward).
    The choice is printed."""
    shared_value_head: bool = False
    """Memory-saving option: a value head on the policy's trunk instead of a separate value model."""
    num_envs: int = 64
    """Episodes per rollout (the batch), over all processes: one prompt per sub-env, num_envs / N sub-envs in each
    of N processes."""
    max_new_tokens: int | None = None
    """Response budget; default: the task's."""
    max_prompt_tokens: int | None = None
    """Prompt budget in tokens (longer prompts keep their last tokens); default: the task's, or with --prompts the
    longest of them, so that none is cut."""
    temperature: float = 0.7
    """Sampling temperature; log-probs for the loss and the KL use logits divided by it too."""
    iterations: int = 20
    """PPO iterations (rollout + update)."""
    update_epochs: int = 4
    """Passes over each rollout."""
    value_warmup_iterations: int = 0
    """The first this many iterations train only the value model (the policy, and so its KL, stay put), so that the
    first policy updates get advantages from a critic fitted to this policy's returns rather than from the reward
    model's guesses at partial responses (verl's critic warm-up). Counted in `iterations`. Against a weak proxy RM an
    untrained critic makes the first updates spend KL on noise (benchmarks/overoptimization.py). Meanwhile the
    policy's loss metrics (policy_loss, clipfrac, approx_kl, entropy) read 0."""
    num_minibatches: int = 4
    """Minibatches per epoch."""
    micro_batch_size: int | None = 8
    """Rows per forward/backward pass in each process: a minibatch is processed in micro-batches whose
    token-weighted gradients add up to the minibatch's (the same update, up to float rounding), which caps the
    activation memory (the (rows, T, V) logits dominate it). None: a process's whole share of a minibatch at once."""
    lr: float = 1e-4
    """Adam learning rate, annealed linearly to 0."""
    adam_eps: float = 1e-5
    """Adam epsilon: 1e-5 as in the original TF code; PyTorch's 1e-8 makes early steps more aggressive."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping."""
    clip_coef: float = 0.2
    """PPO ratio clipping."""
    vf_clip_coef: float = 0.2
    """Value clipping around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount; 1 in RLHF: the score arrives at the last token."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.3
    """Initial coefficient of the per-token KL penalty (> 0 with the adaptive controller; with kl_target None, 0
    turns the penalty off)."""
    kl_target: float | None = 6.0
    """Adaptive controller target KL in nats per response (Ziegler et al.); None keeps kl_coef fixed."""
    kl_horizon: int = 1000
    """Adaptive controller horizon in episodes. Ziegler et al. used 10000 over millions of episodes; our runs
    are a few thousand episodes, and a horizon that long would leave the coefficient where it started."""
    missing_eos_penalty: float | None = -1.0
    """Score given instead of the reward to a response with no EOS (multi-turn: to an episode a limit cut, instead
    of its rewards); None keeps the reward."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards before GAE."""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT): weight of a pretraining LM loss mixed into every minibatch; 0 disables it."""
    ptx_data: str | None = None
    """Text for PPO-ptx (as pretrain's --data); default: the embedded corpus."""
    ptx_seq_len: int = 64
    """Tokens per PPO-ptx sequence."""
    sample_every: int = 10
    """Write a table of sample responses to samples.jsonl every this many iterations (and at the end)."""
    save_every: int = 10
    """Checkpoint every this many iterations; a rerun with the same config resumes from the last one."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the policy and the value model; the reference is then the policy with its adapter disabled (no
    second copy). Rank 0 (the default) trains every weight."""
    parallel: str = "ddp"
    """Under several processes: "ddp" replicates the policy and the value model and sums gradients; "fsdp" shards
    their weights, gradients and optimizer state over the processes (PyTorch FSDP2, one unit per transformer block;
    agents/sharding.py) and samples from a replica synced from the shards each iteration. The frozen reference and
    reward model are replicated either way. One process: the plain models either way."""
    shard_reference: bool = False
    """With parallel="fsdp" under several processes: shard the frozen reference too (1/N of its weights per process;
    it then runs the HF forward, all-gathering each block, instead of the lean forward on packed weights). False:
    every process holds the whole reference, the faster choice."""
    seed: int = 0
    """Seed: prompts, sampling and minibatch order derive from (seed, iteration), so resuming needs no stream."""
    device: str | None = None
    """torch device; default: this process's (cuda, cuda:<local rank> under a multi-GPU launch, else cpu)."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        check_prompt_format(self.prompt_format)
        if check_parallel(self.parallel, self.lora.rank) == "fsdp" and self.shared_value_head:
            raise ValueError("parallel='fsdp' with shared_value_head is not supported yet: the head reads the policy's "
                             "trunk outside its forward; use a separate value model, or parallel='ddp'")
        for name in ("num_envs", "iterations", "update_epochs", "num_minibatches", "save_every", "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.value_warmup_iterations < self.iterations:
            raise ValueError(f"value_warmup_iterations must be between 0 and iterations - 1 = {self.iterations - 1}, "
                             f"got {self.value_warmup_iterations}")
        if self.value_warmup_iterations and self.shared_value_head:
            raise ValueError("value_warmup_iterations needs a separate value model: a shared value head trains the "
                             "policy's trunk with it; set shared_value_head=False or value_warmup_iterations=0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} is not divisible by num_minibatches={self.num_minibatches}")
        check_temperature(self.temperature)
        # the controllers' own checks, here so that a refused value never reaches the run folder's config
        if self.kl_target is None:
            FixedKLController(self.kl_coef)
        else:
            AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)


class ValueHead(torch.nn.Module):
    """A scalar head on the policy's last hidden state (the shared-trunk, memory-saving option); zero-init so
    the first values are 0 rather than noise."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)


def default_value_init(cfg: PPOConfig, reward_fn, tokenizer) -> str:
    """The reward model (InstructGPT initialises the value model from it) if its trunk can be one: a single output
    and the policy's vocabulary, since the value model reads the policy's token ids; else the policy."""
    if isinstance(reward_fn, SequenceClassifierReward) and reward_fn.model.config.num_labels == 1 \
            and reward_fn.tokenizer.get_vocab() == tokenizer.get_vocab():
        return cfg.reward
    return cfg.policy


def rollout_values(value_model, policy, cfg: PPOConfig, local_ids, local_mask, mine: slice, input_ids, attention_mask,
                   first_rows: torch.Tensor, first_micro: list[torch.Tensor], dist, rows: int,
                   P: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rollout's values V(prompt + response[:t]), (B, T) in every process, GAE's baseline and the value
    clipping's centre; and, for the rows of epoch 0's first minibatch, the value model's outputs with their graph.

    # speed: the value model does not change before the update's first optimizer step, so the first minibatch's
    value forward (which its value loss needs anyway) gives those rows' values: they are computed once, with the
    graph kept for that loss, instead of once here and again there. With one minibatch (TRL's default, the anchor's
    setting) that is the rollout's whole value forward, about 80 ms of a 1.2 s iteration on 2 cores. A shared value
    head reads the policy's trunk, which the value loss's pass does not run: all its values are computed here.

    `first_rows`: the first minibatch's global rows; `first_micro`: this process's micro-batches of them (none with
    a shared head, or sharded models: then every row is computed here). The other rows are computed on this
    process's own rollout rows `mine`, on packed weights."""
    B, T = len(input_ids), input_ids.shape[1] - P
    deferred = torch.zeros(B, dtype=torch.bool)  # (B,) global rows whose values come from the first minibatch
    deferred[first_rows] = bool(first_micro)  # none with a shared head, or sharded
    here = torch.nonzero(~deferred[mine]).squeeze(1).to(local_ids.device)  # (n,) this process's rows computed now
    values = torch.zeros(len(local_ids), T, device=local_ids.device)  # (b, T), 0 on deferred rows for now
    if len(here):
        with torch.no_grad():
            value_fwd = frozen_forward(value_model, pack_rows=rows * input_ids.shape[1])  # packed for this forward only

            def predict(ids, am):
                if cfg.shared_value_head:  # the value head on the policy's trunk
                    states = policy_forward(policy, ids, am, P, cfg.temperature, hidden=True, entropy=False)[2]
                    return value_model.score(states).squeeze(-1)
                return value_forward(value_fwd, ids, am, P)

            values[here] = chunked(predict, rows, local_ids[here], local_mask[here])  # (n, T)
    values = gather_rows(dist, values)[0]  # (B, T)
    # graphs kept
    first_values = [value_forward(value_model, input_ids[mu], attention_mask[mu], P) for mu in first_micro]
    fill = torch.zeros_like(values)
    for mu, v in zip(first_micro, first_values):
        fill[mu] = v.detach()
    return values + sum_over_processes(dist, fill), first_values


def ppo(cfg: PPOConfig) -> Path:
    out_dir, complete = start_run(cfg, "ppo")
    if complete:
        return out_dir / "model"
    dist = distributed_state()  # this process among N (N = 1 without a launcher); only the main one writes
    device = process_device(cfg.device, dist)
    if (cfg.num_envs // cfg.num_minibatches) % dist.num_processes:
        raise ValueError(f"a minibatch of num_envs / num_minibatches = {cfg.num_envs // cfg.num_minibatches} rows "
                         f"does not split evenly over {dist.num_processes} processes")
    # the same seed everywhere: a new value head must start the same in every process; what differs per process
    # (its prompts and sampling numbers) is its rows' share of the global draws (agents/distributed.py)
    torch.manual_seed(cfg.seed)

    # --- models: policy (trained), reference (frozen SFT), value (trained), reward (with the envs) ---
    tokenizer = load_tokenizer(cfg.policy)
    policy = with_lora(load_causal_lm(cfg.policy), cfg.lora, "CAUSAL_LM").to(device)  # dropout off
    ref_policy = reference_policy(policy, cfg.policy, device)  # LoRA: the policy with its adapter off
    B = cfg.num_envs
    mine = rank_rows(B, dist)  # N processes: this process's episodes, global rows [mine.start, mine.stop)
    # the embedded task's envs with the reward inside, or a multi-turn env id's; model kwargs reach only a model
    # adapter, a 'module:attr' callable ignores them
    episodes = make_episodes(cfg.task, num_envs=mine.stop - mine.start, tokenizer=tokenizer, reward=cfg.reward,
                             reward_label=cfg.reward_label, device=device, prompts=cfg.prompts,
                             prompt_format=cfg.prompt_format, max_new_tokens=cfg.max_new_tokens,
                             max_prompt_tokens=prompt_budget(cfg, tokenizer))
    if cfg.shared_value_head:
        value_model = ValueHead(policy.config.hidden_size).to(device)
    else:
        value_init = cfg.value_model or default_value_init(cfg, episodes.reward_fn, tokenizer)
        if dist.is_main_process:
            print(f"ppo: value model initialised from {value_init}")
        value_model = load_sequence_classifier(value_init, num_labels=1)  # new head on a causal LM
        value_model.config.pad_token_id = tokenizer.pad_token_id
        value_model = with_lora(value_model, cfg.lora, "SEQ_CLS").to(device)  # its head trains in full
    P, T, V = episodes.P, episodes.T, episodes.V  # prompt columns and steps at most (multi-turn: the stream's)
    mb_size = B // cfg.num_minibatches
    my_mb = rank_rows(mb_size, dist)  # N processes: this process's rows of every minibatch
    rows = cfg.micro_batch_size or B
    # speed: the frozen reference through the lean forward (GPT-2, the Llama family) on weights packed once for the
    # run (a LoRA policy's adapter-off reference runs its HF forward)
    sharded = shards(cfg.parallel, dist.num_processes)  # N processes, parallel="fsdp": the models sharded
    if sharded and cfg.shard_reference:
        ref_policy = shard_blocks(ref_policy)  # its forward is then a collective: every process runs as many
    ref_forward = frozen_forward(ref_policy, pack_rows=rows * (P + T))
    ptx_blocks = load_ptx_blocks(cfg, tokenizer) if cfg.ptx_coef > 0 else None

    # sharded: policy and value model too, the rollout sampling from a synced replica
    sampler_policy = copy.deepcopy(policy) if sharded else policy
    if sharded:
        policy, value_model = shard_blocks(policy, gradients="sum"), shard_blocks(value_model, gradients="sum")
    params = [p for p in list(policy.parameters()) + list(value_model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.0,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for the whole step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / cfg.iterations)  # linear anneal
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target is not None
              else FixedKLController(cfg.kl_coef))
    models = {"policy": policy, "value": value_model}
    state = load_checkpoint(out_dir / "checkpoint", models, optimizer, scheduler)
    start = 0 if state is None else state["iteration"]
    if state is not None:
        kl_ctl.load_state_dict(state["kl_ctl"])
    logger = RunLogger(out_dir, resume_step=None if state is None else start)

    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="ppo", unit="it",
               disable=not dist.is_main_process)
    for iteration in bar:
        t0 = time.perf_counter()
        # ---- 1. rollout: one episode per sub-env; the reward model's score at the last (agent) token, and in a
        # multi-turn env each turn's reward at that turn's last agent token ----
        # N processes: this process plays global rows `mine` (sub-env i seeded with seed + i, row i's tokens picked
        # by row i of the (B, T) uniforms), so N processes play the episodes one process plays.
        policy.eval()
        if sharded:
            sync_replica(sampler_policy, policy)
        uniforms = rollout_uniforms(iteration_generator(cfg.seed, iteration, 0), B, T)  # (B, T)
        local, local_gold = episodes.play(sampler_policy, uniforms=uniforms[mine], temperature=cfg.temperature,
                                          seed=(cfg.seed * 1_000_003 + iteration) * B + mine.start)
        P = local.prompt_ids.shape[1]  # this batch's prompt columns (multi-turn: its longest opening)
        local_ids, local_mask = local.input_ids.to(device), local.attention_mask.to(device)  # (b, P+T)
        with torch.no_grad():  # the reference's log-probs of this process's rows
            ref_logp = chunked(lambda ids, am, P=P: policy_forward(ref_forward, ids, am, P, cfg.temperature,
                                                                   vocab_size=V, entropy=False)[0],
                               rows, local_ids, local_mask)  # (b, T)
        # N processes: from here on every process holds the whole batch and computes the same advantages and metrics
        batch = gather_rollout(dist, local)
        ref_logp = gather_rows(dist, ref_logp)[0]  # (B, T)
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # (B, P+T)
        # (B, T) the tokens the agent sampled, what is trained on: the response up to and including EOS, or a
        # multi-turn stream's agent turns (the env's tokens are context only: no loss, no KL, no GAE step)
        mask = batch.agent_mask.to(device).float()
        # the "old" log-probs are the sampler's: same model, same temperature, so a forward of the policy would only
        # repeat them (up to float rounding) at the cost of a third of the rollout
        logp = batch.logprobs.to(device)  # (B, T)
        token_scores = batch.rewards.to(device)  # (B, T) each reward at the token that earned it
        if cfg.missing_eos_penalty is not None:  # the EOS trick: a truncated episode gets a fixed penalty instead
            penalty = at_last_token(torch.full((B,), cfg.missing_eos_penalty, device=device), mask)
            token_scores = torch.where(batch.terminated.to(device)[:, None], token_scores, penalty)
        scores = token_scores.sum(1)  # (B,) each episode's return

        # ---- 2. values of every response token, by the value model as it was during the rollout ----
        order_rng = iteration_generator(cfg.seed, iteration, 1)
        first_order = torch.randperm(B, generator=order_rng)  # epoch 0's minibatch order
        # (sharded: none deferred, since a sharded forward is a collective and the processes' shares of the first
        # minibatch's rows differ)
        defer = not cfg.shared_value_head and not sharded
        first_micro = list(first_order[:mb_size].to(device)[my_mb].split(rows)) if defer else []
        values, first_values = rollout_values(value_model, policy, cfg, local_ids, local_mask, mine, input_ids,
                                              attention_mask, first_order[:mb_size], first_micro, dist, rows, P)

        # ---- 3. rewards and GAE: -kl_coef * (logp - ref_logp) per agent token plus the scores where they were
        # paid; GAE over the agent tokens (an env reply between two turns is skipped, not a step) ----
        with torch.no_grad():
            rewards, non_score_reward = per_token_rewards(token_scores, logp, ref_logp, mask, kl_ctl.value)  # (B, T)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            kl = torch.where(mask.bool(), kl_estimate(logp, ref_logp), 0.0).sum(1)  # (B,) k1 KL per episode, nats
            check_finite(iteration, scores=scores, kl=kl, values=values)
            advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
            advantages = masked_whiten(advantages, mask)  # over the whole batch
        t_rollout = time.perf_counter() - t0

        # ---- 4. epochs x minibatches of the clipped PPO objective ----
        # N processes: this process takes rows `my_mb` of each global minibatch, its loss weighted by the GLOBAL
        # minibatch's token count, and the gradients are summed over the processes (agents/distributed.py).
        policy.train()  # dropout is off, so train mode changes nothing but intent
        stats = []
        train_policy = iteration >= cfg.value_warmup_iterations  # False: the value warm-up (the value loss only)
        for epoch in range(cfg.update_epochs):
            order = first_order if epoch == 0 else torch.randperm(B, generator=order_rng)
            for start_i in range(0, B, mb_size):
                mb = order[start_i : start_i + mb_size].to(device)
                mb_tokens = mask[mb].sum()
                optimizer.zero_grad(set_to_none=True)
                # gradient accumulation over micro-batches: each one's masked means weighted by its share of the
                # minibatch's tokens, so the summed gradient is that of the minibatch's token mean
                micro = mb[my_mb].split(rows)
                vf_stats = torch.zeros(2, device=device)  # value loss, value clipfrac
                if not cfg.shared_value_head:  # the value loss, on the value model's own forward
                    for j, mu in enumerate(micro):
                        if epoch == 0 and start_i == 0 and defer:  # speed: the forward `rollout_values` kept
                            new_values = first_values[j]  # (b, T)
                        else:
                            new_values = value_forward(value_model, input_ids[mu], attention_mask[mu], P)  # (b, T)
                        vf_loss, vf_clipfrac = clipped_value_loss(new_values, values[mu], returns[mu], mask[mu],
                                                                  cfg.vf_clip_coef)
                        weight = mask[mu].sum() / mb_tokens
                        (weight * cfg.vf_coef * vf_loss).backward()
                        vf_stats += weight * torch.stack([vf_loss.detach(), vf_clipfrac])
                pg_stats = torch.zeros(4, device=device)  # policy loss, clipfrac, approx KL, entropy
                # the value warm-up: no policy loss, so the policy's weights get no gradient and Adam skips them
                for mu in micro if train_policy else []:
                    mu_mask = mask[mu]
                    weight = mu_mask.sum() / mb_tokens
                    new_logp, entropy, mu_states = policy_forward(
                        policy, input_ids[mu], attention_mask[mu], P, cfg.temperature, cfg.shared_value_head, V
                    )
                    pg_loss, clipfrac, approx_kl = clipped_policy_loss(new_logp, logp[mu], advantages[mu], mu_mask,
                                                                       cfg.clip_coef)
                    loss = pg_loss
                    if cfg.shared_value_head:  # the value head reads this forward's trunk
                        new_values = value_model.score(mu_states).squeeze(-1)  # (b, T)
                        vf_loss, vf_clipfrac = clipped_value_loss(new_values, values[mu], returns[mu], mu_mask,
                                                                  cfg.vf_clip_coef)
                        loss = loss + cfg.vf_coef * vf_loss
                        vf_stats += weight * torch.stack([vf_loss.detach(), vf_clipfrac])
                    (weight * loss).backward()
                    pg_stats += weight * torch.stack([pg_loss, clipfrac, approx_kl,
                                                      masked_mean(entropy, mu_mask)]).detach()
                if ptx_blocks is not None and train_policy:  # PPO-ptx: keep the pretraining distribution's
                    # log-likelihood up (a non-finite ptx loss shows up in the gradient norm)
                    loss = cfg.ptx_coef * ptx_loss(policy, ptx_blocks, mb_size, my_mb, order_rng, device)
                    loss.backward()
                # N processes: the gradients and statistics summed to the global minibatch's; clip, check, step
                mb_stats = torch.cat([pg_stats, vf_stats])
                stats.append(minibatch_step(dist, params, optimizer, cfg.max_grad_norm, iteration, mb_stats))
        scheduler.step()
        kl_ctl.update(kl.mean().item(), B)
        t_update = time.perf_counter() - t0 - t_rollout

        # ---- 5. log, sample, checkpoint ----
        pg, cf, akl, ent, vf, vcf, gn = torch.stack(stats).mean(0).tolist()
        gold = gather_gold(dist, local_gold)
        n_tokens = int(mask.sum())
        metrics = {
            "objective/scores": batch.scores.mean().item(),
            **gold_metrics(gold),
            "objective/kl": kl.mean().item(),
            "objective/entropy": -(logp * mask).sum(1).mean().item(),  # Monte-Carlo, nats per response
            "objective/non_score_reward": (non_score_reward * mask).sum(1).mean().item(),
            "objective/rlhf_reward": (scores + (non_score_reward * mask).sum(1)).mean().item(),
            "objective/kl_coef": kl_ctl.value,
            "losses/policy_loss": pg,
            "losses/value_loss": vf,
            "losses/clipfrac": cf,
            "losses/vf_clipfrac": vcf,
            "losses/approx_kl": akl,
            "losses/entropy": ent,
            "losses/grad_norm": gn,
            "losses/explained_variance": explained_variance(values, returns, mask),
            "charts/episode_length": mask.sum(1).mean().item(),
            "charts/eos_rate": batch.terminated.float().mean().item(),
            "charts/lr": scheduler.get_last_lr()[0],
            "charts/tokens_per_s": n_tokens / (t_rollout + t_update),
            "charts/rollout_tokens_per_s": n_tokens / t_rollout,  # generation, reference, reward and value forwards
            "time/rollout_s": t_rollout,
            "time/update_s": t_update,
        }
        metrics["time/iteration_s"] = time.perf_counter() - t0  # rollout + update + scoring and metrics
        logger.log(iteration + 1, metrics)
        bar.set_postfix(progress(metrics))
        done = iteration + 1 == cfg.iterations
        if ((iteration + 1) % cfg.sample_every == 0 or done) and dist.is_main_process:
            write_samples(out_dir / "samples.jsonl", iteration + 1, batch, gold, n=8)
        if (iteration + 1) % cfg.save_every == 0 or done:
            save_checkpoint(out_dir / "checkpoint", models, optimizer, scheduler,
                            {"iteration": iteration + 1, "kl_ctl": kl_ctl.state_dict()})
    logger.close()
    # the value model is kept beside the policy: a further PPO run can start from it (--value-model)
    return finish_run(out_dir, policy, tokenizer, {"iterations": cfg.iterations, "final_kl_coef": kl_ctl.value},
                      extra_models={"value_model": value_model}, merge=cfg.lora.merge)


def load_ptx_blocks(cfg: PPOConfig, tokenizer) -> torch.Tensor:
    """The pretraining blocks PPO-ptx samples from (pretrain's packing of `ptx_data`, the embedded corpus by
    default)."""
    blocks, _ = pack_blocks(tokenizer, load_text_source(cfg.ptx_data), cfg.ptx_seq_len)
    return blocks


def ptx_loss(policy, blocks: torch.Tensor, n: int, mine: slice, generator: torch.Generator, device) -> torch.Tensor:
    """Next-token cross-entropy on n random pretraining blocks (InstructGPT's PPO-ptx term, as a loss): this
    process's blocks `mine` of the n, their token losses summed and divided by all n blocks' token count, so that
    the processes' gradients sum to the mean's. Every process draws all n (the generator stays in step)."""
    idx = torch.randint(len(blocks), (n,), generator=generator)[mine]
    x = blocks[idx].to(device)  # (n / N, S+1)
    logits = policy(input_ids=x[:, :-1]).logits  # (n / N, S, V)
    return (torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            / (n * (x.shape[1] - 1)))


def main() -> None:
    ppo(cli(PPOConfig))


if __name__ == "__main__":
    main()
