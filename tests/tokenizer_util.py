"""A small BPE tokenizer trained here with the `tokenizers` library (no download)."""

from functools import lru_cache

from tokenizers import (Regex, Tokenizer, decoders, models, pre_tokenizers, processors,
                        trainers)

# </s> is not id 2: transformers treats a CLIP eos_token_id of 2 as the legacy argmax pooling
SPECIAL = ["<pad>", "<s>", "<unk>", "</s>"]
CORPUS = [
    "<tool_call>{\"name\": \"image_zoom_in_tool\", \"arguments\": {\"bbox_2d\": [10, 20, 110, "
    "220], \"label\": \"sign\"}}</tool_call>",
    "<tool_response>error: box outside the image</tool_response>",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>",
    "<description>a red circle next to the digit 7</description>",
    "<answer>B</answer> The sign says 42. Let me zoom in on the top left corner.",
    "What colour is the small square? a blue triangle, green square, yellow star",
]


@lru_cache(maxsize=None)
def bpe_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|?/?[a-z_]+\|?>"), behavior="isolated"),
        pre_tokenizers.Whitespace()])
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=vocab_size,
                                                             special_tokens=SPECIAL))
    return tok


@lru_cache(maxsize=None)
def clip_tokenizer(max_length: int = 16):
    """The BPE tokenizer as a transformers tokenizer that wraps each text in <s> ... </s>."""
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_str(bpe_tokenizer().to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=max_length)


@lru_cache(maxsize=None)
def byte_level_tokenizer(vocab_size: int = 300):
    """A byte-level BPE (decode gives back the exact text), as a transformers tokenizer with
    the tool-protocol tags as single tokens."""
    from transformers import PreTrainedTokenizerFast
    tags = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
            "<description>", "</description>", "<answer>", "</answer>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"] + tags,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
