"""Real data: thinking-with-images datasets as JSONL or parquet records (DeepEyes-style), each
with an image path, a question and an answer.

Accepted field names: the image ``image`` / ``image_path`` / ``images`` (a list: the first is
used), the question ``question`` / ``problem`` / ``prompt`` (a string, or a chat message list
whose user text is used; ``<image>`` markers are dropped), the answer ``answer`` /
``solution`` / ``ground_truth`` / ``reward_model.ground_truth``.

Records are checked when first used, and a bad one is skipped with a counted, logged reason
(``RecordsTask.skipped``), never stopping training: an image path that resolves outside the
dataset root (``..``, absolute paths, symlinks), a file that is missing or is not an image, an
image over ``max_image_pixels`` (decompression bombs are refused from the header, before any
decoding), a record without a question or an answer, an answer that is not text or a finite
number (an object, a list, a boolean, NaN), a question longer than the model can read beside
its prompt and turns (``RecordsTask.bound_questions``, which the trainer sets from the model's
``max_position_embeddings``). Each skipped record is logged once, with its line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..tools import ToolRegistry
from .._checks import ConfigError
from ..trajectory import ANSWER_TAG, DESCRIPTION_TAG

Tensor = torch.Tensor
log = logging.getLogger("mapo_fast.records")

SYSTEM = ("Answer the question about the image. "
          + ToolRegistry.default().system_prompt()
          + f" After each zoom, describe what you see in <{DESCRIPTION_TAG}>...</{DESCRIPTION_TAG}>."
          f" Give the final answer in <{ANSWER_TAG}>...</{ANSWER_TAG}>.")


@dataclass
class RecordSample:
    image: Tensor
    question: str
    answer: str
    index: int


class RecordError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _json_line(n: int, raw: bytes) -> Dict[str, Any]:
    """One JSONL line decoded on its own: the record, or ``{"__error__": reason}`` (a line
    that is not UTF-8, not JSON, nested too deeply, or not an object is one bad record)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return {"__error__": f"line {n} is not UTF-8 (byte {e.start})"}
    try:
        rec = json.loads(text)
    except RecursionError:
        return {"__error__": f"line {n} is nested too deeply"}
    except ValueError as e:
        return {"__error__": f"line {n} is not JSON ({str(e)[:120]})"}
    return rec if isinstance(rec, dict) else {"__error__": f"line {n} is not a JSON object"}


def read_records(path: str) -> List[Dict[str, Any]]:
    """All records of a ``.jsonl`` or ``.parquet`` file (``read_numbered`` without the line
    numbers)."""
    return [rec for _, rec in read_numbered(path)]


def read_numbered(path: str) -> List[Tuple[int, Dict[str, Any]]]:
    """``(line, record)`` of every record of a ``.jsonl`` or ``.parquet`` file (the line in a
    JSONL file, the row from 1 in a parquet file). Each JSONL line is decoded on its own (a
    UTF-8 byte-order mark at the start is accepted): a bad line becomes ``{"__error__":
    reason}``, counted as one skipped record when used, and never makes the file unreadable."""
    if not os.path.isfile(path):
        raise ValueError(f"config: `task.data_path` {path!r} is not a file")
    if path.endswith(".jsonl") or path.endswith(".json"):
        out = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if raw.strip():
                    out.append((n, _json_line(n, raw)))
        return out
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("config: reading parquet needs pyarrow (`pip install pyarrow`)") \
                from None
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    raise ValueError(f"config: `task.data_path` must end in .jsonl or .parquet, got {path!r}")


