"""The framework-free MAPO recipe (``mapo_fast.integrations.recipe``) and TRL's pieces of it that
need no TRL (``ZoomEnvironment``, ``MAPOTurnScores``), in the main environment: turns are found
in token ids as generated (not re-encoded), observations wrapped in a tool message count, the
crops are ``ToolRunner``'s, every description of a batch is scored in one verifier call, and
the advantages are ``mapo_advantages``'s."""

import json

import pytest
import torch

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from mapo_fast import mapo_advantages  # noqa: E402
from mapo_fast.integrations.recipe import TurnScorer, image_tensor, pil_image  # noqa: E402
from mapo_fast.integrations.trl import (MAPOTurnScores, ZoomEnvironment,  # noqa: E402
                                        ZoomToolError)
from mapo_fast.rewards.verifier import SemanticVerifier  # noqa: E402
from mapo_fast.tasks.tokenizer import build_tokenizer  # noqa: E402
from mapo_fast.tools.protocol import (ToolContext, ToolRunner, ToolSession,  # noqa: E402
                                      format_tool_call)
from mapo_fast.tools.ops import smart_resize  # noqa: E402
from mapo_fast.trajectory import spans_from_ids, spans_from_text  # noqa: E402

RESIZE = dict(min_pixels=28 * 28, max_pixels=56 * 56)


class Recording(SemanticVerifier):
    """Scores a crop by its mean grey level / 255 and records each call's batch."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def _score(self, descriptions, crops, regions):
        self.calls.append((list(descriptions), [c.clone() for c in crops]))
        return torch.stack([c.float().mean() / 255 for c in crops])


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def call(box):
    return "<tool_call>\n" + json.dumps({"name": "image_zoom_in_tool",
                                         "arguments": {"bbox_2d": box}}) + "\n</tool_call>"


IMAGE = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"


def response(tok, *turns, answer="red"):
    """Token ids of a response: each turn ``(box, description, ok)`` is a call, its tool
    message (the crop's image tokens, or an error text) and the description."""
    text = ""
    for box, desc, ok in turns:
        obs = IMAGE if ok else "Error: bbox_2d reaches outside the image"
        text += f"{call(box)}<|im_end|>\n<|im_start|>user\n<tool_response>\n{obs}\n" \
                f"</tool_response><|im_end|>\n<|im_start|>assistant\n"
        if desc is not None:
            text += f"<description>{desc}</description>"
    return tok.encode(text + f"<answer>{answer}</answer>", add_special_tokens=False)


def test_spans_from_ids_uses_the_ids_as_generated(tok):
    """A tokenization the tokenizer would not produce (every character its own token): the
    spans index those ids, where re-encoding the text would shift them."""
    text = call([0, 0, 28, 28]) + "<tool_response>" + IMAGE + "</tool_response>" + \
        "<description>a cat</description>"
    canonical = tok.encode(text, add_special_tokens=False)
    pieces = [tok.convert_tokens_to_ids(t) for t in tok.convert_ids_to_tokens(canonical)]
    # split the first multi-character token into single bytes: a non-canonical sequence
    first = tok.convert_ids_to_tokens(pieces[:1])[0]
    ids = [tok.convert_tokens_to_ids(c) for c in first] + pieces[1:]
    assert len(ids) > len(canonical)
    sp = spans_from_ids(ids, tok)
    (turn,) = sp.turns
    assert turn.ok and turn.description_text == "a cat"
    assert tok.decode(ids[turn.description.start:turn.description.end]) == \
        "<description>a cat</description>"
    # the tool message wrapping the image is the crop's observation, not an error
    assert tok.decode(ids[turn.observation.start:turn.observation.end],
                      skip_special_tokens=False) == IMAGE
    assert spans_from_text(text, tok)[1].turns[0].ok


def test_turn_scorer_recomputes_toolrunners_crops_and_scores_in_one_call(tok):
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 112, 112), generator=g, dtype=torch.uint8)
              for _ in range(3)]
    responses = [response(tok, ([0, 0, 28, 28], "a red square", True),
                          ([28, 0, 56, 28], None, True)),
                 response(tok, ([0, 0, 90, 90], "x", False), ([0, 28, 28, 56], "dots", True)),
                 response(tok)]
    verifier = Recording()
    scorer = TurnScorer(verifier, tok, **RESIZE)
    out = scorer.score(responses, [pil_image(images[0]), images[1], images[2]])
    assert len(verifier.calls) == 1  # the whole batch in one verifier call
    descriptions, crops = verifier.calls[0]
    assert descriptions == ["a red square", "dots"]  # a missing description is not sent
    # the crops are ToolRunner's for the same calls on the same images
    for (b, box), crop in zip([(0, [0, 0, 28, 28]), (1, [0, 28, 28, 56])], crops):
        ctx = ToolContext([images[b]], [smart_resize(112, 112, **RESIZE)])
        (want,) = ToolRunner().run([call(box)], [ctx], [ToolSession()])
        assert torch.equal(crop, want.crop)
    assert out.mask.tolist() == [[True, True], [True, False], [False, False]]
    assert out.scores[0, 1] == 0.0  # no description: the verifier's minimum score
    assert out.stats["crops"] == 3 and out.stats["scored"] == 3
    for b, ids in enumerate(responses):
        want = spans_from_ids(ids, tok).token_turn(len(ids))
        assert out.token_turn[b, :len(ids)].tolist() == want.tolist()
    spans = out.turn_spans(0)
    assert [s[:2] for s in spans] == [(0, int((out.token_turn[0] == 0).sum())),
                                      (int((out.token_turn[0] == 0).sum()),
                                       int((out.token_turn[0] >= 0).sum()))]
    with pytest.raises(ValueError, match="3 responses but 2 images"):
        scorer.score(responses, images[:2])
    with pytest.raises(ValueError, match=r"images\[0\]: expected a PIL image"):
        scorer.score(responses[:1], ["not an image"])


