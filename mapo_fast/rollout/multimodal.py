"""What the rollout engine needs to drive a Qwen2-VL / Qwen2.5-VL model: chat prompts with
images, the vision tower on new images and crops only, and multimodal rotary positions
(M-RoPE) that continue across turns.

Positions follow transformers' ``get_rope_index``: a text token at position ``p`` has
``(p, p, p)``; an image whose merged grid is ``gh x gw`` starting at ``p`` gives its token at
row ``r``, column ``c`` the position ``(p, p + r, p + c)``, and the text after it continues at
``p + max(gh, gw)``. The engine keeps each sequence's next position, so an observation's image
tokens get the positions a full re-run of the model over the history would give them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..tools.ops import MAX_PIXELS, MIN_PIXELS, crop_to_patches, crops_to_patches, zoom_size

Tensor = torch.Tensor
Position = Tuple[int, int, int]


@dataclass
class ImageInsert:
    """Features of one image or crop placed at ``start`` in a sequence's tokens:
    ``features [n, hidden]`` (the vision tower's merged output) for the ``n`` image-pad tokens
    ``[start, start + n)``; ``key`` identifies its pixels (``image_key``) for the prefix index."""
    start: int
    features: Tensor
    key: int

    @property
    def end(self) -> int:
        return self.start + self.features.shape[0]


def image_key(image: Tensor) -> int:
    """A 62-bit content hash of a uint8 image: equal pixels, equal key; used so that cached KV
    is shared only between identical images."""
    h = hashlib.blake2b(image.detach().contiguous().cpu().numpy().tobytes(), digest_size=8)
    h.update(repr(tuple(image.shape)).encode())
    return int.from_bytes(h.digest(), "little") & (2 ** 62 - 1)


def crop_key(source_key: int, box: Sequence[float]) -> int:
    """The key of a crop: its source image's ``image_key`` and the box (the crop's pixels are
    a function of both under the engine's fixed resize rule)."""
    h = hashlib.blake2b(repr((source_key, tuple(round(float(v), 4) for v in box))).encode(),
                        digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2 ** 62 - 1)


def is_vision_language(model: Any) -> bool:
    """Whether ``model`` is a Qwen2/2.5-VL style model: ``model.model.visual``,
    ``model.model.language_model`` and an ``image_token_id`` in its config."""
    base = getattr(model, "model", None)
    return base is not None and hasattr(base, "visual") and hasattr(base, "language_model") \
        and getattr(model.config, "image_token_id", None) is not None


def _grids(grid: Tensor) -> List[Tuple[int, int, int]]:
    """``image_grid_thw [M, 3]`` as ``(t, gh, gw)`` tuples."""
    return [tuple(int(x) for x in g) for g in grid.tolist()]


class VisionAdapter:
    """Vision side of a Qwen2/2.5-VL model for the engine.

    Args:
        model: the ``...ForConditionalGeneration`` model.
        min_pixels, max_pixels: the area bounds of ``smart_resize`` for every image and crop
            given to the vision tower (the processor's defaults: 56*56 and 28*28*1280).
    """

    def __init__(self, model: Any, *, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS):
        cfg, vcfg = model.config, model.config.vision_config
        self.base = model.model
        self.image_token_id = int(cfg.image_token_id)
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(cfg.vision_end_token_id)
        self.patch_size = int(vcfg.patch_size)
        self.temporal_patch_size = int(vcfg.temporal_patch_size)
        self.merge = int(vcfg.spatial_merge_size)
        self.factor = self.patch_size * self.merge
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)

    @property
    def crop_kwargs(self) -> Dict[str, int]:
        """``crop_and_zoom`` keywords that cut crops at this vision tower's patch grid."""
        return {"factor": self.factor, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels}

    @property
    def max_image_tokens(self) -> int:
        """Image-pad tokens of the largest image the resize rule allows."""
        return self.max_pixels // self.factor ** 2

    def patches(self, images: Sequence[Tensor], boxes: Sequence[Sequence[float]]
                ) -> Tuple[Tensor, Tensor]:
        """``crop_to_patches`` with the model's patch layout and this adapter's pixel bounds:
        ``boxes`` rows ``(image_index, x1, y1, x2, y2)`` in original pixels."""
        return crop_to_patches(list(images), [list(map(float, b)) for b in boxes],
                               patch_size=self.patch_size,
                               temporal_patch_size=self.temporal_patch_size,
                               merge_size=self.merge, min_pixels=self.min_pixels,
                               max_pixels=self.max_pixels)

    def grid(self, box: Sequence[float]) -> Tuple[int, int, int]:
        """The patch grid ``(1, gh, gw)`` of the crop ``(image_index, x1, y1, x2, y2)`` (what
        ``patches`` would give it, without cutting it)."""
        _, x1, y1, x2, y2 = box
        h, w = zoom_size(y2 - y1, x2 - x1, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def full_patches(self, images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """``patches`` of whole images (a prompt's)."""
        if not images:
            width = 3 * self.temporal_patch_size * self.patch_size ** 2
            return torch.empty(0, width), torch.empty(0, 3, dtype=torch.int64)
        return self.patches(images, [(k, 0, 0, im.shape[2], im.shape[1])
                                     for k, im in enumerate(images)])

    def crop_patches(self, crops: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """``crops_to_patches`` of uint8 crops that ``crop_and_zoom`` cut with this adapter's
        ``factor`` and pixel bounds: their vision input without resampling them again."""
        return crops_to_patches(list(crops), patch_size=self.patch_size,
                                temporal_patch_size=self.temporal_patch_size,
                                merge_size=self.merge)

    @staticmethod
    def split_patches(pixel_values: Tensor, grid: Tensor
                      ) -> List[Tuple[Tensor, Tuple[int, int, int]]]:
        """``(pixel_values rows, (t, gh, gw))`` per image (views, no copy)."""
        grids = _grids(grid)
        rows = [t * h * w for t, h, w in grids]
        return list(zip(pixel_values.split(rows), grids))

    @torch.no_grad()
    def encode_patches(self, pixel_values: Tensor, grid: Tensor,
                       stats: Optional[Dict[str, int]] = None
                       ) -> List[Tuple[Tensor, Tuple[int, int, int]]]:
        """Runs the vision tower once over the images of ``pixel_values`` / ``grid [M, 3]``:
        per image its merged features ``[n, hidden]`` and its grid ``(t, gh, gw)`` in patches.
        ``stats`` (optional) counts ``vision_images`` and ``vision_patches``."""
        if grid.shape[0] == 0:
            return []
        dev = next(self.base.visual.parameters()).device
        out = self.base.get_image_features(pixel_values.to(dev), image_grid_thw=grid.to(dev))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        grids = _grids(grid)
        if stats is not None:
            stats["vision_images"] = stats.get("vision_images", 0) + len(grids)
            stats["vision_patches"] = stats.get("vision_patches", 0) + sum(
                t * h * w for t, h, w in grids)
        return list(zip(feats, grids))

    def placeholder(self, grid: Tuple[int, int, int]) -> List[int]:
        """The tokens of one image: ``<|vision_start|>``, one ``<|image_pad|>`` per merged
        patch, ``<|vision_end|>``."""
        t, h, w = grid
        return [self.vision_start_id] + [self.image_token_id] * (t * h * w // self.merge ** 2) \
            + [self.vision_end_id]

    def positions(self, tokens: Sequence[int], grids: Sequence[Tuple[int, int, int]],
                  start: int) -> Tuple[List[Position], int]:
        """M-RoPE positions of ``tokens`` whose image-pad runs are the images ``grids`` in
        order, the first token at position ``start``. Returns ``(positions, next_position)``."""
        out: List[Position] = []
        p, i, n, g = start, 0, len(tokens), iter(grids)
        while i < n:
            if tokens[i] != self.image_token_id:
                out.append((p, p, p))
                p, i = p + 1, i + 1
                continue
            try:
                t, gh, gw = next(g)
            except StopIteration:
                raise ValueError("image-pad tokens without an image to fill them") from None
            h, w = gh // self.merge, gw // self.merge
            for ti in range(t):
                for r in range(h):
                    for c in range(w):
                        out.append((p + ti, p + r, p + c))
            i += t * h * w
            p += max(h, w)
        return out, p


def render_chat(messages: Sequence[Dict[str, Any]], tokenizer: Any,
                adapter: Optional["VisionAdapter"],
                *, where: str = "prompts") -> Tuple[List[int], List[Tensor]]:
    """Token ids of a chat message list in Qwen's chat format, ending with the opened
    assistant turn, and its images in order (each one's placeholder sized by the adapter).

    A message is ``{"role": str, "content": str | [{"type": "text", "text": str} |
    {"type": "image", "image": uint8 [3, H, W] tensor}, ...]}``.
    """
    def ids(text: str) -> List[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    tokens: List[int] = []
    images: List[Tensor] = []
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise ValueError(f"RolloutEngine.generate: `{where}` message {m} must be a dict with "
                             f"a string 'role' and a 'content', got {msg!r:.80}")
        tokens += ids(f"<|im_start|>{msg['role']}\n")
        content = msg["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                tokens += ids(part["text"])
            elif kind == "image":
                if adapter is None:
                    raise ValueError(f"RolloutEngine.generate: `{where}` holds an image but the "
                                     "model has no vision tower")
                im = part.get("image")
                if not (isinstance(im, Tensor) and im.dim() == 3 and im.shape[0] == 3
                        and im.dtype == torch.uint8 and im.shape[1] > 0 and im.shape[2] > 0):
                    desc = (f"{type(im).__name__} {tuple(im.shape)} {im.dtype}"
                            if isinstance(im, Tensor) else type(im).__name__)
                    raise ValueError(f"RolloutEngine.generate: `{where}` message {m} part {j}: "
                                     f"an image must be a uint8 [3, H, W] tensor, got {desc}")
                images.append(im)
                tokens += adapter.placeholder(adapter.grid((0, 0, 0, im.shape[2], im.shape[1])))
            else:
                raise ValueError(f"RolloutEngine.generate: `{where}` message {m} part {j} must be "
                                 f"{{'type': 'text', 'text': str}} or {{'type': 'image', "
                                 f"'image': tensor}}, got {part!r:.80}")
        tokens += ids("<|im_end|>\n")
    tokens += ids("<|im_start|>assistant\n")
    return tokens, images

