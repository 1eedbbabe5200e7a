"""The embedded pretraining corpus: simple English generated from code and a seed.

Nothing is downloaded. ``generate_corpus(seed)`` returns short documents from four
generators, mixed (shares of characters, roughly):

* reviews (~40%, ``reviews.py``): films, restaurants, products, hotels, books and games
  with positive, negative and mixed opinions whose VADER compound scores spread over
  [-1, 1]. Half carry a "Rating: k/5" header line whose stars follow the opinion (the
  sentiment task's few-shot prompt uses it to steer a base model). Each review starts
  with exactly the sentiment task's ``prompt + response``.
* scenes (~20%, ``scenes.py``): paragraphs of descriptive sentences ("A boy throws a red
  ball in the park.") and blocks in the commongen format ("Words: ... Sentence: ...").
* arithmetic worksheets (~15%): lines "Q: 37 + 48 = 85", the arithmetic task's format.
* stories (~25%): present-tense narrative about named people, pets, towns and dialogue.

Held-out data: reviews whose opening is a valid/test prompt and scenes containing a
valid/test concept triple (see ``split_of``) are never emitted, so those prompts are
unseen. Arithmetic facts are the exception, on purpose: like times tables in web text
they are world knowledge, and a tiny model cannot derive unseen 2-digit sums, so the
corpus holds problems of every split; the task splits keep tuning and eval prompts apart.

Determinism: one ``random.Random(seed)`` drives everything; same seed, same bytes.
"""

from __future__ import annotations

import random
import zlib
from itertools import combinations

from textenv.data import reviews, scenes

DEFAULT_MIN_CHARS = 8_500_000  # ~2.1M tokens at ~4 characters per token


def split_of(key: str) -> str:
    """Stable split bucket of an item key: 10% "test", 10% "valid", 80% "train"."""
    bucket = zlib.crc32(key.encode("utf-8")) % 10  # crc32, not hash(): stable across runs
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def review_key(opening: str) -> str:
    return "sentiment:" + opening


def concept_key(concepts: tuple[str, ...] | list[str]) -> str:
    """Key of a concept set (order-free), for ``split_of``."""
    return "commongen:" + ",".join(sorted(concepts))


def concepts_in_train(concepts: tuple[str, ...]) -> bool:
    """True if every 3-word subset is a train triple: such text never reveals a held-out prompt."""
    return all(split_of(concept_key(c)) == "train" for c in combinations(concepts, 3))


# ------------------------------------------------------------------ arithmetic
# (operator, a range, b range, weight): easy levels give a tiny model something to get right.
ARITH_LEVELS = (("+", (0, 9), (0, 9), 0.2), ("+", (10, 99), (0, 9), 0.2),
                ("+", (10, 99), (10, 99), 0.25), ("-", (0, 9), (0, 9), 0.1),
                ("-", (10, 99), (0, 9), 0.1), ("-", (10, 99), (10, 99), 0.15))
_ARITH_WEIGHTS = tuple(level[3] for level in ARITH_LEVELS)


def arithmetic_problem(rng: random.Random) -> tuple[int, str, int]:
    """(a, op, b) with op "+" or "-", operands below 100 and a non-negative answer."""
    op, (alo, ahi), (blo, bhi), _ = rng.choices(ARITH_LEVELS, _ARITH_WEIGHTS)[0]
    a, b = rng.randint(alo, ahi), rng.randint(blo, bhi)
    if (op == "-" and a < b) or (op == "+" and rng.random() < 0.5):
        a, b = b, a
    return a, op, b


def arithmetic_question(a: int, op: str, b: int) -> str:
    """The arithmetic task's prompt: "Q: 37 + 48 =" (the response is " 85")."""
    return f"Q: {a} {op} {b} ="