def test_advantages_are_mapo_advantages_with_the_outcome_part_given(tok):
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 56, 56), generator=g, dtype=torch.uint8)] * 4
    responses = [response(tok, ([0, 0, 28, 28], "a", True)),
                 response(tok, ([28, 28, 56, 56], "b", True)),
                 response(tok, ([0, 28, 28, 56], "c", True), ([0, 0, 56, 56], "d", True)),
                 response(tok)]
    out = TurnScorer(Recording(), tok, **RESIZE).score(responses, images)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1])
    outcome = mapo_advantages(rewards, groups, algo="grpo")
    for kw in (dict(), dict(semantic_coef=0.3, turn_discount=0.5), dict(norm_std=False)):
        got = out.advantages(outcome if kw.get("norm_std", True) else
                             mapo_advantages(rewards, groups, algo="grpo", norm_std=False),
                             groups, **kw)
        want = mapo_advantages(rewards, groups, out.scores, out.mask, out.token_turn, **kw)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_zoom_environment_answers_as_toolrunner(tok):
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (3, 60, 90), generator=g, dtype=torch.uint8)
    env = ZoomEnvironment(**RESIZE)
    with pytest.raises(RuntimeError, match="before reset"):
        env.image_zoom_in_tool([0, 0, 10, 10])
    with pytest.raises(ValueError, match=r"the row has no 'image' \(or 'images'\) column; its "
                                         r"columns: \['prompt'\]"):
        env.reset(prompt="hi")
    env.reset(prompt="hi", image=pil_image(img))
    ctx = ToolContext([img], [smart_resize(60, 90, **RESIZE)])
    for box in ([0, 0, 28, 28], [-5, 0, 10, 10], [0, 0, 1, 1], [10, 10, 5, 5]):
        (want,) = ToolRunner().run([format_tool_call("image_zoom_in_tool",
                                                     {"bbox_2d": box, "label": ""})],
                                   [ctx], [ToolSession()])
        if want.ok:
            got = env.image_zoom_in_tool(box)
            assert torch.equal(image_tensor(got[0]["image"]), want.crop)
        else:  # raised, so that TRL counts a failed call; the text is the tool's
            with pytest.raises(ZoomToolError) as refused:
                env.image_zoom_in_tool(box)
            assert str(refused.value) == want.text and want.text.startswith("Error: ")
    env = ZoomEnvironment(max_calls=1, **RESIZE)
    env.reset(images=[img])
    assert isinstance(env.image_zoom_in_tool([0, 0, 28, 28]), list)
    with pytest.raises(ZoomToolError, match="too many tool calls"):
        env.image_zoom_in_tool([0, 0, 28, 28])
    with pytest.raises(ValueError, match=r"`max_calls` must be an int >= 0, got -1"):
        ZoomEnvironment(max_calls=-1)


