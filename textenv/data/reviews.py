"""The review world: reviews of films, restaurants, products, hotels, books and games.

Also home of the people-and-places vocabulary (names, towns, titles) the other generators share.
Opinions are built from VADER-lexicon words (|valence| >= 0.9) with intensifiers ("really
good"), dampeners ("a little weak"), negation ("not good", "never boring") and contrast
("..., but ..."), while the neutral vocabulary (aspects, companions, times) carries no
valence, so VADER compound scores of reviews spread over [-1, 1]. A review is
``opening + continuation + rest``: the sentiment task's prompt is the opening and its
demonstration is the continuation.
"""

from __future__ import annotations

import random
from typing import NamedTuple


def _w(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# ---------------------------------------------------------------- shared vocabulary
FEMALE = _w("Anna Maria Emma Olivia Sophia Mia Lucy Grace Chloe Ella Lily Zoe Hannah Sarah Laura "
            "Julia Nina Rosa Alice Clara Eva Kate Lena Maya Nora Ruby Sofia Tina Vera Wendy Amy "
            "Beth Carla Diana Elena Fiona Helen Iris Jane Kira Mei Aisha Priya Yuki Ingrid Leila")
MALE = _w("Tom Sam Jack Leo Max Ben Dan Alex Oscar Henry Noah Liam Lucas Owen Paul Peter Mark Luke "
          "Ivan Hugo Felix Omar Ravi Kenji Marco Diego Ali Victor Simon Tim Carl Eric Frank George "
          "Joe Nick Ryan Ted Will Adam Hassan Pablo Arjun Chen Lars Kofi")
SURNAMES = _w("Smith Brown Garcia Miller Davis Lopez Wilson Moore Taylor Clark Lewis Walker Hall Young "
              "King Wright Hill Baker Adams Nelson Carter Mitchell Turner Parker Evans Collins Stewart "
              "Morris Reed Cook Bell Murphy Bailey Cooper Ward Gray Hughes Price Wood Barnes Ross "
              "Foster Kelly Hayes Myers Ford Hamilton Graham Sullivan Novak Okafor Tanaka Rossi")
TOWN_A = _w("Oak Mill Stone River Red Ash Elm Pine Maple Silver Black White Fair North South East "
            "West Long Rose Fox Cedar Lake Wolf Iron Bay Brook Hazel Willow Copper Raven")
TOWN_B = _w("brook field ridge ton ville wood port haven dale ford bury hill stead water gate mouth")
TITLE_ADJ = _w("Silent Last Golden Hidden Long Final Wild Quiet Frozen Little Distant Crimson Electric "
               "Secret Endless Northern Midnight Paper Glass Iron Velvet Empty Hollow Second Silver "
               "Winter Summer Burning Forgotten Lonely Yellow Sleeping Seventh Invisible Tiny Copper")
TITLE_NOUN = _w("Harbor River Kingdom Garden Road Mountain City Island Letter Storm Horizon Bridge "
                "Window Station Machine Forest Door Signal Circle Planet Shadow Tower Mirror Voyage "
                "Orchard Echo Frontier Lighthouse Engine Valley Crown Ocean Compass Archive Diver "
                "Clockmaker Lantern Map Winter Train Violin Tide Meadow Comet Fox Detective")
PRODUCTS = _w("blender toaster kettle laptop phone tablet speaker camera vacuum printer router "
              "keyboard monitor backpack suitcase jacket tent lamp drill mixer heater fan watch "
              "charger blanket mattress stroller bike umbrella microwave")
BRAND_A = _w("Zen Vex Lum Nor Kal Tri Aur Cor Sol Hex Nov Opt Rex Tek Vol Mar Pix Dura")
BRAND_B = _w("tro ra io ex on ix a us ia o en")
EATERIES = ("Kitchen", "Diner", "Grill", "Cafe", "Bistro", "Pizzeria", "Bakery", "Noodle Bar",
            "Steakhouse", "Taqueria", "Tavern", "Dumpling House")
COLORS = _w("red blue green yellow white black brown orange purple gray")
ANIMAL_NAMES = _w("Parrot Lion Fox Goat Owl Bear Whale Rabbit Crow Tiger Pelican Otter")

# --------------------------------------------------------------------- reviews
# Sentiment words are VADER-lexicon words (|valence| >= 0.9); the neutral vocabulary
# below (aspects, companions, times) carries no valence, so the score comes from the opinion.
POS_ADJ = _w("good great excellent wonderful amazing brilliant fantastic superb lovely perfect "
             "impressive outstanding awesome terrific nice fabulous splendid marvelous flawless")
NEG_ADJ = _w("bad terrible awful horrible poor weak disappointing lousy pathetic dreadful useless "
             "worthless")
POS_NOUN = ("a real joy", "an absolute masterpiece", "a total delight", "a pleasure", "a winner",
            "a real treat")
NEG_NOUN = ("a total disaster", "a complete mess", "a waste of money", "a waste of time",
            "a big disappointment", "a failure")
POS_VERB = _w("loved enjoyed liked adored appreciated")
NEG_VERB = _w("hated disliked despised")
BOOST = _w("very really so extremely absolutely incredibly quite totally truly remarkably")
DAMP = ("kind of", "a little", "slightly", "somewhat")
FAMILY = ("my sister", "my brother", "my wife", "my husband", "my kids", "my parents", "my dad",
          "my mom", "my roommate", "my coworkers", "my family", "my cousin", "my neighbor")
WHEN = ("last weekend", "last night", "yesterday", "on Friday", "on Saturday", "a week ago",
        "last month", "over the holidays", "on my birthday", "after work", "this morning",
        "two days ago", "on Sunday", "last summer")


class Domain(NamedTuple):
    did: tuple[str, ...]  # past-tense verb phrases: "I {did} {subject}"
    things: tuple[str, ...]  # "this {thing}"; empty means the product noun itself
    aspects: tuple[str, ...]
    aspect_prep: str  # "the acting in X", "the food at X", "the battery of X"
    pos: tuple[str, ...]  # domain adjectives, on top of POS_ADJ / NEG_ADJ
    neg: tuple[str, ...]


DOMAINS = {
    "film": Domain(("watched", "saw"), ("film", "movie"),
                   ("acting", "plot", "ending", "script", "dialogue", "pacing", "story", "cast",
                    "music", "soundtrack", "humor", "direction", "camera work", "lead actor",
                    "villain", "final scene", "first half", "main character", "romance"), "in",
                   _w("funny charming entertaining exciting thrilling clever beautiful inspiring "
                      "delightful creative gorgeous powerful hilarious"),
                   _w("boring dull stupid lame confusing ridiculous annoying painful dumb irritating")),
    "restaurant": Domain(("had dinner at", "ate at", "had lunch at", "tried"), ("restaurant", "place"),
                         ("food", "pasta", "soup", "steak", "pizza", "dessert", "coffee", "bread",
                          "salad", "burger", "curry", "chicken", "sauce", "wine", "cake", "fish"),
                         "at", _w("delicious fresh satisfying lovely pleasant"),
                         _w("gross nasty messy unpleasant")),
    "product": Domain(("bought", "ordered", "got"), (),
                      ("battery", "screen", "sound", "design", "price", "quality", "handle", "lid",
                       "motor", "app", "manual", "packaging", "button", "cable", "display"), "of",
                      _w("comfortable elegant smart helpful solid"),
                      _w("broken ugly frustrating annoying")),
    "hotel": Domain(("stayed at",), ("hotel", "place"),
                    ("room", "bed", "breakfast", "pool", "view", "location", "shower", "lobby",
                     "bathroom", "balcony", "elevator"), "at",
                    _w("clean comfortable pleasant lovely gorgeous"),
                    _w("dirty noisy unpleasant nasty gross")),
    "book": Domain(("read", "finished"), ("book", "novel"),
                   ("story", "writing", "ending", "main character", "first chapter", "plot",
                    "style", "dialogue", "cover"), "in",
                   _w("charming clever beautiful inspiring delightful creative powerful funny"),
                   _w("boring dull confusing stupid lame ridiculous painful")),
    "game": Domain(("played", "tried"), ("game",),
                   ("gameplay", "art style", "story", "control scheme", "level design",
                    "soundtrack", "multiplayer mode", "ending", "map", "boss fight"), "in",
                   _w("fun exciting thrilling clever creative beautiful"),
                   _w("boring frustrating annoying confusing broken ugly")),
}
DOMAIN_NAMES = tuple(DOMAINS)

# (kind, lean, template). kind says how the continuation must start: "clause" -> " the plot
# was ...", "pred" -> " really good ...", "sent" -> " The plot was ...". lean biases the
# opinion (e.g. "I had high hopes ..., but" is usually followed by a complaint).
OPENINGS = (
    ("clause", 0, "I {did} {S} {when} and"), ("clause", 0, "I {did} {S} with {who} {when} and"),
    ("clause", 0, "{Who} and I {did} {S} {when}, and"), ("clause", 0, "We finally {did} {S} and"),
    ("clause", 0, "I {did} this {thing} {when} and"), ("clause", -1, "I had high hopes for {S}, but"),
    ("clause", 1, "I did not expect much from {S}, but"), ("clause", 0, "I have to say"),
    ("clause", 0, "To tell the truth,"), ("clause", 0, "After all the buzz about {S},"),
    ("pred", 0, "The {aspect} {aprep} {S} was"), ("pred", 0, "The {aspect} was"),
    ("pred", 0, "This {thing} was"), ("pred", 0, "{S} was"), ("pred", 0, "Overall, the {aspect} was"),
    ("pred", 0, "I thought the {aspect} {aprep} {S} was"),
    ("sent", 0, "I {did} {S} {when}."), ("sent", 0, "{Who} told me about {S}."),
    ("sent", 0, "I went in knowing nothing about {S}."), ("sent", 0, "Here is my review of {S}."),
)
MAX_OPENING_CHARS = 60  # ~15 tokens: openings fit the sentiment task's 16-token prompt limit
NEUTRAL = ("I went with {who}.", "We went on a {day} evening.", "It took about two hours.",
           "We got there at about {hour} o'clock.", "The {aspect} reminded me of {title}.",
           "There were a lot of people there.", "My review is a bit late.")
DAYS = _w("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def town(rng: random.Random) -> str:
    return rng.choice(TOWN_A) + rng.choice(TOWN_B)


def title(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"
    if r < 0.75:
        return f"{rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"
    if r < 0.9:
        return f"The {rng.choice(TITLE_NOUN)} of {town(rng)}"
    return f"{rng.choice(FEMALE + MALE)} and the {rng.choice(TITLE_NOUN)}"


def _subject(rng: random.Random, domain: str, product: str) -> str:
    if domain in ("film", "book", "game"):
        return title(rng)
    if domain == "restaurant":
        if rng.random() < 0.6:
            return f"{rng.choice(FEMALE + MALE)}'s {rng.choice(EATERIES)}"
        return f"The {_cap(rng.choice(COLORS))} {rng.choice(ANIMAL_NAMES)}"
    if domain == "hotel":
        return f"the {town(rng)} {rng.choice(('Inn', 'Hotel', 'Lodge', 'Resort', 'Motel'))}"
    return f"the {rng.choice(BRAND_A)}{rng.choice(BRAND_B)} {product}"


def _adj(rng: random.Random, d: Domain, sign: int) -> str:
    general, extra = (POS_ADJ, d.pos) if sign > 0 else (NEG_ADJ, d.neg)
    return rng.choice(general if rng.random() < 0.5 else extra)


def _adj_phrase(rng: random.Random, d: Domain, sign: int) -> str:
    r = rng.random()
    if r < 0.15:  # negated opposite: "not boring at all" is positive, "not very good" negative
        if sign > 0:
            return rng.choice(("not {} at all", "never {}", "not {}")).format(_adj(rng, d, -1))
        return rng.choice(("not {}", "not very {}", "never {}")).format(_adj(rng, d, 1))
    if r < 0.3:
        a, b = _adj(rng, d, sign), _adj(rng, d, sign)
        return a if a == b else f"{a} and {b}"
    if r < 0.4:
        return f"{rng.choice(DAMP)} {_adj(rng, d, sign)}"
    if r < 0.7:
        return f"{rng.choice(BOOST)} {_adj(rng, d, sign)}"
    return _adj(rng, d, sign)


def _clause(rng: random.Random, d: Domain, sign: int) -> str:
    r, pos = rng.random(), sign > 0
    if r < 0.45:
        return f"the {rng.choice(d.aspects)} was {_adj_phrase(rng, d, sign)}"
    if r < 0.6:
        return f"I {rng.choice(POS_VERB if pos else NEG_VERB)} the {rng.choice(d.aspects)}"
    if r < 0.72:
        return f"it was {rng.choice(POS_NOUN if pos else NEG_NOUN)}"
    if r < 0.8:
        react = ("smile", "laugh", "happy") if pos else ("angry", "sad", "sick")
        return f"the {rng.choice(d.aspects)} made me {rng.choice(react)}"
    if r < 0.9:
        return rng.choice(("I would recommend it to anyone", "I would happily go back")
                          if pos else ("I would not recommend it", "I would never go back"))
    return f"I {rng.choice(('loved', 'enjoyed') if pos else ('hated', 'disliked'))} every minute of it"


class Review(NamedTuple):
    opening: str  # the sentiment task's prompt
    continuation: str  # the sentiment task's demonstration response (starts with a space)
    rest: str  # one to three more sentences (starts with a space)
    stars: int  # 1..5, follows the mean opinion of all clauses


def review(rng: random.Random, style: str | None = None) -> Review:
    """One review; style "pos", "neg" or "mixed" fixes the opinion, None draws it."""
    if style not in (None, "pos", "neg", "mixed"):
        raise ValueError(f"unknown review style {style!r}; expected 'pos', 'neg', 'mixed' or None")
    domain = rng.choice(DOMAIN_NAMES)
    d = DOMAINS[domain]
    product = rng.choice(PRODUCTS)
    subject = _subject(rng, domain, product)
    opening = ""
    while not 0 < len(opening) <= MAX_OPENING_CHARS:
        kind, lean, template = rng.choice(OPENINGS)
        opening = _cap(template.format(
            did=rng.choice(d.did), S=subject, when=rng.choice(WHEN), who=rng.choice(FAMILY),
            Who=_cap(rng.choice(FAMILY)), thing=rng.choice(d.things or (product,)),
            aspect=rng.choice(d.aspects), aprep=d.aspect_prep))
    if style is None:
        if lean and rng.random() < 0.7:
            style = "pos" if lean > 0 else "neg"
        else:
            style = rng.choices(("pos", "neg", "mixed"), (0.37, 0.43, 0.2))[0]
    p_pos = {"pos": 0.92, "neg": 0.08, "mixed": 0.5}[style]

    def draw() -> int:
        return 1 if rng.random() < p_pos else -1

    first = draw()
    signs = [first]
    head = _adj_phrase(rng, d, first) if kind == "pred" else _clause(rng, d, first)
    continuation = " " + (_cap(head) if kind == "sent" else head)
    if style == "mixed" or rng.random() < 0.5:  # a second clause, contrasting when mixed
        second = -first if style == "mixed" else draw()
        signs.append(second)
        joint = rng.choice((", but ", ", although ", ". But ")) if second != first else ", and "
        continuation += joint + _clause(rng, d, second)
    continuation += "."
    rest = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.2:
            rest.append(rng.choice(NEUTRAL).format(
                who=rng.choice(FAMILY), day=rng.choice(DAYS), hour=rng.randint(5, 9),
                aspect=rng.choice(d.aspects), title=title(rng)))
        else:
            signs.append(draw())
            rest.append(_cap(_clause(rng, d, signs[-1])) + ".")
    stars = max(1, min(5, round(3 + 2 * sum(signs) / len(signs))))
    return Review(opening, continuation, " " + " ".join(rest), stars)
