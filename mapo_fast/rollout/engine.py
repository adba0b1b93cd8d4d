"""``RolloutEngine``: batched generation with a paged KV cache shared by the samples of a group.

The engine runs a Hugging Face causal LM as loaded: its own embedding, layers, norms, rotary
embeddings and LM head. Only attention is replaced, through transformers' attention interface,
by ``mapo_paged``: each layer writes its new keys and values into their slots of the paged
cache and attends over the pages of each sequence (``rollout.attention``). Every forward pass
takes a packed batch of new tokens (prompt chunks of some sequences, one decode token of
others) with their absolute positions.

Each prompt is prefilled once per group (leading blocks already in the prefix index are not
recomputed at all), then forked into its G samples, which share the prompt's blocks until they
write (copy-on-write); all live samples decode together, one forward per step.

When the pool runs out, the most recently started other sample is preempted (its blocks
freed, its tokens kept) and resumed when blocks free up: its tokens go back through the prefix
index, so only what was evicted is recomputed.

Vision-language models (Qwen2-VL / Qwen2.5-VL) run through the same path: the forward takes
input embeddings in which each image-pad token holds its image's vision features, computed once
per prompt image (shared by the group) and once per crop, and M-RoPE positions that each
sequence carries on across turns (``rollout.multimodal``). Tool calls of all samples that
closed one in a step run together: one ``ToolRunner`` call, one ``crop_to_patches`` and one
vision-tower pass over all their crops.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..tools.ops import MAX_PIXELS, MIN_PIXELS
from ..trajectory import (DESCRIPTION_TAG, OBSERVATION_TEMPLATE, Span, ToolTurn, Trajectory,
                          TrajectorySpans)
from .attention import attention_path, run_paged_attention, store_kv
from .multimodal import (ImageInsert, VisionAdapter, crop_key, image_key, is_vision_language,
                         render_chat)

Tensor = torch.Tensor
ATTN_IMPL = "mapo_paged"


@dataclass
class _Step:
    """What the attention layers of one forward pass need (set by the engine around it)."""
    k_caches: List[Tensor]
    v_caches: List[Tensor]
    slots: Tensor
    block_tables: Tensor
    context_lens: Tensor
    cu_q: Tensor
    path: str = ""  # the attention implementation this step used (attention_path)


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
    step.path = step.path or attention_path(q, step.k_caches[layer], step.cu_q)
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    out = run_paged_attention(step.path, q, step.k_caches[layer], step.v_caches[layer],
                              step.block_tables, step.context_lens, step.cu_q, scale)
    return out.unsqueeze(0), None


def _processed(processor: Any, tokens: List[int], row: Tensor) -> Tensor:
    """``processor(tokens, row)``, checked: a float tensor of the row's shape with at least one
    finite logit (else nothing could be sampled)."""
    out = processor(tokens, row)
    name = getattr(processor, "__name__", type(processor).__name__)
    if not isinstance(out, Tensor) or out.shape != row.shape or not out.is_floating_point():
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"RolloutEngine.generate: `logits_processor` ({name}) must return float "
                         f"logits of shape {tuple(row.shape)}, got {got}")
    if not bool(torch.isfinite(out).any()) or bool(torch.isnan(out).any()):
        raise ValueError(f"RolloutEngine.generate: `logits_processor` ({name}) returned logits "
                         "with no finite value or with NaN: nothing can be sampled")
    return out


def _out_of_blocks(e: Exception) -> bool:
    return str(e).startswith("out of KV blocks")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_IMPL, _paged_attention_forward)
    # the paged kernel masks by position itself: no mask tensor is built
    AttentionMaskInterface.register(ATTN_IMPL, lambda *args, **kwargs: None)


@dataclass
class _Seq:
    sid: int                       # block-manager sequence id
    traj: int                      # index of the output trajectory
    tokens: List[int]              # prompt + everything after it so far
    prompt_len: int
    pending: List[int] = field(default_factory=list)  # tokens whose KV is not yet in the cache
    new_tokens: int = 0            # generated tokens in this turn
    generated: int = 0             # generated tokens in the whole trajectory
    logprobs: List[float] = field(default_factory=list)  # aligned with tokens[prompt_len:]
    loss_mask: List[int] = field(default_factory=list)   # likewise
    generator: Optional[torch.Generator] = None
    done: bool = False
    turn_start: int = 0            # first token of the current assistant turn
    turns: List[ToolTurn] = field(default_factory=list)
    session: Any = None
    stats: Dict[str, int] = field(default_factory=dict)
    chunk_start: int = 0           # first token of the next forward's chunk for this sample
    chunk_end: int = 0             # end of this step's chunk (< len(tokens): more to prefill)
    preempted: bool = False
    ctx: Any = None                # the prompt's ToolContext
    positions: Optional[List[tuple]] = None  # M-RoPE (t, h, w) per token (vision-language)
    next_pos: int = 0              # M-RoPE position of the next token
    images: List[ImageInsert] = field(default_factory=list)
    crops: List[Tensor] = field(default_factory=list)
    tool_text: Optional[str] = None  # the turn's text when it closed a tool call this step


@dataclass
class _Prompt:
    """An encoded prompt: its tokens, images (uint8 originals and vision features in place)
    and M-RoPE positions (None for text models)."""
    tokens: List[int]
    raw_images: List[Tensor] = field(default_factory=list)
    images: List[ImageInsert] = field(default_factory=list)
    positions: Optional[List[tuple]] = None
    next_pos: int = 0


class RolloutEngine:
    """Batched, group-shared generation over a paged KV cache.

    Args:
        model: a Hugging Face causal LM whose attention goes through transformers' attention
            interface (Qwen2, Llama, Mistral, ...): ``model.model`` (the base) and
            ``model.lm_head``; or a Qwen2-VL / Qwen2.5-VL ``...ForConditionalGeneration``
            (``model.model.visual`` and ``model.model.language_model``).
        tokenizer: its tokenizer (for string and chat prompts, ``eos_token_id``, decoding).
        block_size: tokens per KV block.
        num_blocks: blocks in the pool (default: from ``memory_budget_mb``).
        memory_budget_mb: KV-cache memory when ``num_blocks`` is not given (default 256).
        min_pixels, max_pixels: vision-language models: the area bounds of the resize rule for
            prompt images and crops (the Qwen2-VL processor's defaults).
        prefill_chunk: most tokens of one sequence in one forward pass. Longer prompts are
            prefilled in chunks (bounding activation and attention-score memory); a long
            observation is prefilled over several steps, while the other samples keep decoding.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, block_size: int = 16,
                 num_blocks: Optional[int] = None, memory_budget_mb: float = 256.0,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 prefill_chunk: int = 2048):
        from ..kernels._block_manager import BlockManager
        cfg = getattr(model, "config", None)
        base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        self.vision = None
        if cfg is not None and is_vision_language(model):
            self.vision = VisionAdapter(model, min_pixels=min_pixels, max_pixels=max_pixels)
            base = base.language_model
        cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
        if cfg is None or base is None or head is None or \
                not hasattr(cfg, "num_hidden_layers") or not hasattr(cfg, "num_key_value_heads"):
            raise ValueError(f"RolloutEngine: `model` ({type(model).__name__}) is not a causal LM "
                             "with .model, .lm_head and a config with num_hidden_layers and "
                             "num_key_value_heads; the engine cannot drive it")
        self.lm, self.text_config = base, cfg
        if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"RolloutEngine: `block_size` must be a power of two >= 16, got "
                             f"{block_size!r}")
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or \
                prefill_chunk < 1:
            raise ValueError(f"RolloutEngine: `prefill_chunk` must be an int >= 1, got "
                             f"{prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        _register()
        self.model, self.tokenizer = model, tokenizer
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(getattr(emb, "num_embeddings", None) or head.weight.shape[0])
        self.layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        #: bytes of one KV block (keys and values of every layer)
        self.block_bytes = per_block = 2 * self.layers * block_size * self.kv_heads * \
            self.head_dim * param.element_size()
        if num_blocks is None:
            budget = memory_budget_mb
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or \
                    not math.isfinite(budget) or budget <= 0:
                raise ValueError(f"RolloutEngine: `memory_budget_mb` must be a finite number > 0, "
                                 f"got {memory_budget_mb!r}")
            num_blocks = int(memory_budget_mb * 2 ** 20) // per_block
            if num_blocks < 1:
                raise ValueError(f"RolloutEngine: `memory_budget_mb` {memory_budget_mb!r} holds no "
                                 f"KV block (one block of {block_size} tokens takes "
                                 f"{per_block / 2 ** 20:.4g} MiB)")
        elif not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"RolloutEngine: `num_blocks` must be an int >= 1, got {num_blocks!r}")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_blocks, block_size, self.kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                         for _ in range(self.layers)]
        self.v_caches = [torch.zeros_like(self.k_caches[0]) for _ in range(self.layers)]
        self.blocks = BlockManager(num_blocks, block_size)
        self.stats: Dict[str, int] = {"prefill_tokens": 0, "cached_prompt_tokens": 0,
                                      "decode_tokens": 0, "forward_passes": 0}

    def turn_tokens(self, max_new_tokens: int, tools: bool,
                    observation_template: str = OBSERVATION_TEMPLATE,
                    max_observation_tokens: int = 256) -> int:
        """The most KV tokens one turn of one sample can take: its ``max_new_tokens`` and, with
        tools, the longest observation (a crop's image tokens in the template, or a text)."""
        if not tools:
            return max_new_tokens
        obs = max_observation_tokens
        if self.vision is not None:
            obs = max(obs, self.vision.max_image_tokens + 2 + len(self.tokenizer(
                observation_template, add_special_tokens=False)["input_ids"]))
        return max_new_tokens + obs + 8

    def _release_all(self) -> None:
        """Every block back to the pool and an empty prefix index (after a failed call)."""
        from ..kernels._block_manager import BlockManager
        self.blocks = BlockManager(self.num_blocks, self.block_size)

    def clear_prefix_cache(self) -> None:
        """Forgets every cached block. Call it after the model's weights change (each
        optimizer step): the cached keys and values were computed with the old weights."""
        if self.blocks.num_free != self.num_blocks:
            raise RuntimeError("RolloutEngine.clear_prefix_cache: sequences still hold blocks")
        self._release_all()

    # ---- model steps ---------------------------------------------------------------------
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

    def _forward(self, chunks: Sequence[tuple]) -> Tensor:
        """One forward pass over packed new tokens. ``chunks``: ``(sid, owner, start, end)`` per
        sequence: the owner's (a ``_Seq`` or ``_Prompt``) tokens ``[start, end)``, already
        appended in the block manager (the sequence's context is its first ``end`` tokens).
        Returns the logits of each chunk's last token, ``[len(chunks), V]`` float32."""
        ids, pos, slots, tables, lens, cu = [], [], [], [], [], [0]
        inserts = []  # (row in the packed batch, features) of image tokens in the chunks
        bs = self.block_size
        for sid, owner, start, end in chunks:
            table = self.blocks.block_table(sid)
            for im in owner.images:
                a, b = max(start, im.start), min(end, im.end)
                if a < b:
                    inserts.append((len(ids) + a - start, im.features[a - im.start:b - im.start]))
            ids += owner.tokens[start:end]
            pos += owner.positions[start:end] if owner.positions is not None else \
                [(p,) * 3 for p in range(start, end)]
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            tables.append(table)
            lens.append(end)
            cu.append(cu[-1] + end - start)
        width = max(len(t) for t in tables)
        dev = self.device
        step = _Step(self.k_caches, self.v_caches, torch.tensor(slots, device=dev),
                     torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev),
                     torch.tensor(lens, device=dev), torch.tensor(cu, device=dev))
        position_ids = torch.tensor(pos, device=dev).T[:, None, :]  # [3, 1, N]
        if self.vision is None:
            position_ids = position_ids[0]
        with torch.no_grad(), self._attention(step):
            embeds = self.lm.get_input_embeddings()(torch.tensor([ids], device=dev))
            for row, feats in inserts:
                embeds[0, row:row + feats.shape[0]] = feats.to(embeds.dtype)
            hidden = self.lm(inputs_embeds=embeds, position_ids=position_ids,
                             use_cache=False).last_hidden_state[0]
            last = hidden[torch.tensor(cu[1:], device=dev) - 1]
            logits = self.model.lm_head(last).float()
        self.stats["forward_passes"] += 1
        key = f"attention_{step.path}_passes"
        self.stats[key] = self.stats.get(key, 0) + 1
        return logits

    def _copy_blocks(self, copies) -> None:
        for src, dst in copies:
            for k, v in zip(self.k_caches, self.v_caches):
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])

    # ---- sampling --------------------------------------------------------------------------
    @staticmethod
    def _sample(logits: Tensor, gens: Sequence[Optional[torch.Generator]], temperature: float,
                top_k: int, top_p: float):
        """Next token and its log-prob under the sampling distribution (temperature 0: greedy,
        log-prob at temperature 1)."""
        if temperature == 0:
            logp = torch.log_softmax(logits, -1)
            tok = logits.argmax(-1)
            return tok.tolist(), logp.gather(1, tok[:, None])[:, 0].tolist()
        scaled = logits / temperature
        if top_k > 0:
            kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if top_p < 1.0:
            sorted_l, idx = torch.sort(scaled, descending=True, dim=-1)
            cum = torch.softmax(sorted_l, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_l, -1) > top_p
            scaled = scaled.scatter(1, idx, sorted_l.masked_fill(drop, float("-inf")))
        logp = torch.log_softmax(scaled, -1)
        # inverse-CDF sampling, one uniform per sample from its own generator: the draw does
        # not depend on the batch; ``right=True`` never lands on a zero-probability token
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
        cdf = logp.double().exp().cumsum(-1)
        x = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        tok = torch.searchsorted(cdf, x, right=True).clamp_(max=logits.shape[-1] - 1)
        return tok[:, 0].tolist(), logp.gather(1, tok)[:, 0].tolist()

    # ---- generation ------------------------------------------------------------------------
    def _encode(self, prompt: Any, i: int) -> _Prompt:
        fn = "RolloutEngine.generate"
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                       and isinstance(prompt[0], dict)):
            if self.tokenizer is None:
                raise ValueError(f"{fn}: `prompts[{i}]` is text but the engine has no tokenizer")
            if isinstance(prompt, str):
                toks = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                if not toks:
                    raise ValueError(f"{fn}: `prompts[{i}]` is empty (no tokens)")
                return self._with_images(_Prompt(toks), i)
            toks, ims = render_chat(prompt, self.tokenizer, self.vision, where=f"prompts[{i}]")
            return self._with_images(_Prompt(toks, raw_images=ims), i)
        if not isinstance(prompt, (list, tuple, torch.Tensor)) or not all(
                isinstance(t, int) and not isinstance(t, bool) or
                isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point()
                for t in prompt):
            raise ValueError(f"{fn}: `prompts[{i}]` must be a string, a list of int token ids "
                             f"or a chat message list, got {type(prompt).__name__}")
        toks = [int(t) for t in prompt]
        if not toks:
            raise ValueError(f"{fn}: `prompts[{i}]` is empty")
        bad = next((t for t in toks if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{fn}: `prompts[{i}]` holds token id {bad}, outside the model's "
                             f"vocabulary [0, {self.vocab_size})")
        return self._with_images(_Prompt(toks), i)

    def _with_images(self, p: _Prompt, i: int) -> _Prompt:
        """Vision features of the prompt's images (one vision-tower pass) and its M-RoPE
        positions; the image-pad runs must match the images."""
        if self.vision is None:
            return p
        v = self.vision
        feats = v.encode(p.raw_images, [(k, 0, 0, im.shape[2], im.shape[1])
                                        for k, im in enumerate(p.raw_images)])
        self._count_vision(feats)
        try:
            p.positions, p.next_pos = v.positions(p.tokens, [g for _, g in feats], 0)
        except ValueError:
            raise ValueError(f"RolloutEngine.generate: `prompts[{i}]` has image-pad tokens "
                             f"but only {len(feats)} image(s)") from None
        runs = [k for k, t in enumerate(p.tokens) if t == v.image_token_id and
                (k == 0 or p.tokens[k - 1] != v.image_token_id)]
        if len(runs) != len(feats):
            raise ValueError(f"RolloutEngine.generate: `prompts[{i}]` has {len(runs)} image "
                             f"placeholder(s) for {len(feats)} image(s)")
        p.images = [ImageInsert(k, f, image_key(im))
                    for k, (f, _), im in zip(runs, feats, p.raw_images)]
        return p

    def _count_vision(self, encoded: Sequence[tuple]) -> None:
        """Counts images and patches that went through the vision tower."""
        self.stats["vision_images"] = self.stats.get("vision_images", 0) + len(encoded)
        self.stats["vision_patches"] = self.stats.get("vision_patches", 0) + sum(
            t * h * w for _, (t, h, w) in encoded)

    @staticmethod
    def _keys(owner: Any, start: int = 0, end: Optional[int] = None) -> List[int]:
        """The prefix index's view of ``owner.tokens[start:end]``: image-pad tokens are
        replaced by keys of their image's content and offset, so two images never share
        cached KV."""
        end = len(owner.tokens) if end is None else end
        keys = owner.tokens[start:end]
        for im in owner.images:
            a, b = max(start, im.start), min(end, im.end)
            for j in range(a, b):
                keys[j - start] = -1 - ((im.key * 1000003 + j - im.start) & (2 ** 62 - 1))
        return keys

    def _check_generate_args(self, *, prompts: Any, group_size: Any, max_new_tokens: Any,
                             temperature: Any, top_k: Any, top_p: Any,
                             stop_token_ids: Any, seed: Any, tools: Any, max_turns: Any,
                             tool_contexts: Any, observation_template: Any,
                             logits_processor: Any, stop_strings: Any,
                             max_trajectory_tokens: Any) -> None:
        """``generate``'s arguments, each checked before any work; ``ValueError``
        naming the first bad one."""
        fn = "RolloutEngine.generate"
        if isinstance(prompts, (str, bytes, dict)) or not isinstance(prompts, Sequence):
            raise ValueError(f"{fn}: `prompts` must be a list of prompts, got "
                             f"{type(prompts).__name__} (wrap a single prompt in a list)")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"{fn}: `seed` must be an int or None, got {seed!r}")
        for name, v in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{fn}: `{name}` must be a finite number, got {v!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise ValueError(f"{fn}: `top_k` must be an int >= 0, got {top_k!r}")
        if stop_token_ids is not None and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
            raise ValueError(f"{fn}: `stop_token_ids` must be a list of ints, got "
                             f"{stop_token_ids!r}")
        if logits_processor is not None and not callable(logits_processor):
            raise ValueError(f"{fn}: `logits_processor` must be callable, got "
                             f"{type(logits_processor).__name__}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{fn}: `group_size` must be an int >= 1, got {group_size!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"{fn}: `max_new_tokens` must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"{fn}: `max_turns` must be an int >= 1, got {max_turns!r}")
        if temperature < 0 or not (0 < top_p <= 1) or top_k < 0:
            raise ValueError(f"{fn}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{temperature!r}, {top_p!r}, {top_k!r}")
        if tools is not None and self.tokenizer is None:
            raise ValueError(f"{fn}: `tools` need the engine's tokenizer (to read calls and "
                             "insert observations)")
        if tool_contexts is not None and len(tool_contexts) != len(prompts):
            raise ValueError(f"{fn}: `tool_contexts` has {len(tool_contexts)} entries for "
                             f"{len(prompts)} prompts")
        if stop_strings is not None and (self.tokenizer is None or isinstance(stop_strings, str)
                                         or not all(isinstance(x, str) and x
                                                    for x in stop_strings)):
            raise ValueError(f"{fn}: `stop_strings` must be a list of non-empty strings and the "
                             f"engine needs a tokenizer for them, got {stop_strings!r}")
        if max_trajectory_tokens is not None and (
                not isinstance(max_trajectory_tokens, int) or max_trajectory_tokens < 1):
            raise ValueError(f"{fn}: `max_trajectory_tokens` must be an int >= 1 or None, got "
                             f"{max_trajectory_tokens!r}")
        if tools is not None and "{}" not in observation_template:
            raise ValueError(f"{fn}: `observation_template` must contain '{{}}', got "
                             f"{observation_template!r}")

    def generate(self, prompts: Sequence[Any], *, group_size: int = 1,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_token_ids: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None, tools: Any = None, max_turns: int = 1,
                 tool_contexts: Optional[Sequence[Any]] = None, max_tool_calls: int = 4,
                 max_observation_tokens: int = 256,
                 observation_template: str = OBSERVATION_TEMPLATE,
                 logits_processor: Optional[Any] = None,
                 stop_strings: Optional[Sequence[str]] = None,
                 max_trajectory_tokens: Optional[int] = None) -> List[Trajectory]:
        """``len(prompts) x group_size`` trajectories, grouped (the samples of prompt ``i`` are
        ``[i * group_size, (i + 1) * group_size)``). A prompt is a string, token ids, or a chat
        message list (``{"role", "content"}`` dicts; content parts ``{"type": "text"}`` or
        ``{"type": "image", "image": uint8 [3, H, W]}``, vision-language models only), rendered
        in Qwen's chat format up to the opened assistant turn. ``temperature=0`` is greedy.
        Sample ``j`` of the batch draws from its own generator, seeded ``seed + j`` (so results
        do not depend on batching). ``max_new_tokens`` bounds each assistant turn,
        ``max_trajectory_tokens`` (optional) the model-written tokens of a whole trajectory (a
        sample that reaches it ends there, even on a tool call; ``stats["truncated"] = 1``).
        A turn also ends on a token of ``stop_token_ids`` (default: the tokenizer's EOS) or
        when its text comes to contain one of ``stop_strings`` (the tokens are kept).

        With ``tools`` (a ``ToolRunner``) and ``max_turns > 1``, a turn that closes a
        ``</tool_call>`` is handed to the runner; the observation is inserted as
        ``observation_template`` with ``{}`` replaced by the result: the crop's image tokens
        (vision-language models), else the text (a text tool's result or an error, at most
        ``max_observation_tokens`` tokens). Observation tokens have loss mask 0 and only they
        are prefilled, batched with the other samples' decoding, before the model continues.
        ``tool_contexts[i]`` is prompt ``i``'s ``ToolContext`` (default: the prompt's images).
        A text-only model is answered with an error observation when a tool returns a crop.

        Vision-language models never sample the image-placeholder and vision marker tokens
        (only observations insert them). ``logits_processor(token_ids, logits) -> logits``
        (optional) edits each sample's
        next-token logits ``[V]`` (float32) given its tokens so far, before sampling; the
        recorded log-probs are those of the processed distribution (what was sampled from); it
        must return float logits of the row's shape with at least one finite value and no NaN.

        Every argument is checked before any work (``ValueError`` naming it: ``prompts`` must
        be a list, token ids within the vocabulary, ``seed`` an int, ``temperature`` and
        ``top_p`` finite, ...). A call that fails midway, for whatever reason (a logits
        processor or a tool that raises, an interrupt), gives every KV block back before the
        error propagates: the engine stays as usable as before (its prefix cache is emptied)."""
        self._check_generate_args(
            prompts=prompts, group_size=group_size, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids,
            seed=seed, tools=tools, max_turns=max_turns, tool_contexts=tool_contexts,
            observation_template=observation_template, logits_processor=logits_processor,
            stop_strings=stop_strings, max_trajectory_tokens=max_trajectory_tokens)
        fn = "RolloutEngine.generate"
        # from here on blocks are held: a failure anywhere gives every block back, so a
        # failed call leaves the engine as usable as before (the prefix cache is emptied)
        try:
            encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
            per_turn = self.turn_tokens(max_new_tokens, tools is not None, observation_template,
                                        max_observation_tokens)
            capacity = self.num_blocks * self.block_size
            for i, p in enumerate(encoded):
                if len(p.tokens) + max_turns * per_turn > capacity:
                    raise ValueError(f"{fn}: `prompts[{i}]` ({len(p.tokens)} tokens) plus "
                                     f"{max_turns} turn(s) of up to {per_turn} tokens exceeds "
                                     f"the KV budget of {capacity} tokens")
            stops = set(stop_token_ids or [])
            eos = None if self.tokenizer is None else getattr(self.tokenizer, "eos_token_id",
                                                                  None)
            if stop_token_ids is None and eos is not None:
                stops.add(int(eos))
            if tools is not None and self.vision is not None:
                # crops are cut by the model's resize rule (the runner's stats stay shared)
                tools = dataclasses.replace(tools, crop_kwargs={
                    **tools.crop_kwargs, "factor": self.vision.factor,
                    "min_pixels": self.vision.min_pixels, "max_pixels": self.vision.max_pixels})
            stop_strings = tuple(stop_strings or ())
            cfg = dict(stops=stops, max_new_tokens=max_new_tokens, max_turns=max_turns, tools=tools,
                       stop_strings=stop_strings, max_trajectory_tokens=max_trajectory_tokens,
                       # a stop string of n characters spans at most 4n tokens (byte-level BPE)
                       stop_window=4 * max(map(len, stop_strings), default=0) + 4,
                       max_observation_tokens=max_observation_tokens, template=observation_template,
                       image_keys={})

            banned = None
            if self.vision is not None:  # the model never writes image placeholders itself
                v = self.vision
                banned = [v.image_token_id, v.vision_start_id, v.vision_end_id]
                video = getattr(self.model.config, "video_token_id", None)
                banned += [int(video)] if video is not None else []

            def pick(batch: Sequence[_Seq], logits: Tensor):
                """Each sample's next token and log-prob from its row of ``logits [n, V]``."""
                if banned is not None:
                    logits = logits.clone()
                    logits[:, banned] = float("-inf")
                if logits_processor is not None:
                    logits = torch.stack([_processed(logits_processor, list(s.tokens), row)
                                          for s, row in zip(batch, logits)])
                return self._sample(logits, [s.generator for s in batch], temperature, top_k, top_p)

            seqs: List[_Seq] = []
            for i, p in enumerate(encoded):
                toks = p.tokens
                head, cached = self._add_prompt(self._keys(p), seqs)
                self.stats["cached_prompt_tokens"] += cached
                self.stats["prefill_tokens"] += len(toks) - cached
                if cached == len(toks):
                    # the whole prompt is cached: recompute its last token for the logits (its KV
                    # slot gets the same values it already holds)
                    cached -= 1
                for a in range(cached, len(toks), self.prefill_chunk):  # nothing runs between
                    logits = self._forward([(head, p, a, min(len(toks), a + self.prefill_chunk))])
                for im, insert in zip(p.raw_images, p.images):  # hashed once, in _with_images
                    cfg["image_keys"][id(im)] = insert.key
                ctx = tool_contexts[i] if tool_contexts is not None else None
                if ctx is None and tools is not None and p.raw_images:
                    from ..tools import ToolContext
                    ctx = ToolContext.for_images(p.raw_images, self.vision.factor,
                                                 self.vision.min_pixels, self.vision.max_pixels)
                started = len(seqs)
                for g in range(group_size):
                    j = i * group_size + g
                    gen = None
                    if temperature > 0:
                        gen = torch.Generator().manual_seed((seed if seed is not None else 0) + j)
                    stats = {"tool_calls": 0, "tool_errors": 0, "prefill_tokens": 0,
                             "decode_tokens": 0}  # the group's prompt prefill: engine stats only
                    s = _Seq(self.blocks.fork_seq(head), j, list(toks), len(toks), generator=gen,
                             turn_start=len(toks), stats=stats, ctx=ctx, images=list(p.images),
                             next_pos=p.next_pos,
                             positions=None if p.positions is None else list(p.positions))
                    if tools is not None:
                        from ..tools import ToolSession
                        s.session = ToolSession(max_calls=max_tool_calls)
                    seqs.append(s)
                group = seqs[started:]
                for s, tok, lp in zip(group, *pick(group, logits.repeat(len(group), 1))):
                    self._emit(s, tok, lp, cfg)
                self._run_tools(seqs[started:], cfg)
                for s in seqs[started:]:
                    if s.done:  # finished at its first token
                        self.blocks.free_seq(s.sid)
                self.blocks.free_seq(head)
            while True:
                self._resume(seqs)
                live = [s for s in seqs if s.pending and not s.preempted]
                if not live:
                    if any(s.preempted for s in seqs):
                        raise RuntimeError("RolloutEngine: a preempted sample cannot be resumed in "
                                           "an empty pool")  # excluded by the capacity check
                    break
                step = self._make_room(live)
                used = self.num_blocks - self.blocks.num_free
                self.stats["peak_blocks"] = max(self.stats.get("peak_blocks", 0), used)
                logits = self._forward([(s.sid, s, s.chunk_start, s.chunk_end) for s in step])
                # a chunk that reaches the sample's newest token ends with a decode; anything
                # before it is an observation or a recomputed prefix (prefill); a chunk that
                # stops short of it is prefill only, and the sample goes on next step
                ready = [r for r, s in enumerate(step) if s.chunk_end == len(s.tokens)]
                decoded = set(ready)
                self.stats["decode_tokens"] += len(ready)
                self.stats["prefill_tokens"] += sum(s.chunk_end - s.chunk_start for s in step) - \
                    len(ready)
                for r, s in enumerate(step):
                    s.stats["prefill_tokens"] += s.chunk_end - s.chunk_start - (r in decoded)
                    s.stats["decode_tokens"] += r in decoded
                    s.chunk_start = s.chunk_end
                sampled = [step[r] for r in ready]
                if ready:
                    rows = logits[torch.tensor(ready, device=logits.device)]
                    for s, t, lp in zip(sampled, *pick(sampled, rows)):  # one generator per sample
                        s.pending = []
                        self._emit(s, t, lp, cfg)
                self._run_tools(sampled, cfg)
                for s in sampled:
                    if s.done:  # finished: its blocks go back at once (the prefix index keeps them
                        self.blocks.free_seq(s.sid)  # findable until they are reused)
            return [self._trajectory(s, group_size) for s in sorted(seqs, key=lambda s: s.traj)]
        except BaseException:
            self._release_all()
            raise

    # ---- memory pressure ---------------------------------------------------------------------
    def _make_room(self, live: List[_Seq]) -> List[_Seq]:
        """Appends the tokens of every live sample's next chunk (at most ``prefill_chunk`` of
        its pending tokens) to its blocks, copy-on-write copies done at once; when the pool runs
        out, preempts the most recently started other sample (or this one, if it is alone).
        Only tokens computed in this step enter the blocks (and the prefix index). Returns the
        samples that take part in this step."""
        step: List[_Seq] = []
        for s in live:
            if s.preempted:
                continue
            appended = self.blocks.num_tokens(s.sid)  # tokens already in its blocks
            s.chunk_end = min(len(s.tokens), s.chunk_start + self.prefill_chunk)
            while not s.preempted:
                try:
                    for t in self._keys(s, appended, s.chunk_end):
                        self._copy_blocks(self.blocks.append_tokens([s.sid], [t])[1])
                        appended += 1
                    step.append(s)
                    break
                except RuntimeError as e:
                    if not _out_of_blocks(e):
                        raise
                    victims = [v for v in live if v is not s and not v.preempted]
                    victim = victims[-1] if victims else s
                    self._preempt(victim)
                    if victim in step:
                        step.remove(victim)
        return step

    def _add_prompt(self, toks: List[int], seqs: List[_Seq]):
        """``blocks.add(toks)``, preempting the most recently started running samples while
        the pool cannot hold the prompt."""
        while True:
            try:
                return self.blocks.add(toks)
            except RuntimeError as e:
                running = [v for v in seqs if not v.preempted and not v.done]
                if not _out_of_blocks(e) or not running:
                    raise
                self._preempt(running[-1])

    def _preempt(self, s: _Seq) -> None:
        self.blocks.free_seq(s.sid)
        s.preempted = True
        s.stats["preemptions"] = s.stats.get("preemptions", 0) + 1
        self.stats["preemptions"] = self.stats.get("preemptions", 0) + 1

    def _resume(self, seqs: List[_Seq]) -> None:
        """Re-adds preempted samples, oldest first, while the pool holds them: the leading
        blocks of their tokens still in the prefix index are taken back as they are; the rest
        is recomputed in chunks (``_make_room`` appends each as it is computed)."""
        for s in seqs:
            if not s.preempted:
                continue
            if self.blocks.blocks_for(len(s.tokens)) + 1 > self.blocks.num_free:
                break
            keys = self._keys(s, 0, len(s.tokens) - len(s.pending))
            s.sid, cached = self.blocks.add(keys[:self._cached_prefix(keys)])
            s.chunk_start = cached
            s.preempted = False

    def _cached_prefix(self, keys: List[int]) -> int:
        """How many leading tokens of ``keys`` the prefix index holds (whole blocks)."""
        from ..kernels._block_manager import block_hash
        bs, h, n = self.block_size, 0, 0  # 0: the chain's start (no previous block)
        while n + bs <= len(keys):
            h = block_hash(h, keys[n:n + bs], 0, bs)
            if self.blocks.lookup(h) < 0:
                break
            n += bs
        return n

    def _emit(self, s: _Seq, tok: int, lp: float, cfg: Dict[str, Any]) -> None:
        """Records a sampled token; ends the turn on a stop token or string, the turn's token
        limit or a closed tool call (marked in ``tool_text``; ``_run_tools`` runs it), and the
        trajectory at its token limit."""
        s.tokens.append(tok)
        s.logprobs.append(lp)
        s.loss_mask.append(1)
        if s.positions is not None:
            s.positions.append((s.next_pos,) * 3)
        s.next_pos += 1
        s.new_tokens += 1
        s.pending = [tok]
        s.chunk_start = len(s.tokens) - 1
        stop = tok in cfg["stops"] or s.new_tokens >= cfg["max_new_tokens"]
        if not stop and cfg["stop_strings"]:
            tail = self.tokenizer.decode(s.tokens[max(s.turn_start,
                                                      len(s.tokens) - cfg["stop_window"]):])
            stop = any(x in tail for x in cfg["stop_strings"])
        text = None
        if cfg["tools"] is not None and len(s.turns) + 1 < cfg["max_turns"] and \
                ">" in self.tokenizer.decode([tok]):  # a call can only close on a '>'
            text = self.tokenizer.decode(s.tokens[s.turn_start:])
        s.generated += 1
        cap = cfg["max_trajectory_tokens"]
        if cap is not None and s.generated >= cap:
            s.stats["truncated"] = 1
            s.done = True
            s.pending = []  # nothing follows its last token: its KV is never needed
        elif text is not None and text.rstrip().endswith("</tool_call>"):
            s.tool_text = text
        elif stop:
            s.done = True
            s.pending = []

    def _run_tools(self, batch: Sequence[_Seq], cfg: Dict[str, Any]) -> None:
        """Runs the tool calls that closed this step, all together: one runner call, and for
        vision-language models one vision-tower pass over all the crops; queues each
        sample's observation."""
        todo = [s for s in batch if s.tool_text is not None]
        if not todo:
            return
        results = list(cfg["tools"].run([s.tool_text for s in todo], [s.ctx for s in todo],
                                        [s.session for s in todo]))
        if len(results) != len(todo):
            raise RuntimeError(f"RolloutEngine: `tools.run` returned {len(results)} result(s) "
                               f"for {len(todo)} tool call text(s); it must return one per text")
        feats: Dict[int, Any] = {}
        crops = [(s, r) for s, r in zip(todo, results)
                 if r is not None and r.ok and r.crop is not None]
        if crops and self.vision is not None:
            images, boxes, where = [], [], {}
            for s, r in crops:
                im = s.ctx.images[r.box[0]]
                if id(im) not in where:
                    where[id(im)] = len(images)
                    images.append(im)
                boxes.append((where[id(im)], *r.box[1:]))
            encoded = self.vision.encode(images, boxes)
            self._count_vision(encoded)
            for (s, r), (f, grid) in zip(crops, encoded):
                im = s.ctx.images[r.box[0]]
                if id(im) not in cfg["image_keys"]:  # a tool context's own image
                    cfg["image_keys"][id(im)] = image_key(im)
                feats[id(r)] = (f, grid, crop_key(cfg["image_keys"][id(im)], r.box))
        for s, r in zip(todo, results):
            s.tool_text = None
            self._observe(s, r, feats.get(id(r)), cfg)

    def _observe(self, s: _Seq, result: Any, feat: Optional[tuple], cfg: Dict[str, Any]) -> None:
        """Appends the observation of a tool call (its crop's image tokens, or text) and
        queues it for prefill."""
        from ..tools import ToolResult
        call_start = self._find(s, s.turn_start, "<tool_call>")
        if result is not None and result.ok and result.crop is not None and feat is None:
            result = ToolResult.error("tool_failed", "this model cannot receive images; use a "
                                                     "text tool")
        s.stats["tool_calls"] += 1
        s.stats["tool_errors"] += int(result is None or not result.ok)
        tok = self.tokenizer
        start = len(s.tokens)
        turn = ToolTurn(call=Span(call_start, start))
        grids = []
        if feat is not None:
            f, grid, key = feat
            pre, post = cfg["template"].split("{}", 1)
            head = tok(pre, add_special_tokens=False)["input_ids"]
            obs = head + self.vision.placeholder(grid) + tok(post, add_special_tokens=False)[
                "input_ids"]
            s.images.append(ImageInsert(start + len(head) + 1, f, key))
            s.crops.append(result.crop)
            turn.crop_index, turn.box, grids = len(s.crops) - 1, tuple(result.box), [grid]
        else:
            text = "no tool call found" if result is None else (result.text or "")
            obs = tok(cfg["template"].format(text), add_special_tokens=False)["input_ids"]
            if self.vision is not None:  # text never carries image placeholders
                v = self.vision
                obs = [t for t in obs if t not in (v.image_token_id, v.vision_start_id,
                                                   v.vision_end_id)]
            obs = obs[:cfg["max_observation_tokens"]]
            turn.error = None if result is not None and result.ok else text
        turn.observation = Span(start, start + len(obs))
        s.turns.append(turn)
        if s.positions is not None:
            pos, s.next_pos = self.vision.positions(obs, grids, s.next_pos)
            s.positions += pos
        else:
            s.next_pos += len(obs)
        s.tokens += obs
        s.logprobs += [0.0] * len(obs)
        s.loss_mask += [0] * len(obs)
        s.pending = s.pending + obs
        s.chunk_start = len(s.tokens) - len(s.pending)
        s.turn_start = len(s.tokens)
        s.new_tokens = 0

    def _find(self, s: _Seq, start: int, marker: str) -> int:
        """The token index >= start where ``marker`` (ASCII) first begins in the text of
        ``s.tokens[start:]``, or ``start``. Linear: each token is decoded once, up to the one
        that completes the marker, and only the new text (with an overlap) is searched."""
        text, ends = "", []
        for t in s.tokens[start:]:
            seen = len(text)
            text += self.tokenizer.decode([t])
            ends.append(len(text))
            at = text.find(marker, max(0, seen - len(marker) + 1))
            if at >= 0:
                return start + bisect.bisect_right(ends, at)
        return start

    def _trajectory(self, s: _Seq, group_size: int) -> Trajectory:
        text = self.tokenizer.decode(s.tokens[s.prompt_len:]) if self.tokenizer is not None \
            else ""
        spans = TrajectorySpans(turns=s.turns, prompt_len=s.prompt_len,
                                answer=Span(s.turn_start, len(s.tokens)))
        if self.tokenizer is not None:
            for k, turn in enumerate(s.turns):  # the description written after observation k
                end = s.turns[k + 1].call.start if k + 1 < len(s.turns) else len(s.tokens)
                start = turn.observation.end
                seg = self.tokenizer.decode(s.tokens[start:end])
                tag = f"<{DESCRIPTION_TAG}>"
                if tag in seg and f"</{DESCRIPTION_TAG}>" in seg:
                    d0 = self._find(s, start, tag)
                    d1 = self._find(s, d0, f"</{DESCRIPTION_TAG}>")
                    turn.description = Span(d0, min(end, d1 + 1))
                    turn.description_text = seg.split(tag, 1)[1].split(f"</{DESCRIPTION_TAG}>")[0].strip()
        return Trajectory(token_ids=list(s.tokens), logprobs=[0.0] * s.prompt_len + s.logprobs,
                          crops=s.crops,
                          loss_mask=[0] * s.prompt_len + s.loss_mask, spans=spans,
                          stats=dict(s.stats, new_tokens=sum(s.loss_mask)),
                          group_id=s.traj // group_size, response_text=text)