def test_tensor_image_fields_turns_numpy_grids_into_tensors():
    """What TRL 1.16's tool loop needs of ``apply_chat_template``'s image fields: tensors
    (it calls ``image_grid_thw.prod(-1)``); other fields untouched; applied once."""
    import numpy as np

    from mapo_fast.integrations.trl import tensor_image_fields

    class Proc:
        calls = 0

        def apply_chat_template(self, conversation, **kwargs):
            Proc.calls += 1
            return {"input_ids": [[1, 2, 3]], "pixel_values": np.ones((4, 6), np.float32),
                    "image_grid_thw": [np.array([1, 2, 2])]}
    proc = Proc()
    assert tensor_image_fields(tensor_image_fields(proc)) is proc
    out = proc.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert Proc.calls == 1 and out["input_ids"] == [[1, 2, 3]]
    assert isinstance(out["pixel_values"], torch.Tensor) and out["pixel_values"].shape == (4, 6)
    assert out["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert out["image_grid_thw"].prod(-1).tolist() == [4]
    assert tensor_image_fields(object()) is not None  # nothing to wrap


def test_mapo_turn_scores_on_a_trl_batch(tok):
    """``MAPOTurnScores`` reads TRL's batch: completion ids padded after their mask, TRL's
    outcome advantages, the rows' images, the group ids; returns ``[B, T]``."""
    import types
    img = torch.randint(0, 256, (3, 56, 56), generator=torch.Generator().manual_seed(3),
                        dtype=torch.uint8)
    responses = [response(tok, ([0, 0, 28, 28], "a", True)), response(tok)]
    T = max(map(len, responses)) + 3
    ids = torch.full((2, T), tok.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(responses):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    proc = types.SimpleNamespace(tokenizer=tok, image_processor=types.SimpleNamespace(
        min_pixels=RESIZE["min_pixels"], max_pixels=RESIZE["max_pixels"], patch_size=14,
        merge_size=2))
    fn = MAPOTurnScores(Recording(), proc, semantic_coef=0.5)
    batch = {"completion_ids": ids, "completion_mask": mask,
             "advantages": torch.tensor([0.7, -0.7]), "group_ids": torch.tensor([0, 0]),
             "inputs": [{"image": img}, {"image": img}]}
    adv = fn(batch)
    turns = TurnScorer(Recording(), tok, **RESIZE).score(responses, [img, img])
    want = turns.advantages(batch["advantages"], batch["group_ids"], semantic_coef=0.5)
    assert adv.shape == (2, T)
    torch.testing.assert_close(adv[:, :want.shape[1]], want)
    assert fn.metrics["scored"] == 1
    with pytest.raises(ValueError, match=r"inputs\[1\] has no 'image'"):
        fn(dict(batch, inputs=[{"image": img}, {"prompt": "x"}]))


#: the two-process check's batch: 6 completions in groups of 2, 3 per process, so that group 1
#: (rows 2 and 3) is split between the processes, as TRL splits it when the per-device batch
#: is not a multiple of the group size
SPLIT = dict(rows=6, group=2)


def split_batch(rank: int, world: int):
    """TRL's batch of process ``rank`` of ``world`` (``world=1``: the whole batch) and a
    ``MAPOTurnScores`` for it; every process builds the same completions."""
    import types
    tokenizer = _tokenizer()
    g = torch.Generator().manual_seed(4)
    imgs = [torch.randint(0, 256, (3, 56, 56), generator=g, dtype=torch.uint8)
            for _ in range(SPLIT["rows"])]
    turns = [[([0, 0, 28, 28], "a", True)], [([28, 28, 56, 56], "b", True)],
             [([0, 28, 28, 56], "c", True), ([0, 0, 56, 56], "d", True)],
             [([10, 10, 40, 40], "g", True)], [([14, 14, 42, 42], "e", True)], []]
    responses = [response(tokenizer, *t) for t in turns]
    B = SPLIT["rows"] // world
    rows = range(rank * B, (rank + 1) * B)
    T = max(len(responses[r]) for r in rows) + 2  # each process pads to its own longest
    ids = torch.full((B, T), tokenizer.pad_token_id)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(responses[r])], mask[i, :len(responses[r])] = torch.tensor(responses[r]), 1
    outcome = torch.tensor([0.9, -0.9, 0.4, -0.4, 0.0, 0.0])[list(rows)]
    proc = types.SimpleNamespace(tokenizer=tokenizer, image_processor=types.SimpleNamespace(
        min_pixels=RESIZE["min_pixels"], max_pixels=RESIZE["max_pixels"], patch_size=14,
        merge_size=2))
    batch = {"completion_ids": ids, "completion_mask": mask, "advantages": outcome,
             "group_ids": torch.tensor(list(rows)) // SPLIT["group"],
             "inputs": [{"image": imgs[r]} for r in rows],
             "process_index": rank, "num_processes": world}
    return batch, MAPOTurnScores(Recording(), proc, semantic_coef=0.7, turn_discount=0.5)


def _tokenizer():
    call = format_tool_call("image_zoom_in_tool", {"bbox_2d": [0, 0, 28, 28]})
    return build_tokenizer([call, "<description>a red square</description><answer>red"
                            "</answer>", "<tool_response>Error: bbox</tool_response>"] * 8,
                           vocab_size=360)


def test_mapo_turn_scores_over_two_processes_equal_one_process(tmp_path):
    """Two gloo processes, each with 3 of the 6 completions (a group split between them):
    each process's advantages equal the rows of a one-process run over the whole batch, to
    float32 rounding (the same sums in the same order: 1e-6)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    worker = Path(__file__).resolve().parent / "turn_scores_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(worker), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole_batch, fn = split_batch(0, 1)
    whole = fn(whole_batch)
    assert fn.metrics["scored"] == 6
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        want = whole[3 * rank:3 * rank + 3, :got.shape[1]]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # normalising each process's rows alone (what a per-process normaliser does) differs
    _, fn0 = split_batch(0, 1)
    part, _ = split_batch(0, 2)
    local = fn0(dict(part, num_processes=1, process_index=0))
    assert not torch.allclose(local, whole[:3, :local.shape[1]], atol=1e-3)
