"""RolloutEngine on a tiny Qwen2.5-VL built from a config: a chat prompt with an image and three
zoom-in tool turns whose crops come back as image tokens, token for token equal to a naive loop
that re-runs the Hugging Face model (vision tower included) on the whole history for every
token; M-RoPE positions equal transformers' ``get_rope_index``; the vision tower runs once per
prompt image and once per crop.

Tolerance for log-probs: the paged attention and the separately batched vision-tower passes sum
in another order than the HF model's full forward (fp32), so values agree to ~1e-5; 1e-4 is
the bound."""

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from mapo_fast import crop_to_patches  # noqa: E402
from mapo_fast.rollout.engine import RolloutEngine  # noqa: E402
from mapo_fast.rollout.multimodal import VisionAdapter, render_chat  # noqa: E402
from mapo_fast.tasks.tokenizer import (SPECIAL_TOKENS, TAG_TOKENS, build_tokenizer,  # noqa: E402
                                       vision_token_ids)  # noqa: E402
from mapo_fast.tools import ToolContext, ToolRunner  # noqa: E402

#: every test once eagerly and once on the static decode path (padded, static buffers)
pytestmark = pytest.mark.usefixtures("each_decode_mode", "pack_tiny_linears")
PIX = dict(min_pixels=28 * 28, max_pixels=112 * 112)
CALLS = ['<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
         f'[{a}, {b}, {c}, {d}]}}}}</tool_call>' for a, b, c, d in
         [(0, 0, 40, 40), (30, 20, 100, 80), (60, 50, 90, 80)]]
TEMPLATE = "<tool_response>{}</tool_response>"


@pytest.fixture(scope="module")
def vl():
    tok = build_tokenizer(CALLS * 20 + ["What is in the picture? <description>a red square"
                                        "</description><answer>red</answer>"] * 20,
                          vocab_size=400)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=3,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        bos_token_id=None, eos_token_id=tok.eos_token_id, **vision_token_ids(tok))
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 130, 170), dtype=torch.uint8, generator=g)
    return model, tok, image


class _ForcedCalls:
    """Lets the model write `free` tokens of its own at the start of each turn, then forces the
    turn's tool call (turns after the scripted calls are left free)."""

    def __init__(self, tok, free):
        self.end = tok.convert_tokens_to_ids("</tool_response>")
        self.scripts = [tok(c, add_special_tokens=False)["input_ids"] for c in CALLS]
        self.free, self.prompt_len = free, None
        # free tokens never write protocol tags or markers (a random model might)
        self.banned = tok.convert_tokens_to_ids(SPECIAL_TOKENS + TAG_TOKENS)

    def __call__(self, tokens, logits):
        ends = [i for i, t in enumerate(tokens) if t == self.end]
        turn = len(ends)
        i = len(tokens) - (ends[-1] + 1 if ends else self.prompt_len) - self.free
        if turn < len(self.scripts) and i >= 0:
            forced = torch.full_like(logits, float("-inf"))
            forced[self.scripts[turn][min(i, len(self.scripts[turn]) - 1)]] = 0.0
            return forced
        logits = logits.clone()
        logits[self.banned] = float("-inf")
        return logits


def _naive(model, tok, image, prompt_ids, proc, max_new_tokens, max_turns, banned):
    """Greedy multi-turn loop with the HF model alone: every new token comes from a full forward
    over the whole history with all images so far; tool calls run through the same runner."""
    runner = ToolRunner(crop_kwargs=dict(factor=28, **PIX))
    ctx = ToolContext.for_images([image], 28, **PIX)
    from mapo_fast.tools import ToolSession
    sess = ToolSession()
    adapter = VisionAdapter(model, **PIX)
    tokens, boxes, logps = list(prompt_ids), [(0, 0, 0, image.shape[2], image.shape[1])], []
    turn_start, turns = len(tokens), 0
    new = 0
    while True:
        pv, grid = crop_to_patches([image], boxes, patch_size=14, merge_size=2, **PIX)
        ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                           mm_token_type_ids=(ids == model.config.image_token_id).int()
                           ).logits[0, -1].float()
        # the recorded log-prob is the policy's: the model's logits without the banned vision
        # tokens (mapo_fast.policy); the processor only chooses the token
        policy = logits.clone()
        policy[list(banned)] = float("-inf")
        logp = torch.log_softmax(policy, -1)
        logits = proc(tokens, policy)
        t = int(logits.argmax())
        tokens.append(t)
        logps.append(float(logp[t]))
        new += 1
        text = tok.decode(tokens[turn_start:])
        if turns + 1 < max_turns and text.endswith("</tool_call>"):
            res = runner.run([text], [ctx], [sess])[0]
            assert res.ok, res.text
            boxes.append((0, *res.box[1:]))
            _, g = crop_to_patches([image], [boxes[-1]], patch_size=14, merge_size=2, **PIX)
            pre, post = TEMPLATE.split("{}")
            obs = tok(pre, add_special_tokens=False)["input_ids"] + adapter.placeholder(
                tuple(g[0].tolist())) + tok(post, add_special_tokens=False)["input_ids"]
            tokens += obs
            logps += [0.0] * len(obs)
            turn_start, turns, new = len(tokens), turns + 1, 0
        elif new >= max_new_tokens:
            return tokens, logps


