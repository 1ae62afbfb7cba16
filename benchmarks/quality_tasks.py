"""The eight multiple-choice tasks of ``benchmarks/quality.py``, generated offline with checked answer keys.

Each item is a prompt, its candidate answers and the index of the right one. Table tasks (capital,
antonym, plural) come from the hand-written tables of ``examples/multitask_data.py``; the others are
generated, and every answer key is computed (and checked by :func:`check_items`), never typed in.

=========  ================================================  =========================================
task       prompt                                            candidates
=========  ================================================  =========================================
capital    ``The capital of Peru is``                        the capital and 3 other capitals
antonym    ``The opposite of "wet" is``                      the antonym and 3 other antonyms
plural     ``The plural of "mouse" is``                      the plural and 3 wrong inflections
addition   ``47 + 38 =``                                     the sum, ±1, ±10
compare    ``Which is larger, 47 or 74? Answer:``            the two numbers
successor  ``In order, the one after Tuesday is``            the next item and 3 others of its list
parity     ``Is 37 odd or even? Answer:``                    odd, even
sentiment  ``Review: "The staff was rude." Sentiment:``      positive, negative
=========  ================================================  =========================================

Train and test items are disjoint (no country, word pair, noun, sum, number pair, list position, number
or review appears in both). The split depends on ``seed`` only, so every contender and every training
seed sees the same tasks.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from multitask_data import ANTONYMS, CAPITALS, PLURALS  # noqa: E402  (the tables of the quickstart data)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")  # fmt: skip
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
SEQUENCES = (DAYS, MONTHS, NUMBERS, LETTERS)

POSITIVE = ("wonderful", "excellent", "delicious", "friendly", "great", "fantastic", "lovely", "superb", "amazing",
            "pleasant", "charming", "brilliant", "perfect", "enjoyable", "fresh")  # fmt: skip
NEGATIVE = ("awful", "terrible", "disgusting", "rude", "bad", "horrible", "dreadful", "poor", "boring", "unpleasant",
            "dirty", "disappointing", "cold", "broken", "noisy")  # fmt: skip
SUBJECTS = ("The food", "The service", "The hotel room", "The movie", "The staff", "The concert", "The book",
            "The coffee", "The trip", "The game")  # fmt: skip

TASKS = ("capital", "antonym", "plural", "addition", "compare", "successor", "parity", "sentiment")

# Distractors that a dictionary would also accept (never offered as wrong answers): plural variants and
# near-antonyms of the cue word.
ALSO_PLURAL = {"roof": {"rooves"}, "leaf": {"leafs"}, "calf": {"calfs"}, "mouse": {"mouses"}, "hero": {"heros"},
               "bus": {"buss"}, "fish": {"fishs"}}  # fmt: skip
ALSO_ANTONYM = {
    "correct": {"false"}, "true": {"incorrect"}, "inside": {"external"}, "internal": {"outside"},
    "success": {"defeat"}, "victory": {"failure"}, "win": {"defeat", "failure"}, "up": {"below", "bottom"},
    "above": {"down", "bottom"}, "top": {"below", "down"}, "sweet": {"dry"}, "plus": {"negative"},
    "positive": {"minus"}, "start": {"last", "exit"}, "first": {"finish"}, "entrance": {"departure"},
    "arrival": {"exit"}, "good": {"ugly", "evil"}, "beautiful": {"bad"}, "heavy": {"thin"}, "thick": {"light"},
    "increase": {"minus"}, "hot": {"light"}, "full": {"thin"},
}  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the model scores ``" " + choice`` after ``prompt``."""

    task: str
    prompt: str
    choices: tuple[str, ...]
    gold: int

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


def _shuffled(rng: random.Random, right: str, wrong: list[str], task: str, prompt: str) -> Item:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return Item(task, prompt, tuple(choices), choices.index(right))


def _capital(rng: random.Random) -> list[Item]:
    cities = [city for _, city in CAPITALS]
    return [
        _shuffled(rng, city, rng.sample([c for c in cities if c != city], 3), "capital", f"The capital of {country} is")
        for country, city in CAPITALS
    ]


def _antonym(rng: random.Random) -> list[Item]:
    items = []
    for word, antonym, others in ANTONYMS:
        accepted = {antonym, *others, word, *ALSO_ANTONYM.get(word, ())}
        pool = sorted({a for _, a, _ in ANTONYMS} - accepted)
        items.append(_shuffled(rng, antonym, rng.sample(pool, 3), "antonym", f'The opposite of "{word}" is'))
    return items


def _wrong_plurals(noun: str, accepted: set[str]) -> list[str]:
    stem = noun[:-1] if noun.endswith(("y", "f")) else noun
    forms = [noun + "s", noun + "es", noun + "en", stem + "ies", stem + "ves", noun + "i", noun]
    return sorted({f for f in forms if f not in accepted})


def _plural(rng: random.Random) -> list[Item]:
    items = []
    for noun, plural, others in PLURALS:
        wrong = _wrong_plurals(noun, {plural, *others, *ALSO_PLURAL.get(noun, ())})
        items.append(_shuffled(rng, plural, rng.sample(wrong, 3), "plural", f'The plural of "{noun}" is'))
    return items


def _pairs(rng: random.Random, low: int, high: int, count: int) -> list[tuple[int, int]]:
    """``count`` distinct unordered pairs of distinct numbers in [low, high), each in a random order: a pair
    and its reverse never land on both sides of the split."""
    pairs = rng.sample([(a, b) for a in range(low, high) for b in range(a + 1, high)], count)
    return [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]


