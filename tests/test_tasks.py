"""The embedded data world: corpus generation and the three tasks (fast, CPU, offline)."""

from __future__ import annotations

import re
import statistics
import time
from itertools import combinations

import pytest

from textenv.data.corpus import concept_key, generate_corpus, review_key, split_of
from textenv.tasks import SPLITS, TASKS, ArithmeticTask, CommonGenTask, SentimentTask, get_task
from textenv.tasks.commongen import concepts_of

ENV_IDS = {"sentiment": "textenv/PositiveReview-v0", "arithmetic": "textenv/Arithmetic-v0",
           "commongen": "textenv/CommonGen-v0"}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    start = time.perf_counter()
    docs = generate_corpus()
    chars = sum(len(d) for d in docs) + 2 * (len(docs) - 1)
    print(f"\ndefault corpus: {len(docs)} docs, {chars} chars, ~{chars // 4} tokens, "
          f"{time.perf_counter() - start:.1f} s")
    return docs


# ---------------------------------------------------------------------- corpus
def test_corpus_is_deterministic_in_the_seed():
    a, b = generate_corpus(0, n_docs=2000), generate_corpus(0, n_docs=2000)
    c = generate_corpus(1, n_docs=2000)
    assert len(a) == 2000
    assert "\n\n".join(a).encode() == "\n\n".join(b).encode()
    assert a != c


def test_corpus_default_size_and_mix(corpus):
    text = "\n\n".join(corpus)
    assert len(text) / 4 >= 2_000_000
    assert re.search(r"^Q: \d+ [+-] \d+ = \d+$", text, re.M)
    assert re.search(r"^Words: \w+, \w+, \w+\. Sentence: [A-Z]", text, re.M)
    assert re.search(r"^Rating: [1-5]/5$", text, re.M)
    assert " lives in " in text and " but " in text and "not " in text


def test_corpus_hides_held_out_prompts(corpus):
    triples = re.findall(r"^Words: (\w+), (\w+), (\w+)\. Sentence:", "\n".join(corpus), re.M)
    assert len(triples) > 1000
    assert all(split_of(concept_key(t)) == "train" for t in triples)
    openings = set(TASKS["sentiment"].prompts("test"))
    assert not any(doc.startswith(tuple(openings)) for doc in corpus[:5000])


def test_corpus_validates_arguments():
    with pytest.raises(ValueError, match="n_docs"):
        generate_corpus(0, n_docs=0)
    with pytest.raises(TypeError, match="seed"):
        generate_corpus("0")  # type: ignore[arg-type]


