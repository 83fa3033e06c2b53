"""A seeded synthetic instruction set whose rows carry sensitive attributes.

Each row is a short patient message with a name, an age, a city and a medical
condition written into the text, and a label that is *independent* of those attributes:
what the writer asks for (an appointment, a prescription refill, or a question). The
attribute columns (``name``, ``age``, ``age_band``, ``city``, ``condition``) are the
ground truth for attribute-inference attacks; the task never needs them.

:func:`synthetic_instruction_rows` turns the same rows into an instruction task with
free-text responses (data.name=synthetic-instruct).
"""

from __future__ import annotations

import random

NAMES = (
    "Maria", "James", "Aisha", "Chen", "Olga", "Diego", "Fatima", "Liam", "Priya", "Noah",
    "Yuki", "Emma", "Omar", "Sofia", "Lukas", "Amara", "Ivan", "Chloe", "Mateo", "Zara",
)
CITIES = ("Lyon", "Boston", "Nairobi", "Osaka", "Madrid", "Toronto", "Berlin", "Lima")
CONDITIONS = ("asthma", "diabetes", "migraine", "hypertension", "eczema", "arthritis",
              "depression", "insomnia")
AGE_BANDS = ((18, 29, "18-29"), (30, 44, "30-44"), (45, 64, "45-64"), (65, 90, "65+"))
LABELS = ("appointment", "prescription", "question")

_OPENINGS = (
    "Hi, I'm {name}, {age}, from {city}.",
    "My name is {name} and I am {age} years old, living in {city}.",
    "Hello, this is {name} ({age}) in {city}.",
)
_CONDITION = (
    "I have had {condition} for a while.",
    "I was diagnosed with {condition} last year.",
    "My {condition} has been acting up.",
)
_ASKS = {
    "appointment": ("Can I book a visit next week?", "I would like to see a doctor soon.",
                    "Is there a free slot for a check-up?"),
    "prescription": ("I need a refill of my medication.", "Could you renew my prescription?",
                     "My pills run out on Friday, please refill them."),
    "question": ("Is it safe to exercise with this?", "Should I change my diet?",
                 "What side effects should I watch for?"),
}


def age_band(age: int) -> str:
    for lo, hi, band in AGE_BANDS:
        if lo <= age <= hi:
            return band
    raise ValueError(f"age {age} outside 18..90")


def synthetic_rows(n: int, seed: int) -> list[dict[str, object]]:
    """``n`` rows, identical for the same ``seed``."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        name, city, cond = rng.choice(NAMES), rng.choice(CITIES), rng.choice(CONDITIONS)
        age = rng.randint(18, 90)
        label = rng.randrange(len(LABELS))
        text = " ".join((
            rng.choice(_OPENINGS).format(name=name, age=age, city=city),
            rng.choice(_CONDITION).format(condition=cond),
            rng.choice(_ASKS[LABELS[label]]),
        ))
        rows.append({"text": text, "label": label, "name": name, "age": age,
                     "age_band": age_band(age), "city": city, "condition": cond})
    return rows


INSTRUCTIONS = (
    "Reply to the patient's message in one short sentence.",
    "Write a one-sentence answer to this message from a patient.",
    "Answer the patient briefly.",
)
_REPLIES = {  # one reply per ask: the response follows from the ask and the condition written in the text
    "Can I book a visit next week?": "Your visit about {condition} is booked for next week.",
    "I would like to see a doctor soon.": "A doctor will see you about your {condition} this week.",
    "Is there a free slot for a check-up?": "There is a free check-up slot for your {condition} on Monday.",
    "I need a refill of my medication.": "Your {condition} medication refill is ready.",
    "Could you renew my prescription?": "Your {condition} prescription has been renewed.",
    "My pills run out on Friday, please refill them.": "Your {condition} pills will be refilled before Friday.",
    "Is it safe to exercise with this?": "Light exercise is usually safe with {condition}.",
    "Should I change my diet?": "A balanced diet helps with {condition}.",
    "What side effects should I watch for?": "Watch for dizziness and report it, given your {condition}.",
}


def synthetic_instruction_rows(n: int, seed: int) -> list[dict[str, object]]:
    """The rows of :func:`synthetic_rows` as Alpaca-style instructions with free-text responses.

    Each row keeps its ``text`` (now the ``input``), its request kind (``label``) and its
    attribute columns (the attribute-inference ground truth), and gets an ``instruction``
    (one of three phrasings, seeded) and an ``output``: a short sentence that answers the
    ask and names the condition, so a good response needs both the request and the attribute.
    """
    rng = random.Random(seed * 7919 + 17)
    rows = []
    for row in synthetic_rows(n, seed):
        text = str(row["text"])
        ask = next(a for asks in _ASKS.values() for a in asks if text.endswith(a))
        rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": text,
                     "output": _REPLIES[ask].format(condition=row["condition"]), **row})
    return rows
