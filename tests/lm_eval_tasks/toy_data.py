"""Loaders for the toy tasks' documents, found next to this file whatever the working directory."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def load_choice(**_):
    return _load("toy_choice.jsonl")


def load_generate(**_):
    return _load("toy_generate.jsonl")


def choices_ending_the_turn(doc):
    """Each choice as the whole answer: followed by the end-of-turn token the model writes."""
    return [c + "<|eot_id|>" for c in doc["choices"]]
