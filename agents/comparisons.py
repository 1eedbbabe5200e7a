"""Stage 3 data: ranked comparisons of K policy samples per prompt, from a simulated annotator or from real data.

InstructGPT (arXiv 2203.02155, section 3.5) has labellers rank K = 4..9 responses of the SFT policy per prompt.
Here the task's gold score plays the labeller, with noise: the ranking is a Plackett-Luce draw with utilities
gold / annotator_temperature, so every pair of responses is ordered by a Bradley-Terry choice,

    P(a ranked above b) = sigmoid((gold_a - gold_b) / annotator_temperature),

whatever the other responses are (Luce's choice axiom). temperature 0 gives the gold order; larger temperatures
disagree with the gold more often, at a known rate (`summary.json` reports the expected and measured rates).
This is Gao et al.'s (arXiv 2210.10760) synthetic setup, with a noisy labeller instead of a perfect one.

A comparison row is {"prompt": str, "responses": [K str], "ranking": [K int], "gold": [K float]}; `ranking`
lists indices into `responses`, best first. `load_preferences` reads such rows, and real preference data.

    python -m agents.comparisons --policy runs/sft/model --out-dir runs/comparisons
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agents.episodes import episode_prompts
from agents.preferences import sample_responses
from agents.run import cli, start_run, write_summary
from textenv.chat import check_prompt_format


@dataclass
class CollectConfig:
    out_dir: str = "runs/default/comparisons"
    """Run folder: config.json, comparisons/ (a `datasets` folder, `load_from_disk`), comparisons.jsonl,
    summary.json."""
    policy: str = "runs/default/sft/model"
    """The SFT policy to sample from: a causal LM folder or hub id (its tokenizer is loaded from there too)."""
    task: str = "sentiment"
    """Embedded task: its train prompts are ranked, its gold score is the annotator's utility. Or a multi-turn env
    id: K conversations of each train episode are ranked by the env's own return; a row's prompt is the opening,
    its responses the rest of each conversation."""
    num_prompts: int = 3072
    """Train prompts to sample for (the first n of `task.prompts("train", n, seed)`)."""
    k: int = 8
    """Responses sampled and ranked per prompt (InstructGPT: 4 to 9). A ranking of K holds log2(K!) bits, more per
    response as K grows, and the RM forwards each response once whatever K: large K is cheap information."""
    annotator_temperature: float = 0.1
    """Labelling noise: P(a ranked above b) = sigmoid((gold_a - gold_b) / T); 0 ranks by the gold exactly."""
    temperature: float = 1.0
    """Policy sampling temperature."""
    prompts_per_batch: int = 16
    """Prompts per rollout; the vector env has prompts_per_batch * k sub-envs."""
    prompt_format: str = "auto"
    """How a str prompt reaches the policy: "chat" (a user message through its tokenizer's chat template, the episode
    ending at the template's end-of-turn token), "text" (as it is), or "auto" ("chat" for an instruct checkpoint: a
    chat template other than textenv's embedded one)."""
    seed: int = 0
    """Seeds the prompts, the sampling and the annotator."""
    device: str | None = None
    """torch device of the policy; default: cuda if available, else cpu."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        check_prompt_format(self.prompt_format)
        for name in ("num_prompts", "prompts_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 responses per prompt to compare, got {self.k}")
        if not self.annotator_temperature >= 0:
            raise ValueError(f"annotator_temperature must be >= 0, got {self.annotator_temperature}")


def annotate(gold: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """A noisy labeller's ranking of K responses, best first, as indices into `gold` (K,).

    Sorting gold / T + Gumbel noise draws a Plackett-Luce ranking exactly (the Gumbel-max trick, Yellott 1977).
    T = 0 sorts by the gold, ties broken at random.
    """
    gumbel = rng.gumbel(size=gold.shape)  # (K,)
    if temperature == 0:
        return np.lexsort((-gumbel, -gold))  # primary key: the last one
    return np.argsort(-(gold / temperature + gumbel), kind="stable")


def gold_agreement(rows: list[dict], temperature: float) -> tuple[float, float, int]:
    """Over all pairs whose gold differs: (measured, expected) fraction that the ranking orders like the gold,
    and the number of such pairs. Expected: mean sigmoid(|gold_a - gold_b| / T) (1 at T = 0)."""
    agree, expected = [], []
    for row in rows:
        gold = np.asarray(row["gold"])
        ranking = row["ranking"]
        for i in range(len(ranking)):
            for j in range(i + 1, len(ranking)):
                diff = gold[ranking[i]] - gold[ranking[j]]  # winner minus loser
                if diff != 0:
                    agree.append(diff > 0)
                    expected.append(1.0 if temperature == 0 else 1 / (1 + np.exp(-abs(diff) / temperature)))
    if not agree:
        return float("nan"), float("nan"), 0
    return float(np.mean(agree)), float(np.mean(expected)), len(agree)


def collect_comparisons(cfg: CollectConfig) -> Path:
    """Sample, score and rank; return the `datasets` folder out_dir/comparisons (skipped if already complete)."""
    out_dir, complete = start_run(cfg, "comparisons", result="comparisons")
    if complete:
        return out_dir / "comparisons"
    import datasets  # heavy; only when collecting

    t_start = time.time()
    prompts = episode_prompts(cfg.task, "train", cfg.num_prompts, cfg.seed)  # multi-turn: episode seeds
    samples = sample_responses(cfg.policy, cfg.task, prompts, cfg.k, cfg.prompts_per_batch, cfg.temperature, cfg.seed,
                               cfg.device, cfg.prompt_format)
    rng = np.random.default_rng(cfg.seed)  # the annotator's own stream
    rows, skipped = [], Counter()
    for prompt_index, (prompt, responses, gold) in enumerate(samples):
        distinct = {text for text in responses if text.strip()}
        if len(distinct) < 2:  # nothing to compare
            skipped["all_empty" if not distinct else "all_identical"] += 1
            continue
        ranking = annotate(np.asarray(gold), cfg.annotator_temperature, rng)
        rows.append({"prompt": prompt, "responses": responses, "gold": gold, "ranking": ranking.tolist(),
                     "prompt_index": prompt_index})
    if not rows:
        raise ValueError(f"all {len(prompts)} prompts were skipped ({dict(skipped)}): the policy {cfg.policy!r} "
                         f"gives fewer than 2 distinct non-empty responses; sample at a higher temperature")

    # write-then-rename, as for checkpoints: a crash never leaves a half-written data set behind
    folder, tmp = out_dir / "comparisons", out_dir / "comparisons.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    jsonl, tmp = out_dir / "comparisons.jsonl", out_dir / "comparisons.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, jsonl)

    measured, expected, n_pairs = gold_agreement(rows, cfg.annotator_temperature)
    summary = {
        "stage": "comparisons", "prompts": len(prompts), "kept": len(rows), "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped), "k": cfg.k, "annotator_temperature": cfg.annotator_temperature,
        "label_gold_agreement": measured, "label_gold_agreement_expected": expected,
        "pairs_with_distinct_gold": n_pairs,
        "gold_mean": float(np.mean([g for row in rows for g in row["gold"]])),
        "wall_time_s": time.time() - t_start, "data": str(folder), "jsonl": str(jsonl),
    }
    write_summary(out_dir, summary)
    print(json.dumps(summary))
    return folder


if __name__ == "__main__":
    collect_comparisons(cli(CollectConfig))
