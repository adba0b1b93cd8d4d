"""Multi-turn rollouts, side by side in one run: the naive Hugging Face loop (``generate`` re-run
on the whole history every turn), HF ``generate`` continuing each sample's own KV cache (no
sharing between samples), and ``mapo_fast.RolloutEngine`` (paged KV, one prefill per group,
observations prefilled alone, all samples decoded together). A text-only single-turn variant
adds transformers' continuous-batching ``generate_batch``.

Workload: 4 prompts x G=8 samples, a 1024-token prompt, 3 tool turns (64 generated tokens, then
a 256-token observation) and a final 64-token turn, a ~27M-parameter Qwen2 built from a config
(random weights; sampled at temperature 1). Turn ends are forced at 64 tokens in every case, so
all do the same amount of generation. Reported: wall time, prompt/observation tokens pushed
through the model (prefill), and the peak KV-cache memory.

The image workload (``rollout_image``) is the same shape with a Qwen2.5-VL: a 1024-image-token
prompt, 3 zoom-in calls each answered with a 256-token crop, the naive loop re-running the HF
processor and ``generate`` on the whole history each turn. HF ``generate`` on its own cache is
measured on the text workload only.

The prefill workload: 16 prompts of 200 to 2000 tokens x G=8, one tool turn (32 tokens,
a 64-token observation) and a final 32-token turn, RolloutEngine only: it is where packing the
prompts of a batch into shared forward passes (batched prefill) shows. Every RolloutEngine case
reports its forward passes, the passes that prefilled prompts, and the share of its wall time
spent inside block-allocator calls (each call timed).

``--before DIR`` runs the RolloutEngine cases again, in a subprocess, with the ``mapo_fast``
package installed in ``DIR`` (an older revision: ``git worktree add /tmp/rev <rev>`` and
``pip install --no-deps --target DIR /tmp/rev``), and adds them to the same tables as
"RolloutEngine before"; ``--engine-only`` skips the Hugging Face cases. For an A/B of two
revisions use both (``--engine-only --before DIR``): each revision's engine then runs in a fresh
process (after the Hugging Face cases, the same engine measured 25% slower on CPU: a process
that has run them is not a clean one).

``--vllm PYTHON`` adds vLLM to the three text workloads (multi-turn, single turn, prefill), run
by ``rollout_vllm.py`` with the interpreter of vLLM's own environment (``make vllm-env``: its
CPU build, pinned in ``bench/requirements-vllm.txt``): the same model saved to disk, the same
prompt ids, groups (``n = G``), turn lengths and observation ids, temperature 1, prefix
caching on, the same thread count and glibc malloc settings (``cpu_malloc.environment``);
each multi-turn round re-submits the history, as a vLLM client does. Each row reports output
tokens (checked equal to RolloutEngine's) and prompt tokens computed and cached; vLLM's
start-up is reported apart, not in its rows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

try:
    import rollout_image
    from harness import (CaseResult, device_info, main as bench_main, measure,
                         run_with_package, write_report)
except ImportError:  # imported as bench.bench_rollout
    from . import rollout_image
    from .harness import (CaseResult, device_info, main as bench_main, measure,
                          run_with_package, write_report)

IMAGE = {"quick": dict(prompts=1, group=2, image=224, crop=112, turns=1, new=40, layers=2,
                       hidden=128, vision_hidden=64, vision_layers=1, min_pixels=56 * 56,
                       max_pixels=1280 * 28 * 28),
         "cpu": dict(prompts=4, group=8, image=896, crop=448, turns=3, new=64, layers=8,
                     hidden=512, vision_hidden=256, vision_layers=4, min_pixels=56 * 56,
                     max_pixels=1280 * 28 * 28),
         "gpu": dict(prompts=4, group=8, image=896, crop=448, turns=3, new=64, layers=16,
                     hidden=2048, vision_hidden=1024, vision_layers=8, min_pixels=56 * 56,
                     max_pixels=1280 * 28 * 28)}
SCALES = {"quick": dict(prompts=2, group=2, prompt_len=128, turns=1, new=16, obs=32,
                        layers=2, hidden=128, image=IMAGE["quick"]),
          "cpu": dict(prompts=4, group=8, prompt_len=1024, turns=3, new=64, obs=256,
                      layers=4, hidden=512, image=IMAGE["cpu"]),
          "gpu": dict(prompts=4, group=8, prompt_len=1024, turns=3, new=64, obs=256,
                      layers=16, hidden=2048, image=IMAGE["gpu"])}
# the prefill workload: prompts of min_len..max_len tokens, one tool turn
PREFILL = {"quick": dict(prompts=4, group=2, min_len=20, max_len=200, new=8, obs=8),
           "cpu": dict(prompts=16, group=8, min_len=200, max_len=2000, new=32, obs=64),
           "gpu": dict(prompts=16, group=8, min_len=200, max_len=2000, new=32, obs=64)}
for _k, _v in SCALES.items():
    _v["prefill"] = PREFILL[_k]
VOCAB = 32000
ENGINE = "mapo_fast RolloutEngine"
#: the text workloads' observation (word-level tokenizer: the tags are their own words)
OBS_TEMPLATE = "<tool_response> {} </tool_response>"
VLLM_SCRIPT = Path(__file__).resolve().with_name("rollout_vllm.py")


def make_model(cfg, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    h = cfg["hidden"]
    conf = Qwen2Config(vocab_size=VOCAB + 8, hidden_size=h, intermediate_size=int(h * 2.75),
                       num_hidden_layers=cfg["layers"], num_attention_heads=max(4, h // 64),
                       num_key_value_heads=2, max_position_embeddings=8192,
                       tie_word_embeddings=True)
    model = Qwen2ForCausalLM(conf).eval().to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model


def make_tokenizer():
    """Word-level: token i <-> 'w{i}', plus the tool tags (single tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(VOCAB)}
    for j, t in enumerate(["<pad>", "<tool_call>", "</tool_call>", "<tool_response>",
                           "</tool_response>"]):
        vocab[t] = VOCAB + j
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def workload(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (cfg["prompt_len"],), generator=g).tolist()
               for _ in range(cfg["prompts"])]
    obs = [torch.randint(0, VOCAB, (cfg["obs"],), generator=g).tolist()
           for _ in range(cfg["turns"])]
    return prompts, obs


