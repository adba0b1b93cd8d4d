"""The trainer on the built-in task at toy size: the loop runs (finite loss, parameters move,
metrics and curves written), a resumed run reproduces the uninterrupted one exactly, a kill
during a checkpoint write leaves the previous checkpoint intact, config errors name the key,
and two gloo processes under FSDP2 end with identical parameters."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mapo_fast.kernels._block_manager")
from mapo_fast.trainer import ConfigError, Trainer, parse_args  # noqa: E402
from mapo_fast.trainer import checkpoint as ckpt  # noqa: E402
from mapo_fast.trainer.metrics import STEP_KEYS  # noqa: E402

TOY = ["--warm_start.steps", "2", "--warm_start.batch_size", "2",
       "--rollout.prompts_per_step", "2", "--rollout.group_size", "2",
       "--rollout.max_new_tokens", "20", "--rollout.max_turns", "2", "--task.eval_size", "2",
       "--model.hidden_size", "64", "--model.intermediate_size", "64",
       "--model.vision_hidden_size", "32", "--model.vocab_size", "320",
       "--checkpoint_every", "1", "--keep_checkpoints", "5", "--grad_var_resamples", "2",
       "--optim.micro_batch_size", "3"]


def run(out, steps, *extra):
    trainer = Trainer(parse_args(["--out", str(out), "--steps", str(steps)] + TOY + list(extra)),
                      progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    return trainer, before, summary


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loop_runs_and_writes_everything(tmp_path):
    trainer, before, summary = run(tmp_path, 2)
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert set(STEP_KEYS) <= set(r)
        assert r["loss"] is not None and torch.isfinite(torch.tensor(r["loss"]))
        assert r["tokens_per_s"] > 0
        assert all(r[k] >= 0 for k in r if k.startswith("time_"))
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name in ("curves.png", "eval.json", "warm_start.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0
    assert set(summary["evals"]) == {"warm_start", "final"}
    assert summary["evals"]["final"]["eval_size"] == 2
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == \
        ["step_000000.pt", "step_000001.pt", "step_000002.pt"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, _, _ = run(tmp_path / "full", 3)
    run(tmp_path / "cut", 2)  # interrupted after step 2 (its last checkpoint)
    resumed, _, _ = run(tmp_path / "cut", 3, "--resume")
    want, got = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in got] == [1, 2, 3]  # the curve continues, no duplicate

    def same(r):
        return {k: v for k, v in r.items() if not k.startswith("time_")
                and k not in ("tokens_per_s",)}
    assert same(got[2]) == same(want[2])
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    ckpt.save(str(folder), 1, {"x": torch.arange(3)})

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(str(folder), 2, {"x": torch.arange(5)})
    # no partial file, no step 2
    assert sorted(os.listdir(folder)) == ["step_000001.pt", "step_000001.pt.sha256"]
    assert torch.equal(ckpt.load(ckpt.latest(str(folder)))["x"], torch.arange(3))


def corrupt(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[:len(data) // 2]
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_corrupt_checkpoint_is_never_loaded_and_resume_falls_back(tmp_path, how, capsys):
    folder = str(tmp_path / "ck")
    ckpt.save(folder, 1, {"x": torch.arange(3)})
    ckpt.save(folder, 2, {"x": torch.arange(5)})
    corrupt(os.path.join(folder, "step_000002.pt"), how)
    with pytest.raises(ckpt.CheckpointError, match="step_000002.pt: its SHA-256 does not match"):
        ckpt.load(os.path.join(folder, "step_000002.pt"))
    warned = []
    path, state = ckpt.load_latest(folder, warn=warned.append)
    assert path.endswith("step_000001.pt") and torch.equal(state["x"], torch.arange(3))
    assert len(warned) == 1 and "step_000002.pt is skipped" in warned[0]
    corrupt(os.path.join(folder, "step_000001.pt"), how)
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint under .*step_000002.pt"
                                                   ".*step_000001.pt"):
        ckpt.load_latest(folder, warn=warned.append)


def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path, capsys):
    full, _, _ = run(tmp_path / "full", 3)
    run(tmp_path / "cut", 3)
    corrupt(str(tmp_path / "cut" / "checkpoints" / "step_000003.pt"), "flip")
    resumed, _, _ = run(tmp_path / "cut", 3, "--resume")  # from step 2, redoing step 3
    assert "step_000003.pt is skipped" in capsys.readouterr().err
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in os.listdir(tmp_path / "cut" / "checkpoints"):
        os.remove(tmp_path / "cut" / "checkpoints" / name)
    with pytest.raises(ConfigError, match="`resume`: no checkpoint under"):
        run(tmp_path / "cut", 3, "--resume")


def test_every_global_rng_is_seeded(tmp_path):
    import random

    import numpy as np
    states = []
    for name in ("a", "b"):
        torch.manual_seed(123 if name == "a" else 456)  # what ran before must not matter
        np.random.seed(7 if name == "a" else 8)
        random.seed(name)
        Trainer(parse_args(["--out", str(tmp_path / name)] + TOY), progress=False)
        states.append(ckpt.rng_state())
    a, b = states
    assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"]
    assert all(np.array_equal(x, y) for x, y in zip(a["numpy"][1:3], b["numpy"][1:3]))


@pytest.mark.parametrize("args, message", [
    (["--rollout.memory_budget_mb", "1e-6"], "`rollout.memory_budget_mb`"),
    (["--rollout.memory_budget_mb", "0.05"], "one group of 2 samples may need"),
    (["--out", "/proc/nope"], "`out` '/proc/nope' cannot be created or written"),
] + ([] if torch.cuda.is_available() else
     [(["--device", "cuda"], "`device` 'cuda': no CUDA device is available")]))
def test_trainer_refuses_bad_values_before_any_work(tmp_path, args, message, monkeypatch):
    def no_warm_start(self):
        raise AssertionError("the warm start ran before the configuration was checked")
    monkeypatch.setattr(Trainer, "warm_start", no_warm_start)
    with pytest.raises(ConfigError) as e:
        Trainer(parse_args(["--out", str(tmp_path)] + TOY + args), progress=False)
    assert message in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--rollout.group_sise", "4"], "unknown key `rollout.group_sise`; did you mean "
                                    "`rollout.group_size`"),
    (["--nope", "1"], "unknown key `nope`"),
    # a bare leaf name at the top level: the dotted keys it may mean
    (["--lr", "0.1"], "unknown key `lr`; did you mean `warm_start.lr` or `optim.lr`?"),
    (["--rollout.group_size", "four"], "`rollout.group_size` must be int, got 'four'"),
    (["--rollout.group_size", "0"], "`rollout.group_size` must be an int >= 1, got 0"),
    (["--algo", "ppo"], "`algo` must be one of ['mapo', 'grpo'], got 'ppo'"),
    (["--loss.loss_agg", "mean"], "`loss.loss_agg` must be one of"),
    (["--rollout.top_p", "1.5"], "`rollout.top_p` must be in (0, 1], got 1.5"),
    (["--rollout.decode_mode", "fast"], "`rollout.decode_mode` must be one of ['auto', "),
    (["--rollout.cpu_linear", "mkl"], "`rollout.cpu_linear` must be one of ['auto', 'onednn', "
                                      "'torch'], got 'mkl'"),
    (["--rollout.cpu_malloc", "tcmalloc"], "`rollout.cpu_malloc` must be one of ['auto', "
                                           "'keep'], got 'tcmalloc'"),
    (["--resume", "maybe"], "`resume` must be bool, got 'maybe'"),
    (["--rollout", "3"], "`rollout` is a section"),
    (["--steps"], "`--steps` needs a value"),
    (["steps=3"], "expected `--key value`"),
    (["--task.name", "jsonl"], "`task.data_path` must be a .jsonl or .parquet file"),
    (["--optim.lr", "inf"], "`optim.lr` must be a finite number, got inf"),
    (["--loss.clip_high", "nan"], "`loss.clip_high` must be a finite number, got nan"),
    (["--task.target_size", "500"], "`task.target_size` 500 is too large for a quadrant"),
    (["--rollout.max_pixels", "800"], "`rollout.max_pixels` must be None or at least the "
                                      "task's view"),
    (["--task.expert", "liar"], "`task.expert` must be one of ['hallucinating', 'honest']"),
    (["--task.blind_spot", "left"], "`task.blind_spot` must be one of"),
    (["--task.hint_reliability", "2"], "`task.hint_reliability` must be in [0, 1]"),
    (["--device", "cuda:x"], "`device` must be 'auto', 'cpu' or 'cuda[:i]'"),
    (["--eval_every", "-1"], "`eval_every` must be an int >= 0"),
    # sizes bounded by what the machine holds (config.machine_bytes), each naming the key
    (["--model.layers", "1000000"], "`model.layers` must be small enough for the tiny model"),
    (["--task.distractors", "1000000000"], "`task.distractors` must be at most 48"),
    (["--rollout.memory_budget_mb", "1e12"], "`rollout.memory_budget_mb` must be at most this "
                                             "machine's memory"),
    (["--task.image_size", "100000"], "`task.image_size` must be small enough"),
    (["--task.view_size", "2800000"], "`task.view_size` must be small enough to draw"),
    (["--model.vision_depth", "1000000"], "`model.vision_depth` must be small enough for the "
                                          "tiny model"),
    (["--model.vocab_size", "400000000"], "`model.vocab_size` must be small enough"),
    (["--task.eval_size", "100000000"], "`task.eval_size` must be small enough"),
    (["--seed", str(2 ** 64)], "`seed` must be at most 2147483647"),
    (["--seed", "-1"], "`seed` must be in [0, 2**32)"),
    (["--grad_var_resamples", "100000000"], "`grad_var_resamples` must be at most 4096"),
    # model shapes the architecture cannot run
    (["--model.hidden_size", "60"], "`model.heads` must be such that the head size"),
    (["--model.vision_hidden_size", "70"], "`model.vision_hidden_size` must be such that"),
    (["--model.vision_hidden_size", "34"], "`model.vision_hidden_size` must be such that"),
])
def test_config_errors_name_the_key(args, message):
    with pytest.raises(ConfigError, match=None) as e:
        parse_args(args)
    assert message in str(e.value)


BOMB = "".join(f"  - &{a} [{', '.join([prev] * 9)}]\n" for a, prev in
               zip("abcdefgh", ["lol", "*a", "*b", "*c", "*d", "*e", "*f", "*g"]))


@pytest.mark.parametrize("content, message", [
    (b"seed: \xff\xfe\n", "is not UTF-8 text"),
    (b"1: 2\n", "keys must be strings, got 1"),
    (b"rollout:\n  1: 2\n", "the keys of `rollout` must be strings, got 1"),
    (b"seed: *nowhere\n", "is not valid YAML: found undefined alias"),
    (("out:\n" + BOMB).encode(), "`out` must be str, got [['lol'"),
    (b"- 1\n", "must hold a mapping of keys, got list"),
])
def test_bad_yaml_is_one_short_config_line(tmp_path, content, message):
    """Non-UTF-8 text, non-string keys, YAML errors and an alias bomb (9^8 shared nodes):
    each one line naming the problem, echoing at most ~200 characters, in bounded time."""
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(path)])
    text = str(e.value)
    assert message in text and "\n" not in text and len(text) < 400


def test_huge_values_are_echoed_short():
    for args in (["--rollout.group_size", "x" * 100000], ["--" + "a" * 5000, "1"],
                 ["x" * 100000]):
        with pytest.raises(ConfigError) as e:
            parse_args(args)
        assert len(str(e.value)) < 600


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: grpo\nrollout:\n  group_size: 6\n  temperature: 0.7\n")
    cfg = parse_args(["--config", str(path), "--rollout.group_size", "8"])
    assert (cfg.algo, cfg.rollout.group_size, cfg.rollout.temperature) == ("grpo", 8, 0.7)
    path.write_text("rollout:\n  groupsize: 6\n")
    with pytest.raises(ConfigError, match="unknown key `rollout.groupsize`"):
        parse_args(["--config", str(path)])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args(["--config", str(path)])


def test_two_gloo_ranks_end_with_identical_parameters(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: a free port for the rendezvous (a fixed one can be taken)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mapo_fast.trainer", "--out", str(tmp_path),
           "--steps", "1", "--device", "cpu"] + TOY
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "eval.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2
    sums = summary["parameter_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert [r["step"] for r in records(tmp_path)] == [1]


def test_micro_batch_select_equals_collating_its_rows(tmp_path):
    import dataclasses
    from mapo_fast.trainer.batch import collate
    t = Trainer(parse_args(["--out", str(tmp_path), "--steps", "0"] + TOY), progress=False)
    samples = t.task.batch("train", 0, 5)
    trajs = [t.task.expert_trajectory(s, t.engine, t.expert_tools) for s in samples]
    ims = [t.task.images(s) for s in samples]
    full = collate(trajs, ims, t.adapter, t.tokenizer.pad_token_id)
    for rows in ([1, 3, 4], [2], [0, 1, 2, 3, 4]):
        want = collate([trajs[i] for i in rows], [ims[i] for i in rows], t.adapter,
                       t.tokenizer.pad_token_id)
        got = full.select(rows)
        for f in dataclasses.fields(want):
            assert torch.equal(getattr(got, f.name), getattr(want, f.name)), f.name
    # each expert trajectory's image-pad tokens match its images' patches
    n_pad = int((full.input_ids == t.model.config.image_token_id).sum())
    assert n_pad * 4 == int(full.image_grid_thw.prod(1).sum())


@pytest.mark.parametrize("temperature", ["0.7", "1.0"])
def test_the_first_on_policy_step_has_ratio_one(tmp_path, temperature):
    """The rollout's recorded log-probs and the loss compute one distribution (temperature,
    banned vision tokens: mapo_fast.policy), so the first epoch's ratio is 1 and nothing is
    clipped. Before they shared it, the toy model's ratio was ~0.99 at temperature 1 (the banned
    tokens' mass) and far lower at 0.7."""
    from mapo_fast.trainer.metrics import StepTimer
    trainer = Trainer(parse_args(["--out", str(tmp_path), "--rollout.temperature", temperature,
                                  "--rollout.top_p", "0.9"] + TOY), progress=False)
    assert trainer.numerics.banned_tokens == trainer.engine.banned_tokens != ()
    trainer.warm_start()
    ro = trainer.collect(1, StepTimer())
    upd = trainer.update(ro.batch, trainer.advantages(ro))
    for s in upd.stats:  # every micro-batch of the first epoch (no optimizer step yet)
        assert abs(s["ratio_mean"] - 1) < 1e-5 and abs(s["ratio_max"] - 1) < 1e-4
        assert s["pg_clipfrac"] == 0


