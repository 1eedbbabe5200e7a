"""Stages 1 and 2 on the default preset: pretraining wall time and validation perplexity, SFT wall time and
validation loss per task, and the gold-score distribution of SFT samples on each task.

    python -m benchmarks.pretrain_sft                      # small preset, all three tasks, into runs/bench-stages
    python -m benchmarks.pretrain_sft --tasks sentiment --preset tiny
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from agents.evaluate import EvalConfig, evaluate
from agents.pretrain import PretrainConfig, pretrain
from agents.sft import SFTConfig, sft
from textenv.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS))
    parser.add_argument("--work", default="runs/bench-stages", help="run folder; completed stages are reused")
    parser.add_argument("--n-samples", type=int, default=256, help="SFT samples per task for the gold distribution")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    work = Path(args.work)

    start = time.perf_counter()
    model = pretrain(PretrainConfig(out_dir=str(work / "pretrain"), preset=args.preset))
    pre = json.loads((work / "pretrain" / "summary.json").read_text())
    print(f"pretrain ({args.preset}): {pre['wall_time_s']:.0f} s, valid perplexity {pre['valid_perplexity']:.2f} "
          f"(this process: {time.perf_counter() - start:.0f} s)")
    result = {"bench": "pretrain_sft", "args": vars(args), "pretrain": pre, "tasks": {}}
    for name in args.tasks:
        folder = sft(SFTConfig(out_dir=str(work / f"sft_{name}"), model=str(model), task=name))
        summary = json.loads((work / f"sft_{name}" / "summary.json").read_text())
        e = evaluate(EvalConfig(policy=str(folder), task=name, num_prompts=args.n_samples,
                                temperature=args.temperature))
        result["tasks"][name] = {"sft_wall_time_s": summary["wall_time_s"], "sft_valid_loss": summary["valid_loss"],
                                 "gold_mean": e["gold_mean"], "gold_std": e["gold_std"], "eos_rate": e["eos_rate"],
                                 "samples": e["samples"][:10]}
        print(f"sft {name}: {summary['wall_time_s']:.0f} s, valid loss {summary['valid_loss']:.3f}; SFT samples' gold "
              f"mean {e['gold_mean']:+.3f} std {e['gold_std']:.3f} (n={e['n']}, T={args.temperature}), "
              f"EOS rate {e['eos_rate']:.2f}")
        for s in e["samples"][:10]:
            print(f"    {s['prompt']!r} -> {s['response']!r}  (gold {s['gold']:+.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