def _addition(rng: random.Random, count: int) -> list[Item]:
    pairs = _pairs(rng, 10, 90, count)
    items = []
    for a, b in pairs:
        total = a + b
        wrong = rng.sample([total - 10, total - 1, total + 1, total + 10], 3)
        items.append(_shuffled(rng, str(total), [str(w) for w in wrong], "addition", f"{a} + {b} ="))
    return items


def _compare(rng: random.Random, count: int) -> list[Item]:
    pairs = _pairs(rng, 10, 100, count)
    return [
        Item("compare", f"Which is larger, {a} or {b}? Answer:", (str(a), str(b)), 0 if a > b else 1) for a, b in pairs
    ]


def _successor(rng: random.Random) -> list[Item]:
    items = []
    for sequence in SEQUENCES:
        for index, item in enumerate(sequence[:-1]):
            right = sequence[index + 1]
            pool = [s for s in sequence if s not in (right, item)]
            prompt = f"In order, the one after {item} is"
            items.append(_shuffled(rng, right, rng.sample(pool, 3), "successor", prompt))
    return items


def _parity(rng: random.Random, count: int) -> list[Item]:
    return [
        Item("parity", f"Is {n} odd or even? Answer:", ("odd", "even"), int(n % 2 == 0))
        for n in rng.sample(range(10, 1000), count)
    ]


def _sentiment(rng: random.Random) -> list[Item]:
    items = []
    for subject in SUBJECTS:
        for words, label in ((POSITIVE, 0), (NEGATIVE, 1)):
            for word in words:
                items.append(
                    Item("sentiment", f'Review: "{subject} was {word}." Sentiment:', ("positive", "negative"), label)
                )
    return items


def check_items(items: list[Item]) -> None:
    """Raise if an item's answer key is not what the task's rule gives (the keys are computed; this re-derives
    them independently of the generators)."""
    capitals = dict(CAPITALS)
    antonyms = {w: {a, *o} for w, a, o in ANTONYMS}
    plurals = {n: {p, *o} for n, p, o in PLURALS}
    confusable = {**{w: antonyms[w] | ALSO_ANTONYM.get(w, set()) for w in antonyms}}
    plural_like = {n: plurals[n] | ALSO_PLURAL.get(n, set()) for n in plurals}
    for item in items:
        answer, text = item.answer, item.prompt
        if len(set(item.choices)) != len(item.choices):
            raise AssertionError(f"duplicate choices in {item}")
        if item.task == "capital":
            ok = capitals[text.removeprefix("The capital of ").removesuffix(" is")] == answer
            ok = ok and not any(c == answer for i, c in enumerate(item.choices) if i != item.gold)
        elif item.task == "antonym":
            word = text.split('"')[1]
            ok = answer in antonyms[word] and not any(
                c in confusable[word] for i, c in enumerate(item.choices) if i != item.gold
            )
        elif item.task == "plural":
            noun = text.split('"')[1]
            ok = answer in plurals[noun] and not any(
                c in plural_like[noun] for i, c in enumerate(item.choices) if i != item.gold
            )
        elif item.task == "addition":
            a, b = (int(x) for x in text.removesuffix(" =").split(" + "))
            ok = int(answer) == a + b
        elif item.task == "compare":
            a, b = (int(x) for x in text.removeprefix("Which is larger, ").split("?")[0].split(" or "))
            ok = int(answer) == max(a, b)
        elif item.task == "successor":
            current = text.removeprefix("In order, the one after ").removesuffix(" is")
            sequence = next(s for s in SEQUENCES if current in s)
            ok = sequence[sequence.index(current) + 1] == answer
        elif item.task == "parity":
            n = int(text.split()[1])
            ok = answer == ("even" if n % 2 == 0 else "odd")
        elif item.task == "sentiment":
            word = text.split(" was ")[1].split(".")[0]
            ok = answer == ("positive" if word in POSITIVE else "negative")
        else:
            raise AssertionError(f"unknown task {item.task!r}")
        if not ok:
            raise AssertionError(f"wrong answer key: {item}")


def _key(item: Item) -> tuple:
    """What must not appear on both sides of the split: the prompt, and for number pairs the pair unordered."""
    numbers = [int(t) for t in item.prompt.replace("?", " ").replace(",", " ").split() if t.isdigit()]
    if item.task in ("addition", "compare"):
        return (item.task, frozenset(numbers))
    return (item.task, item.prompt)


def build_tasks(seed: int, test_per_task: int, train_per_task: int) -> tuple[list[Item], dict[str, list[Item]]]:
    """``(train, test)``: a shuffled training list (at most ``train_per_task`` items per task) and
    ``test_per_task`` held-out items per task, disjoint from training."""
    rng = random.Random(seed)
    generated = train_per_task + test_per_task
    pools = {
        "capital": _capital(rng),
        "antonym": _antonym(rng),
        "plural": _plural(rng),
        "addition": _addition(rng, generated),
        "compare": _compare(rng, generated),
        "successor": _successor(rng),
        "parity": _parity(rng, generated),
        "sentiment": _sentiment(rng),
    }
    train: list[Item] = []
    test: dict[str, list[Item]] = {}
    for task in TASKS:
        pool = pools[task]
        rng.shuffle(pool)
        if len(pool) < test_per_task + 10:
            raise ValueError(f"task {task!r} has {len(pool)} items, too few for {test_per_task} held out")
        test[task] = pool[:test_per_task]
        train.extend(pool[test_per_task : test_per_task + train_per_task])
    check_items(train + [item for items in test.values() for item in items])
    seen = {_key(item) for item in train}
    leaked = [item.prompt for items in test.values() for item in items if _key(item) in seen]
    if leaked:
        raise AssertionError(f"held-out prompts also in training: {leaked[:3]}")
    rng.shuffle(train)
    return train, test
