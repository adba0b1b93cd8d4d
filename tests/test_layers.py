"""The import graph inside ``rollout/`` and ``trainer/`` (module-level imports, as the package
loads): the layering the architecture page describes. The rollout engine's runner, scheduler
and tool turns sit side by side (none imports another), on the sequence records and the
settings; the trainer's stages take the built run and none imports the loop."""

import ast
from pathlib import Path
from typing import Dict, Set

PKG = Path(__file__).resolve().parent.parent / "mapo_fast"


def module_imports(folder: str) -> Dict[str, Set[str]]:
    """``{module: modules of the same folder it imports at module level}``, the folder's
    ``__init__`` and ``__main__`` aside (imports inside functions are left out: they run
    later, not when the package loads)."""
    names = {p.stem for p in (PKG / folder).glob("*.py") if not p.stem.startswith("__")}
    out = {}
    for name in names:
        tree = ast.parse((PKG / folder / f"{name}.py").read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        out[name] = deps & names - {name}
    return out


def floors(graph: Dict[str, Set[str]]) -> Dict[str, int]:
    """Each module's floor: 0 for one importing no sibling, else one above its highest
    import (the graph must be acyclic)."""
    memo: Dict[str, int] = {}

    def floor(m: str, seen=()) -> int:
        assert m not in seen, f"an import cycle: {' -> '.join((*seen, m))}"
        if m not in memo:
            memo[m] = 1 + max((floor(d, (*seen, m)) for d in graph[m]), default=-1)
        return memo[m]
    return {m: floor(m) for m in graph}


def test_rollout_parts_sit_side_by_side_under_the_engine():
    graph = module_imports("rollout")
    parts = {"model_runner", "scheduler", "tool_turns"}
    for p in parts:
        assert not graph[p] & parts, f"rollout/{p}.py imports {graph[p] & parts}"
    f = floors(graph)
    assert f["engine"] > max(f[p] for p in parts) and f["engine"] == max(f.values())
    assert max(f.values()) + 1 <= 4, f  # four floors: 0 to 3


def test_trainer_stages_take_the_built_run_and_none_imports_the_loop():
    graph = module_imports("trainer")
    stages = {"rollouts", "evaluation", "update", "warm_start", "estimator", "checkpoint"}
    for s in stages:
        assert "loop" not in graph[s], f"trainer/{s}.py imports the loop"
    assert "build" not in graph["checkpoint"]
    f = floors(graph)
    assert f["loop"] == max(f.values())
    assert all(f[s] < f["loop"] for s in stages - {"estimator"})  # the loop calls them


def test_floors_see_cycles_and_levels():
    assert floors({"a": set(), "b": {"a"}, "c": {"a", "b"}}) == {"a": 0, "b": 1, "c": 2}
    try:
        floors({"a": {"b"}, "b": {"a"}})
    except AssertionError as e:
        assert "cycle" in str(e)
    else:
        raise AssertionError("a cycle went unseen")
