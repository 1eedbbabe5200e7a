"""Stage 3 end to end on the sentiment task: collect ranked comparisons from an SFT policy, train the reward model.

The SFT policy is `--sft PATH`, or else is made once with the library's own stages (pretrain, then SFT, both at
their defaults: the `small` preset) under `--work`, and reused by later runs. Comparisons and the reward model are
redone every run (`--work`/comparisons, `--work`/rm), so their timings are fresh.

Reports: comparisons kept and skipped, collection time, RM training time (the optimisation loop) and the stage's
whole wall time (plus normalisation and evaluation), held-out pairwise accuracy, the annotator's ceiling on the
same pairs (how often the gold itself agrees with the noisy labels), their ratio, and the Spearman correlation of
RM and gold on fresh SFT samples of valid prompts. Targets: ratio >= 0.95, training <= 120 s on 2 CPU cores.

    python -m benchmarks.reward_model --work runs/bench-rm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from agents.comparisons import CollectConfig, collect_comparisons
from agents.reward_model import RMConfig, train_reward_model
from agents.run import is_complete


def sft_policy(work: Path) -> Path:
    """work/sft/model, made by pretrain + SFT at their defaults unless a complete one is there (whatever defaults
    made it: the cache outlives changes to those stages)."""
    from agents.pretrain import PretrainConfig, pretrain
    from agents.sft import SFTConfig, sft

    if is_complete(work / "sft"):
        return work / "sft" / "model"
    base = pretrain(PretrainConfig(out_dir=str(work / "pretrain"), preset="small"))
    return sft(SFTConfig(out_dir=str(work / "sft"), model=str(base), task="sentiment"))


def main() -> None:
    collect_defaults, rm_defaults = CollectConfig(), RMConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-rm", help="cache folder for the SFT policy and the runs")
    parser.add_argument("--sft", default=None, help="an SFT policy folder to use instead of making one")
    parser.add_argument("--num-prompts", type=int, default=collect_defaults.num_prompts)
    parser.add_argument("--k", type=int, default=collect_defaults.k)
    parser.add_argument("--annotator-temperature", type=float, default=collect_defaults.annotator_temperature)
    parser.add_argument("--batch-size", type=int, default=rm_defaults.batch_size)
    parser.add_argument("--lr", type=float, default=rm_defaults.lr)
    parser.add_argument("--epochs", type=int, default=rm_defaults.epochs)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(args.work)
    policy = Path(args.sft) if args.sft else sft_policy(work)
    collect = CollectConfig(out_dir=str(work / "comparisons"), policy=str(policy), task="sentiment",
                            num_prompts=args.num_prompts, k=args.k, annotator_temperature=args.annotator_temperature,
                            overwrite=True)
    data = collect_comparisons(collect)
    rm = RMConfig(out_dir=str(work / "rm"), data=str(data), model=str(policy), task="sentiment",
                  batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, overwrite=True)
    train_reward_model(rm)
    c = json.loads((work / "comparisons" / "summary.json").read_text())
    s = json.loads((work / "rm" / "summary.json").read_text())
    result = {
        "benchmark": "reward_model", "task": "sentiment", "sft": str(policy), "threads": args.threads,
        "k": args.k, "annotator_temperature": args.annotator_temperature,
        "prompts": c["prompts"], "comparisons_kept": c["kept"], "comparisons_skipped": c["skipped"],
        "label_gold_agreement": c["label_gold_agreement"], "collection_s": round(c["wall_time_s"], 1),
        "rm_train_s": round(s["train_time_s"], 1), "rm_stage_s": round(s["wall_time_s"], 1), "rm_steps": s["steps"],
        "heldout_pairs": s["heldout_pairs"], "heldout_accuracy": s["heldout_accuracy"],
        "annotator_ceiling": s["annotator_ceiling"], "accuracy_over_ceiling": s["accuracy_over_ceiling"],
        "spearman_with_gold": s["fresh_spearman"], "fresh_rm_mean": s["fresh_rm_mean"],
        "targets_met": {"accuracy_over_ceiling>=0.95": s["accuracy_over_ceiling"] >= 0.95,
                        "rm_train_s<=120": s["train_time_s"] <= 120},
        "rm_config": {k: v for k, v in dataclasses.asdict(rm).items() if k in ("batch_size", "lr", "epochs")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
