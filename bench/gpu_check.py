"""The first thing to run on any GPU: CUDA-graph decode inside training (graph safety), every
kernel against its torch reference at real sizes, the timings that decide the design (fused vs
chunked loss vs the three-GEMM floor, paged decode vs its KV-read bandwidth floor and vs SDPA on
gathered KV, crops vs torch ``interpolate``, the advantage kernel vs its torch path, a rollout
of a random-weight ~0.5B Qwen2, its decode steps as CUDA graphs vs eager), written to
``<out>/gpu-check-<device>.json`` and ``.md``. ``bench/gpu_run.sh`` runs each section in its
own process with its own time limit (``--append``), then the compile check.

    python bench/gpu_check.py --out DIR          (or: mapo-bench --gpu-check)
    python bench/gpu_check.py --toy --out DIR    toy sizes; on CPU under TRITON_INTERPRET=1

Runs from a source checkout with the machine's own torch and Triton (no install, no download):
the checkout's ``mapo_fast`` is put on the path when the package is not installed, and the
rollout uses the C++ block manager when it is built, else its Python model. Each section is
independent: a failure is recorded (with its traceback) and the next section runs; the exit
status is 1 when any check failed. Each section's report goes to standard output as it ends,
and both files are rewritten after every section (``complete`` says whether every section
has a result), so a run cut short keeps what it measured. The rollout section also checks greedy tokens against
the eager torch path (Hugging Face's ``generate``) on a float32 copy of the same model; the
decode-graph section checks graph-replayed greedy tokens against the engine's eager steps and
counts launches and kernels per decode step both ways.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def bootstrap() -> None:
    """Makes the checkout's ``mapo_fast`` importable when the package is not installed."""
    if importlib.util.find_spec("mapo_fast") is None:
        sys.path.insert(0, str(ROOT))


bootstrap()
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import device_info, device_slug  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    loss: tuple          # tokens N, hidden H, vocabulary V
    paged: tuple         # batch, context, heads, kv_heads, head_dim, page
    prefill: tuple       # sequences, new queries each (a chunked-prefill batch, paged sizes)
    crops: tuple         # boxes, images, image side, output side
    advantage: tuple     # sequences, group size, tokens, turns
    rollout: dict        # Qwen2 config
    prompts: tuple       # prompts, prompt tokens, group size, new tokens


REAL = Sizes(loss=(16384, 3584, 152064), paged=(256, 8192, 28, 4, 128, 16), prefill=(8, 512),
             crops=(64, 4, 4096, 448), advantage=(4096, 8, 2048, 4),
             rollout=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
             prompts=(16, 256, 8, 256))
TOY = Sizes(loss=(40, 48, 160), paged=(3, 80, 6, 2, 32, 16), prefill=(2, 17),
            crops=(3, 2, 96, 28),
            advantage=(24, 4, 40, 3),
            rollout=dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
            prompts=(2, 20, 2, 6))


