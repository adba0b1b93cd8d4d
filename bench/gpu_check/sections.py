"""The sections by name, in the order they run (the graph-safety probe first)."""

from __future__ import annotations

from .advantage import advantage_section
from .crops import crop_section
from .loss import loss_section
from .paged import paged_section
from .rollout import decode_graph_section, graph_safety_section, rollout_section

SECTIONS = {"graph_safety": graph_safety_section, "loss": loss_section,
            "paged_attention": paged_section, "crops": crop_section,
            "advantage": advantage_section, "rollout": rollout_section,
            "decode_graphs": decode_graph_section}