def test_the_expert_trajectory_is_what_the_engine_builds(tmp_path):
    """The warm start's targets: the task's expert trajectory, built by the engine from the
    expert's call and answer, holds the same observation tokens the engine's rollout inserts
    for that call (the one observation builder), and the reward weights come from the config."""
    from mapo_fast.trajectory import OBSERVATION_TEMPLATE
    t = Trainer(parse_args(["--out", str(tmp_path), "--steps", "0", "--reward.format", "0.3"]
                           + TOY), progress=False)
    s = t.task.batch("train", 0, 1)[0]
    traj = t.task.expert_trajectory(s, t.engine, t.expert_tools)
    call, answer = t.task.expert_turns(s)
    turn, = traj.spans.turns
    assert t.tokenizer.decode(traj.token_ids[turn.call.start:turn.call.end]) == call
    assert traj.token_ids.count(t.model.config.image_token_id) > 0
    pre = OBSERVATION_TEMPLATE.split("{}")[0]
    assert t.tokenizer.decode(traj.token_ids[turn.observation.start:]).startswith(pre)
    assert t.adapter is t.engine.vision
    assert [w for _, _, w in t.reward.terms] == [1.0, 0.3, 1.0]


def test_forced_openings_answer_at_once_or_zoom_on_the_target(tmp_path):
    # ``evaluate(opening)``: ``no_zoom`` trajectories call no tool and open with the answer;
    # ``right_zoom`` ones begin with the call on the target's quadrant (action accuracy 1)
    from mapo_fast.trainer.rollouts import ForcedOpening, generate
    trainer = Trainer(parse_args(["--out", str(tmp_path), "--steps", "0", *TOY,
                                  "--task.eval_size", "4", "--task.detail", "checker",
                                  "--rollout.max_new_tokens", "64"]), progress=False)
    trainer.warm_start()
    samples = trainer.task.batch("eval", 0, 4)
    for way in ("no_zoom", "right_zoom"):
        trajs = generate(trainer.parts, samples, group_size=1, greedy=True, seed=0,
                         opening=way)
        assert [t.group_id for t in trajs] == [0, 1, 2, 3]
        for s, t in zip(samples, trajs):
            assert t.response_text.startswith(trainer.task.opening(s, way))
    res = trainer.evaluate("no_zoom")
    assert res["tool_use"] == 0.0 and res["action_accuracy"] is None
    res = trainer.evaluate("right_zoom")
    assert res["tool_use"] == 1.0 and res["action_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"`opening` must be one of \['no_zoom', 'wrong_zoom', "
                                         r"'right_zoom'\] or None, got 'peek'"):
        trainer.evaluate("peek")
    trainer.cfg.rollout.max_new_tokens = 20
    with pytest.raises(ValueError, match=r"the 'right_zoom' opening .* takes \d+ tokens, not "
                                         r"fewer than `rollout.max_new_tokens` \(20\)"):
        trainer.evaluate("right_zoom")
    proc = ForcedOpening(3, [7, 9])
    logits = torch.zeros(12)
    assert int(proc([0, 0, 0], logits).argmax()) == 7
    assert torch.isinf(proc([0, 0, 0, 7], logits)).sum() == 11
    assert proc([0, 0, 0, 7, 9], logits) is logits


def test_help_starts_with_a_usage_line_in_plain_text(capsys):
    """``mapo-train --help``: a ``usage:`` line first, no reStructuredText markup, then every
    key with its default."""
    from mapo_fast.cli import train_main
    from mapo_fast.trainer.config import reference
    train_main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: mapo-train [--config FILE.yaml] [--KEY VALUE ...]\n")
    head = text.split("keys, their defaults")[0]
    assert "``" not in head
    for key, *_ in reference():
        assert f"\n  --{key} " in text