def test_multi_turn_crops_equal_a_naive_hf_loop(vl):
    model, tok, image = vl
    chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in the picture?"}]}]
    prompt_ids, _ = render_chat(chat, tok, VisionAdapter(model, **PIX))
    prompt_len = len(prompt_ids)
    proc = _ForcedCalls(tok, free=3)
    proc.prompt_len = prompt_len
    max_new = 3 + max(len(s) for s in proc.scripts)
    eng = RolloutEngine(model, tok, block_size=16, num_blocks=64, **PIX)
    trajs = eng.generate([chat], group_size=2, max_new_tokens=max_new, temperature=0.0,
                         tools=ToolRunner(), max_turns=4, stop_token_ids=[], max_observation_tokens=32,
                         observation_template=TEMPLATE, logits_processor=proc)
    assert trajs[0].token_ids[:prompt_len] == prompt_ids
    want, want_lp = _naive(model, tok, image, prompt_ids, proc, max_new, max_turns=4,
                           banned=eng.banned_tokens)
    for t in trajs:
        assert t.token_ids == want
        torch.testing.assert_close(torch.tensor(t.logprobs), torch.tensor(
            [0.0] * prompt_len + want_lp), atol=1e-4, rtol=0)
        assert len(t.spans.turns) == 3 and all(turn.ok for turn in t.spans.turns)
        assert len(t.crops) == 3 and [turn.crop_index for turn in t.spans.turns] == [0, 1, 2]
        for turn in t.spans.turns:
            obs = t.token_ids[turn.observation.start:turn.observation.end]
            assert obs.count(model.config.image_token_id) > 0
            assert set(t.loss_mask[turn.observation.start:turn.observation.end]) == {0}
    # vision tower: the prompt image once for the group, each sample's 3 crops once
    assert eng.stats["vision_images"] == 1 + 2 * 3
    assert eng.stats["prefill_tokens"] == prompt_len + 2 * sum(
        len(turn.observation) for turn in trajs[0].spans.turns)
    assert eng.blocks.num_free == eng.num_blocks


def test_mrope_positions_equal_get_rope_index(vl):
    model, tok, image = vl
    adapter = VisionAdapter(model, **PIX)
    grids = [(1, 8, 10), (1, 4, 6)]
    toks = [9, 10] + adapter.placeholder(grids[0]) + [11] * 3 + adapter.placeholder(grids[1]) \
        + [12, 13]
    got, nxt = adapter.positions(toks, grids, 0)
    ids = torch.tensor([toks])
    want, delta = model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == model.config.image_token_id).int(),
        image_grid_thw=torch.tensor(grids))
    assert torch.tensor(got).T.tolist() == want[:, 0].tolist()
    assert nxt == len(toks) + int(delta)
    # continuing after the first image (where an observation would start) gives the same
    # positions as one pass
    cut = 2 + len(adapter.placeholder(grids[0])) + 1
    head, p = adapter.positions(toks[:cut], grids[:1], 0)
    tail, p2 = adapter.positions(toks[cut:], grids[1:], p)
    assert head + tail == got and p2 == nxt


def test_image_prompt_errors(vl):
    model, tok, image = vl
    eng = RolloutEngine(model, tok, block_size=16, num_blocks=64, **PIX)
    bad = [{"role": "user", "content": [{"type": "image", "image": image.float()}]}]
    with pytest.raises(ValueError, match=r"`prompts\[0\]` message 0 part 0: an image must be a "
                                         r"uint8 \[3, H, W\] tensor"):
        eng.generate([bad])
    with pytest.raises(ValueError, match=r"`prompts\[0\]` has image-pad tokens but only 0 image"):
        eng.generate([[1, 2] + [model.config.image_token_id] * 4])
