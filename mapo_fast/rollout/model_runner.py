"""The model runner: the paged KV pool, the attention hook, and one forward pass per step.

The model runs as loaded (its embedding, layers, norms, rotary embeddings and LM head); only
attention is replaced, through transformers' attention interface, by ``mapo_paged`` (registered
once, on import of the first runner): each layer writes its new keys and values into their slots
of the paged cache and attends over the pages of each sequence (``rollout.attention``). A
forward takes a packed batch of new tokens (prompt chunks of some sequences, decode tokens or
observation chunks of others) with their absolute positions (M-RoPE ``(t, h, w)`` triples for
vision-language models) and image features in place of image-pad tokens. Decode steps run
on static buffers padded to a capture size, replayed as CUDA graphs on CUDA
(``static_decode``), unless the engine's ``decode_mode`` is ``eager``.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .._dispatch import backend_for
from ..kernels import packed_linear_cpu
from ..policy import apply_logit_map, logit_map_of_config
from .attention import KERNEL, choose_path, run_paged_attention, store_kv, triton_plan
from . import kv_pool
from .block_tables import DeviceBlockTables
from .params import DecodeParams
from .sequence import Batch
from .static_decode import StaticDecode

Tensor = torch.Tensor
ATTN_IMPL = "mapo_paged"


@dataclass
class _Step:
    """What the attention layers of one forward pass need (set by the runner around it)."""
    k_caches: List[Tensor]
    v_caches: List[Tensor]
    slots: Tensor
    block_tables: Tensor
    context_lens: Tensor
    cu_q: Tensor
    path: str  # the attention implementation of this forward pass (choose_path)
    plan: Any = None  # the Triton kernel's launch plan, built by the first layer


_STEP: Optional[_Step] = None


def _paged_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention function: ``query [1, H, N, D]``, ``key/value [1, Hkv, N, D]``
    for the N packed new tokens; returns ``([1, N, H, D], None)``."""
    step = _STEP
    if step is None:
        raise RuntimeError("the 'mapo_paged' attention runs only inside RolloutEngine steps")
    layer = module.layer_idx
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    store_kv(step.k_caches[layer], step.v_caches[layer], k, v, step.slots)
    q = query[0].transpose(0, 1).contiguous()
    if step.path == "triton" and step.plan is None:
        step.plan = triton_plan(q, step.k_caches[layer], step.block_tables, step.context_lens,
                                step.cu_q)
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    out = run_paged_attention(step.path, q, step.k_caches[layer], step.v_caches[layer],
                              step.block_tables, step.context_lens, step.cu_q, scale,
                              plan=step.plan)
    return out.unsqueeze(0), None


def kv_geometry(text_config: Any) -> Tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config: the shape of its KV cache."""
    cfg = text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


@functools.lru_cache(maxsize=None)
def register_attention() -> None:
    """Registers ``mapo_paged`` with transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_IMPL, _paged_attention_forward)
    # the paged kernel masks by position itself: no mask tensor is built
    AttentionMaskInterface.register(ATTN_IMPL, lambda *args, **kwargs: None)


