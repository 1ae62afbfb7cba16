"""The eight tasks of the capacity-bound quality profile (``benchmarks/quality.py --profile capacity``).

Made so that the adapter's capacity decides the score: a model that has not been fine-tuned is at chance on
every task (each task has its own made-up tag and answer labels), the tasks need different skills and answer
in different label sets, and every task has hundreds of items so that held-out accuracy resolves fractions of a
point. Every answer is one token chosen among the task's labels; every answer key is computed by the
generator and re-derived by :func:`check_items`.

=========  ==========================================  =============================================  ========
task       prompt (tag, input, ``=``)                   answer                                          labels
=========  ==========================================  =============================================  ========
summod     ``sum: 3 8 5 =``                             the digits' sum mod 10                          10 digits
maxdigit   ``max: 3 8 5 1 =``                           the largest digit                               10 digits
larger     ``pick: 47 82 =``                            ``left`` / ``right``: which number is larger    2
odd        ``odd: 347 =``                               ``yes`` / ``no``                                2
count      ``count: dog dog dog =``                     how many times the word repeats, as a word      8
second     ``second: apple river box =``                the second word                                 the 3 words
mood       ``mood: The food was awful. =``              ``red`` (positive) / ``blue`` (negative)        2
vowel      ``initial: apple =``                         ``vowel`` / ``consonant``: the first letter     2
=========  ==========================================  =============================================  ========

The splits (train, validation, test) are disjoint by prompt, and for ``mood`` and ``vowel`` by word as well
(held-out items use adjectives and words never seen in training, so they test generalisation, not recall).
They depend on ``seed`` only: every contender and every training seed sees the same items.
"""

from __future__ import annotations

import random

from quality_tasks import (  # one question: prompt, choices, gold
    ANTONYMS,
    CAPITALS,
    NEGATIVE,
    PLURALS,
    POSITIVE,
    SUBJECTS,
    Item,
)

TASKS = ("summod", "maxdigit", "larger", "odd", "count", "second", "mood", "vowel")
DIGITS = tuple("0123456789")
COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
POOL_SIZE = 600  # items generated per task (fewer for the word tasks, which have fewer distinct prompts)


def _words() -> list[str]:
    """Lower-case nouns and adjectives of the quickstart tables (no duplicates, order fixed)."""
    words = [n for n, _, _ in PLURALS] + [w for w, _, _ in ANTONYMS]
    return list(dict.fromkeys(w for w in words if w.isalpha() and w.islower()))


def _digits_task(rng: random.Random, task: str, tag: str, length: int, rule) -> list[Item]:
    prompts = {}
    while len(prompts) < POOL_SIZE:
        digits = [rng.randrange(10) for _ in range(length)]
        prompts[f"{tag}: {' '.join(map(str, digits))} ="] = rule(digits)
    return [Item(task, p, DIGITS, answer) for p, answer in prompts.items()]


def _larger(rng: random.Random) -> list[Item]:
    prompts = {}
    while len(prompts) < POOL_SIZE:
        a, b = rng.sample(range(10, 100), 2)
        prompts[f"pick: {a} {b} ="] = 0 if a > b else 1
    return [Item("larger", p, ("left", "right"), gold) for p, gold in prompts.items()]


def _odd(rng: random.Random) -> list[Item]:
    numbers = rng.sample(range(100, 1000), POOL_SIZE)
    return [Item("odd", f"odd: {n} =", ("yes", "no"), 0 if n % 2 else 1) for n in numbers]


def _count(rng: random.Random, words: list[str]) -> list[Item]:
    prompts = {}
    while len(prompts) < min(POOL_SIZE, len(words) * len(COUNT_WORDS)):
        word, times = rng.choice(words), rng.randrange(1, len(COUNT_WORDS) + 1)
        prompts[f"count: {' '.join([word] * times)} ="] = times - 1
    return [Item("count", p, COUNT_WORDS, gold) for p, gold in prompts.items()]


def _second(rng: random.Random, words: list[str]) -> list[Item]:
    prompts = {}
    while len(prompts) < POOL_SIZE:
        triple = tuple(rng.sample(words, 3))
        prompts[f"second: {' '.join(triple)} ="] = triple
    return [Item("second", p, triple, 1) for p, triple in prompts.items()]


def _mood(subjects: tuple[str, ...], adjectives: list[str]) -> list[Item]:
    return [
        Item("mood", f"mood: {s} was {a}. =", ("red", "blue"), 0 if a in POSITIVE else 1)
        for s in subjects
        for a in adjectives
    ]


