"""Data-parallel scaling of SFT: training tokens/s of 1 process against N processes (default 2), same global batch.

Both runs are real launches of the unchanged trainer: `python -m agents.sft` and
`torchrun --standalone --nproc_per_node N -m agents.sft`, with the same settings and seed, into fresh run folders.
The figure is the trainer's own `charts/tokens_per_s` (non-pad tokens of the global batch per second of training
steps; evaluation and checkpointing excluded), the median over its log windows after the first (warm-up). On CPU
the thread budget is split: 1 process gets `--threads` threads, each of N processes `--threads // N`, so the ratio
measures what DDP does with the same cores. With GPUs each process takes one (1 GPU against N).

    python -m benchmarks.scaling                                   # small preset, sentiment demonstrations
    python -m benchmarks.scaling --model runs/pretrain/model --nproc 4 --threads 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def sft_args(args: argparse.Namespace, model: Path, out_dir: Path) -> list[str]:
    return ["--model", str(model), "--out-dir", str(out_dir), "--task", args.task, "--batch-size", str(args.batch_size),
            "--max-steps", str(args.max_steps), "--log-every", str(args.log_every), "--eval-every", str(args.max_steps),
            "--eval-batches", "1", "--save-every", str(args.max_steps), "--bf16" if args.bf16 else "--no-bf16",
            "--seed", "0"]


def tokens_per_s(out_dir: Path) -> tuple[float, int]:
    """Median charts/tokens_per_s over the log windows after the first, and how many windows that is."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["charts/tokens_per_s"] for r in rows if "charts/tokens_per_s" in r][1:]
    if not values:
        raise ValueError(f"{out_dir}: fewer than 2 log windows; raise --max-steps or lower --log-every")
    return statistics.median(values), len(values)


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="causal LM folder to fine-tune (default: a fresh --preset model)")
    parser.add_argument("--preset", default="small", help="preset of the fresh model when --model is not given")
    parser.add_argument("--task", default="sentiment", help="embedded task whose demonstrations to train on")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all, split over processes")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (demonstrations per step)")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--work", default="runs/bench-scaling", help="folder for the model and both runs (rewritten)")
    args = parser.parse_args()
    if args.batch_size % args.nproc:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by --nproc {args.nproc}")
    if args.threads < args.nproc:
        raise ValueError(f"--threads {args.threads} must be >= --nproc {args.nproc} (one thread per process at least)")
    work = Path(args.work)
    if args.model is None:
        from textenv.embedded import default_tokenizer
        from textenv.models import build_model

        model, tokenizer = work / f"base-{args.preset}", default_tokenizer()
        build_model(args.preset, tokenizer, seed=0).save_pretrained(model)
        tokenizer.save_pretrained(model)
    else:
        model = Path(args.model)
    print(f"scaling: SFT of {model} on {args.task}, global batch {args.batch_size}, {args.max_steps} steps, "
          f"bf16={args.bf16}, {args.threads} threads: 1 process x {args.threads} vs {args.nproc} x "
          f"{args.threads // args.nproc}")

    result = {"bench": "scaling", "args": vars(args), "runs": {}}
    for nproc in (1, args.nproc):
        out_dir = work / f"sft-{nproc}proc"
        shutil.rmtree(out_dir, ignore_errors=True)
        launcher = ([sys.executable, "-m", "agents.sft"] if nproc == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                     "-m", "agents.sft"])
        wall = run(launcher + sft_args(args, model, out_dir), threads=args.threads // nproc)
        tps, windows = tokens_per_s(out_dir)
        result["runs"][nproc] = {"tokens_per_s": tps, "windows": windows, "wall_s": wall,
                                 "threads_per_process": args.threads // nproc}
        print(f"{nproc} process(es): {tps:,.0f} tokens/s (median of {windows} windows), wall {wall:.0f} s")
    ratio = result["runs"][args.nproc]["tokens_per_s"] / result["runs"][1]["tokens_per_s"]
    result["speedup"] = ratio
    print(f"speedup {args.nproc} processes / 1 process: {ratio:.2f}x (ideal {args.nproc}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