class _FixedObservation:
    """A tool runner whose k-th call returns the k-th fixed observation text."""

    def __init__(self, obs_texts):
        self.obs_texts = obs_texts

    def run(self, texts, contexts, sessions):
        from mapo_fast.tools import ToolResult
        out = []
        for sess in sessions:
            k = sess.calls
            sess.calls += 1
            out.append(ToolResult(ok=True, text=self.obs_texts[min(k, len(self.obs_texts) - 1)]))
        return out


class _EndTurnAt:
    """Forces `</tool_call>` as the `n`-th token of every turn (turns restart after each
    observation, recognised by its closing tag) and keeps to ordinary words otherwise; one
    ``batch`` call per step (the sampler's batched processor interface). ``prompts``: the
    prompts (a sequence's is recognised by its first tokens)."""

    def __init__(self, n, end_id, obs_end_id, prompts):
        self.n, self.end_id, self.obs_end_id = n, end_id, obs_end_id
        self.prompt_len = {tuple(p[:16]): len(p) for p in prompts}

    def _position(self, tokens) -> int:
        """The position in its turn (from 1) of the token about to be drawn."""
        start = self.prompt_len[tuple(tokens[:16])]
        tail = tokens[start:]
        last = len(tail) - 1 - tail[::-1].index(self.obs_end_id) if \
            self.obs_end_id in tail else -1
        return len(tail) - last

    def batch(self, token_lists, logits):
        force = [i for i, t in enumerate(token_lists) if self._position(t) == self.n]
        out = logits.clone()
        out[:, VOCAB:] = float("-inf")
        if force:  # one step in N
            out[force] = float("-inf")
            out[force, self.end_id] = 0.0
        return out

    def __call__(self, tokens, logits):  # one row: for a --before engine without ``batch``
        return self.batch([tokens], logits[None])[0]