def time_once(device: torch.device, fn: Callable[[], object]) -> float:
    """Milliseconds of one call (CUDA events on GPU)."""
    if device.type == "cuda":
        from mapo_fast.loss_path import cuda_event_timer
        return cuda_event_timer(fn)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``repeats`` calls after one warm-up."""
    def measure(fn: Callable[[], object]) -> float:
        fn()
        return statistics.median(time_once(device, fn) for _ in range(repeats))
    return measure


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    got, want = got.double(), want.double()
    top = float(want.abs().max()) if want.numel() else 0.0
    return float((got - want).abs().max()) / top if top else float((got - want).abs().max())


# ---- sections ---------------------------------------------------------------------------------
#: the loss's variants checked besides the plain one: a bias, a soft cap with a logit scale, a
#: temperature, and a row subset (targets for every other hidden row, as packed sequences give)
LOSS_VARIANTS = {"plain": {}, "bias_cap_temp_rows": dict(bias=True, cap=30.0, scale=0.8,
                                                         inv_temp=1 / 0.7, rows=True)}


def loss_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Fused and chunked paths against the torch path with fp32 GEMMs (bf16 inputs), plain and
    with bias / soft cap / temperature / rows (``LOSS_VARIANTS``); the plain one's times and the
    three-GEMM floor (logits, d_hidden, d_weight as bf16 cuBLAS GEMMs)."""
    from mapo_fast import loss_path as LP
    from mapo_fast.logprobs import objective_pass
    N, H, V = sz.loss
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, H, generator=g, device=dev).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=g, device=dev) / math.sqrt(H)).to(torch.bfloat16)
    out = {"sizes": dict(N=N, H=H, V=V, dtype="bfloat16"), "errors": {}, "ms": {}}
    for name, var in LOSS_VARIANTS.items():
        args = _loss_args(var, h, V, dev, g)
        for path, errs in _loss_errors(h, w, args).items():
            out["errors"][path if name == "plain" else f"{path}, {name}"] = errs
    b, y, rows, lm, objective = _loss_args({}, h, V, dev, g)
    for path in ("fused", "chunked"):
        out["ms"][path] = measure(lambda p=path: objective_pass(p, h, w, None, y, None, lm,
                                                              objective, True))
    chooser = LP.PathChooser(timer=lambda fn: time_once(dev, fn))
    key = LP.make_key(h, V, N, "-")
    out["auto_choice"] = chooser.choose(key, {p: (lambda p=p: objective_pass(
        p, h, w, None, y, None, lm, objective, True)) for p in ("fused", "chunked")})
    dz = torch.randn(N, V, device=dev, dtype=torch.bfloat16) if N * V <= 4e9 else None
    if dz is not None:
        out["ms"]["three_gemm_floor"] = measure(
            lambda: (h @ w.t(), dz @ w, dz.t() @ h))
    # bf16 rounding of dz (8 bits) bounds the gradients; values and log-probs are fp32 sums
    out["tolerance"] = dict(value=1e-3, logp=1e-3, entropy=1e-3, d_hidden=3e-2, d_weight=3e-2,
                            d_bias=3e-2)
    out["ok"] = all(e[k] <= out["tolerance"][k] for e in out["errors"].values() for k in e)
    return out


def _loss_args(var: Dict, h, V: int, dev: torch.device, g):
    """``(bias, targets, rows, LogitMap, objective)`` of a ``LOSS_VARIANTS`` entry."""
    from mapo_fast.logprobs import LogitMap
    N = h.shape[0]
    rows = torch.arange(0, N, 2, device=dev) if var.get("rows") else None
    n = N if rows is None else rows.numel()
    b = torch.randn(V, generator=g, device=dev).to(h.dtype) if var.get("bias") else None
    y = torch.randint(0, V, (n,), generator=g, device=dev)
    adv = torch.randn(n, generator=g, device=dev)

    def objective(sl, logp, ent):  # token-mean policy-gradient surrogate plus an entropy term
        return (-adv[sl] * logp - 0.01 * ent) / n
    lm = LogitMap(inv_temp=var.get("inv_temp", 1.0), cap=var.get("cap", 0.0),
                  scale=var.get("scale", 1.0))
    return b, y, rows, lm, objective


def _loss_errors(h, w, args) -> Dict[str, Dict[str, float]]:
    """Each path's relative errors against the torch path with fp32 GEMMs."""
    from mapo_fast.kernels import linear_logprob_ref as ref
    from mapo_fast.logprobs import _value_and_grad, objective_pass
    b, y, rows, lm, objective = args
    want = ref.fused_forward_backward(h, w, b, y, lm.inv_temp, _value_and_grad(objective),
                                      rows=rows, cap=lm.cap, scale=lm.scale, gemm=torch.float32)
    out = {}
    for path in ("fused", "chunked"):
        value, logp, ent, grads = objective_pass(path, h, w, b, y, rows, lm, objective, True)
        out[path] = dict(value=rel_err(value, want[2]), logp=rel_err(logp, want[0]),
                         entropy=rel_err(ent, want[1]), d_hidden=rel_err(grads[0], want[3]),
                         d_weight=rel_err(grads[1], want[4]))
        if b is not None:
            out[path]["d_bias"] = rel_err(grads[2], want[5])
        del grads
    return out


