"""Per-request diffusion sampling parameters and their validation."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
MAX_SEED = 2**63 - 1
# The engine keeps temperature and threshold in float32 and applies cfg_scale in the logits' dtype
# (bfloat16, float16 or float32). Ranges are checked in that precision, so that no accepted value
# turns into 0 or infinity inside a step:
MIN_THRESHOLD = 2.0**-126   # float32's smallest normal number (GPUs may flush smaller ones to 0)
MAX_TEMPERATURE = 100.0     # Gumbel noise scaled by it stays finite in float32; at 100 the draw is
                            # already near uniform over the vocabulary
MAX_CFG_SCALE = 100.0       # (scale + 1) * (cond - uncond) stays finite even in float16 logits


def as_float32(x: float) -> float:
    """x rounded to the nearest float32 (inf when it is beyond float32's range)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


class ParamError(ValueError):
    """Impossible sampling parameters; `field` names the offending parameter."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is denoised (LLaDA's generate() arguments plus Fast-dLLM's options).

    block_length None means one block (pure diffusion); steps None means one token per step.
    threshold set means confidence-threshold parallel decoding (the step count no longer matters).
    ban_eos sets the EOS logit to -inf; defer_eos ranks EOS/EoT candidates below every other one.
    """

    gen_length: int = 128
    block_length: int | None = None
    steps: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    threshold: float | None = None
    cache: str = "none"
    seed: int | None = None
    ban_eos: bool = False
    defer_eos: bool = False

    @property
    def blocks(self) -> int:
        return self.gen_length // self.block

    @property
    def block(self) -> int:
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def total_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps

    @property
    def steps_per_block(self) -> int:
        return self.total_steps // self.blocks

    def with_seed(self, seed: int) -> "SamplingParams":
        return replace(self, seed=seed)

    def validate(self, prompt_len: int, max_sequence_length: int | None = None) -> None:
        """Raise ParamError with a message a client can act on."""
        def integer(name, v, low):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ParamError(name, f"{name} must be an integer, got {v!r}")
            if v < low:
                raise ParamError(name, f"{name} must be >= {low}, got {v}")

        integer("gen_length", self.gen_length, 1)
        if self.block_length is not None:
            integer("block_length", self.block_length, 1)
            if self.gen_length % self.block_length:
                raise ParamError("block_length", f"gen_length {self.gen_length} is not a multiple of "
                                 f"block_length {self.block_length}")
        if self.steps is not None:
            integer("steps", self.steps, 1)
        if self.threshold is None:
            if self.total_steps % self.blocks:
                raise ParamError("steps", f"steps {self.total_steps} must be a multiple of the number "
                                 f"of blocks {self.blocks} (gen_length {self.gen_length} / block_length "
                                 f"{self.block})")
            if self.total_steps > self.gen_length:
                raise ParamError("steps", f"steps {self.total_steps} exceeds the {self.gen_length} masked "
                                 "tokens to unmask (at most one step per token)")
        else:
            t = self.threshold
            if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                    or not MIN_THRESHOLD <= as_float32(t) <= 1):
                raise ParamError("threshold", f"threshold must be a number in [{MIN_THRESHOLD:.8g}, 1] (a "
                                 f"positive float32 the GPU does not flush to 0), got {t!r}")
        for name, top in (("temperature", MAX_TEMPERATURE), ("cfg_scale", MAX_CFG_SCALE)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= top:
                raise ParamError(name, f"{name} must be a number in [0, {top:g}], got {v!r}")
        if self.remasking not in REMASKING:
            raise ParamError("remasking", f"remasking must be one of {', '.join(REMASKING)}, "
                             f"got {self.remasking!r}")
        if self.cache not in CACHE_MODES:
            raise ParamError("cache", f"cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        if self.cfg_scale > 0 and self.cache != "none":
            raise ParamError("cfg_scale", "classifier-free guidance (cfg_scale > 0) runs with cache='none' "
                             f"only, got cache={self.cache!r}")
        if self.seed is not None:
            if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
                raise ParamError("seed", f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if prompt_len < 0:
            raise ParamError("prompt", "negative prompt length")
        if max_sequence_length is not None and prompt_len + self.gen_length > max_sequence_length:
            raise ParamError("max_tokens", f"prompt ({prompt_len} tokens) + gen_length ({self.gen_length}) "
                             f"= {prompt_len + self.gen_length} exceeds the model's max_sequence_length "
                             f"{max_sequence_length}")