def engine_block_size(device: torch.device) -> int:
    """256-token blocks where flash-attn's paged decode can run (CUDA, flash-attn importable),
    else 16."""
    from mapo_fast.rollout.attention import FLASH_PAGE_MULTIPLE, flash_kvcache_fn
    return FLASH_PAGE_MULTIPLE if device.type == "cuda" and flash_kvcache_fn() else 16


def attention_paths(eng, into: dict) -> None:
    """Adds the engine's forward passes per attention path to ``into``."""
    for k, v in eng.stats.items():
        if k.startswith("attention_"):
            key = k[len("attention_"):-len("_passes")]
            into[key] = into.get(key, 0) + v


def kv_bytes(model, tokens: int) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * tokens * \
        next(model.parameters()).element_size()


class AllocatorClock:
    """Wraps an engine's block allocator: each method call's wall time is added up."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def instrument(eng) -> dict:
    """Clocks ``eng``'s allocator and counts its prompt-prefill passes (this revision's
    ``prefill_passes``, or, for engines before it, the passes with a prompt chunk). Returns
    the live record; ``finish(record, eng, wall_s)`` completes it."""
    holder = getattr(eng, "scheduler", eng)  # the scheduler owns the allocator since it exists
    rec = {"clock": AllocatorClock(holder.blocks), "prompt_passes": 0}
    holder.blocks = rec["clock"]
    if "prefill_passes" not in eng.stats and hasattr(eng, "_forward"):
        forward = eng._forward

        def counted(chunks):
            rec["prompt_passes"] += any(type(c[1]).__name__ == "_Prompt" for c in chunks)
            return forward(chunks)
        eng._forward = counted
    return rec


def finish(rec: dict, eng, wall_s: float) -> dict:
    return {"prefill_tokens": eng.stats["prefill_tokens"],
            "cached_prompt_tokens": eng.stats.get("cached_prompt_tokens", 0),
            "forward_passes": eng.stats["forward_passes"],
            "prefill_passes": eng.stats.get("prefill_passes", rec["prompt_passes"]),
            "allocator_s": rec["clock"].seconds, "allocator_calls": rec["clock"].calls,
            "allocator_share": rec["clock"].seconds / wall_s,
            "peak_kv_mib": eng.stats["peak_blocks"] * eng.block_bytes / 2 ** 20,
            "vision_patches": eng.stats.get("vision_patches", 0)}


def output_tokens(trajs) -> int:
    """Model-written tokens of ``trajs`` (forced turn ends included, observations not)."""
    return sum(sum(t.loss_mask) for t in trajs)


def engine_notes(x: dict) -> str:
    return (f"prefill {x['prefill_tokens']} tokens in {x['forward_passes']} passes "
            f"({x['prefill_passes']} with prompts); allocator {100 * x['allocator_share']:.1f}% "
            f"of wall time ({x['allocator_calls']} calls); peak KV {x['peak_kv_mib']:.0f} MiB")


def engine_case(name: str, fn, device, notes: str = ""):
    """Times ``fn() -> (engine, instrument record, extra)`` once; the result carries the
    engine's counters."""
    box = {}

    def timed():
        t0 = time.perf_counter()
        eng, rec, extra = fn()
        box["x"] = {**finish(rec, eng, time.perf_counter() - t0), **extra}
    r = measure(name, timed, device, repeats=1, warmup=0)
    r.extra = box["x"]
    r.notes = "; ".join(x for x in (notes, engine_notes(r.extra)) if x)
    print(f"    {r.median_ms / 1e3:.1f} s, {r.notes}", flush=True)
    return r


def observation_ids(tok, text: str) -> list:
    """The token ids of observation ``text`` inserted in ``OBS_TEMPLATE``."""
    return tok(OBS_TEMPLATE.format(text), add_special_tokens=False)["input_ids"]


