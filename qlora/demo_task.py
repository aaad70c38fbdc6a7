"""The embedded default task: extract a person record from one sentence into compact JSON.

    "At 34, Maria Lopez settled in Lisbon back in 2019."
        ->  {"name":"Maria Lopez","age":34,"city":"Lisbon","year":2019}

qlora ships no dataset and runs offline, so it generates this task itself: many sentence templates,
names, cities, ages and dates from built-in lists. The answer is checkable exactly (`exact_match`)
and takes what finetuning teaches quickly: a fixed schema and output style, span copying and a
little normalisation (the age as a number, the year out of a full date). Held-out rows use first
names, surnames and cities that never occur in training, so a model must copy, not memorise.
Rows are chat-format (system: the instruction, user: the sentence, assistant: the JSON), so the
instruct model's chat template applies.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the person's name, age, city and year as JSON."

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Kenji", "Sofia", "Liam", "Fatima", "Mateo", "Olga", "Noah", "Priya", "Lucas",
    "Chen", "Amara", "Ivan", "Elena", "Omar", "Hannah", "Diego", "Yuki", "Grace", "Tomas", "Leila", "Samuel",
    "Ingrid", "Rahul", "Clara", "Kwame", "Zoe", "Pablo", "Mei", "Arjun", "Nadia", "Felix", "Rosa", "Hugo",
    "Ayumi", "Daniel", "Sara", "Emil", "Lucia", "Tariq", "Greta", "Jonas", "Amelia", "Bruno", "Ines", "Kofi",
    "Julia", "Marco", "Anya", "Oscar", "Nora", "Rafael", "Lena", "Victor", "Mina", "Paolo", "Alice", "Dmitri",
)
SURNAMES = (
    "Lopez", "Smith", "Khan", "Tanaka", "Rossi", "Murphy", "Haddad", "Garcia", "Petrova", "Brown", "Sharma",
    "Silva", "Wang", "Okafor", "Novak", "Costa", "Farouk", "Becker", "Herrera", "Sato", "Wilson", "Kowalski",
    "Nasser", "Adeyemi", "Larsen", "Gupta", "Moreau", "Mensah", "Taylor", "Ramos", "Liu", "Patel", "Ivanova",
    "Fischer", "Romero", "Dubois", "Mori", "Cohen", "Berg", "Jensen", "Vargas", "Aziz", "Schmidt", "Nilsson",
    "Walker", "Santos", "Boateng", "Weber", "Marino", "Young", "Horvat", "Torres", "Lindqvist", "Kim",
    "Baker", "Suzuki", "Evans", "Morales", "Popescu", "Reyes",
)
CITIES = (
    "Lisbon", "Toronto", "Nairobi", "Osaka", "Milan", "Dublin", "Beirut", "Madrid", "Kyiv", "Chicago", "Mumbai",
    "Porto", "Shanghai", "Lagos", "Prague", "Athens", "Cairo", "Hamburg", "Bogota", "Kyoto", "Sydney", "Warsaw",
    "Amman", "Accra", "Oslo", "Delhi", "Lyon", "Kumasi", "Boston", "Lima", "Seoul", "Austin", "Vienna", "Munich",
    "Havana", "Paris", "Sapporo", "Tel Aviv", "Stockholm", "Copenhagen", "Santiago", "Casablanca", "Berlin",
    "Helsinki", "Denver", "Rio de Janeiro", "Zagreb", "Manila", "Bucharest", "Montreal", "Cape Town", "Seattle",
    "Buenos Aires", "Edinburgh", "Hanoi", "Vancouver", "Geneva", "Quito", "Krakow", "Melbourne",
)
JOBS = ("teacher", "nurse", "engineer", "baker", "pilot", "lawyer", "painter", "chef", "doctor", "farmer", "writer",
        "plumber")
_REAL = set(FIRST_NAMES) | set(SURNAMES) | set(CITIES)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

# {name} {age} {city} {year}, plus distractors {month} {day} {job} the answer must ignore.
TEMPLATES = (
    "{name}, {age}, moved to {city} in {month} {year}.",
    "In {year}, {age}-year-old {name} relocated to {city}.",
    "{name} is {age} and has lived in {city} since {year}.",
    "Since {year}, {name} ({age}) has called {city} home.",
    "{city} has been home to {name}, aged {age}, since {year}.",
    "At {age}, {name} settled in {city} back in {year}.",
    "{name} (age {age}) arrived in {city} on {day} {month} {year}.",
    "Record: {name}; {age} years old; based in {city} since {year}.",
    "{name}, a {age}-year-old {job}, has worked in {city} since {year}.",
    "The {year} census lists {name}, {age}, as a resident of {city}.",
    "{name} was {age} when the family moved to {city} in {year}.",
    "Meet {name}: {age} years old, living in {city} since {month} {year}.",
    "{name} from {city} joined the club in {year} at age {age}.",
    "{city}, {year}: {name}, {age}, opened a small bakery.",
    "On {month} {day}, {year}, {name} ({age}) started as a {job} in {city}.",
    "Aged {age}, {name} left for {city} in the spring of {year}.",
)


# Invented names and cities (syllables, e.g. "Torvani Belsu") fill half the training slots: with
# only ~50 real values per slot a 135M model learns to recall them and "corrects" an unseen test
# name to a training one (Santiago -> "Manzanilla" after 50 steps); strings it cannot recall
# teach it to copy. Never equal to a real value, so held-out values stay unseen.
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "sh")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "n", "r", "l", "s", "k")
SYNTHETIC_SHARE = 0.5


def _invented(rng: random.Random) -> str:
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))) + rng.choice(CODAS)
        word = word.capitalize()
        if word not in _REAL:
            return word


def _pools(held_out: bool) -> tuple[list[str], list[str], list[str]]:
    """Every fifth first name, surname and city is held out: test values never appear in training."""
    pick = lambda words: [w for i, w in enumerate(words) if (i % 5 == 0) == held_out]  # noqa: E731
    return pick(FIRST_NAMES), pick(SURNAMES), pick(CITIES)


def _row(rng: random.Random, firsts, lasts, cities, synthetic: float = 0.0) -> dict:
    pick = lambda pool: _invented(rng) if rng.random() < synthetic else rng.choice(pool)  # noqa: E731
    record = {
        "name": f"{pick(firsts)} {pick(lasts)}",
        "age": rng.randint(19, 88),
        "city": pick(cities),
        "year": rng.randint(1995, 2024),
    }
    sentence = rng.choice(TEMPLATES).format(
        **record, month=rng.choice(MONTHS), day=rng.randint(1, 28), job=rng.choice(JOBS)
    )
    answer = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    # The instruction is the system message: it replaces the template's default system prompt
    # (~20 tokens), so each example stays ~78 tokens and a training step stays cheap.
    return {"messages": [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": sentence},
        {"role": "assistant", "content": answer},
    ]}


def make_demo_task(n_train: int = 2000, n_test: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train_rows, test_rows) in chat format; the same seed gives the same rows in any process."""
    rng = random.Random(seed)
    train = [_row(rng, *_pools(False), synthetic=SYNTHETIC_SHARE) for _ in range(n_train)]
    test = [_row(rng, *_pools(True)) for _ in range(n_test)]
    return train, test


