"""PPO with LoRA against full fine-tuning at equal settings: peak RSS and seconds per iteration, side by side.

Full fine-tuning holds the policy, a frozen reference copy, the value model and the reward model, plus gradients and
Adam's two moments of the policy and the value model: ten copies of the weights. LoRA (`--lora.rank`) trains
adapters on the policy and the value model; the reference is the policy with its adapter off, so it holds three
copies and the adapters' small state. The gap shows where the weights dominate the process, so the model here is a
Llama of width 1024 and 8 layers (97M parameters, 388 MB in fp32; `--width`, `--layers`), randomly initialised
(built once, in the parent process), in the anchor's batch shapes (32 episodes, 16-token prompts, 48-token
responses, 1 epoch), with PPO's default 4 minibatches and micro-batches of 8 (`--num-minibatches 1` for the anchor's
one). Each run is its own process, so peak RSS is its own; the runs alternate full, LoRA, full, ... so drift on a
noisy VM hits both alike.

    python -m benchmarks.lora_memory                   # rank 8, 2 measured iterations after 1 warm-up
    python -m benchmarks.lora_memory --rank 16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def build(work: Path, width: int, layers: int) -> float:
    """The policy and reward model folders (a Llama of `width` and `layers`, random weights) and the prompts, made
    in the parent so that no worker's peak RSS holds their construction. Returns the policy's parameters (M)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from benchmarks.env_throughput import fixed_length_prompts
    from textenv.embedded import default_tokenizer
    from textenv.tasks import get_task

    tok = default_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=round(8 * width / 3 / 64) * 64,
                         num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 128,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(work / "policy")
    tok.save_pretrained(work / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    prompts = fixed_length_prompts(tok, get_task("sentiment").prompts("train"), 16)
    (work / "prompts.txt").write_text("\n".join(prompts))
    return sum(p.numel() for p in policy.parameters()) / 1e6


def worker(args) -> dict:
    import torch

    from agents.lora import LoRAConfig
    from agents.ppo import PPOConfig, ppo
    from textenv.models import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the `textenv` command does
    work = Path(args.work)
    run = work / f"run-{args.rank}"
    try:
        iterations = 1 + args.iterations
        ppo(PPOConfig(policy=str(work / "policy"), reward=str(work / "rm"), out_dir=str(run),
                      prompts=str(work / "prompts.txt"), num_envs=32, num_minibatches=args.num_minibatches,
                      update_epochs=1,
                      micro_batch_size=8, max_new_tokens=48, temperature=1.0, missing_eos_penalty=None,
                      iterations=iterations, save_every=iterations, sample_every=iterations, device="cpu",
                      lora=LoRAConfig(rank=args.rank)))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        return {"rank": args.rank, "sec_per_iter": statistics.median(r["time/iteration_s"] for r in rows),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the LoRA runs (the full runs: 0)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2, help="measured iterations, after one warm-up")
    parser.add_argument("--num-minibatches", type=int, default=4,
                        help="PPO's default; 1 is the anchor's speed setting, where the first minibatch's value "
                             "forward, kept with its graph for the update, spans the whole batch")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    work = Path(tempfile.mkdtemp(prefix="lora_memory_"))
    runs = {"full": [], "lora": []}
    try:
        params = build(work, args.width, args.layers)
        for _ in range(args.repeats):
            for side, rank in (("full", 0), ("lora", args.rank)):
                cmd = [sys.executable, "-m", "benchmarks.lora_memory", "--worker", "--work", str(work),
                       "--rank", str(rank), "--iterations", str(args.iterations), "--threads", str(args.threads),
                       "--num-minibatches", str(args.num_minibatches)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{side}: {runs[side][-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("sec_per_iter", "peak_rss_mib")}
           for side, rs in runs.items()}
    full, lora = med["full"], med["lora"]
    print(f"PPO, Llama {params:.0f}M params: full fine-tuning {full['peak_rss_mib']:,.0f} MiB "
          f"peak RSS, {full['sec_per_iter']:.2f} s/iter | LoRA rank {args.rank} {lora['peak_rss_mib']:,.0f} MiB, "
          f"{lora['sec_per_iter']:.2f} s/iter | RSS x{lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}, "
          f"s/iter x{lora['sec_per_iter'] / full['sec_per_iter']:.2f}")
    print(json.dumps({"bench": "lora_memory", "args": vars(args), "runs": runs}))


if __name__ == "__main__":
    main()