def text_rollout(model, tok, device, prompts, G, N, obs_texts=(), obs_len=0):
    """A RolloutEngine and the ``generate`` keywords of a text workload: one turn of ``N``
    tokens per text of ``obs_texts`` (ended by a forced `</tool_call>`, answered with that
    text, at most ``obs_len`` tokens between the template's tags), then a final turn of ``N``;
    without texts, one turn. The pool holds every sample at its longest."""
    from mapo_fast.rollout import RolloutEngine
    T = len(obs_texts)
    longest = max(map(len, prompts)) + T * (N + obs_len + 2) + N
    eng = RolloutEngine(model, tok, block_size=engine_block_size(device),
                        memory_budget_mb=max(64, 2 * kv_bytes(model, 1) * (len(prompts) * G + 1)
                                             * longest / 2 ** 20))
    kw = dict(group_size=G, max_new_tokens=N, temperature=1.0, seed=0, stop_token_ids=[])
    if T:
        kw.update(tools=_FixedObservation(list(obs_texts)), max_turns=T + 1,
                  max_observation_tokens=obs_len + 2, observation_template=OBS_TEMPLATE,
                  logits_processor=_EndTurnAt(N, VOCAB + 2, VOCAB + 4, prompts))
    return eng, kw


def text_engine(model, tok, device, prompts, G, N, obs_texts, obs_len, paths):
    """RolloutEngine on a text workload (``text_rollout``), instrumented; every turn checked
    to be ``N`` tokens."""
    eng, kw = text_rollout(model, tok, device, prompts, G, N, obs_texts, obs_len)
    rec = instrument(eng)
    trajs = eng.generate(prompts, **kw)
    attention_paths(eng, paths)
    written = output_tokens(trajs)
    want = len(prompts) * G * (len(obs_texts) + 1) * N
    assert written == want, f"turns of other than {N} tokens: {written} tokens, not {want}"
    return eng, rec, {"output_tokens": written}


def multi_turn(model, tok, device, cfg, paths, engine_only):
    """The text multi-turn workload: the naive HF loop, HF generate on its own cache, and
    RolloutEngine."""
    prompts, obs = workload(cfg)
    obs_texts = [tok.decode(o) for o in obs]
    obs_ids = [observation_ids(tok, t) for t in obs_texts]
    rows = []
    if not engine_only:
        for name, own, notes in [("naive HF loop", False, "re-prefills history"),
                                 ("HF generate, own cache", True, "no sharing")]:
            print(f"  rollout: {name} ...", flush=True)
            box = {}
            r = measure(name, lambda: box.setdefault("x", naive_hf(model, device, prompts, obs_ids,
                                                                   cfg, own)),
                        device, repeats=1, warmup=0)
            prefill, kv = box["x"]
            r.extra = {"prefill_tokens": prefill, "peak_kv_mib": kv / 2 ** 20}
            r.notes = f"{notes}; prefill {prefill} tokens; peak KV {kv / 2 ** 20:.0f} MiB"
            print(f"    {r.median_ms / 1e3:.1f} s, {r.notes}", flush=True)
            rows.append(r)
    print("  rollout: mapo_fast RolloutEngine ...", flush=True)
    rows.append(engine_case(ENGINE, lambda: text_engine(model, tok, device, prompts,
                                                        cfg["group"], cfg["new"], obs_texts,
                                                        cfg["obs"], paths),
                            device, "paged KV, shared prompts"))
    return {"workload": f"{len(prompts)} prompts x G={cfg['group']}, {cfg['prompt_len']}-token "
                        f"prompt, {cfg['turns']} tool turns of {cfg['new']} + {cfg['obs']} "
                        f"tokens, final {cfg['new']}", "cases": rows}


def naive_hf(model, device, prompts, obs_ids, cfg, own_cache: bool):
    """HF ``generate`` per sample and turn, on the whole history (``own_cache``: continuing
    the sample's own cache). Returns (prefill tokens, peak KV bytes)."""
    from transformers import DynamicCache
    G, T, N = cfg["group"], cfg["turns"], cfg["new"]
    prefill, peak = 0, 0
    for i, p in enumerate(prompts):
        for g in range(G):
            torch.manual_seed(1000 * i + g)
            hist = list(p)
            cache = DynamicCache() if own_cache else None
            cached = 0
            for k in range(T + 1):
                prefill += len(hist) - cached
                out = model.generate(torch.tensor([hist], device=device), do_sample=True,
                                     top_k=0, max_new_tokens=N, min_new_tokens=N,
                                     pad_token_id=VOCAB, cache=cache,
                                     return_dict_in_generate=True)
                hist = out.sequences[0].tolist()
                if own_cache:  # transformers 5 names it `cache`, earlier `past_key_values`
                    returned = getattr(out, "cache", None) if hasattr(out, "cache") \
                        else out.past_key_values
                    cache = returned if returned is not None else cache
                    cached = len(hist) - 1
                if k < T:
                    hist += obs_ids[k]
            peak = max(peak, len(hist))
    live = G * len(prompts) if own_cache else 1  # own caches all live to the end
    return prefill, kv_bytes(model, peak) * live


