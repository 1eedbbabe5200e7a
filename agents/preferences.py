"""Comparison data: K policy samples per prompt for a labeller to rank (`sample_responses`), and the reader of
ranked comparisons in any of the usual layouts (`load_preferences`) that the reward model and DPO train on.

A comparison row is {"prompt": str, "responses": [K str], "ranking": [K int], "gold": [K float]}; `ranking`
lists indices into `responses`, best first. A person's ranking may tie responses: then "tiers" ([K int],
non-decreasing, one per ranked position) gives each position's tier, and responses of one tier make no pair.
Rows may carry more (a labeler id, a time); the readers ignore it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.episodes import is_multi_turn, make_episodes
from textenv.models import load_causal_lm
from textenv.records import read_records
from textenv.tokenizer import load_tokenizer


def sample_responses(policy_path: str, task_name: str, prompts: list, k: int, prompts_per_batch: int,
                     temperature: float, seed: int, device: str | None = None,
                     prompt_format: str = "auto") -> list[tuple[str, list[str], list[float]]]:
    """(prompt as the policy saw it, K responses, their K gold scores) for each prompt, sampled in envs whose
    reward is the gold (so the env's scores ARE the gold scores, batched). `prompts`: an embedded task's prompt
    strings, or a multi-turn env id's episode seeds (`agents.episodes.episode_prompts`); a multi-turn episode's
    prompt is its opening and its response the rest of the conversation, as a reward model reads them."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = load_causal_lm(policy_path).to(device).eval()
    multi_turn = is_multi_turn(task_name)
    episodes = make_episodes(task_name, num_envs=min(prompts_per_batch, len(prompts)) * k, reward="gold",
                             tokenizer=load_tokenizer(policy_path), prompts=None if multi_turn else prompts,
                             prompt_format=prompt_format)
    per_batch, generator, out = episodes.num_envs // k, torch.Generator().manual_seed(seed), []
    for batch, start in enumerate(tqdm(range(0, len(prompts), per_batch), desc="sampling", unit="batch")):
        index = np.arange(start, min(start + per_batch, len(prompts)))  # (b,)
        if multi_turn:  # an episode's "prompt index" is its seed
            index = np.asarray(prompts)[index]
        # K adjacent copies of each prompt index; a short last batch is filled with repeats, then ignored
        r, _ = episodes.play(policy, generator=generator, temperature=temperature, seed=seed + batch,
                             prompt_index=np.repeat(np.resize(index, per_batch), k))
        for j in range(len(index)):
            group = slice(j * k, (j + 1) * k)
            out.append((r.prompts[j * k], r.responses[group], r.scores[group].tolist()))
    return out


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
        return read_records(path), str(path)
    text = str(source)
    if not text.strip() or text.startswith((".", "/", "~")) or text.count("/") > 1 or " " in text:  # not a hub id
        raise ValueError(f"comparisons {text!r}: no such file or folder (a hub id is 'name' or 'namespace/name')")
    return datasets.load_dataset(text, split=split).to_list(), f"hub data set {source!r}"  # needs the network


def load_preferences(source: str | Path | list, split: str = "train") -> Preferences:
    """Comparison rows from a local .jsonl/.csv/.parquet file, a `save_to_disk` folder (a collect_comparisons run
    folder included) or a hub id (`split`, online only), in any of three layouts, told apart by the columns:

    - ranked: prompt, responses (list), ranking (list, best first), optional gold: what `collect_comparisons` writes;
    - TRL: prompt, chosen, rejected;
    - Anthropic HH: chosen, rejected, each the full text; the prompt is split off by `split_prompt`.

    Skipped and counted: rows with a missing (None) field, chosen == rejected (fewer than 2 distinct responses),
    or an empty response (in the ranked layout an empty response is a policy sample like any other, and is kept;
    copies of one text are merged, see `_ranked_row`). ValueError for data with one response per prompt (nothing to
    compare), an unknown layout, or no row left.

    A list of sources (human rankings beside simulated ones, say) is read source by source and its rows joined;
    the layout reads e.g. "ranked+trl" where they differ.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("no comparison source given (an empty list)")
        parts = [load_preferences(s, split) for s in source]
        skipped = Counter()
        for part in parts:
            skipped.update(part.skipped)
        return Preferences(rows=[row for part in parts for row in part.rows],
                           layout="+".join(dict.fromkeys(part.layout for part in parts)),
                           n_source_rows=sum(part.n_source_rows for part in parts), skipped=dict(skipped))
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
        elif len(set(row.get("tiers") or [0, 1])) < 2:
            skipped["all_tied"] += 1
        else:
            rows.append(row)
    if skipped["one_response"] == len(records):
        raise ValueError(f"{where} has one response per prompt in every row: there is nothing to compare")
    if not rows:
        raise ValueError(f"{where}: no usable comparison among its {len(records)} rows (skipped: {dict(skipped)})")
    return Preferences(rows=rows, layout=layout, n_source_rows=len(records), skipped=dict(skipped))


def _ranked_row(record: dict, where: str, i: int) -> dict:
    """The row with copies of one text merged into the best-ranked copy (a pair of equal texts teaches nothing):
    responses listed best first, so the ranking becomes 0..K'-1; "tiers" kept (the best copy's) where given."""
    responses, ranking = record["responses"], [int(x) for x in record["ranking"]]
    if sorted(ranking) != list(range(len(responses))):
        raise ValueError(f"{where}, row {i}: ranking {ranking} is not a permutation of the {len(responses)} responses")
    tiers = record.get("tiers")
    if tiers is not None and (len(tiers) != len(ranking) or any(b < a for a, b in zip(tiers, tiers[1:]))):
        raise ValueError(f"{where}, row {i}: tiers {tiers} must give each of the {len(ranking)} ranked positions a "
                         "tier, best first (non-decreasing)")
    first = {}  # text -> position in `ranking` of its best-ranked copy; dicts keep insertion order, so best first
    for position, j in enumerate(ranking):
        first.setdefault(responses[j], position)
    order = [ranking[position] for position in first.values()]
    row = {"prompt": record["prompt"], "responses": [responses[j] for j in order], "ranking": list(range(len(order)))}
    if tiers is not None:
        row["tiers"] = [int(tiers[position]) for position in first.values()]
    if record.get("gold") is not None:
        row["gold"] = [float(record["gold"][j]) for j in order]
    for key in ("labeler", "prompt_id"):  # a person's ranking (`textenv label`): its agreement figures need them
        if record.get(key) is not None:
            row[key] = record[key]
    return row
