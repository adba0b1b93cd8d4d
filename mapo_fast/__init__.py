"""mapo_fast: fast pieces for RL of vision-language agents trained with MAPO.

Public API:
    token_logprobs   token log-probs (and entropies) from hidden states and the LM head,
                     without materialising [tokens x vocab] logits
    mapo_loss        the fused clipped, advantage-weighted policy loss (verl semantics)
    MAPOLoss         its nn.Module form
    mapo_advantages  the MAPO advantage: group-relative outcome + semantic scores, per token
"""

from .advantage import mapo_advantages
from .logprobs import token_logprobs
from .loss import LOSS_AGG_MODES, MAPOLoss, mapo_loss

__version__ = "0.1.0"

__all__ = ["token_logprobs", "mapo_loss", "MAPOLoss", "LOSS_AGG_MODES", "mapo_advantages",
           "__version__"]
