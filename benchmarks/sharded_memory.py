"""PPO's peak memory per process: 1 process, 2 replicated processes (`--parallel ddp`), 2 sharded ones
(`--parallel fsdp`, FSDP2) and 2 sharded ones with the frozen reference sharded too (`--shard-reference`), at equal
settings, with seconds per iteration.

Replicated, every process holds the policy, the value model, their gradients and Adam's two moments (eight copies of
the weights), the frozen reference and the reward model. Sharded, it holds 1/N of those eight, a plain replica of
the policy to sample from (synced from the shards each iteration, `agents.sharding.sync_replica`), and the
replicated reference and reward model: five copies and 8/N against ten at N = 1. The model is the `lora_memory`
benchmark's Llama (width 1024, 8 layers, 97M parameters, random weights, built once in the parent; `--width`,
`--layers`) in the anchor's batch shapes (32 episodes, 16-token prompts, 48-token responses, 1 epoch, 4
minibatches, micro-batches of 8). Each run is a real launch (`torchrun --standalone --nproc_per_node 2`) of the
unchanged trainer; each process reports its own peak RSS (`getrusage`). On CPU the cores are split: 1 process gets
`--threads`, each of 2 `--threads // 2`, so s/iter compares what the same cores do. Run it alone: it launches two
torch processes at a time.

    python -m benchmarks.sharded_memory                 # 1 measured iteration after 1 warm-up
    python -m benchmarks.sharded_memory --width 512 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.lora_memory import build


def worker(args) -> None:
    import torch

    from agents.ppo import PPOConfig, ppo
    from agents.run import distributed_state
    from textenv.models import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the `textenv` command does
    work, rank = Path(args.work), int(os.environ.get("RANK", "0"))
    run = work / f"run-{args.label}"
    iterations = 1 + args.iterations
    ppo(PPOConfig(policy=str(work / "policy"), reward=str(work / "rm"), out_dir=str(run),
                  prompts=str(work / "prompts.txt"), num_envs=32, num_minibatches=4, update_epochs=1,
                  micro_batch_size=8, max_new_tokens=48, temperature=1.0, missing_eos_penalty=None,
                  iterations=iterations, save_every=iterations, sample_every=iterations, device="cpu",
                  parallel=args.parallel, shard_reference=args.shard_reference))
    distributed_state().wait_for_everyone()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    report = {"rank": rank, "sec_per_iter": statistics.median(r["time/iteration_s"] for r in rows),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (work / f"{args.label}-rank{rank}.json").write_text(json.dumps(report))


def launch(work: Path, label: str, nproc: int, parallel: str, shard_reference: bool, args) -> list[dict]:
    threads = max(1, args.threads // nproc)
    inner = ["-m", "benchmarks.sharded_memory", "--worker", "--work", str(work), "--label", label, "--parallel",
             parallel, "--iterations", str(args.iterations), "--threads", str(threads),
             *(["--shard-reference"] if shard_reference else [])]
    cmd = ([sys.executable, *inner] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *inner])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    shutil.rmtree(work / f"run-{label}", ignore_errors=True)
    return [json.loads((work / f"{label}-rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=1, help="measured iterations, after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over the processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--shard-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    work = Path(tempfile.mkdtemp(prefix="sharded_memory_"))
    runs = {}
    try:
        params = build(work, args.width, args.layers)
        for label, nproc, parallel, shard_reference in (("one", 1, "ddp", False), ("ddp2", 2, "ddp", False),
                                                        ("fsdp2", 2, "fsdp", False), ("fsdp2_ref", 2, "fsdp", True)):
            runs[label] = launch(work, label, nproc, parallel, shard_reference, args)
            print(f"{label}: {runs[label]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = {label: max(r["peak_rss_mib"] for r in rs) for label, rs in runs.items()}
    secs = {label: rs[0]["sec_per_iter"] for label, rs in runs.items()}
    print(f"PPO, Llama {params:.0f}M params, peak RSS per process (max over processes) and s/iter: "
          f"1 process {peak['one']:,.0f} MiB, {secs['one']:.1f} s | 2 replicated {peak['ddp2']:,.0f} MiB, "
          f"{secs['ddp2']:.1f} s | 2 sharded {peak['fsdp2']:,.0f} MiB, {secs['fsdp2']:.1f} s "
          f"(x{peak['fsdp2'] / peak['ddp2']:.2f}) | "
          f"2 sharded with the reference {peak['fsdp2_ref']:,.0f} MiB, {secs['fsdp2_ref']:.1f} s "
          f"(x{peak['fsdp2_ref'] / peak['ddp2']:.2f} of replicated)")
    print(json.dumps({"bench": "sharded_memory", "args": vars(args), "runs": runs}))


if __name__ == "__main__":
    main()
