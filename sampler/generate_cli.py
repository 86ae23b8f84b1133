"""`llada-generate`: denoise one prompt from the command line and print the answer.

    llada-generate --model DIR --prompt "What is 2 + 3?" --chat --show-steps
    llada-generate --model tests/golden/tiny-llada --prompt-ids 5,17,42 --gen-length 16

--show-steps prints the canvas after every step, masked positions drawn as '░'.
"""

from __future__ import annotations

import argparse
import sys

MASK_GLYPH = "\u2591"
SHORT = {"<|endoftext|>": "\u2039eos\u203a", "<|eot_id|>": "\u2039eot\u203a"}  # canvas labels for stop tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-generate", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help="checkpoint directory (default: the embedded default model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a checkpoint with a tokenizer); this or --prompt-ids "
                     "is required")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    a("--chat", action="store_true", help="wrap the prompt as a user message with the chat template "
      "(default: off, the prompt is used as it is)")
    a("--gen-length", type=int, default=64, help="generated tokens, the canvas after the prompt (default: 64)")
    a("--block-length", type=int, default=None,
      help="semi-autoregressive block length (default: min(32, gen-length))")
    a("--steps", type=int, default=None, help="denoising steps in all (default: gen-length, one token per step)")
    a("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    a("--threshold", type=float, default=None,
      help="confidence threshold in (0, 1] for parallel decoding (default: off, the steps schedule)")
    a("--cache", choices=["none", "prefix", "dual"], default="none",
      help="Fast-dLLM key/value cache (default: none)")
    a("--remasking", choices=["low_confidence", "random"], default="low_confidence",
      help="which predictions are kept each step (default: low_confidence)")
    a("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (default: 0, off)")
    a("--seed", type=int, default=0, help="seed of the sampling noise (default: 0)")
    b = p.add_argument_group("block diffusion (LLaDA2.x checkpoints; defaults: the checkpoint's released generate)")
    b.add_argument("--minimal-topk", type=int, default=None,
                   help="LLaDA2.0: steps are capped at gen-length // minimal-topk (default: the released value, 1)")
    b.add_argument("--eos-early-stop", action="store_true", default=None,
                   help="return as soon as an EOS is unmasked with no mask before it (default: the released value, off)")
    b.add_argument("--editing-threshold", type=float, default=None,
                   help="LLaDA2.1: a decoded token is replaced when the new prediction's confidence exceeds this "
                   "(default: the checkpoint's released value)")
    b.add_argument("--max-post-steps", type=int, default=None,
                   help="LLaDA2.1: editing forwards at most once a block has no mask (default: the released value)")
    b.add_argument("--num-to-transfer", type=int, default=None,
                   help="LLaDA2.1: tokens unmasked per step when too few pass the threshold (default: the released value)")
    a("--show-steps", action="store_true", help="print the canvas after every step (default: off)")
    a("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where to run (default: cpu)")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="weights dtype (default: auto, bf16 on a GPU and fp32 on a CPU)")
    return p


def _fail(msg: str, code: int = 1):
    print(f"llada-generate: error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from sampler.generate import cut_answer, generate
    from sampler.params import LLADA2_FIELDS, RELEASED_DEFAULTS, ParamError, SamplingParams
    from weights import default_model_path
    from weights.checkpoint import CheckpointError, load_checkpoint, pick_cpu_threads
    from weights.tokenizer import TemplateError

    model_dir = args.model or default_model_path()
    if args.model is None and not (default_model_path() / "config.json").is_file():
        _fail("no --model given and the embedded default model is not available", 2)
    try:
        bundle = load_checkpoint(model_dir, device=args.device, dtype=args.dtype)
        pick_cpu_threads(bundle.config, bundle.device)
    except (CheckpointError, OSError, ValueError) as e:
        _fail(f"cannot load {model_dir}: {e}")
    tok = bundle.tokenizer
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            _fail(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}", 2)
        if args.chat:
            _fail("--chat needs a text --prompt", 2)
    else:
        if tok is None:
            _fail(f"{model_dir} has no tokenizer; give the prompt as --prompt-ids", 2)
        try:
            ids = (tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat
                   else tok.encode(args.prompt))
        except TemplateError as e:
            _fail(str(e), 2)
    if not ids:
        _fail("the prompt is empty", 2)
    vocab = bundle.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        _fail(f"prompt token ids must be in [0, {vocab})", 2)
    blocks = bool(bundle.config.block_diffusion)
    block = args.block_length if args.block_length is not None or blocks else min(32, args.gen_length)
    released = RELEASED_DEFAULTS[bundle.decoding]
    extra = {n: getattr(args, n) if getattr(args, n) is not None else released.get(n) for n in LLADA2_FIELDS}
    params = SamplingParams(gen_length=args.gen_length, block_length=block, steps=args.steps,
                            temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale,
                            threshold=args.threshold, cache=args.cache, seed=args.seed,
                            **{n: v for n, v in extra.items() if v is not None})
    if blocks:
        params = params.for_block_diffusion()
    try:
        params.validate(len(ids), bundle.config.max_sequence_length, blocks)
    except ParamError as e:
        _fail(f"--{e.field.replace('_', '-')}: {e}", 2)

    def piece(t):
        if t is None:
            return MASK_GLYPH
        if tok is None:
            return f"{t} "
        text = tok.decode([t], skip_special_tokens=False)
        return SHORT.get(text, text).replace("\n", "\u23ce")

    canvas = [None] * params.gen_length

    def show(ev):
        for p, t in zip(ev.positions + ev.edited_positions, ev.token_ids + ev.edited_token_ids):
            canvas[p] = t
        print(f"step {ev.step:4d}  block {ev.block:3d}  masks {ev.masks_remaining:4d} | "
              + "".join(piece(t) for t in canvas), flush=True)

    out = generate(bundle, [ids], params, on_event=show if args.show_steps else None)[0]
    answer = cut_answer(out.gen_ids, bundle.special.stop)
    if args.show_steps:
        print(f"-- {out.nfe} forwards for {len(answer)} answer tokens ({params.gen_length} generated)")
    if tok is None:
        print(" ".join(str(t) for t in answer))
    else:
        print(tok.decode(answer))


if __name__ == "__main__":
    main()