def _first(rec: Dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = rec
        for part in k.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v not in (None, "", []):
            return v
    return None


def decode_image(source: Any, max_pixels: int, name: str, *, header_only: bool = False
                 ) -> Optional[Tensor]:
    """An image file (a path or a binary file object) as uint8 ``[3, H, W]`` RGB, or
    ``RecordError``: ``too_many_pixels`` (from the header, before decoding: decompression bombs
    are refused) or ``not_an_image``. ``name`` names it in the reason. ``header_only``: check
    the header and return None (nothing decoded)."""
    from PIL import Image
    try:
        with Image.open(source) as im:
            w, h = im.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise RecordError("too_many_pixels", f"{name} is {w}x{h}, over the limit of "
                                  f"{max_pixels} pixels")
            if header_only:
                return None
            im = im.convert("RGB")
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except RecordError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own header check, before ours
        raise RecordError("too_many_pixels", f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types for non-images and broken files
        raise RecordError("not_an_image", f"{name} cannot be decoded as an image "
                          f"({type(e).__name__})") from None
    return data.reshape(h, w, 3).permute(2, 0, 1).contiguous()


def resolve_image(root: str, rel: Any) -> str:
    """The real path of an image path ``rel`` inside the folder ``root`` (a real path), or
    ``RecordError``: ``bad_image_path``, ``outside_root`` (``..``, absolute paths, symlinks
    leaving it) or ``missing_image``."""
    if not isinstance(rel, str) or not rel:
        raise RecordError("bad_image_path", f"image path {str(rel)[:80]!r} is not a string")
    if "\x00" in rel:
        raise RecordError("bad_image_path", f"image path {rel[:80]!r} contains a NUL byte")
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([full, root]) != root:
        raise RecordError("outside_root", f"{rel!r} resolves outside the dataset root")
    if not os.path.isfile(full):
        raise RecordError("missing_image", f"{rel!r} is not a file")
    return full


class RecordsTask:
    """A dataset of image/question/answer records (see the module doc), split into a train
    part and a held-out ``eval`` part of ``eval_size`` records (after a seeded shuffle)."""

    def __init__(self, data_path: str, *, image_root: Optional[str] = None, seed: int = 0,
                 max_image_pixels: int = 4096 * 4096, eval_size: int = 64):
        numbered = read_numbered(data_path)
        self.records = [rec for _, rec in numbered]
        self.lines = [n for n, _ in numbered]  # where each record is in the file
        self.data_path = data_path
        if not self.records:
            raise ValueError(f"config: `task.data_path` {data_path!r} holds no records")
        root = image_root if image_root else os.path.dirname(os.path.abspath(data_path))
        if not os.path.isdir(root):
            raise ValueError(f"config: `task.image_root` {root!r} is not a folder")
        self.root = os.path.realpath(root)
        self.max_image_pixels = int(max_image_pixels)
        order = list(range(len(self.records)))
        random.Random(seed).shuffle(order)
        self.skipped: Counter = Counter()
        self._bad: set = set()
        self.order, self.eval_size = order, eval_size
        #: ``(count_tokens, most)``: questions of more tokens are skipped (``bound_questions``)
        self.question_limit: Optional[Tuple[Callable[[str], int], int]] = None
        self._split()

    def _split(self) -> None:
        """The held-out split, drawn from usable records (checked now, in the shuffled order),
        so that an evaluation never meets a split of bad records; the rest is ``train``."""
        n_eval = min(self.eval_size, max(1, len(self.order) // 5))
        held = []
        for i in self.order:
            if len(held) == n_eval:
                break
            if i not in self._bad and self._usable(i):
                held.append(i)
        if not held:
            raise ValueError(f"config: `task.data_path` {self.data_path!r}: no record is usable "
                             f"({dict(self.skipped)})")
        rest = [i for i in self.order if i not in set(held)]
        self.splits = {"eval": held, "train": rest or held}

    def bound_questions(self, count_tokens: Callable[[str], int], most: int) -> None:
        """From now on, skip (reason ``question_too_long``) a record whose question takes more
        than ``most`` tokens by ``count_tokens``: more than the model can read beside its
        prompt and turns. The held-out split is drawn again from records within the bound."""
        if not isinstance(most, int) or isinstance(most, bool) or most < 1:
            raise ValueError(f"RecordsTask.bound_questions: `most` must be an int >= 1, got "
                             f"{most!r}")
        self.question_limit = (count_tokens, most)
        self._split()

    def _usable(self, i: int) -> bool:
        """Whether record ``i`` loads; a bad one is counted, logged and remembered."""
        try:
            self.load(i)
            return True
        except RecordError as e:
            self._skip(i, e)
            return False

    def _skip(self, i: int, e: RecordError) -> None:
        self._bad.add(i)
        self.skipped[e.reason] += 1
        log.warning("skipping the record on line %d of %s: %s", self.lines[i],
                    os.path.basename(self.data_path), e)

    # ---- loading one record --------------------------------------------------------------------
    def resolve(self, rel: Any) -> str:
        """The real path of an image path inside the root, or ``RecordError``."""
        return resolve_image(self.root, rel)

    def load(self, i: int) -> RecordSample:
        rec = self.records[i]
        if "__error__" in rec:
            raise RecordError("bad_record", rec["__error__"])
        rel = _first(rec, "image", "image_path", "images")
        if isinstance(rel, list):
            rel = rel[0]
        if isinstance(rel, dict):
            rel = rel.get("path")
        path = self.resolve(rel)
        question = _first(rec, "question", "problem", "prompt")
        if isinstance(question, list):  # chat messages: the user's text
            question = " ".join(m.get("content", "") for m in question
                                if isinstance(m, dict) and m.get("role") == "user"
                                and isinstance(m.get("content"), str))
        answer = _first(rec, "answer", "solution", "ground_truth", "reward_model.ground_truth")
        if isinstance(question, str):
            question = question.replace("<image>", "").strip()
        if not isinstance(question, str) or not question:
            raise RecordError("no_question", "record has no question text (besides <image>)")
        if answer is None or not str(answer).strip():
            raise RecordError("no_answer", "record has no answer")
        if self.question_limit is not None:
            count_tokens, most = self.question_limit
            n = count_tokens(question)
            if n > most:
                raise RecordError("question_too_long", f"the question takes {n} tokens, more "
                                  f"than the {most} the model can read beside its prompt and "
                                  "turns")
        if isinstance(answer, (bool, dict, list)) or (
                isinstance(answer, float) and not math.isfinite(answer)) or \
                not isinstance(answer, (str, int, float)):
            raise RecordError("bad_answer", f"the answer must be text or a finite number, got "
                              f"{type(answer).__name__} {str(answer)[:40]!r}")
        return RecordSample(self._image(path), question, str(answer).strip(), i)

    def _image(self, path: str) -> Tensor:
        return decode_image(path, self.max_image_pixels, os.path.basename(path))

    # ---- the task interface ------------------------------------------------------------------
    def batch(self, split: str, start: int, n: int) -> List[RecordSample]:
        """``n`` good samples of ``split`` from position ``start`` on (cycling); bad records are
        skipped, counted in ``skipped`` and logged once each."""
        order = self.splits[split]
        if len(self._bad & set(order)) == len(order):
            raise self._exhausted(split)
        out: List[RecordSample] = []
        pos = start
        while len(out) < n:
            i = order[pos % len(order)]
            pos += 1
            if i in self._bad:
                continue
            try:
                out.append(self.load(i))
            except RecordError as e:
                self._skip(i, e)
                if len(self._bad & set(order)) == len(order):
                    raise self._exhausted(split) from None
        return out

    def _exhausted(self, split: str) -> ConfigError:
        """The data's problem when no record of ``split`` is usable (one ``config:`` line)."""
        return ConfigError(f"config: `task.data_path`: every record of the {split!r} split is "
                           f"unusable ({dict(self.skipped)})")

    @staticmethod
    def images(s: RecordSample) -> List[Tensor]:
        return [s.image]

    @staticmethod
    def prompt(s: RecordSample) -> List[Dict[str, Any]]:
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image", "image": s.image},
                                             {"type": "text", "text": s.question}]}]

    def counts(self) -> Tuple[int, Dict[str, int]]:
        return len(self.records), dict(self.skipped)
