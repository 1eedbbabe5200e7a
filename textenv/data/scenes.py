"""The scene world: plain descriptive sentences built from concept words.

A scene is "<subject> <verb> [<object>] <prep> the <place>" in simple present or present
progressive, e.g. "A boy throws a red ball in the park." or "In the garden, a cat is
sleeping." Its concepts are the base forms of subject, verb, object and place
("boy", "throw", "ball", "park"); intransitive verbs have no object. Inflections are
regular only (dogs, throws, watches, carries, running, baking), so a concept is always
recognisable in its sentence by the commongen task's stemming rule. The same predicates
also drive the stories in the corpus ("Every morning, she feeds a horse on the farm.").
"""

from __future__ import annotations

import random
from typing import NamedTuple


def _w(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _verbs(spec: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """Parse "throw: ball stone | jump over: fence | sleep:" into (verb, particle, objects)."""
    out = []
    for item in spec.split("|"):
        head, objects = item.split(":")
        verb, *particle = head.split()
        out.append((verb, " ".join(particle), _w(objects)))
    return tuple(out)


JOBS = _w("farmer chef student teacher doctor nurse artist baker fisherman gardener pilot driver "
          "singer dancer player worker tourist runner waiter cook musician")
PEOPLE = _w("boy girl man woman child kid grandmother grandfather mother father neighbor") + JOBS
ANIMALS = _w("dog cat horse bird cow goat duck rabbit monkey bear fox pig chicken squirrel puppy "
             "kitten parrot frog deer mouse")
PERSON_VERBS = _verbs(
    "throw: ball stone stick frisbee | catch: ball fish frisbee | kick: ball stone can | "
    "read: book newspaper letter map menu magazine | write: letter note poem story song | "
    "eat: apple sandwich pizza bread soup cake banana orange cookie salad | "
    "drink: coffee tea water milk juice | cook: dinner soup pasta rice egg | "
    "bake: cake bread pie cookie | play: guitar piano violin drum flute chess | "
    "ride: bike horse bicycle bus train skateboard | wash: car dish window shirt apple | "
    "paint: fence wall picture house door chair | carry: bag box basket bucket umbrella suitcase | "
    "climb: tree hill ladder wall rock | plant: tree flower seed tomato | "
    "cut: bread paper grass cake rope | fix: bike car roof chair fence clock | "
    "open: door window box gift letter | build: house sandcastle wall fence snowman bridge | "
    "buy: bread apple ticket shirt hat | sell: fruit bread fish ticket flower | "
    "clean: table floor window car | feed: dog cat horse bird duck chicken | walk: dog | "
    "pull: rope cart wagon | push: cart stroller swing | fly: kite | "
    "watch: movie game sunset bird | drive: car truck tractor bus | wear: hat coat scarf jacket | "
    "hold: umbrella cup flag lamp | pick: apple flower berry strawberry | sing: song | "
    "draw: picture map circle horse | fold: shirt towel paper map | pour: water milk tea juice | "
    "dance: | swim: | run: | sit: | wait: | rest: | sleep: | jump:")
ANIMAL_VERBS = _verbs(
    "chase: ball cat bird rabbit squirrel stick | eat: grass bone carrot seed apple | "
    "drink: water milk | carry: stick bone | dig: hole | jump over: fence log puddle | "
    "play with: ball stick toy | sleep: | swim: | run: | sit: | rest:")
PLACES = tuple((place, prep) for chunk in (
    "in: park garden kitchen field yard forest library square shop room backyard village city "
    "cafe bakery classroom office museum",
    "on: street beach farm playground hill road bridge mountain island stage boat porch",
    "at: market school station zoo", "near: river lake pool harbor pond")
    for prep, places in [chunk.split(":")] for place in places.split())
MASS = frozenset(_w("water milk tea juice coffee rice soup bread grass paper pasta fruit"))
BARE = frozenset(_w("chess dinner"))  # no article: "plays chess", "cooks dinner"
INSTRUMENTS = frozenset(_w("guitar piano violin drum flute"))  # "plays the guitar"
NO_PLURAL = frozenset(_w("fish sheep deer"))
ADJECTIVES = _w("red blue green yellow small big old new wooden heavy tiny white black brown round")
ADVERBS = _w("slowly quickly carefully quietly gently")
# no concept words in here: a scene's only content words are its concepts
TIMES = ("in the morning", "after work", "on a sunny day", "every evening", "at night",
         "before lunch", "on Sunday", "in the afternoon", "after lunch", "in the summer",
         "in the winter", "early in the morning", "every day", "on Saturday")
DOUBLED = frozenset(_w("run swim sit cut dig shop stop jog skip plan hug"))  # running, swimming


def third_person(word: str) -> str:
    """Regular -s form, also used for plurals: throws, watches, carries, tomatoes."""
    if word.endswith(("s", "sh", "ch", "x", "o")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def progressive(word: str) -> str:
    """-ing form: running, baking, throwing."""
    if word in DOUBLED:
        return word + word[-1] + "ing"
    if word.endswith("e") and not word.endswith("ee"):
        return word[:-1] + "ing"
    return word + "ing"


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _noun_phrase(rng: random.Random, noun: str) -> str:
    if noun in BARE:
        return noun
    if noun in INSTRUMENTS:
        return "the " + noun
    if noun in MASS:
        return rng.choice(("some ", "the ")) + noun
    if noun not in NO_PLURAL and rng.random() < 0.25:
        return rng.choice(("", "two ", "some ")) + third_person(noun)
    if rng.random() < 0.3:
        noun = rng.choice(ADJECTIVES) + " " + noun
    return rng.choice(("the " + noun, article(noun), article(noun)))


def predicate(rng: random.Random, animal: bool, form: str) -> tuple[str, str, tuple[str, ...]]:
    """("throws a ball", "in the park", ("throw", "ball", "park")) for form "3sg", "ing" or "base"."""
    verb, particle, objects = rng.choice(ANIMAL_VERBS if animal else PERSON_VERBS)
    phrase = {"3sg": third_person, "ing": lambda v: "is " + progressive(v), "base": str}[form](verb)
    if particle:
        phrase += " " + particle
    words = [verb]
    if objects:
        obj = rng.choice(objects)
        phrase += " " + _noun_phrase(rng, obj)
        words.append(obj)
    place, prep = rng.choice(PLACES)
    words.append(place)
    return phrase, f"{prep} the {place}", tuple(words)


class Scene(NamedTuple):
    sentence: str  # e.g. "A boy throws a red ball in the park."
    concepts: tuple[str, ...]  # base forms: subject, verb, [object,] place -- all distinct


def scene(rng: random.Random) -> Scene:
    while True:
        animal = rng.random() < 0.3
        subject = rng.choice(ANIMALS if animal else PEOPLE)
        form = "ing" if rng.random() < 0.3 else "3sg"
        verb, place, words = predicate(rng, animal, form)
        if subject not in words and len(set(words)) == len(words):
            break
    if form == "3sg" and rng.random() < 0.15:
        verb = rng.choice(ADVERBS) + " " + verb
    who = rng.choice(("the " + subject, article(subject), article(subject)))
    when = rng.choice(TIMES)
    r = rng.random()
    if r < 0.5:
        sentence = f"{cap(who)} {verb} {place}."
    elif r < 0.65:
        sentence = f"{cap(place)}, {who} {verb}."
    elif r < 0.85:
        sentence = f"{cap(when)}, {who} {verb} {place}."
    else:
        sentence = f"{cap(who)} {verb} {place} {when}."
    return Scene(sentence, (subject, *words))


def concept_prompt(concepts: tuple[str, ...] | list[str]) -> str:
    """The commongen task's prompt format: "Words: dog, ball, park. Sentence:"."""
    return f"Words: {', '.join(concepts)}. Sentence:"
