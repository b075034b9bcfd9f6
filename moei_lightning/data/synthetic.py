"""A small synthetic world: GI tasks a tiny backbone is pretrained on, and EI tasks it has never seen.

Every task is multiple choice with a rule that can be learnt from examples:

- GI (the four dimensions): *knowledge* (the capital and the symbol animal of invented countries),
  *reasoning* (addition and subtraction of numbers 1-9, bare or as a story), *commonsense* (fixed
  rules on what happens to an object dropped on stone, left in the hot sun or put in a pond) and
  *reading* (what someone put where, felt or said: copied from a two-sentence passage).
- EI (the three aspects): *perception* (which emotion a behaviour or an utterance shows, cued by
  words), *cognition* (what someone feels given a cause, and the likely cause of a feeling) and
  *expression* (the reply that fits a situation's emotion, and how to say one's own feeling).

EI and GI share their surface on purpose: the same instructions, people, objects, places and
countries, so that an adapter fine-tuned on EI reaches GI prompts too. That is the forgetting MoEI
is meant to avoid, and it must be visible on this data.

Everything is drawn from string-seeded ``random.Random`` streams, so the files are identical on
every machine and Python version. ``python -m moei_lightning.data.synthetic --out DIR`` writes
``DIR/{ei,gi}/{train,val,test}.jsonl``, the bundled ``samples/synthetic`` files; :func:`gi_corpus`
draws the pretraining corpus, disjoint from the GI validation and test items.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYNTHETIC_DIR = Path(__file__).parent / "samples" / "synthetic"
"""The bundled synthetic data: ``{ei,gi}/{train,val,test}.jsonl``."""

SPLIT_SIZES: dict[str, dict[str, int]] = {
    "ei": {"train": 400, "val": 40, "test": 50},  # per task; six tasks
    "gi": {"train": 100, "val": 60, "test": 75},  # per dimension; the GI train split is a mixing stream
}
"""Records per task (EI) or per dimension (GI) in each split."""

Record = dict[str, Any]

# ---------------------------------------------------------------------------------------------------------------
# The shared world
# ---------------------------------------------------------------------------------------------------------------
NAMES = (
    "Mira",
    "Omar",
    "Lena",
    "Tomas",
    "Juno",
    "Kai",
    "Rosa",
    "Ivo",
    "Sana",
    "Pavel",
    "Nina",
    "Eli",
    "Yara",
    "Bram",
    "Tess",
    "Ravi",
)
PLACES = ("kitchen", "garden", "market", "school", "station", "library", "barn", "attic", "harbor", "park")
COLORS = ("red", "blue", "green", "yellow", "black", "white")
ITEMS = ("kite", "box", "lamp", "book", "basket", "hat", "key", "cup", "map", "drum")
THINGS = ("apples", "stones", "coins", "shells", "books", "cups", "eggs", "kites")

# (country, capital, symbol animal): invented facts that only pretraining teaches.
COUNTRIES = (
    ("Zorvia", "Brelo", "fox"),
    ("Quellan", "Tamsk", "owl"),
    ("Bravosh", "Idra", "bear"),
    ("Talmere", "Vusk", "heron"),
    ("Mordavia", "Kelno", "wolf"),
    ("Venlith", "Orsa", "lynx"),
    ("Kasport", "Dunmar", "hare"),
    ("Drumelia", "Pexa", "crane"),
    ("Lumora", "Sallis", "otter"),
    ("Pelagor", "Wenby", "eagle"),
    ("Rynthal", "Cobra", "horse"),
    ("Savoren", "Mittal", "goat"),
    ("Tirvane", "Holm", "swan"),
    ("Ulmaros", "Fenza", "deer"),
    ("Wexland", "Galdo", "seal"),
    ("Ostera", "Lirrow", "crow"),
    ("Nembar", "Quist", "badger"),
    ("Corvath", "Ambel", "moose"),
    ("Feldoria", "Rusk", "falcon"),
    ("Gavrin", "Teloa", "bison"),
    ("Hestmar", "Nuvo", "lion"),
    ("Jorvane", "Skell", "camel"),
    ("Isteria", "Parn", "tiger"),
    ("Yelmark", "Voss", "whale"),
)

# Object classes and what happens to them under three actions: fixed commonsense rules.
OBJECTS: dict[str, tuple[str, ...]] = {
    "fragile": ("glass", "plate", "vase", "mirror", "bowl"),
    "rubber": ("ball", "rubber duck", "rubber boot", "tennis ball"),
    "frozen": ("ice cube", "snowball", "icicle", "ice block"),
    "metal": ("spoon", "coin", "nail", "iron key"),
    "wooden": ("stick", "plank", "wooden toy", "log"),
}
ACTIONS = {  # action -> sentence template with {name} and {obj}
    "drop": "{name} drops a {obj} on stone.",
    "sun": "{name} leaves a {obj} in the hot sun.",
    "pond": "{name} puts a {obj} in a pond.",
}
OUTCOMES: dict[tuple[str, str], str] = {
    ("fragile", "drop"): "it breaks",
    ("fragile", "sun"): "it gets warm",
    ("fragile", "pond"): "it sinks",
    ("rubber", "drop"): "it bounces",
    ("rubber", "sun"): "it gets soft",
    ("rubber", "pond"): "it floats",
    ("frozen", "drop"): "it cracks",
    ("frozen", "sun"): "it melts",
    ("frozen", "pond"): "it floats",
    ("metal", "drop"): "it rings",
    ("metal", "sun"): "it gets hot",
    ("metal", "pond"): "it sinks",
    ("wooden", "drop"): "it thuds",
    ("wooden", "sun"): "it dries",
    ("wooden", "pond"): "it floats",
}
ALL_OUTCOMES = tuple(sorted(set(OUTCOMES.values())))

SCENES = (  # the other sentence of a reading passage: no person, object, place or feeling to confuse
    "The day was warm.",
    "It was late in the evening.",
    "The wind was cold.",
    "It rained all morning.",
    "The sun was low.",
    "It was a quiet day.",
    "The clock struck nine.",
    "It was the first day of spring.",
)

# Instructions are shared by both domains, so the domain shows only in the input.
SHARED_INSTRUCTIONS = (
    "Choose the best answer.",
    "Read the text and pick the right option.",
    "Answer the question with one of the options.",
)

# ---------------------------------------------------------------------------------------------------------------
# EI: emotions and their cues
# ---------------------------------------------------------------------------------------------------------------
EMOTIONS = ("joy", "sadness", "anger", "fear")
FEELING_WORDS = {"joy": "happy", "sadness": "sad", "anger": "angry", "fear": "afraid"}
# Three cues per emotion and kind: small tables, so that a few hundred fine-tuning steps can learn them.
BEHAVIOURS: dict[str, tuple[str, ...]] = {
    "joy": ("laughs and claps", "smiles from ear to ear", "sings and dances"),
    "sadness": ("cries quietly", "sighs and stares at the floor", "sobs alone"),
    "anger": ("slams the door", "shouts and stamps", "glares with clenched fists"),
    "fear": ("trembles and hides", "backs away with a pale face", "screams and runs"),
}
OPENERS: dict[str, tuple[str, ...]] = {
    "joy": ("Hooray,", "How wonderful,", "Yay,"),
    "sadness": ("Sadly,", "It breaks my heart,", "I feel so empty,"),
    "anger": ("How dare they,", "This is so unfair,", "I am furious,"),
    "fear": ("Help,", "I am so scared,", "My heart is racing,"),
}
EVENTS = (  # neutral events built from the GI world; the opener carries the emotion
    "the glass fell on stone",
    "the letter came today",
    "{other} took the red kite",
    "the market is closed",
    "the train to {capital} left",
    "the box in the attic is open",
    "{other} moved to {country}",
    "the lamp in the barn went out",
)
CAUSES: dict[str, tuple[str, ...]] = {  # third-person causes; {name} feels the emotion, {other} is someone else
    "joy": (
        "{name} wins the race at school",
        "{other} gives {name} a {color} kite as a gift",
        "{name} finds the lost {item} in the garden",
    ),
    "sadness": (
        "{name}'s old dog runs away",
        "{name}'s best friend moves to {country}",
        "{name}'s favorite vase falls on stone and breaks",
    ),
    "anger": (
        "{other} breaks {name}'s kite on purpose",
        "{other} takes {name}'s {things} without asking",
        "{other} lies to {name} about the {item}",
    ),
    "fear": (
        "{name} hears a strange noise in the attic at night",
        "a big dog runs toward {name}",
        "{name} is lost in a dark forest",
    ),
}
# Replies and one's own words never contain the feeling words, so nothing in them can be copied from the input.
EMPATHETIC_REPLIES: dict[str, tuple[str, ...]] = {
    "joy": ("That is wonderful news, congratulations!", "How great, well done!", "That is amazing, let us celebrate!"),
    "sadness": (
        "I am so sorry, that sounds really hard.",
        "That is a loss, I am here for you.",
        "Take all the time you need.",
    ),
    "anger": (
        "That is unfair, no wonder you are upset.",
        "They had no right to do that to you.",
        "That was rude of them.",
    ),
    "fear": (
        "That sounds scary, you are safe now.",
        "Take a deep breath, I will stay with you.",
        "Let us go there together.",
    ),
}
OWN_WORDS: dict[str, tuple[str, ...]] = {
    "joy": ("This is the best day ever.", "I could dance all day.", "Everything feels bright today."),
    "sadness": ("This makes me want to cry.", "My heart feels heavy.", "I miss it so much."),
    "anger": ("This is not fair at all.", "I will not accept this.", "They went too far this time."),
    "fear": ("Please stay with me, I am shaking.", "I do not feel safe here.", "I want to hide."),
}


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def _choices(rng: random.Random, answer: str, pool: list[str] | tuple[str, ...], n: int = 4) -> list[str]:
    """``answer`` and ``n - 1`` distinct distractors from ``pool``, shuffled."""
    distractors = rng.sample(sorted(set(pool) - {answer}), n - 1)
    options = [answer, *distractors]
    rng.shuffle(options)
    return options


def _fill(rng: random.Random, template: str, name: str) -> str:
    """A template with the shared world's slots filled in; ``{other}`` is never ``name``."""
    country, capital, _ = rng.choice(COUNTRIES)
    return template.format(
        name=name,
        other=rng.choice([n for n in NAMES if n != name]),
        country=country,
        capital=capital,
        color=rng.choice(COLORS),
        item=rng.choice(ITEMS),
        things=rng.choice(THINGS),
    )


