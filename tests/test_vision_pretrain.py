"""Vision pretraining: the crops it trains on are the zoom tool's own (same boxes, same
pixels), their labels name the drawn colour (not the tint), a short stage teaches the tower to
read checker crops, the frozen tower stays frozen through the warm start, RL and a resume, and
its settings are refused where they cannot work."""

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
from mapo_fast.rollout.multimodal import VisionAdapter  # noqa: E402
from mapo_fast.tasks.visual_search import VisualSearchTask  # noqa: E402
from mapo_fast.tools import ToolRunner  # noqa: E402
from mapo_fast.trainer import ConfigError, Trainer, parse_args  # noqa: E402
from mapo_fast.trainer.vision_pretrain import crop_features  # noqa: E402
from test_trainer import TOY  # noqa: E402


def test_quadrant_crops_are_the_zoom_tools_boxes_with_the_drawn_colour():
    task = VisualSearchTask(3, detail="checker")
    classes = task.crop_classes()
    assert classes == ["red", "green", "blue", "white", "none"]
    for i in range(20):
        s = task.sample("train", i)
        boxes, labels = task.quadrant_crops(s)
        q = 2 * s.quadrant[0] + s.quadrant[1]
        assert classes[labels[q]] == s.answer  # the target's colour, whatever the tint says
        for (r, c), box in zip([(0, 0), (0, 1), (1, 0), (1, 1)], boxes):
            scale = task.image_size / task.view_size  # the tool's box is in view pixels
            assert [b * scale for b in task.quadrant_box((r, c))] == box[1:]


def test_crop_features_see_what_the_zoom_tool_crops(tmp_path):
    """The crops are the zoom tool's: ``ToolRunner`` (at the crop settings the engine gives it)
    running the expert's call on each quadrant returns the same box and the same uint8 crop."""
    from mapo_fast.tools import ToolContext, ToolSession, ZoomInTool, format_tool_call
    from mapo_fast.tools.ops import crop_and_zoom
    trainer = Trainer(parse_args(["--out", str(tmp_path), "--steps", "0"] + TOY +
                                 ["--task.detail", "checker"]), progress=False)
    task, adapter = trainer.task, trainer.adapter
    s = task.sample("train", 0)
    boxes, _ = task.quadrant_crops(s)
    ours = crop_and_zoom([s.image], boxes, **adapter.crop_kwargs)
    runner = ToolRunner(crop_kwargs=adapter.crop_kwargs)
    ctx = ToolContext.for_images([s.image], **adapter.crop_kwargs)
    for k, quadrant in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        call = format_tool_call(ZoomInTool.name, {"bbox_2d": task.quadrant_box(quadrant)})
        (res,) = runner.run([call], [ctx], [ToolSession()])
        assert res.ok and list(res.box) == boxes[k]
        assert torch.equal(res.crop, ours[k])
    feats = crop_features(trainer.model, adapter, [s.image], boxes)
    assert feats.shape[0] == 4 and torch.isfinite(feats).all()
    # one crop alone gives the features it has in the batch (no mixing across crops)
    alone = crop_features(trainer.model, adapter, [s.image], boxes[2:3])
    torch.testing.assert_close(alone[0], feats[2], rtol=1e-4, atol=1e-5)


def test_a_short_stage_teaches_the_tower_to_read_checker_crops(tmp_path):
    args = TOY + ["--task.detail", "checker", "--warm_start.vision_steps", "40",
                  "--warm_start.batch_size", "8", "--warm_start.freeze_vision", "true"]
    trainer = Trainer(parse_args(["--out", str(tmp_path), "--steps", "1"] + args),
                      progress=False)
    report = trainer.vision_report
    # chance is 1/5; the overview's tint is wrong on these crops, the checker cells are not
    assert report["vision_crop_accuracy"] >= 0.9, report
    assert report["vision_tint_wrong_accuracy"] >= 0.8, report
    assert (tmp_path / "vision_pretrain.jsonl").stat().st_size > 0
    visual = {k: v.clone() for k, v in trainer.model.model.visual.state_dict().items()}
    assert not any(p.requires_grad for p in trainer.model.model.visual.parameters())
    summary = trainer.run()
    assert summary["vision_pretrain"] == report
    after = trainer.model.model.visual.state_dict()
    assert all(torch.equal(visual[k], after[k]) for k in visual)  # frozen through it all
    resumed = Trainer(parse_args(["--out", str(tmp_path), "--steps", "2", "--resume"] + args),
                      progress=False)
    assert resumed.vision_report == report  # from the checkpoint, not trained again
    assert not any(p.requires_grad for p in resumed.model.model.visual.parameters())


@pytest.mark.parametrize("args, message", [
    (["--warm_start.vision_steps", "-1"], "`warm_start.vision_steps` must be an int >= 0"),
    (["--warm_start.vision_lr", "0"], "`warm_start.vision_lr` must be > 0"),
    (["--warm_start.freeze_vision", "true"], "`warm_start.freeze_vision` must be false unless "
                                             "warm_start.vision_steps > 0"),
    (["--warm_start.vision_steps", "5", "--task.name", "jsonl", "--task.data_path", "x.jsonl",
      "--model.path", "/nowhere"], "`warm_start.vision_steps` must be 0 unless task.name is "
                                   "'visual_search'"),
])
def test_bad_vision_settings_name_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert message in str(e.value)