class ModelRunner:
    """The language model's side of the engine.

    Args:
        lm: the base language model (``model.model``, or ``model.model.language_model`` for
            vision-language models); ``head``: the LM head; ``text_config``: its config.
        num_blocks, block_size: the KV pool, ``[num_blocks + 1, block_size, kv_heads,
            head_dim]`` per layer for keys and for values, in the model's dtype and device
            (block ``num_blocks`` is the scratch block that padded decode rows write to; the
            block manager hands out the others).
        mrope: positions are M-RoPE triples (vision-language models).
        stats: counters to update (``forward_passes``, ``attention_<path>_passes``,
            ``block_table_entries_copied``, and the static decode path's).
        decode: how decode steps run (``DecodeParams``; ``static_decode``).
        cpu_linear: the linear layers' path (``packed_linear_cpu.CPU_LINEAR``): ``onednn``
            runs them on weights packed for oneDNN (``PackedLinears``), ``auto`` does so for a
            float32 model on CPU.
    """

    def __init__(self, lm: Any, head: Any, text_config: Any, num_blocks: int, block_size: int,
                 mrope: bool, stats: Dict[str, int], decode: DecodeParams = DecodeParams(),
                 cpu_linear: str = "auto"):
        register_attention()
        self.lm, self.head, self.text_config = lm, head, text_config
        #: the model's logit map (scale, soft cap), applied to the head's output
        self.logit_map = logit_map_of_config(text_config)
        self.block_size, self.mrope, self.stats = block_size, mrope, stats
        param = next(lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers, kv_heads, head_dim = kv_geometry(text_config)
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)
        self.k_caches, self.v_caches = kv_pool.allocate(layers, shape, self.dtype, self.device)
        self.tables = DeviceBlockTables(self.device, stats)
        #: the packed linear layers (None: ``cpu_linear`` resolved to ``torch``)
        self.packed = packed_linear_cpu.PackedLinears([lm, head], stats) if \
            packed_linear_cpu.resolve(cpu_linear, self.device, self.dtype) == "onednn" else None
        #: ``eager``, ``static`` or ``graph`` (``DecodeParams.resolve``)
        self.decode_mode = decode.resolve(self.device)
        self.static = None if self.decode_mode == "eager" else StaticDecode(
            self._decode_forward, self.device, mrope, num_blocks, block_size,
            decode.capture_sizes, self.decode_mode == "graph", stats)

    @contextmanager
    def _attention(self, step: _Step):
        global _STEP
        previous = self.text_config._attn_implementation
        self.text_config._attn_implementation = ATTN_IMPL
        _STEP = step
        try:
            yield
        finally:
            _STEP = None
            self.text_config._attn_implementation = previous

    def _path(self, uniform: bool) -> str:
        return choose_path(self.device, self.dtype, self.block_size, uniform,
                           backend_for(self.k_caches[0], KERNEL))

    def run(self, batch: Batch) -> Tensor:
        """Copies the batch's shared blocks, then one forward pass over its packed chunks: a
        decode step (every chunk one token, no image) that fits a capture size on the static
        path (``static_decode``) unless the mode is ``eager``, anything else eagerly.
        Returns the logits of each chunk's last token, ``[len(batch.chunks), V]`` float32."""
        self.copy_blocks(batch.copies)
        ids, pos, lens, cu, inserts = self._pack(batch)
        tables = self.tables.update([seq.seq_id for seq, _, _ in batch.chunks], batch.tables)
        rows = len(batch.chunks)
        if self.static is not None and not inserts and len(ids) == rows and \
                self.static.bucket(rows) is not None:
            logits, path = self.static.run(ids, pos, batch.slots, lens, tables)
        else:
            logits, path = self._eager(ids, pos, lens, cu, inserts, batch.slots, tables)
        self.stats["forward_passes"] += 1
        key = f"attention_{path}_passes"
        self.stats[key] = self.stats.get(key, 0) + 1
        return logits

    def _pack(self, batch: Batch) -> tuple:
        """The batch's token ids, ``(t, h, w)`` positions, context lengths, query offsets and
        image-feature inserts ``(row, features)``, as host lists."""
        ids, pos, lens, cu, inserts = [], [], [], [0], []
        for seq, start, end in batch.chunks:
            for im in seq.images:  # image features of the image-pad tokens in the chunk
                a, b = max(start, im.start), min(end, im.end)
                if a < b:
                    inserts.append((len(ids) + a - start, im.features[a - im.start:b - im.start]))
            ids += seq.tokens[start:end]
            pos += seq.positions[start:end] if seq.positions is not None else \
                [(p,) * 3 for p in range(start, end)]
            lens.append(end)
            cu.append(cu[-1] + end - start)
        return ids, pos, lens, cu, inserts

    def _eager(self, ids: List[int], pos: List[tuple], lens: List[int], cu: List[int],
               inserts: List[tuple], slots: List[int], tables: Tensor) -> Tuple[Tensor, str]:
        """The forward pass as written, over the packed chunks; logits of each chunk's last
        token and the attention path."""
        dev = self.device
        n_q = [b - a for a, b in zip(cu, cu[1:])]
        step = _Step(self.k_caches, self.v_caches, torch.tensor(slots, device=dev), tables,
                     torch.tensor(lens, dtype=torch.int32, device=dev),
                     torch.tensor(cu, dtype=torch.int32, device=dev),
                     self._path(min(n_q) == max(n_q) > 0))
        position_ids = torch.tensor(pos, device=dev).T[:, None, :]  # [3, 1, N]
        if not self.mrope:
            position_ids = position_ids[0]
        last = None if len(ids) == len(lens) else torch.tensor(cu[1:], device=dev) - 1
        return self._forward(torch.tensor(ids, device=dev), position_ids, step, inserts,
                             last), step.path

    def _decode_forward(self, ids: Tensor, position_ids: Tensor, slots: Tensor, tables: Tensor,
                        lens: Tensor, cu: Tensor) -> Tuple[Tensor, str]:
        """The static path's forward: a decode batch from device tensors only (capturable)."""
        step = _Step(self.k_caches, self.v_caches, slots, tables, lens, cu, self._path(True))
        return self._forward(ids, position_ids, step), step.path

    def _forward(self, ids: Tensor, position_ids: Tensor, step: _Step, inserts: Sequence = (),
                 last: Optional[Tensor] = None) -> Tensor:
        """Embeddings (image features put in at ``inserts``), the decoder with paged
        attention, and the LM head over the rows ``last`` (None: all), as float32 and through
        the model's logit map (``policy.apply_logit_map``: the distribution the loss
        computes)."""
        packed = self.packed.active() if self.packed is not None else nullcontext()
        with torch.no_grad(), self._attention(step), packed:
            embeds = self.lm.get_input_embeddings()(ids[None])
            for row, feats in inserts:
                embeds[0, row:row + feats.shape[0]] = feats.to(embeds.dtype)
            hidden = self.lm(inputs_embeds=embeds, position_ids=position_ids,
                             use_cache=False).last_hidden_state[0]
            return apply_logit_map(self.head(hidden if last is None else hidden[last]).float(),
                                   **self.logit_map)

    def copy_blocks(self, copies) -> None:
        """Copy-on-write: block ``src``'s keys and values into ``dst``, in every layer."""
        for src, dst in copies:
            for k, v in zip(self.k_caches, self.v_caches):
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])