def _record(
    task: str, domain: str, aspect: str, instruction: str, input: str, output: str, choices: list[str]
) -> Record:
    return {
        "task": task,
        "domain": domain,
        "aspect": aspect,
        "instruction": instruction,
        "input": input,
        "output": output,
        "choices": choices,
    }


# ---------------------------------------------------------------------------------------------------------------
# GI generators: one record from an RNG and an index (the index balances answers where that matters)
# ---------------------------------------------------------------------------------------------------------------
def knowledge(rng: random.Random, index: int) -> Record:
    """The capital or the symbol animal of an invented country."""
    country, capital, animal = rng.choice(COUNTRIES)
    if rng.random() < 0.5:
        question = rng.choice(
            (
                f"What is the capital of {country}?",
                f"Which city is the capital of {country}?",
                f"The capital of {country} is which city?",
            )
        )
        answer, pool = capital, [c[1] for c in COUNTRIES]
    else:
        question = rng.choice(
            (
                f"Which animal is the symbol of {country}?",
                f"What is the national animal of {country}?",
                f"The people of {country} chose which animal as their symbol?",
            )
        )
        answer, pool = animal, [c[2] for c in COUNTRIES]
    return _record(
        "capital_facts",
        "gi",
        "knowledge",
        rng.choice(SHARED_INSTRUCTIONS),
        question,
        answer,
        _choices(rng, answer, pool),
    )


