"""Multiple-choice benchmark files about high-resolution images, in the layouts the field
reports on, as JSONL or parquet (``tasks.records.read_numbered``):

- **V* Bench**: ``image`` (a path), ``text`` (the question with its options inline,
  ``(A) ... (B) ...``, often followed by an instruction line), ``label`` (the letter),
  ``category``, ``question_id``.
- **HR-Bench 4K / 8K**: ``index``, ``question``, ``A``, ``B``, ``C``, ``D`` (the options as
  columns), ``answer`` (the letter), ``category``, ``image`` (the image file base64-encoded).
- Also: ``options`` as a list or a ``{letter: text}`` mapping; an ``image`` that is a Hugging
  Face image cell (``{"bytes": ..., "path": ...}``) or raw bytes; an answer that is the option's
  index or its text; target boxes ``bbox`` / ``boxes`` / ``target_bbox``, one ``[x1, y1, x2,
  y2]`` or a list of them, in the image's pixels (for action accuracy).

A record that cannot be used is skipped with a reason, logged once with its line, never
stopping the run: no or bad image (paths are kept inside the data's folder, decompression bombs
refused from the header), no question, fewer than two options, an answer that names no option,
a malformed box.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..rewards.outcome import normalize_text
from ..tasks.records import SYSTEM, RecordError, decode_image, read_numbered, resolve_image

Tensor = torch.Tensor
log = logging.getLogger("mapo_fast.evaluation")

LETTERS = "ABCDEFGHIJ"
#: how each question ends in the prompt (the options follow the question, one per line)
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices."
#: an image string longer than this is no path: it is the file base64-encoded (HR-Bench);
#: a shorter one is a path when that file exists, else base64 when it decodes (base64 has "/"
#: in it: a JPEG's starts "/9j/")
PATH_MAX_CHARS = 4096
#: the system prompts a question can be asked under: the real-data protocol (the zoom tool,
#: describe each crop, answer in ``<answer>``), or none (the built-in task's policies were
#: trained without one)
SYSTEM_PROMPTS = {"records": SYSTEM, "none": None}
_INLINE = re.compile(r"\(([A-J])\)\s*(.*?)(?=\s*\([A-J]\)|\n|$)", re.S)


@dataclass
class BenchItem:
    """One question whose record is usable (its image's header read; the image is decoded only
    by ``load``). ``options``: texts in letter order; ``answer``: the right letter; ``boxes``:
    target boxes ``(x1, y1, x2, y2)`` in the image's pixels."""
    key: str
    line: int
    source: Any                      # the image: a path, or the file's bytes
    question: str
    options: List[str]
    answer: str
    category: str
    boxes: List[Tuple[float, float, float, float]] = field(default_factory=list)
    max_pixels: int = 8192 * 8192

    def load(self) -> Tensor:
        """The image, uint8 ``[3, H, W]`` (``RecordError`` when it does not decode)."""
        if isinstance(self.source, (bytes, bytearray)):
            return decode_image(io.BytesIO(self.source), self.max_pixels, f"the image of "
                                f"line {self.line}")
        return decode_image(self.source, self.max_pixels, os.path.basename(self.source))

    def prompt(self, image: Tensor, system: str = "records") -> List[Dict[str, Any]]:
        """The chat: the system prompt named ``system`` (``SYSTEM_PROMPTS``), the image and the
        question with its lettered options."""
        opts = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(self.options))
        text = f"{self.question}\n{opts}\n{CHOICE_INSTRUCTION}"
        user = {"role": "user", "content": [{"type": "image", "image": image},
                                            {"type": "text", "text": text}]}
        head = SYSTEM_PROMPTS[system]
        return ([{"role": "system", "content": head}] if head else []) + [user]


def _first(rec: Dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = rec.get(k)
        if v is not None and v != "" and v != []:
            return v
    return None


def _options(rec: Dict[str, Any], question: str) -> Tuple[str, List[str]]:
    """``(question without inline options, options)``."""
    opts = rec.get("options")
    if isinstance(opts, dict):
        opts = [opts[k] for k in sorted(opts)]
    if isinstance(opts, (list, tuple)):
        return question, [str(o).strip() for o in opts]
    cols = []
    for letter in LETTERS:
        v = rec.get(letter)
        if v is None or (isinstance(v, float) and v != v) or str(v).strip() == "":
            break
        cols.append(str(v).strip())
    if cols:
        return question, cols
    found = _INLINE.findall(question)
    if found and [m[0] for m in found] == list(LETTERS[:len(found)]):
        head = question[:question.index("(A)")].strip()
        return head, [m[1].strip() for m in found]
    return question, []


def _answer(raw: Any, options: Sequence[str]) -> str:
    """The right letter from a letter, ``(B)``, an index or the option's text."""
    if isinstance(raw, bool):
        raise RecordError("bad_answer", f"the answer is a boolean ({raw})")
    if isinstance(raw, int) and 0 <= raw < len(options):
        return LETTERS[raw]
    text = str(raw).strip()
    m = re.fullmatch(r"\(?([A-Ja-j])\)?\.?", text)
    if m and LETTERS.index(m[1].upper()) < len(options):
        return m[1].upper()
    norm = normalize_text(text)
    hits = [i for i, o in enumerate(options) if normalize_text(o) == norm]
    if len(hits) == 1:
        return LETTERS[hits[0]]
    raise RecordError("bad_answer", f"the answer {text[:40]!r} names none of the "
                      f"{len(options)} options")


def _boxes(raw: Any) -> List[Tuple[float, float, float, float]]:
    if raw is None:
        return []
    boxes = raw if raw and isinstance(raw[0], (list, tuple)) else [raw]
    out = []
    for b in boxes:
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in b) or \
                not (b[0] < b[2] and b[1] < b[3]):
            raise RecordError("bad_box", f"a box must be [x1, y1, x2, y2] with x1 < x2 and "
                              f"y1 < y2, got {str(b)[:60]}")
        out.append(tuple(float(v) for v in b))
    return out


