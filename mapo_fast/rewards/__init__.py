"""Rewards: outcome rewards (accuracy, format, tool use) and semantic verifiers."""

from .outcome import (AccuracyReward, CompositeReward, FormatReward, ToolUseReward,
                      choice_letter, extract_answer, normalize_text, parse_number)
from .clip import CLIPVerifier
from .verifier import FAITHFUL_SCORE, MIN_SCORE, OracleVerifier, SemanticVerifier

__all__ = ["AccuracyReward", "CompositeReward", "FormatReward", "ToolUseReward",
           "choice_letter", "extract_answer", "normalize_text", "parse_number",
           "MIN_SCORE", "FAITHFUL_SCORE", "OracleVerifier", "SemanticVerifier", "CLIPVerifier"]