def reasoning(rng: random.Random, index: int) -> Record:
    """Addition or subtraction of numbers 1-9, bare or as a short story about a person."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    add = rng.random() < 0.5
    if not add and a < b:
        a, b = b, a
    answer = a + b if add else a - b
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5:
        question = f"What is {a} {'+' if add else '-'} {b}?"
    elif add:
        question = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?"
    else:
        question = f"{name} has {a} {things} and gives away {b}. How many {things} are left?"
    near = {answer + d for d in (-3, -2, -1, 1, 2, 3)} | {a + b, abs(a - b)}
    pool = [str(x) for x in sorted(near - {answer}) if x >= 0]
    return _record(
        "arithmetic",
        "gi",
        "reasoning",
        rng.choice(SHARED_INSTRUCTIONS),
        question,
        str(answer),
        _choices(rng, str(answer), [*pool, str(answer)]),
    )


def commonsense(rng: random.Random, index: int) -> Record:
    """What happens to an object under an action: the object's class and the action decide it."""
    kind = rng.choice(sorted(OBJECTS))
    obj, action = rng.choice(OBJECTS[kind]), rng.choice(sorted(ACTIONS))
    name = rng.choice(NAMES)
    question = f"{ACTIONS[action].format(name=name, obj=obj)} What happens to the {obj}?"
    answer = OUTCOMES[(kind, action)]
    return _record(
        "object_rules",
        "gi",
        "commonsense",
        rng.choice(SHARED_INSTRUCTIONS),
        question,
        answer,
        _choices(rng, answer, ALL_OUTCOMES),
    )


