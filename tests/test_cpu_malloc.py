"""rollout.cpu_malloc: glibc's thresholds raised once per process, measured by what they are
for (page faults of a large tensor allocated again and again, counted by the kernel, not
timed); left alone where the user set them or another allocator is loaded; the engine's and
the trainer's ``cpu_malloc`` choice. Fresh processes where the process's allocator matters
(the suite's own process is tuned by its first CPU engine)."""

import json
import os
import platform
import subprocess
import sys

import pytest
from test_rollout_engine import model  # noqa: F401  (the tiny Qwen2 fixture)

from mapo_fast.rollout import RolloutEngine
from mapo_fast.rollout import cpu_malloc as cm

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's malloc only")

#: a tensor above glibc's largest automatic mmap threshold (32 MiB): with glibc's defaults
#: every allocation of it maps fresh pages (one fault per 4 KiB page)
PROBE = """
import json, resource, sys, torch
from mapo_fast.rollout import cpu_malloc as cm

def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        t = torch.empty(40 << 20, dtype=torch.uint8)
        t.fill_(1)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

before = faults()
assert cm.environment() == {}
status, threshold = cm.tune()
again = cm.tune()
faults()  # the heap grows to the tensor's size once
print(json.dumps({"before": before, "after": faults(), "status": status.value,
                  "threshold": threshold, "again": [again[0].value, again[1]],
                  "env": cm.environment()}))
"""


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={k: v for k, v in {**os.environ, **env}.items()
                              if not (k.startswith("MALLOC_") and k not in env)
                              and not (k == "GLIBC_TUNABLES" and k not in env)},
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tune_stops_the_page_faults_of_a_large_tensor_allocated_again():
    r = _probe()
    assert r["status"] == "tuned" and r["again"] == ["tuned", r["threshold"]]
    assert r["env"] == {"MALLOC_MMAP_THRESHOLD_": str(r["threshold"]),
                        "MALLOC_TRIM_THRESHOLD_": str(cm.TRIM_THRESHOLD)}
    if r["threshold"] < 40 << 20:
        pytest.skip(f"this glibc took a {r['threshold']}-byte mmap threshold only")
    page_faults = 10 * (40 << 20) // 4096
    assert r["before"] >= page_faults * 0.9, r          # glibc's defaults: every page, every time
    assert r["after"] < page_faults * 0.01, r           # tuned: the heap's pages reused


@glibc
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_user_settings_are_left_alone(env):
    r = _probe(**env)
    assert r["status"] == "user settings" and r["threshold"] == 0 and r["env"] == {}
    assert r["after"] >= 10 * (40 << 20) // 4096 * 0.9, r  # still glibc's behaviour


def test_tune_runs_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cm, "_done", None)
    monkeypatch.setattr(cm, "_apply", lambda: calls.append(1) or (cm.MallocStatus.TUNED, 7))
    assert cm.tune() == cm.tune() == (cm.MallocStatus.TUNED, 7) and calls == [1]


@glibc
def test_another_allocator_is_left_alone(monkeypatch):
    for v in cm.USER_VARIABLES + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(v, raising=False)
    assert cm._loaded_allocator() is None  # this process runs glibc's malloc
    monkeypatch.setattr(cm, "_loaded_allocator", lambda: "libtcmalloc")
    assert cm._apply() == (cm.MallocStatus.OTHER_ALLOCATOR, 0)


def test_choices(model):
    assert cm.resolve("keep", "cpu") is cm.MallocStatus.KEPT
    assert cm.resolve("auto", "cuda") is cm.MallocStatus.KEPT
    with pytest.raises(ValueError,
                       match=r"`cpu_malloc` must be one of \['auto', 'keep'\], got 'tc'"):
        cm.resolve("tc", "cpu")
    with pytest.raises(ValueError, match="`cpu_malloc` must be one of"):
        RolloutEngine(model, None, num_blocks=8, cpu_malloc="tc")
    eng = RolloutEngine(model, None, num_blocks=8, cpu_malloc="keep")
    assert eng.malloc_status is cm.MallocStatus.KEPT
    assert RolloutEngine(model, None, num_blocks=8).malloc_status is cm.tune()[0]


@glibc
def test_environment_gives_another_process_the_same_settings():
    env = _probe()["env"]
    if int(env["MALLOC_MMAP_THRESHOLD_"]) < 40 << 20:
        pytest.skip("this glibc took a smaller mmap threshold only")
    child = _probe(**env)  # glibc reads them at start: even the first tensors reuse the heap
    assert child["status"] == "user settings"
    # the heap grows to the tensor's size once or twice, not at each of the ten allocations
    assert child["before"] < 10 * (40 << 20) // 4096 * 0.5, child
