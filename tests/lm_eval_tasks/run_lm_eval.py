"""Run lm-eval's local-completions and local-chat-completions on the local generate_until task in this
folder against a server; print each model's samples as JSON. Usage: run_lm_eval.py BASE_URL MODEL."""

import json
import os
import sys
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

HERE = Path(__file__).resolve().parent


def main(base: str, model: str) -> None:
    os.chdir(HERE)  # the task's data_files path is relative to the working directory
    tasks = TaskManager(include_path=str(HERE), include_defaults=False)  # no scan of the built-in tasks
    out = {}
    for kind, path, chat in (("local-completions", "/v1/completions", False),
                             ("local-chat-completions", "/v1/chat/completions", True)):
        res = lm_eval.simple_evaluate(
            model=kind, model_args={"model": model, "base_url": base + path, "tokenizer_backend": "none",
                                    "tokenized_requests": False, "max_retries": 1},
            tasks=["llada_tiny_gen"], task_manager=tasks, log_samples=True, apply_chat_template=chat)
        samples = res["samples"]["llada_tiny_gen"]
        out[kind] = [{"question": s["doc"]["question"], "response": s["resps"][0][0]} for s in samples]
        out[kind + ":exact_match"] = res["results"]["llada_tiny_gen"]["exact_match,none"]
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
