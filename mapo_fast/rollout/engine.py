"""``RolloutEngine``: batched generation with a paged KV cache shared by the samples of a group.

``generate`` is a loop over ``step()``, three calls: the scheduler picks the step's work and
forks each prompt whose prefill the step completes into its group (``scheduler``); the model
runner runs it in one forward pass and the call's sampler draws the next tokens
(``model_runner``, ``sampler``); the scheduler postprocesses: appends each token, applies what
it did (decided by ``tool_turns``), finishes samples, appends the observations of the tool
calls that closed (run by ``tool_turns``), and gives finished samples' blocks back. One
scheduling path serves prompts and samples: prompts wait in a queue and are prefilled in
chunks, several per forward pass alongside the running samples' decode tokens and observation
chunks, within a token budget (``max_batch_tokens``).

Each prompt is prefilled once per group (leading blocks already in the prefix index are not
recomputed at all), then forked into its G samples, which share the prompt's blocks until they
write (copy-on-write). When the pool runs short, the most recently started samples are
preempted (blocks freed, tokens kept) and resumed when blocks free up: their tokens go back
through the prefix index, so only what was evicted is recomputed.

Vision-language models (Qwen2-VL / Qwen2.5-VL) run through the same path: the forward takes
input embeddings in which each image-pad token holds its image's vision features, computed once
per prompt image (shared by the group) and once per crop, and M-RoPE positions that each
sequence carries on across turns (``rollout.multimodal``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..tools.ops import MAX_PIXELS, MIN_PIXELS
from ..trajectory import OBSERVATION_TEMPLATE, Trajectory
from . import cpu_malloc as cpu_malloc_mod
from . import kv_pool
from .model_runner import ModelRunner, kv_geometry
from .multimodal import VisionAdapter, is_vision_language
from .params import CAPTURE_SIZES, FN, MAX_BATCH_TOKENS, PREFILL_CHUNK, TURN_MARGIN_TOKENS, \
    DecodeParams, SamplingParams, SchedulerParams, ToolParams
from .sampler import Sampler, next_tokens
from .scheduler import Scheduler
from .sequence import attach_images, encode_prompt
from .tool_turns import ToolTurns

Tensor = torch.Tensor


@dataclass(eq=False)
class Request:
    """The settings of one ``generate`` call, which each of its sequences points to
    (``Seq.request``): a step reads what it needs from its sequences, nothing from the engine,
    and nothing of a call outlives it."""
    sampling: SamplingParams
    group_size: int
    sampler: Sampler
    turns: ToolTurns


class RolloutEngine:
    """Batched, group-shared generation over a paged KV cache.

    Args:
        model: a Hugging Face causal LM whose attention goes through transformers' attention
            interface (Qwen2, Llama, Mistral, ...): ``model.model`` (the base) and
            ``model.lm_head``; or a Qwen2-VL / Qwen2.5-VL ``...ForConditionalGeneration``
            (``model.model.visual`` and ``model.model.language_model``).
        tokenizer: its tokenizer (for string and chat prompts, ``eos_token_id``, decoding).
        block_size: tokens per KV block (any positive size; flash-attn, when installed, is
            used on CUDA for multiples of 256).
        num_blocks: blocks in the pool (default: from ``memory_budget_mb``).
        memory_budget_mb: KV-cache memory in MiB when ``num_blocks`` is not given (default:
            ``memory_fraction`` of the device's free memory).
        memory_fraction: the fraction of the device's free memory (CUDA's free memory, or
            the CPU's available memory) the pool takes when neither of the above is given
            (default ``kv_pool.MEMORY_FRACTION``). On CPU the pool is committed block by block
            as rollouts write it, so a large pool costs only what is used (``rollout.kv_pool``).
        min_pixels, max_pixels: vision-language models: the area bounds of the resize rule for
            prompt images and crops (the Qwen2-VL processor's defaults).
        prefill_chunk: most tokens of one sequence in one forward pass (default 2048). Longer
            prompts and observations are prefilled in chunks over several steps, while the
            other samples keep decoding.
        max_batch_tokens: most tokens of one forward pass, all sequences together (default
            8192): decode tokens and observation chunks of running samples first, then prompt
            chunks of as many waiting prompts as fit.
        allocator: ``"cpp"`` (default) or ``"python"``: the block manager's C++ extension or
            its Python model (for comparison).
        decode_mode: how decode steps run (``params.DECODE_MODES``): ``"auto"`` (default;
            CUDA graphs on CUDA, eager elsewhere), ``"eager"``, ``"static"`` (padded to a
            capture size on static buffers, not captured: any device) or ``"graph"``.
        capture_sizes: the batch sizes decode steps are padded up to on the static and graph
            paths (default ``params.CAPTURE_SIZES``); larger decode steps run eagerly.
        cpu_linear: ``"auto"`` (default: oneDNN with prepacked weights for a float32 model
            on CPU, where torch has it), ``"onednn"`` or ``"torch"`` (the model's own linear
            layers; ``kernels.packed_linear_cpu``).
        cpu_malloc: ``"auto"`` (default: for a model on CPU, glibc's malloc keeps freed memory
            for reuse instead of returning it to the system at every step; once per process,
            left alone where the user configured it or another allocator is loaded) or
            ``"keep"`` (``rollout.cpu_malloc``; the outcome is ``malloc_status``).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, block_size: int = 16,
                 num_blocks: Optional[int] = None, memory_budget_mb: Optional[float] = None,
                 memory_fraction: float = kv_pool.MEMORY_FRACTION,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 prefill_chunk: int = PREFILL_CHUNK, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 allocator: str = "cpp", decode_mode: str = "auto",
                 capture_sizes: Sequence[int] = CAPTURE_SIZES, cpu_linear: str = "auto",
                 cpu_malloc: str = "auto"):
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
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"RolloutEngine: `block_size` must be a positive integer, got "
                             f"{block_size!r}")
        schedule = SchedulerParams(max_batch_tokens=max_batch_tokens, prefill_chunk=prefill_chunk)
        decode = DecodeParams(decode_mode, tuple(capture_sizes) if isinstance(
            capture_sizes, (list, tuple)) else capture_sizes)
        self.model, self.tokenizer, self.text_config = model, tokenizer, cfg
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(getattr(emb, "num_embeddings", None) or head.weight.shape[0])
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        #: what ``cpu_malloc`` did to this process's allocator (``cpu_malloc.MallocStatus``)
        self.malloc_status = cpu_malloc_mod.resolve(cpu_malloc, self.device.type)
        layers, kv_heads, head_dim = kv_geometry(cfg)
        #: bytes of one KV block (keys and values of every layer)
        self.block_bytes = 2 * layers * block_size * kv_heads * head_dim * param.element_size()
        self.block_size = block_size
        self.num_blocks = kv_pool.pool_blocks(num_blocks, memory_budget_mb, memory_fraction,
                                              self.block_bytes, self.device)
        self.stats: Dict[str, int] = {"prefill_tokens": 0, "cached_prompt_tokens": 0,
                                      "decode_tokens": 0, "forward_passes": 0,
                                      "prefill_passes": 0}
        self.scheduler = Scheduler(self.num_blocks, block_size, schedule, self.stats, allocator)
        self.runner = ModelRunner(base, head, cfg, self.num_blocks, block_size,
                                  mrope=self.vision is not None, stats=self.stats,
                                  decode=decode, cpu_linear=cpu_linear)

    @property
    def banned_tokens(self) -> Tuple[int, ...]:
        """Token ids the sampler never draws: a vision-language model's image placeholders and
        vision markers (only observations insert them). They are not part of the policy
        (``mapo_fast.policy.PolicyNumerics.banned_tokens``): pass them to the loss."""
        if self.vision is None:
            return ()
        v = self.vision
        banned = [v.image_token_id, v.vision_start_id, v.vision_end_id]
        video = getattr(self.model.config, "video_token_id", None)
        return tuple(sorted(set(banned + ([int(video)] if video is not None else []))))

    @property
    def blocks(self) -> Any:
        """The block allocator (owned by the scheduler)."""
        return self.scheduler.blocks

    @property
    def k_caches(self) -> List[Tensor]:
        return self.runner.k_caches

    @property
    def v_caches(self) -> List[Tensor]:
        return self.runner.v_caches

    def turn_tokens(self, max_new_tokens: int, tools: bool,
                    observation_template: str = OBSERVATION_TEMPLATE,
                    max_observation_tokens: int = 256) -> int:
        """The most KV tokens one turn of one sample can take: its ``max_new_tokens`` and, with
        tools, the longest observation (a crop's image tokens in the template, or a text), and
        ``TURN_MARGIN_TOKENS``."""
        if not tools:
            return max_new_tokens
        obs = max_observation_tokens
        if self.vision is not None:
            obs = max(obs, self.vision.max_image_tokens + 2 + len(self.tokenizer(
                observation_template, add_special_tokens=False)["input_ids"]))
        return max_new_tokens + obs + TURN_MARGIN_TOKENS

    def group_capacity(self, prompt_tokens: int, group_size: int, max_new_tokens: int,
                       max_turns: int, tools: bool = True,
                       observation_template: str = OBSERVATION_TEMPLATE) -> Tuple[int, int]:
        """``(need, have)`` in KV tokens: what one group of ``group_size`` samples of a
        ``prompt_tokens``-token prompt may hold at once (every sample at its longest), and what
        the pool holds. A caller that wants whole groups to run without preemption checks
        ``need <= have``; ``generate`` itself only needs one sample to fit."""
        per_turn = self.turn_tokens(max_new_tokens, tools, observation_template)
        return group_size * (prompt_tokens + max_turns * per_turn), \
            self.num_blocks * self.block_size

    def clear_prefix_cache(self) -> None:
        """Forgets every cached block, and the linear layers' packed weights (``cpu_linear``).
        Call it after the model's weights change (each optimizer step): the cached keys and
        values, and the packs, were computed from the old weights."""
        if self.blocks.num_free != self.num_blocks:
            raise RuntimeError("RolloutEngine.clear_prefix_cache: sequences still hold blocks")
        self.scheduler.reset()
        if self.runner.packed is not None:
            self.runner.packed.drop()

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any], sampling: Optional[SamplingParams] = None,
                 tools: Any = None, *, group_size: int = 1,
                 tool_contexts: Optional[Sequence[Any]] = None,
                 **keywords: Any) -> List[Trajectory]:
        """``len(prompts) x group_size`` trajectories, grouped (prompt ``i``'s samples are
        ``[i * group_size, (i + 1) * group_size)``).

        Args:
            prompts: each a string, token ids, or a chat message list (``{"role", "content"}``
                dicts; content parts ``{"type": "text"}`` or ``{"type": "image", "image":
                uint8 [3, H, W]}``, vision-language models), rendered in Qwen's chat format.
            sampling: how samples draw tokens and when a turn or a trajectory ends
                (``SamplingParams``: ``temperature=0`` is greedy, sample ``j`` draws from its
                own generator seeded ``seed + j`` so results do not depend on batching; a
                truncated trajectory has ``stats["truncated"] = 1``). Default: its fields
                given as keywords (``max_new_tokens=..., temperature=...``), else its defaults.
            tools: tool turns, a ``ToolParams``, or its ``runner`` (a ``ToolRunner``) with its
                other fields as keywords (``max_turns=..., max_tool_calls=...,
                max_observation_tokens=..., observation_template=...``). With a runner and
                ``max_turns > 1`` a turn that closes a ``</tool_call>`` is run and its
                observation inserted (the crop's image tokens for vision-language models, else
                the text; loss mask 0) and prefilled, batched with the other samples'
                decoding. A text-only model is answered with an error when a tool returns a
                crop. None: no tools.
            group_size: samples per prompt (G).
            tool_contexts: ``tool_contexts[i]`` is prompt ``i``'s ``ToolContext`` (default: the
                prompt's images).
            keywords: the fields of ``SamplingParams`` and ``ToolParams`` (the keyword form;
                a field given both ways, or an unknown keyword, is refused by name).

        Vision-language models never sample image placeholders or vision markers. Every
        argument is checked before any work (``ValueError`` naming it). A call that fails
        midway, for whatever reason (a logits processor or a tool that raises, an interrupt),
        gives every KV block back before the error propagates: the engine stays as usable as
        before (its prefix cache is emptied)."""
        sampling, tool_params = self._params(sampling, tools, keywords)
        self._check_call(prompts, group_size, tool_params, tool_contexts)
        if not self.scheduler.idle:  # before the try: the running call keeps its state
            raise RuntimeError(f"{FN}: another generate call is running on this engine (a "
                               "nested call, e.g. from a logits processor or a tool, or a "
                               "concurrent one); an engine runs one call at a time")
        # from here on blocks are held: a failure anywhere gives every block back, so a
        # failed call leaves the engine as usable as before (the prefix cache is emptied)
        try:
            self._start(prompts, group_size, sampling, tool_params, tool_contexts)
            while not self.scheduler.done:
                self.step()
            out = sorted(self.scheduler.samples, key=lambda s: s.index)
            self.scheduler.samples = []
            return [s.trajectory(self.tokenizer, group_size, s.request.turns.described(s))
                    for s in out]
        except BaseException:
            self.scheduler.reset()
            raise
        finally:
            self.runner.tables.release(self.scheduler.drain_finished())

    def _params(self, sampling: Optional[SamplingParams], tools: Any,
                keywords: Dict[str, Any]) -> Tuple[SamplingParams, ToolParams]:
        """The call's ``SamplingParams`` and ``ToolParams``, from the objects or from the
        keyword form (checked once, by the dataclasses)."""
        sampling_keys = {f.name for f in dataclasses.fields(SamplingParams)}
        tool_keys = {f.name for f in dataclasses.fields(ToolParams)} - {"runner"}
        unknown = sorted(set(keywords) - sampling_keys - tool_keys)
        if unknown:
            raise ValueError(f"{FN}: unknown keyword(s) {unknown}; valid: the fields of "
                             f"SamplingParams {sorted(sampling_keys)} and ToolParams "
                             f"{sorted(tool_keys)}")
        given = {k: v for k, v in keywords.items() if k in sampling_keys}
        if sampling is not None and (given or not isinstance(sampling, SamplingParams)):
            raise ValueError(f"{FN}: `sampling` must be a SamplingParams, its fields not given "
                             f"again as keywords; got {type(sampling).__name__} and "
                             f"{sorted(given)}")
        if sampling is None:
            for key in ("stop_token_ids", "stop_strings"):  # lists as tuples; anything
                if isinstance(given.get(key), list):       # else SamplingParams checks
                    given[key] = tuple(given[key])
            if given.get("stop_strings", ()) is None:
                given["stop_strings"] = ()
            sampling = SamplingParams(**given)
        if sampling.stop_strings and self.tokenizer is None:
            raise ValueError(f"{FN}: `stop_strings` must be a list of non-empty strings and the "
                             f"engine needs a tokenizer for them, got {sampling.stop_strings!r}")
        tool_kw = {k: v for k, v in keywords.items() if k in tool_keys}
        if isinstance(tools, ToolParams):
            if tool_kw:
                raise ValueError(f"{FN}: `tools` is a ToolParams; its fields cannot be given "
                                 f"again as keywords, got {sorted(tool_kw)}")
            return sampling, tools
        return sampling, ToolParams(runner=tools, **tool_kw)

    def _check_call(self, prompts: Any, group_size: Any, tools: ToolParams,
                    tool_contexts: Any) -> None:
        """The arguments ``SamplingParams`` and ``ToolParams`` do not cover."""
        if isinstance(prompts, (str, bytes, dict)) or not isinstance(prompts, Sequence):
            raise ValueError(f"{FN}: `prompts` must be a list of prompts, got "
                             f"{type(prompts).__name__} (wrap a single prompt in a list)")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"{FN}: `group_size` must be an int >= 1, got {group_size!r}")
        if tools.runner is not None and self.tokenizer is None:
            raise ValueError(f"{FN}: `tools` need the engine's tokenizer (to read calls and "
                             "insert observations)")
        if tool_contexts is not None and len(tool_contexts) != len(prompts):
            raise ValueError(f"{FN}: `tool_contexts` has {len(tool_contexts)} entries for "
                             f"{len(prompts)} prompts")

    def _start(self, prompts: Sequence[Any], group_size: int, sampling: SamplingParams,
               tools: ToolParams, tool_contexts: Optional[Sequence[Any]]) -> None:
        """Encodes the prompts (checking each fits the pool) and queues them."""
        encoded = [encode_prompt(p, i, self.tokenizer, self.vision, self.vocab_size)
                   for i, p in enumerate(prompts)]
        per_turn = self.turn_tokens(sampling.max_new_tokens, tools.runner is not None,
                                    tools.observation_template, tools.max_observation_tokens)
        capacity = self.num_blocks * self.block_size
        for i, p in enumerate(encoded):
            longest = len(p.tokens) + tools.max_turns * per_turn
            if self.scheduler.need(longest - 1) > self.num_blocks:  # as resuming asks
                raise ValueError(f"{FN}: `prompts[{i}]` ({len(p.tokens)} tokens) plus "
                                 f"{tools.max_turns} turn(s) of up to {per_turn} tokens exceeds "
                                 f"the KV budget of {capacity} tokens")
        req = Request(sampling, group_size, Sampler(sampling, self.banned_tokens),
                      ToolTurns(self.tokenizer, self.vision, sampling, tools, self.stats))
        for i, p in enumerate(encoded):
            p.request = req
            if self.vision is not None:
                attach_images(p, self.vision, self.stats)
                for im, insert in zip(p.raw_images, p.images):  # hashed once
                    req.turns.image_keys[id(im)] = insert.key
            p.ctx = tool_contexts[i] if tool_contexts is not None else None
            if p.ctx is None and tools.runner is not None and p.raw_images:
                from ..tools import ToolContext
                v = self.vision
                p.ctx = ToolContext.for_images(p.raw_images, v.factor, v.min_pixels,
                                               v.max_pixels)
            self.scheduler.add_prompt(p)

    def step(self) -> None:
        """One step: the scheduler picks the work, the runner runs it (one forward pass) and
        the call's sampler draws the next tokens, the scheduler applies them."""
        batch = self.scheduler.schedule()
        if not batch.chunks:
            raise RuntimeError("RolloutEngine: nothing can be scheduled in an empty pool")
        logits = self.runner.run(batch)
        self.scheduler.postprocess(batch, next_tokens(batch.to_sample, logits))
        self.runner.tables.release(self.scheduler.drain_finished())
