"""``mapo-eval``: a policy on a multiple-choice benchmark file, the way papers report it.

The policy is a ``mapo-train`` checkpoint (a ``.pt`` file, or a run folder: its newest intact
checkpoint) or a Hugging Face Qwen2-VL / Qwen2.5-VL folder. Each question is rolled out by
``RolloutEngine`` with the zoom tool, the real-data protocol (``tasks.records.SYSTEM``), the
observation template of training, and scored by training's answer parser (``AccuracyReward``
in ``choice`` mode, or the option's text). Greedy (``samples=1, temperature=0``) or sampled:
``samples`` draws per question, pass@k for k = 1, 2, 4, ... up to ``samples`` (the unbiased
estimator ``1 - C(n-c, k) / C(n, k)``).

Outputs in ``out``: ``samples.jsonl`` (one line per question, written after every batch:
a stopped run resumes from it, and a resumed run equals an uninterrupted one, because batches
and seeds follow the file's order), ``settings.json`` (what the lines were made with: a resume
with other settings is refused), ``report.json`` and ``report.md``: accuracy overall and per
category with 95% Wilson intervals, tool calls per sample, action accuracy (a zoom holds a
target box's centre) where the file gives boxes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..rewards.outcome import AccuracyReward, extract_answer, normalize_text
from ..tasks.records import RecordError
from ..tools import ToolRunner
from ..trainer.checkpoint import sha256_file
from ..trajectory import OBSERVATION_TEMPLATE, Trajectory
from .benchmark import SYSTEM_PROMPTS, Benchmark, BenchItem

#: two-sided 95% normal quantile (the Wilson interval)
Z95 = 1.959964


@dataclass
class EvalSettings:
    """How each question is rolled out. ``temperature`` 0 is greedy (then ``samples`` must be
    1); ``max_new_tokens`` / ``max_turns`` / pixels None: the checkpoint's training values (a
    Hugging Face folder: 512, 4 and the processor's defaults); ``system``: the system prompt
    (``benchmark.SYSTEM_PROMPTS``: ``records``, the real-data protocol, or ``none``)."""
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None
    max_turns: Optional[int] = None
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    batch_size: int = 8
    seed: int = 0
    system: str = "records"

    def validate(self) -> "EvalSettings":
        def bad(name: str, want: str) -> None:
            raise ValueError(f"mapo-eval: `--{name.replace('_', '-')}` must be {want}, got "
                             f"{getattr(self, name)!r}")
        for name in ("samples", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "an int >= 1")
        for name in ("max_new_tokens", "max_turns", "min_pixels", "max_pixels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(name, "an int >= 1")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            bad("seed", "an int >= 0")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "a finite number >= 0")
        if not (0 < self.top_p <= 1):
            bad("top_p", "in (0, 1]")
        if self.system not in SYSTEM_PROMPTS:
            raise ValueError(f"mapo-eval: `--system` must be one of {list(SYSTEM_PROMPTS)}, "
                             f"got {self.system!r}")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(f"mapo-eval: `--samples` {self.samples} needs `--temperature` > 0 "
                             "(greedy decoding draws the same answer every time)")
        return self


def ks(samples: int) -> List[int]:
    """The k of pass@k reported for ``samples`` draws: 1, 2, 4, ... and ``samples``."""
    out, k = [], 1
    while k < samples:
        out.append(k)
        k *= 2
    return out + [samples]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of ``c`` right answers in ``n`` draws (``k <= n``)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def wilson(mean: float, n: int) -> Tuple[float, float]:
    """The 95% Wilson interval of a mean of ``n`` values in [0, 1] (exact for 0/1 values; for
    fractional ones, such as pass@k per question, it is conservative: their variance is at
    most ``mean * (1 - mean)``)."""
    if n == 0:
        return (float("nan"), float("nan"))
    z2 = Z95 ** 2
    centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---- the policy -------------------------------------------------------------------------------
@dataclass
class Policy:
    """A loaded policy: the model, its tokenizer, where it came from, and the rollout settings
    it was trained with (``defaults``: keys of ``EvalSettings``)."""
    model: Any
    tokenizer: Any
    source: str
    defaults: Dict[str, Any]


def _run_checkpoint(path: str) -> str:
    from ..trainer import checkpoint as ckpt
    folder = os.path.join(path, "checkpoints")
    found = ckpt.list_checkpoints(folder) if os.path.isdir(folder) else []
    for p in reversed(found):
        if ckpt.verify(p) is None:
            return p
    raise ValueError(f"mapo-eval: `--model` {path!r}: no intact checkpoint under {folder}")


def load_policy(path: str, device: torch.device) -> Policy:
    """A ``mapo-train`` checkpoint (file, or run folder) or a Hugging Face Qwen2-VL /
    Qwen2.5-VL folder, on ``device``."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        path = _run_checkpoint(path)
    if os.path.isfile(path):
        return _load_run(path, device)
    if not os.path.isdir(path):
        raise ValueError(f"mapo-eval: `--model` {path!r} is neither a checkpoint file nor a "
                         "folder")
    return _load_hf(path, device)


