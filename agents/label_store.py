"""People's rankings on disk: the label queue (K sampled responses per prompt), the rankings file in the ranked
comparison layout (`agents.preferences`), a labeler's progress, and agreement between labelers and with the gold.

No web code here: `agents.labeling` serves these over HTTP. Every write is whole-file-then-rename under an
exclusive file lock, so a crash never leaves a half line, and two writers (threads or processes) lose nothing.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

LABELER = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class Rejected(ValueError):
    """A submission refused, with the HTTP status that says why (400 malformed, 404 unknown prompt, 409 already
    ranked, 422 out of range) and a message naming the bad value."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def write_atomic(path: Path, text: str) -> None:
    """`text` to `path` through a fsynced temporary file and a rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.exists() else []


def tiers_to_ranking(tiers: list[list[int]], k: int) -> tuple[list[int], list[int]]:
    """A person's ordering, best tier first, each tier a list of response indices (ties), as (ranking, tiers) of
    the ranked layout: `ranking` every index once, best first; `tiers` each ranked position's tier. Rejected (422)
    unless it places each of the k responses exactly once in at least two tiers."""
    if not isinstance(tiers, list) or not all(isinstance(t, list) and t for t in tiers):
        raise Rejected(422, f"ranking must be a list of non-empty lists of response indices (best first; "
                            f"indices in one list are tied), got {tiers!r}")
    flat = [i for tier in tiers for i in tier]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in flat) or sorted(flat) != list(range(k)):
        raise Rejected(422, f"ranking {tiers!r} must place each of the responses 0..{k - 1} exactly once")
    if len(tiers) < 2:
        raise Rejected(422, "every response is tied: that ranks nothing; skip the prompt instead")
    ranking = [i for tier in tiers for i in sorted(tier)]
    return ranking, [n for n, tier in enumerate(tiers) for _ in tier]


class LabelStore:
    """A labels folder: queue.jsonl ({"id", "prompt", "responses", "gold"}, written once), rankings.jsonl (one
    ranked-layout row per (labeler, prompt) with "labeler", "time" and "prompt_id") and skips.jsonl."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.queue = read_jsonl(self.folder / "queue.jsonl")
        if not self.queue:
            raise ValueError(f"{self.folder}: no queue.jsonl yet; `textenv label` samples it first")
        self.by_id = {row["id"]: row for row in self.queue}

    @contextmanager
    def _locked(self):
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # across threads and processes
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def rankings(self) -> list[dict]:
        return read_jsonl(self.folder / "rankings.jsonl")

    def skips(self) -> list[dict]:
        return read_jsonl(self.folder / "skips.jsonl")

    def _seen(self, labeler: str) -> set[int]:
        return {r["prompt_id"] for r in self.rankings() + self.skips() if r["labeler"] == labeler}

    def progress(self, labeler: str) -> dict:
        ranked = sum(r["labeler"] == labeler for r in self.rankings())
        skipped = sum(r["labeler"] == labeler for r in self.skips())
        return {"ranked": ranked, "skipped": skipped, "total": len(self.queue)}

    def next_for(self, labeler: str) -> dict | None:
        """The first queued prompt this labeler has neither ranked nor skipped (None when all are done)."""
        seen = self._seen(check_labeler(labeler))
        return next((row for row in self.queue if row["id"] not in seen), None)

    def submit(self, body: object) -> dict:
        """Validate one submission, {"labeler", "prompt_id", "ranking": [[...], ...]} or {"labeler",
        "prompt_id", "skip": true}, and append it; returns the labeler's progress. Rejected names what is wrong."""
        if not isinstance(body, dict):
            raise Rejected(400, f"the body must be a JSON object, got {type(body).__name__}")
        labeler = check_labeler(body.get("labeler"))
        prompt_id = body.get("prompt_id")
        if not isinstance(prompt_id, int) or isinstance(prompt_id, bool):
            raise Rejected(400, f"prompt_id must be an integer, got {prompt_id!r}")
        if prompt_id not in self.by_id:
            raise Rejected(404, f"prompt_id {prompt_id} is not in the queue (0..{len(self.queue) - 1})")
        skip = body.get("skip", False)
        if (skip is True) == ("ranking" in body):
            raise Rejected(400, "send either a ranking or \"skip\": true")
        item = self.by_id[prompt_id]
        if skip is True:
            row = {"prompt_id": prompt_id, "labeler": labeler, "time": time.time()}
            name = "skips.jsonl"
        else:
            ranking, tiers = tiers_to_ranking(body["ranking"], len(item["responses"]))
            row = {"prompt": item["prompt"], "responses": item["responses"], "ranking": ranking, "tiers": tiers,
                   **({"gold": item["gold"]} if item.get("gold") is not None else {}),
                   "prompt_id": prompt_id, "labeler": labeler, "time": time.time()}
            name = "rankings.jsonl"
        with self._locked():
            if prompt_id in self._seen(labeler):  # read under the lock: a second tab or a retry adds nothing
                raise Rejected(409, f"labeler {labeler!r} has already ranked or skipped prompt {prompt_id}")
            path = self.folder / name
            old = path.read_text(encoding="utf-8") if path.exists() else ""
            write_atomic(path, old + json.dumps(row) + "\n")
        return self.progress(labeler)


def check_labeler(labeler: object) -> str:
    if not isinstance(labeler, str) or not LABELER.fullmatch(labeler):
        raise Rejected(400, f"labeler must be 1-64 letters, digits or _.@-, got {labeler!r}")
    return labeler


# ---- agreement ----

def _order(row: dict) -> dict[str, int]:
    """Response text -> tier (0 best) of one ranked row: keyed by text, so rows whose responses a reader merged or
    reordered (`agents.preferences`) still line up."""
    tiers = row.get("tiers") or list(range(len(row["ranking"])))
    return {row["responses"][j]: t for j, t in zip(row["ranking"], tiers)}


def agreement(rows: list[dict]) -> dict:
    """Agreement figures of people's rankings (rows with "labeler" and "prompt_id"):

    - `labelers`: rankings per labeler;
    - `inter_labeler`: over every two labelers who ranked one prompt and every pair of its responses both put in
      different tiers, how often they order the pair alike (None before two labelers share a prompt);
    - `gold`: per labeler, how often the gold orders its strictly ranked pairs (distinct gold) alike, where the rows
      carry gold scores."""
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    same = total = 0
    for group in by_prompt.values():
        for a, b in itertools.combinations(group, 2):
            oa, ob = _order(a), _order(b)
            for i, j in itertools.combinations(sorted(oa.keys() & ob.keys()), 2):
                if oa[i] != oa[j] and ob[i] != ob[j]:
                    total += 1
                    same += (oa[i] < oa[j]) == (ob[i] < ob[j])
    gold: dict[str, list[int]] = {}
    for row in rows:
        if row.get("gold") is None:
            continue
        o, g = _order(row), dict(zip(row["responses"], row["gold"]))
        for i, j in itertools.combinations(sorted(o), 2):
            if o[i] != o[j] and g[i] != g[j]:
                hits = gold.setdefault(row["labeler"], [0, 0])
                hits[0] += (o[i] < o[j]) == (g[i] > g[j])
                hits[1] += 1
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["labeler"]] = counts.get(row["labeler"], 0) + 1
    return {"labelers": counts, "inter_labeler": same / total if total else None, "inter_labeler_pairs": total,
            "gold": {k: h / n for k, (h, n) in gold.items()}}
