"""The KV-cached sampler that drives a TextGenVectorEnv: every agent's rollouts go through here.

One model forward per env step: the prompt is encoded once (prefill), then each step feeds only the token just
sampled, reusing the key/value cache. Sampling is inverse-CDF (cumsum + searchsorted), which on 32 x 4096
logits costs about 0.1 ms against about 3 ms for `torch.multinomial` (which draws an exponential variate for
every vocabulary entry); that alone is a third of a decode step on a small CPU model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from transformers import PreTrainedModel

from textenv.models.decoding import make_decoder
from textenv.models.tokens import check_temperature, logprobs_from_logits
from textenv.vector_env import TextGenVectorEnv


def sample_from_logits(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature), optionally restricted to top-k / top-p.

    (B, V) logits -> (B,) int64 token ids. Each row consumes one U[0, 1) number: drawn from `generator`, or taken
    from `uniform` (B,) when given (then `generator` is unused), so that a row's token does not depend on which
    other rows share the batch.
    """
    check_temperature(temperature)
    logits = logits.float() / temperature  # (B, V)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # (B, V)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1)  # (B, V)
    if uniform is None:
        uniform = torch.rand(cdf.shape[0], generator=generator, dtype=cdf.dtype)  # (B,)
    u = uniform.to(cdf)[:, None] * cdf[:, -1:]  # (B, 1)
    # right=True: the first index whose cdf exceeds u, so a zero-probability token is never chosen
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)  # (B,)