def single_turn(model, tok, device, cfg, paths, engine_only):
    """Text single turn: transformers' continuous batching (``generate_batch``) and
    RolloutEngine."""
    prompts, _ = workload(cfg)
    G, N = cfg["group"], cfg["new"]
    rows = []
    if not engine_only:
        def gen_batch():
            from transformers import GenerationConfig
            gc = GenerationConfig(max_new_tokens=N, do_sample=True, top_k=0, eos_token_id=-1,
                                  pad_token_id=VOCAB)
            model.generate_batch(inputs=[p for p in prompts for _ in range(G)],
                                 generation_config=gc, progress_bar=False)
        print("  single turn: transformers generate_batch ...", flush=True)
        try:
            r = measure("transformers generate_batch", gen_batch, device, repeats=1, warmup=1,
                        notes="continuous batching")
            print(f"    {r.median_ms / 1e3:.1f} s", flush=True)
            rows.append(r)
        except Exception as e:  # generate_batch is young and version-dependent
            print(f"    skipped: {type(e).__name__}: {e}", flush=True)

    print("  single turn: mapo_fast RolloutEngine ...", flush=True)
    rows.append(engine_case(ENGINE, lambda: text_engine(model, tok, device, prompts, G, N, (),
                                                        0, paths), device, "shared prompts"))
    return {"workload": f"text single turn: {len(prompts)} x G={G}, {cfg['prompt_len']}-token "
                        f"prompt, {N} new tokens", "cases": rows}


def prefill_inputs(cfg):
    """The prefill workload's prompts (``min_len`` to ``max_len`` tokens) and observation."""
    c = cfg["prefill"]
    g = torch.Generator().manual_seed(1)
    lengths = torch.linspace(c["min_len"], c["max_len"], c["prompts"]).long()
    lengths = lengths[torch.randperm(c["prompts"], generator=g)].tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    obs = [torch.randint(0, VOCAB, (c["obs"],), generator=g).tolist()]
    return prompts, obs


def prefill_heavy(model, tok, device, cfg, paths):
    """The prefill workload: prompts of many lengths, one tool turn, RolloutEngine only."""
    c = cfg["prefill"]
    prompts, obs = prefill_inputs(cfg)
    print("  prefill: mapo_fast RolloutEngine ...", flush=True)
    row = engine_case(ENGINE, lambda: text_engine(model, tok, device, prompts, c["group"],
                                                  c["new"], [tok.decode(obs[0])], c["obs"],
                                                  paths),
                      device, "batched prefill")
    return {"workload": f"prefill: {c['prompts']} prompts of {c['min_len']}-{c['max_len']} "
                        f"tokens x G={c['group']}, 1 tool turn of {c['new']} + {c['obs']} "
                        f"tokens, final {c['new']}", "cases": [row]}


def vllm_specs(cfg, tok) -> list:
    """The three text workloads (multi-turn, single turn, prefill) as ``rollout_vllm.py``
    takes them: RolloutEngine's prompt ids, groups, turn lengths and observation ids."""
    def obs_ids(o):
        return observation_ids(tok, tok.decode(o))
    prompts, obs = workload(cfg)
    G, T, N = cfg["group"], cfg["turns"], cfg["new"]
    c = cfg["prefill"]
    p_prompts, p_obs = prefill_inputs(cfg)
    return [{"name": "multi_turn", "prompts": prompts, "group": G,
             "rounds": [{"new": N, "obs": obs_ids(obs[k])} for k in range(T)] + [{"new": N}]},
            {"name": "single_turn", "prompts": prompts, "group": G, "rounds": [{"new": N}]},
            {"name": "prefill", "prompts": p_prompts, "group": c["group"],
             "rounds": [{"new": c["new"], "obs": obs_ids(p_obs[0])}, {"new": c["new"]}]}]


