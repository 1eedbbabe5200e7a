"""Our PPO, GRPO and RLOO side by side with Hugging Face TRL's trainers, in the anchor setting.

Setting (both sides): GPT-2 with 4 layers, width 256, 4 heads, vocab 4096 (`--arch llama`: the Llama preset of the
same width and depth, as the anchor's `--arch llama` builds it) for the policy, the reference, the reward model and
(PPO) a separate value model, all randomly initialised; 32 completions per iteration
(GRPO/RLOO: 8 prompts x 4), 16-token prompts, 48-token responses, temperature 1, KL coefficient 0.05, lr 1e-5,
fp32, 1 minibatch, 1 and 4 update epochs, each minibatch in one forward/backward pass (TRL's
per_device_train_batch_size is the batch, with no gradient accumulation; ours runs with micro_batch_size None;
`--micro-batch 8`, our trainers' default, measures ours with less memory). Each run is its own process (so peak
RSS is its own); the runs are interleaved ours/TRL so drift on a noisy VM hits both alike. Both sides run with the
same malloc settings: `GLIBC_TUNABLES` in their environment, the `textenv` command's own (keep freed memory,
`textenv.models.runtime.KEEP_FREED_TUNABLES`) unless you set yours, which both then get. The rollout time means the
same on both sides: generation, reference, reward and value forwards (TRL's PPO: up to its first forward with
gradients; ours counts the first minibatch's value forward, which keeps its graph for the update, in the rollout).
Each worker's temporary folder (models, run folder) is deleted when it ends. TRL runs through the
anchor's `bench_trl.py` (shared/anchors/trl_baseline): PPO needs TRL 1.12.0 (the last with PPO), GRPO/RLOO a current
TRL (1.16.0).

    python -m benchmarks.trl_speed --algos ppo grpo rloo                        # ours only
    python -m benchmarks.trl_speed --arch llama                                 # the Llama preset
    pip install --no-deps --target .trl112 trl==1.12.0; pip install --no-deps --target .trl116 trl==1.16.0
    python -m benchmarks.trl_speed --trl-script ../shared/anchors/trl_baseline/bench_trl.py \\
        --trl-pythonpath ppo=.trl112 grpo=.trl116 rloo=.trl116

TRL is never a dependency of textenv: it runs only in its own subprocess, when asked for.

Beside each pair it prints the GEMM floor of the setting (benchmarks/gemm_floor.py), timed in this process
between the runs: the matrix multiplies every implementation must do, at this machine's measured GEMM speed.
TRL's time over the floor is the largest speed-up over TRL that equal FLOPs allow here, and twice the floor over
TRL's time the share of the floor's speed that x2 takes. Given 1 and E epochs (the default 1 and 4), it prints what
each epoch past the first costs, ours, TRL's and the floor's, and the most x TRL at E epochs if every extra epoch ran
at its floor and our first as measured: where that is under 2, no kernel work on the update reaches x2 there.
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


def worker(args) -> dict:
    import torch

    from textenv.models import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the `textenv` command does; a no-op under the GLIBC_TUNABLES main() sets
    work = Path(tempfile.mkdtemp(prefix="trl_speed_"))
    try:
        return run_worker(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_worker(args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from benchmarks.env_throughput import fixed_length_prompts
    from textenv.embedded import default_tokenizer
    from textenv.models import build_model, preset_config
    from textenv.tasks import get_task

    tok = default_tokenizer()
    build_model("small", tok, seed=0, arch=args.arch).save_pretrained(work / "policy")
    tok.save_pretrained(work / "policy")
    torch.manual_seed(1)
    rm_config = preset_config("small", tok, args.arch)
    rm_config.num_labels = 1
    AutoModelForSequenceClassification.from_config(rm_config).save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    prompts = fixed_length_prompts(tok, get_task("sentiment").prompts("train"), args.prompt_len)
    (work / "prompts.txt").write_text("\n".join(prompts))
    iterations = args.warmup + args.iterations
    common = dict(policy=str(work / "policy"), reward=str(work / "rm"), out_dir=str(work / "run"),
                  prompts=str(work / "prompts.txt"), num_minibatches=1, update_epochs=args.epochs,
                  max_new_tokens=args.response_len, temperature=1.0, lr=1e-5, missing_eos_penalty=None,
                  micro_batch_size=args.micro_batch,
                  iterations=iterations, save_every=iterations, sample_every=iterations, device="cpu")
    if args.algo == "ppo":
        from agents.ppo import PPOConfig, ppo

        ppo(PPOConfig(num_envs=args.batch, kl_coef=args.beta, kl_target=None, **common))
    else:
        if args.algo == "grpo":
            from agents.grpo import GRPOConfig as Config
            from agents.grpo import grpo as run

            kl = {"beta": args.beta}
        else:
            from agents.rloo import RLOOConfig as Config
            from agents.rloo import rloo as run

            kl = {"kl_coef": args.beta}
        run(Config(num_prompts=args.batch // args.num_generations, num_generations=args.num_generations, **kl,
                   **common))
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        "side": "textenv",
        "algo": args.algo,
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
    parser.add_argument("--algos", nargs="+", default=["ppo", "grpo", "rloo"], choices=["ppo", "grpo", "rloo"])
    parser.add_argument("--batch", type=int, default=32, help="completions per iteration")
    parser.add_argument("--num-generations", type=int, default=4, help="GRPO/RLOO completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--beta", type=float, default=0.05,
                        help="KL coefficient (PPO kl_coef, GRPO beta, RLOO kl_coef)")
    parser.add_argument("--iterations", type=int, default=5, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured leading iterations")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="our rows per forward/backward pass (default: the whole minibatch, as TRL runs it)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved ours/TRL pairs per setting (medians reported)")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="the small preset's architecture")
    parser.add_argument("--trl-script", default=None, help="path to the anchor's bench_trl.py (runs TRL side by side)")
    parser.add_argument("--trl-pythonpath", nargs="*", default=[], metavar="ALGO=DIR",
                        help="where each algorithm's TRL lives, e.g. ppo=.trl112 grpo=.trl116 rloo=.trl116")
    parser.add_argument("--algo", default="ppo", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.epochs = args.epochs[0]  # a worker runs one setting
        print(json.dumps(worker(args)))
        return
    trl_paths = dict(item.split("=", 1) for item in args.trl_pythonpath)
    import torch

    from textenv.models.runtime import KEEP_FREED_TUNABLES

    tunables = os.environ.get("GLIBC_TUNABLES") or KEEP_FREED_TUNABLES
    malloc_env = {"GLIBC_TUNABLES": tunables}  # the same allocator on both sides
    print(f"both sides run with GLIBC_TUNABLES={tunables}", flush=True)

    from benchmarks.gemm_floor import Setting, floor_seconds, iteration_gemms
    from textenv.embedded import default_tokenizer
    from textenv.models import preset_config

    torch.set_num_threads(args.threads)
    c = preset_config("small", default_tokenizer(), args.arch)  # the models the workers build
    setting = Setting.of(c, batch=args.batch, prompt_len=args.prompt_len, response_len=args.response_len)
    common = ["--arch", args.arch, "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
              "--response-len", str(args.response_len), "--iterations", str(args.iterations),
              "--warmup", str(args.warmup), "--threads", str(args.threads),
              "--beta", str(args.beta), "--num-generations", str(args.num_generations)]
    ours_only = [] if args.micro_batch is None else ["--micro-batch", str(args.micro_batch)]
    results = []
    for algo in args.algos:
        for epochs in args.epochs:
            floors, ours, trl = [], [], []
            for _ in range(args.repeats):  # ours, TRL, ours, TRL, ...: drift on a noisy VM hits both sides alike
                # re-timed each repeat, in the machine's state of the moment
                floors.append(floor_seconds(iteration_gemms(algo, setting, epochs))["total"])
                ours.append(run_json([sys.executable, "-m", "benchmarks.trl_speed", "--worker", "--algo", algo,
                                      "--epochs", str(epochs), *common, *ours_only], malloc_env))
                if args.trl_script:
                    env = {**malloc_env, "PYTHONPATH": trl_paths.get(algo, ""), "TRL_EXPERIMENTAL_SILENCE": "1"}
                    out = run_json([sys.executable, args.trl_script, "--trainer", algo, "--ppo-epochs", str(epochs),
                                    *common], env)
                    trl.append({"side": "trl", "algo": algo, "epochs": epochs,
                                "sec_per_iter_median": out["sec_per_iter_median"],
                                "rollout_tokens_per_s": out["rollout_tokens_per_s"],
                                "peak_rss_mib": out["peak_rss_mib"],
                                "trl_version": out.get("trl_version_used")})
            results.append({"algo": algo, "epochs": epochs, "gemm_floor_s": floors, "textenv": ours, "trl": trl})
            print(summary_line(algo, epochs, floors, ours, trl), flush=True)
        medians = {r["epochs"]: medians_of(r) for r in results if r["algo"] == algo and r["trl"]}
        for epochs in sorted(medians):
            if 1 in medians and epochs > 1:
                print(extra_epochs_line(algo, extra_epochs(medians[1], medians[epochs])), flush=True)
    print(json.dumps({"bench": "trl_speed", "args": vars(args), "results": results}))


def medians_of(result: dict) -> dict:
    """One setting's medians over its repeats, as `extra_epochs` takes them."""
    med = lambda runs: statistics.median(r["sec_per_iter_median"] for r in runs)  # noqa: E731
    return {"epochs": result["epochs"], "ours": med(result["textenv"]), "trl": med(result["trl"]),
            "floor": statistics.median(result["gemm_floor_s"])}