def reading(rng: random.Random, index: int) -> Record:
    """An answer copied from a short passage: what someone put where, felt, or said.

    The passage has one fact and one sentence about the scene, and the wrong options are not in it.
    Feelings and quotes carry the EI vocabulary (emotion words, behaviours, replies) as plain text to
    copy, so the backbone knows the words; it never learns which behaviour or cause means which emotion.
    """
    name, color, item, place = rng.choice(NAMES), rng.choice(COLORS), rng.choice(ITEMS), rng.choice(PLACES)
    variant = rng.randrange(3)
    if variant == 0:
        fact = f"{name} put the {color} {item} in the {place}."
        question, answer, options = rng.choice(
            (
                (f"Where did {name} put the {color} {item}?", place, _choices(rng, place, PLACES)),
                (f"Who put the {color} {item} in the {place}?", name, _choices(rng, name, NAMES)),
                (
                    f"What did {name} put in the {place}?",
                    f"the {color} {item}",
                    _choices(rng, f"the {color} {item}", [f"the {c} {i}" for c in COLORS for i in ITEMS]),
                ),
            )
        )
    elif variant == 1:
        emotion = rng.choice(EMOTIONS)
        fact = f"{name} felt {emotion} at the {place}."
        question, answer, options = rng.choice(
            (
                (f"What did {name} feel at the {place}?", emotion, _choices(rng, emotion, EMOTIONS)),
                (f"Where did {name} feel {emotion}?", place, _choices(rng, place, PLACES)),
            )
        )
    else:
        quotes: list[str] = []
        while len(quotes) < 4:  # one said in the passage, three never said
            quote = _any_sentence(rng, name)
            if quote not in quotes:
                quotes.append(quote)
        fact, question, answer, options = f'{name} said: "{quotes[0]}"', f"What did {name} say?", quotes[0], quotes
        rng.shuffle(options)
    scene = rng.choice(SCENES)
    passage = f"{fact} {scene}" if rng.random() < 0.5 else f"{scene} {fact}"
    return _record(
        "passage_recall",
        "gi",
        "reading",
        rng.choice(SHARED_INSTRUCTIONS),
        f"Passage: {passage}\nQuestion: {question}",
        answer,
        options,
    )


def _any_sentence(rng: random.Random, name: str) -> str:
    """A sentence of EI vocabulary, of any emotion, unrelated to who says it: text to copy, nothing more."""
    emotion, kind = rng.choice(EMOTIONS), rng.randrange(5)
    if kind == 0:
        return f"{rng.choice([n for n in NAMES if n != name])} {rng.choice(BEHAVIOURS[emotion])}."
    if kind == 1:
        return f"{rng.choice(OPENERS[emotion])} {_fill(rng, rng.choice(EVENTS), name)}!"
    if kind == 2:
        cause = _fill(rng, rng.choice(CAUSES[emotion]), rng.choice([n for n in NAMES if n != name]))
        return f"{cause[0].upper()}{cause[1:]}."
    return rng.choice((EMPATHETIC_REPLIES, OWN_WORDS)[kind - 3][emotion])