def run_vllm(python: str, model, tok, cfg) -> dict:
    """``rollout_vllm.py`` in vLLM's environment (``python``) on ``model`` saved to a
    temporary folder, with this process's thread count and malloc settings (those
    ``RolloutEngine(cpu_malloc="auto")`` gave this process: ``cpu_malloc.environment``).
    Returns its result, with the settings given."""
    import copy
    import json
    import subprocess
    import tempfile

    from mapo_fast.rollout import cpu_malloc  # here: a --before package may not have it
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to("cpu", torch.float32).save_pretrained(f"{tmp}/model")
        dtype = "float32" if next(model.parameters()).device.type == "cpu" else "bfloat16"
        spec = {"model": f"{tmp}/model", "threads": threads, "kv_cache_gib": 4, "dtype": dtype,
                "workloads": vllm_specs(cfg, tok)}
        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
        print(f"  vLLM ({python}, {threads} threads): start-up and the text workloads ...",
              flush=True)
        malloc = cpu_malloc.environment()
        subprocess.run([python, str(VLLM_SCRIPT), f"{tmp}/spec.json", f"{tmp}/out.json"],
                       check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads), **malloc))
        return {**json.loads(Path(f"{tmp}/out.json").read_text()), "malloc_env": malloc}


def add_vllm(results, python: str, model, tok, cfg) -> dict:
    """Adds vLLM's rows to the text workloads (multi-turn, single turn, prefill: ``results``
    entries 0, 1 and 3), each checked against RolloutEngine's output tokens. Returns what the
    report's description needs (vLLM's version and start-up)."""
    out = run_vllm(python, model, tok, cfg)
    name = f"vLLM {out['vllm']} (CPU build)"
    for wl, key in zip((results[0], results[1], results[3]),
                       ("multi_turn", "single_turn", "prefill")):
        v = out["workloads"][key]
        ours = next(c for c in wl["cases"] if c.name == ENGINE).extra
        same = v["output_tokens"] == ours["output_tokens"]
        print(f"    {key}: vLLM {v['wall_s']:.1f} s; output tokens vLLM {v['output_tokens']}, "
              f"RolloutEngine {ours['output_tokens']}{'' if same else ' (DIFFER)'}", flush=True)
        wl["cases"].append(CaseResult(
            name, [1e3 * v["wall_s"]], None,
            f"prefix caching; re-submits each turn's history; {v['output_tokens']} output "
            f"tokens; prompt tokens computed {v['computed_tokens']}, cached "
            f"{v['cached_tokens']}", {**v, "same_output_tokens": same}))
    return {"vllm": out["vllm"], "vllm_startup_s": out["startup_s"],
            "vllm_threads": out["threads"], "vllm_malloc_env": out["malloc_env"]}


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str,
        engine_only: bool = False, before: Optional[str] = None, vllm: Optional[str] = None):
    cfg = SCALES[scale]
    info = device_info(device)
    model = make_model(cfg, device)
    tok = make_tokenizer()
    paths = {}  # RolloutEngine forward passes per attention path
    results = [multi_turn(model, tok, device, cfg, paths, engine_only),
               single_turn(model, tok, device, cfg, paths, engine_only),
               run_image(cfg["image"], device, paths, engine_only),
               prefill_heavy(model, tok, device, cfg, paths)]
    if before:
        add_before(results, before, scale, device)
    extra = {"attention_paths": paths}
    if vllm:
        extra.update(add_vllm(results, vllm, model, tok, cfg))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    desc = (f"Qwen2 of {params:.0f}M parameters from a config, random weights, "
            f"{next(model.parameters()).dtype}; one run each (minutes on a CPU). Ratios are "
            "against mapo_fast. RolloutEngine forward passes per attention path: "
            + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())) + ".")
    if vllm:  # noqa: SIM102
        env = " ".join(f"{k}={v}" for k, v in extra["vllm_malloc_env"].items())
        malloc = f"{env} (the malloc settings RolloutEngine gave this process)" if env else \
            "glibc's default malloc settings"
        desc += (f" vLLM {extra['vllm']} (its CPU build, in its own environment, "
                 f"{extra['vllm_threads']} threads, the model saved to disk) started in "
                 f"{extra['vllm_startup_s']:.0f} s, not counted in its rows. Its processes "
                 f"ran with {malloc}.")
    title = "Multi-turn rollouts" if not before else \
        "Multi-turn rollouts: RolloutEngine and the revision in --before"
    return write_report(f"rollout-{tag}", title, results, info, out_dir,
                        baseline=ENGINE, description=desc, extra=extra)


