"""Triton kernel for attention over a paged KV cache, for decode and chunked prefill alike (the
math and layout are written out in ``paged_attention_ref.py``, the reference it is tested
against).

Grid: (query tiles, KV heads x head chunks, KV splits). A tile is up to ``block_q``
consecutive queries of one sequence times ``hp`` of the query heads that share one KV head
(GQA; ``hp`` = the whole group unless the group is taller than the tile, then the group is
covered in chunks), packed into the ``BLOCK_M`` rows of the matrix product, so each K/V element
is read once per tile rather than once per query head. The program walks its sequence's keys
``BLOCK_N`` at a time (independent of the page size: each key's page comes from the block
table), applies the causal mask from the queries' absolute positions and keeps an online
softmax in fp32; keys after the tile's last query are never read. With ``SPLIT`` (few tiles:
decode of a small batch), each split covers one range of keys and writes its unnormalised
partial result, merged by ``combine``.

The launch plan (tile table, split count) is built by ``plan`` with device tensor operations
and host shape arithmetic only, once per forward pass; the per-layer launch performs no host
synchronisation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import interpreting
from ._compile import TRITON_TYPES, CompileCase, Config, ptr, signature

Tensor = torch.Tensor

#: Rows of the packed (query x head) tile: decode (about one query per sequence) or prefill
#: (fp32 tiles are a quarter as tall: their operands take twice the registers, and tiles of
#: 32 rows spill under Triton 3.6 or 3.9 in their split or unaligned variants).
DECODE_M = 16
#: The tallest tile per (dtype, padded head dimension) that compiles without spills (checked
#: by ``compile_check`` under Triton 3.6 and 3.9); a taller GQA group is covered in chunks of
#: heads.
_HALF_M = {16: 64, 32: 64, 64: 64, 128: 64, 256: 16}
_FP32_M = {16: 16, 32: 16, 64: 16, 128: 16, 256: 16}
MAX_M = {torch.bfloat16: _HALF_M, torch.float16: _HALF_M, torch.float32: _FP32_M}
BLOCK_MS = (16, 32, 64, 128)


def block_m_max(dtype: torch.dtype, head_dim: int) -> int:
    block_d = max(16, triton.next_power_of_2(head_dim))
    assert block_d in MAX_M[dtype], f"head dimension {head_dim}: at most 256"
    return MAX_M[dtype][block_d]


INTERPRETER_N = 16
#: At most this many KV splits; a split covers at least ``MIN_SPLIT_TILES`` key tiles.
MAX_SPLITS, MIN_SPLIT_TILES = 16, 4
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


#: compute capabilities whose configurations differ (``config``'s ``capability``)
CAPABILITIES = (90, 80)


def config(dtype: torch.dtype, head_dim: int, block_m: int, capability: int = 90) -> Config:
    """Tile sizes, chosen with ``compile_check`` (no spills at head dimension 128 on sm_90 or
    sm_80, integer arguments aligned or not): ``BLOCK_N`` keys per iteration, fewer for
    taller tiles, fp32 and heads wider than 128; four warps for narrow heads (eight for a
    half-precision decode tile of a head of 64: four spill under Triton 3.6); one pipeline
    stage for half-precision tiles of 64 rows before sm_90 (``capability``: 80 for sm_80),
    where two spill; three for fp32 heads of 128 before sm_90, where two spill under Triton
    3.6 (both Triton 3.6 and 3.9 are checked)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreting():
        return Config(dict(BLOCK_M=block_m, BLOCK_N=INTERPRETER_N, BLOCK_D=block_d), 1)
    if block_d > 128:
        block_n = 16
    elif block_m == DECODE_M:
        block_n = 64 if dtype != torch.float32 else 16
    else:
        block_n = 16
    if block_d > 128 or (capability < 90 and block_m >= 64 and dtype != torch.float32):
        stages = 1
    elif capability < 90 and dtype == torch.float32 and block_d == 128:
        stages = 3
    else:
        stages = 2
    narrow = block_d <= 64 and not (dtype != torch.float32 and block_m == DECODE_M)
    return Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d),
                  num_warps=4 if narrow else 8, num_stages=stages)


