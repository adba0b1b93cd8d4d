"""MAPO advantage and semantic verifier, for 512 trajectories x 4 tool turns: the CLIPVerifier
(CLIP ViT-B/32 base-size config, random weights) scoring all 2048 turns in one call, and
mapo_advantages at the token count of the loss benchmark, next to the fused loss itself at that
count (the advantage must be negligible: < 2% of the loss). Also the gradient-variance figures
of MAPO vs GRPO on synthetic rollouts where half the crops miss (8 seeds)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

import mapo_fast
from mapo_fast.tasks import synthetic_tool_rollouts
from mapo_fast.variance import loss_gradient_variance

try:
    from harness import device_info, main as bench_main, measure, write_report
except ImportError:  # imported as bench.bench_advantage
    from .harness import device_info, main as bench_main, measure, write_report

# (trajectories, turns, tokens per trajectory for the advantage, loss H, loss V, verifier size)
SCALES = {"quick": dict(B=64, K=4, T=64, H=128, V=4096, clip="tiny"),
          "cpu": dict(B=512, K=4, T=16, H=512, V=32000, clip="base"),
          "gpu": dict(B=512, K=4, T=32, H=3584, V=152064, clip="base")}
WORDS = ("red blue green yellow small large circle square triangle star digit sign next to the "
         "left right top bottom corner of a an with near says number").split()


def local_tokenizer():
    """A word-level tokenizer built here (no download): <s> text </s>, CLIP-style."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "<unk>", "</s>"] + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=77)


def clip_config(size: str, vocab: int):
    from transformers import CLIPConfig
    if size == "base":  # ViT-B/32 dimensions
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, image_size=224, patch_size=32)
        proj = 512
    else:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, image_size=64, patch_size=16)
        proj = 32
    return CLIPConfig(text_config=dict(vocab_size=vocab, max_position_embeddings=77,
                                       bos_token_id=1, eos_token_id=3, pad_token_id=0, **text),
                      vision_config=vision, projection_dim=proj)


def turns(n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    crops, texts = [], []
    for _ in range(n):
        h, w = (int(v) for v in torch.randint(112, 560, (2,), generator=g))
        crops.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).to(device))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,),
                                                                     generator=g)))
    return texts, crops


