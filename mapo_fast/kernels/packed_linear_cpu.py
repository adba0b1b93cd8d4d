"""Linear layers on CPU through oneDNN with weights packed once (``PackedLinears``).

``torch.nn.functional.linear`` on CPU float32 goes to a BLAS GEMM that reads the weight in its
stored layout on every call. oneDNN's inner-product with the weight reordered ahead of time into
its blocked layout (``mkldnn::_reorder_linear_weight``, then ``mkldnn::_linear_pointwise``: the
pair inductor uses for frozen CPU linears) is faster at every size a rollout runs, from a
decode step's LM head to a long prefill's MLP projections. The result is the same product summed in another order:
float32 rounding, not the same bits as ``F.linear``.

A pack is a copy of the weight, so it must follow the weight. Each forward compares the
weight's identity and in-place version counter (``load_state_dict`` and most optimizer steps
bump it) with the pack's and repacks what changed; ``drop`` forgets every pack, for updates
that leave the counter alone (a fused optimizer step, writes through ``.data``): the rollout
engine calls it from ``clear_prefix_cache``, which is to be called after every weight update.

Gated SiLU MLPs (``down_proj(silu(gate_proj(x)) * up_proj(x))``: Qwen2, Llama, Mistral) run
as two fused oneDNN calls: the gate's GEMM with SiLU in its epilogue, then the up projection's
GEMM multiplied by it in its epilogue (no ``silu`` and ``*`` passes over ``[tokens,
intermediate]``). A module
is recognised by its parts (``gate_proj``, ``up_proj``, ``down_proj`` linear, ``act_fn`` a
SiLU) and fused only after its own forward and the fused one agreed on a probe input, so a
module with other arithmetic under the same names keeps its own forward.

The packed forwards are installed only inside ``PackedLinears.active()`` (the rollout engine's
forward passes), under ``no_grad``, for inputs on CPU in float32; anything else takes the
module's own forward.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ._common import torch_at_least

Tensor = torch.Tensor
#: the first torch release with both oneDNN operators as used here
MIN_TORCH = (2, 1)
#: what ``RolloutEngine(cpu_linear=...)`` takes: ``auto`` (``onednn`` where ``available``, for
#: a float32 model on CPU; else ``torch``), ``onednn`` (refused where it cannot run) or
#: ``torch`` (the modules' own forwards)
CPU_LINEAR = ("auto", "onednn", "torch")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this torch runs oneDNN on CPU and has the operators (version, then names)."""
    return torch_at_least(MIN_TORCH) and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise") and \
        hasattr(torch.ops.mkldnn._linear_pointwise, "binary")


def pack(weight: Tensor) -> Tensor:
    """``weight [out, in]`` float32 on CPU in oneDNN's blocked layout (a copy)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(x: Tensor, packed: Tensor, bias: Optional[Tensor], silu: bool = False) -> Tensor:
    """``x [..., in]`` float32 times a ``pack``ed weight, plus ``bias [out]``: ``[..., out]``
    (with ``silu``: SiLU of it, applied in the GEMM's epilogue)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "swish" if silu else "none", [],
                                              "")


def linear_times(x: Tensor, packed: Tensor, bias: Optional[Tensor], other: Tensor) -> Tensor:
    """``linear(x, packed, bias) * other`` (``other`` of the output's shape), the product taken
    in the GEMM's epilogue."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "mul")


def _silu_types() -> Tuple[type, ...]:
    from transformers import activations  # its SiLU module is not torch's
    return (torch.nn.SiLU,) + tuple(t for t in [getattr(activations, "SiLUActivation", None)]
                                    if t is not None)


def gated_silu(m: torch.nn.Module) -> bool:
    """Whether ``m`` has a gated SiLU MLP's parts (its arithmetic is probed apart)."""
    return all(isinstance(getattr(m, n, None), torch.nn.Linear)
               for n in ("gate_proj", "up_proj", "down_proj")) and \
        isinstance(getattr(m, "act_fn", None), _silu_types())


#: the fewest weight elements worth packing: oneDNN's call has a fixed cost above the BLAS
#: path's, so smaller layers lose (the two break even near 256 x 256 on a decode step's rows)
MIN_PACKED_WEIGHT = 1 << 16

#: the probe a gated MLP's own and fused forwards must agree on: rows, and the tolerance (float32
#: sums of a few hundred terms in another order)
PROBE_ROWS, PROBE_TOL = 3, 1e-4