def paged_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Decode (one query per sequence) at ``page`` and at 16x that page, the split-KV merge
    (4 splits, forced) and a chunked-prefill batch (``Sizes.prefill``), against the torch
    path; decode time vs reading K and V once at the measured copy bandwidth, and vs SDPA on
    K/V already gathered contiguous."""
    from mapo_fast.kernels import paged_attention as K
    from mapo_fast.kernels import paged_attention_ref as R
    B, ctx, heads, kvh, D, page = sz.paged
    out = {"sizes": dict(batch=B, context=ctx, heads=heads, kv_heads=kvh, head_dim=D),
           "errors": {}, "ms": {}}
    for pg in (page, page * 16):
        q, kc, vc, tables, lens, cu_q = _paged_batch(B, ctx, heads, kvh, D, pg, dev)
        want = R.paged_attention(q, kc, vc, tables, lens, cu_q, D ** -0.5)
        plan = K.plan(q.shape, q.dtype, kvh, pg, tables, lens, cu_q)
        got = K.paged_attention(q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=plan)
        out["errors"][f"page{pg}"] = rel_err(got, want)
        out["ms"][f"triton_page{pg}"] = measure(
            lambda: K.paged_attention(q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=plan))
        out[f"splits_page{pg}"] = plan.splits
        if pg == page:  # the split-KV merge on the same batch (forced: a full batch may not)
            split = K.plan(q.shape, q.dtype, kvh, pg, tables, lens, cu_q, splits=4)
            out["errors"]["split_kv"] = rel_err(K.paged_attention(
                q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=split), want)
            out["ms"]["triton_split_kv4"] = measure(lambda: K.paged_attention(
                q, kc, vc, tables, lens, cu_q, D ** -0.5, plan_=split))
    _prefill_tile(sz, dev, measure, out)
    kv_bytes = 2 * int(lens.sum()) * kvh * D * q.element_size()
    buf = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dev)
    copy_ms = measure(lambda: buf.clone())
    out["copy_gbps"] = 2 * buf.numel() / copy_ms / 1e6  # read + write
    out["ms"]["kv_read_floor"] = kv_bytes / (out["copy_gbps"] * 1e6)
    k = torch.stack([R.gather_kv(kc, t, ctx) for t in tables]).transpose(1, 2)  # [B, kvh, L, D]
    v = torch.stack([R.gather_kv(vc, t, ctx) for t in tables]).transpose(1, 2)
    qd = q[:, :, None, :]
    out["ms"]["sdpa_gathered"] = measure(
        lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True))
    out["tolerance"] = 2e-2  # bf16 products, fp32 softmax sums in another order
    out["ok"] = all(e <= out["tolerance"] for e in out["errors"].values())
    return out


def _prefill_tile(sz: Sizes, dev: torch.device, measure, out: Dict) -> None:
    """The prefill tile against the torch path: ``Sizes.prefill`` sequences, each with ``n``
    new queries at the end of its context (``paged`` sizes); into ``out``."""
    from mapo_fast.kernels import paged_attention as K
    from mapo_fast.kernels import paged_attention_ref as R
    B, ctx, heads, kvh, D, page = sz.paged
    S, n = sz.prefill
    _, kc, vc, tables, lens, _ = _paged_batch(S, ctx, heads, kvh, D, page, dev)
    cu = torch.arange(S + 1, device=dev) * n
    q = torch.randn(S * n, heads, D, device=dev).to(torch.bfloat16)
    want = R.paged_attention(q, kc, vc, tables, lens, cu, D ** -0.5)
    plan = K.plan(q.shape, q.dtype, kvh, page, tables, lens, cu)
    out["errors"]["prefill"] = rel_err(K.paged_attention(q, kc, vc, tables, lens, cu,
                                                         D ** -0.5, plan_=plan), want)
    out["ms"]["triton_prefill"] = measure(
        lambda: K.paged_attention(q, kc, vc, tables, lens, cu, D ** -0.5, plan_=plan))
    out["sizes"]["prefill"] = dict(sequences=S, queries=n, context=ctx)


def _paged_batch(B, ctx, heads, kvh, D, page, dev):
    per_seq = -(-ctx // page)
    g = torch.Generator(device=dev).manual_seed(1)
    kc = torch.randn(B * per_seq + 1, page, kvh, D, generator=g, device=dev).to(torch.bfloat16)
    vc = torch.randn(kc.shape, generator=g, device=dev).to(torch.bfloat16)
    tables = torch.randperm(B * per_seq, generator=g, device=dev).view(B, per_seq)
    lens = torch.full((B,), ctx, device=dev)
    lens[::3] = max(1, ctx - page // 2 - 1)  # not all a multiple of the page
    cu_q = torch.arange(B + 1, device=dev)
    q = torch.randn(B, heads, D, generator=g, device=dev).to(torch.bfloat16)
    return q, kc, vc, tables, lens, cu_q


def crop_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Bicubic antialiased crops of large images: the kernel against the torch path (uint8, at
    most one level apart) and its time against slicing + ``F.interpolate`` per box."""
    from mapo_fast.kernels import crop_zoom as K
    from mapo_fast.kernels import crop_zoom_ref as R
    n, n_img, side, out_side = sz.crops
    g = torch.Generator(device=dev).manual_seed(2)
    images = [torch.randint(0, 256, (3, side, side), generator=g, device=dev,
                            dtype=torch.uint8) for _ in range(n_img)]
    index = [i % n_img for i in range(n)]
    boxes = []
    for i in range(n):
        x1, y1 = (float(v) for v in torch.randint(0, side // 2, (2,), generator=g, device=dev))
        span = side // 8 + (i * 37) % (side // 3)
        boxes.append((x1, y1, min(side, x1 + span), min(side, y1 + span * 0.75)))
    sizes = [(out_side, out_side)] * n
    got = K.crop_and_zoom(images, index, boxes, sizes, "bicubic", True)
    want = R.crop_and_zoom(images, index, boxes, sizes, "bicubic", True)
    diff = max(int((a.int() - b.int()).abs().max()) for a, b in zip(got, want))

    def interpolate():
        for i, (x1, y1, x2, y2) in zip(index, boxes):
            crop = images[i][:, int(y1):math.ceil(y2), int(x1):math.ceil(x2)].float()
            F.interpolate(crop[None], size=(out_side, out_side), mode="bicubic",
                          antialias=True).clamp_(0, 255).round_().to(torch.uint8)

    return {"sizes": dict(boxes=n, images=n_img, side=side, out=out_side),
            "max_level_diff": diff, "ok": diff <= 1,
            "ms": {"triton": measure(lambda: K.crop_and_zoom(images, index, boxes, sizes,
                                                             "bicubic", True)),
                   "torch_path": measure(lambda: R.crop_and_zoom(images, index, boxes, sizes,
                                                                 "bicubic", True)),
                   "interpolate_per_box": measure(interpolate)}}


def advantage_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    from mapo_fast.kernels import advantage as K
    from mapo_fast.kernels import advantage_ref as R
    B, G, T, turns = sz.advantage
    g = torch.Generator(device=dev).manual_seed(3)
    rewards = torch.rand(B, generator=g, device=dev)
    seg = torch.arange(B, device=dev) // G
    sem = torch.rand(B, turns, generator=g, device=dev)
    valid = torch.rand(B, turns, generator=g, device=dev) > 0.2
    token_turn = torch.randint(-1, turns, (B, T), generator=g, device=dev)
    token_turn = torch.where(valid.gather(1, token_turn.clamp_min(0)), token_turn, -1)
    kw = dict(coef=0.5, norm_std=True, eps=1e-6, loo=False, discount=0.7)
    n_groups = B // G
    got = K.advantages(rewards, seg, n_groups, sem, valid, token_turn, max_group=G, **kw)
    want = R.advantages(rewards, seg, n_groups, sem, valid, token_turn, **kw)[0]
    err = float((got - want).abs().max())
    return {"sizes": dict(sequences=B, group=G, tokens=T, turns=turns), "max_abs_err": err,
            "tolerance": 1e-5, "ok": err <= 1e-5,
            "ms": {"triton": measure(lambda: K.advantages(rewards, seg, n_groups, sem, valid,
                                                          token_turn, max_group=G, **kw)),
                   "torch_path": measure(lambda: R.advantages(rewards, seg, n_groups, sem,
                                                              valid, token_turn, **kw))}}


def _workload(sz: Sizes, vocab: int, stride: int) -> tuple:
    """The rollout sections' prompts (``sz.prompts``: count and length; token ids made from
    ``stride``) and the KV blocks of 16 tokens their groups need, twice over."""
    n_prompts, plen, group, new = sz.prompts
    prompts = [[(stride * i + j) % (vocab - 1) + 1 for j in range(plen)]
               for i in range(n_prompts)]
    return prompts, 2 * -(-n_prompts * group * (plen + new) // 16)


def _rollout_setup(sz: Sizes, dev: torch.device):
    """The rollout sections' random-weight Qwen2 (bf16 on GPU), prompts and engine settings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    allocator = "cpp" if importlib.util.find_spec("mapo_fast.kernels._block_manager") \
        else "python"
    torch.manual_seed(4)
    cfg = Qwen2Config(max_position_embeddings=4096, **sz.rollout)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Qwen2ForCausalLM(cfg).to(dev, dtype).eval()
    n_prompts, plen, group, new = sz.prompts
    prompts, blocks = _workload(sz, cfg.vocab_size, stride=7)
    sizes = dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6, prompts=n_prompts,
                 prompt_tokens=plen, group=group, new_tokens=new)
    return model, prompts, dict(block_size=16, num_blocks=blocks, allocator=allocator), sizes


def rollout_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """A random-weight Qwen2 (bf16 on GPU) through ``RolloutEngine`` (its default decode
    mode: CUDA graphs on a GPU): tokens per second, and greedy tokens against Hugging Face."""
    from mapo_fast.rollout.engine import RolloutEngine
    model, prompts, kw, sizes = _rollout_setup(sz, dev)
    eng = RolloutEngine(model, None, **kw)
    group, new = sizes["group"], sizes["new_tokens"]

    def run():
        return eng.generate(prompts, group_size=group, max_new_tokens=new, temperature=1.0,
                            seed=0)
    ms = measure(run)
    generated = len(prompts) * group * new
    check = greedy_check(model, prompts[:2], min(new, 16), kw["allocator"])
    return {"sizes": sizes, "allocator": kw["allocator"], "decode_mode": eng.runner.decode_mode,
            "ms": {"generate": ms}, "new_tokens_per_s": generated / (ms / 1e3),
            "attention_passes": {k: v for k, v in eng.stats.items() if k.startswith("attention")},
            "greedy_equal": check["equal"], "first_divergence": check["first_divergence"],
            "ok": check["equal"]}


def graph_safety_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """CUDA-graph decode inside training, as the trainer runs it: a float32, trainable policy
    rolled out under ``torch.autocast(bfloat16)`` with ``decode_mode="graph"``, then its
    weights changed in place (an optimizer step), then rolled out again. The graph's greedy
    tokens must equal the static path's (the same padded forward, uncaptured) after the
    update, and again outside autocast (graphs of another autocast setting are recaptured); a
    graph that replayed autocast's cached bf16 weights would give the tokens of the weights
    before the update. Without a GPU both engines run the static path (the bookkeeping only).
    The rollout section's model at toy size or Qwen2-0.5B's width with 4 layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mapo_fast.rollout.engine import RolloutEngine
    torch.manual_seed(5)
    shape = dict(sz.rollout, num_hidden_layers=min(4, sz.rollout["num_hidden_layers"]))
    model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=2048, **shape)).to(dev)
    model.train()  # trainable float32 weights: what autocast caches casts of
    fast = "graph" if dev.type == "cuda" else "static"
    n_prompts, plen, group, new = sz.prompts
    prompts, blocks = _workload(sz, shape["vocab_size"], stride=5)
    engines = {m: RolloutEngine(model, None, decode_mode=m, block_size=16, num_blocks=blocks)
               for m in (fast, "static")}

    def greedy(mode: str) -> List[List[int]]:
        return [t.token_ids for t in engines[mode].generate(
            prompts, group_size=group, max_new_tokens=new, temperature=0.0)]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    with autocast:
        before = greedy(fast)
    with torch.no_grad():  # an optimizer step: every weight changed in place
        g = torch.Generator(device="cpu").manual_seed(6)
        for prm in model.parameters():
            prm.add_(0.5 * prm.std() * torch.randn(prm.shape, generator=g).to(dev))
    with autocast:
        after = {m: greedy(m) for m in engines}
    plain = {m: greedy(m) for m in engines}
    diverge = first_divergence(after[fast], after["static"])
    diverge_plain = first_divergence(plain[fast], plain["static"])
    return {"sizes": dict(shape, prompts=n_prompts, prompt_tokens=plen, group=group,
                          new_tokens=new),
            "decode_mode": fast, "greedy_equal": diverge is None and diverge_plain is None,
            "first_divergence": diverge or diverge_plain,
            "update_changed_tokens": before != after["static"],
            "graphs_captured": engines[fast].stats.get("decode_graphs_captured", 0),
            "ok": diverge is None and diverge_plain is None}


#: runtime calls that launch work on the GPU (a replayed CUDA graph is one)
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch")


def decode_graph_section(sz: Sizes, dev: torch.device, measure) -> Dict:
    """Decode steps captured as CUDA graphs (``decode_mode="graph"``; without a GPU the same
    padded static-buffer path uncaptured, ``"static"``) against eager, on the rollout
    section's model and workload: greedy tokens equal (a float32 copy, TF32 off), new tokens
    per second both ways, and per decode step the torch operators dispatched from Python and,
    on a GPU, the launches (runtime calls) and the kernels run."""
    import copy

    from mapo_fast.rollout.engine import RolloutEngine
    model, prompts, kw, sizes = _rollout_setup(sz, dev)
    group, new = sizes["group"], sizes["new_tokens"]
    fast = "graph" if dev.type == "cuda" else "static"
    ms, per_step = {}, {}
    for mode in ("eager", fast):
        eng = RolloutEngine(model, None, decode_mode=mode, **kw)

        def run(e=eng):
            return e.generate(prompts, group_size=group, max_new_tokens=new, temperature=1.0,
                              seed=0)
        ms[mode] = measure(run)
        per_step[mode] = decode_step_counts(eng, run, dev)
    model32 = copy.deepcopy(model).float()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        greedy = {m: [t.token_ids for t in RolloutEngine(model32, None, decode_mode=m, **kw)
                      .generate(prompts, group_size=group, max_new_tokens=min(new, 32),
                                temperature=0.0)]
                  for m in ("eager", fast)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    diverge = first_divergence(greedy[fast], greedy["eager"])
    generated = len(prompts) * group * new
    return {"sizes": sizes, "modes": ["eager", fast],
            "ms": {f"generate, {m}": v for m, v in ms.items()},
            "new_tokens_per_s": {m: round(generated / (v / 1e3), 1) for m, v in ms.items()},
            "per_decode_step": per_step, "greedy_equal": diverge is None,
            "first_divergence": diverge, "ok": diverge is None}


def decode_step_counts(eng, run: Callable[[], object], dev: torch.device,
                       steps: range = range(3, 6)) -> Dict[str, float]:
    """Median counts over decode steps ``steps`` (1-based) of one ``run()``: ``operators``
    (torch operators dispatched from Python) and, on CUDA, ``launches`` (``LAUNCH_CALLS``)
    and ``kernels`` (GPU kernels run). A step that captured a graph is left out."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Operators(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))
    cuda = dev.type == "cuda"
    inner, seen, rows = eng.runner.run, [0], []

    def counted(batch):
        if any(b - a != 1 for _, a, b in batch.chunks):
            return inner(batch)
        seen[0] += 1
        if seen[0] not in steps:
            return inner(batch)
        captured = eng.stats.get("decode_graphs_captured", 0)
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if cuda \
            else nullcontext()
        with prof, Operators() as ops:
            out = inner(batch)
            if cuda:
                torch.cuda.synchronize()
        if eng.stats.get("decode_graphs_captured", 0) == captured:
            row = {"operators": ops.n}
            if cuda:
                events = prof.events()
                row["launches"] = sum(e.name in LAUNCH_CALLS for e in events)
                row["kernels"] = sum(e.device_type == torch.autograd.DeviceType.CUDA
                                     for e in events)
            rows.append(row)
        return out
    eng.runner.run = counted
    try:
        run()
    finally:
        del eng.runner.run  # the class's method again
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}


def greedy_check(model, prompts: List[List[int]], new: int, allocator: str) -> Dict:
    """Greedy tokens of ``RolloutEngine`` against the eager torch path (Hugging Face's
    ``generate``) on a float32 copy of the same model, TF32 off: equal, or the first
    ``(prompt, position)`` where they differ."""
    import copy

    from mapo_fast.rollout.engine import RolloutEngine
    model32 = copy.deepcopy(model).float()
    dev = next(model32.parameters()).device
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        blocks = 2 * -(-len(prompts) * (len(prompts[0]) + new) // 16)
        eng = RolloutEngine(model32, None, block_size=16, num_blocks=blocks, allocator=allocator)
        ours = [t.token_ids[len(p):] for t, p in zip(
            eng.generate(prompts, max_new_tokens=new, temperature=0.0), prompts)]
        with torch.no_grad():
            ref = model32.generate(torch.tensor(prompts, device=dev), do_sample=False,
                                   max_new_tokens=new, min_new_tokens=new,
                                   pad_token_id=0)[:, len(prompts[0]):].tolist()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    diverge = first_divergence(ours, ref)
    return {"equal": diverge is None, "first_divergence": diverge}


def first_divergence(ours: List[List[int]], ref: List[List[int]]) -> Optional[List[int]]:
    """The first ``[sequence, position]`` where two lists of token lists differ (a shorter
    list differs where it ends), or None."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        for j, (x, y) in enumerate(zip(list(a), list(b))):
            if x != y:
                return [i, j]
        if len(a) != len(b):
            return [i, min(len(a), len(b))]
    return None


SECTIONS = {"graph_safety": graph_safety_section, "loss": loss_section,
            "paged_attention": paged_section, "crops": crop_section,
            "advantage": advantage_section, "rollout": rollout_section,
            "decode_graphs": decode_graph_section}


def new_result(toy: bool, dev: torch.device) -> Dict:
    """An empty report: the device, versions, no section yet."""
    import triton
    info = dict(device_info(dev), triton=triton.__version__)
    return {"toy": toy, "info": info, "sections": {}, "complete": False, "ok": True}


def add_section(result: Dict, name: str, section: Dict) -> None:
    """``section`` into ``result``, in ``SECTIONS``' order; ``ok`` and ``complete`` (every
    section has a result) updated."""
    result["sections"][name] = section
    result["sections"] = {n: result["sections"][n] for n in SECTIONS
                          if n in result["sections"]}
    result["ok"] = all(sec["ok"] for sec in result["sections"].values())
    result["complete"] = set(SECTIONS) <= set(result["sections"])


def run(toy: bool, dev: torch.device, repeats: int, only: Optional[List[str]] = None,
        on_section: Optional[Callable[[str, Dict], None]] = None,
        result: Optional[Dict] = None) -> Dict:
    """Every section (or ``only`` these) in turn, added to ``result`` (default: a new
    report); after each, ``on_section(name, result)`` with the result so far."""
    sz = TOY if toy else REAL
    measure = timer(dev, repeats)
    result = new_result(toy, dev) if result is None else result
    names = [n for n in SECTIONS if not only or n in only]
    for name in names:
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = SECTIONS[name](sz, dev, measure)
        except Exception:  # a broken section is recorded; the others still run
            res = {"ok": False, "error": traceback.format_exc()}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        add_section(result, name, res)
        if on_section is not None:
            on_section(name, result)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


def section_markdown(name: str, sec: Dict) -> List[str]:
    lines = [f"## {name}: {'ok' if sec['ok'] else 'FAILED'} ({sec['seconds']} s)", ""]
    if "error" in sec:
        return lines + ["```", sec["error"].strip(), "```", ""]
    lines.append(f"sizes: {sec.get('sizes')}")
    for key in ("errors", "max_level_diff", "max_abs_err", "tolerance", "auto_choice",
                "copy_gbps", "new_tokens_per_s", "allocator", "decode_mode", "per_decode_step",
                "greedy_equal", "first_divergence", "update_changed_tokens",
                "graphs_captured"):
        if key in sec:
            lines.append(f"{key}: {sec[key]}")
    ms = sec.get("ms", {})
    if ms:
        base = min(ms.values())
        lines += ["", "| case | ms | vs fastest |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.3f} | {v / base:.2f}x |" for k, v in ms.items()]
    return lines + [""]


def markdown(result: Dict) -> str:
    info = result["info"]
    missing = [n for n in SECTIONS if n not in result["sections"]]
    state = ("ok" if result["ok"] else "FAILED") + ("" if result["complete"] else
                                                   f" so far (INCOMPLETE: not run: "
                                                   f"{', '.join(missing)})")
    lines = [f"# GPU check — {info.get('device_name')}", "",
             f"torch {info['torch']}, Triton {info.get('triton')}, CUDA {info.get('cuda', '-')}"
             f"{' — TOY SIZES' if result['toy'] else ''}; overall: {state}", ""]
    for name, sec in result["sections"].items():
        lines += section_markdown(name, sec)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="toy sizes (CPU under TRITON_INTERPRET)")
    p.add_argument("--only", action="append", choices=list(SECTIONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, required=True,
                   help="folder for gpu-check-<device>.json and .md (e.g. bench/results)")
    p.add_argument("--append", action="store_true",
                   help="add the sections run to the report already in --out (one process "
                        "per section: bench/gpu_run.sh)")
    p.add_argument("--timed-out", metavar="SECTION", choices=list(SECTIONS),
                   help="record SECTION as stopped by its time limit (--after seconds) in the "
                        "report in --out, and exit 1")
    p.add_argument("--after", type=float, default=None, help="with --timed-out: its limit (s)")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not a.toy:
        p.error("no GPU here: run with --toy (and TRITON_INTERPRET=1) to exercise the command")
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"gpu-check-{device_slug(dev)}{'-toy' if a.toy else ''}"
    previous = json.loads(stem.with_suffix(".json").read_text()) \
        if (a.append or a.timed_out) and stem.with_suffix(".json").exists() else None

    def write(name: str, result: Dict) -> None:
        """Each section as it ends: its report on standard output, and both files rewritten
        with everything so far (a run cut short keeps what it measured)."""
        print("\n".join(section_markdown(name, result["sections"][name])), flush=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(result))
    if a.timed_out:
        result = previous or new_result(a.toy, dev)
        add_section(result, a.timed_out, {"ok": False, "seconds": a.after,
                                          "error": f"stopped by its time limit ({a.after} s)"})
        write(a.timed_out, result)
        return 1
    result = run(a.toy, dev, a.repeats, a.only, on_section=write, result=previous)
    print(f"[gpu-check] wrote {stem}.json and .md; overall "
          f"{'ok' if result['ok'] else 'FAILED'}"
          f"{'' if result['complete'] else ' (not every section has run)'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