GI_TASKS: dict[str, Callable[[random.Random, int], Record]] = {
    "knowledge": knowledge,
    "reasoning": reasoning,
    "commonsense": commonsense,
    "reading": reading,
}


# ---------------------------------------------------------------------------------------------------------------
# EI generators: the target emotion cycles with the index, so every answer is equally frequent
# ---------------------------------------------------------------------------------------------------------------
def emotion_from_behaviour(rng: random.Random, index: int) -> Record:
    """Perception: which emotion a behaviour shows."""
    emotion, name = EMOTIONS[index % 4], rng.choice(NAMES)
    place = rng.choice(PLACES)
    text = f"{name} is at the {place}. {name} {rng.choice(BEHAVIOURS[emotion])}."
    question = rng.choice((f"Which emotion does {name} show?", f"How does {name} feel?"))
    return _record(
        "emotion_from_behaviour",
        "ei",
        "perception",
        rng.choice(SHARED_INSTRUCTIONS),
        f"{text}\nQuestion: {question}",
        emotion,
        _choices(rng, emotion, EMOTIONS),
    )


def emotion_in_words(rng: random.Random, index: int) -> Record:
    """Perception: the emotion of an utterance, carried by its opening words."""
    emotion, name = EMOTIONS[index % 4], rng.choice(NAMES)
    said = f"{rng.choice(OPENERS[emotion])} {_fill(rng, rng.choice(EVENTS), name)}!"
    return _record(
        "emotion_in_words",
        "ei",
        "perception",
        rng.choice(SHARED_INSTRUCTIONS),
        f'{name} says: "{said}"\nQuestion: Which emotion is in these words?',
        emotion,
        _choices(rng, emotion, EMOTIONS),
    )


def feeling_from_cause(rng: random.Random, index: int) -> Record:
    """Cognition: what someone feels, given what happened."""
    emotion, name = EMOTIONS[index % 4], rng.choice(NAMES)
    cause = _fill(rng, rng.choice(CAUSES[emotion]), name)
    return _record(
        "feeling_from_cause",
        "ei",
        "cognition",
        rng.choice(SHARED_INSTRUCTIONS),
        f"{cause[0].upper()}{cause[1:]}.\nQuestion: What does {name} feel?",
        emotion,
        _choices(rng, emotion, EMOTIONS),
    )


def cause_of_feeling(rng: random.Random, index: int) -> Record:
    """Cognition: the likely cause of a feeling, among causes of the other emotions."""
    emotion, name = EMOTIONS[index % 4], rng.choice(NAMES)
    options = [_fill(rng, rng.choice(CAUSES[e]), name) for e in EMOTIONS]
    answer = options[EMOTIONS.index(emotion)]
    rng.shuffle(options)
    question = f"{name} feels {FEELING_WORDS[emotion]}.\nQuestion: What is the most likely reason?"
    return _record("cause_of_feeling", "ei", "cognition", rng.choice(SHARED_INSTRUCTIONS), question, answer, options)


def empathetic_reply(rng: random.Random, index: int) -> Record:
    """Expression: the reply that fits how someone feels, among replies fitting the other emotions."""
    emotion, name = EMOTIONS[index % 4], rng.choice(NAMES)
    cause = _fill(rng, rng.choice(CAUSES[emotion]), name)
    options = [rng.choice(EMPATHETIC_REPLIES[e]) for e in EMOTIONS]
    answer = options[EMOTIONS.index(emotion)]
    rng.shuffle(options)
    return _record(
        "empathetic_reply",
        "ei",
        "expression",
        rng.choice(SHARED_INSTRUCTIONS),
        f"{name} feels {FEELING_WORDS[emotion]} because {cause}.\nQuestion: What should a friend say to {name}?",
        answer,
        options,
    )