def summary_line(algo: str, epochs: int, floors: list[float], ours: list[dict], trl: list[dict]) -> str:
    """Medians over the repeats (each repeat's figure is itself the median of its measured iterations)."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    floor, sec = statistics.median(floors), med(ours, "sec_per_iter_median")
    each = lambda runs: "/".join(f"{r['sec_per_iter_median']:.2f}" for r in runs)  # noqa: E731
    line = (f"{algo} epochs={epochs} ({len(ours)} repeats): GEMM floor {floor:.3f} s/iter | textenv {sec:.3f} s/iter "
            f"[{each(ours)}] ({floor / sec:.0%} of floor speed), "
            f"rollout {med(ours, 'rollout_tokens_per_s'):,.0f} tok/s, "
            f"peak RSS {med(ours, 'peak_rss_mib'):,.0f} MiB")
    if trl:
        trl_sec = med(trl, "sec_per_iter_median")
        line += (f" | TRL {trl[0]['trl_version']} {trl_sec:.3f} s/iter [{each(trl)}], rollout "
                 f"{med(trl, 'rollout_tokens_per_s'):,.0f} tok/s, peak RSS {med(trl, 'peak_rss_mib'):,.0f} MiB | "
                 f"speed-up x{trl_sec / sec:.2f}, "
                 f"rollout x{med(ours, 'rollout_tokens_per_s') / med(trl, 'rollout_tokens_per_s'):.2f}, "
                 f"RSS x{med(ours, 'peak_rss_mib') / med(trl, 'peak_rss_mib'):.2f}, "
                 f"most equal FLOPs allow x{trl_sec / floor:.2f}, x2 needs {2 * floor / trl_sec:.0%} of floor speed")
    return line


def extra_epochs(one: dict, many: dict) -> dict:
    """What each update epoch past the first costs, from a setting run at 1 and at E > 1 epochs: our seconds, TRL's
    and the GEMM floor's per extra epoch (the s/iter difference over E - 1), and `bound`, the largest speed-up over
    TRL at E epochs if our first epoch cost what it measured and every extra one ran at its floor. `one`, `many`:
    {"epochs", "ours", "trl", "floor"}, each a median s/iter."""
    E = many["epochs"]
    if one["epochs"] != 1 or E <= 1:
        raise ValueError(f"extra_epochs needs a 1-epoch and a more-epoch setting, got {one['epochs']} and {E}")
    per = {side: (many[side] - one[side]) / (E - 1) for side in ("ours", "trl", "floor")}
    return {**per, "epochs": E, "speedup": per["trl"] / per["ours"],
            "floor_share": per["floor"] / per["ours"], "bound": many["trl"] / (one["ours"] + (E - 1) * per["floor"])}


def extra_epochs_line(algo: str, s: dict) -> str:
    """`extra_epochs`' figures as the line the benchmark prints."""
    E = s["epochs"]
    return (f"{algo} each epoch past the first (from 1 and {E}): textenv {s['ours']:.3f} s, "
            f"TRL {s['trl']:.3f} s (x{s['speedup']:.2f}), floor {s['floor']:.3f} s "
            f"({s['floor_share']:.0%} of floor speed) | at {E} epochs, with our first epoch as measured and every "
            f"other at its floor: at most x{s['bound']:.2f}")


if __name__ == "__main__":
    main()