# ----------------------------------------------------------------- every task
@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_are_disjoint_and_deterministic(name):
    task = get_task(name)
    assert task.name == name and task.env_id == ENV_IDS[name]
    pools = {split: task.prompts(split) for split in SPLITS}
    assert [len(pools[s]) for s in SPLITS] == [4000, 500, 500]
    for s, t in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not set(pools[s]) & set(pools[t]), (s, t)
        assert not set(pools[s]) & {d["prompt"] for d in task.demonstrations(t)}, (s, t)
    assert len(set(pools["train"])) == 4000
    assert task.prompts("valid") == pools["valid"]
    assert task.prompts("valid", seed=1) != pools["valid"]
    assert task.demonstrations("test", n=50) == task.demonstrations("test", n=50)
    assert all(len(p) <= 4 * task.max_prompt_tokens for p in pools["train"])  # ~4 chars per token


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_validates_arguments(name):
    task = get_task(name)
    with pytest.raises(ValueError, match="'dev'"):
        task.prompts("dev")
    with pytest.raises(ValueError, match="'dev'"):
        task.demonstrations("dev")
    with pytest.raises(ValueError, match="n must be >= 1"):
        task.prompts("train", n=0)
    prompts = task.prompts("test", n=3)
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        task.gold(prompts, ["a", "b"])
    with pytest.raises(TypeError):
        task.gold(prompts[0], "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_returns_python_floats_and_few_shot_wraps_the_prompt(name):
    task = get_task(name)
    demos = task.demonstrations("valid", n=20)
    scores = task.gold([d["prompt"] for d in demos], [d["response"] for d in demos])
    assert len(scores) == 20 and all(type(s) is float for s in scores)
    wrapped = [task.few_shot(d["prompt"]) for d in demos]
    assert all(w.endswith(d["prompt"]) and len(w) > len(d["prompt"]) for w, d in zip(wrapped, demos))
    assert task.gold(wrapped, [d["response"] for d in demos]) == scores  # same rule in a document


def test_get_task_rejects_unknown_names():
    with pytest.raises(ValueError, match="'imdb'.*arithmetic"):
        get_task("imdb")


# ------------------------------------------------------------------ sentiment
def test_sentiment_gold_is_vader_of_the_completion_alone():
    task = SentimentTask()
    prompts = ["I hated this film and"] * 5
    completions = [" it was really great and I loved the acting.", " the plot was terrible and awful.",
                   " it was never boring.", " the acting was not good.", " we went on a Monday evening."]
    great, awful, never_boring, not_good, neutral = task.gold(prompts, completions)
    assert great > 0.5 and never_boring > 0
    assert awful < -0.5 and not_good < 0
    assert neutral == 0.0


def test_sentiment_demonstrations_are_mixed():
    task = SentimentTask()
    demos = task.demonstrations("train")
    scores = task.gold([d["prompt"] for d in demos], [d["response"] for d in demos])
    mean, std = statistics.mean(scores), statistics.pstdev(scores)
    print(f"\nsentiment demos gold: mean {mean:.3f}, std {std:.3f}")
    assert abs(mean) < 0.15 and std >= 0.4
    assert min(scores) < -0.8 and max(scores) > 0.8
    assert all(split_of(review_key(d["prompt"])) == "train" for d in demos)


# ----------------------------------------------------------------- arithmetic
def test_arithmetic_gold_is_exact():
    task = ArithmeticTask()
    cases = {(" 85", 1.0), (" 84", 0.0), (" 85\nQ: 1 + 1 = 2", 1.0), (" it is 85.", 1.0), (" 8 5", 0.0),
             ("", 0.0), (" eighty-five", 0.0), (" 850", 0.0), ("85", 1.0)}
    completions = [c for c, _ in cases]
    assert task.gold(["Q: 37 + 48 ="] * len(cases), completions) == [v for _, v in cases]
    assert task.gold(["Q: 52 - 7 =", "Q: 3 - 3 ="], [" 45", " 0"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="no 'a \\+ b ='"):
        task.gold(["What is 3 plus 4?"], [" 7"])


def test_arithmetic_demonstrations_are_correct():
    task = ArithmeticTask()
    demos = task.demonstrations("train")
    assert set(task.gold([d["prompt"] for d in demos], [d["response"] for d in demos])) == {1.0}
    assert all(re.fullmatch(r"Q: \d{1,2} [+-] \d{1,2} =", d["prompt"]) for d in demos)


# ------------------------------------------------------------------ commongen
@pytest.mark.parametrize("completion, expected", [
    (" The dog chased the ball in the park.", 1.0),  # 8 words, 4/8 function words, all concepts
    (" A dog sleeps.", 1 / 3 * 3 / 4),  # coverage 1/3, length 3/4
    (" dog ball park dogs", 0.0),  # no function words: not a sentence
    (" The dog and the dog play with the ball and the ball in the park.", 4 / 6),  # distinct 4/6
    (" The dog ### chases a ball in the park.", 27 / 30),  # clean: 27 of 30 characters
    (" The Dogs chase the BALLS near the park.\nWords: cat, sofa, sleep.", 1.0),  # first line only
    (" The ball is on the floor.", 1 / 3),  # coverage 1/3
    ("", 0.0),
])
def test_commongen_gold_matches_the_formula(completion, expected):
    score = CommonGenTask().gold(["Words: dog, ball, park. Sentence:"], [completion])[0]
    assert score == pytest.approx(expected)


def test_commongen_gold_accepts_regular_inflections_only():
    task = CommonGenTask()
    prompt = "Words: run, berry, box. Sentence:"
    assert task.gold([prompt], [" A girl is running with two berries and some boxes."]) == [1.0]
    assert task.gold(["Words: throw, ball, boy. Sentence:"], [" The boy threw the ball."]) == [
        pytest.approx(2 / 3)]  # irregular "threw" does not count
    few_shot = "Words: a, b, c. Sentence: x.\nWords: dog, ball, park. Sentence:"
    assert concepts_of(few_shot) == ["dog", "ball", "park"]


def test_commongen_demonstrations_score_one_and_hide_held_out_triples():
    task = CommonGenTask()
    demos = task.demonstrations("train")
    assert min(task.gold([d["prompt"] for d in demos], [d["response"] for d in demos])) == 1.0
    held_out = {concept_key(concepts_of(p)) for s in ("valid", "test") for p in task.prompts(s)}
    vocabulary = {c for p in task.prompts("train") for c in concepts_of(p)}
    for d in demos:  # no held-out triple is among the words of any train sentence
        words = sorted(vocabulary & set(re.findall(r"[a-z]+", d["response"].lower())))
        assert not any(concept_key(t) in held_out for t in combinations(words, 3)), d
