"""The offline synthetic yes/no set: invented entities, their facts, and questions about them.

Invented entities (towns, animals, inventions, rivers) are described by 3-6 attribute sentences.
A question asks about one attribute: "yes" questions quote the value stated in the passage,
"no" questions swap in another value of the same attribute that appears nowhere in the
passage. So the answer is yes exactly when the asked value occurs in the passage: one simple,
consistent relation a small LM can learn from a few hundred examples, with variety coming from
four domains, several sentence and question templates per attribute, and random attribute
subsets and orders.

:func:`generate` returns plain (question, passage, answer) rows; ``heft_core.data.synthetic_boolq``
turns them into a :class:`~heft_core.data.DatasetSplits` with uids. Not BoolQ, and never labelled so.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from heft_common.errors import DataError

SyntheticRow = tuple[str, str, bool]
"""(question, passage, answer): answer is True for "yes"."""

_SYLLABLES_START = (
    "Vel", "Mor", "Tal", "Quen", "Bra", "Dor", "Fen", "Gal", "Hol", "Ist", "Jar", "Kel",
    "Lun", "Nor", "Pel", "Ris", "Sor", "Tor", "Ul", "Wen", "Yar", "Zan", "Cor", "Ely",
)
_SYLLABLES_MIDDLE = ("", "", "a", "e", "i", "o", "ar", "en", "il", "or")
_SYLLABLES_END = (
    "mora", "dale", "wick", "ford", "stead", "haven", "mere", "holt", "bury", "grove",
    "ton", "ara", "eth", "ios", "ven", "lin",
)
_FIRST_NAMES = (
    "Orla", "Tobin", "Maren", "Idris", "Sella", "Corwin", "Ysolde", "Bram", "Nessa",
    "Ander", "Lio", "Petra", "Hesper", "Davin", "Ilse", "Rook",
)
_SURNAMES = (
    "Venn", "Marsh", "Holloway", "Quill", "Strand", "Ashby", "Tarrow", "Fenwick", "Kell",
    "Darrow", "Mirelle", "Oake", "Brennick", "Saltire", "Wynd", "Corvane",
)
_COLORS = ("red", "blue", "green", "yellow", "grey", "white", "black", "orange", "purple", "brown", "silver", "pink")
_REGIONS = (
    "Eastmark", "Carrow Vale", "the Sundar Coast", "Highmoor", "Lowfen", "Brightwater",
    "Ostrel", "the Amber Hills", "Westreach", "the Tarn Lakes",
)
_PRODUCTS = (
    "woollen cloth", "blue glass", "clockwork toys", "smoked fish", "copper bells", "paper lanterns",
    "sea salt", "honey cakes", "hemp rope", "black ink", "painted tiles", "goat cheese",
)
_HABITATS = (
    "pine forests", "salt marshes", "mountain caves", "desert valleys", "river deltas",
    "bamboo groves", "frozen tundra", "coastal cliffs", "open grasslands", "peat bogs",
)
_FOODS = (
    "seeds", "small fish", "berries", "insects", "mosses", "roots", "snails", "fallen fruit", "worms", "wild grasses",
)
_ANIMAL_KINDS = ("hare", "owl", "lizard", "beetle", "deer", "otter", "finch", "toad", "moth", "goat", "heron", "newt")
_DEVICES = ("loom", "lamp", "pump", "telescope", "press", "compass", "kiln", "clock", "bellows", "crane")
_MATERIALS = ("brass", "oak", "iron", "bone", "glass", "copper", "walnut", "tin", "bronze", "pine")
_POWER = ("water power", "steam", "wind", "hand cranks", "clockwork springs", "lamp oil", "falling weights")
_SEAS = (
    "the Grey Sea", "Lake Omber", "the Northern Gulf", "the Pale Ocean", "Lake Tirn",
    "the Bay of Sels", "the Marrow Sound", "Lake Quell",
)
_MOUNTAINS = ("Kessel Mountains", "Dunmar Hills", "Orrin Range", "Vask Peaks", "Thorn Fells", "Sabel Heights")
_FISH = ("silver trout", "spotted eels", "river perch", "striped carp", "blue pike", "freshwater crabs")


def _invented_word(rng: random.Random) -> str:
    return rng.choice(_SYLLABLES_START) + rng.choice(_SYLLABLES_MIDDLE) + rng.choice(_SYLLABLES_END)


def _choice_of(options: Sequence[str]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(options)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_SURNAMES)}"


def _year(rng: random.Random) -> str:
    return str(rng.randint(1520, 1940))


@dataclass(frozen=True)
class _Attribute:
    """One fact about an entity: how to draw a value, state it, and ask about it.

    Sentence templates use ``{ref}`` (the entity's name or a description) and ``{value}``;
    question templates use ``{name}`` and ``{value}``.
    """

    draw: Callable[[random.Random], str]
    sentences: tuple[str, ...]
    questions: tuple[str, ...]


@dataclass(frozen=True)
class _Domain:
    make_names: Callable[[random.Random], tuple[str, str]]  # (title, name used in text)
    references: tuple[str, ...]  # descriptions used instead of the name after the first sentence
    attributes: tuple[_Attribute, ...]


def _town_names(rng: random.Random) -> tuple[str, str]:
    name = _invented_word(rng)
    return name, name


def _animal_names(rng: random.Random) -> tuple[str, str]:
    title = f"{_invented_word(rng)} {rng.choice(_ANIMAL_KINDS)}"
    return title, f"the {title}"


def _invention_names(rng: random.Random) -> tuple[str, str]:
    title = f"{_invented_word(rng)} {rng.choice(_DEVICES)}"
    return title, f"the {title}"


def _river_names(rng: random.Random) -> tuple[str, str]:
    title = f"{_invented_word(rng)} River"
    return title, f"the {title}"


DOMAINS: tuple[_Domain, ...] = (
    _Domain(
        make_names=_town_names,
        references=("the town", "this small town"),
        attributes=(
            _Attribute(_choice_of(_REGIONS),
                       ("{ref} lies in the region of {value}.", "{ref} belongs to the province of {value}."),
                       ("is {name} a town in {value}", "is {name} located in {value}")),
            _Attribute(lambda rng: f"{_invented_word(rng)} river",
                       ("{ref} sits on the banks of the {value}.", "The {value} runs through {ref}."),
                       ("does the {value} run through {name}", "is {name} on the {value}")),
            _Attribute(_year, ("{ref} was founded in {value}.", "Settlers founded {ref} in {value}."),
                       ("was {name} founded in {value}", "did settlers found {name} in {value}")),
            _Attribute(lambda rng: f"{rng.randint(8, 900) * 100:,}",
                       ("About {value} people live in {ref}.", "{ref} has a population of about {value}."),
                       ("do about {value} people live in {name}", "does {name} have about {value} people")),
            _Attribute(_choice_of(_PRODUCTS),
                       ("{ref} is best known for its {value}.", "Traders visit {ref} to buy {value}."),
                       ("is {name} known for its {value}", "do traders go to {name} for {value}")),
            _Attribute(_choice_of(_COLORS),
                       ("Most houses in {ref} have {value} roofs.", "The roofs of {ref} are painted {value}."),
                       ("do the houses in {name} have {value} roofs", "are the roofs of {name} {value}")),
        ),
    ),
    _Domain(
        make_names=_animal_names,
        references=("the animal", "this creature"),
        attributes=(
            _Attribute(_choice_of(_COLORS),
                       ("{ref} is mostly {value} in colour.", "Adults of {ref} turn {value} in spring."),
                       ("is {name} mostly {value}", "is {name} {value} in colour")),
            _Attribute(_choice_of(_HABITATS), ("{ref} lives in {value}.", "{ref} is found mainly in {value}."),
                       ("does {name} live in {value}", "can {name} be found in {value}")),
            _Attribute(_choice_of(_FOODS), ("{ref} feeds mainly on {value}.", "The diet of {ref} is mostly {value}."),
                       ("does {name} eat {value}", "does {name} feed mainly on {value}")),
            _Attribute(lambda rng: str(rng.randint(2, 45)),
                       ("{ref} can live for {value} years.", "A healthy specimen of {ref} lives {value} years."),
                       ("can {name} live for {value} years", "does {name} live about {value} years")),
            _Attribute(_person, ("{ref} was first described by {value}.", "The naturalist {value} first drew {ref}."),
                       ("was {name} first described by {value}", "did {value} discover {name}")),
            _Attribute(lambda rng: str(rng.randint(1, 12)),
                       ("{ref} usually has {value} young at a time.", "{ref} raises {value} young each season."),
                       ("does {name} raise {value} young at a time", "does {name} have {value} young each season")),
        ),
    ),
    _Domain(
        make_names=_invention_names,
        references=("the machine", "the device"),
        attributes=(
            _Attribute(_person, ("{ref} was built by {value}.", "The engineer {value} designed {ref}."),
                       ("was {name} built by {value}", "did {value} invent {name}")),
            _Attribute(_year,
                       ("The first working model of {ref} was shown in {value}.", "{ref} was patented in {value}."),
                       ("was {name} invented in {value}", "was {name} patented in {value}")),
            _Attribute(lambda rng: _invented_word(rng),
                       ("{ref} was first made in the city of {value}.",
                        "The workshop that made {ref} stood in {value}."),
                       ("was {name} first made in {value}", "was {name} built in the city of {value}")),
            _Attribute(_choice_of(_MATERIALS),
                       ("The frame of {ref} is made of {value}.", "{ref} has a frame of {value}."),
                       ("is the frame of {name} made of {value}", "is {name} built from {value}")),
            _Attribute(_choice_of(_POWER), ("{ref} runs on {value}.", "{ref} is driven by {value}."),
                       ("does {name} run on {value}", "is {name} powered by {value}")),
            _Attribute(lambda rng: str(rng.randint(2, 60)),
                       ("Only {value} copies of {ref} were ever sold.", "Craftsmen made {value} copies of {ref}."),
                       ("were {value} copies of {name} made", "were {value} copies of {name} ever sold")),
        ),
    ),
    _Domain(
        make_names=_river_names,
        references=("the river", "this river"),
        attributes=(
            _Attribute(lambda rng: str(rng.randint(40, 990)),
                       ("{ref} is {value} kilometres long.", "{ref} runs for {value} kilometres."),
                       ("is {name} {value} kilometres long", "does {name} run for {value} kilometres")),
            _Attribute(_choice_of(_SEAS), ("{ref} flows into {value}.", "{ref} empties into {value}."),
                       ("does {name} flow into {value}", "does {name} end in {value}")),
            _Attribute(_choice_of(_MOUNTAINS),
                       ("{ref} rises in the {value}.", "The source of {ref} lies in the {value}."),
                       ("does {name} rise in the {value}", "is the source of {name} in the {value}")),
            _Attribute(_choice_of(_COLORS),
                       ("The water of {ref} looks {value}.", "{ref} has {value} water after rain."),
                       ("is the water of {name} {value}", "does {name} look {value}")),
            _Attribute(_choice_of(_FISH), ("Anglers on {ref} catch {value}.", "{ref} is home to {value}."),
                       ("do anglers catch {value} in {name}", "is {name} home to {value}")),
            _Attribute(lambda rng: str(rng.randint(2, 40)),
                       ("{value} bridges cross {ref}.", "There are {value} bridges over {ref}."),
                       ("do {value} bridges cross {name}", "are there {value} bridges over {name}")),
        ),
    ),
)


def _synthetic_example(rng: random.Random, answer: bool) -> tuple[str, str] | None:
    """One (question, passage) whose answer is ``answer``, or None if no wrong value was found."""
    domain = rng.choice(DOMAINS)
    title, name = domain.make_names(rng)
    chosen = rng.sample(domain.attributes, rng.randint(3, min(6, len(domain.attributes))))
    values = [attribute.draw(rng) for attribute in chosen]
    sentences = []
    for position, (attribute, value) in enumerate(zip(chosen, values)):
        reference = name if position == 0 or rng.random() < 0.3 else rng.choice(domain.references)
        sentence = rng.choice(attribute.sentences).format(ref=reference, value=value)
        sentences.append(sentence[0].upper() + sentence[1:])
    passage = f"{title} -- {' '.join(sentences)}"
    asked = rng.randrange(len(chosen))
    value = values[asked]
    if not answer:
        # A wrong value must not occur anywhere in the passage, so "yes iff the asked value
        # appears in the passage" holds for every example.
        for _attempt in range(50):
            candidate = chosen[asked].draw(rng)
            if candidate.lower() not in passage.lower():
                value = candidate
                break
        else:
            return None
    question = rng.choice(chosen[asked].questions).format(name=name, value=value).lower()
    return question, passage


def generate(n_train: int, n_validation: int, seed: int) -> tuple[list[SyntheticRow], list[SyntheticRow]]:
    """Train and validation rows, deterministic for ``seed``.

    Each split has exactly half yes answers (an odd size gets one more yes); no (question,
    passage) pair occurs twice, so the splits are disjoint.
    """
    if n_train < 2 or n_validation < 2:
        raise DataError(
            f"The synthetic set needs at least 2 train and 2 validation examples (both answers); "
            f"got {n_train} and {n_validation}."
        )
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()

    def build_split(split: str, size: int) -> list[SyntheticRow]:
        answers = [True] * ((size + 1) // 2) + [False] * (size // 2)
        rng.shuffle(answers)
        rows: list[SyntheticRow] = []
        for answer in answers:
            for _attempt in range(100):
                made = _synthetic_example(rng, answer)
                if made is not None and made not in seen:
                    break
            else:
                raise DataError(f"Could not generate {size} distinct synthetic {split} examples.")
            seen.add(made)
            question, passage = made
            rows.append((question, passage, answer))
        return rows

    return build_split("train", n_train), build_split("validation", n_validation)