def arithmetic_answer(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown operator {op!r}; expected '+' or '-'")


def arithmetic_key(a: int, op: str, b: int) -> str:
    # ordered: "3 + 4" and "4 + 3" fall in independent buckets, so commutativity can help
    return f"arithmetic:{a} {op} {b}"


# ------------------------------------------------------------------- documents
def _review_doc(rng: random.Random) -> str:
    r = reviews.review(rng)
    while split_of(review_key(r.opening)) != "train":
        r = reviews.review(rng)
    header = f"Rating: {r.stars}/5\n" if rng.random() < 0.5 else ""
    return header + r.opening + r.continuation + r.rest


def train_scene(rng: random.Random) -> scenes.Scene:
    s = scenes.scene(rng)
    while not concepts_in_train(s.concepts):
        s = scenes.scene(rng)
    return s


def _scene_doc(rng: random.Random) -> str:
    if rng.random() < 0.3:  # the task's exact format
        lines = []
        for _ in range(rng.randint(3, 8)):
            s = train_scene(rng)
            concepts = list(rng.sample(s.concepts, 3))
            lines.append(f"{scenes.concept_prompt(concepts)} {s.sentence}")
        return "\n".join(lines)
    return " ".join(train_scene(rng).sentence for _ in range(rng.randint(3, 7)))


def _arithmetic_doc(rng: random.Random) -> str:
    header = rng.choice(("", "", "Math practice:\n", "Homework:\n", "Quiz time!\n"))
    lines = []
    for _ in range(rng.randint(8, 25)):
        a, op, b = arithmetic_problem(rng)
        lines.append(f"{arithmetic_question(a, op, b)} {arithmetic_answer(a, op, b)}")
    return header + "\n".join(lines)


def _train_predicate(rng: random.Random, animal: bool, form: str) -> tuple[str, str]:
    verb, place, words = scenes.predicate(rng, animal, form)
    while not concepts_in_train(words):
        verb, place, words = scenes.predicate(rng, animal, form)
    return verb, place


PETS = ("dog", "cat", "parrot", "rabbit", "puppy", "kitten")
FEELINGS = ("happy", "tired", "hungry", "calm", "proud", "sleepy", "excited", "surprised")
WEATHER = ("cold", "warm", "rainy", "windy", "sunny", "cloudy", "hot", "foggy")
ANSWERS = ("Yes, let us go", "Not today, maybe tomorrow", "Only after lunch", "Sure, why not")


def _story(rng: random.Random) -> str:
    female = rng.random() < 0.5
    name = rng.choice(reviews.FEMALE if female else reviews.MALE)
    he, his = ("she", "her") if female else ("he", "his")
    friend = rng.choice(reviews.FEMALE + reviews.MALE)
    home, pet, job = reviews.town(rng), rng.choice(PETS), rng.choice(scenes.JOBS)
    lines = [rng.choice((
        f"{name} lives in {home} with {his} {pet}.",
        f"{name} is {scenes.article(job)} from {home}.",
        f"There is {scenes.article(job)} called {name} who lives in {home}.",
        f"{home} is a small town near a {rng.choice(('river', 'lake', 'forest', 'hill'))}. "
        f"{name} {rng.choice(reviews.SURNAMES)} lives there."))]
    for _ in range(rng.randint(4, 9)):
        r = rng.random()
        if r < 0.45:
            verb, place = _train_predicate(rng, False, "3sg")
            when = rng.choice(scenes.TIMES) if rng.random() < 0.6 else ""
            lines.append(f"{scenes.cap(when)}, {he} {verb} {place}." if when
                         else f"{scenes.cap(he)} {verb} {place}.")
        elif r < 0.58:
            place = rng.choice(scenes.PLACES)[0]
            lines.append(f'"Can we go to the {place} today?" asks {friend}. '
                         f'"{rng.choice(ANSWERS)}," says {name}.')
        elif r < 0.7:
            verb, place = _train_predicate(rng, True, "3sg")
            lines.append(f"{scenes.cap(his)} {pet} {verb} {place}.")
        elif r < 0.8:
            verb, place = _train_predicate(rng, False, "base")
            lines.append(f"{friend} comes to visit, and they {verb} {place}.")
        elif r < 0.9:
            lines.append(f"{scenes.cap(he)} feels {rng.choice(FEELINGS)}.")
        else:
            lines.append(f"The weather is {rng.choice(WEATHER)} today.")
    lines.append(rng.choice((f"At night, {he} goes to sleep.", f"In the evening, {he} goes home.",
                             f"The next day, {he} visits {friend} in {reviews.town(rng)}.")))
    return " ".join(lines)


# (builder, weight): weights give the character shares in the module docstring
_DOCS = ((_review_doc, 0.59), (_scene_doc, 0.145), (_arithmetic_doc, 0.12), (_story, 0.145))


def generate_corpus(seed: int = 0, n_docs: int | None = None,
                    min_chars: int = DEFAULT_MIN_CHARS) -> list[str]:
    """Documents of the pretraining corpus, deterministic in ``seed``.

    With ``n_docs`` exactly that many documents; otherwise documents are added until their
    total length reaches ``min_chars`` (the default gives ~8.5 MB, ~2.1M tokens).
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if n_docs is not None and n_docs < 1:
        raise ValueError(f"n_docs must be >= 1 or None, got {n_docs}")
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars}")
    rng = random.Random(seed)
    builders, weights = zip(*_DOCS)
    docs: list[str] = []
    total = 0
    while (len(docs) < n_docs) if n_docs is not None else (total < min_chars):
        doc = rng.choices(builders, weights)[0](rng)
        docs.append(doc)
        total += len(doc)
    return docs


def corpus_text(seed: int = 0, n_docs: int | None = None,
                min_chars: int = DEFAULT_MIN_CHARS) -> str:
    """``generate_corpus`` joined with blank lines, ready for tokenizer/LM training."""
    return "\n\n".join(generate_corpus(seed, n_docs, min_chars))
