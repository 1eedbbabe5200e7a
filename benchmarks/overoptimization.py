"""Reward-model over-optimisation (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", arXiv
2210.10760), reproduced on the embedded sentiment task.

Gao's setup, scaled to this machine:

- **gold**: the task's gold scorer (VADER's compound score of the response), fixed. It labels the comparisons the
  proxies learn from (the main job's simulated annotator) and is what we truly want.
- **proxies**: reward models of --depths sizes (the first 1, 2 and 4 blocks of the main job's SFT model: one
  pretraining, three sizes) x --data-sizes (the first 128 and 768 prompts of the main job's comparisons, each with
  K ranked responses), trained as stage 3 trains the main job's RM.
- **best-of-n**: --bon-samples responses to each of --bon-prompts test prompts from the SFT policy; best-of-n by
  each proxy for n = 1 ... N, averaged over every n-subset (`agents.best_of_n.best_of_n_expected`), at
  KL = log n - (n - 1) / n.
- **RL**: PPO against each proxy with a low fixed KL coefficient, long enough that the proxy is pushed far; every
  iteration's rollout gives a (KL to SFT, gold, proxy) point. Its first --value-warmup iterations train only the
  value model, so that the policy's first updates do not spend KL on an untrained critic's noise. With --seeds N
  it runs N times per proxy and the RL curve is the seeds' mean at each iteration (each seed is also fitted alone).
- Both sample at --temperature (default 1.0, Gao's), so both KLs are to the same initial policy.
- **fits** of the gold gain over SFT against d = sqrt(KL): best-of-n R = d (a - b d), RL R = d (a - b log d), with
  R^2 and the peak (a / 2b, and exp(a / b - 1)), per proxy.

It writes to --out-dir: results.json, results.md, fig1_gold_vs_kl.png (Gao's Figure 1: gold and proxy against d
per proxy size, BoN and RL), fig3_coefficients.png (Figure 3: a, b and the gold peak against proxy size), and a
folder per trained proxy and PPO run. A rerun skips what is finished.

    python -m benchmarks.overoptimization                       # the main job in runs/default (run there if missing)
    python -m benchmarks.overoptimization --budget 90           # 3 PPO seeds per proxy, 3x the best-of-n prompts

Default budget: about 20-25 minutes on the 2-core box, given the main job (which takes about 10 more when missing).
PPO's default 72 iterations are what it takes for its gold to turn down against the 128-prompt proxies; at 24 and
48 it had not turned by KL 15-47. Without the value warm-up PPO's gold gain per unit of d first climbs (a convex
rise), which the RL form `d (a - b log d)` cannot follow (R² 0.52-0.70 against the 128-prompt proxies, 0.86-0.88
against the 768-prompt ones); with it the rise is concave and R² reads 0.83-0.96 and 0.98-0.99. Past the peak a
run may still fall onto degenerate text the proxy over-rates while its KL saturates (a fall at constant d that no
function of d follows). Whether one run turns is partly luck: against the smallest proxy 3 of 6 seeds both turned
and fitted with R² >= 0.9, while the mean of 3 seeds did in 2 of 2 sets (R² 0.969, 0.951). Hence --seeds, and
why a larger --budget buys seeds rather than longer runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.algorithms import fit_gao, gao_curve, sample_scores

BLOCKS = {"gpt2": ("transformer", "h"), "llama": ("model", "layers")}  # where a causal LM keeps its blocks


# ---- the proxies: three sizes of one pretrained trunk, two data sizes ----

def truncated_init(sft: Path, depth: int, out: Path) -> Path:
    """The SFT model's first `depth` blocks (with its embeddings and final norm) as a model folder: a smaller model
    with the same pretraining, which the RM stage puts a scalar head on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(sft)
    if model.config.model_type not in BLOCKS:
        raise ValueError(f"{sft}: cannot cut a {model.config.model_type!r} model to depth; use one of {list(BLOCKS)}")
    trunk, name = BLOCKS[model.config.model_type]
    blocks = getattr(getattr(model, trunk), name)
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"--depths: {depth} is not between 1 and the SFT model's {len(blocks)} blocks")
    setattr(getattr(model, trunk), name, blocks[:depth])
    model.config.num_hidden_layers = depth
    if getattr(model.config, "layer_types", None):  # newer Llama configs list one type per layer
        model.config.layer_types = model.config.layer_types[:depth]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(sft).save_pretrained(out)
    return out


