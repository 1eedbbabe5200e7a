"""RL algorithms side by side on the same tasks, SFT policies, learned reward models, seeds and budgets.

For every task x algorithm x budget x seed it trains from the task's SFT policy, then samples the test prompts and
scores the samples with the gold scorer and the proxy (the learned RM), with KL to SFT. Best-of-n sampling from the SFT
policy, chosen by the proxy, is the training-free baseline at KL log n - (n-1)/n. It writes:

- results.csv / results.md: one row per algorithm x seed, and the mean +- std over seeds;
- gold_vs_kl.png: gold and proxy gain over SFT against d = sqrt(KL) with the functional forms of Gao et al. 2022
  (arXiv 2210.10760) fitted by least squares, R^2 printed: best-of-n  R(d) = d (a - b d), RL  R(d) = d (a - b log d).
  The RL points are the training curves' (KL, gold, proxy) per iteration of every seed;
- curves.png: gold score per iteration, mean over seeds with a min-max band; cost.png: wall time and tokens/s.

    python -m benchmarks.algorithms --run runs/default          # defaults: 3 seeds, PPO GRPO RLOO DPO BoN SB3
    python -m benchmarks.algorithms --run runs/default --algos ppo grpo --seeds 0
    python -m benchmarks.algorithms --tasks sentiment arithmetic --runs runs/default runs/arithmetic \\
        --iterations 10 20 --algos ppo rloo bon            # tasks x budgets; a subfolder per task, one table over all

Several budgets (--iterations) label the RL rows ppo@10, ppo@20, ...; several tasks write one folder per task
and a results.csv/results.md over all of them.

A --tasks entry may be a multi-turn env id (`textenv/Calculator-v0`, a user's `module:Id` whose turn logic has an
expert): the main job runs on it (`textenv pipeline --task <id>`), the gold is the env's own return, and PPO, GRPO,
RLOO and best-of-n run as on an embedded task (DPO and SB3 are skipped there: they train on re-tokenized text and a
single-turn env).

A --tasks entry may also be a registered env id (`module:Name-v0` imports `module` first, as `gymnasium.make`
does) whose entry point is `TextGenEnv` and whose kwargs name an embedded `task`: that task gives the SFT policy,
the reward model, the gold scorer and the test prompts, while the id's `prompts`, `reward_fn` (a model folder or
a 'module:attr' callable; without it the task's learned RM) and `max_new_tokens` set what the RL algorithms and
SB3 train on; the proxy column is that reward. DPO trains on the task's comparisons either way.

    gymnasium.register("MyLab/TerseReview-v0", entry_point="textenv.env:TextGenEnv",  # in mylab/envs.py
                       kwargs={"task": "sentiment", "max_new_tokens": 12, "reward_fn": "mylab.rewards:terse"})
    python -m benchmarks.algorithms --tasks mylab.envs:MyLab/TerseReview-v0 --run runs/default

Default budget: 1,280 episodes per RL run (20 iterations x 64), DPO one pass over the comparisons, SB3 PPO 6,144
env steps on seed 0 only (no KV cache in SB3: each step is a full forward); 13-17 minutes on the 2-core box.
Needs each task's main-job run folder (sft/model, rm/model, comparisons/): it runs `textenv pipeline --task <task>`
there if missing (about 8 minutes a task here).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from textenv.models import keep_freed_memory

ALGOS = ("ppo", "grpo", "rloo", "dpo", "bon", "sb3")


# ---- the Gao et al. functional forms, fitted by linear least squares in (a, b) ----

def fit_gao(d: np.ndarray, gain: np.ndarray, form: str) -> tuple[float, float, float]:
    """Fit gain = d (a - b d) ("bon") or gain = d (a - b log d) ("rl") to points with d = sqrt(KL) > 0.

    Returns (a, b, R^2). Both forms are linear in (a, b), so ordinary least squares is exact.
    """
    d, gain = np.asarray(d, float), np.asarray(gain, float)
    keep = d > 0  # log d is undefined at 0, and both forms pass through the origin anyway
    d, gain = d[keep], gain[keep]
    if len(d) < 3:
        raise ValueError(f"need at least 3 points with KL > 0 to fit, got {len(d)}")
    if form == "bon":
        X = np.stack([d, -d * d], 1)
    elif form == "rl":
        X = np.stack([d, -d * np.log(d)], 1)
    else:
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    (a, b), *_ = np.linalg.lstsq(X, gain, rcond=None)
    residual = gain - X @ np.array([a, b])
    total = ((gain - gain.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else math.nan
    return float(a), float(b), float(r2)


def gao_curve(d: np.ndarray, a: float, b: float, form: str) -> np.ndarray:
    d = np.asarray(d, float)
    return d * (a - b * d) if form == "bon" else d * (a - b * np.log(np.maximum(d, 1e-12)))


# ---- what a --tasks entry names: an embedded task or a registered TextGenEnv id ----

@dataclasses.dataclass(frozen=True)
class Target:
    """What one --tasks entry benchmarks: an embedded task, or a registered TextGenEnv id built on one."""

    name: str  # as given, minus any 'module:' prefix: the tables' task column
    task: str  # the embedded task: main job (SFT, RM, comparisons), gold scorer, test prompts
    env_id: str  # what SB3 trains in
    reward: str | None = None  # the RL reward and the proxy column; None: the task's learned RM
    prompts: str | None = None  # the RL training prompts; None: the task's train split
    max_new_tokens: int | None = None  # None: the task's
    multi_turn: bool = False  # a multi-turn env id: its own return is the gold, its expert writes the SFT data

    @property
    def folder(self) -> str:
        return self.name.replace("/", "_")


ENV_KWARGS = ("task", "prompts", "reward_fn", "max_new_tokens")  # what a registered id may set here


def resolve_target(name: str) -> Target:
    """An embedded task name, or a registered env id (optionally 'module:id'), as a Target; ValueError names what
    the runner cannot honour."""
    import importlib

    import gymnasium as gym
    from gymnasium.envs.registration import load_env_creator

    from textenv.env import TextGenEnv
    from textenv.multiturn import MultiTurnEnv
    from textenv.tasks import TASKS

    if name in TASKS:
        return Target(name=name, task=name, env_id=task_env_id(name))
    module, _, env_id = name.rpartition(":")
    if module:
        importlib.import_module(module)  # registers the id, as gymnasium.make("module:id") does
    if env_id not in gym.registry:
        raise ValueError(f"{name!r} is neither an embedded task {sorted(TASKS)} nor a registered env id "
                         f"(register it first, or pass 'module:{env_id}' to import the module that does)")
    spec = gym.spec(env_id)
    entry = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
    if isinstance(entry, type) and issubclass(entry, MultiTurnEnv):  # the recipe runs on the id itself
        return Target(name=env_id, task=name, env_id=env_id, multi_turn=True)  # name keeps its module: importable
    if not (isinstance(entry, type) and issubclass(entry, TextGenEnv)):
        raise ValueError(f"env id {env_id!r} has entry point {spec.entry_point!r}; the runner trains language "
                         "models and needs a TextGenEnv")
    kwargs = dict(spec.kwargs)
    unsupported = sorted(set(kwargs) - set(ENV_KWARGS))
    if unsupported:
        raise ValueError(f"env id {env_id!r} sets {unsupported}, which the runner cannot pass on to every "
                         f"algorithm; it honours {list(ENV_KWARGS)}")
    task = kwargs.get("task")
    if task not in TASKS:
        raise ValueError(f"env id {env_id!r} has task={task!r}; the runner needs an embedded task {sorted(TASKS)} "
                         "for the SFT policy, the reward model and the gold score")
    for key in ("prompts", "reward_fn"):  # recorded in every run's config.json, so they must be strings
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            raise ValueError(f"env id {env_id!r}: {key} is a {type(kwargs[key]).__name__}; register it as a string "
                             f"(a file, folder or hub id{', or a module:attr callable' if key == 'reward_fn' else ''}) "
                             "so that each run records it")
    budget = kwargs.get("max_new_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"env id {env_id!r}: max_new_tokens must be a positive int, got {budget!r}")
    return Target(name=env_id, task=task, env_id=env_id, reward=kwargs.get("reward_fn"), prompts=kwargs.get("prompts"),
                  max_new_tokens=kwargs.get("max_new_tokens"))


def task_env_id(task: str) -> str:
    """The registered id of an embedded task, e.g. sentiment -> textenv/PositiveReview-v0."""
    from textenv import ENV_IDS

    ids = [env_id for env_id, kwargs in ENV_IDS.items() if kwargs.get("task") == task]
    if not ids:
        raise ValueError(f"task {task!r} has no registered env id")
    return ids[0]


# ---- one training run per algorithm (each returns the final policy folder and its metrics.jsonl) ----

def train(algo: str, sft: str, rm: str, comparisons: str, target: Target, seed: int, out: Path, args,
          iterations: int | None = None) -> Path:
    """Train `algo` from the SFT policy; `iterations` is the RL algorithms' budget (unused by DPO and SB3)."""
    reward = target.reward or rm
    env = dict(task=target.task, prompts=target.prompts, max_new_tokens=target.max_new_tokens)
    if algo == "ppo":
        from agents.ppo import PPOConfig, ppo

        lr = {} if args.ppo_lr is None else {"lr": args.ppo_lr}
        return ppo(PPOConfig(policy=sft, reward=reward, **env, **lr, out_dir=str(out), seed=seed,
                             iterations=iterations, num_envs=args.episodes_per_iteration))
    if algo in ("grpo", "rloo"):
        k = args.group_size
        if algo == "grpo":
            from agents.grpo import GRPOConfig as Config
            from agents.grpo import grpo as run
        else:
            from agents.rloo import RLOOConfig as Config
            from agents.rloo import rloo as run
        return run(Config(policy=sft, reward=reward, **env, out_dir=str(out), seed=seed, iterations=iterations,
                          num_prompts=args.episodes_per_iteration // k, num_generations=k))
    if algo == "dpo":
        from agents.dpo import DPOConfig, dpo

        return dpo(DPOConfig(policy=sft, comparisons=comparisons, out_dir=str(out), seed=seed))
    if algo == "sb3":
        from agents.sb3_lm import SB3PPOConfig, sb3_ppo

        return sb3_ppo(SB3PPOConfig(policy=sft, reward=reward, out_dir=str(out), seed=seed,
                                    env_id=target.env_id, total_timesteps=args.sb3_timesteps))
    raise ValueError(f"unknown algorithm {algo!r}; choose from {ALGOS}")


def sample_scores(sft: str, task_name: str, num_prompts: int, n: int, reward_fns: list, temperature: float,
                  seed: int, max_new_tokens: int | None = None, num_envs: int | None = None):
    """n samples from the SFT policy for each of the task's first `num_prompts` test prompts, in rollouts of
    `num_envs` (default: one per prompt): (prompts, (prompts, n) responses, [gold, *one (prompts, n) array per
    reward fn])."""
    from agents.best_of_n import sample_candidates
    from textenv.models import load_causal_lm
    from textenv.tasks import get_task
    from textenv.tokenizer import load_tokenizer
    from textenv.vector_env import TextGenVectorEnv

    task = get_task(task_name)
    prompts = task.prompts("test", n=num_prompts)
    policy, tokenizer = load_causal_lm(sft).eval(), load_tokenizer(sft)
    envs = TextGenVectorEnv(num_envs=num_envs or len(prompts), prompts=prompts, tokenizer=tokenizer,
                            reward_fn=lambda p, c: [0.0] * len(c), max_prompt_tokens=task.max_prompt_tokens,
                            max_new_tokens=max_new_tokens or task.max_new_tokens)
    responses, scores = sample_candidates(policy, envs, n, np.arange(len(prompts)),
                                          torch.Generator().manual_seed(seed), [task.gold, *reward_fns], temperature)
    return prompts, responses, scores


def best_of_n_curve(sft: str, proxy_spec: str, task_name: str, num_prompts: int, n_max: int, temperature: float,
                    seed: int, max_new_tokens: int | None = None):
    """Gold and proxy of best-of-n for n = 1, 2, 4, ..., n_max, from one set of n_max samples per test prompt
    (`agents.best_of_n.best_of_n_curve`), with the analytic KL."""
    from agents.best_of_n import best_of_n_curve as curve
    from rewards.base import as_reward_fn

    _, _, (gold, proxy) = sample_scores(sft, task_name, num_prompts, n_max, [as_reward_fn(proxy_spec)], temperature,
                                        seed, max_new_tokens)
    return curve(gold, proxy)


def best_of_n_turns(sft: str, proxy_spec: str, env_id: str, num_prompts: int, n_max: int, temperature: float,
                    seed: int, max_new_tokens: None = None):
    """`best_of_n_curve` on a multi-turn env id: n_max episodes from each test episode's seed, gold the env's own
    return, the proxy's score of each whole conversation."""
    from agents.best_of_n import best_of_n_curve as curve
    from agents.episodes import episode_prompts, make_episodes
    from rewards.base import as_reward_fn, call_reward
    from textenv.models import load_causal_lm
    from textenv.tokenizer import load_tokenizer

    policy, proxy = load_causal_lm(sft).eval(), as_reward_fn(proxy_spec)
    flat = np.repeat(episode_prompts(env_id, "test", num_prompts), n_max)  # each test episode n_max times
    B = min(len(flat), 64)
    episodes = make_episodes(env_id, num_envs=B, tokenizer=load_tokenizer(sft), reward=None)
    generator, gold, scores = torch.Generator().manual_seed(seed), [], []
    for start in range(0, len(flat), B):
        keep = min(B, len(flat) - start)
        batch, batch_gold = episodes.play(policy, generator=generator, temperature=temperature, seed=0,
                                          prompt_index=np.resize(flat[start : start + B], B))
        gold += batch_gold[:keep]
        scores += call_reward(proxy, batch.prompts[:keep], batch.responses[:keep])
    return curve(np.reshape(gold, (num_prompts, n_max)), np.reshape(scores, (num_prompts, n_max)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", "--task", nargs="+", default=["sentiment"],
                        help="embedded tasks or registered TextGenEnv ids ('module:id' imports module first), "
                             "one run folder each")
    parser.add_argument("--runs", "--run", nargs="+", default=None,
                        help="each task's main-job run folder (sft/, rm/, comparisons/), in --tasks order; default "
                             "runs/default for sentiment and runs/<task> for the others; the pipeline runs there if "
                             "missing")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, nargs="+", default=[20],
                        help="RL budgets (PPO, GRPO, RLOO iterations): each budget is its own set of runs")
    parser.add_argument("--episodes-per-iteration", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4, help="GRPO/RLOO completions per prompt")
    parser.add_argument("--sb3-timesteps", type=int, default=6144)
    parser.add_argument("--sb3-seeds", type=int, nargs="+", default=[0], help="SB3 is slow: fewer seeds")
    parser.add_argument("--ppo-lr", type=float, default=None,
                        help="PPO's learning rate (default: PPOConfig's 1e-4); the multi-turn main job uses 3e-5, "
                             "as PPO's 16 updates per batch collapse a near-deterministic SFT policy at 1e-4")
    parser.add_argument("--bon-max", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="evaluation sampling temperature")
    parser.add_argument("--out-dir", default=None,
                        help="default: <first run>/algorithms (a subfolder per task if several)")
    args = parser.parse_args()
    keep_freed_memory()  # as the `textenv` command does before it trains
    targets = [resolve_target(name) for name in args.tasks]  # every entry checked before anything trains
    runs = args.runs or ["runs/default" if t.task == "sentiment" else f"runs/{t.folder}" for t in targets]
    if len(runs) != len(targets):
        parser.error(f"--runs names {len(runs)} folders for {len(targets)} tasks {args.tasks}")
    out = Path(args.out_dir or Path(runs[0]) / "algorithms")
    rows = []
    for target, run in zip(targets, runs):
        task_rows = run_task(target, Path(run), out if len(targets) == 1 else out / target.folder, args)
        rows += [{"task": target.name, **r} for r in task_rows]
    if len(targets) > 1:  # one table over the tasks; each task's folder has its own tables, fits and plots
        with (out / "results.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (out / "results.md").write_text("\n".join(f"## {t.name}\n\n" + (out / t.folder / "results.md").read_text()
                                                  for t in targets))
        print(f"all tasks: {out / 'results.csv'}, {out / 'results.md'}")


def run_task(target: Target, run: Path, out: Path, args) -> list[dict]:
    """Every algorithm x budget x seed on one target; writes out/results.{csv,md}, the plots and summary.json."""
    from agents.evaluate import EvalConfig, evaluate
    from agents.pipeline import PipelineConfig, run_pipeline
    from agents.report import read_metrics
    from agents.run import stage_dir, stage_model

    sft, rm, comparisons = stage_model(run, "sft"), stage_model(run, "rm"), stage_dir(run, "collect")
    if not (sft.exists() and rm.exists() and comparisons.exists()):
        print(f"{run} has no sft/rm/comparisons yet: running the pipeline there first")
        run_pipeline(PipelineConfig(out_dir=str(run), task=target.task))
    run_task_name = json.loads((run / "config.json").read_text())["task"]
    if run_task_name != target.task:
        raise ValueError(f"run folder {str(run)!r} is the main job of task {run_task_name!r}, not {target.task!r}; "
                         "pass each task's own folder with --runs")
    out.mkdir(parents=True, exist_ok=True)
    sft, rm, comparisons = str(sft), str(rm), str(comparisons)
    task, proxy = target.name, target.reward or rm  # the proxy column is the reward the RL algorithms maximise
    eval_kw = dict(task=target.task, reference=sft, reward=proxy, num_prompts=args.eval_prompts,
                   temperature=args.temperature, max_new_tokens=target.max_new_tokens)

    sft_eval = evaluate(EvalConfig(policy=sft, **eval_kw))
    base_gold, base_proxy = sft_eval["gold_mean"], sft_eval["proxy_mean"]
    print(f"{task} SFT: gold {base_gold:+.3f} proxy {base_proxy:+.3f}")
    rows: list[dict] = []
    curves: dict[str, list[list[dict]]] = {}
    bon: list[dict] = []
    for algo in args.algos:
        if target.multi_turn and algo in ("dpo", "sb3"):
            print(f"{task}: {algo} skipped (not on multi-turn tasks yet)")
            continue
        if algo == "bon":
            t0 = time.perf_counter()
            curve = best_of_n_turns if target.multi_turn else best_of_n_curve
            bon = curve(sft, proxy, target.task, args.eval_prompts, args.bon_max, args.temperature, seed=0,
                        max_new_tokens=target.max_new_tokens)
            wall = time.perf_counter() - t0
            for r in bon:
                rows.append({"algo": f"bon-{r['n']}", "iterations": None, "seed": 0, "gold": r["gold"],
                             "proxy": r["proxy"], "kl": r["kl"], "wall_s": wall, "tokens_per_s": math.nan})
            print("best-of-n: " + ", ".join(f"n={r['n']} gold {r['gold']:+.3f} at KL {r['kl']:.2f}" for r in bon))
            continue
        rl = algo in ("ppo", "grpo", "rloo")
        for iterations in args.iterations if rl else [None]:
            # one budget keeps the plain names (ppo, ppo_seed0); several are told apart (ppo@10, ppo_it10_seed0)
            several = rl and len(args.iterations) > 1
            label, stem = (f"{algo}@{iterations}", f"{algo}_it{iterations}") if several else (algo, algo)
            for seed in args.sb3_seeds if algo == "sb3" else args.seeds:
                folder = out / f"{stem}_seed{seed}"
                t0 = time.perf_counter()
                final = train(algo, sft, rm, comparisons, target, seed, folder, args, iterations)
                wall = time.perf_counter() - t0
                e = evaluate(EvalConfig(policy=str(final), seed=seed, **eval_kw))
                metrics = read_metrics(folder / "metrics.jsonl")
                tps = [m["charts/tokens_per_s"] for m in metrics if "charts/tokens_per_s" in m]
                rows.append({"algo": label, "iterations": iterations, "seed": seed, "gold": e["gold_mean"],
                             "proxy": e["proxy_mean"], "kl": e["kl_to_reference"], "wall_s": wall,
                             "tokens_per_s": statistics.mean(tps) if tps else math.nan})
                curves.setdefault(label, []).append([m for m in metrics if "objective/gold" in m])
                print(f"{task} {label} seed {seed}: gold {e['gold_mean']:+.3f} proxy {e['proxy_mean']:+.3f} at KL "
                      f"{e['kl_to_reference']:.2f} ({wall:.0f} s)", flush=True)

    fits = gao_fits(bon, curves, base_gold, base_proxy)
    write_tables(rows, fits, out, base_gold, base_proxy)
    plot_all(rows, curves, bon, fits, base_gold, base_proxy, out, args.episodes_per_iteration)
    summary = {"bench": "algorithms", "task": task, "env": dataclasses.asdict(target), "run": str(run),
               "args": vars(args), "sft": {"gold": base_gold, "proxy": base_proxy}, "rows": rows, "fits": fits}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print((out / "results.md").read_text())
    return rows


def gao_fits(bon: list[dict], curves: dict, base_gold: float, base_proxy: float) -> dict:
    """(a, b, R^2) of gold and proxy gains for best-of-n and for each RL algorithm's pooled training curves."""
    fits = {}
    if len(bon) >= 4:
        d = np.sqrt([r["kl"] for r in bon])
        for key, base in (("gold", base_gold), ("proxy", base_proxy)):
            fits[f"bon/{key}"] = fit_gao(d, np.array([r[key] for r in bon]) - base, "bon")
    for algo, runs in curves.items():
        points = [m for run in runs for m in run if "objective/kl" in m]
        if len(points) < 4:
            continue
        d = np.sqrt(np.maximum([m["objective/kl"] for m in points], 0.0))
        for key, metric, base in (("gold", "objective/gold", base_gold), ("proxy", "objective/scores", base_proxy)):
            try:
                fits[f"{algo}/{key}"] = fit_gao(d, np.array([m[metric] for m in points]) - base, "rl")
            except ValueError:  # fewer than 3 points with KL > 0
                pass
    return fits


def write_tables(rows: list[dict], fits: dict, out: Path, base_gold: float, base_proxy: float) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["algo"], []).append(r)

    def cell(values: list[float], fmt: str) -> str:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "n/a"
        spread = fmt.lstrip("+")  # a standard deviation has no sign
        return (f"{statistics.mean(values):{fmt}}"
                + (f" ± {statistics.stdev(values):{spread}}" if len(values) > 1 else ""))

    lines = [f"SFT: gold {base_gold:+.3f}, proxy {base_proxy:+.3f}", "",
             "| algorithm | seeds | gold | proxy | KL to SFT (nats) | wall s | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for algo, rs in groups.items():
        lines.append(f"| {algo} | {len(rs)} | {cell([r['gold'] for r in rs], '+.3f')} "
                     f"| {cell([r['proxy'] for r in rs], '+.3f')} "
                     f"| {cell([r['kl'] for r in rs], '.2f')} | {cell([r['wall_s'] for r in rs], '.0f')} "
                     f"| {cell([r['tokens_per_s'] for r in rs], ',.0f')} |")
    lines += ["",
              "Gao et al. fits of the gain over SFT against d = sqrt(KL): best-of-n d(a - b d), RL d(a - b log d)", "",
              "| curve | a | b | R^2 |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {r2:.3f} |" for name, (a, b, r2) in fits.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot_all(rows, curves, bon, fits, base_gold, base_proxy, out: Path, episodes_per_iteration: int) -> None:
    from agents.report import plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, metric, base in ((axes[0], "gold", "objective/gold", base_gold),
                                  (axes[1], "proxy", "objective/scores", base_proxy)):
        if bon:
            d = np.sqrt([r["kl"] for r in bon])
            ax.scatter(d, [r[key] - base for r in bon], marker="s", label="best-of-n")
            if f"bon/{key}" in fits:
                a, b, r2 = fits[f"bon/{key}"]
                grid = np.linspace(0.01, d.max(), 100)  # a fit is drawn over its data only: no extrapolation
                ax.plot(grid, gao_curve(grid, a, b, "bon"), "--", label=f"BoN fit R²={r2:.2f}")
        for algo, runs in curves.items():
            pts = [(math.sqrt(max(m["objective/kl"], 0)), m[metric] - base)
                   for run in runs for m in run if "objective/kl" in m]
            if pts:
                line = ax.scatter(*zip(*pts), s=8, alpha=0.5, label=f"{algo} (training)")
                if f"{algo}/{key}" in fits:
                    a, b, r2 = fits[f"{algo}/{key}"]
                    grid = np.linspace(0.01, max(x for x, _ in pts), 100)
                    ax.plot(grid, gao_curve(grid, a, b, "rl"), color=line.get_facecolor()[0],
                            label=f"{algo} fit R²={r2:.2f}")
        for r in rows:  # the final policies, evaluated on the test prompts
            if not r["algo"].startswith("bon"):
                ax.scatter(math.sqrt(max(r["kl"], 0)), r[key] - base, marker="*", s=80, color="black")
        ax.set_xlabel("d = sqrt(KL to SFT)")
        ax.set_ylabel(f"{key} score - SFT's")
        ax.set_title(f"{key} (stars: final policies on test prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_kl.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, runs in curves.items():
        steps = min(len(run) for run in runs)
        if steps == 0:
            continue
        g = np.array([[m["objective/gold"] for m in run[:steps]] for run in runs])  # (seeds, steps)
        # episodes sampled so far: SB3 counts them itself; our RL trainers log once per iteration of a fixed batch
        x = [m.get("charts/episodes", m["step"] * episodes_per_iteration) for m in runs[0][:steps]]
        ax.plot(x, g.mean(0), label=algo)
        ax.fill_between(x, g.min(0), g.max(0), alpha=0.2)
    ax.set_xlabel("training episodes")
    ax.set_ylabel("gold score (training batch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    trained = [r for r in rows if not r["algo"].startswith("bon")]
    names = sorted({r["algo"] for r in trained})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "wall_s", "wall time per run (s)"),
                           (axes[1], "tokens_per_s", "training tokens/s")):
        ax.bar(names, [statistics.mean([r[key] for r in trained if r["algo"] == n]) for n in names])
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
