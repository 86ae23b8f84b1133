"""Writes the two toy tasks' documents from the default model's held-out problems (run once; the
.jsonl files are committed): python tests/lm_eval_tasks/make_data.py"""

import itertools
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "training"))

from tasks import TaskSet  # noqa: E402


def main():
    held = TaskSet().heldout(per_task=12, seed=99)
    r = random.Random(0)
    mc = []
    for ex in held["sort"] + held["reverse"]:
        letters = ex.key.split()
        wrong = {" ".join(p) for p in itertools.permutations(letters)} - {ex.answer}
        choices = [ex.answer] + r.sample(sorted(wrong), 3)
        r.shuffle(choices)
        mc.append({"question": ex.prompt, "choices": choices, "label": choices.index(ex.answer)})
    gen = [{"question": ex.prompt, "answer": ex.answer} for ex in held["add"] + held["copy"]]
    (HERE / "toy_choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (HERE / "toy_generate.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))


if __name__ == "__main__":
    main()
