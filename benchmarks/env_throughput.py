"""Throughput of a full rollout through TextGenVectorEnv with the KV-cached sampler, against `model.generate`.

Both sides use the same freshly initialised model (a preset, dropout off), the same batch, prompt length and
number of new tokens, sampling at temperature 1 with no top-k/top-p, in the same process, interleaved, and report
the median of `--repeats` timed runs after a warm-up. Also measures the single TextGenEnv's per-step overhead
with no model at all (random actions).

    python -m benchmarks.env_throughput            # defaults: small preset, batch 32, prompt 16, 48 new tokens
    python -m benchmarks.env_throughput --arch llama   # the Llama preset of the same size
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from agents.sampler import rollout
from textenv import TextGenEnv, TextGenVectorEnv
from textenv.embedded import default_tokenizer
from textenv.models import build_model
from textenv.tasks import get_task


def fixed_length_prompts(tokenizer, texts: list[str], length: int) -> list[str]:
    """Prompts of exactly `length` tokens, cut from the task's texts, so both sides see the same shapes."""
    stream = tokenizer(" ".join(texts))["input_ids"]
    return [tokenizer.decode(stream[i : i + length]) for i in range(0, len(stream) - length, length)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--env-steps", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = default_tokenizer()
    task = get_task("sentiment")
    model = build_model(args.preset, tokenizer, seed=0, arch=args.arch).eval()
    prompts = fixed_length_prompts(tokenizer, task.prompts("train"), args.prompt_len)
    envs = TextGenVectorEnv(
        num_envs=args.batch, prompts=prompts, tokenizer=tokenizer, reward_fn=task.gold,
        max_prompt_tokens=args.prompt_len, max_new_tokens=args.new_tokens, truncation_side=None,
    )
    generator = torch.Generator().manual_seed(0)
    batch = tokenizer(prompts[: args.batch], return_tensors="pt", add_special_tokens=False)

    def run_env() -> tuple[float, int]:
        start = time.perf_counter()
        r = rollout(model, envs, generator)
        return time.perf_counter() - start, int(r.response_mask.sum())

    def run_generate() -> tuple[float, int]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
        return time.perf_counter() - start, (out.shape[1] - args.prompt_len) * args.batch

    run_env(), run_generate()  # warm-up
    env_tps, gen_tps = [], []
    for _ in range(args.repeats):  # interleaved, so drift on a noisy VM hits both sides alike
        seconds, tokens = run_env()
        env_tps.append(tokens / seconds)
        seconds, tokens = run_generate()
        gen_tps.append(tokens / seconds)

    # The env alone: random actions, no model, so this is pure Python/NumPy bookkeeping per step.
    env = TextGenEnv(prompts=prompts, tokenizer=tokenizer, reward_fn=task.gold, max_prompt_tokens=args.prompt_len,
                     max_new_tokens=args.new_tokens, truncation_side=None)
    rng = np.random.default_rng(0)
    actions = rng.integers(2, len(tokenizer), size=args.env_steps)
    env.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(int(a))
        if terminated or truncated:
            env.reset()
    step_us = (time.perf_counter() - start) / args.env_steps * 1e6

    env_median, gen_median = statistics.median(env_tps), statistics.median(gen_tps)
    result = {
        "bench": "env_throughput",
        "vector_env_rollout_tokens_per_s": round(env_median, 1),
        "generate_tokens_per_s": round(gen_median, 1),
        "ratio": round(env_median / gen_median, 3),
        "single_env_step_overhead_us": round(step_us, 2),
        "vector_env_runs": [round(x, 1) for x in env_tps],
        "generate_runs": [round(x, 1) for x in gen_tps],
        "args": vars(args),
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    print(f"vector env + KV-cached sampler: {env_median:,.0f} tok/s | model.generate: {gen_median:,.0f} tok/s | "
          f"ratio {env_median / gen_median:.2f} | single env step overhead {step_us:.1f} us")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
