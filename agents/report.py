"""The run folder's report: plots of every stage's metrics, the three-way comparison, and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(rows: list[dict], keys: list[str], out: Path, title: str) -> Path | None:
    """One line per metric key over `step`; keys absent from the log are skipped; None if nothing to plot."""
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_gold_vs_sqrt_kl(rows: list[dict], out: Path) -> Path | None:
    """Gao et al. 2022 (arXiv 2210.10760) plot gold (and proxy) score against sqrt(KL to the initial policy)."""
    points = [(math.sqrt(max(r["objective/kl"], 0.0)), r["objective/gold"], r["objective/scores"]) for r in rows
              if "objective/kl" in r and "objective/gold" in r]
    if not points:
        return None
    d, gold, proxy = zip(*points)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(d, gold, s=10, label="gold")
    ax.scatter(d, proxy, s=10, label="proxy (reward model)")
    ax.set_xlabel("sqrt(KL(policy || SFT))  [sqrt nats]")
    ax.set_ylabel("score")
    ax.set_title("PPO: score against distance from SFT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def make_plots(run: Path) -> dict[str, Path]:
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    made = {
        "pretrain": plot_curves(read_metrics(run / "pretrain" / "metrics.jsonl"), ["train/loss", "valid/loss"],
                                plots / "pretrain_loss.png", "Stage 1: pretraining loss"),
        "sft": plot_curves(read_metrics(run / "sft" / "metrics.jsonl"), ["train/loss", "valid/loss"],
                           plots / "sft_loss.png", "Stage 2: SFT loss (response tokens)"),
        "rm": plot_curves(read_metrics(run / "rm" / "metrics.jsonl"),
                          ["train/accuracy", "valid/accuracy", "train/loss"],
                          plots / "rm_accuracy.png", "Stage 3: reward model"),
        "ppo_scores": plot_curves(read_metrics(run / "ppo" / "metrics.jsonl"), ["objective/gold", "objective/scores"],
                                  plots / "ppo_scores.png", "Stage 4: PPO gold and proxy scores"),
        "ppo_kl": plot_curves(read_metrics(run / "ppo" / "metrics.jsonl"), ["objective/kl"], plots / "ppo_kl.png",
                              "Stage 4: KL(policy || SFT) per response"),
        "gold_vs_kl": plot_gold_vs_sqrt_kl(read_metrics(run / "ppo" / "metrics.jsonl"), plots / "gold_vs_sqrt_kl.png"),
    }
    return {k: v for k, v in made.items() if v is not None}


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_report(run: Path, evals: dict[str, dict], stage_summaries: dict[str, dict],
                 timings: dict[str, float]) -> Path:
    """report.md: headline comparison, plots, per-stage figures and the samples table."""
    plots = make_plots(run)
    lines = ["# textenv pipeline report", "", f"Run folder: `{run}`", "",
             "## Headline: the same test prompts, three policies", ""]
    lines += ["| policy | gold score (mean ± std) | proxy (RM) score | KL to SFT (nats) | distinct-2 "
              "| perplexity on test demos | EOS rate |",
              "|---|---|---|---|---|---|---|"]
    for name, e in evals.items():
        lines.append(f"| {name} | {_fmt(e['gold_mean'])} ± {_fmt(e['gold_std'])} | {_fmt(e.get('proxy_mean'))} | "
                     f"{_fmt(e.get('kl_to_reference'))} | {_fmt(e['distinct_2'])} | {_fmt(e['perplexity'], 2)} | "
                     f"{_fmt(e['eos_rate'], 2)} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()]
    lines += ["", "## Stages", "", "| stage | wall time (s) | figures |", "|---|---|---|"]
    for stage, summary in stage_summaries.items():
        figures = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in summary.items()
                            if isinstance(v, (int, float)))
        lines.append(f"| {stage} | {_fmt(timings.get(stage), 1)} | {figures} |")
    lines += ["", "## Samples (same prompts; gold / proxy score)", "", "| prompt | " + " | ".join(evals) + " |",
              "|---|" + "---|" * len(evals)]
    first = next(iter(evals.values()))
    for i in range(min(10, len(first["samples"]))):
        cells = []
        for e in evals.values():
            s = e["samples"][i]
            cells.append(f"{_md(s['response'])} "
                         f"({s['gold']:.2f}{' / ' + format(s['proxy'], '.2f') if 'proxy' in s else ''})")
        lines.append(f"| {_md(first['samples'][i]['prompt'])} | " + " | ".join(cells) + " |")
    if "messages" in first["samples"][0]:  # a multi-turn task: the same episodes as conversations
        lines += ["", "## Sample conversations (same episodes)", ""]
        for i in range(min(3, len(first["samples"]))):
            for name, e in evals.items():
                s = e["samples"][i]
                lines += [f"**Episode {i + 1}, {name}** (gold {s['gold']:.2f}"
                          f"{', proxy ' + format(s['proxy'], '.2f') if 'proxy' in s else ''}):", ""]
                lines += [f"> **{m['role']}**: {_md(m['content'])}  " for m in s["messages"]] + [""]
    out = run / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"
