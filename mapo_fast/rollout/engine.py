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

This is the text core of the rollout runtime: multi-turn tool use, images (Qwen2.5-VL, M-RoPE)
and preemption under memory pressure build on it. Until preemption lands, a batch whose worst
case does not fit in the pool is refused before generation starts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..trajectory import Span, Trajectory, TrajectorySpans
from .attention import paged_attention, write_kv

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
    write_kv(step.k_caches[layer], step.v_caches[layer], k, v, step.slots)
    out = paged_attention(query[0].transpose(0, 1).contiguous(), step.k_caches[layer],
                          step.v_caches[layer], step.block_tables, step.context_lens, step.cu_q,
                          scale=scaling)
    return out.unsqueeze(0), None


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
    tokens: List[int]              # prompt + generated so far
    prompt_len: int
    pending: Optional[int] = None  # sampled token whose KV is not yet in the cache
    new_tokens: int = 0
    logprobs: List[float] = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    done: bool = False


class RolloutEngine:
    """Batched, group-shared generation over a paged KV cache.

    Args:
        model: a Hugging Face causal LM whose attention goes through transformers' attention
            interface (Qwen2, Llama, Mistral, ...): ``model.model`` (the base) and
            ``model.lm_head``.
        tokenizer: its tokenizer (for string prompts, ``eos_token_id``, and decoding).
        block_size: tokens per KV block.
        num_blocks: blocks in the pool (default: from ``memory_budget_mb``).
        memory_budget_mb: KV-cache memory when ``num_blocks`` is not given (default 256).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, block_size: int = 16,
                 num_blocks: Optional[int] = None, memory_budget_mb: float = 256.0):
        from ..kernels._block_manager import BlockManager
        cfg = getattr(model, "config", None)
        base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        if cfg is None or base is None or head is None or \
                not hasattr(cfg, "num_hidden_layers") or not hasattr(cfg, "num_key_value_heads"):
            raise ValueError(f"RolloutEngine: `model` ({type(model).__name__}) is not a causal LM "
                             "with .model, .lm_head and a config with num_hidden_layers and "
                             "num_key_value_heads; the engine cannot drive it")
        if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"RolloutEngine: `block_size` must be a power of two >= 16, got "
                             f"{block_size!r}")
        _register()
        self.model, self.tokenizer = model, tokenizer
        self.layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        per_block = 2 * self.layers * block_size * self.kv_heads * self.head_dim * \
            param.element_size()
        if num_blocks is None:
            num_blocks = max(1, int(memory_budget_mb * 2 ** 20) // per_block)
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_blocks, block_size, self.kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                         for _ in range(self.layers)]
        self.v_caches = [torch.zeros_like(self.k_caches[0]) for _ in range(self.layers)]
        self.blocks = BlockManager(num_blocks, block_size)
        self.stats: Dict[str, int] = {"prefill_tokens": 0, "cached_prompt_tokens": 0,
                                      "decode_tokens": 0, "forward_passes": 0}

    # ---- model steps ---------------------------------------------------------------------
    @contextmanager
    def _attention(self, step: _Step):
        global _STEP
        previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = ATTN_IMPL
        _STEP = step
        try:
            yield
        finally:
            _STEP = None
            self.model.config._attn_implementation = previous

    def _forward(self, chunks: Sequence[tuple]) -> Tensor:
        """One forward pass over packed new tokens. ``chunks``: ``(sid, tokens, start)`` per
        sequence, the tokens at positions ``start..`` already appended in the block manager.
        Returns the logits of each chunk's last token, ``[len(chunks), V]`` float32."""
        ids, pos, slots, tables, lens, cu = [], [], [], [], [], [0]
        bs = self.block_size
        for sid, toks, start in chunks:
            table = self.blocks.block_table(sid)
            ids += toks
            pos += range(start, start + len(toks))
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + len(toks))]
            tables.append(table)
            lens.append(start + len(toks))
            cu.append(cu[-1] + len(toks))
        width = max(len(t) for t in tables)
        dev = self.device
        step = _Step(self.k_caches, self.v_caches, torch.tensor(slots, device=dev),
                     torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev),
                     torch.tensor(lens, device=dev), torch.tensor(cu, device=dev))
        with torch.no_grad(), self._attention(step):
            hidden = self.model.model(input_ids=torch.tensor([ids], device=dev),
                                      position_ids=torch.tensor([pos], device=dev),
                                      use_cache=False).last_hidden_state[0]
            last = hidden[torch.tensor(cu[1:], device=dev) - 1]
            logits = self.model.lm_head(last).float()
        self.stats["forward_passes"] += 1
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
        probs = logp.exp().cpu()
        toks = [int(torch.multinomial(probs[i], 1, generator=g)) for i, g in enumerate(gens)]
        return toks, [float(logp[i, t]) for i, t in enumerate(toks)]

    # ---- generation ------------------------------------------------------------------------
    def _encode(self, prompt: Union[str, Sequence[int]], i: int) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"RolloutEngine.generate: `prompts[{i}]` is a string but the "
                                 "engine has no tokenizer")
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        toks = [int(t) for t in prompt]
        if not toks:
            raise ValueError(f"RolloutEngine.generate: `prompts[{i}]` is empty")
        return toks

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]], *, group_size: int = 1,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_token_ids: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None) -> List[Trajectory]:
        """``len(prompts) x group_size`` trajectories, grouped (the samples of prompt ``i`` are
        ``[i * group_size, (i + 1) * group_size)``). A prompt is a string or token ids.
        ``temperature=0`` is greedy. Sample ``j`` of the batch draws from its own generator,
        seeded ``seed + j`` (so results do not depend on batching)."""
        fn = "RolloutEngine.generate"
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{fn}: `group_size` must be an int >= 1, got {group_size!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"{fn}: `max_new_tokens` must be an int >= 1, got {max_new_tokens!r}")
        if temperature < 0 or not (0 < top_p <= 1) or top_k < 0:
            raise ValueError(f"{fn}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{temperature!r}, {top_p!r}, {top_k!r}")
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        capacity = self.num_blocks * self.block_size
        for i, toks in enumerate(encoded):
            if len(toks) + max_new_tokens > capacity:
                raise ValueError(f"{fn}: `prompts[{i}]` ({len(toks)} tokens) plus max_new_tokens "
                                 f"({max_new_tokens}) exceeds the KV budget of {capacity} tokens")
        # no preemption yet: the batch's worst case must fit in the pool
        worst = sum(self.blocks.blocks_for(len(t)) + group_size *
                    self.blocks.blocks_for(len(t) % self.block_size + max_new_tokens)
                    for t in encoded)
        if worst > self.blocks.num_free:
            raise ValueError(f"{fn}: this batch may need {worst} KV blocks at its longest and "
                             f"{self.blocks.num_free} are free; raise num_blocks / "
                             "memory_budget_mb or generate fewer prompts at a time")
        stops = set(stop_token_ids or [])
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if stop_token_ids is None and eos is not None:
            stops.add(int(eos))
        seqs: List[_Seq] = []
        for i, toks in enumerate(encoded):
            head, cached = self.blocks.add(toks)
            self.stats["cached_prompt_tokens"] += cached
            self.stats["prefill_tokens"] += len(toks) - cached
            if cached == len(toks):
                # the whole prompt is cached: recompute its last token for the logits (its KV
                # slot gets the same values it already holds)
                cached -= 1
            logits = self._forward([(head, toks[cached:], cached)])
            for g in range(group_size):
                j = i * group_size + g
                gen = None
                if temperature > 0:
                    gen = torch.Generator().manual_seed((seed if seed is not None else 0) + j)
                tok, lp = self._sample(logits, [gen], temperature, top_k, top_p)
                s = _Seq(self.blocks.fork_seq(head), j, list(toks), len(toks), pending=tok[0],
                         generator=gen)
                self._emit(s, tok[0], lp[0], stops, max_new_tokens)
                seqs.append(s)
            self.blocks.free_seq(head)
        while True:
            live = [s for s in seqs if not s.done]
            if not live:
                break
            slots_ids = [s.sid for s in live]
            _, copies = self.blocks.append_tokens(slots_ids, [s.pending for s in live])
            self._copy_blocks(copies)
            logits = self._forward([(s.sid, [s.pending], len(s.tokens) - 1) for s in live])
            self.stats["decode_tokens"] += len(live)
            toks, lps = [], []
            for row, s in enumerate(live):  # one generator per sample: batching-independent
                t, lp = self._sample(logits[row:row + 1], [s.generator], temperature, top_k,
                                     top_p)
                toks.append(t[0])
                lps.append(lp[0])
            for s, t, lp in zip(live, toks, lps):
                s.pending = t
                self._emit(s, t, lp, stops, max_new_tokens)
        for s in seqs:
            self.blocks.free_seq(s.sid)
        return [self._trajectory(s, group_size) for s in sorted(seqs, key=lambda s: s.traj)]

    def _emit(self, s: _Seq, tok: int, lp: float, stops, max_new_tokens: int) -> None:
        s.tokens.append(tok)
        s.logprobs.append(lp)
        s.new_tokens += 1
        if tok in stops or s.new_tokens >= max_new_tokens:
            s.done = True

    def _trajectory(self, s: _Seq, group_size: int) -> Trajectory:
        n_new = len(s.tokens) - s.prompt_len
        text = self.tokenizer.decode(s.tokens[s.prompt_len:]) if self.tokenizer is not None \
            else ""
        spans = TrajectorySpans(prompt_len=s.prompt_len,
                                answer=Span(s.prompt_len, len(s.tokens)))
        return Trajectory(token_ids=list(s.tokens), logprobs=[0.0] * s.prompt_len + s.logprobs,
                          loss_mask=[0] * s.prompt_len + [1] * n_new, spans=spans,
                          stats={"new_tokens": n_new}, group_id=s.traj // group_size,
                          response_text=text)