def advantage_inputs(B: int, K: int, T: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    group_ids = torch.arange(B) // 8
    scores = torch.rand(B, K, generator=g)
    turn_mask = torch.rand(B, K, generator=g) < 0.8
    token_turn = torch.full((B, T), -1, dtype=torch.int64)
    per = max(1, T // (K + 1))
    for k in range(K):
        token_turn[:, k * per:(k + 1) * per] = torch.where(turn_mask[:, k:k + 1], k, -1)
    return [x.to(device) for x in (rewards, group_ids, scores, turn_mask, token_turn)]


def variance_figures(seeds: int = 8):
    rows = []
    for seed in range(seeds):
        r = synthetic_tool_rollouts(seed)
        out = {}
        for algo in ("grpo", "mapo"):
            adv = mapo_fast.mapo_advantages(r["rewards"], r["group_ids"], r["scores"],
                                            r["turn_mask"], r["token_turn"], algo=algo)
            out[algo] = loss_gradient_variance(r["hidden"], r["weight"], r["targets"], adv,
                                               r["mask"], r["group_ids"], n_resamples=32,
                                               seed=seed)
        rows.append(out)

    def gmean(xs):
        return math.exp(statistics.fmean(math.log(x) for x in xs))

    return {
        "seeds": seeds,
        "relative_var": {a: [r[a]["relative_var"] for r in rows] for a in ("grpo", "mapo")},
        "trace_var": {a: [r[a]["trace_var"] for r in rows] for a in ("grpo", "mapo")},
        "relative_ratio_gmean": gmean([r["mapo"]["relative_var"] / r["grpo"]["relative_var"]
                                       for r in rows]),
        "trace_ratio_gmean": gmean([r["mapo"]["trace_var"] / r["grpo"]["trace_var"]
                                    for r in rows]),
    }


def run(scale: str, device: torch.device, repeats: int, out_dir: Path, tag: str):
    cfg = SCALES[scale]
    info = device_info(device)
    B, K, T = cfg["B"], cfg["K"], cfg["T"]
    tok = local_tokenizer()
    torch.manual_seed(0)
    verifier = mapo_fast.CLIPVerifier.from_config(clip_config(cfg["clip"], len(tok)), tok)
    verifier.model.to(device)
    texts, crops = turns(B * K, device)
    heavy = cfg["clip"] == "base" and device.type == "cpu"
    print(f"  verifier: {B * K} turns ({cfg['clip']} CLIP) ...", flush=True)
    ver = measure("CLIPVerifier.score", lambda: verifier.score(texts, crops), device,
                  repeats=1 if heavy else repeats, warmup=0 if heavy else 1,
                  notes=f"{B * K} turns in one call, batches of {verifier.batch_size}")
    ver.notes += f"; {B * K / (ver.median_ms / 1e3):.0f} turns/s"
    print(f"    {ver.median_ms:.0f} ms", flush=True)

    adv_in = advantage_inputs(B, K, T, device)
    adv = measure("mapo_advantages", lambda: mapo_fast.mapo_advantages(*adv_in), device,
                  repeats=max(repeats, 5), notes=f"B={B}, K={K}, T={T}")
    big_in = advantage_inputs(B, K, 1024, device)
    adv_big = measure("mapo_advantages (T=1024)", lambda: mapo_fast.mapo_advantages(*big_in),
                      device, repeats=max(repeats, 5), notes=f"B={B}, K={K}, T=1024")
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(B, T, cfg["H"], generator=g).to(dtype).to(device).requires_grad_(True)
    weight = (torch.randn(cfg["V"], cfg["H"], generator=g) * cfg["H"] ** -0.5).to(dtype) \
        .to(device).requires_grad_(True)
    targets = torch.randint(0, cfg["V"], (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    adv_t = mapo_fast.mapo_advantages(*adv_in)

    def loss_step():
        loss, _ = mapo_fast.mapo_loss(hidden, weight, targets, adv_t, mask)
        loss.backward()

    def reset():
        hidden.grad = None
        weight.grad = None

    print("  loss at the same batch ...", flush=True)
    loss = measure("mapo_loss fwd+bwd (same batch)", loss_step, device, repeats=repeats,
                   reset=reset, notes=f"N={B * T}, H={cfg['H']}, V={cfg['V']}")
    share = adv.median_ms / loss.median_ms
    print("  gradient variance (synthetic, 8 seeds) ...", flush=True)
    var = variance_figures()
    extra = {"advantage_share_of_loss": share, "variance": var}
    md = (f"**Advantage vs loss at the same batch** ({B} x {T} tokens): the advantage takes "
          f"{100 * share:.3f}% of the fused loss's forward + backward time.\n\n"
          f"**Gradient variance, MAPO vs GRPO** (synthetic rollouts, half the crops miss the "
          f"described object, {var['seeds']} seeds, 32 resampled half-batches each): MAPO's "
          f"relative variance (trace / squared mean-gradient norm) is "
          f"{var['relative_ratio_gmean']:.3f}x GRPO's (geometric mean; per seed "
          f"{', '.join(f'{m / g_:.2f}' for m, g_ in zip(var['relative_var']['mapo'], var['relative_var']['grpo']))}); "
          f"its absolute trace variance is {var['trace_ratio_gmean']:.2f}x GRPO's, because its "
          f"advantages are larger (the semantic term adds magnitude along with signal).")
    results = [{"workload": f"semantic verifier, {B} trajectories x {K} turns", "cases": [ver]},
               {"workload": f"advantage vs loss, {B} x {T} tokens",
                "cases": [adv, adv_big, loss]}]
    desc = ("Semantic verifier and MAPO advantage for a batch of rollouts. The CLIP model has "
            "random weights (only its cost matters here).")
    return write_report(f"advantage-{tag}", "MAPO advantage and semantic verifier", results,
                        info, out_dir, baseline="mapo_fast", description=desc, extra=extra,
                        extra_md=md)


def main(argv=None):
    bench_main(__doc__, SCALES, run, argv)


if __name__ == "__main__":
    main()
