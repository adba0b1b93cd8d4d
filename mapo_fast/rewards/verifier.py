"""Semantic verifiers: score each tool turn's description against the crop it describes, in
``[0, 1]``, batched over all turns of all trajectories in one call.

``SemanticVerifier.score(descriptions, crops, regions)`` is the one interface; ``OracleVerifier``
scores against a task's ground truth of each region (no model weights involved), and
``CLIPVerifier`` (``rewards/clip.py``) with a CLIP/SigLIP model.
"""

from __future__ import annotations

import abc
import re
from collections import Counter
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch

from ..trajectory import Trajectory

Tensor = torch.Tensor
MIN_SCORE = 0.0
#: A description whose score reaches this counts as faithful to its crop (``faithfulness``).
FAITHFUL_SCORE = 0.5


class SemanticVerifier(abc.ABC):
    """Scores descriptions against crops. Subclasses implement ``_score`` for the turns that
    have a description; a missing (None or empty) description gets ``MIN_SCORE`` without
    reaching the model. ``stats`` counts ``scored``, ``missing`` and ``truncated`` turns."""

    def __init__(self) -> None:
        self.stats: Counter = Counter()

    @abc.abstractmethod
    def _score(self, descriptions: List[str], crops: List[Optional[Tensor]],
               regions: List[Any]) -> Tensor:
        """``[M]`` float32 scores in ``[0, 1]`` for ``M`` non-empty descriptions."""

    def score(self, descriptions: Sequence[Optional[str]], crops: Sequence[Optional[Tensor]],
              regions: Optional[Sequence[Any]] = None) -> Tensor:
        """``[M]`` float32 in ``[0, 1]``: one score per (description, crop) pair; ``crops`` are
        uint8 ``[3, h, w]`` tensors (any device), ``regions`` the task's ground truth per crop
        (used by ``OracleVerifier``)."""
        M = len(descriptions)
        if len(crops) != M or (regions is not None and len(regions) != M):
            raise ValueError(f"{type(self).__name__}.score: {M} descriptions, {len(crops)} crops"
                             f"{'' if regions is None else f', {len(regions)} regions'}: "
                             "one of each per turn")
        regions = list(regions) if regions is not None else [None] * M
        out = torch.full((M,), MIN_SCORE, dtype=torch.float32)
        keep = [i for i, d in enumerate(descriptions) if d is not None and d.strip()]
        self.stats["missing"] += M - len(keep)
        self.stats["scored"] += len(keep)
        if keep:
            s = self._score([descriptions[i].strip() for i in keep], [crops[i] for i in keep],
                            [regions[i] for i in keep])
            out[torch.tensor(keep)] = s.detach().float().cpu().clamp(0.0, 1.0)
        return out

    def score_trajectories(self, trajectories: Sequence[Trajectory]) -> Tuple[Tensor, Tensor]:
        """``(semantic_scores [B, K], turn_mask [B, K])`` for ``mapo_advantages``: every
        successful tool turn of every trajectory, scored in one call (rows in turn order)."""
        descriptions, crops, regions, where = [], [], [], []
        for b, traj in enumerate(trajectories):
            k = 0
            for turn in traj.spans.turns:
                if not turn.ok:
                    continue
                descriptions.append(turn.description_text)
                crops.append(traj.crops[turn.crop_index])
                regions.append(turn.region)
                where.append((b, k))
                k += 1
        K = max([k + 1 for _, k in where] + [1])
        scores = torch.zeros(len(trajectories), K, dtype=torch.float32)
        mask = torch.zeros(len(trajectories), K, dtype=torch.bool)
        if where:
            s = self.score(descriptions, crops, regions)
            idx = torch.tensor(where)
            scores[idx[:, 0], idx[:, 1]] = s
            mask[idx[:, 0], idx[:, 1]] = True
        return scores, mask


def _term_pattern(term: str) -> re.Pattern:
    words = [re.escape(w) for w in term.lower().split()]
    return re.compile(r"\b" + r"\s+".join(words) + r"s?\b")


class OracleVerifier(SemanticVerifier):
    """Scores a description against the known content of its region: the Jaccard overlap of the
    ``vocabulary`` terms the description mentions with the terms the region truly contains.

    ``regions[i]`` is an iterable of terms (e.g. ``{"red", "circle", "7"}``); terms match whole
    words, case-insensitively, with an optional plural ``s``; multi-word terms are allowed.
    Empty truth and no term mentioned scores 1.0 (the description truthfully reports nothing).
    """

    def __init__(self, vocabulary: Iterable[str]):
        super().__init__()
        vocab = sorted({str(v).lower().strip() for v in vocabulary if str(v).strip()},
                       key=lambda t: (-len(t), t))  # longest first: "dark red" before "red"
        if not vocab:
            raise ValueError("OracleVerifier: `vocabulary` must hold at least one term")
        self.vocabulary = vocab
        self._patterns = [(t, _term_pattern(t)) for t in vocab]

    def mentioned(self, description: str) -> set:
        text, found = description.lower(), set()
        for term, pat in self._patterns:
            if pat.search(text):
                found.add(term)
                text = pat.sub(" ", text)  # a longer term consumes its words
        return found

    def _score(self, descriptions, crops, regions) -> Tensor:
        out = []
        for i, (d, truth) in enumerate(zip(descriptions, regions)):
            if truth is None:
                raise ValueError(f"OracleVerifier: `regions[{i}]` is None; the oracle needs the "
                                 "ground-truth terms of every described region")
            t = {str(x).lower().strip() for x in truth}
            m = self.mentioned(d)
            union = t | m
            out.append(1.0 if not union else len(t & m) / len(union))
        return torch.tensor(out, dtype=torch.float32)