def add_before(results, before: str, scale: str, device: torch.device) -> None:
    """Runs the engine cases with the package in ``before`` (a subprocess) and adds its rows
    to each workload as ``RolloutEngine before``."""
    print(f"  the engine cases again with the package in {before} ...", flush=True)
    old = run_with_package(before, Path(__file__), ["--scale", scale, "--device", str(device),
                                                    "--engine-only"], "before")
    for wl, old_wl in zip(results, old["workloads"]):
        for c in old_wl["cases"]:
            if c["name"] == ENGINE:
                r = CaseResult(f"{ENGINE} before", c["times_ms"], c["peak_extra_mib"],
                               "the package in --before; " + engine_notes(c["extra"]),
                               c["extra"])
                wl["cases"].append(r)


def run_image(cfg, device, paths, engine_only=False):
    """The image workload (``rollout_image``): the naive HF loop and mapo_fast, side by side.
    Adds the engine's attention paths to ``paths``."""
    R = rollout_image
    tok = R.make_tokenizer(cfg)
    model = R.make_model(cfg, tok, device)
    images = R.make_images(cfg)
    per_token = kv_bytes(model.model.language_model, 1)
    rows = []
    if not engine_only:
        print("  image rollout: naive HF loop ...", flush=True)
        box = {}
        r = measure("naive HF loop", lambda: box.setdefault("x", R.naive(
            model, tok, images, cfg, temperature=1.0)), device, repeats=1, warmup=0)
        seqs, c = box["x"]
        kv = per_token * max(map(len, seqs))
        r.extra = {"prefill_tokens": c["prefill_tokens"], "peak_kv_mib": kv / 2 ** 20,
                   "vision_patches": c["vision_patches"]}
        r.notes = (f"PIL + HF processor, re-prefills history; prefill {c['prefill_tokens']} "
                   f"tokens; vision {c['vision_patches']} patches; peak KV {kv / 2 ** 20:.0f} MiB")
        print(f"    {r.median_ms / 1e3:.1f} s, {r.notes}", flush=True)
        rows.append(r)

    def ours():
        box = {}
        trajs, eng = R.ours(model, tok, images, cfg, temperature=1.0,
                            block_size=engine_block_size(device),
                            instrument=lambda e: box.setdefault("rec", instrument(e)))
        attention_paths(eng, paths)
        assert all(len(t.spans.turns) == cfg["turns"] and t.stats["tool_errors"] == 0
                   for t in trajs), "every sample makes its scripted calls"
        return eng, box["rec"], {}
    print("  image rollout: mapo_fast RolloutEngine ...", flush=True)
    rows.append(engine_case(ENGINE, ours, device, "paged KV, shared prompts"))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    tokens = (cfg["image"] // 28) ** 2
    crop_tokens = (cfg["crop"] // 28) ** 2
    desc = (f"image: {cfg['prompts']} prompts x G={cfg['group']}, a {cfg['image']}px image "
            f"({tokens} image tokens), {cfg['turns']} zoom-in turns of {cfg['new']} tokens, "
            f"each returning a {cfg['crop']}px crop ({crop_tokens} tokens), final "
            f"{cfg['new']}; Qwen2.5-VL of {params:.0f}M parameters")
    return {"workload": desc, "cases": rows}


def main(argv=None):
    bench_main(__doc__, SCALES, run, argv, options={
        "--engine-only": dict(action="store_true", help="skip the Hugging Face cases"),
        "--before": dict(default=None, metavar="DIR",
                         help="also run the engine cases with the mapo_fast package in DIR"),
        "--vllm": dict(default=None, metavar="PYTHON",
                       help="also run vLLM on the text workloads with this interpreter (its "
                            "own environment: make vllm-env)")})


if __name__ == "__main__":
    main()