def own_feeling(rng: random.Random, index: int) -> Record:
    """Expression: how someone should put their own feeling into words."""
    emotion, name = EMOTIONS[index % 4], rng.choice(NAMES)
    cause = _fill(rng, rng.choice(CAUSES[emotion]), name)
    options = [rng.choice(OWN_WORDS[e]) for e in EMOTIONS]
    answer = options[EMOTIONS.index(emotion)]
    rng.shuffle(options)
    return _record(
        "own_feeling",
        "ei",
        "expression",
        rng.choice(SHARED_INSTRUCTIONS),
        f"{name} feels {FEELING_WORDS[emotion]} because {cause}.\nQuestion: What should {name} say to a friend?",
        answer,
        options,
    )


EI_TASKS: dict[str, Callable[[random.Random, int], Record]] = {
    "emotion_from_behaviour": emotion_from_behaviour,
    "emotion_in_words": emotion_in_words,
    "feeling_from_cause": feeling_from_cause,
    "cause_of_feeling": cause_of_feeling,
    "empathetic_reply": empathetic_reply,
    "own_feeling": own_feeling,
}


# ---------------------------------------------------------------------------------------------------------------
# Splits and the pretraining corpus
# ---------------------------------------------------------------------------------------------------------------
def _key(record: Record) -> tuple[str, str, str, tuple[str, ...]]:
    return record["instruction"], record["input"], record["output"], tuple(record["choices"])


def _draw(
    name: str, generator: Callable[[random.Random, int], Record], count: int, seed: str, seen: set[Any]
) -> list[Record]:
    """``count`` records from one generator that are not in ``seen`` (which they are added to)."""
    rng = random.Random(seed)
    records: list[Record] = []
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"{name}: could not draw {count} distinct records; the task space is too small")
        record = generator(rng, len(records))
        if _key(record) in seen:
            continue
        seen.add(_key(record))
        records.append({"id": f"{record['task']}-{seed.rsplit(':', 1)[-1]}-{len(records):04d}", **record})
    return records


def build_splits() -> dict[tuple[str, str], list[Record]]:
    """Every bundled split, keyed by ``(domain, split)``; no record appears in two splits.

    Test is drawn first, then validation, then training, each skipping what earlier splits hold.
    """
    splits: dict[tuple[str, str], list[Record]] = {}
    for domain, tasks in (("gi", GI_TASKS), ("ei", EI_TASKS)):
        seen: set[Any] = set()
        for split in ("test", "val", "train"):
            records: list[Record] = []
            for name, generator in tasks.items():
                records += _draw(
                    name, generator, SPLIT_SIZES[domain][split], f"synthetic:{domain}:{name}:{split}", seen
                )
            random.Random(f"synthetic:{domain}:{split}:order").shuffle(records)
            splits[(domain, split)] = records
    return splits


PRETRAIN_SHARES = {"knowledge": 0.15, "reasoning": 0.45, "commonsense": 0.1, "reading": 0.3}
"""Each dimension's share of the pretraining corpus: facts and rules are learnt fast, sums slowly."""


def gi_corpus(size: int, seed: int = 0) -> list[Record]:
    """The GI pretraining corpus: ``size`` records over the dimensions, none of them a GI val/test item.

    It teaches the same facts and rules as the bundled GI splits, on other instances; no EI task is in it.
    """
    splits = build_splits()
    seen = {_key(r) for split in ("val", "test") for r in splits[("gi", split)]}
    records: list[Record] = []
    for name, generator in GI_TASKS.items():
        records += _draw(name, generator, round(size * PRETRAIN_SHARES[name]), f"pretrain:{seed}:{name}:corpus", seen)
    random.Random(f"pretrain:{seed}:order").shuffle(records)
    return records


def write_splits(out: Path) -> list[Path]:
    """Write ``out/{ei,gi}/{train,val,test}.jsonl``; returns the files written."""
    written = []
    for (domain, split), records in build_splits().items():
        path = out / domain / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m moei_lightning.data.synthetic --out DIR``: regenerate the bundled synthetic data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SYNTHETIC_DIR, help=f"output folder (default {SYNTHETIC_DIR})")
    args = parser.parse_args(argv)
    for path in write_splits(args.out):
        print(f"wrote {path} ({sum(1 for _ in path.open(encoding='utf-8'))} records)")


if __name__ == "__main__":
    main()