def _load_run(path: str, device: torch.device) -> Policy:
    from ..trainer import checkpoint as ckpt
    from ..trainer.config import TrainConfig
    from ..trainer.parsing import set_key
    from ..tasks.tokenizer import tokenizer_from_string
    from ..trainer.model import PolicyWithLoss, load_pretrained, tiny_vl_model
    try:
        state = ckpt.load(path)
    except ckpt.CheckpointError as e:
        raise ValueError(f"mapo-eval: `--model`: {e}") from None
    cfg = TrainConfig()
    for key, value in state["config"].items():
        set_key(cfg, key, value)
    if cfg.model.path:
        model, tok = load_pretrained(cfg.model.path, device)
    else:
        tok = tokenizer_from_string(state["tokenizer"])
        model = tiny_vl_model(cfg.model, tok, seed=cfg.seed).to(device)
    PolicyWithLoss(model).load_state_dict(state["model"])
    r, pixels = cfg.rollout, cfg.task.view_size ** 2
    return Policy(model.eval(), tok, path, dict(
        max_new_tokens=r.max_new_tokens, max_turns=r.max_turns,
        min_pixels=r.min_pixels or pixels, max_pixels=r.max_pixels or pixels))


#: model classes by a Hugging Face folder's ``model_type``
HF_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
              "qwen2_vl": "Qwen2VLForConditionalGeneration"}


def _load_hf(path: str, device: torch.device) -> Policy:
    import transformers
    with open(os.path.join(path, "config.json")) as f:
        kind = json.load(f).get("model_type")
    if kind not in HF_CLASSES:
        raise ValueError(f"mapo-eval: `--model` {path!r} is a {kind!r} model; mapo-eval runs "
                         f"{sorted(HF_CLASSES)}")
    cls = getattr(transformers, HF_CLASSES[kind])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Policy(model.eval(), tok, path, dict(max_new_tokens=512, max_turns=4))


# ---- scoring ----------------------------------------------------------------------------------
_CHOICE = AccuracyReward(mode="choice")


def is_right(text: str, item: BenchItem, spans: Any) -> Tuple[bool, Optional[str]]:
    """Whether a response answers ``item`` right (the letter, or the right option's text),
    with the answer it gave."""
    answer = spans.answer_text if spans is not None and spans.answer_text is not None \
        else extract_answer(text)
    if answer is None:
        return False, None
    right = _CHOICE(text, item.answer, spans) == 1.0 or normalize_text(answer) == \
        normalize_text(item.options["ABCDEFGHIJ".index(item.answer)])
    return right, answer


def _hit(box: Sequence[float], targets: Sequence[Sequence[float]]) -> bool:
    _, x1, y1, x2, y2 = box
    return any(x1 <= (a + c) / 2 < x2 and y1 <= (b + d) / 2 < y2 for a, b, c, d in targets)


def score_item(item: BenchItem, trajs: Sequence[Trajectory]) -> Dict[str, Any]:
    """One line of ``samples.jsonl``: each draw's answer, whether it is right, its tool calls
    and (with boxes) whether a zoom held a target."""
    draws = []
    for t in trajs:
        right, answer = is_right(t.response_text, item, t.spans)
        zooms = [turn.box for turn in t.spans.turns if turn.ok]
        draws.append({"right": right, "answer": answer, "tool_calls": len(t.spans.turns),
                      "hit": _hit_any(zooms, item.boxes) if item.boxes else None})
    return {"key": item.key, "line": item.line, "category": item.category,
            "truth": item.answer, "draws": draws}