@dataclass
class Rollout:
    """One episode per env: its prompt, what followed it, and the rewards. Single-turn: a prompt and a response.
    Multi-turn (`rollout_turns`): the opening (the env's first messages and the generation prompt) and the rest of
    the stream, the agent's turns and the env's replies, with `agent_mask` telling them apart. The same layout
    either way, so a trainer's forwards read any episode as a prompt of P columns and T columns after it."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) PAD after the last real token
    response_mask: torch.Tensor  # (B, T) 1 for real tokens after the prompt, EOS (or the last end-of-turn) included
    agent_mask: torch.Tensor  # (B, T) 1 at the tokens the agent sampled, what a trainer trains on (single-turn: all)
    logprobs: torch.Tensor  # (B, T) log-prob of each sampled token under softmax(logits / temperature), 0 elsewhere
    rewards: torch.Tensor  # (B, T) each step's reward at the token that earned it (single-turn: the score, at the end)
    scores: torch.Tensor  # (B,) each episode's return, the sum of its rewards
    terminated: torch.Tensor  # (B,) bool: ended with EOS / by the turn logic (False: a length or turn limit)
    prompts: list[str]
    responses: list[str]  # multi-turn: the rest of the stream decoded with its special tokens (what an RM reads)
    messages: list[list[dict]] | None = None  # multi-turn: each conversation, as the env's info holds it

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P+T)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P+T)
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


@torch.inference_mode()
def rollout(
    model: PreTrainedModel,
    envs: TextGenVectorEnv,
    generator: torch.Generator | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    prompt_index: np.ndarray | None = None,
    uniforms: torch.Tensor | None = None,
) -> Rollout:
    """Play one episode in every sub-env of `envs` with `model` and return what happened.

    `envs` must use NEXT_STEP autoreset (Gymnasium's default). A sub-env that finishes early is reset by the
    env on the following step and then fed PAD (never EOS, so that throw-away episode can neither end nor cost
    a reward call) until the others finish; the next rollout's `reset()` discards it. The batched forward costs
    the same with or without those rows. `prompt_index` (num_envs,) picks each sub-env's prompt instead of
    letting the envs draw them (see `TextGenVectorEnv.reset`).

    `uniforms` (num_envs, max_new_tokens), instead of `generator`: the U[0, 1) number that picks each sub-env's
    token at each step. Sub-env i's response then depends on row i only, so a batch split over processes samples
    what one process samples (see `agents/distributed.py:rollout_uniforms`, which draws them so that they equal
    what `generator` would give).
    """
    spec = envs.setup
    if envs.autoreset_mode != AutoresetMode.NEXT_STEP:
        raise ValueError(f"rollout needs autoreset_mode NEXT_STEP, got {envs.autoreset_mode}")
    B, P, T = envs.num_envs, spec.max_prompt_tokens, spec.max_new_tokens
    V = spec.vocab_size
    device = next(model.parameters()).device
    if uniforms is not None:
        if generator is not None:
            raise ValueError("rollout takes a generator or pre-drawn uniforms, not both")
        if tuple(uniforms.shape) != (B, T):
            raise ValueError(f"uniforms must have shape (num_envs, max_new_tokens) = {(B, T)}, "
                             f"got {tuple(uniforms.shape)}")
        uniforms = uniforms.to(device)  # once, not one small copy per step

    obs, _ = envs.reset(seed=seed, options=None if prompt_index is None else {"prompt_index": prompt_index})
    prompt_ids = torch.from_numpy(obs["input_ids"][:, :P])  # (B, P)
    prompt_mask = torch.from_numpy(obs["attention_mask"][:, :P])  # (B, P)
    decoder = make_decoder(model, B, P + T)
    logits = decoder.prefill(prompt_ids.to(device), prompt_mask.to(device))[:, :V]  # (B, V)

    response_ids = np.full((B, T), spec.pad_token_id, dtype=np.int64)  # (B, T)
    lengths = np.zeros(B, dtype=np.int64)  # (B,)
    scores = np.zeros(B, dtype=np.float64)
    terminated = np.zeros(B, dtype=bool)
    done = np.zeros(B, dtype=bool)
    logprobs = torch.zeros(B, T, device=device)  # (B, T)
    prompts, responses = [""] * B, [""] * B
    for t in range(T):
        u = None if uniforms is None else uniforms[:, t]  # (B,)
        tokens = sample_from_logits(logits, generator, temperature, top_k, top_p, u)  # (B,)
        # the behaviour policy's log-prob, as PPO's loss computes it (temperature only, no top-k/top-p): an
        # agent can use it as the "old" log-prob instead of re-running the policy over the whole rollout
        logprobs[:, t] = logprobs_from_logits(logits.float()[:, None], tokens[:, None], temperature)[:, 0]
        actions = tokens.cpu().numpy()
        actions[done] = spec.pad_token_id
        _, rewards, term, trunc, infos = envs.step(actions)
        live = ~done
        response_ids[live, t] = actions[live]
        lengths[live] += 1
        for i in np.flatnonzero(live & (term | trunc)):
            scores[i], terminated[i] = rewards[i], term[i]
            prompts[i], responses[i] = infos["prompt"][i], infos["response"][i]
        done |= term | trunc
        if done.all():
            break
        logits = decoder.step(torch.from_numpy(actions).to(device))[:, :V]  # (B, V)

    response_mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)  # (B, T)
    logprobs = logprobs.cpu() * torch.from_numpy(response_mask)  # (B, T) 0 after the end (and for PAD-fed rows)
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), torch.from_numpy(lengths - 1)] = torch.from_numpy(scores).float()  # at the end
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.from_numpy(response_ids),
        response_mask=torch.from_numpy(response_mask),
        agent_mask=torch.from_numpy(response_mask),
        logprobs=logprobs,
        rewards=token_rewards,
        scores=torch.from_numpy(scores).float(),
        terminated=torch.from_numpy(terminated),
        prompts=prompts,
        responses=responses,
    )


@torch.inference_mode()
def rollout_turns(model: PreTrainedModel, envs, generator: torch.Generator | None = None, *,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seeds=None,
                  uniforms: torch.Tensor | None = None) -> Rollout:
    """Play one episode in each of `envs` (MultiTurnEnvs, e.g. a SyncVectorEnv's `.envs`; sub-env i reset with
    `seeds[i]`) with `model`, one batched decode step per agent token.

    When envs answer, their replies enter the KV cache as one batched chunk (`Decoder.extend`), not one decode step
    per env token: only the rows whose turn ended run it, and each row samples its next token from the logits after
    its own last token. The lean GPT-2 decoder writes each row at its own next slot (the others' caches do not
    change); the HF decoder gives the rows without a reply masked slots. Positions count real tokens only, so every
    logit equals an uncached forward over the row's final stream (tests/test_sampler.py). A row whose episode ended
    is fed PAD until all have; its cache rows are not read.

    `uniforms` (num_envs, max_tokens), instead of `generator`: the U[0, 1) number that picks row i's token at its
    step t, so a row's episode does not depend on the other rows. The result is a `Rollout` whose prompt is each
    episode's opening (left-padded to the longest) and whose response is the rest of its stream."""
    envs = list(envs)
    B, L, V = len(envs), envs[0].max_tokens, envs[0].vocab_size
    tokenizer = envs[0].tokenizer
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    context = model.config.max_position_embeddings
    if L > context:
        raise ValueError(f"the envs' max_tokens={L} is more than the model's {context} positions: make the envs with "
                         f"max_tokens <= {context} (e.g. gym.make(env_id, max_tokens={context})) or use a longer model")
    if seeds is not None and len(seeds) != B:
        raise ValueError(f"seeds must give one seed per env ({B}), got {len(seeds)}")
    if uniforms is not None:
        if generator is not None:
            raise ValueError("rollout_turns takes a generator or pre-drawn uniforms, not both")
        if tuple(uniforms.shape) != (B, L):
            raise ValueError(f"uniforms must have shape (num_envs, max_tokens) = {(B, L)}, got {tuple(uniforms.shape)}")
        uniforms = uniforms.to(device)
    obs = [env.reset(seed=None if seeds is None else int(seeds[i]))[0] for i, env in enumerate(envs)]
    n0 = [int(o["attention_mask"].sum()) for o in obs]  # (B,) opening lengths
    n = list(n0)  # (B,) stream lengths
    P = max(n0)
    opening = torch.full((B, P), pad, dtype=torch.long)  # left-padded openings: all rows end at slot P
    opening_mask = torch.zeros(B, P, dtype=torch.long)
    for i, o in enumerate(obs):
        opening[i, P - n0[i] :] = torch.from_numpy(o["input_ids"][: n0[i]])
        opening_mask[i, P - n0[i] :] = 1
    decoder = make_decoder(model, B, P + L)  # grows if the replies' masked slots need more
    logits = decoder.prefill(opening.to(device), opening_mask.to(device))[:, :V]  # (B, V)
    # by stream column; NumPy, not torch: one element written per row and step, and a torch scalar write costs ~10 us
    logprobs, rewards = np.zeros((B, L), dtype=np.float32), np.zeros((B, L), dtype=np.float32)
    done, terminated, messages = np.zeros(B, dtype=bool), np.zeros(B, dtype=bool), [[] for _ in range(B)]
    for t in range(L):
        u = None if uniforms is None else uniforms[:, t]  # (B,)
        tokens = sample_from_logits(logits, generator, temperature, top_k, top_p, u)  # (B,)
        logp = logprobs_from_logits(logits.float()[:, None], tokens[:, None], temperature)[:, 0].cpu().numpy()  # (B,)
        actions = tokens.cpu().numpy()
        chunks: list[list[int]] = [[] for _ in range(B)]
        for i in np.flatnonzero(~done):
            column = n[i]  # where the agent's token lands
            obs[i], reward, term, trunc, info = envs[i].step(int(actions[i]))
            logprobs[i, column], rewards[i, column] = logp[i], reward
            n[i] = int(obs[i]["attention_mask"].sum())
            chunks[i] = obs[i]["input_ids"][column + 1 : n[i]].tolist()  # the env's reply, if its turn ended
            if term or trunc:
                done[i], terminated[i], messages[i], chunks[i] = True, term, info["messages"], []
        if done.all():
            break
        actions[done] = pad
        logits = decoder.step(torch.from_numpy(actions).to(device))[:, :V]  # (B, V)
        answered = [i for i in range(B) if chunks[i]]
        if answered:  # one batched chunk for every reply of this step
            S = max(len(chunks[i]) for i in answered)
            chunk, chunk_mask = torch.full((B, S), pad, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
            for i in answered:
                chunk[i, : len(chunks[i])], chunk_mask[i, : len(chunks[i])] = torch.tensor(chunks[i]), 1
            after = decoder.extend(chunk.to(device), chunk_mask.to(device))[:, :V]  # (B, V)
            logits[answered] = after[answered]

    # ---- the streams in the Rollout layout: the opening left-padded to P, the rest right-padded to T ----
    T = max(n[i] - n0[i] for i in range(B))
    ids = torch.full((B, T), pad, dtype=torch.long)
    response_mask, agent_mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    response_logp, response_rewards = torch.zeros(B, T), torch.zeros(B, T)
    prompts, responses = [], []
    for i, o in enumerate(obs):
        rest = slice(n0[i], n[i])
        k = n[i] - n0[i]
        ids[i, :k] = torch.from_numpy(o["input_ids"][rest])
        response_mask[i, :k] = 1
        agent_mask[i, :k] = torch.from_numpy(o["agent_mask"][rest])
        response_logp[i, :k] = torch.from_numpy(logprobs[i, rest])
        response_rewards[i, :k] = torch.from_numpy(rewards[i, rest])
        prompts.append(tokenizer.decode(o["input_ids"][: n0[i]].tolist()))
        responses.append(tokenizer.decode(o["input_ids"][rest].tolist()))
    return Rollout(prompt_ids=opening, prompt_mask=opening_mask, response_ids=ids, response_mask=response_mask,
                   agent_mask=agent_mask, logprobs=response_logp * agent_mask, rewards=response_rewards,
                   scores=response_rewards.sum(1), terminated=torch.from_numpy(terminated), prompts=prompts,
                   responses=responses, messages=messages)
