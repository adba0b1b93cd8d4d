"""Outcome rewards: accuracy of the final answer, format, and an optional tool-use bonus,
composable with weights.

Every reward is a callable ``reward(text, truth, spans=None) -> float`` on the response text,
the ground truth and, when available, the trajectory's spans.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..trajectory import ANSWER_TAG, DESCRIPTION_TAG, TOOL_CALL_TAG, TrajectorySpans, find_tags

RewardFn = Callable[[str, Any, Optional[TrajectorySpans]], float]
ACCURACY_MODES = ("auto", "exact", "normalized", "numeric", "choice")


def extract_answer(text: str, tag: str = ANSWER_TAG) -> Optional[str]:
    """The content of the last ``<tag>...</tag>``, else of the last ``\\boxed{...}``, else
    None."""
    found = find_tags(text, tag)
    if found:
        return text[found[-1][2]:found[-1][3]].strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return boxed[-1].strip() if boxed else None


def normalize_text(s: str) -> str:
    """Lower case, no punctuation, no articles (a/an/the), single spaces (SQuAD-style)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_number(s: str) -> Optional[float]:
    """``"1,234"``, ``"-3.5"``, ``"1/2"``, ``"50%"``, ``"about 7 apples"`` (the first number);
    None when there is none."""
    s = s.strip().replace("\u2212", "-")
    frac = re.fullmatch(r"\s*([-+]?\d+)\s*/\s*(\d+)\s*", s)
    if frac and int(frac.group(2)) != 0:
        return float(Fraction(int(frac.group(1)), int(frac.group(2))))
    for m in _NUMBER.finditer(s):
        tok = m.group(0)
        if any(ch.isdigit() for ch in tok):
            value = float(tok.replace(",", ""))
            return value / 100 if s[m.end():m.end() + 1] == "%" else value
    return None


def choice_letter(s: str) -> Optional[str]:
    """The option letter of a multiple-choice answer: ``"B"``, ``"(b)"``, ``"B. red"``,
    ``"Answer: C"``, ``"option d"``; None when there is none."""
    s = s.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.):]?(?:\s.*)?", s, re.DOTALL)
    if m:
        return m.group(1).upper()
    m = re.search(r"\b(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*\(?([A-Za-z])\)?\b", s,
                  re.IGNORECASE)
    return m.group(1).upper() if m else None


@dataclass
class AccuracyReward:
    """1.0 when the extracted answer matches ``truth``, else 0.0 (also when there is none).

    ``mode``: ``exact`` (string equality after stripping), ``normalized`` (``normalize_text``
    on both), ``numeric`` (both parse as numbers within ``rel_tol``/``abs_tol``), ``choice``
    (same option letter), ``auto`` (``choice`` when the truth is a single letter, ``numeric``
    when it is a number, else ``normalized``).
    """
    mode: str = "auto"
    tag: str = ANSWER_TAG
    rel_tol: float = 1e-6
    abs_tol: float = 1e-9

    def __post_init__(self):
        if self.mode not in ACCURACY_MODES:
            raise ValueError(f"AccuracyReward: `mode` must be one of {list(ACCURACY_MODES)}, "
                             f"got {self.mode!r}")

    def resolve_mode(self, truth: str) -> str:
        if self.mode != "auto":
            return self.mode
        if re.fullmatch(r"\(?[A-Za-z]\)?", truth.strip()):
            return "choice"
        if parse_number(truth) is not None and re.fullmatch(r"[\d\s.,%/+\-eE\u2212]+", truth.strip()):
            return "numeric"
        return "normalized"

    def __call__(self, text: str, truth: Any, spans: Optional[TrajectorySpans] = None) -> float:
        answer = spans.answer_text if spans is not None and spans.answer_text is not None \
            else extract_answer(text, self.tag)
        if answer is None:
            return 0.0
        truth = str(truth)
        mode = self.resolve_mode(truth)
        if mode == "exact":
            return float(answer.strip() == truth.strip())
        if mode == "normalized":
            return float(normalize_text(answer) == normalize_text(truth))
        if mode == "choice":
            a, t = choice_letter(answer), choice_letter(truth)
            return float(a is not None and a == t)
        a, t = parse_number(answer), parse_number(truth)
        if a is None or t is None:
            return 0.0
        return float(abs(a - t) <= max(self.abs_tol, self.rel_tol * abs(t)))


