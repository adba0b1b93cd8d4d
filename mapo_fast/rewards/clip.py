"""``CLIPVerifier``: cosine similarity between the CLIP (or SigLIP) text embedding of each
description and the image embedding of its crop, mapped to ``[0, 1]``.

Crops stay on the device: they are resized by ``crop_and_zoom`` exactly as the CLIP image
processor does (shortest edge to the model's size with PIL's bicubic, then a centre crop), then
rescaled and normalised, with no PIL round trip. All turns go through the model in batches of
``batch_size``.

Calibration (``calibration``):
    ``"cosine"``  ``(cos + 1) / 2``: fixed and comparable across batches (default);
    ``"sigmoid"`` ``sigmoid(logit_scale * cos + logit_bias)``: SigLIP's own match probability
                  (SigLIP models only, they carry ``logit_bias``);
    ``"minmax"``  ``(cos - min) / (max - min)`` over the scored batch (1.0 when all are equal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import torch

from ..tools.ops import CLIP_MEAN, CLIP_STD, crop_and_zoom
from .verifier import SemanticVerifier

Tensor = torch.Tensor
CALIBRATIONS = ("cosine", "sigmoid", "minmax")


def clip_resize_size(h: int, w: int, short: int) -> tuple:
    """The CLIP processor's shortest-edge resize: the short side becomes ``short``, the long
    side ``int(short * long / short_side)``."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _features(out: Any) -> Tensor:
    """``get_*_features`` return a tensor in older transformers, an output object in newer."""
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPVerifier(SemanticVerifier):
    """Semantic verifier backed by a ``transformers`` CLIP or SigLIP model.

    Args:
        model: a ``CLIPModel`` / ``SiglipModel`` (anything with ``get_text_features``,
            ``get_image_features`` and ``config.vision_config.image_size``).
        tokenizer: its tokenizer (a ``transformers`` tokenizer).
        calibration: see the module doc.
        mean, std: image normalisation (default: the CLIP values; SigLIP uses 0.5/0.5).
        max_text_tokens: descriptions are truncated to this many tokens (default: the model's
            ``max_position_embeddings``); truncations are counted in ``stats["truncated"]``.
        batch_size: turns per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, *, calibration: str = "cosine",
                 mean=CLIP_MEAN, std=CLIP_STD, max_text_tokens: Optional[int] = None,
                 batch_size: int = 256):
        super().__init__()
        if calibration not in CALIBRATIONS:
            raise ValueError(f"CLIPVerifier: `calibration` must be one of {list(CALIBRATIONS)}, "
                             f"got {calibration!r}")
        if calibration == "sigmoid" and getattr(model, "logit_bias", None) is None:
            raise ValueError("CLIPVerifier: `calibration`='sigmoid' needs a model with a "
                             f"logit_bias (SigLIP); {type(model).__name__} has none")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"CLIPVerifier: `batch_size` must be a positive int, got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.image_size = int(model.config.vision_config.image_size)
        self.max_text_tokens = int(max_text_tokens or
                                   model.config.text_config.max_position_embeddings)
        self.batch_size = batch_size
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    @classmethod
    def from_pretrained(cls, path: str, device: Any = None, **kwargs) -> "CLIPVerifier":
        """Loads model, tokenizer and normalisation from a local folder (no download). The
        normalisation is read from the folder's ``preprocessor_config.json`` (``image_mean``,
        ``image_std``; CLIP's defaults where absent), not through an image processor, which
        some transformers releases build only with torchvision installed. ``device``: where
        the model runs (None: where it loads, the CPU)."""
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained(path, local_files_only=True)
        if device is not None:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        pre = Path(path) / "preprocessor_config.json"
        settings = json.loads(pre.read_text()) if pre.is_file() else {}
        for key, arg in (("image_mean", "mean"), ("image_std", "std")):
            if key in settings:
                kwargs.setdefault(arg, settings[key])
        if getattr(model, "logit_bias", None) is not None:
            kwargs.setdefault("calibration", "sigmoid")
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, **kwargs) -> "CLIPVerifier":
        """A randomly initialised model from a ``CLIPConfig`` / ``SiglipConfig``."""
        from transformers import AutoModel
        return cls(AutoModel.from_config(config), tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, crops: List[Tensor]) -> Tensor:
        """``[M, 3, S, S]`` float32: the CLIP processor's resize, centre crop, rescale and
        normalisation of uint8 ``[3, h, w]`` crops, on the model's device."""
        S = self.image_size
        crops = [c.to(self.device) for c in crops]
        sizes = [clip_resize_size(c.shape[1], c.shape[2], S) for c in crops]
        boxes = [(i, 0.0, 0.0, float(c.shape[2]), float(c.shape[1])) for i, c in enumerate(crops)]
        resized = crop_and_zoom(crops, boxes, size=sizes)
        out = torch.empty(len(crops), 3, S, S, dtype=torch.float32, device=self.device)
        for i, (r, (h, w)) in enumerate(zip(resized, sizes)):
            top, left = (h - S) // 2, (w - S) // 2
            out[i] = r[:, top:top + S, left:left + S].to(torch.float32)
        mean = self.mean.to(self.device)[:, None, None]
        std = self.std.to(self.device)[:, None, None]
        return (out / 255.0 - mean) / std

    def cosine(self, descriptions: List[str], crops: List[Tensor]) -> Tensor:
        """``[M]`` raw cosine similarities (float32, on CPU)."""
        out = []
        with torch.no_grad():
            for s in range(0, len(descriptions), self.batch_size):
                d, c = descriptions[s:s + self.batch_size], crops[s:s + self.batch_size]
                full = self.tokenizer(d, add_special_tokens=True)["input_ids"]
                self.stats["truncated"] += sum(len(ids) > self.max_text_tokens for ids in full)
                tok = self.tokenizer(d, padding=True, truncation=True,
                                     max_length=self.max_text_tokens, return_tensors="pt")
                tok = {k: v.to(self.device) for k, v in tok.items()
                       if k in ("input_ids", "attention_mask")}
                t = _features(self.model.get_text_features(**tok))
                i = _features(self.model.get_image_features(pixel_values=self.pixel_values(c)))
                t = t / t.norm(dim=-1, keepdim=True)
                i = i / i.norm(dim=-1, keepdim=True)
                out.append((t * i).sum(-1).float().cpu())
        return torch.cat(out)

    def _score(self, descriptions, crops, regions) -> Tensor:
        if any(c is None for c in crops):
            raise ValueError("CLIPVerifier: every described turn needs its crop; got None")
        cos = self.cosine(descriptions, crops)
        if self.calibration == "cosine":
            return (cos + 1.0) / 2.0
        if self.calibration == "sigmoid":
            scale = self.model.logit_scale.exp().item()
            return torch.sigmoid(cos * scale + self.model.logit_bias.item())
        lo, hi = cos.min(), cos.max()
        return torch.ones_like(cos) if hi <= lo else (cos - lo) / (hi - lo)
