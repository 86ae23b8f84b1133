"""Per-request diffusion sampling parameters and their validation."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
MAX_DRAFT_DEPTH = 8  # exact parallel decoding: steps guessed ahead per forward, at most
# LLaDA2.0's and LLaDA2.1's `generate` defaults (the released remote code).
LLADA2_DEFAULTS = dict(block_length=32, steps=32, threshold=0.95, minimal_topk=1, eos_early_stop=False)
LLADA21_DEFAULTS = dict(LLADA2_DEFAULTS, editing_threshold=0.9, max_post_steps=16, num_to_transfer=1)
RELEASED_DEFAULTS = {"llada": {}, "llada2.0": LLADA2_DEFAULTS, "llada2.1": LLADA21_DEFAULTS}
LLADA2_FIELDS = ("minimal_topk", "eos_early_stop", "editing_threshold", "max_post_steps", "num_to_transfer")
# The engine keeps temperature and threshold in float32 and applies cfg_scale in the logits' dtype
# (bfloat16, float16 or float32). Ranges are checked in that precision, so that no accepted value
# turns into 0 or infinity inside a step:
MIN_THRESHOLD = 2.0**-126   # float32's smallest normal number (GPUs may flush smaller ones to 0)
MAX_TEMPERATURE = 100.0     # Gumbel noise scaled by it stays finite in float32; at 100 the draw is
                            # already near uniform over the vocabulary
MAX_CFG_SCALE = 100.0       # (scale + 1) * (cond - uncond) stays finite even in float16 logits
MAX_EOS_BIAS = 100.0        # |eos_bias|: far beyond any logit gap, finite in float16


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
    ban_eos sets the EOS logit to -inf; defer_eos ranks EOS/EoT candidates below every other one;
    eos_bias is added to the EOS logit (after guidance, before filters and the draw): negative
    values make EOS less likely without banning it, positive more likely.
    min_tokens bans every stop id (EOS/EoT) at the span's first min_tokens positions.
    top_k / top_p / min_p restrict the candidate distribution of sampled rows (temperature > 0;
    neutral values 0 / 1 / 0; see kernels.selection.restrict_logits). logprobs set (0..20) asks for
    each committed token's log-probability in its committing step and that many alternatives.
    draft_depth d > 0 turns on exact parallel decoding: each forward also verifies up to d guessed
    next states and advances as many steps as were guessed right; the ids are the same as with 0.

    On a block-diffusion checkpoint (LLaDA2.x) the same fields take LLaDA2 `generate`'s meanings
    (see `for_block_diffusion`): blocks laid from canvas position 0, `steps` per block, `threshold`
    compared strictly, plus minimal_topk and eos_early_stop (LLaDA2.0) and, when
    `editing_threshold` is set, LLaDA2.1's token editing with max_post_steps and num_to_transfer.
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
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    logprobs: int | None = None
    eos_bias: float = 0.0
    # The span's first min_tokens positions never take a stop id (EOS/EoT): their logits are -inf
    # there, so no stop id can end the answer before min_tokens tokens. min_tokens == gen_length
    # is vLLM's ignore_eos (a fixed-length answer); 0 (the default) changes nothing.
    min_tokens: int = 0
    # Structured output: a compiled `sampler.constraint.Constraint`, or None. The answer is then
    # committed left to right under the grammar (sampler.llada_batch, "constrained requests").
    constraint: object = None
    draft_depth: int | None = None  # exact parallel decoding (0: off; None: the batch's default)

    # LLaDA2.x block diffusion only.
    minimal_topk: int = 1
    eos_early_stop: bool = False
    editing_threshold: float | None = None  # set: LLaDA2.1 decoding (token editing)
    max_post_steps: int = 16
    num_to_transfer: int = 1

    @property
    def filtered(self) -> bool:
        """Whether the sampling filters change anything (never at temperature 0)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)

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

    @property
    def llada2_steps(self) -> int:
        """LLaDA2.0's steps per block (its `generate` default when unset)."""
        return LLADA2_DEFAULTS["steps"] if self.steps is None else self.steps

    def for_block_diffusion(self) -> "SamplingParams":
        """These parameters with LLaDA2 `generate`'s defaults filled in where unset."""
        return replace(self, block_length=LLADA2_DEFAULTS["block_length"] if self.block_length is None else self.block_length,
                       steps=self.llada2_steps,
                       threshold=LLADA2_DEFAULTS["threshold"] if self.threshold is None else self.threshold)

    def step_limit(self, prompt_len: int, block_diffusion: bool = False) -> int:
        """Steps a request can take at most; one past it is stuck. LLaDA: every step unmasks at
        least one position. Block diffusion: at most `steps` per block (LLaDA2.0), or one per
        position plus max_post_steps per block (LLaDA2.1)."""
        if not block_diffusion:
            return self.gen_length + self.blocks + 1
        p = self.for_block_diffusion()
        blocks = -(-(prompt_len + p.gen_length) // p.block) - prompt_len // p.block
        per_block = p.block + p.max_post_steps + 1 if p.editing_threshold is not None else p.llada2_steps
        return blocks * per_block + 1

    def with_seed(self, seed: int) -> "SamplingParams":
        return replace(self, seed=seed)

    def validate(self, prompt_len: int, max_sequence_length: int | None = None,
                 block_diffusion: bool = False) -> None:
        """Raise ParamError with a message a client can act on. `block_diffusion`: the request
        runs on a LLaDA2.x checkpoint (validate `for_block_diffusion()` parameters then)."""
        integer("gen_length", self.gen_length, 1)
        if self.constraint is not None:
            self._validate_constraint(block_diffusion)
        if block_diffusion:
            self._validate_block_diffusion(prompt_len, max_sequence_length)
            return
        defaults = SamplingParams()
        for name in LLADA2_FIELDS:
            if getattr(self, name) != getattr(defaults, name):
                raise ParamError(name, f"{name} applies to block-diffusion (LLaDA2.x) checkpoints only; "
                                 "this model is not one")
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
        self._validate_common(prompt_len, max_sequence_length)

    def _validate_common(self, prompt_len: int, max_sequence_length: int | None) -> None:
        if self.draft_depth is not None:
            integer("draft_depth", self.draft_depth, 0)
            if self.draft_depth > MAX_DRAFT_DEPTH:
                raise ParamError("draft_depth", f"draft_depth must be at most {MAX_DRAFT_DEPTH}, "
                                 f"got {self.draft_depth}")
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
        integer("top_k", self.top_k, 0)
        for name, lo_open in (("top_p", True), ("min_p", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v > 1 or v < 0 or (lo_open and v == 0):
                raise ParamError(name, f"{name} must be in {'(0, 1]' if lo_open else '[0, 1]'}, got {v!r}")
        if self.logprobs is not None:
            integer("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise ParamError("logprobs", f"at most {MAX_TOP_LOGPROBS} alternatives per token, "
                                 f"got {self.logprobs}")
        integer("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.gen_length:
            raise ParamError("min_tokens", f"min_tokens {self.min_tokens} exceeds the {self.gen_length} "
                             "generated positions")
        v = self.eos_bias
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -MAX_EOS_BIAS <= v <= MAX_EOS_BIAS:
            raise ParamError("eos_bias", f"eos_bias must be a number in [-{MAX_EOS_BIAS:g}, {MAX_EOS_BIAS:g}], "
                             f"got {v!r}")
        if self.seed is not None:
            if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
                raise ParamError("seed", f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if prompt_len < 0:
            raise ParamError("prompt", "negative prompt length")
        if max_sequence_length is not None and prompt_len + self.gen_length > max_sequence_length:
            raise ParamError("max_tokens", f"prompt ({prompt_len} tokens) + gen_length ({self.gen_length}) "
                             f"= {prompt_len + self.gen_length} exceeds the model's max_sequence_length "
                             f"{max_sequence_length}")

    def _validate_constraint(self, block_diffusion: bool) -> None:
        field = getattr(self.constraint, "field", "constraint")
        if not hasattr(self.constraint, "start"):
            raise ParamError(field, "the constraint is not a compiled sampler.constraint.Constraint")
        if block_diffusion:
            raise ParamError(field, "structured output is not available for block-diffusion (LLaDA2.x) "
                             "checkpoints yet")
        if self.logprobs is not None:
            raise ParamError("logprobs", "logprobs are not available with structured output yet")
        if self.remasking != "low_confidence":
            raise ParamError("remasking", "a constrained answer is committed left to right; "
                             "remasking='random' does not apply to it")
        if self.ban_eos:
            raise ParamError("ban_eos", "an answer under a grammar ends where the grammar accepts; "
                             "banning EOS cannot be combined with structured output")
        if self.min_tokens:
            raise ParamError("min_tokens", "an answer under a grammar ends where the grammar accepts; "
                             "min_tokens and ignore_eos cannot be combined with structured output")

    def _validate_block_diffusion(self, prompt_len: int, max_sequence_length: int | None) -> None:
        integer("block_length", self.block_length, 1)
        integer("steps", self.steps, 1)
        integer("minimal_topk", self.minimal_topk, 1)
        if self.minimal_topk > self.gen_length:
            raise ParamError("minimal_topk", f"minimal_topk {self.minimal_topk} exceeds gen_length "
                             f"{self.gen_length} (no step would be left)")
        integer("max_post_steps", self.max_post_steps, 0)
        integer("num_to_transfer", self.num_to_transfer, 1)
        for name in ("threshold", "editing_threshold"):
            v = getattr(self, name)
            if v is None and name == "editing_threshold":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ParamError(name, f"{name} must be a number in [0, 1], got {v!r}")
        for name in ("eos_early_stop", "ban_eos", "defer_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        self._validate_common(prompt_len, max_sequence_length)
        if self.cfg_scale:
            raise ParamError("cfg_scale", "classifier-free guidance is not part of block diffusion "
                             "(LLaDA2.x); leave cfg_scale at 0")
        if self.remasking != "low_confidence":
            raise ParamError("remasking", "block diffusion (LLaDA2.x) unmasks by confidence only; "
                             f"remasking={self.remasking!r} is not available")
        for name, neutral in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0), ("logprobs", None),
                              ("eos_bias", 0.0), ("min_tokens", 0)):
            if getattr(self, name) != neutral:
                raise ParamError(name, f"{name} is not available for block-diffusion (LLaDA2.x) "
                                 "checkpoints yet")


def integer(name, v, low):
    if not isinstance(v, int) or isinstance(v, bool):
        raise ParamError(name, f"{name} must be an integer, got {v!r}")
    if v < low:
        raise ParamError(name, f"{name} must be >= {low}, got {v}")
