"""Generate the embedded default data set: order-extraction tasks in Alpaca format, with planted dirt.

The task is verifiable (the answer is one canonical JSON object, so exact match is meaningful), the base model
scores near zero on it, and a few minutes of LoRA training on a CPU teach it. Deterministic from the seed.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

INSTRUCTION = 'Extract the order as JSON with keys "customer", "item", "quantity", "city".'
FIRST = ["Maria", "John", "Aisha", "Chen", "Lucas", "Priya", "Olga", "Kwame", "Sofia", "Hiroshi", "Emma", "Diego",
         "Fatima", "Noah", "Ingrid", "Ravi", "Chloé", "José", "Zoë", "Björn", "Amélie", "Renée", "Mateo", "Lena"]
LAST = ["Lopez", "Smith", "Khan", "Wei", "Martin", "Patel", "Ivanova", "Mensah", "Rossi", "Tanaka", "Brown", "García",
        "Haddad", "Müller", "Nilsson", "Iyer", "Dubois", "Novák", "Okafor", "Kowalski", "Ødegård", "Silva"]
ITEMS = ["desk lamp", "coffee mug", "yoga mat", "phone charger", "notebook", "water bottle", "backpack", "keyboard",
         "office chair", "throw pillow", "wall clock", "bike helmet", "tea kettle", "laptop stand", "umbrella"]
CITIES = ["Denver", "Lagos", "Osaka", "Lyon", "Pune", "Austin", "Kraków", "Malmö", "Bogotá", "Leeds", "Hamburg",
          "Nairobi", "Porto", "Québec", "Tromsø", "Seoul", "Perth", "Zürich"]
TEMPLATES = [
    "Hi, this is {customer} from {city}. Please send {quantity} x {item}.",
    "Order for {customer}: {quantity} units of {item}, ship to {city}.",
    "{city} office here. {customer} needs {item} (qty {quantity}).",
    "Can I get {quantity} of the {item}? Deliver to {city}. Thanks, {customer}",
    "Ship {quantity} {item} units to {customer} in {city}.",
    "Hello! {customer} here, based in {city}. I'd like {item}, quantity {quantity}.",
]


def make_order(rng: random.Random) -> dict:
    """Return one clean Alpaca row whose output is the canonical JSON of the order in its input."""
    order = {"customer": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "item": rng.choice(ITEMS),
             "quantity": rng.randint(1, 40), "city": rng.choice(CITIES)}
    return {"instruction": INSTRUCTION, "input": rng.choice(TEMPLATES).format(**order),
            "output": json.dumps(order, ensure_ascii=False)}


def plant_dirt(rows: list[dict], rng: random.Random) -> list[dict]:
    """Return `rows` plus dirty copies: duplicates, whitespace/unicode variants, empty, over-long, missing fields."""
    dirty = []
    for row in rng.sample(rows, k=len(rows) // 20):
        dirty.append(dict(row))  # exact duplicate
    for row in rng.sample(rows, k=len(rows) // 25):
        dirty.append({**row, "input": "  " + row["input"].replace(" ", "  ", 2) + "\n"})  # whitespace variant
    accented = [r for r in rows if unicodedata.normalize("NFD", r["input"]) != r["input"]]
    for row in rng.sample(accented, k=min(len(accented), len(rows) // 25)):
        dirty.append({k: unicodedata.normalize("NFD", v) for k, v in row.items()})  # decomposed unicode variant
    for row in rng.sample(rows, k=len(rows) // 50):
        dirty.append({**row, "input": row["input"] + " (rush)", "output": rng.choice(["", "   "])})  # empty response
    for row in rng.sample(rows, k=len(rows) // 100):
        dirty.append({**row, "input": row["input"] + " PS: " + "lorem ipsum " * 700})  # over-long
    for row in rng.sample(rows, k=len(rows) // 100):
        dirty.append({k: v for k, v in row.items() if k != "output"})  # missing field
    mixed = rows + dirty
    rng.shuffle(mixed)
    return mixed


def generate_orders(n: int, seed: int) -> list[dict]:
    """Return `n` distinct clean order rows plus planted dirt, deterministic for a given (n, seed)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = make_order(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return plant_dirt(rows, rng)


def write_orders(path: Path, n: int, seed: int) -> Path:
    """Write the generated rows to `path` as JSON Lines and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in generate_orders(n, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
