"""The repository as Python sees it from its root: one importable top-level name
(``mapo_fast``), so that nothing of ours shadows an installed distribution (transformers >= 5.25
imports Hugging Face's ``kernels``, which a top-level ``kernels/`` package here used to hide),
and no folder named like one (a folder without ``__init__.py`` still imports as a namespace
package where the distribution is missing, and fools availability checks); transformers' own
modules import from the root; the packaging files a wheel needs are there."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the folders a checkout has besides the package (none a regular package; tests and benchmarks
#: run from here) and the generated ones
FOLDERS = {"tests", "bench", "examples", "docs", "csrc", "site", "build", "dist", "runs"}


def top_level(root: Path):
    """``(regular, namespace)``: the names ``import NAME`` finds in ``root`` as modules or
    packages with ``__init__.py``, and as plain folders (namespace packages)."""
    regular, namespace = set(), set()
    for p in root.iterdir():
        if p.name.startswith(".") or p.name.endswith(".egg-info") or not p.stem.isidentifier():
            continue
        if p.is_file() and p.suffix == ".py":
            regular.add(p.stem)
        elif p.is_dir():
            (regular if (p / "__init__.py").exists() else namespace).add(p.name)
    return regular, namespace


def test_one_importable_top_level_name():
    regular, namespace = top_level(ROOT)
    assert regular - {"setup"} == {"mapo_fast"}  # setup.py: the build script
    assert namespace <= FOLDERS, namespace - FOLDERS


def test_hub_kernels_imports_from_the_repository_root():
    """``python -c`` puts the working directory first on ``sys.path``: run from the root,
    transformers' hub-kernels integration must find the installed ``kernels`` (or none), never a
    folder of ours."""
    code = ("import importlib.util, transformers.integrations.hub_kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else 'none')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "none" or {"site-packages", "dist-packages"} & set(Path(origin).parts), \
        origin


def test_hugging_face_kernels_is_installed_where_transformers_needs_it():
    """The check above means most with Hugging Face's ``kernels`` installed, the name it would
    have clashed with: transformers >= 5.25 depends on it (older releases list it only as an
    extra, pinned to releases of their own time, so it is not forced on them)."""
    needs = [r for r in importlib.metadata.requires("transformers") or []
             if r.split(";")[0].strip().startswith("kernels") and "extra ==" not in r]
    if not needs:
        pytest.skip("this transformers does not depend on kernels")
    assert importlib.metadata.version("kernels")


def test_transformers_activations_import():
    from transformers import activations
    assert hasattr(activations, "ACT2FN")


@pytest.mark.parametrize("name", ["LICENSE", "CITATION.cff", "CHANGELOG.md", "MANIFEST.in"])
def test_packaging_files(name):
    text = (ROOT / name).read_text()
    assert text.strip()
    if name == "LICENSE":
        assert "Apache License" in text and "Version 2.0, January 2004" in text
    if name == "MANIFEST.in":
        assert "csrc" in text and "CMakeLists.txt" in text


@pytest.mark.parametrize("current, at_least", [("2.11.0+cu130", True), ("2.10.1", True),
                                               ("2.9.0", False), ("2.13.0a0+git1234", True),
                                               ("3.0", True), ("2.1", False)])
def test_torch_version_check(current, at_least):
    """The one version check every newer-operator gate uses (the floor torch is 2.11)."""
    from mapo_fast.kernels._common import torch_at_least
    assert torch_at_least((2, 10), current) is at_least
