"""Next-token sampling: banned tokens, the user's logits processor, temperature, top-k, top-p,
and one uniform draw per sample from its own generator (so a sample draws the same tokens alone
or in any batch). The recorded log-prob of a token is the policy's (``mapo_fast.policy``): the
model's logits without the banned tokens, at the temperature, before the processor and the
truncation, which is what ``mapo_loss`` recomputes."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from .params import FN, SamplingParams

Tensor = torch.Tensor


def sample(logits: Tensor, gens: Sequence[Optional[torch.Generator]], temperature: float,
           top_k: int, top_p: float, policy: Optional[Tensor] = None
           ) -> Tuple[List[int], List[float]]:
    """Next token of each row of ``logits [n, V]`` float32, drawn from the tempered softmax
    truncated by ``top_k`` / ``top_p`` (temperature 0: greedy), and its log-prob under the
    policy: ``log_softmax(policy / temperature)`` without truncation (``policy`` defaults to
    ``logits``; at temperature 0 the log-prob is at temperature 1). See ``mapo_fast.policy``
    for why the truncation is not part of the recorded distribution."""
    policy = logits if policy is None else policy
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok.tolist(), torch.log_softmax(policy, -1).gather(1, tok[:, None])[:, 0].tolist()
    # dividing by a temperature of 1 changes nothing but costs a pass over [n, V]
    logp = torch.log_softmax(policy if temperature == 1 else policy / temperature, -1)
    scaled = logits if temperature == 1 else logits / temperature
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = torch.sort(scaled, descending=True, dim=-1)
        cum = torch.softmax(sorted_l, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_l, -1) > top_p
        scaled = scaled.scatter(1, idx, sorted_l.masked_fill(drop, float("-inf")))
    # inverse-CDF sampling, one uniform per sample from its own generator: the draw does
    # not depend on the batch
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    # drawn from the policy itself when nothing narrows it (its log-softmax is computed once)
    narrowed = top_k > 0 or top_p < 1.0 or policy is not logits
    tok = draw(torch.log_softmax(scaled, -1) if narrowed else logp, u.to(logits.device))
    return tok.tolist(), logp.gather(1, tok[:, None])[:, 0].tolist()


#: tokens per chunk of the two-level inverse CDF (``draw``)
DRAW_CHUNK = 256


def draw(logp: Tensor, u: Tensor) -> Tensor:
    """The token of each row of ``logp [n, V]`` (log-probabilities, float32 or float64,
    normalised or not as long as their exponentials are finite) at the quantile ``u [n]``
    (float64 in ``[0, 1)``) of its distribution: the first token whose cumulative probability
    exceeds ``u`` times the total, so never one of probability zero. Returns ``[n]`` int64.

    Two levels: the mass of each ``DRAW_CHUNK``-token chunk (summed in the input's precision,
    pairwise: relative error about ``log2(DRAW_CHUNK)`` ulps of the chunk's mass) and their
    running sum in float64 pick the chunk, then the float64 running sum within the chosen
    chunk only picks the token, at ``u``'s remainder rescaled to that chunk (so a token's
    probability is exact to that precision and zero stays zero). One float64 scan over
    ``[n, V]`` (a float64 copy of it, then a serial sum) cost six times the rest of the
    draw."""
    n, V = logp.shape
    probs = logp.exp()
    full = V // DRAW_CHUNK
    mass = probs[:, :full * DRAW_CHUNK].view(n, full, DRAW_CHUNK).sum(-1)  # [n, chunks]
    if V > full * DRAW_CHUNK:  # the last, shorter chunk
        mass = torch.cat([mass, probs[:, full * DRAW_CHUNK:].sum(-1, keepdim=True)], 1)
    upto = mass.double().cumsum_(-1)
    total = upto[:, -1]
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    c = torch.searchsorted(upto, x[:, None], right=True).clamp_(max=upto.shape[1] - 1)
    hi = upto.gather(1, c)[:, 0]
    lo = torch.where(c[:, 0] > 0, upto.gather(1, (c - 1).clamp_(min=0))[:, 0], 0.0)
    # the remainder as a fraction of the chunk, strictly below 1: it lands inside the chunk
    frac = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0 - 2.0 ** -52)
    idx = c * DRAW_CHUNK + torch.arange(DRAW_CHUNK, device=logp.device)  # [n, DRAW_CHUNK]
    within = probs.gather(1, idx.clamp(max=V - 1)).masked_fill_(idx >= V, 0.0)
    within = within.double().cumsum_(-1)
    j = torch.searchsorted(within, (frac * within[:, -1])[:, None], right=True)[:, 0]
    return c[:, 0] * DRAW_CHUNK + j


def apply_processor(processor: Any, seqs: Sequence[Any], logits: Tensor) -> Tensor:
    """The processor's logits for the rows of ``logits [n, V]``: one call of
    ``processor.batch(token_ids_list, logits)`` when it has one (checked: float ``[n, V]``),
    else ``processor(tokens, row)`` of each sequence's row, stacked (each checked: float rows
    of the row's shape). Then, for the whole batch at once: each row's largest logit finite (no
    NaN, no +inf, not all -inf: else nothing could be sampled). Processors get copies of the
    token lists."""
    name = getattr(processor, "__name__", type(processor).__name__)

    def check(out: Any, shape: torch.Size) -> None:
        if not isinstance(out, Tensor) or out.shape != shape or not out.is_floating_point():
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) \
                else type(out).__name__
            raise ValueError(f"{FN}: `logits_processor` ({name}) must return float logits of "
                             f"shape {tuple(shape)}, got {got}")
    batch = getattr(processor, "batch", None)
    if callable(batch):
        out = batch([list(s.tokens) for s in seqs], logits)
        check(out, logits.shape)
    else:
        rows = []
        for s, row in zip(seqs, logits):
            rows.append(processor(list(s.tokens), row))
            check(rows[-1], row.shape)
        out = torch.stack(rows)
    # one reduction: a row's maximum is NaN if it holds one, +inf if it holds one, -inf if
    # nothing is finite
    if not bool(torch.isfinite(out.amax(-1)).all()):
        raise ValueError(f"{FN}: `logits_processor` ({name}) returned logits with no finite "
                         "value, or with NaN or +inf: nothing can be sampled")
    return out


class Sampler:
    """Samples the next token of a batch of sequences.

    Args:
        params: the call's ``SamplingParams``.
        banned: token ids never sampled (a vision-language model's image placeholders and
            vision markers: only observations insert them).
    """

    def __init__(self, params: SamplingParams, banned: Sequence[int] = ()):
        self.params, self.banned = params, list(banned)

    def __call__(self, seqs: Sequence[Any], logits: Tensor) -> Tuple[List[int], List[float]]:
        """Each sequence's next token and log-prob from its row of ``logits [n, V]``; a
        sequence has ``tokens`` and ``generator``."""
        p = self.params
        if self.banned:
            logits = logits.clone()
            logits[:, self.banned] = float("-inf")
        policy = logits
        if p.logits_processor is not None:
            logits = apply_processor(p.logits_processor, seqs, logits)
            if self.banned:  # a processor cannot bring a banned token back
                logits[:, self.banned] = float("-inf")
        return sample(logits, [s.generator for s in seqs], p.temperature, p.top_k, p.top_p,
                      policy)


def next_tokens(rows: Sequence[Tuple[Any, int]], logits: Tensor
                ) -> List[Tuple[Any, int, float]]:
    """``(sample, token, log-prob)`` for each ``(sample, row)`` of ``rows`` (a step's
    ``Batch.to_sample``), drawn by the samples' call's sampler (``sample.request.sampler``:
    the engine runs one call at a time) from its row of the step's ``logits``."""
    if not rows:
        return []
    seqs = [s for s, _ in rows]
    picked = logits[torch.tensor([row for _, row in rows], device=logits.device)]
    tokens, logprobs = seqs[0].request.sampler(seqs, picked)
    return list(zip(seqs, tokens, logprobs))