@triton.jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, ml_ptr, tables_ptr,
                            lens_ptr, cu_q_ptr, tile_seq_ptr, tile_start_ptr, scale, page,
                            group, hp, chunks, block_q, keys_per_split, total_q, heads,
                            stride_qn, stride_qh, stride_kb, stride_kt, stride_kh,
                            stride_vb, stride_vt, stride_vh, stride_on, stride_oh, stride_tb,
                            HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
                            UPCAST: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1) // chunks
    hc = tl.program_id(1) % chunks                   # which hp heads of the group
    split = tl.program_id(2)
    s = tl.load(tile_seq_ptr + tile)
    if s >= 0:  # the plan's table has spare entries (-1)
        i0 = tl.load(tile_start_ptr + tile)          # first query of the tile, within the seq
        q_start = tl.load(cu_q_ptr + s)
        n_q = tl.load(cu_q_ptr + s + 1) - q_start
        L = tl.load(lens_ptr + s)
        r = tl.arange(0, BLOCK_M)
        qi = i0 + r // hp                            # row r: query qi, head of the group
        hg = hc * hp + r % hp                        # hc * hp + r % hp
        head = kvh * group + hg
        m_ok = (r < block_q * hp) & (qi < n_q) & (hg < group)
        pos = L - n_q + qi                           # absolute positions of the queries
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_row = (q_start + qi).to(tl.int64)
        q = tl.load(q_ptr + q_row[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: multiply in fp32 there
            q = q.to(tl.float32)
        hi = tl.minimum(L - n_q + i0 + block_q, L)   # keys after the last query: never read
        lo = 0
        if SPLIT:
            lo = split * keys_per_split
            hi = tl.minimum(hi, lo + keys_per_split)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        table = tables_ptr + s.to(tl.int64) * stride_tb
        for n0 in range(lo, hi, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            t_ok = t < hi
            blk = tl.load(table + t // page, mask=t_ok, other=0).to(tl.int64)
            slot = (t % page).to(tl.int64)
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + (blk * stride_kb + slot * stride_kt + kvh * stride_kh)[:, None]
                        + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (blk * stride_vb + slot * stride_vt + kvh * stride_vh)[:, None]
                        + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = sc * scale
            allowed = (t[None, :] <= pos[:, None]) & t_ok[None, :] & m_ok[:, None]
            sc = tl.where(allowed, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            pr = tl.exp(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        o_mask = m_ok[:, None] & d_ok[None, :]
        if SPLIT:  # partials [splits, total_q, heads, D] and (m, l) [2, splits, total_q, heads]
            at = (split * total_q + q_start + qi).to(tl.int64) * heads + head
            tl.store(part_ptr + at[:, None] * BLOCK_D + d[None, :], acc, mask=o_mask)
            tl.store(ml_ptr + at, m_i, mask=m_ok)
            tl.store(ml_ptr + tl.num_programs(2).to(tl.int64) * total_q * heads + at, l_i,
                     mask=m_ok)
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + q_row[:, None] * stride_on + head[:, None] * stride_oh
                     + d[None, :], o.to(out_ptr.dtype.element_ty), mask=o_mask)


@dataclass
class Plan:
    """A forward pass's launch plan, shared by its layers: ``tile_seq`` / ``tile_start``
    ``[max_tiles]`` int32 device tensors (-1: spare), ``block_q`` queries x ``hp`` heads per
    tile, ``chunks`` tiles per GQA group, ``splits`` and ``keys_per_split``, the
    configuration, and the int32 metadata."""
    tile_seq: Tensor
    tile_start: Tensor
    block_q: int
    hp: int
    chunks: int
    splits: int
    keys_per_split: int
    cfg: Config
    tables: Tensor
    lens: Tensor
    cu_q: Tensor


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device (90 elsewhere: the default configurations)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4


def tile_rows(dtype: torch.dtype, head_dim: int, group: int, decode: bool) -> int:
    """``BLOCK_M`` of a launch: for decode the GQA group's query heads rounded up to a power
    of two (at least ``DECODE_M``), for prefill chunks the tallest tile the head fits."""
    tallest = block_m_max(dtype, head_dim)
    return min(tallest, max(DECODE_M, triton.next_power_of_2(group))) if decode else tallest


#: attention shapes ``(query heads, KV heads, head dim)`` of the models the default compile
#: check covers: every configuration ``plan`` launches for them (decode and prefill, split
#: or not, bf16 and fp32) is in it
MODEL_SHAPES = {"Qwen2-0.5B": (14, 2, 64), "Qwen2.5-VL-3B": (16, 2, 128),
                "Qwen2.5-VL-7B": (28, 4, 128)}


def _launched(dtype: torch.dtype, head_dim: int, block_m: int) -> bool:
    """Whether ``plan`` launches this tile for a model of ``MODEL_SHAPES`` (bf16 or fp32)."""
    return dtype != torch.float16 and any(
        hd == head_dim and block_m == tile_rows(dtype, hd, heads // kv, decode)
        for heads, kv, hd in MODEL_SHAPES.values() for decode in (True, False))


def plan(q_shape: torch.Size, dtype: torch.dtype, kv_heads: int, page: int,
         block_tables: Tensor, context_lens: Tensor, cu_q: Tensor,
         splits: Optional[int] = None) -> Plan:
    """The launch plan from shapes (host) and device tensors (no host synchronisation):
    tile ``i`` of the table belongs to the sequence whose tile range holds ``i``
    (``searchsorted`` over the cumulative tile counts). ``splits`` overrides the KV split
    count (default: enough programs for two waves when there are few tiles)."""
    total_q, heads, head_dim = q_shape
    group = heads // kv_heads
    S = context_lens.shape[0]
    decode = total_q <= S  # about one query per sequence
    block_m = tile_rows(dtype, head_dim, group, decode)
    hp = min(group, block_m)                          # heads of a group per tile
    chunks = triton.cdiv(group, hp)
    block_q = block_m // hp
    dev = cu_q.device
    cfg = config(dtype, head_dim, block_m, _capability(dev))
    cu = cu_q.to(torch.int32)
    counts = (cu[1:] - cu[:-1] + block_q - 1) // block_q
    ends = torch.cumsum(counts, 0).to(torch.int32)
    max_tiles = triton.cdiv(total_q, block_q) + S
    idx = torch.arange(max_tiles, device=dev, dtype=torch.int32)
    seq = torch.searchsorted(ends, idx, right=True).to(torch.int32)
    first = (ends - counts)[seq.clamp(max=max(S - 1, 0))] if S else idx
    tile_seq = torch.where(seq < S, seq, torch.full_like(seq, -1))
    tile_start = ((idx - first) * block_q).to(torch.int32)
    max_keys = block_tables.shape[1] * page
    if splits is None:
        programs = max_tiles * kv_heads * chunks
        want = triton.cdiv(2 * _sm_count(dev), max(programs, 1))
        splits = min(MAX_SPLITS, want,
                     max(1, max_keys // (MIN_SPLIT_TILES * cfg.blocks["BLOCK_N"])))
    splits = max(1, splits)
    bn = cfg.blocks["BLOCK_N"]
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, splits), bn) * bn
    return Plan(tile_seq, tile_start, block_q, hp, chunks, splits, keys_per_split, cfg,
                block_tables.to(torch.int32).contiguous(), context_lens.to(torch.int32),
                cu)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_q: Tensor, scale: float,
                    out: Optional[Tensor] = None, plan_: Optional[Plan] = None) -> Tensor:
    """Same arguments as ``paged_attention_ref.paged_attention``; ``out`` may supply the output
    buffer and ``plan_`` a plan from ``plan`` (built here when None). Any page size; the head
    dimension is padded to a power of two >= 16."""
    total_q, heads, head_dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert v_cache.shape == k_cache.shape and q.dtype in DTYPES
    if out is None:
        out = torch.empty_like(q)
    if total_q == 0:
        return out
    p = plan_ or plan(q.shape, q.dtype, kv_heads, page, block_tables, context_lens, cu_q)
    bd = p.cfg.blocks["BLOCK_D"]
    if p.splits > 1:
        part = torch.empty(p.splits, total_q, heads, bd, dtype=torch.float32, device=q.device)
        ml = torch.empty(2, p.splits, total_q, heads, dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    _paged_attention_kernel[(p.tile_seq.shape[0], kv_heads * p.chunks, p.splits)](
        q, k_cache, v_cache, out, part, ml, p.tables, p.lens, p.cu_q, p.tile_seq, p.tile_start,
        float(scale), page, heads // kv_heads, p.hp, p.chunks, p.block_q, p.keys_per_split,
        total_q, heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        p.tables.stride(0), head_dim, **p.cfg.blocks, **_flags(q.dtype, p.splits > 1),
        num_warps=p.cfg.num_warps, num_stages=p.cfg.num_stages)
    if p.splits > 1:
        combine(part, ml, head_dim, out)
    return out


def _flags(dtype: torch.dtype, split: bool) -> dict:
    return dict(IEEE=dtype == torch.float32, SPLIT=split,
                UPCAST=interpreting() and dtype == torch.bfloat16)


def combine(part: Tensor, ml: Tensor, head_dim: int, out: Tensor) -> None:
    """Merges the splits' partial results by log-sum-exp: ``out = sum_s e^(m_s - m) acc_s /
    sum_s e^(m_s - m) l_s`` (splits that saw no key have ``m = -inf``, ``l = 0``)."""
    m, l_ = ml[0], ml[1]
    top = m.amax(0)
    w = torch.exp(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))
    den = (w * l_).sum(0)
    num = (w[..., None] * part[..., :head_dim]).sum(0)
    out.copy_((num / torch.where(den > 0, den, torch.ones_like(den))[..., None]).to(out.dtype))


def compile_cases() -> List[CompileCase]:
    cases = []
    for dtype in DTYPES:
        p = ptr(dtype)
        types = dict(q_ptr=p, k_ptr=p, v_ptr=p, out_ptr=p, part_ptr=ptr(torch.float32),
                     ml_ptr=ptr(torch.float32), tables_ptr="*i32", lens_ptr="*i32",
                     cu_q_ptr="*i32", tile_seq_ptr="*i32", tile_start_ptr="*i32",
                     scale="fp32")
        sig = signature(_paged_attention_kernel, types)
        for head_dim in (64, 128, 256):
            for block_m in (m for m in BLOCK_MS if m <= block_m_max(dtype, head_dim)):
                for split in (False, True):
                    default = _launched(dtype, head_dim, block_m)
                    cfgs = {cap: config(dtype, head_dim, block_m, cap) for cap in CAPABILITIES}
                    same = len(set(map(repr, cfgs.values()))) == 1
                    for cap, cfg in list(cfgs.items())[:1] if same else cfgs.items():
                        cases.append(CompileCase(
                            _paged_attention_kernel,
                            f"{TRITON_TYPES[dtype]} D{head_dim} M{block_m}"
                            f"{' split' if split else ''}",
                            sig, dict(cfg.blocks, **_flags(dtype, split)),
                            cfg.num_warps, cfg.num_stages, default=default,
                            wgmma=dtype != torch.float32 and block_m >= 64,
                            targets=() if same else (cap,)))
    return cases
