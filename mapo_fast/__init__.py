"""mapo_fast: fast pieces for RL of vision-language agents trained with MAPO.

Public API:
    token_logprobs          token log-probs (and entropies) from hidden states and the LM head,
                            without materialising [tokens x vocab] logits
    mapo_loss, MAPOLoss     the fused clipped, advantage-weighted policy loss (verl semantics);
    LossMetrics             its metrics (with ``.path``: which implementation ran; on CUDA
                            mapo_fast.loss_path picks fused or chunked by measurement)
    PolicyNumerics          the policy's distribution (temperature, banned tokens, top-k/top-p,
                            logit map), one setting for the rollout, the loss and the
                            reference log-probs (mapo_fast.policy says what the ratio means)
    PolicyLossConfig        the loss's one settings object (MAPOLoss takes it)
    POLICY_LOSSES, KL_ESTIMATORS, LOSS_AGG_MODES, ADVANTAGE_ESTIMATORS, Registry
                            the loss's and the advantage's variants, registered by name
    mapo_advantages         the MAPO advantage: group-relative outcome + semantic scores
    Trajectory, TrajectorySpans, ToolTurn, Span, spans_from_text, spans_from_ids, turn_batch,
    token_turns
                            where each tool turn, description and answer sit in the tokens
    SemanticVerifier, OracleVerifier, CLIPVerifier
                            description-vs-crop scores in [0, 1] (mapo_fast.rewards also has
                            the outcome rewards)
    gradient_variance, loss_gradient_variance
                            resampling estimates of the policy gradient's variance
    crop_and_zoom, crop_to_patches, crops_to_patches, smart_resize
                            batched crop + resize on the device, as images or Qwen2-VL patches
                            (crops_to_patches: patches of crops already cut, no resample)
    ToolRegistry, ToolRunner, ZoomInTool, parse_tool_calls, format_tool_call
                            the tool-call protocol (mapo_fast.tools has the rest)
    RolloutEngine, SamplingParams, ToolParams
                            batched generation over a paged KV cache shared by each group
                            (Qwen2 and Qwen2.5-VL; mapo_fast.rollout has the pieces:
                            scheduler, model runner, sampler, tool turns;
                            mapo_fast.trainer the thin trainer behind `mapo-train`)
"""

from .advantage import ADVANTAGE_ESTIMATORS, mapo_advantages
from .logprobs import token_logprobs
from .loss import (KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES, LossMetrics, MAPOLoss,
                   PolicyLossConfig, mapo_loss)
from .policy import PolicyNumerics
from .registry import Registry
from .rollout import RolloutEngine, SamplingParams, ToolParams
from .rewards import CLIPVerifier, OracleVerifier, SemanticVerifier
from .tools import (ToolRegistry, ToolRunner, ZoomInTool, crop_and_zoom, crop_to_patches,
                    crops_to_patches, format_tool_call, parse_tool_calls, smart_resize)
from .trajectory import (Span, ToolTurn, Trajectory, TrajectorySpans, spans_from_ids,
                         spans_from_text, token_turns, turn_batch)
from .variance import gradient_variance, loss_gradient_variance

__version__ = "0.1.0"

__all__ = ["token_logprobs", "mapo_loss", "MAPOLoss", "LossMetrics", "LOSS_AGG_MODES",
           "PolicyLossConfig", "POLICY_LOSSES", "KL_ESTIMATORS", "ADVANTAGE_ESTIMATORS",
           "Registry", "PolicyNumerics",
           "mapo_advantages",
           "Trajectory", "TrajectorySpans", "ToolTurn", "Span", "spans_from_text", "turn_batch",
           "spans_from_ids", "token_turns",
           "SemanticVerifier", "OracleVerifier", "CLIPVerifier", "gradient_variance",
           "loss_gradient_variance",
           "crop_and_zoom", "crop_to_patches", "crops_to_patches", "smart_resize",
           "ToolRegistry", "ToolRunner", "ZoomInTool", "parse_tool_calls", "format_tool_call",
           "RolloutEngine", "SamplingParams", "ToolParams", "__version__"]
