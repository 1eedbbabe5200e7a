"""Does PPO learn? PPO against best-of-16 from the SFT policy, on the learned reward model, over seeds.

Needs a pipeline run folder with sft/model and rm/model (e.g. `textenv pipeline`). For each seed it trains PPO
(the PPOConfig defaults, or --iterations etc.) from the SFT policy against the learned RM, then samples the
test prompts from the PPO policy and reports its gold score and KL to SFT, beside best-of-16 sampling from the
SFT policy (chosen by the same RM, scored by gold; KL log 16 - 15/16 = 1.83 nats).

    python -m benchmarks.ppo_learning --run runs/default --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from agents.best_of_n import best_of_n, best_of_n_kl
from agents.evaluate import EvalConfig, evaluate
from agents.ppo import PPOConfig, ppo
from agents.report import plot_curves, read_metrics
from agents.run import stage_model
from rewards.hf import SequenceClassifierReward
from textenv.models import keep_freed_memory, load_causal_lm
from textenv.tasks import get_task
from textenv.tokenizer import load_tokenizer
from textenv.vector_env import TextGenVectorEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-prompts", type=int, default=500,
                        help="test prompts to evaluate on (the sentiment task has 500): over 128 of them the standard "
                             "error of PPO's mean gold score minus best-of-16's is about 0.02, near the gap between "
                             "them")
    parser.add_argument("--n", type=int, default=16, help="best-of-n")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out-dir", default=None, help="default: <run>/ppo_learning")
    args = parser.parse_args()
    keep_freed_memory()  # as the `textenv` command does before it trains
    run = Path(args.run)
    out = Path(args.out_dir or run / "ppo_learning")
    out.mkdir(parents=True, exist_ok=True)
    sft, rm = str(stage_model(run, "sft")), str(stage_model(run, "rm"))
    task = get_task(args.task)
    temperature = PPOConfig.temperature

    # best-of-n from the SFT policy, chosen by the learned RM, scored by gold
    tokenizer = load_tokenizer(sft)
    prompts = task.prompts("test", n=args.num_prompts)
    envs = TextGenVectorEnv(num_envs=128, prompts=prompts, tokenizer=tokenizer, reward_fn=lambda p, c: [0.0] * len(c),
                            max_prompt_tokens=task.max_prompt_tokens, max_new_tokens=task.max_new_tokens)
    responses, _ = best_of_n(load_causal_lm(sft).eval(), envs, SequenceClassifierReward(rm), args.n,
                             np.arange(len(prompts)), torch.Generator().manual_seed(0), temperature)
    bon_golds = task.gold(prompts, responses)
    bon_gold, bon_se = float(np.mean(bon_golds)), float(np.std(bon_golds) / np.sqrt(len(bon_golds)))
    sft_eval = evaluate(EvalConfig(policy=sft, task=args.task, num_prompts=args.num_prompts, temperature=temperature))
    print(f"SFT: gold {sft_eval['gold_mean']:+.3f} | best-of-{args.n}: gold {bon_gold:+.3f} ± {bon_se:.3f} (s.e.) "
          f"at KL {best_of_n_kl(args.n):.2f}, over {len(prompts)} test prompts")

    results = []
    for seed in args.seeds:
        overrides = {k: v for k, v in (("iterations", args.iterations), ("lr", args.lr)) if v is not None}
        cfg = PPOConfig(policy=sft, reward=rm, task=args.task, out_dir=str(out / f"ppo_seed{seed}"), seed=seed,
                        **overrides)
        final = ppo(cfg)
        e = evaluate(EvalConfig(policy=str(final), reference=sft, reward=rm, task=args.task,
                                num_prompts=args.num_prompts, temperature=temperature, seed=seed))
        rows = read_metrics(out / f"ppo_seed{seed}" / "metrics.jsonl")
        plot_curves(rows, ["objective/gold", "objective/scores"], out / f"seed{seed}_scores.png", f"PPO seed {seed}")
        plot_curves(rows, ["objective/kl"], out / f"seed{seed}_kl.png", f"PPO seed {seed}: KL to SFT")
        r = {"seed": seed, "ppo_gold": e["gold_mean"], "ppo_gold_se": e["gold_std"] / np.sqrt(len(prompts)),
             "ppo_proxy": e["proxy_mean"], "ppo_kl": e["kl_to_reference"],
             "kl_target": cfg.kl_target, "beats_bon": e["gold_mean"] > bon_gold,
             "kl_under_target": cfg.kl_target is None or e["kl_to_reference"] < cfg.kl_target,
             "train_end": {k: rows[-1][k]
                           for k in ("objective/gold", "objective/scores", "objective/kl", "objective/kl_coef")}}
        results.append(r)
        print(f"seed {seed}: PPO gold {r['ppo_gold']:+.3f} ± {r['ppo_gold_se']:.3f} (proxy {r['ppo_proxy']:+.3f}) "
              f"at KL {r['ppo_kl']:.2f} "
              f"-> beats best-of-{args.n}: {r['beats_bon']}, KL under target {cfg.kl_target}: {r['kl_under_target']}")
    summary = {"bench": "ppo_learning", "args": vars(args), "sft_gold": sft_eval["gold_mean"], "bon_gold": bon_gold,
               "bon_gold_se": bon_se,
               "bon_kl": best_of_n_kl(args.n), "seeds": results,
               "all_seeds_beat_bon_under_target": all(r["beats_bon"] and r["kl_under_target"] for r in results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
