"""Multi-turn rollout throughput against a single-turn rollout of the same total tokens, same model and batch.

Multi-turn: `agents.sampler.rollout_turns` over `--batch` MultiTurnEnvs whose turn logic replies with a fixed
number of words; an agent turn is `--turn-tokens` tokens (the env closes it: a random model seldom emits the
end-of-turn token), `--turns` turns. Its tokens are the whole streams: opening, agent tokens, env replies.
Single-turn: `agents.sampler.rollout` through a TextGenVectorEnv whose prompts are as long as a multi-turn stream's
opening plus its env tokens and whose responses are as long as its agent tokens: the same decode steps, the same
tokens in all, the env's tokens in one prefill instead of in chunks between turns.

`--stagger` gives the envs turns of different lengths (env b's turns are closed after turn_tokens - b % 3
tokens), so the replies do not arrive on the same step: each chunk is run by the rows that have a reply (the GPT-2
decoder writes each row at its own next slot, so the others' caches do not grow). Prints each side's tokens/s
(medians of `--repeats` after a warm-up, interleaved) and the ratio; then what one step of `gym.make_vec` on a
multi-turn id (a SyncVectorEnv of `--batch` GuessNumber-v0 envs, random tokens) costs beside one batched decode
step of the model: why a natively batched multi-turn vector env would buy little.

    python -m benchmarks.multiturn_throughput
    python -m benchmarks.multiturn_throughput --stagger
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

from agents.sampler import make_decoder, rollout, rollout_turns
from benchmarks.env_throughput import fixed_length_prompts
from textenv import TextGenVectorEnv
from textenv.embedded import default_tokenizer
from textenv.models import build_model, keep_freed_memory
from textenv.multiturn import MultiTurnEnv
from textenv.tasks import get_task


class Replies:
    """Opens with a fixed question and answers every turn with `words` words; never ends the episode."""

    def __init__(self, words: int = 6):
        self.words = words

    def start(self, rng):
        return [{"role": "user", "content": "Tell me about the film you saw last week, please."}]

    def respond(self, messages):
        return {"message": {"role": "user", "content": " ".join(["more"] * self.words)}, "reward": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=12)
    parser.add_argument("--reply-words", type=int, default=6)
    parser.add_argument("--stagger", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    tokenizer = default_tokenizer()
    model = build_model(args.preset, tokenizer, seed=0).eval()

    def turn_limit(b: int) -> int:
        return args.turn_tokens - (b % 3 if args.stagger else 0)

    envs = [MultiTurnEnv(Replies, turn_kwargs={"words": args.reply_words}, max_turns=args.turns,
                         max_turn_tokens=turn_limit(b), max_tokens=256) for b in range(args.batch)]
    probe = rollout_turns(model, envs, torch.Generator().manual_seed(0), seeds=range(args.batch))
    stream = int(probe.attention_mask.sum(1).max())  # the longest stream
    agent = int(probe.agent_mask.sum(1).max())
    env_tokens = stream - agent  # opening + replies (+ the env-closed turns' end-of-turn tokens)
    prompts = fixed_length_prompts(tokenizer, get_task("sentiment").prompts("train"), env_tokens)
    single = TextGenVectorEnv(num_envs=args.batch, prompts=prompts, tokenizer=tokenizer,
                              reward_fn=lambda p, c: [0.0] * len(c), max_prompt_tokens=env_tokens,
                              max_new_tokens=agent, truncation_side=None)

    def multi() -> tuple[float, int]:
        start = time.perf_counter()
        r = rollout_turns(model, envs, torch.Generator().manual_seed(1), seeds=range(1, args.batch + 1))
        return time.perf_counter() - start, int(r.attention_mask.sum())

    def one() -> tuple[float, int]:
        start = time.perf_counter()
        r = rollout(model, single, torch.Generator().manual_seed(1))
        return time.perf_counter() - start, int(r.attention_mask.sum())

    multi(), one()  # warm-up
    times = {"multi_turn": [], "single_turn": []}
    for _ in range(args.repeats):
        for name, fn in (("multi_turn", multi), ("single_turn", one)):
            seconds, tokens = fn()
            times[name].append(tokens / seconds)
    result = {name: statistics.median(v) for name, v in times.items()}
    result["ratio"] = result["multi_turn"] / result["single_turn"]
    print(f"batch {args.batch}, {args.turns} turns of up to {args.turn_tokens} agent tokens, replies of "
          f"{args.reply_words} words, stagger={args.stagger}: stream {stream} tokens ({agent} agent)")
    for name in ("multi_turn", "single_turn"):
        print(f"  {name:>12}: {result[name]:8.0f} tokens/s  (runs: {[round(x) for x in times[name]]})")
    print(f"  ratio multi/single: {result['ratio']:.3f}")
    result["vector_env_step_ms"], result["decode_step_ms"] = step_costs(model, tokenizer, args.batch)
    print(f"  one SyncVectorEnv step of {args.batch} GuessNumber-v0 envs: {result['vector_env_step_ms']:.2f} ms; "
          f"one batched decode step: {result['decode_step_ms']:.2f} ms")
    print(json.dumps({"bench": "multiturn_throughput", "args": vars(args), "stream_tokens": stream,
                      "agent_tokens": agent, **result}))


@torch.inference_mode()
def step_costs(model, tokenizer, batch: int, steps: int = 200) -> tuple[float, float]:
    """Median-free means over `steps` steps (ms): a vector env step on random tokens, and a decode step."""
    envs = gym.make_vec("textenv/GuessNumber-v0", num_envs=batch, vectorization_mode="sync")
    envs.reset(seed=0)
    actions = np.random.default_rng(0).integers(2, len(tokenizer), size=(steps, batch))
    start = time.perf_counter()
    for a in actions:
        envs.step(a)
    env_ms = (time.perf_counter() - start) / steps * 1e3
    decoder = make_decoder(model, batch, 128)
    ids = torch.randint(2, len(tokenizer), (batch, 40))
    decoder.prefill(ids, torch.ones_like(ids))
    tokens = torch.randint(2, len(tokenizer), (60, batch))
    start = time.perf_counter()
    for t in tokens:
        decoder.step(t)
    return env_ms, (time.perf_counter() - start) / len(tokens) * 1e3


if __name__ == "__main__":
    main()
