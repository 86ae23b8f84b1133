"""Train the default model's byte-level BPE tokenizer and write the Hugging Face tokenizer files.

The corpus is the chat rendering of examples drawn from `training/tasks.py` (training split only),
so the tokenizer is reproducible from the repository and a seed. Digits are always split one per
token (arithmetic works digit by digit); the byte-level alphabet is complete, so any UTF-8 text
encodes (rarely seen text just costs more tokens).

Writes into --out: tokenizer.json, tokenizer_config.json (with the chat template),
special_tokens_map.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import TaskSet  # noqa: E402

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# ids 0..5, in this order
SPECIAL_TOKENS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]

# LLaMA-3 shaped: BOS once, each message as header + blank line + trimmed content + end of turn,
# then an open assistant header when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """The same rendering as CHAT_TEMPLATE, in Python (for the corpus and for training data)."""
    out = BOS
    for m in messages:
        out += f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}"
    if add_generation_prompt:
        out += f"{START_HEADER}assistant{END_HEADER}\n\n"
    return out


def corpus(seed: int, n: int):
    stream = TaskSet().stream(seed, "train")
    for _ in range(n):
        ex = next(stream)
        yield render_chat([{"role": "user", "content": ex.prompt},
                           {"role": "assistant", "content": ex.answer}], False)


def train(seed: int, n_examples: int, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, n_examples), trainer=trainer, length=n_examples)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def write_files(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for s in SPECIAL_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--model-max-length", type=int, default=256)
    args = ap.parse_args(argv)
    tok = train(args.seed, args.examples, args.vocab_size)
    write_files(tok, args.out, args.model_max_length)
    print(f"vocabulary {tok.get_vocab_size()} tokens -> {args.out}")


if __name__ == "__main__":
    main()