def _base64(text: str) -> Optional[bytes]:
    """The bytes ``text`` encodes in base64 (line breaks allowed), or None."""
    try:
        return base64.b64decode("".join(text.split()), validate=True) or None
    except (binascii.Error, ValueError):
        return None


class Benchmark:
    """The usable questions of one benchmark file, in file order (``items``), with the skipped
    ones counted by reason (``skipped``). ``image_root``: the folder image paths are relative
    to (default: the file's folder)."""

    def __init__(self, path: str, *, image_root: Optional[str] = None,
                 max_image_pixels: int = 8192 * 8192, limit: Optional[int] = None):
        numbered = read_numbered(path)
        if not numbered:
            raise ValueError(f"mapo-eval: `--data` {path!r} holds no records")
        root = image_root or os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(root):
            raise ValueError(f"mapo-eval: `--image-root` {root!r} is not a folder")
        self.path, self.root = path, os.path.realpath(root)
        self.max_image_pixels = max_image_pixels
        self.skipped: Counter = Counter()
        self.items: List[BenchItem] = []
        for line, rec in numbered[:limit]:
            try:
                self.items.append(self._item(line, rec))
            except RecordError as e:
                self.skipped[e.reason] += 1
                log.warning("skipping the record on line %d of %s: %s", line,
                            os.path.basename(path), e)
        if not self.items:
            raise ValueError(f"mapo-eval: `--data` {path!r}: no record is usable "
                             f"({dict(self.skipped)})")
        keys = Counter(it.key for it in self.items)
        if max(keys.values()) > 1:  # ids must name one question each (resume relies on it)
            for it in self.items:
                it.key = f"line{it.line}"

    def _source(self, raw: Any) -> Any:
        """The image as a path inside the root or as bytes, its header checked."""
        if isinstance(raw, list) and raw:
            raw = raw[0]
        if isinstance(raw, dict):
            raw = raw.get("bytes") or raw.get("path")
        if isinstance(raw, str) and "\x00" not in raw and (
                len(raw) > PATH_MAX_CHARS or not os.path.lexists(os.path.join(self.root, raw))):
            raw = _base64(raw) or raw  # not a file there: the image base64-encoded, if it is
        if isinstance(raw, (bytes, bytearray)):
            decode_image(io.BytesIO(raw), self.max_image_pixels, "the image bytes",
                         header_only=True)
            return bytes(raw)
        path = resolve_image(self.root, raw)
        decode_image(path, self.max_image_pixels, os.path.basename(path), header_only=True)
        return path

    def _item(self, line: int, rec: Dict[str, Any]) -> BenchItem:
        if "__error__" in rec:
            raise RecordError("bad_record", rec["__error__"])
        question = _first(rec, "text", "question", "prompt")
        if not isinstance(question, str) or not question.strip():
            raise RecordError("no_question", "the record has no question text")
        question, options = _options(rec, question.replace("<image>", "").strip())
        if len(options) < 2:
            raise RecordError("no_options", f"the record has {len(options)} option(s); a "
                              "multiple-choice question needs at least two")
        raw = _first(rec, "label", "answer")
        if raw is None:
            raise RecordError("no_answer", "the record has no answer")
        answer = _answer(raw, options)
        boxes = _boxes(_first(rec, "bbox", "boxes", "target_bbox"))
        raw_image = _first(rec, "image", "image_path", "images")
        if raw_image is None:
            raise RecordError("no_image", "the record has no image")
        key = _first(rec, "question_id", "index", "id")
        return BenchItem(key=str(key) if key is not None else f"line{line}", line=line,
                         source=self._source(raw_image), question=question, options=options,
                         answer=answer, category=str(rec.get("category") or "all"),
                         boxes=boxes, max_pixels=self.max_image_pixels)
