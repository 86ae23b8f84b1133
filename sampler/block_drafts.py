"""Exact parallel decoding for block diffusion (LLaDA2.x): the sampler's rule, written once for the
step and for the guesses, and the guesses themselves.

A step of `sampler.block_diffusion` takes, per unit (a request's committed state or one of its
drafts), the sampler's rule on that unit's block: among the [MASK] positions, those with
confidence > threshold if there are at least k of them, else the k most confident; with LLaDA2.1's
editing also every decoded, non-prompt position whose candidate differs from its token with
confidence > editing_threshold. `guess` applies the same rule step after step to the logits of the
request's last step (the candidates drawn again with each guessed step's noise), which gives the
drafts D_1, D_2, ... of the next forward. Guesses stop before a state the reference would not run a
forward on: the block's end (LLaDA2.0: no [MASK] left or the steps spent; LLaDA2.1: a forward with
no [MASK] and no edit, or max_post_steps spent) or, with LLaDA2.0's eos_early_stop, an EOS just
unmasked. A guess is only a guess: what commits is decided by the verification in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.selection import transfer_mask
from sampler import candidates as cd

NO_EDITING = 2.0  # an editing threshold no confidence exceeds (LLaDA2.0)


def editing_threshold(params) -> float:
    return NO_EDITING if params.editing_threshold is None else params.editing_threshold


@dataclass
class Rule:
    """The sampler's rule per unit (`k`, [units]) and per logit row (the rest, [rows])."""

    k: torch.Tensor          # int64: the step's minimum count of positions to unmask
    threshold: torch.Tensor  # float32: unmask everything above it when that is at least k
    editing: torch.Tensor    # float32: LLaDA2.1's editing threshold (NO_EDITING: none)
    prompt: torch.Tensor     # bool: prompt positions (never edited)


def apply_rule(tok, x0, conf, row_unit, cu_rows, rule: Rule, mask_id: int):
    """(chosen, edited) per logit row: the positions the step unmasks and the ones it edits."""
    is_mask = tok == mask_id
    above = is_mask & (conf > rule.threshold)
    n_units = cu_rows.numel() - 1
    n_above = torch.zeros(n_units, dtype=torch.int64, device=tok.device).index_add_(0, row_unit, above.long())
    cand = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
    chosen = transfer_mask(cand, cu_rows, torch.maximum(rule.k, n_above),
                           torch.zeros(n_units, dtype=torch.float32, device=tok.device))
    edited = ~is_mask & ~rule.prompt & (x0 != tok) & (conf > rule.editing)
    return chosen, edited


def leaves_v20(step_in_block: int, steps: int, masks_after: int) -> bool:
    """LLaDA2.0: whether the block is left after a step (no [MASK] left, or its steps spent)."""
    return masks_after == 0 or step_in_block >= steps


def leaves_v21(post_steps: int, max_post_steps: int, masks_before: int, masks_after: int,
               n_edits: int) -> tuple[bool, int]:
    """LLaDA2.1: (whether the block is left after a step, the post-step count after it). A forward
    that found no [MASK] and edited nothing ends the block; once it has no [MASK], at most
    `max_post_steps` more forwards."""
    if masks_after != 0:
        return False, post_steps
    if masks_before == 0 and n_edits == 0:
        return True, post_steps
    return post_steps + 1 > max_post_steps, post_steps + 1


@dataclass
class HostRows:
    """A step's per-row results on the host."""

    chosen: list
    edited: list
    x0: list
    conf: list
    tok: list   # the row's token in its unit's state before the step

    def after(self, lo: int, hi: int) -> list[int]:
        """The unit's block after its step."""
        return [self.x0[i] if self.chosen[i] or self.edited[i] else self.tok[i] for i in range(lo, hi)]


def copy_prefix_kv(kv, copies, device) -> None:
    """Copy K/V rows [src, src + n) to [dst, dst + n) in every layer, for each (src, dst, n): a
    draft's region gets its request's final prefix before the forward writes the draft's block."""
    copies = [c for c in copies if c[2] > 0]
    if not copies or kv is None:
        return
    src = torch.cat([torch.arange(s, s + n) for s, _, n in copies]).to(device)
    dst = torch.cat([torch.arange(d, d + n) for _, d, n in copies]).to(device)
    for buf in list(kv.k) + list(kv.v):
        buf.index_copy_(0, dst, buf.index_select(0, src))


def guess(batch, r, logits, state, position) -> list[torch.Tensor]:
    """The request's next states in its current block, D_1 .. D_g (g <= r.depth), guessed from the
    `logits` of its last step (rows of the current block) starting at its committed block `state`:
    step k draws the candidates with the noise of the step the reference would be at (r.steps +
    k - 1) and applies the sampler's rule with that step's quota."""
    p, mask_id, eos_id = r.params, batch.mask_id, batch.eos_id
    n, dev = logits.shape[0], logits.device
    lg = logits.clone()
    lg[:, mask_id] = float("-inf")  # a candidate is never the mask id (the step's re-draw rule)

    def full(v, dtype):
        return torch.full((n,), v, dtype=dtype, device=dev)

    ban = full(True, torch.bool) if p.ban_eos else None
    unit = torch.zeros(n, dtype=torch.int64, device=dev)
    cu = torch.tensor([0, n], dtype=torch.int64, device=dev)
    rule = Rule(k=None, threshold=full(p.threshold, torch.float32),
                editing=full(editing_threshold(p), torch.float32), prompt=position < r.prompt_len)
    sib, post, cur, out = r.step_in_block, r.post_steps, state, []
    for k in range(1, r.depth + 1):
        if k == 1 or p.temperature > 0:  # greedy candidates are the same at every step
            d = cd.draw(lg, full(float(p.temperature), torch.float32), full(p.seed or 0, torch.int64),
                        full(r.steps + k - 1, torch.int64), position, ban, eos_id, mask_id)
            conf = cd.defer_stops(d.conf, d.x0, full(bool(p.defer_eos), torch.bool), batch.stop_ids_d)
        rule.k = torch.tensor([r.k_at(sib)], dtype=torch.int64, device=dev)
        chosen, edited = apply_rule(cur, d.x0, conf, unit, cu, rule, mask_id)
        masks_before, n_chosen, n_edits, eos_picked = torch.stack(
            [(cur == mask_id).sum(), chosen.sum(), edited.sum(), (chosen & (d.x0 == eos_id)).sum()]).tolist()
        sib += 1
        if r.editing:
            leave, post = leaves_v21(post, p.max_post_steps, masks_before, masks_before - n_chosen, n_edits)
        else:
            leave = (leaves_v20(sib, len(r.quota), masks_before - n_chosen)
                     or (p.eos_early_stop and eos_picked > 0))
        if leave:
            break
        cur = torch.where(chosen | edited, d.x0, cur)
        out.append(cur)
    return out