def non_embedding_params(folder: Path) -> int:
    """Parameters outside the token and position embeddings (Gao et al. count RM size this way)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if not key.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight")):
                total += math.prod(f.get_slice(key).get_shape())
    return total


def data_subset(comparisons: Path, prompts: int, out: Path) -> Path:
    """The first `prompts` rows (one prompt and its ranked responses each) of the main job's comparisons."""
    rows = comparisons.read_text().splitlines()
    if prompts > len(rows):
        raise ValueError(f"--data-sizes: {prompts} prompts asked, {comparisons} holds {len(rows)}")
    if not out.exists():
        out.write_text("\n".join(rows[:prompts]) + "\n")
    return out


def train_proxy(init: Path, data: Path, sft: Path, out: Path) -> dict:
    from agents.reward_model import RMConfig, train_reward_model

    model = train_reward_model(RMConfig(data=str(data), model=str(init), policy=str(sft), out_dir=str(out)))
    summary = json.loads((out / "summary.json").read_text())
    return {"model": str(model), "heldout_accuracy": summary["heldout_accuracy"],
            "fresh_spearman": summary["fresh_spearman"], "params": non_embedding_params(Path(model))}


# ---- best-of-n: one set of samples, every proxy, every n ----

def n_grid(n_max: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 11, 16, ... (two per octave) up to n_max, n_max included."""
    grid = sorted({round(2 ** (k / 2)) for k in range(int(2 * math.log2(n_max)) + 1)} | {n_max})
    return [n for n in grid if n <= n_max]


def bon_samples(sft: Path, proxies: dict[str, str], prompts: int, samples: int, temperature: float, out: Path,
                seed: int = 0) -> dict[str, np.ndarray]:
    """(prompts, samples) gold and proxy scores of the SFT policy's samples of the task's first test prompts,
    cached in `out` (an .npz): a rerun with the same proxies reuses them."""
    from rewards.base import as_reward_fn

    if out.exists():
        cached = dict(np.load(out))
        if set(cached) == {"gold", *proxies} and cached["gold"].shape == (prompts, samples):
            return cached
    names = list(proxies)
    texts, responses, scores = sample_scores(str(sft), "sentiment", prompts, samples,
                                             [as_reward_fn(proxies[k]) for k in names], temperature, seed,
                                             num_envs=64)
    result = dict(zip(["gold", *names], scores))
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(out)
    (out.with_suffix(".responses.json")).write_text(json.dumps({"prompts": texts, "responses": responses}))
    return result


def bon_curve(gold: np.ndarray, proxy: np.ndarray) -> list[dict]:
    from agents.best_of_n import best_of_n_expected, best_of_n_kl

    rows = []
    for n in n_grid(gold.shape[1]):
        g, p = best_of_n_expected(gold, proxy, n)
        rows.append({"n": n, "kl": best_of_n_kl(n), "gold": g, "proxy": p})
    return rows


# ---- RL: PPO against each proxy ----

def ppo_curve(sft: Path, proxy: str, out: Path, args, seed: int) -> list[dict]:
    """PPO against `proxy` with a fixed low KL coefficient; (iteration, KL, gold, proxy) of each rollout."""
    from agents.ppo import PPOConfig, ppo

    ppo(PPOConfig(policy=str(sft), reward=proxy, task="sentiment", out_dir=str(out), iterations=args.iterations,
                  kl_coef=args.kl_coef, kl_target=None, lr=args.lr, temperature=args.temperature,
                  num_envs=args.num_envs, save_every=args.iterations, sample_every=max(1, args.iterations // 4),
                  value_warmup_iterations=args.value_warmup, seed=seed))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"iteration": r["step"], "kl": max(r["objective/kl"], 0.0), "gold": r["objective/gold"],
             "proxy": r["objective/scores"]} for r in rows]


def seed_mean(runs: list[list[dict]]) -> list[dict]:
    """The expected curve over PPO seeds: KL, gold and proxy averaged at each iteration. Seeds against one proxy
    part ways (one plateaus, one finds text the proxy over-rates and falls), so a single run's turn is partly luck;
    their mean is what Gao's forms describe. Averaging the points of one iteration, rather than pooling every
    seed's points into one fit, keeps the spread between seeds out of the residuals."""
    if len({len(r) for r in runs}) != 1:
        raise ValueError(f"PPO runs of different lengths ({[len(r) for r in runs]}): rerun with one --iterations")
    return [{"iteration": rows[0]["iteration"], **{k: float(np.mean([r[k] for r in rows]))
                                                    for k in ("kl", "gold", "proxy")}}
            for rows in zip(*runs)]


# ---- where gold turns down, and the fits ----

def smoothed(values: list[float], window: int) -> np.ndarray:
    """Running mean over `window` consecutive points (fewer at the start)."""
    v = np.asarray(values, float)
    return np.array([v[max(0, i - window + 1): i + 1].mean() for i in range(len(v))])


def turn(curve: list[dict], window: int) -> dict:
    """The gold's maximum along the curve (BoN: over n; RL: over iterations, smoothed over `window`), its KL, and
    the gold at the end. `turns_down`: the maximum lies inside the range and the end is below it by more than
    twice the end's standard error (RL; BoN's exact estimate has no sampling noise across n)."""
    gold = [r["gold"] for r in curve]
    s = smoothed(gold, window) if window > 1 else np.asarray(gold)
    peak = int(s.argmax())
    tail = np.asarray(gold[-window:])
    noise = 2 * tail.std(ddof=1) / math.sqrt(len(tail)) if window > 1 and len(tail) > 1 else 0.0
    return {"peak_gold": float(s[peak]), "peak_kl": curve[peak]["kl"], "end_gold": float(s[-1]),
            "end_kl": curve[-1]["kl"], "turns_down": bool(peak < len(s) - 1 and s[-1] < s[peak] - noise)}


def fit(curve: list[dict], base: float, form: str) -> dict:
    """Gao's form fitted to the gold gain over `base`; NaN where fewer than 3 points have KL > 0 (a run that
    barely moved), so that one short curve does not cost the rest of the benchmark."""
    d = np.sqrt([r["kl"] for r in curve])
    if (d > 0).sum() < 3:
        return {"a": math.nan, "b": math.nan, "r2": math.nan, "peak_d": math.nan, "peak_inside": False}
    a, b, r2 = fit_gao(d, np.array([r["gold"] for r in curve]) - base, form)
    peak = (a / (2 * b) if form == "bon" else math.exp(a / b - 1)) if b > 0 else math.inf
    return {"a": a, "b": b, "r2": r2, "peak_d": peak, "peak_inside": bool(peak <= d.max())}


# ---- tables and figures ----

def turn_and_fit_cells(curve: dict) -> str:
    """A table row's gold max, gold at end, turn and fit columns, from a curve's "turn" and "fit"."""
    t, f = curve["turn"], curve["fit"]
    return (f"{t['peak_gold']:+.3f} ({t['peak_kl']:.1f}) | {t['end_gold']:+.3f} ({t['end_kl']:.1f}) | "
            f"{'yes' if t['turns_down'] else 'no'} | {f['a']:.3f} | {f['b']:.3f} | {f['r2']:.3f} | {f['peak_d']:.3g} |")


def write_markdown(result: dict, out: Path) -> None:
    lines = ["# Reward-model over-optimisation (Gao et al. 2022) on the sentiment task", "",
             f"Gold: {result['gold']}. Base (SFT, best-of-1) gold {result['base_gold']:+.3f}. Gains are over it; "
             "d = sqrt(KL to SFT) in sqrt-nats. Fits: best-of-n R = d(a - b d), RL R = d(a - b log d).", "",
             "| proxy | non-emb. params | prompts | held-out acc. | Spearman | method | gold max (at KL) | gold at end "
             "(at KL) | turns down | a | b | R² | fit peak d |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["proxies"]:
        for method in ("bon", "rl"):
            lines.append(f"| {p['name']} | {p['params']:,} | {p['prompts']} | {p['heldout_accuracy']:.3f} | "
                         f"{p['fresh_spearman']:.3f} | {method} | {turn_and_fit_cells(p[method])}")
    if result["args"]["seeds"] > 1:
        lines += ["", "PPO per seed (the rows above fit the seeds' mean at each iteration):", "",
                  "| proxy | seed | gold max (at KL) | gold at end (at KL) | turns down | a | b | R² | fit peak d |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in result["proxies"]:
            for run in p["rl"]["seeds"]:
                lines.append(f"| {p['name']} | {run['seed']} | {turn_and_fit_cells(run)}")
    lines += ["", f"Wall time: {result['wall_s'] / 60:.1f} min. Settings: `{json.dumps(result['args'])}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({p["prompts"] for p in result["proxies"]})
    colors = plt.get_cmap("viridis")
    depths = sorted({p["depth"] for p in result["proxies"]})
    base = result["base_gold"]
    # Figure 1: gold (solid, with its fit) and proxy (dotted, right axis) against d; rows data sizes, cols BoN/RL
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 3.6 * len(sizes)), squeeze=False)
    for row, prompts in enumerate(sizes):
        for col, method in enumerate(("bon", "rl")):
            ax = axes[row][col]
            twin = ax.twinx()
            for p in result["proxies"]:
                if p["prompts"] != prompts:
                    continue
                c = colors(depths.index(p["depth"]) / max(1, len(depths) - 1) * 0.85)
                curve = p[method]["curve"]
                d = np.sqrt([r["kl"] for r in curve])
                gain = np.array([r["gold"] for r in curve]) - base
                order = np.argsort(d)
                ax.plot(d[order], gain[order], "o" if method == "rl" else "-o", ms=3, color=c, alpha=0.8,
                        label=f"{p['params'] / 1e6:.2f}M ({p['depth']} blocks)")
                for run in p["rl"]["seeds"] if method == "rl" and len(p["rl"]["seeds"]) > 1 else []:
                    ax.plot(np.sqrt([r["kl"] for r in run["curve"]]), [r["gold"] - base for r in run["curve"]],
                            ".", ms=2, color=c, alpha=0.25)  # each seed, faint; the mean above
                grid = np.linspace(1e-3, d.max(), 100)
                f = p[method]["fit"]
                ax.plot(grid, gao_curve(grid, f["a"], f["b"], method), "--", color=c, lw=1)
                proxy = np.array([r["proxy"] for r in curve]) - curve[0]["proxy"]
                twin.plot(d[order], proxy[order], ":", color=c, lw=1)
            seeds = result["args"]["seeds"]
            ax.set_title(f"{'best-of-n' if method == 'bon' else 'PPO'}, proxies trained on {prompts} prompts"
                         + (f" (mean of {seeds} seeds)" if method == "rl" and seeds > 1 else ""))
            ax.set_xlabel("d = sqrt(KL to SFT)")
            ax.set_ylabel("gold gain (solid), fit (dashed)")
            twin.set_ylabel("proxy gain (dotted)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title="proxy size", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig1_gold_vs_kl.png", dpi=110)
    plt.close(fig)
    # Figure 3: the fit coefficients and the gold peak against proxy size, a line per data size
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for row, method in enumerate(("bon", "rl")):
        for col, key in enumerate(("a", "b", "peak_d")):
            ax = axes[row][col]
            for prompts in sizes:
                ps = sorted((p for p in result["proxies"] if p["prompts"] == prompts), key=lambda p: p["params"])
                points = [(p["params"], p[method]["fit"][key]) for p in ps if math.isfinite(p[method]["fit"][key])]
                if points:  # a fit with b <= 0 has no peak
                    ax.plot(*zip(*points), "-o", label=f"{prompts} prompts")
            ax.set_xscale("log")
            if key == "peak_d":  # a nearly flat log term puts the RL peak orders of magnitude out
                ax.set_yscale("log")
            ax.set_xlabel("proxy non-embedding parameters")
            ax.set_title(f"{'best-of-n' if method == 'bon' else 'PPO'}: "
                         + {"a": "a", "b": "b", "peak_d": "fit's gold peak d*"}[key])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig3_coefficients.png", dpi=110)
    plt.close(fig)


# ---- the run ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the --budget-derived settings filled in and checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="the main job's run folder (sft/model, comparisons/)")
    parser.add_argument("--out-dir", default="runs/bench-overoptimization")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="minutes on the 2-core box; scales --bon-prompts and, above 30, --seeds (below it "
                             "--iterations) from their 30-minute values")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4], help="proxy sizes: SFT blocks kept")
    parser.add_argument("--data-sizes", type=int, nargs="+", default=[128, 768],
                        help="proxy training data: prompts of the main job's comparisons (K ranked responses each)")
    parser.add_argument("--bon-prompts", type=int, default=None, help="test prompts for best-of-n (30 min: 32)")
    parser.add_argument("--bon-samples", type=int, default=512, help="samples per prompt: n up to this (KL 5.2)")
    parser.add_argument("--iterations", type=int, default=None, help="PPO iterations per proxy and seed (30 min: 72)")
    parser.add_argument("--kl-coef", type=float, default=0.001, help="PPO's fixed KL coefficient (low, so gold "
                                                                     "can peak and fall)")
    parser.add_argument("--lr", type=float, default=1e-4, help="PPO's learning rate")
    parser.add_argument("--num-envs", type=int, default=64, help="PPO episodes per iteration")
    parser.add_argument("--value-warmup", type=int, default=8,
                        help="PPO's first iterations that train only its value model (0: none); part of --iterations")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of BoN and PPO alike")
    parser.add_argument("--smooth", type=int, default=5, help="PPO iterations in the running mean of its gold")
    parser.add_argument("--seed", type=int, default=0, help="PPO's first seed (its prompts, sampling and minibatch "
                                                                "order)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="PPO runs per proxy, seeds --seed, --seed + 1, ...; the RL curve is their mean at each "
                             "iteration (30 min: 1)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget {args.budget:g} must be a positive number of minutes")
    scale = args.budget / 30.0
    args.bon_prompts = args.bon_prompts or max(8, round(32 * scale))
    # below 30 minutes shorter PPO runs (24 and 48 iterations stopped before the turn); above it more seeds, not
    # longer runs, whose KL saturates as the policy turns deterministic and whose late falls no function of d follows
    args.iterations = args.iterations or max(8, round(72 * min(scale, 1.0)))
    args.seeds = max(1, round(scale)) if args.seeds is None else args.seeds
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds} must be at least 1")
    if not 0 <= args.value_warmup < args.iterations:
        parser.error(f"--value-warmup {args.value_warmup} must be between 0 and --iterations {args.iterations} - 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    run, out = Path(args.run), Path(args.out_dir)
    sft, comparisons = run / "sft" / "model", run / "comparisons" / "comparisons.jsonl"
    if not (sft.is_dir() and comparisons.exists()):
        from agents.pipeline import PipelineConfig, run_pipeline

        print(f"{run} has no sft/model and comparisons yet: running the main job there first")
        run_pipeline(PipelineConfig(out_dir=str(run)))
    out.mkdir(parents=True, exist_ok=True)

    # ALGO LOGIC: proxies of each size x data size, trained on the gold-labelled comparisons
    proxies = []
    for prompts in args.data_sizes:
        data = data_subset(comparisons, prompts, out / f"comparisons-{prompts}.jsonl")
        for depth in args.depths:
            init = truncated_init(sft, depth, out / f"init-{depth}blocks")
            name = f"rm-{depth}blocks-{prompts}"
            proxies.append({"name": name, "depth": depth, "prompts": prompts,
                            **train_proxy(init, data, sft, out / name)})
            print(f"{name}: held-out accuracy {proxies[-1]['heldout_accuracy']:.3f}, "
                  f"Spearman with gold {proxies[-1]['fresh_spearman']:.3f}")

    # ALGO LOGIC: best-of-n against every proxy, from one set of samples
    scores = bon_samples(sft, {p["name"]: p["model"] for p in proxies}, args.bon_prompts, args.bon_samples,
                         args.temperature, out / "bon_samples.npz")
    base_gold = float(scores["gold"].mean())  # best-of-1: the SFT policy's gold
    for p in proxies:
        p["bon"] = {"curve": bon_curve(scores["gold"], scores[p["name"]])}

    # ALGO LOGIC: PPO against every proxy, --seeds times; the RL curve is the seeds' mean at each iteration
    seeds = range(args.seed, args.seed + args.seeds)
    for p in proxies:
        runs = [ppo_curve(sft, p["model"], out / f"ppo-{p['name']}-seed{s}", args, s) for s in seeds]
        p["rl"] = {"curve": seed_mean(runs), "seeds": [{"seed": s, "curve": c} for s, c in zip(seeds, runs)]}

    for p in proxies:
        for run in p["rl"]["seeds"]:  # each seed read alone, to show how much the mean smooths
            run["turn"], run["fit"] = turn(run["curve"], args.smooth), fit(run["curve"], base_gold, "rl")
        for method, window in (("bon", 1), ("rl", args.smooth)):
            p[method]["turn"] = turn(p[method]["curve"], window)
            p[method]["fit"] = fit(p[method]["curve"], base_gold, method)
            t, f = p[method]["turn"], p[method]["fit"]
            print(f"{p['name']} {method}: gold max {t['peak_gold']:+.3f} at KL {t['peak_kl']:.2f}, end "
                  f"{t['end_gold']:+.3f} at KL {t['end_kl']:.2f} (turns down: {t['turns_down']}); fit a "
                  f"{f['a']:.3f} b {f['b']:.3f} R2 {f['r2']:.3f} peak d {f['peak_d']:.3g}")
    result = {"bench": "overoptimization", "gold": "the sentiment task's gold scorer (VADER compound)",
              "base_gold": base_gold, "args": vars(args), "proxies": proxies, "wall_s": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out)
    plot(result, out)
    print(f"wrote {out}/results.md, results.json, fig1_gold_vs_kl.png, fig3_coefficients.png "
          f"({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
