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
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    import rollout_image
    from harness import device_info, main as bench_main, measure, write_report
except ImportError:  # imported as bench.bench_rollout
    from . import rollout_image
    from .harness import device_info, main as bench_main, measure, write_report

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
VOCAB = 32000


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
    observation, recognised by its closing tag)."""

    def __init__(self, n, end_id, obs_end_id, prompt_len):
        self.n, self.end_id, self.obs_end_id, self.prompt_len = n, end_id, obs_end_id, prompt_len

    def __call__(self, tokens, logits):
        last_obs = next((i for i in range(len(tokens) - 1, self.prompt_len - 1, -1)
                         if tokens[i] == self.obs_end_id), self.prompt_len - 1)
        if len(tokens) - last_obs == self.n:
            out = torch.full_like(logits, float("-inf"))
            out[self.end_id] = 0.0
            return out
        out = logits.clone()
        out[VOCAB:] = float("-inf")  # keep to ordinary words otherwise
        return out


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


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str):
    from mapo_fast.rollout import RolloutEngine
    cfg = SCALES[scale]
    info = device_info(device)
    model = make_model(cfg, device)
    tok = make_tokenizer()
    prompts, obs = workload(cfg)
    obs_texts = [tok.decode(o) for o in obs]
    template = "<tool_response> {} </tool_response>"  # word-level: tags are their own words
    obs_ids = [tok(template.format(t), add_special_tokens=False)["input_ids"] for t in obs_texts]
    end_id, obs_end = VOCAB + 2, VOCAB + 4
    G, T, N = cfg["group"], cfg["turns"], cfg["new"]
    counts, paths = {}, {}  # paths: RolloutEngine forward passes per attention path

    def naive(own_cache: bool):
        from transformers import DynamicCache
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

    def ours():
        eng = RolloutEngine(model, tok, block_size=engine_block_size(device),
                            memory_budget_mb=max(64, 2 * kv_bytes(model, 1) *
                                                 (len(prompts) * G + 1) *
                                                 (cfg["prompt_len"] + T * (N + cfg["obs"] + 2)
                                                  + N) / 2 ** 20))
        eng.generate(prompts, group_size=G, max_new_tokens=N, temperature=1.0, seed=0,
                     tools=_FixedObservation(obs_texts), max_turns=T + 1, stop_token_ids=[],
                     max_observation_tokens=cfg["obs"] + 2, observation_template=template,
                     logits_processor=_EndTurnAt(N, end_id, obs_end, cfg["prompt_len"]))
        per_block = kv_bytes(model, eng.block_size)
        attention_paths(eng, paths)
        assert eng.stats["decode_tokens"] > 0
        return eng.stats["prefill_tokens"], eng.stats["peak_blocks"] * per_block

    def record(name, fn):
        def timed():
            counts[name] = fn()
        return timed

    rows = []
    for name, fn, notes in [("naive HF loop", lambda: naive(False), "re-prefills history"),
                            ("HF generate, own cache", lambda: naive(True), "no sharing"),
                            ("mapo_fast RolloutEngine", ours, "paged KV, shared prompts")]:
        print(f"  rollout: {name} ...", flush=True)
        r = measure(name, record(name, fn), device, repeats=1, warmup=0)
        prefill, kv = counts[name]
        r.extra = {"prefill_tokens": prefill, "peak_kv_mib": kv / 2 ** 20}
        r.notes = f"{notes}; prefill {prefill} tokens; peak KV {kv / 2 ** 20:.0f} MiB"
        print(f"    {r.median_ms / 1e3:.1f} s, {r.notes}", flush=True)
        rows.append(r)
    results = [{"workload": f"{len(prompts)} prompts x G={G}, {cfg['prompt_len']}-token prompt, "
                            f"{T} tool turns of {N} + {cfg['obs']} tokens, final {N}",
                "cases": rows}]

    # text single-turn variant with transformers' continuous batching
    single = []

    def gen_batch():
        from transformers import GenerationConfig
        gc = GenerationConfig(max_new_tokens=N, do_sample=True, top_k=0, eos_token_id=-1,
                              pad_token_id=VOCAB)
        model.generate_batch(inputs=[p for p in prompts for _ in range(G)],
                             generation_config=gc, progress_bar=False)

    def ours_single():
        eng = RolloutEngine(model, tok, block_size=engine_block_size(device))
        eng.generate(prompts, group_size=G, max_new_tokens=N, temperature=1.0, seed=0,
                     stop_token_ids=[])
        attention_paths(eng, paths)
    for name, fn, notes in [("transformers generate_batch", gen_batch, "continuous batching"),
                            ("mapo_fast RolloutEngine", ours_single, "shared prompts")]:
        print(f"  single turn: {name} ...", flush=True)
        try:
            r = measure(name, fn, device, repeats=1, warmup=1 if "batch" in name else 0,
                        notes=notes)
        except Exception as e:  # generate_batch is young and version-dependent
            print(f"    skipped: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"    {r.median_ms / 1e3:.1f} s", flush=True)
        single.append(r)
    if single:
        results.append({"workload": f"text single turn: {len(prompts)} x G={G}, "
                                    f"{cfg['prompt_len']}-token prompt, {N} new tokens",
                        "cases": single})
    image_rows, image_desc = run_image(cfg["image"], device, counts, paths)
    results.append({"workload": image_desc, "cases": image_rows})
    params = sum(p.numel() for p in model.parameters()) / 1e6
    desc = (f"Qwen2 of {params:.0f}M parameters from a config, random weights, "
            f"{next(model.parameters()).dtype}; one run each (minutes on a CPU). Ratios are "
            "against mapo_fast. RolloutEngine forward passes per attention path: "
            + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())) + ".")
    extra = {name: counts[name] for name in counts}
    return write_report(f"rollout-{tag}", "Multi-turn rollouts", results, info, out_dir,
                        baseline="mapo_fast RolloutEngine", description=desc,
                        extra={**{k: dict(zip(("prefill_tokens", "peak_kv_bytes",
                                               "vision_patches"), v))
                                  for k, v in extra.items()}, "attention_paths": paths})


def run_image(cfg, device, counts, paths):
    """The image workload (``rollout_image``): the naive HF loop and mapo_fast, side by side.
    Adds each case's (prefill tokens, peak KV bytes, vision patches) to ``counts`` and the
    engine's attention paths to ``paths``."""
    R = rollout_image
    tok = R.make_tokenizer(cfg)
    model = R.make_model(cfg, tok, device)
    images = R.make_images(cfg)
    per_token = kv_bytes(model.model.language_model, 1)

    def naive():
        seqs, c = R.naive(model, tok, images, cfg, temperature=1.0)
        counts["image: naive HF loop"] = (c["prefill_tokens"],
                                          per_token * max(map(len, seqs)), c["vision_patches"])

    def ours():
        trajs, eng = R.ours(model, tok, images, cfg, temperature=1.0,
                            block_size=engine_block_size(device))
        attention_paths(eng, paths)
        assert all(len(t.spans.turns) == cfg["turns"] and t.stats["tool_errors"] == 0
                   for t in trajs), "every sample makes its scripted calls"
        counts["image: mapo_fast RolloutEngine"] = (
            eng.stats["prefill_tokens"], per_token * eng.stats["peak_blocks"] * eng.block_size,
            eng.stats["vision_patches"])

    rows = []
    for name, fn, notes in [("naive HF loop", naive, "PIL + HF processor, re-prefills history"),
                            ("mapo_fast RolloutEngine", ours, "paged KV, shared prompts")]:
        print(f"  image rollout: {name} ...", flush=True)
        r = measure(name, fn, device, repeats=1, warmup=0)
        prefill, kv, patches = counts[f"image: {name}"]
        r.extra = {"prefill_tokens": prefill, "peak_kv_mib": kv / 2 ** 20,
                   "vision_patches": patches}
        r.notes = (f"{notes}; prefill {prefill} tokens; vision {patches} patches; "
                   f"peak KV {kv / 2 ** 20:.0f} MiB")
        print(f"    {r.median_ms / 1e3:.1f} s, {r.notes}", flush=True)
        rows.append(r)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    tokens = (cfg["image"] // 28) ** 2
    crop_tokens = (cfg["crop"] // 28) ** 2
    desc = (f"image: {cfg['prompts']} prompts x G={cfg['group']}, a {cfg['image']}px image "
            f"({tokens} image tokens), {cfg['turns']} zoom-in turns of {cfg['new']} tokens, "
            f"each returning a {cfg['crop']}px crop ({crop_tokens} tokens), final "
            f"{cfg['new']}; Qwen2.5-VL of {params:.0f}M parameters")
    return rows, desc


def main(argv=None):
    bench_main(__doc__, SCALES, run, argv)


if __name__ == "__main__":
    main()
