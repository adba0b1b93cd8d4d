"""A tiny Qwen2.5-VL saved as a local checkpoint folder (the model and its byte-level BPE,
``build_tokenizer``), and its processor: transformers' ``Qwen2_5_VLProcessor`` without the
video part (``ImageOnlyProcessor``: the video processor needs torchvision, which these CPU
environments do not have), with a Qwen2-VL image processor (PIL backend) and a chat template
in Qwen2.5-VL's format (tools, images, tool responses). Images are made in code."""

from __future__ import annotations

import torch

#: Qwen2.5-VL's chat format, cut to what these tests render: system / user / assistant / tool
#: turns, image parts, the tool list and ``<tool_call>`` blocks of assistant messages.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call tools. <tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "For each call return <tool_call>{\"name\": <name>, \"arguments\": <args>}</tool_call>"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>user\n<tool_response>"
    "{% else %}<|im_start|>{{ message['role'] }}\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{% for call in message['tool_calls'] %}<tool_call>{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}</tool_call>{% endfor %}{% endif %}"
    "{% if message['role'] == 'tool' %}</tool_response>{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QUESTIONS = ["What colour is the square?", "What is written on the sign?",
             "How many dots are there?", "Which shape is red?"]


def _processor_class():
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` whose sub-processors are the image processor and the
        tokenizer (its ``__init__`` without ``video_processor``)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.video_processor = None
    return ImageOnlyProcessor


def processor(folder):
    """The checkpoint's processor: its tokenizer, a Qwen2-VL image processor (28-56 px sides)
    and ``CHAT_TEMPLATE``."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _processor_class()(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56),
        tokenizer=tok, chat_template=CHAT_TEMPLATE)


def save_tiny_vl(folder, seed: int = 0) -> None:
    """Writes the checkpoint folder: the model and its tokenizer."""
    from mapo_fast.tasks.tokenizer import build_tokenizer
    from mapo_fast.trainer.config import ModelConfig
    from mapo_fast.trainer.model import tiny_vl_model
    corpus = QUESTIONS + ["<description>a red square</description>", "<answer>red</answer>",
                          '<tool_call>{"name": "zoom", "arguments": {"bbox_2d": [0, 0, 28, 28]}}'
                          '</tool_call>'] * 4
    tok = build_tokenizer(corpus, vocab_size=320)
    model = tiny_vl_model(ModelConfig(hidden_size=64, intermediate_size=64,
                                      vision_hidden_size=32), tok, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def image(seed: int, size: int = 56):
    """A PIL image of random colour blocks."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (size // 14, size // 14, 3), generator=g, dtype=torch.uint8)
    px = px.repeat_interleave(14, 0).repeat_interleave(14, 1)
    return Image.fromarray(px.numpy())