def write_demo_task(directory: str, n_train: int = 2000, n_test: int = 100, seed: int = 0) -> tuple[str, str]:
    """Write demo_train.jsonl and demo_test.jsonl into `directory`; returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("demo_train.jsonl", "demo_test.jsonl"), make_demo_task(n_train, n_test, seed)):
        path = out / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]


def exact_match(prediction: str, reference: str) -> bool:
    """Same JSON value (key order and whitespace aside, types strict: 34 is not "34"), else same stripped text."""
    try:
        return _canonical(json.loads(prediction)) == _canonical(json.loads(reference))
    except (json.JSONDecodeError, TypeError):
        return prediction.strip() == reference.strip()


def can_still_match(prefix: str, reference: str) -> bool:
    """False only when no continuation of the decoded answer `prefix` can make `exact_match` true: the
    demo's scoring stops decoding there, and its score is the one decoding to the token limit gives."""
    text, ref = prefix.strip(), reference.strip()
    if not text or text.endswith("\ufffd") or ref.startswith(text):  # undecided, or the plain-text route is open
        return True
    try:
        value = json.loads(ref)
    except json.JSONDecodeError:
        return False  # a plain-text reference, and the answer has already left it
    opener = {dict: "{", list: "[", str: '"'}.get(type(value))
    if opener is None:
        return True  # a number or a literal: the answer may still be growing into it
    if text[0] != opener:
        return False
    try:
        found, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return True  # not complete yet
    return end == len(text) and _canonical(found) == _canonical(value)  # text after the value fails json.loads


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)
