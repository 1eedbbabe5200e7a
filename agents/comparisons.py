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
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.common import check_run_dir, is_complete, write_summary
from agents.pretrain import run_config
from agents.sampler import rollout
from textenv.models import load_causal_lm
from textenv.tasks import get_task
from textenv.tokenizer import load_tokenizer
from textenv.vector_env import TextGenVectorEnv


@dataclass
class CollectConfig:
    out_dir: str = "runs/comparisons"
    """Run folder: config.json, comparisons/ (a `datasets` folder, `load_from_disk`), comparisons.jsonl, summary.json."""
    policy: str = "runs/sft/model"
    """The SFT policy to sample from: a causal LM folder or hub id (its tokenizer is loaded from there too)."""
    task: str = "sentiment"
    """Embedded task: its train prompts are ranked, its gold score is the annotator's utility."""
    n_prompts: int = 3072
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
    seed: int = 0
    """Seeds the prompts, the sampling and the annotator."""
    device: str | None = None
    """torch device of the policy; default: cuda if available, else cpu."""
    overwrite: bool = False
    """Delete a previous run with another configuration in out_dir instead of refusing."""

    def __post_init__(self):
        for name in ("n_prompts", "prompts_per_batch"):
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


def sample_responses(policy_path: str, task_name: str, prompts: list[str], k: int, prompts_per_batch: int,
                     temperature: float, seed: int, device: str | None = None) -> list[tuple[str, list[str], list[float]]]:
    """(prompt as the policy saw it, K responses, their K gold scores) for each prompt, sampled through a
    TextGenVectorEnv whose reward is the task's gold (so the env's scores ARE the gold scores, batched)."""
    task = get_task(task_name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = load_causal_lm(policy_path).to(device).eval()
    envs = TextGenVectorEnv(
        num_envs=min(prompts_per_batch, len(prompts)) * k, prompts=prompts, tokenizer=load_tokenizer(policy_path),
        reward_fn=task.gold, max_new_tokens=task.max_new_tokens, max_prompt_tokens=task.max_prompt_tokens,
    )
    per_batch, generator, out = envs.num_envs // k, torch.Generator().manual_seed(seed), []
    for batch, start in enumerate(tqdm(range(0, len(prompts), per_batch), desc="sampling", unit="batch")):
        index = np.arange(start, min(start + per_batch, len(prompts)))  # (b,)
        # K adjacent copies of each prompt index; a short last batch is filled with repeats, then ignored
        r = rollout(policy, envs, generator, temperature=temperature, seed=seed + batch,
                    prompt_index=np.repeat(np.resize(index, per_batch), k))
        for j in range(len(index)):
            group = slice(j * k, (j + 1) * k)
            out.append((r.prompts[j * k], r.responses[group], r.scores[group].tolist()))
    return out


def collect_comparisons(cfg: CollectConfig) -> Path:
    """Sample, score and rank; return the `datasets` folder out_dir/comparisons (skipped if already complete)."""
    out_dir = check_run_dir(cfg.out_dir, {"stage": "comparisons", **run_config(cfg)}, cfg.overwrite)
    if is_complete(out_dir):
        print(f"{out_dir} is complete (summary.json); nothing to do")
        return out_dir / "comparisons"
    import datasets  # heavy; only when collecting

    t_start = time.time()
    task = get_task(cfg.task)
    prompts = task.prompts("train", n=cfg.n_prompts, seed=cfg.seed)
    samples = sample_responses(cfg.policy, cfg.task, prompts, cfg.k, cfg.prompts_per_batch, cfg.temperature, cfg.seed,
                               cfg.device)
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
        "label_gold_agreement": measured, "label_gold_agreement_expected": expected, "pairs_with_distinct_gold": n_pairs,
        "gold_mean": float(np.mean([g for row in rows for g in row["gold"]])),
        "wall_time_s": time.time() - t_start, "data": str(folder), "jsonl": str(jsonl),
    }
    write_summary(out_dir, summary)
    print(json.dumps(summary))
    return folder


# ---------------------------------------------------------------------------------------------------- real data


@dataclass
class Preferences:
    """Comparison rows in the ranked layout (see the module docstring; "gold" only where the source has it),
    what layout the source had, and how many of its rows were skipped, by reason."""

    rows: list[dict]
    layout: str
    n_source_rows: int
    skipped: dict[str, int]


# A turn marker of a dialogue, "\n\nHuman:" / "\n\nAssistant:" (Anthropic HH): the prompt ends after the last one.
_TURN = re.compile(r"\n\n[A-Z][A-Za-z]*:")


