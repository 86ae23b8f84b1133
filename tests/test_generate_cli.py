"""llada-generate: the answer it prints is the sampler's; --show-steps draws every step's canvas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sampler.generate import cut_answer, generate
from sampler.generate_cli import MASK_GLYPH, main
from sampler.params import SamplingParams
from weights.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_ids_on_the_golden_model(golden_dir, capsys):
    main(["--model", str(golden_dir), "--prompt-ids", "5,17,42", "--gen-length", "16", "--block-length", "8"])
    out = capsys.readouterr().out.strip()
    bundle = load_checkpoint(golden_dir, device="cpu", dtype="float32")
    ref = generate(bundle, [[5, 17, 42]], SamplingParams(gen_length=16, block_length=8))[0]
    assert out == " ".join(str(t) for t in cut_answer(ref.gen_ids, bundle.special.stop))


def test_show_steps_draws_masks_until_none_are_left(golden_dir, capsys):
    main(["--model", str(golden_dir), "--prompt-ids", "1,2,3", "--gen-length", "8", "--block-length", "4",
          "--steps", "4", "--show-steps"])
    lines = capsys.readouterr().out.strip().splitlines()
    steps = [ln for ln in lines if ln.startswith("step")]
    assert len(steps) == 4
    assert [ln.count(MASK_GLYPH) for ln in steps] == [6, 4, 2, 0]
    assert lines[-2].startswith("-- 4 forwards")


def test_chat_prompt_with_a_tokenizer(tiny_tokenizer_model, capsys):
    main(["--model", str(tiny_tokenizer_model), "--prompt", "hello world", "--chat", "--gen-length", "8",
          "--threshold", "0.5", "--show-steps"])
    out = capsys.readouterr().out
    bundle = load_checkpoint(tiny_tokenizer_model, device="cpu", dtype="float32")
    ids = bundle.tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}])
    ref = generate(bundle, [ids], SamplingParams(gen_length=8, block_length=8, threshold=0.5))[0]
    answer = bundle.tokenizer.decode(cut_answer(ref.gen_ids, bundle.special.stop))
    assert out.endswith(answer + "\n")
    assert MASK_GLYPH in out


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "hi"], "no tokenizer"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--prompt-ids", "1,2", "--gen-length", "16", "--block-length", "5"], "--block-length"),
    (["--prompt-ids", "1,2", "--gen-length", "8", "--steps", "9"], "--steps"),
    (["--prompt-ids", "1,99999"], "token ids"),
])
def test_bad_arguments_exit_with_a_message(golden_dir, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(golden_dir)] + argv)
    assert e.value.code != 0
    assert needle in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module(golden_dir):
    r = subprocess.run([sys.executable, "-m", "sampler.generate_cli", "--model", str(golden_dir),
                        "--prompt-ids", "1,2", "--gen-length", "4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
