"""PPO speed in the anchor setting, side by side with Hugging Face TRL's PPOTrainer (TRL 1.12.0).

Setting (both sides): GPT-2 with 4 layers, width 256, 4 heads, vocab 4096 for the policy, the reference, a
separate value model and the reward model, all randomly initialised; 32 episodes per iteration, 16-token prompts,
48-token responses, temperature 1, fixed KL coefficient 0.05, lr 1e-5, fp32, 1 minibatch, 1 and 4 update epochs.
Each run is its own process (so peak RSS is its own); runs are interleaved ours/TRL so drift hits both alike.

    python -m benchmarks.ppo_speed                                   # ours only
    python -m benchmarks.ppo_speed --trl-script ../shared/anchors/trl_baseline/bench_trl.py \\
        --trl-pythonpath ../shared/anchors/trl_baseline/.trl112      # + TRL (pip install trl; setup_trl_ppo.sh)

TRL is never a dependency of textenv: it runs only in its own subprocess, when asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(args) -> dict:
    import torch
    from transformers import GPT2ForSequenceClassification

    from agents.ppo import PPOConfig, ppo
    from benchmarks.env_throughput import fixed_length_prompts
    from textenv.embedded import default_tokenizer
    from textenv.models import build_model, preset_config
    from textenv.tasks import get_task

    torch.set_num_threads(args.threads)
    tok = default_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="ppo_speed_"))
    build_model("small", tok, seed=0).save_pretrained(work / "policy")
    tok.save_pretrained(work / "policy")
    torch.manual_seed(1)
    rm_config = preset_config("small", tok)
    rm_config.num_labels = 1
    GPT2ForSequenceClassification(rm_config).save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    prompts = fixed_length_prompts(tok, get_task("sentiment").prompts("train"), args.prompt_len)
    (work / "prompts.txt").write_text("\n".join(prompts))
    iterations = args.warmup + args.iterations
    cfg = PPOConfig(
        policy=str(work / "policy"), reward=str(work / "rm"), out_dir=str(work / "run"), prompts=str(work / "prompts.txt"),
        num_envs=args.batch, num_minibatches=1, update_epochs=args.epochs, max_new_tokens=args.response_len,
        temperature=1.0, kl_coef=0.05, kl_target=None, lr=1e-5, missing_eos_penalty=None, iterations=iterations,
        save_every=iterations, sample_every=iterations, device="cpu",
    )
    ppo(cfg)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        "side": "textenv",
        "epochs": args.epochs,
        "sec_per_iter_median": med("time/iteration_s"),
        "rollout_sec_median": med("time/rollout_s"),
        "update_sec_median": med("time/update_s"),
        "rollout_tokens_per_s": med("charts/rollout_tokens_per_s"),
        "mean_response_tokens": med("charts/episode_length"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=5, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured leading iterations")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-script", default=None, help="path to the anchor's bench_trl.py (runs TRL side by side)")
    parser.add_argument("--trl-pythonpath", default=None, help="folder holding TRL 1.12.0 (setup_trl_ppo.sh)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.epochs = args.epochs[0]  # a worker runs one setting
        print(json.dumps(worker(args)))
        return

    common = ["--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--iterations", str(args.iterations),
              "--warmup", str(args.warmup), "--threads", str(args.threads)]
    results = []
    for epochs in args.epochs:
        ours = run_json([sys.executable, "-m", "benchmarks.ppo_speed", "--worker", "--epochs", str(epochs),
                         "--response-len", str(args.response_len), *common])
        results.append(ours)
        line = (f"epochs={epochs}: textenv {ours['sec_per_iter_median']:.3f} s/iter, rollout "
                f"{ours['rollout_tokens_per_s']:,.0f} tok/s, peak RSS {ours['peak_rss_mib']:,.0f} MiB")
        if args.trl_script:
            env = {"PYTHONPATH": args.trl_pythonpath or "", "TRL_EXPERIMENTAL_SILENCE": "1"}
            trl = run_json([sys.executable, args.trl_script, "--trainer", "ppo", "--ppo-epochs", str(epochs),
                            "--response-len", str(args.response_len), *common], env)
            trl = {"side": "trl", "epochs": epochs, "sec_per_iter_median": trl["sec_per_iter_median"],
                   "rollout_tokens_per_s": trl["rollout_tokens_per_s"], "peak_rss_mib": trl["peak_rss_mib"],
                   "trl_version": trl.get("trl_version_used")}
            results.append(trl)
            line += (f" | TRL {trl['sec_per_iter_median']:.3f} s/iter, rollout {trl['rollout_tokens_per_s']:,.0f} tok/s, "
                     f"peak RSS {trl['peak_rss_mib']:,.0f} MiB | speed-up x{trl['sec_per_iter_median'] / ours['sec_per_iter_median']:.2f}, "
                     f"rollout x{ours['rollout_tokens_per_s'] / trl['rollout_tokens_per_s']:.2f}, "
                     f"RSS x{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}")
        print(line, flush=True)
    print(json.dumps({"bench": "ppo_speed", "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