def resolve(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """``onednn`` or ``torch`` for a model on ``device`` in ``dtype``; ``ValueError`` naming
    ``cpu_linear`` for an unknown choice or ``onednn`` where it cannot run."""
    if choice not in CPU_LINEAR:
        raise ValueError(f"RolloutEngine: `cpu_linear` must be one of {', '.join(CPU_LINEAR)}; "
                         f"got {choice!r}")
    fits = device.type == "cpu" and dtype == torch.float32
    if choice == "onednn" and not (fits and available()):
        raise ValueError(f"RolloutEngine: `cpu_linear` 'onednn' needs a float32 model on CPU "
                         f"and a torch with oneDNN; got {dtype} on {device.type}, oneDNN "
                         f"{'available' if available() else 'not available'}")
    if choice == "auto":
        return "onednn" if fits and available() else "torch"
    return choice


class PackedLinears:
    """The ``torch.nn.Linear`` modules of ``modules`` (searched recursively) with at least
    ``min_weight`` weight elements (default ``MIN_PACKED_WEIGHT``), run through ``linear``
    inside ``active()``, and the gated SiLU MLPs whose gate is that large through ``linear``
    and ``linear_times`` where the probe agrees (``gated_silu``).

    ``stats`` (optional) counts ``linear_weights_packed`` (packs made, the first and every
    repack after a weight changed) and ``gated_mlps_fused`` (MLPs whose probe agreed).
    """

    def __init__(self, modules: Sequence[torch.nn.Module], stats: Optional[Dict[str, int]] = None,
                 min_weight: Optional[int] = None):
        least = MIN_PACKED_WEIGHT if min_weight is None else min_weight
        seen, self.linears, self.mlps = set(), [], []  # type: ignore[var-annotated]
        for root in modules:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                if isinstance(m, torch.nn.Linear) and m.weight.numel() >= least:
                    self.linears.append(m)
                elif gated_silu(m) and m.gate_proj.weight.numel() >= least:
                    self.mlps.append(m)
        self.stats = stats if stats is not None else {}
        #: per module: (the weight object packed, its version then, the pack)
        self._packs: Dict[int, Tuple[Tensor, int, Tensor]] = {}
        #: per gated MLP: whether its probe agreed
        self._agreed: Dict[int, bool] = {}

    def packed(self, m: torch.nn.Linear) -> Tensor:
        """``m``'s current pack, made or remade when its weight is another object or was
        changed in place since."""
        w = m.weight
        entry = self._packs.get(id(m))
        if entry is None or entry[0] is not w or entry[1] != w._version:
            entry = (w, w._version, pack(w))
            self._packs[id(m)] = entry
            self.stats["linear_weights_packed"] = self.stats.get("linear_weights_packed", 0) + 1
        return entry[2]

    def drop(self) -> None:
        """Forgets every pack: the next forward packs each weight again."""
        self._packs.clear()

    def _fused_mlp(self, m: torch.nn.Module, x: Tensor) -> Tensor:
        """``m.down_proj(silu(m.gate_proj(x)) * m.up_proj(x))`` in two fused calls."""
        gate, up = m.gate_proj, m.up_proj
        g = linear(x, self.packed(gate), gate.bias, silu=True)
        return m.down_proj(linear_times(x, self.packed(up), up.bias, g))

    def _agrees(self, m: torch.nn.Module, own: Any) -> bool:
        """Whether ``m``'s own forward and the fused one agree on a probe (checked once)."""
        if id(m) not in self._agreed:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(PROBE_ROWS, m.gate_proj.in_features, generator=g)
            want, got = own(x), self._fused_mlp(m, x)
            self._agreed[id(m)] = got.shape == want.shape and \
                bool(torch.allclose(got, want, rtol=PROBE_TOL, atol=PROBE_TOL))
            self.stats["gated_mlps_fused"] = self.stats.get("gated_mlps_fused", 0) + \
                self._agreed[id(m)]
        return self._agreed[id(m)]

    @staticmethod
    def _runs(x: Tensor, weight: Tensor) -> bool:
        return not torch.is_grad_enabled() and x.device.type == "cpu" and \
            x.dtype == weight.dtype == torch.float32

    def _forward(self, m: torch.nn.Module, own: Any):
        if isinstance(m, torch.nn.Linear):
            def forward(x: Tensor) -> Tensor:
                return linear(x, self.packed(m), m.bias) if self._runs(x, m.weight) else own(x)
        else:
            def forward(x: Tensor) -> Tensor:
                if self._runs(x, m.gate_proj.weight) and self._agrees(m, own):
                    return self._fused_mlp(m, x)
                return own(x)
        return forward

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within: each module's forward is the packed one (instance attribute, removed on
        exit, also when the block raises)."""
        installed: List[torch.nn.Module] = []
        try:
            for m in self.linears + self.mlps:
                if "forward" in m.__dict__:  # someone else's instance forward: leave it be
                    continue
                m.forward = self._forward(m, m.forward)
                installed.append(m)
            yield
        finally:
            for m in installed:
                del m.forward
