"""The policy's numerics, defined once: the distribution the rollout samples from, records the
log-probs of, and the loss, the reference log-probs and the variance diagnosis recompute.

The policy of a token is ``softmax(z)`` over the vocabulary less ``banned_tokens``, with ``z`` the
model's logits after its logit map (``logit_scale``, ``softcap``) divided by ``temperature``.
``top_k`` / ``top_p`` only narrow what the sampler *draws*; the log-probs it records and the loss
computes are those of the untruncated tempered softmax. This is what verl and TRL do (the actor
recomputes old log-probs over the full softmax at the rollout temperature; vLLM's truncation is
not part of the trained distribution), and we choose it for the same reason: the truncated set
changes with the weights, so its log-prob is not a smooth function of them, and recomputing it
in the loss would need each token's kept set (``V`` bits per token). With ``top_p < 1`` or
``top_k > 0`` the draws are therefore slightly off-policy (they never leave the kept set, whose
mass is at least ``top_p``); the first on-policy ratio is still exactly 1.

Banned tokens are different: they are never drawn at all (a vision-language model's image
placeholders and vision markers, which only observations insert), so they are removed from the
policy itself, in the sampler and in the loss alike (``banned_bias``): without that the loss
would normalise over probability mass the sampler can never reach, and the first on-policy
ratio would be ``1 - P(banned)``, not 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from . import _checks as chk

Tensor = torch.Tensor

#: How far below the largest allowed logit (after the logit map) a banned column is pushed:
#: ``exp(-BANNED_GAP)`` is exactly 0 in float32 (it underflows below 1e-45 past a gap of ~104),
#: and a finite value keeps ``p * z`` (the entropy) at 0 where ``-inf`` would give NaN.
BANNED_GAP = 1.0e4


def _token_ids(fn: str, arg: str, ids: Any, vocab: Optional[int] = None) -> Tuple[int, ...]:
    """``ids`` as a sorted tuple of distinct ints (in ``[0, vocab)`` when ``vocab`` is given)."""
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        chk.fail(fn, arg, f"must be a sequence of token ids, got {type(ids).__name__}")
    out = []
    for t in ids:
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point():
            t = int(t)
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            chk.fail(fn, arg, f"must hold non-negative int token ids, got {str(t)[:60]!r}")
        out.append(t)
    out = sorted(set(out))
    if vocab is not None and out and out[-1] >= vocab:
        chk.fail(fn, arg, f"holds token id {out[-1]}, outside the vocabulary [0, {vocab})")
    if vocab is not None and len(out) >= vocab:
        chk.fail(fn, arg, f"bans all {vocab} tokens: nothing is left to sample or score")
    return tuple(out)


@dataclass(frozen=True)
class PolicyNumerics:
    """One setting for the sampler, ``mapo_loss``, the reference log-probs and the variance
    diagnosis (see the module docstring for what each field means for the ratio).

    Args:
        temperature: positive; the logits are divided by it (the rollout and the loss alike).
        top_k, top_p: the sampler's truncation (0 and 1.0: none); not part of the trained
            distribution.
        banned_tokens: token ids the policy never emits: removed from the sampler's and the
            loss's softmax.
        logit_scale, softcap: the model's logit map, when its head applies one (Gemma-style
            ``final_logit_softcapping``, ``logit_scale``); the loss applies it to ``h W^T``.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    banned_tokens: Tuple[int, ...] = ()
    logit_scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self) -> None:
        fn = "PolicyNumerics"
        chk.number(fn, "temperature", self.temperature, lo=0.0, lo_open=True)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            chk.fail(fn, "top_k", f"must be an int >= 0, got {self.top_k!r}")
        chk.number(fn, "top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        object.__setattr__(self, "banned_tokens", _token_ids(fn, "banned_tokens",
                                                             self.banned_tokens))
        chk.number(fn, "logit_scale", self.logit_scale, lo=0.0, lo_open=True)
        if self.softcap is not None:
            chk.number(fn, "softcap", self.softcap, lo=0.0, lo_open=True)

    @staticmethod
    def logit_map_of(model: Any) -> Dict[str, Any]:
        """``logit_scale`` and ``softcap`` as a Hugging Face model's config declares them
        (``logit_scale``, ``final_logit_softcapping``; of the text config for a VL model)."""
        cfg = model.config
        return logit_map_of_config(cfg.get_text_config() if hasattr(cfg, "get_text_config")
                                   else cfg)

    def loss_kwargs(self) -> Dict[str, Any]:
        """The keywords of ``mapo_loss`` / ``token_logprobs`` / ``loss_gradient_variance``
        that define this distribution."""
        return dict(temperature=self.temperature, banned_tokens=self.banned_tokens,
                    logit_scale=self.logit_scale, softcap=self.softcap)

    def sampling_kwargs(self) -> Dict[str, Any]:
        """The keywords of ``RolloutEngine.generate`` that define how it draws."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def logit_map_of_config(cfg: Any) -> Dict[str, Any]:
    """``logit_scale`` and ``softcap`` of a (text) model config: ``logit_scale`` and
    ``final_logit_softcapping``, 1.0 and None where absent."""
    scale = getattr(cfg, "logit_scale", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return dict(logit_scale=1.0 if scale is None else float(scale),
                softcap=None if cap is None else float(cap))


def apply_logit_map(u: Tensor, logit_scale: float = 1.0,
                    softcap: Optional[float] = None) -> Tensor:
    """The policy's logits from the LM head's raw ``u [..., V]``: ``softcap * tanh(logit_scale *
    u / softcap)`` with a soft cap, else ``logit_scale * u`` (``u`` itself when both are the
    identity), before any temperature: what the loss and ``token_logprobs`` apply to ``h W^T``
    (their kernels fuse it), for the rollout's sampler."""
    if softcap is not None:
        return torch.tanh(u * (logit_scale / softcap)) * softcap
    return u if logit_scale == 1.0 else u * logit_scale


