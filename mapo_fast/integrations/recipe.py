"""The part of MAPO no framework has, for rollouts made by any framework: in each response, find
every tool turn (the zoom call, the crop it returned, the description the policy wrote of it),
recompute the crop from the sample's image with ``ToolRunner`` (the zoom tool's box rules,
``crop_and_zoom``, all the batch's crops in one call), score every description against its crop
with a ``SemanticVerifier`` in one call, and return the per-turn scores and the tokens of each
turn, as ``mapo_advantages`` takes them.

The responses are token ids as the policy generated them, with the observations the framework
inserted (``spans_from_ids``: no re-encoding, special tokens kept). The crop's box is read in
pixels of the image *as the model sees it*: the processor's resize (``smart_resize`` with
``min_pixels`` / ``max_pixels``), as the zoom tool reads it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..advantage import mapo_advantages
from ..rewards.verifier import SemanticVerifier
from ..tools.ops import FACTOR, MAX_PIXELS, MIN_PIXELS
from ..tools.protocol import ToolContext, ToolRunner, ToolSession
from ..trajectory import TrajectorySpans, spans_from_ids

Tensor = torch.Tensor


def image_tensor(image: Any, what: str = "image") -> Tensor:
    """A uint8 ``[3, H, W]`` tensor from a PIL image, a ``[3, H, W]`` uint8 tensor or an
    ``[H, W, 3]`` uint8 array; anything else raises ``ValueError`` naming ``what``."""
    if isinstance(image, Tensor):
        t = image
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        import numpy as np
        t = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    elif hasattr(image, "shape") and hasattr(image, "dtype"):  # an array
        t = torch.as_tensor(image)
        t = t.permute(2, 0, 1).contiguous() if t.ndim == 3 and t.shape[-1] == 3 else t
    else:
        raise ValueError(f"{what}: expected a PIL image or a uint8 [3, H, W] tensor, got "
                         f"{type(image).__name__}")
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"{what}: expected uint8 [3, H, W], got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t


def zoom_context(image: Any, resize: Dict[str, int], what: str = "image") -> ToolContext:
    """The zoom tool's context for one image: the original (``image_tensor``), and its size as
    the model sees it (``smart_resize`` with ``resize``: factor, min_pixels, max_pixels)."""
    return ToolContext.for_images([image_tensor(image, what)], **resize)


def row_image(row: Dict[str, Any], key: str, who: str) -> Any:
    """A dataset row's image: ``row[key]``, else the first of ``row["images"]``; a
    ``ValueError`` starting with ``who`` when neither is there."""
    image = row.get(key)
    if image is None and row.get("images"):
        image = row["images"][0]
    if image is None:
        raise ValueError(f"{who} has no {key!r} (or 'images') column; its columns: "
                         f"{sorted(row)}")
    return image


def pil_image(crop: Tensor) -> Any:
    """A PIL RGB image of a uint8 ``[3, h, w]`` crop."""
    from PIL import Image
    return Image.fromarray(crop.permute(1, 2, 0).cpu().numpy())


@dataclass
class ScoredTurns:
    """Every response's scored tool turns: ``scores [B, K]`` and ``mask [B, K]`` (turn ``k`` of
    response ``b`` was scored), ``token_turn [B, T]`` (``k`` on the tokens of turn ``k``, -1
    elsewhere), the ``spans`` found, and ``stats`` (turns, crops, mean score, ...)."""
    scores: Tensor
    mask: Tensor
    token_turn: Tensor
    spans: List[TrajectorySpans]
    stats: Dict[str, float] = field(default_factory=dict)

    def turn_spans(self, b: int) -> List[Tuple[int, int, float]]:
        """Response ``b``'s scored turns as ``(start, end, score)``, ``[start, end)`` its token
        positions (the turn's first and one past its last token)."""
        ranges = self.spans[b].turn_ranges(self.token_turn.shape[1])
        return [(a, z, float(self.scores[b, k])) for k, (a, z) in enumerate(ranges)
                if bool(self.mask[b, k]) and a < z]

    def part(self, group_ids: Tensor) -> "BatchPart":
        """What ``semantic_advantages`` needs of this batch (``group_ids [B]``: each row's
        group, numbered over the whole batch when it is split over processes)."""
        return BatchPart(self.scores, self.mask, self.token_turn, group_ids.cpu())

    def advantages(self, outcome: Tensor, group_ids: Tensor, *, semantic_coef: float = 1.0,
                   norm_std: bool = True, turn_discount: float = 0.0,
                   parts: Optional[Sequence["BatchPart"]] = None,
                   index: int = 0) -> Tensor:
        """``[B, T]``: ``outcome [B]`` (a framework's group-normalised outcome advantage) on
        every token, plus ``semantic_coef`` times the group-normalised credited scores on each
        turn's tokens: ``mapo_advantages``'s estimator, its outcome part given. A batch split
        over processes: ``parts`` holds every process's ``part`` in process order (this one's
        at ``index``), so that a group is normalised over all its rows wherever they are."""
        parts = [self.part(group_ids)] if parts is None else parts
        semantic = semantic_advantages(parts, index, semantic_coef=semantic_coef,
                                       norm_std=norm_std, turn_discount=turn_discount)
        return outcome.detach().float().cpu()[:, None] + semantic[:, :self.token_turn.shape[1]]


@dataclass
class BatchPart:
    """One process's share of a batch for the semantic advantage: ``scores`` and ``mask``
    ``[B, K]``, ``token_turn [B, T]``, ``group_ids [B]`` (groups numbered over the batch)."""
    scores: Tensor
    mask: Tensor
    token_turn: Tensor
    group_ids: Tensor


def semantic_advantages(parts: Sequence[BatchPart], index: int, **options: Any) -> Tensor:
    """The semantic part of the MAPO advantage (``mapo_advantages`` with a zero outcome) of
    part ``index``, its groups normalised over every part's rows: ``[B_index, T]``, ``T`` the
    widest part's. ``options``: ``semantic_coef``, ``norm_std``, ``turn_discount``."""
    K = max(p.scores.shape[1] for p in parts)
    T = max(p.token_turn.shape[1] for p in parts)

    def widen(t: Tensor, width: int, fill: Any) -> Tensor:
        out = torch.full((t.shape[0], width), fill, dtype=t.dtype)
        out[:, :t.shape[1]] = t
        return out
    scores = torch.cat([widen(p.scores, K, 0.0) for p in parts])
    mask = torch.cat([widen(p.mask, K, False) for p in parts])
    token_turn = torch.cat([widen(p.token_turn, T, -1) for p in parts])
    group_ids = torch.cat([p.group_ids for p in parts])
    semantic = mapo_advantages(torch.zeros(scores.shape[0]), group_ids, scores, mask,
                               token_turn, **options)
    start = sum(p.scores.shape[0] for p in parts[:index])
    return semantic[start:start + parts[index].scores.shape[0]]


class TurnScorer:
    """Scores the tool turns of a batch of responses (see the module doc).

    Args:
        verifier: scores (description, crop) pairs, e.g. ``CLIPVerifier``.
        tokenizer: the policy's tokenizer (decodes each token id alone).
        runner: the zoom tool's rules (default ``ToolRunner()``: ``image_zoom_in_tool``).
        min_pixels, max_pixels, factor: the processor's resize of the image the model saw.
    """

    def __init__(self, verifier: SemanticVerifier, tokenizer: Any, *,
                 runner: Optional[ToolRunner] = None, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, factor: int = FACTOR):
        if not isinstance(verifier, SemanticVerifier):
            raise ValueError(f"TurnScorer: `verifier` must be a SemanticVerifier, got "
                             f"{type(verifier).__name__}")
        self.verifier, self.tokenizer = verifier, tokenizer
        self.runner = runner if runner is not None else ToolRunner()
        self.resize = dict(factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        self.stats: Counter = Counter()

    def context(self, image: Any, what: str = "image") -> ToolContext:
        return zoom_context(image, self.resize, what)

    def score(self, responses: Sequence[Sequence[int]], images: Sequence[Any]) -> ScoredTurns:
        """``responses[b]``: response ``b``'s token ids (observations included, padding
        excluded); ``images[b]``: the image its zoom calls crop. Returns ``ScoredTurns`` with
        ``T`` the longest response."""
        if len(responses) != len(images):
            raise ValueError(f"TurnScorer.score: {len(responses)} responses but {len(images)} "
                             "images: one image per response")
        spans = [spans_from_ids(list(ids), self.tokenizer) for ids in responses]
        calls, contexts, where = [], [], []
        for b, (ids, sp) in enumerate(zip(responses, spans)):
            ctx = None
            for k, turn in enumerate(t for t in sp.turns if t.ok):
                ctx = ctx or self.context(images[b], f"images[{b}]")
                calls.append(self.tokenizer.decode(list(ids[turn.call.start:turn.call.end]),
                                                   skip_special_tokens=False))
                contexts.append(ctx)
                where.append((b, k, turn.description_text))
        results = self.runner.run(calls, contexts,
                                  [ToolSession(max_calls=1) for _ in calls]) if calls else []
        K = max([sp.n_scored_turns for sp in spans] + [1])
        scores = torch.zeros(len(responses), K)
        mask = torch.zeros(len(responses), K, dtype=torch.bool)
        kept = [(w, r.crop) for w, r in zip(where, results) if r is not None and r.ok]
        if kept:
            s = self.verifier.score([w[2] for w, _ in kept], [c for _, c in kept])
            for ((b, k, _), _), v in zip(kept, s.tolist()):
                scores[b, k], mask[b, k] = v, True
        T = max([len(r) for r in responses] + [1])
        token_turn = torch.full((len(responses), T), -1, dtype=torch.int64)
        for b, (ids, sp) in enumerate(zip(responses, spans)):
            token_turn[b, :len(ids)] = sp.token_turn(len(ids))
        stats = {"turns": float(sum(len(sp.turns) for sp in spans)), "crops": float(len(calls)),
                 "scored": float(len(kept)), "not_recomputed": float(len(calls) - len(kept)),
                 "score_mean": float(scores[mask].mean()) if kept else 0.0}
        self.stats.update({k: v for k, v in stats.items() if k != "score_mean"})
        return ScoredTurns(scores, mask, token_turn, spans, stats)