def split_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) from two full texts: the prompt is their longest common
    prefix, cut after its last dialogue turn marker if it has one, else before its last whitespace (so a response
    starts at a word: " great fun", GPT-2 style)."""
    n = len(os.path.commonprefix([chosen, rejected]))
    turns = [m.end() for m in _TURN.finditer(chosen[:n])]
    if turns:
        cut = turns[-1]
    else:
        spaces = [i for i, ch in enumerate(chosen[:n]) if ch.isspace()]
        cut = spaces[-1] if spaces else 0
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _source_records(source: str | Path, split: str) -> tuple[list[dict], str]:
    import datasets

    path = Path(source)
    if path.is_dir():  # a collect_comparisons run folder, or any `save_to_disk` folder
        folder = path / "comparisons" if (path / "comparisons").is_dir() else path
        return datasets.load_from_disk(str(folder)).to_list(), str(folder)
    if path.exists() or path.suffix in (".jsonl", ".csv", ".parquet"):
        from agents.data import read_records

        return read_records(path), str(path)
    return datasets.load_dataset(str(source), split=split).to_list(), f"hub data set {source!r}"  # needs the network


def load_preferences(source: str | Path, split: str = "train") -> Preferences:
    """Comparison rows from a local .jsonl/.csv/.parquet file, a `save_to_disk` folder (a collect_comparisons run
    folder included) or a hub id (`split`, online only), in any of three layouts, told apart by the columns:

    - ranked: prompt, responses (list), ranking (list, best first), optional gold: what `collect_comparisons` writes;
    - TRL: prompt, chosen, rejected;
    - Anthropic HH: chosen, rejected, each the full text; the prompt is split off by `split_prompt`.

    Skipped and counted: rows with a missing (None) field, chosen == rejected (fewer than 2 distinct responses),
    or an empty response (in the ranked layout an empty response is a policy sample like any other, and is kept;
    copies of one text are merged, see `_ranked_row`). ValueError for data with one response per prompt (nothing to compare), an unknown
    layout, or no row left.
    """
    records, where = _source_records(source, split)
    columns = set().union(*(r.keys() for r in records))
    if {"responses", "ranking"} <= columns:
        layout = "ranked"
    elif {"prompt", "chosen", "rejected"} <= columns:
        layout = "trl"
    elif {"chosen", "rejected"} <= columns:
        layout = "hh"
    elif "prompt" in columns and columns & {"response", "completion"}:
        raise ValueError(f"{where} has one response per prompt (columns {sorted(columns)}): that is SFT data; a reward "
                         "model needs comparisons (chosen/rejected, or responses + ranking)")
    else:
        raise ValueError(f"{where}: unknown preference layout, columns {sorted(columns)}; expected prompt/chosen/"
                         "rejected, chosen/rejected (full texts) or prompt/responses/ranking")
    fields = {"ranked": ("prompt", "responses", "ranking"), "trl": ("prompt", "chosen", "rejected"),
              "hh": ("chosen", "rejected")}[layout]
    rows, skipped = [], Counter()
    for i, record in enumerate(records):
        if any(record.get(f) is None for f in fields):
            skipped["missing_field"] += 1
            continue
        for f in fields:
            want = list if f in ("responses", "ranking") else str
            if not isinstance(record[f], want):
                raise TypeError(f"{where}, row {i}: column {f!r} is a {type(record[f]).__name__}, expected "
                                f"{want.__name__} (conversational data: apply the chat template first)")
        if layout == "ranked":
            row = _ranked_row(record, where, i)
        elif layout == "trl":
            row = {"prompt": record["prompt"], "responses": [record["chosen"], record["rejected"]], "ranking": [0, 1]}
        else:
            prompt, chosen, rejected = split_prompt(record["chosen"], record["rejected"])
            row = {"prompt": prompt, "responses": [chosen, rejected], "ranking": [0, 1]}
        if layout == "ranked" and len(record["responses"]) < 2:
            skipped["one_response"] += 1
        elif layout != "ranked" and not all(text.strip() for text in row["responses"]):
            skipped["empty_response"] += 1
        elif len(set(row["responses"])) < 2:
            skipped["identical_responses"] += 1
        else:
            rows.append(row)
    if skipped["one_response"] == len(records):
        raise ValueError(f"{where} has one response per prompt in every row: there is nothing to compare")
    if not rows:
        raise ValueError(f"{where}: no usable comparison among its {len(records)} rows (skipped: {dict(skipped)})")
    return Preferences(rows=rows, layout=layout, n_source_rows=len(records), skipped=dict(skipped))


def _ranked_row(record: dict, where: str, i: int) -> dict:
    """The row with copies of one text merged into the best-ranked copy (a pair of equal texts teaches nothing):
    responses listed best first, so the ranking becomes 0..K'-1."""
    responses, ranking = record["responses"], [int(x) for x in record["ranking"]]
    if sorted(ranking) != list(range(len(responses))):
        raise ValueError(f"{where}, row {i}: ranking {ranking} is not a permutation of the {len(responses)} responses")
    first = {}  # text -> index of its best-ranked copy; dicts keep insertion order, so best first
    for j in ranking:
        first.setdefault(responses[j], j)
    order = list(first.values())
    row = {"prompt": record["prompt"], "responses": [responses[j] for j in order], "ranking": list(range(len(order)))}
    if record.get("gold") is not None:
        row["gold"] = [float(record["gold"][j]) for j in order]
    return row


if __name__ == "__main__":
    import tyro

    collect_comparisons(tyro.cli(CollectConfig))
