"""A byte-level BPE tokenizer trained here on a task's own text (the ``tokenizers`` library, no
download), with Qwen2-VL's chat and vision tokens and the tool protocol's tags as single tokens.
Byte-level: ``decode(encode(text)) == text`` for any text, so tool calls the model writes are
read back exactly."""

from __future__ import annotations

from typing import Any, Iterable, List

from ..trajectory import ANSWER_TAG, DESCRIPTION_TAG, TEXT_RESPONSE_PATTERN, TOOL_CALL_TAG

#: Chat and vision markers (Qwen2-VL names); ``<|im_end|>`` ends a turn (the EOS).
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
#: Tool-protocol tags, kept whole (decoded as text).
TAG_TOKENS = [f"<{TOOL_CALL_TAG}>", f"</{TOOL_CALL_TAG}>", *TEXT_RESPONSE_PATTERN,
              f"<{DESCRIPTION_TAG}>", f"</{DESCRIPTION_TAG}>", f"<{ANSWER_TAG}>", f"</{ANSWER_TAG}>"]


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 512) -> Any:
    """Trains a byte-level BPE of ``vocab_size`` tokens on ``texts`` and returns it as a
    ``transformers.PreTrainedTokenizerFast`` (pad ``<pad>``, EOS ``<|im_end|>``). The result
    depends only on ``texts`` and ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"build_tokenizer: `vocab_size` must be an int >= 300 (256 bytes + "
                         f"markers), got {vocab_size!r}")
    corpus: List[str] = list(texts)
    if not corpus:
        raise ValueError("build_tokenizer: `texts` is empty")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + TAG_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tok)


def _wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])


def tokenizer_from_string(text: str) -> Any:
    """A tokenizer ``build_tokenizer`` made, back from its JSON text (``backend_tokenizer.
    to_str()``, as checkpoints store it)."""
    from tokenizers import Tokenizer
    return _wrap(Tokenizer.from_str(text))


def vision_token_ids(tokenizer: Any) -> dict:
    """The config entries a Qwen2/2.5-VL model needs for this tokenizer's vision markers."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"),
            "vision_end_token_id": ids("<|vision_end|>")}
