"""CLIPVerifier with a tiny random CLIP built from a config (no download).

Tolerance against transformers' own pipeline (CLIPImageProcessorPil on the PIL crop, then
CLIPModel features): our device-side resize differs from PIL's by at most ~1 grey level at a
pixel (see test_crop_zoom), i.e. ~0.015 in normalised pixel values; through a small random ViT
that moves cosines by well under 1e-2, which is the bound used."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mapo_fast import CLIPVerifier, Span, ToolTurn, Trajectory, TrajectorySpans
from tokenizer_util import clip_tokenizer

S = 32


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=1, eos_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=S, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).eval(), tok


def crops_and_texts():
    g = torch.Generator().manual_seed(1)
    crops = []
    for h, w in [(40, 57), (100, 33), (32, 32), (19, 70), (64, 64)]:
        im = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        crops.append(torch.nn.functional.avg_pool2d(im.float()[None], 3, 1, 1)[0].round()
                     .to(torch.uint8))
    texts = ["a red circle next to the digit 7", "a blue triangle", "green square",
             "the sign says 42", "a yellow star " * 8]  # the last one is truncated (16 tokens)
    return crops, texts


def transformers_cosine(model, tok, crops, texts):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    proc = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    pil = [Image.fromarray(c.permute(1, 2, 0).numpy()) for c in crops]
    pv = torch.from_numpy(np.asarray(proc(pil, return_tensors="np")["pixel_values"]))
    enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        i = model.get_image_features(pixel_values=pv)
        t = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    i = i if isinstance(i, torch.Tensor) else i.pooler_output
    t = t if isinstance(t, torch.Tensor) else t.pooler_output
    return torch.nn.functional.cosine_similarity(i, t, dim=-1)


def test_matches_transformers_clip_on_pil_crops():
    model, tok = tiny_clip()
    crops, texts = crops_and_texts()
    v = CLIPVerifier(model, tok)
    ours = v.cosine(texts, crops)
    ref = transformers_cosine(model, tok, crops, texts)
    assert (ours - ref).abs().max() < 1e-2, (ours, ref)
    assert v.stats["truncated"] == 1


def test_batched_scores_equal_one_by_one():
    model, tok = tiny_clip()
    crops, texts = crops_and_texts()
    v = CLIPVerifier(model, tok, batch_size=2)
    together = v.score(texts, crops)
    alone = torch.cat([CLIPVerifier(model, tok).score([t], [c]) for t, c in zip(texts, crops)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert ((together >= 0) & (together <= 1)).all()


def test_calibrations_and_missing_descriptions():
    model, tok = tiny_clip()
    crops, texts = crops_and_texts()
    cos = CLIPVerifier(model, tok).cosine(texts, crops)
    torch.testing.assert_close(CLIPVerifier(model, tok).score(texts, crops), (cos + 1) / 2)
    mm = CLIPVerifier(model, tok, calibration="minmax").score(texts, crops)
    assert mm.min() == 0.0 and mm.max() == 1.0
    v = CLIPVerifier(model, tok)
    s = v.score([texts[0], None, "  "], crops[:3])
    assert s[1] == 0.0 and s[2] == 0.0 and v.stats["missing"] == 2
    with pytest.raises(ValueError, match="`calibration`='sigmoid' needs a model with a logit_bias"):
        CLIPVerifier(model, tok, calibration="sigmoid")
    with pytest.raises(ValueError, match="`calibration`.*'platt'"):
        CLIPVerifier(model, tok, calibration="platt")


def test_scores_every_turn_of_every_trajectory_in_one_call():
    model, tok = tiny_clip()
    crops, texts = crops_and_texts()
    v = CLIPVerifier(model, tok)
    calls = []
    real = v.cosine
    v.cosine = lambda d, c: calls.append(len(d)) or real(d, c)

    def traj(k0, n):
        turns = [ToolTurn(call=Span(0, 1), observation=Span(1, 2), description_text=texts[k0 + k],
                          crop_index=k) for k in range(n)]
        return Trajectory([0] * 4, [0.0] * 4, [1] * 4, TrajectorySpans(turns=turns),
                          crops=crops[k0:k0 + n])

    scores, mask = v.score_trajectories([traj(0, 2), traj(2, 3)])
    assert calls == [5] and mask.sum() == 5
    torch.testing.assert_close(scores[1, :3], v.score(texts[2:5], crops[2:5]))


def test_from_pretrained_loads_a_local_folder(tmp_path):
    model, tok = tiny_clip()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    v = CLIPVerifier.from_pretrained(str(tmp_path))
    crops, texts = crops_and_texts()
    torch.testing.assert_close(v.cosine(texts, crops), CLIPVerifier(model, tok).cosine(texts, crops),
                               atol=1e-6, rtol=0)
    # a processor config's normalisation is read from its file (no image processor is built,
    # which some transformers releases do only with torchvision)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": mean, "image_std": std}))
    v = CLIPVerifier.from_pretrained(str(tmp_path))
    assert v.mean.flatten().tolist() == pytest.approx(mean)
    assert v.std.flatten().tolist() == pytest.approx(std)
    torch.testing.assert_close(v.cosine(texts, crops),
                               CLIPVerifier(model, tok, mean=mean, std=std).cosine(texts, crops),
                               atol=1e-6, rtol=0)