def _hit_any(zooms: Sequence[Sequence[float]], targets: Sequence[Sequence[float]]) -> bool:
    return any(_hit(z, targets) for z in zooms)


# ---- the run ----------------------------------------------------------------------------------
class Evaluation:
    """One evaluation into ``out`` (see the module doc); ``run()`` does the work left."""

    def __init__(self, policy: Policy, bench: Benchmark, out: str, settings: EvalSettings,
                 *, progress: bool = True):
        self.policy, self.bench, self.out = policy, bench, out
        s = dataclasses.replace(settings).validate()  # the caller's settings left as given
        for k, v in policy.defaults.items():  # the checkpoint's own values where not given
            if getattr(s, k) is None:
                setattr(s, k, v)
        self.settings, self.progress = s, progress
        os.makedirs(out, exist_ok=True)
        self.lines_path = os.path.join(out, "samples.jsonl")
        #: what the lines are made with (``settings.json``; the data file hashed once)
        self.record = self._settings_record()
        self.done = self._resume()

    def _settings_record(self) -> Dict[str, Any]:
        return {"model": os.path.abspath(self.policy.source),
                "data": os.path.abspath(self.bench.path),
                "data_sha256": sha256_file(self.bench.path), **asdict(self.settings)}

    def _resume(self) -> Dict[str, Dict[str, Any]]:
        """The lines already written, after checking that they were made with these
        settings; ``settings.json`` written on a fresh start."""
        want = self.record
        path = os.path.join(self.out, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                have = json.load(f)
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            if diff:
                raise ValueError(f"mapo-eval: `--out` {self.out!r} holds an evaluation made "
                                 f"with other settings ({', '.join(diff)}); use another folder")
        else:
            with open(path, "w") as f:
                json.dump(want, f, indent=1)
        done: Dict[str, Dict[str, Any]] = {}
        if os.path.isfile(self.lines_path):
            with open(self.lines_path) as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except ValueError:  # a line cut by a stop mid-write: redone
                        continue
                    done[rec["key"]] = rec
        return done

    def _engine(self) -> Any:
        from ..rollout import RolloutEngine
        s = self.settings
        kw = {k: getattr(s, k) for k in ("min_pixels", "max_pixels") if getattr(s, k)}
        return RolloutEngine(self.policy.model, self.policy.tokenizer, **kw)

    def run(self) -> Dict[str, Any]:
        """Rolls out every question not yet in ``samples.jsonl``, then writes the reports;
        returns ``report.json``'s content."""
        from ..trainer.metrics import Progress
        s, items = self.settings, self.bench.items
        chunks = [items[i:i + s.batch_size] for i in range(0, len(items), s.batch_size)]
        todo = [(c, chunk) for c, chunk in enumerate(chunks)
                if any(it.key not in self.done for it in chunk)]
        bar = Progress(len(chunks), "mapo-eval", initial=len(chunks) - len(todo),
                       enabled=self.progress)
        engine = self._engine() if todo else None
        with open(self.lines_path, "a") as f:
            for c, chunk in todo:
                for rec in self._chunk(engine, c, chunk):
                    self.done[rec["key"]] = rec
                    f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(c + 1, self.summary()["overall"], ("accuracy",))
        bar.close()
        return self.write_reports()

    def _chunk(self, engine: Any, c: int, chunk: Sequence[BenchItem]) -> List[Dict[str, Any]]:
        """The lines of one batch: images decoded (one that does not is a skipped line), one
        ``generate`` call seeded by the batch's place in the file."""
        s, out, ready = self.settings, [], []
        for it in chunk:
            try:
                ready.append((it, it.load()))
            except RecordError as e:
                out.append({"key": it.key, "line": it.line, "category": it.category,
                            "skipped": e.reason, "why": str(e)})
        if ready:
            draw = dict(temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else \
                dict(temperature=0.0)
            trajs = engine.generate([it.prompt(img, s.system) for it, img in ready],
                                    group_size=s.samples,
                                    max_new_tokens=s.max_new_tokens, tools=ToolRunner(),
                                    max_turns=s.max_turns, observation_template=OBSERVATION_TEMPLATE,
                                    seed=s.seed + c * s.batch_size * s.samples, **draw)
            for i, (it, _) in enumerate(ready):
                out.append(score_item(it, trajs[i * s.samples:(i + 1) * s.samples]))
            engine.clear_prefix_cache()
        return out

    # ---- the report ---------------------------------------------------------------------------
    def summary(self) -> Dict[str, Any]:
        """Accuracy (pass@k), intervals, tool calls and action accuracy, overall and per
        category, over the lines written so far."""
        lines = [r for r in self.done.values() if "draws" in r]
        cats = sorted({r["category"] for r in lines})
        return {"overall": _stats(lines, self.settings.samples),
                "categories": {c: _stats([r for r in lines if r["category"] == c],
                                         self.settings.samples) for c in cats}}

    def write_reports(self) -> Dict[str, Any]:
        skipped: Dict[str, int] = {}
        for r in self.done.values():
            if "skipped" in r:
                skipped[r["skipped"]] = skipped.get(r["skipped"], 0) + 1
        for reason, n in self.bench.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        report = {"settings": self.record, "questions": len(self.bench.items),
                  "skipped_records": skipped, **self.summary()}
        with open(os.path.join(self.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(self.out, "report.md"), "w") as f:
            f.write(markdown(report))
        return report


def _stats(lines: Sequence[Dict[str, Any]], samples: int) -> Dict[str, Any]:
    n = len(lines)
    out: Dict[str, Any] = {"questions": n}
    if n == 0:
        return out
    for k in ks(samples):
        vals = [pass_at_k(len(r["draws"]), sum(d["right"] for d in r["draws"]), k)
                for r in lines]
        mean = sum(vals) / n
        name = "accuracy" if k == 1 else f"pass@{k}"
        out[name], out[f"{name}_ci95"] = mean, wilson(mean, n)
    draws = [d for r in lines for d in r["draws"]]
    out["tool_calls_per_sample"] = sum(d["tool_calls"] for d in draws) / len(draws)
    out["answered"] = sum(d["answer"] is not None for d in draws) / len(draws)
    hits = [d["hit"] for d in draws if d["hit"] is not None]
    out["action_accuracy"] = sum(hits) / len(hits) if hits else None
    out["with_boxes"] = len(hits)
    return out


def markdown(report: Dict[str, Any]) -> str:
    """``report.md``: the settings, then one row per category and the overall row."""
    s = report["settings"]
    k = [key for key in report["overall"] if key.startswith("pass@") and "ci95" not in key]
    head = ["| category | questions | accuracy (95% interval) |"] + \
        [f" {key} |" for key in k] + [" tool calls / sample | action accuracy |"]
    rows = ["".join(head), "|---|---:|---:|" + "---:|" * len(k) + "---:|---:|"]

    def row(name: str, st: Dict[str, Any]) -> str:
        if not st.get("questions"):
            return f"| {name} | 0 | - |" + " - |" * len(k) + " - | - |"
        lo, hi = st["accuracy_ci95"]
        act = "-" if st["action_accuracy"] is None else \
            f"{st['action_accuracy']:.3f} ({st['with_boxes']} draws)"
        return (f"| {name} | {st['questions']} | {st['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |"
                + "".join(f" {st[key]:.3f} |" for key in k)
                + f" {st['tool_calls_per_sample']:.2f} | {act} |")
    rows += [row(c, st) for c, st in report["categories"].items()]
    rows.append(row("**all**", report["overall"]))
    skipped = ", ".join(f"{r}: {n}" for r, n in sorted(report["skipped_records"].items()))
    draw = "greedy" if s["temperature"] == 0 else \
        f"{s['samples']} draws at temperature {s['temperature']:g}, top-p {s['top_p']:g}"
    return (f"# mapo-eval: {os.path.basename(s['data'])}\n\n"
            f"Model `{os.path.basename(s['model'])}`, {report['questions']} usable questions, "
            f"{draw}, at most {s['max_turns']} turns of {s['max_new_tokens']} tokens, seed "
            f"{s['seed']}, system prompt `{s.get('system', 'records')}`. Skipped records: "
            f"{skipped or 'none'}.\n\n" + "\n".join(rows) + "\n\n"
            "Accuracy is the share of questions answered right (with several draws, the mean "
            "per-question pass@1); the interval is Wilson's. Action accuracy: the share of draws "
            "with a zoom that holds a target box's centre, over questions that give boxes.\n")