def _vowel(words: list[str]) -> list[Item]:
    return [Item("vowel", f"initial: {w} =", ("vowel", "consonant"), 0 if w[0] in "aeiou" else 1) for w in words]


def check_items(items: list[Item]) -> None:
    """Raise if an item's answer key is not what its task's rule gives (re-derived from the prompt text)."""
    for item in items:
        body = item.prompt.split(": ", 1)[1].removesuffix(" =")
        if item.task in ("summod", "maxdigit"):
            digits = [int(d) for d in body.split()]
            expected = str(sum(digits) % 10 if item.task == "summod" else max(digits))
        elif item.task == "larger":
            a, b = (int(t) for t in body.split())
            expected = "left" if a > b else "right"
        elif item.task == "odd":
            expected = "yes" if int(body) % 2 == 1 else "no"
        elif item.task == "count":
            expected = COUNT_WORDS[len(body.split()) - 1]
        elif item.task == "second":
            expected = body.split()[1]
        elif item.task == "mood":
            word = body.split(" was ")[1].removesuffix(".")
            expected = "red" if word in POSITIVE else "blue"
            assert word in POSITIVE or word in NEGATIVE, item
        elif item.task == "vowel":
            expected = "vowel" if body[0] in "aeiou" else "consonant"
        else:
            raise AssertionError(f"unknown task {item.task!r}")
        if item.answer != expected or len(set(item.choices)) != len(item.choices):
            raise AssertionError(f"wrong answer key: {item} (expected {expected!r})")


def build_splits(seed: int, per_task: dict[str, int], one_token=lambda word: True) -> dict[str, dict[str, list[Item]]]:
    """``{"train": ..., "validation": ..., "test": ...}``, each ``{task: items}``, with ``per_task`` giving
    how many items of each task each split holds (``{"train": 300, "validation": 40, "test": 100}``).

    The word tasks split their *words* first (``mood``: adjectives; ``vowel``: words; ``count`` and ``second``
    share the word list but a held-out prompt is still never in training), so held-out items test
    generalisation. ``second`` answers with a word, so it uses only the words for which ``one_token(word)`` (the
    tokenizer's ``" " + word`` is one token). Raises if a task has too few items for the sizes asked.
    """
    rng = random.Random(seed)
    words = _words()
    rng.shuffle(words)
    adjectives = list(POSITIVE + NEGATIVE)
    rng.shuffle(adjectives)
    countries = [c for c, _ in CAPITALS]  # more words for the vowel task, which needs many distinct ones
    vowel_words = list(dict.fromkeys(words + [c.lower() for c in countries if c.isalpha()]))
    rng.shuffle(vowel_words)
    pools = {
        "summod": _digits_task(rng, "summod", "sum", 3, lambda d: sum(d) % 10),
        "maxdigit": _digits_task(rng, "maxdigit", "max", 4, max),
        "larger": _larger(rng),
        "odd": _odd(rng),
        "count": _count(rng, words),
        "second": _second(rng, [w for w in words if one_token(w)]),
    }
    splits: dict[str, dict[str, list[Item]]] = {"train": {}, "validation": {}, "test": {}}
    for task, pool in pools.items():
        rng.shuffle(pool)
        _deal(task, pool, per_task, splits)
    # mood and vowel: split the words, then build each split's items from its own words
    for task, vocabulary, make in (
        ("mood", adjectives, lambda ws: _mood(SUBJECTS, ws)),
        ("vowel", vowel_words, _vowel),
    ):
        n_test = max(2, round(len(vocabulary) * 0.25))
        n_val = max(2, round(len(vocabulary) * 0.15))
        parts = {
            "test": vocabulary[:n_test],
            "validation": vocabulary[n_test : n_test + n_val],
            "train": vocabulary[n_test + n_val :],
        }
        for split, ws in parts.items():
            items = make(ws)
            rng.shuffle(items)
            splits[split][task] = items[: per_task[split]]
    every = [item for split in splits.values() for items in split.values() for item in items]
    check_items(every)
    seen: dict[str, str] = {}
    for split, tasks in splits.items():
        for items in tasks.values():
            for item in items:
                if seen.setdefault(item.prompt, split) != split:
                    raise AssertionError(f"prompt {item.prompt!r} in both {seen[item.prompt]} and {split}")
    return splits


def _deal(task: str, pool: list[Item], per_task: dict[str, int], splits: dict) -> None:
    need = sum(per_task.values())
    if len(pool) < need:
        raise ValueError(f"task {task!r} has {len(pool)} items, fewer than the {need} asked for")
    start = 0
    for split in ("test", "validation", "train"):
        splits[split][task] = pool[start : start + per_task[split]]
        start += per_task[split]
