"""The image workload of the rollout benchmark: a tiny Qwen2.5-VL from a config, chat prompts
with one image each, zoom-in tool turns whose crops come back as image tokens.

Both cases do the same work: every turn the model writes ``new`` tokens, free ones first and
then a scripted ``image_zoom_in_tool`` call (forced token by token, so the turn closes at its
last token), and the last turn is free. The free tokens are sampled (temperature 1; greedy in
the tests) from a vocabulary without tags or angle brackets, so they never open a call.

- naive: what agent loops do today, per sample and per turn: PIL crop + resize and the HF
  ``Qwen2VLImageProcessor`` on every image of the history, then HF ``generate`` on the whole
  history (vision tower and prefill redone each turn);
- mapo_fast: ``RolloutEngine`` with the built-in ``ToolRunner`` (one prefill and one vision
  pass per prompt for its group, each crop encoded once, paged KV kept across turns).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from mapo_fast.trajectory import OBSERVATION_TEMPLATE

try:
    from harness import CaseResult, measure
except ImportError:  # imported as bench.rollout_image
    from .harness import CaseResult, measure

TEMPLATE = OBSERVATION_TEMPLATE


def call_text(box: Sequence[int]) -> str:
    return ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
            f'[{box[0]}, {box[1]}, {box[2]}, {box[3]}]}}}}</tool_call>')


def crop_boxes(cfg: Dict) -> List[Tuple[int, int, int, int]]:
    """One box per tool turn, ``crop`` pixels square, spread over the image."""
    side, crop, turns = cfg["image"], cfg["crop"], cfg["turns"]
    boxes = []
    for k in range(turns):
        x = (k * (side - crop)) // max(1, turns - 1) if turns > 1 else 0
        y = ((turns - 1 - k) * (side - crop)) // max(1, turns - 1) if turns > 1 else 0
        boxes.append((x, y, x + crop, y + crop))
    return boxes


def make_tokenizer(cfg: Dict):
    from mapo_fast.tasks.tokenizer import build_tokenizer
    corpus = [call_text(b) for b in crop_boxes(cfg)] * 50 + \
        ["Find the small object and say what it is. <description>a small red square on grey"
         "</description><answer>a red square</answer>"] * 50
    return build_tokenizer(corpus, vocab_size=512)


def make_model(cfg: Dict, tok, device: torch.device):
    """The trainer's tiny Qwen2.5-VL (``tiny_vl_model``) at the workload's sizes."""
    from mapo_fast.trainer.config import ModelConfig
    from mapo_fast.trainer.model import tiny_vl_model
    h = cfg["hidden"]
    sizes = ModelConfig(hidden_size=h, layers=cfg["layers"], heads=max(4, h // 64), kv_heads=2,
                        intermediate_size=int(h * 2.75), vision_hidden_size=cfg["vision_hidden"],
                        vision_depth=cfg["vision_layers"])
    model = tiny_vl_model(sizes, tok, seed=0, max_positions=8192).eval().to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model


def make_images(cfg: Dict) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, cfg["image"], cfg["image"]), dtype=torch.uint8,
                          generator=g) for _ in range(cfg["prompts"])]


def chat(image: torch.Tensor) -> List[Dict]:
    return [{"role": "user", "content": [
        {"type": "image", "image": image},
        {"type": "text", "text": "Find the small object and say what it is."}]}]


class Script:
    """The per-sample logits edit both cases share: in tool turn k, ``new - len(call_k)`` free
    tokens, then call k forced; the turn after the last call is all free. A turn is counted
    by the ``</tool_response>`` tokens before it."""

    def __init__(self, tok, cfg: Dict, prompt_len: int):
        self.end = tok.convert_tokens_to_ids("</tool_response>")
        self.calls = [tok(call_text(b), add_special_tokens=False)["input_ids"]
                      for b in crop_boxes(cfg)]
        self.new, self.prompt_len = cfg["new"], prompt_len
        if max(map(len, self.calls)) > self.new:
            raise ValueError(f"a tool call takes {max(map(len, self.calls))} tokens, more than "
                             f"the {self.new} new tokens of a turn")
        self.banned = torch.tensor([i for i in range(len(tok))
                                    if any(c in tok.decode([i]) for c in "<>")
                                    or i in tok.all_special_ids])

    def __call__(self, tokens: List[int], logits: torch.Tensor) -> torch.Tensor:
        turn = tokens.count(self.end)
        start = len(tokens) - tokens[::-1].index(self.end) if turn else self.prompt_len
        i = len(tokens) - start - (self.new - len(self.calls[turn])) if turn < len(self.calls) \
            else -1
        if i >= 0:
            out = torch.full_like(logits, float("-inf"))
            out[self.calls[turn][i]] = 0.0
            return out
        out = logits.clone()
        out[self.banned.to(out.device)] = float("-inf")
        return out


def _hf_processor(script: Script):
    from transformers import LogitsProcessor

    class _Rows(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return torch.stack([script(row.tolist(), s) for row, s in zip(input_ids, scores)])
    return _Rows()


def naive(model, tok, images: List[torch.Tensor], cfg: Dict, temperature: float,
          seed: int = 0) -> Tuple[List[List[int]], Dict[str, int]]:
    """Each sample alone: every turn re-processes all its images (PIL + HF processor) and
    re-runs ``generate`` on the whole history. Returns the token ids and counters."""
    from PIL import Image
    import transformers
    from transformers import LogitsProcessorList

    from mapo_fast.rollout.multimodal import VisionAdapter, render_chat
    from mapo_fast.tools.ops import smart_resize
    dev = next(model.parameters()).device
    adapter = VisionAdapter(model, min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    # the PIL-backed processor (the one transformers uses without torchvision)
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or \
        transformers.Qwen2VLImageProcessor
    proc = cls(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"],
                                 patch_size=14, merge_size=2, temporal_patch_size=2)
    pre, post = TEMPLATE.split("{}")
    pre_ids = tok(pre, add_special_tokens=False)["input_ids"]
    post_ids = tok(post, add_special_tokens=False)["input_ids"]
    out, counts = [], {"prefill_tokens": 0, "vision_patches": 0}
    for i, image in enumerate(images):
        prompt, _ = render_chat(chat(image), tok, adapter)
        script = Script(tok, cfg, len(prompt))
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        for g in range(cfg["group"]):
            torch.manual_seed(seed + i * cfg["group"] + g)
            hist, crops = list(prompt), [pil]
            for k in range(cfg["turns"] + 1):
                enc = proc(images=crops, return_tensors="pt")
                ids = torch.tensor([hist], device=dev)
                counts["prefill_tokens"] += len(hist)
                counts["vision_patches"] += enc["pixel_values"].shape[0]
                kw = dict(do_sample=True, top_k=0, temperature=temperature) if temperature > 0 \
                    else dict(do_sample=False)
                with torch.no_grad():
                    seq = model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=enc["pixel_values"].to(dev, model.dtype),
                        image_grid_thw=enc["image_grid_thw"].to(dev),
                        mm_token_type_ids=(ids == model.config.image_token_id).int(),
                        max_new_tokens=cfg["new"], min_new_tokens=cfg["new"],
                        logits_processor=LogitsProcessorList([_hf_processor(script)]),
                        pad_token_id=tok.pad_token_id, **kw)
                hist = seq[0].tolist()
                if k < cfg["turns"]:
                    x1, y1, x2, y2 = crop_boxes(cfg)[k]  # the scripted call's box
                    h, w = smart_resize(y2 - y1, x2 - x1, factor=28,
                                        min_pixels=cfg["min_pixels"],
                                        max_pixels=cfg["max_pixels"])
                    crops.append(pil.crop((x1, y1, x2, y2)).resize((w, h), Image.BICUBIC))
                    grid = (1, h // 14, w // 14)
                    hist += pre_ids + adapter.placeholder(grid) + post_ids
            out.append(hist)
    return out, counts


def ours(model, tok, images: List[torch.Tensor], cfg: Dict, temperature: float,
         seed: int = 0, instrument=None, **engine_kw):
    """``RolloutEngine`` over all prompts and samples at once (``instrument(engine)``, if
    given, is called before generating). Returns the trajectories and the engine."""
    from mapo_fast.rollout import RolloutEngine
    from mapo_fast.rollout.multimodal import render_chat
    from mapo_fast.tools import ToolRunner
    eng = RolloutEngine(model, tok, min_pixels=cfg["min_pixels"],
                        max_pixels=cfg["max_pixels"], **engine_kw)
    prompt, _ = render_chat(chat(images[0]), tok, eng.vision)
    if instrument is not None:
        instrument(eng)
    trajs = eng.generate([chat(im) for im in images], group_size=cfg["group"],
                         max_new_tokens=cfg["new"], temperature=temperature, seed=seed,
                         tools=ToolRunner(), max_turns=cfg["turns"] + 1, stop_token_ids=[],
                         observation_template=TEMPLATE,
                         logits_processor=Script(tok, cfg, len(prompt)))
    return trajs, eng


def naive_row(model, tok, images: List[torch.Tensor], cfg: Dict, device: torch.device,
              kv_per_token: int) -> CaseResult:
    """The naive loop's row (one run at temperature 1): its time, prefill tokens, vision
    patches and peak KV (``kv_per_token`` bytes per token of the longest history)."""
    print("  image rollout: naive HF loop ...", flush=True)
    box = {}
    r = measure("naive HF loop", lambda: box.setdefault("x", naive(
        model, tok, images, cfg, temperature=1.0)), device, repeats=1, warmup=0)
    seqs, c = box["x"]
    kv = kv_per_token * max(map(len, seqs))
    r.extra = {"prefill_tokens": c["prefill_tokens"], "peak_kv_mib": kv / 2 ** 20,
               "vision_patches": c["vision_patches"]}
    r.notes = (f"PIL + HF processor, re-prefills history; prefill {c['prefill_tokens']} "
               f"tokens; vision {c['vision_patches']} patches; peak KV {kv / 2 ** 20:.0f} MiB")
    print(f"    {r.median_ms / 1e3:.1f} s, {r.notes}", flush=True)
    return r


def describe(cfg: Dict, model) -> str:
    """The image workload's line in the report."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    tokens = (cfg["image"] // 28) ** 2
    crop_tokens = (cfg["crop"] // 28) ** 2
    return (f"image: {cfg['prompts']} prompts x G={cfg['group']}, a {cfg['image']}px image "
            f"({tokens} image tokens), {cfg['turns']} zoom-in turns of {cfg['new']} tokens, "
            f"each returning a {cfg['crop']}px crop ({crop_tokens} tokens), final "
            f"{cfg['new']}; Qwen2.5-VL of {params:.0f}M parameters")
