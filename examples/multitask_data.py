"""A small, real, offline multi-task instruction data set for the quickstart.

Four tasks with short exact answers, built in code from hand-written tables (no
downloads, deterministic for a given seed):

* ``capital``  - "What is the capital of Peru?" -> "Lima"             (world knowledge)
* ``addition`` - "What is 47 + 38?"             -> "85"               (arithmetic)
* ``antonym``  - "What is the opposite of 'wet'?" -> "dry"            (lexical knowledge)
* ``plural``   - "What is the plural of 'mouse'?" -> "mice"           (morphology)

Each task is split into disjoint train and test parts (no country, word pair, noun
or sum appears in both). Prompts use the model's chat template with a short system
message; the training labels are ``-100`` on the prompt so the loss covers only the
answer and the end-of-turn token.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = "Reply with the answer only."
IGNORE_INDEX = -100

# fmt: off
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"), ("Hungary", "Budapest"), ("Greece", "Athens"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavik"), ("Russia", "Moscow"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Morocco", "Rabat"),
    ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("South Korea", "Seoul"),
    ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Mongolia", "Ulaanbaatar"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Argentina", "Buenos Aires"), ("Brazil", "Brasilia"),
    ("Chile", "Santiago"), ("Peru", "Lima"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"),
    ("Paraguay", "Asuncion"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Jamaica", "Kingston"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
    ("Jordan", "Amman"), ("Qatar", "Doha"), ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"),
    ("Sudan", "Khartoum"), ("Libya", "Tripoli"), ("Zimbabwe", "Harare"),
    ("Uganda", "Kampala"), ("Angola", "Luanda"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"),
    ("Albania", "Tirana"), ("Belarus", "Minsk"), ("Georgia", "Tbilisi"),
    ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"), ("Uzbekistan", "Tashkent"),
    ("Cyprus", "Nicosia"), ("Malta", "Valletta"), ("the Netherlands", "Amsterdam"),
    ("Honduras", "Tegucigalpa"), ("Nicaragua", "Managua"), ("Haiti", "Port-au-Prince"),
    ("the Dominican Republic", "Santo Domingo"), ("Madagascar", "Antananarivo"),
    ("Mali", "Bamako"), ("Zambia", "Lusaka"), ("Mozambique", "Maputo"),
    ("Namibia", "Windhoek"), ("Botswana", "Gaborone"), ("Rwanda", "Kigali"),
    ("Somalia", "Mogadishu"),
)

# (word, antonym, other accepted antonyms)
ANTONYMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("hot", "cold", ()), ("big", "small", ("little",)), ("fast", "slow", ()),
    ("happy", "sad", ("unhappy",)), ("up", "down", ()), ("tall", "short", ()),
    ("early", "late", ()), ("rich", "poor", ()), ("strong", "weak", ()), ("wet", "dry", ()),
    ("full", "empty", ()), ("thick", "thin", ()), ("heavy", "light", ()),
    ("loud", "quiet", ("soft",)), ("clean", "dirty", ()), ("cheap", "expensive", ()),
    ("alive", "dead", ()), ("true", "false", ()), ("win", "lose", ()), ("push", "pull", ()),
    ("buy", "sell", ()), ("give", "take", ("receive",)), ("above", "below", ()),
    ("inside", "outside", ()), ("before", "after", ()), ("always", "never", ()),
    ("day", "night", ()), ("north", "south", ()), ("east", "west", ()),
    ("left", "right", ()), ("top", "bottom", ()), ("first", "last", ()),
    ("maximum", "minimum", ()), ("increase", "decrease", ()), ("accept", "reject", ("refuse",)),
    ("remember", "forget", ()), ("friend", "enemy", ("foe",)), ("love", "hate", ()),
    ("success", "failure", ()), ("victory", "defeat", ()), ("question", "answer", ()),
    ("entrance", "exit", ()), ("import", "export", ()), ("positive", "negative", ()),
    ("internal", "external", ()), ("ancient", "modern", ()), ("visible", "invisible", ()),
    ("possible", "impossible", ()), ("legal", "illegal", ()), ("honest", "dishonest", ()),
    ("correct", "incorrect", ("wrong",)), ("asleep", "awake", ()), ("narrow", "wide", ("broad",)),
    ("deep", "shallow", ()), ("smooth", "rough", ()), ("sweet", "sour", ("bitter",)),
    ("safe", "dangerous", ("unsafe",)), ("floor", "ceiling", ()), ("sunrise", "sunset", ()),
    ("arrival", "departure", ()), ("lend", "borrow", ()), ("attack", "defend", ("defense",)),
    ("include", "exclude", ()), ("upstairs", "downstairs", ()), ("inhale", "exhale", ()),
    ("guilty", "innocent", ()), ("hero", "villain", ()), ("vertical", "horizontal", ()),
    ("odd", "even", ()), ("plus", "minus", ()), ("future", "past", ()),
    ("beautiful", "ugly", ()), ("easy", "difficult", ("hard",)), ("open", "closed", ("shut",)),
    ("dark", "light", ("bright",)), ("young", "old", ()), ("good", "bad", ("evil",)),
    ("start", "finish", ("end", "stop")), ("war", "peace", ()),
)

# (noun, plural, other accepted plurals)
PLURALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("cat", "cats", ()), ("dog", "dogs", ()), ("book", "books", ()), ("tree", "trees", ()),
    ("car", "cars", ()), ("house", "houses", ()), ("apple", "apples", ()),
    ("river", "rivers", ()), ("box", "boxes", ()), ("bus", "buses", ("busses",)),
    ("church", "churches", ()), ("dish", "dishes", ()), ("fox", "foxes", ()),
    ("glass", "glasses", ()), ("watch", "watches", ()), ("brush", "brushes", ()),
    ("kiss", "kisses", ()), ("class", "classes", ()), ("potato", "potatoes", ()),
    ("tomato", "tomatoes", ()), ("hero", "heroes", ()), ("city", "cities", ()),
    ("baby", "babies", ()), ("party", "parties", ()), ("story", "stories", ()),
    ("country", "countries", ()), ("lady", "ladies", ()), ("family", "families", ()),
    ("berry", "berries", ()), ("puppy", "puppies", ()), ("fly", "flies", ()),
    ("day", "days", ()), ("key", "keys", ()), ("toy", "toys", ()), ("boy", "boys", ()),
    ("monkey", "monkeys", ()), ("leaf", "leaves", ()), ("knife", "knives", ()),
    ("wife", "wives", ()), ("wolf", "wolves", ()), ("half", "halves", ()),
    ("shelf", "shelves", ()), ("loaf", "loaves", ()), ("calf", "calves", ()),
    ("life", "lives", ()), ("thief", "thieves", ()), ("child", "children", ()),
    ("man", "men", ()), ("woman", "women", ()), ("mouse", "mice", ()),
    ("goose", "geese", ()), ("tooth", "teeth", ()), ("foot", "feet", ()),
    ("person", "people", ("persons",)), ("ox", "oxen", ()), ("sheep", "sheep", ()),
    ("deer", "deer", ()), ("fish", "fish", ("fishes",)), ("moose", "moose", ()),
    ("series", "series", ()), ("species", "species", ()), ("aircraft", "aircraft", ()),
    ("cactus", "cacti", ("cactuses",)), ("fungus", "fungi", ("funguses",)),
    ("nucleus", "nuclei", ()), ("crisis", "crises", ()), ("analysis", "analyses", ()),
    ("thesis", "theses", ()), ("phenomenon", "phenomena", ()), ("criterion", "criteria", ()),
    ("bacterium", "bacteria", ()), ("roof", "roofs", ()), ("chief", "chiefs", ()),
    ("piano", "pianos", ()), ("photo", "photos", ()), ("zoo", "zoos", ()),
    ("radio", "radios", ()), ("bird", "birds", ()), ("chair", "chairs", ()),
    ("window", "windows", ()), ("horse", "horses", ()), ("bench", "benches", ()),
)
# fmt: on


@dataclass(frozen=True)
class Example:
    """One question with its training answer and every answer accepted at test time."""

    task: str
    question: str
    answer: str
    accepted: tuple[str, ...]


def _capital_examples() -> list[Example]:
    return [Example("capital", f"What is the capital of {country}?", city, (city,)) for country, city in CAPITALS]


def _antonym_examples() -> list[Example]:
    return [
        Example("antonym", f"What is the opposite of '{word}'?", antonym, (antonym, *others))
        for word, antonym, others in ANTONYMS
    ]


def _plural_examples() -> list[Example]:
    return [
        Example("plural", f"What is the plural of '{noun}'?", plural, (plural, *others))
        for noun, plural, others in PLURALS
    ]


def _addition_examples(rng: random.Random, count: int) -> list[Example]:
    """``count`` distinct sums of two two-digit numbers (order matters: a+b != b+a)."""
    pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], count)
    return [Example("addition", f"What is {a} + {b}?", str(a + b), (str(a + b),)) for a, b in pairs]


def build_dataset(
    seed: int = 0, test_per_task: int = 25, addition_train: int = 80
) -> tuple[list[Example], dict[str, list[Example]]]:
    """Build the shuffled training list and the per-task test sets.

    Args:
        seed: seed of every random choice (split, sampling, order).
        test_per_task: held-out questions per task.
        addition_train: training sums (the other tasks use all their remaining rows).

    Returns:
        ``(train, test)`` where ``test`` maps task name to its examples. The two are
        disjoint: a held-out question never appears in training.
    """
    rng = random.Random(seed)
    pools = {
        "capital": _capital_examples(),
        "addition": _addition_examples(rng, addition_train + test_per_task),
        "antonym": _antonym_examples(),
        "plural": _plural_examples(),
    }
    train: list[Example] = []
    test: dict[str, list[Example]] = {}
    for task, pool in pools.items():
        pool = list(pool)
        rng.shuffle(pool)
        if len(pool) <= test_per_task:
            raise ValueError(f"task {task!r} has only {len(pool)} examples")
        test[task] = pool[:test_per_task]
        train.extend(pool[test_per_task:])
    rng.shuffle(train)
    return train, test


def normalize(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form used for exact match."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower().strip()
    text = text.strip(" \t\n.,!?;:'\"`")
    return re.sub(r"\s+", " ", text)


def is_correct(prediction: str, example: Example) -> bool:
    """Exact match of the normalised prediction with one accepted answer."""
    return normalize(prediction) in {normalize(a) for a in example.accepted}


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant header."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": example.question},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one example; labels are -100 on the prompt.

    The answer is followed by the end-of-turn token, so the model also learns to stop.
    """
    prompt = prompt_ids(tokenizer, example)
    answer = tokenizer(example.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``input_ids``, ``attention_mask`` and ``labels``."""
    encoded = [encode(tokenizer, ex) for ex in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


if __name__ == "__main__":
    train_set, test_sets = build_dataset()
    print(f"train: {len(train_set)} examples")
    for name, rows in test_sets.items():
        n_train = sum(ex.task == name for ex in train_set)
        print(f"{name:9s} train {n_train:3d}  test {len(rows):3d}  e.g. {rows[0].question!r} -> {rows[0].answer!r}")
