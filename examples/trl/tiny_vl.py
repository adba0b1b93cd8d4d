"""A tiny Qwen2.5-VL for ``train_zoom_mapo.py`` (and the TRL tests), made in code: a local
checkpoint folder (the model and its byte-level BPE, ``build_tokenizer``), its processor
(transformers' ``Qwen2_5_VLProcessor`` without the video part, ``ImageOnlyProcessor``: the
video processor needs torchvision, which a CPU-only install may not have; a Qwen2-VL image
processor on its PIL backend; a chat template), images of colour blocks, and a short
imitation stage that teaches it to call the zoom tool (a random model never does). A real
Qwen2.5-VL checkpoint needs none of this: its own processor, with TRL's chat template."""

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
#: the tool-use trajectories ``warm_start_tool_use`` teaches: a zoom call, then one of two
#: descriptions of the crop and its answer (so a group's samples differ there)
CALL = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 28, 28], "label": "sign"}}
AFTERS = ("<description>a red square</description><answer>red</answer>",
          "<description>blue dots</description><answer>blue</answer>")


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


def processor(folder, chat_template: str = CHAT_TEMPLATE):
    """The checkpoint's processor: its tokenizer, a Qwen2-VL image processor (28-56 px sides)
    and ``chat_template``."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _processor_class()(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56),
        tokenizer=tok, chat_template=chat_template)


def save_tiny_vl(folder, seed: int = 0) -> None:
    """Writes the checkpoint folder: the model and its tokenizer."""
    from mapo_fast.tasks.tokenizer import build_tokenizer
    from mapo_fast.trainer.config import ModelConfig
    from mapo_fast.trainer.model import tiny_vl_model
    import json
    corpus = QUESTIONS + [*AFTERS, f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>",
                          "<tool_response>\n", "\n</tool_response>", "assistant\n",
                          "user\n"] * 8
    tok = build_tokenizer(corpus, vocab_size=400)
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


def _assistant_labels(ids, tok):
    """Labels on the assistant turns' tokens (after ``<|im_start|>assistant\n``, through
    ``<|im_end|>``), -100 elsewhere."""
    start = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(ids, -100)
    i, inside = 0, False
    while i < len(ids):
        if not inside and ids[i:i + len(start)].tolist() == start:
            i, inside = i + len(start), True
            continue
        if inside:
            labels[i] = ids[i]
            inside = int(ids[i]) != end
        i += 1
    return labels


def warm_start_tool_use(folder, proc, rows, steps: int = 160, seed: int = 0) -> None:
    """Teaches the saved model two tool-use trajectories per row (``CALL``, the crop in a tool
    message, then each of ``AFTERS``), rendered by ``proc``'s chat template as a trainer
    renders them, then saves it back: a random model never calls a tool."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mapo_fast.integrations.recipe import pil_image
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    crop = pil_image(torch.zeros(3, 28, 28, dtype=torch.uint8))
    examples = []
    for row, after in [(r, a) for r in rows for a in AFTERS]:
        msgs = row["prompt"] + [
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": CALL}]},
            {"role": "tool", "name": CALL["name"], "content": [{"type": "image"}]},
            {"role": "assistant", "content": after}]
        text = proc.apply_chat_template(msgs, tokenize=False, tools=[_tool_schema()])
        enc = proc(text=[text], images=[row["image"], crop], return_tensors="pt")
        enc["labels"] = _assistant_labels(enc["input_ids"][0], proc.tokenizer)[None]
        examples.append(enc)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = model(**examples[step % len(examples)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)


def _tool_schema():
    from transformers.utils import get_json_schema

    from mapo_fast.integrations.trl import ZoomEnvironment
    return get_json_schema(ZoomEnvironment.image_zoom_in_tool)


def tiny_clip(words, seed: int = 0):
    """A tiny random CLIP (``CLIPModel``, 56-pixel images) and its byte-level BPE trained on
    ``words``: a stand-in verifier for runs that show the wiring, not the scores."""
    from transformers import CLIPConfig, CLIPModel

    from mapo_fast.tasks.tokenizer import build_tokenizer
    torch.manual_seed(seed)
    tok = build_tokenizer(list(words) * 4, vocab_size=300)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64),
                     vision_config=dict(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        image_size=56, patch_size=14), projection_dim=16)
    return CLIPModel(cfg).eval(), tok
