"""Images and questions to verl's RL dataset parquet, for ``run_qwen2_5_vl_mapo.sh``.

Input: a JSONL file, one question a line: ``{"image": "<path>", "question": "...", "answer":
"..."}`` (optional: ``"data_source"``, ``"id"``). Output: a parquet verl's ``RLHFDataset``
reads, one row per question:

- ``prompt``: the system prompt (how to zoom, describe and answer) and the user turn, whose
  text starts with verl's ``<image>`` placeholder;
- ``images``: ``[{"bytes": <the image file>, "min_pixels": ..., "max_pixels": ...}]``: verl
  loads the image through ``qwen_vl_utils.fetch_image``, which resizes it with these bounds;
  they are the zoom tool's (read from ``zoom_tool.yaml``), so the image the model sees, and so
  the pixel frame of the boxes it writes, is the frame the tool and the reward manager crop in
  (without them ``fetch_image`` uses its own default of about 12.8 MP, and on large images the
  boxes land in another frame);
- ``reward_model``: ``{"ground_truth": answer, "style": "rule"}``; ``data_source``;
  ``agent_name``: ``tool_agent``; ``extra_info``: the question's id and index.

    python examples/verl/prepare_data.py questions.jsonl train.parquet [--val-fraction 0.1]

``--val-fraction`` also writes ``<out>_val.parquet`` (the last questions). Bad lines (no image
file, an empty question or answer, not JSON) are skipped with their line number and reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
#: the zoom tool's verl config: its resize bounds are the dataset's
TOOL_CONFIG = HERE / "zoom_tool.yaml"
#: what the policy is told: the protocol the zoom tool, the reward manager and the parser read
SYSTEM_PROMPT = (
    "You answer questions about an image. To look closer, call the zoom tool: "
    "<tool_call>{\"name\": \"image_zoom_in_tool\", \"arguments\": {\"bbox_2d\": "
    "[x1, y1, x2, y2]}}</tool_call>, the box in pixels of the image as you see it. After each "
    "zoomed view, describe what you see in it in <description>...</description>. Give the "
    "final answer in <answer>...</answer>.")


def tool_resize(config: Path = TOOL_CONFIG) -> Dict[str, int]:
    """``min_pixels`` and ``max_pixels`` of the zoom tool in verl's tool config."""
    import yaml
    tools = yaml.safe_load(config.read_text())["tools"]
    (zoom,) = [t for t in tools if t["class_name"].endswith(".ZoomInTool")]
    return {k: int(zoom["config"][k]) for k in ("min_pixels", "max_pixels")}


def read_questions(path: Path) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The usable questions of a JSONL file and a reason for each skipped line; an image path
    is read relative to the file's folder."""
    rows, skipped = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(rec, dict):
            skipped.append(f"line {n}: not an object")
            continue
        image = (path.parent / str(rec.get("image", ""))) if rec.get("image") else None
        question, answer = rec.get("question"), rec.get("answer")
        if image is None or not image.is_file():
            skipped.append(f"line {n}: no image file ({rec.get('image')!r})")
        elif not isinstance(question, str) or not question.strip():
            skipped.append(f"line {n}: no question")
        elif not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or \
                not str(answer).strip():
            skipped.append(f"line {n}: the answer must be a non-empty string or number, got "
                           f"{answer!r}")
        else:
            rows.append(dict(rec, image=image, line=n))
    return rows, skipped


def verl_row(rec: Dict[str, Any], index: int, resize: Dict[str, int]) -> Dict[str, Any]:
    """One row of verl's RL dataset for a question (see the module doc)."""
    return {
        "data_source": str(rec.get("data_source", "zoom")),
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                   {"role": "user", "content": "<image>" + rec["question"].strip()}],
        "images": [{"bytes": rec["image"].read_bytes(), **resize}],
        "reward_model": {"ground_truth": str(rec["answer"]).strip(), "style": "rule"},
        "agent_name": "tool_agent",
        "extra_info": {"index": index, "id": str(rec.get("id", index))},
    }


def write(rows: List[Dict[str, Any]], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("questions", type=Path, help="JSONL: image, question, answer per line")
    p.add_argument("out", type=Path, help="the training parquet to write")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="this fraction of the questions (the last ones) to <out>_val.parquet")
    p.add_argument("--tool-config", type=Path, default=TOOL_CONFIG,
                   help="verl's tool config of the zoom tool (its resize bounds)")
    a = p.parse_args(argv)
    if not 0.0 <= a.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    if not a.questions.is_file():
        p.error(f"questions: no such file: {a.questions}")
    resize = tool_resize(a.tool_config)
    recs, skipped = read_questions(a.questions)
    for reason in skipped:
        print(f"skipped {a.questions}: {reason}", file=sys.stderr)
    if not recs:
        p.error(f"{a.questions}: no usable question ({len(skipped)} skipped)")
    rows = [verl_row(r, i, resize) for i, r in enumerate(recs)]
    n_val = int(round(len(rows) * a.val_fraction))
    write(rows[:len(rows) - n_val], a.out)
    summary = {"train": len(rows) - n_val, "val": n_val, "skipped": len(skipped),
               "resize": resize, "out": str(a.out)}
    if n_val:
        val = a.out.with_name(a.out.stem + "_val.parquet")
        write(rows[len(rows) - n_val:], val)
        summary["val_out"] = str(val)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