def banned_bias(fn: str, bias: Optional[Tensor], weight: Tensor, banned_tokens: Any,
                inv_temp: float, softcap: Optional[float]) -> Optional[Tensor]:
    """``bias`` with ``banned_tokens`` pushed ``BANNED_GAP`` below every other logit after the
    logit map (``inv_temp``: the map's factor on ``h W^T + b``, logit scale folded in), in the
    weight's dtype; ``bias`` unchanged when nothing is banned. The banned columns then hold
    exactly 0 probability in float32 on every path (torch, fused, chunked), and their log-probs
    are finite (about ``-BANNED_GAP``), so a masked-out position that targets one stays finite.
    """
    vocab = weight.shape[0]
    ids = _token_ids(fn, "banned_tokens", banned_tokens, vocab)
    if not ids:
        return bias
    if softcap is not None:
        chk.fail(fn, "banned_tokens", "cannot be combined with `softcap`: the soft cap bounds "
                                      "every logit, so a banned column cannot be removed "
                                      "through the head's bias")
    dtype = weight.dtype if bias is None else bias.dtype
    shift = BANNED_GAP / inv_temp
    limit = torch.finfo(dtype).max / 4  # headroom for h W^T + b in the dtype
    if shift > limit or not math.isfinite(shift):
        chk.fail(fn, "banned_tokens", f"cannot be pushed {BANNED_GAP:g} below the other logits "
                                      f"in {dtype} at this temperature / logit scale "
                                      f"(needs a bias of {shift:.3g}); use float32 or bfloat16")
    idx = torch.tensor(ids, device=weight.device)
    out = torch.zeros(vocab, dtype=dtype, device=weight.device) if bias is None else bias
    return out.index_fill(0, idx, -shift) if bias is None else \
        out + torch.zeros_like(out).index_fill(0, idx, -shift)