@dataclass
class FormatReward:
    """Fraction of format checks passed (1.0 = well formed):

    - ``answer``: exactly one ``<answer>...</answer>``;
    - ``tags_closed``: every ``<tool_call>``, ``<description>`` and ``<answer>`` is closed;
    - ``described``: every tool observation is followed by a description (with spans).
    """
    answer_tag: str = ANSWER_TAG
    description_tag: str = DESCRIPTION_TAG
    tool_call_tag: str = TOOL_CALL_TAG

    def checks(self, text: str, spans: Optional[TrajectorySpans] = None) -> Dict[str, bool]:
        out = {"answer": text.count(f"<{self.answer_tag}>") == 1
               and extract_answer(text, self.answer_tag) is not None}
        out["tags_closed"] = all(
            text.count(f"<{tag}>") == text.count(f"</{tag}>")
            for tag in (self.answer_tag, self.description_tag, self.tool_call_tag))
        if spans is not None:
            out["described"] = all(t.description is not None for t in spans.turns
                                   if t.observation is not None)
        return out

    def __call__(self, text: str, truth: Any = None,
                 spans: Optional[TrajectorySpans] = None) -> float:
        c = self.checks(text, spans)
        return sum(c.values()) / len(c)


@dataclass
class ToolUseReward:
    """``bonus`` when the trajectory made at least ``min_calls`` successful tool calls (needs
    spans), else 0."""
    bonus: float = 0.1
    min_calls: int = 1

    def __call__(self, text: str, truth: Any = None,
                 spans: Optional[TrajectorySpans] = None) -> float:
        if spans is None:
            return 0.0
        return self.bonus if sum(t.ok for t in spans.turns) >= self.min_calls else 0.0


@dataclass
class CompositeReward:
    """Weighted sum of named rewards, e.g.
    ``CompositeReward([("accuracy", AccuracyReward(), 1.0), ("format", FormatReward(), 0.2),
    ("tool", ToolUseReward(0.1), 1.0)])``."""
    terms: List[Tuple[str, RewardFn, float]] = field(default_factory=lambda: [
        ("accuracy", AccuracyReward(), 1.0), ("format", FormatReward(), 0.2)])

    def breakdown(self, text: str, truth: Any,
                  spans: Optional[TrajectorySpans] = None) -> Dict[str, float]:
        return {name: float(fn(text, truth, spans)) for name, fn, _ in self.terms}

    def __call__(self, text: str, truth: Any, spans: Optional[TrajectorySpans] = None) -> float:
        parts = self.breakdown(text, truth, spans)
        return sum(w * parts[name] for name, _, w in self.terms)

    def batch(self, texts: Sequence[str], truths: Sequence[Any],
              spans: Optional[Sequence[Optional[TrajectorySpans]]] = None
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(rewards [B] float32, {name: [B]})`` for a batch of responses."""
        if len(texts) != len(truths) or (spans is not None and len(spans) != len(texts)):
            raise ValueError(f"CompositeReward.batch: {len(texts)} texts, {len(truths)} truths"
                             f"{'' if spans is None else f', {len(spans)} spans'}: must match")
        spans = spans if spans is not None else [None] * len(texts)
        rows = [self.breakdown(t, y, s) for t, y, s in zip(texts, truths, spans)]
        parts = {name: torch.tensor([r[name] for r in rows], dtype=torch.float32)
                 for name, _, _ in self.terms}
        total = sum(w * parts[name] for name, _, w in self.terms)
        return torch.as_tensor(total, dtype=torch.float32), parts
