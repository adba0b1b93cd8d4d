"""The C++ decode kernel's instruction set levels (``paged_attention_cpu.ISAS``): built for the
architecture's baseline with the AVX2 and AVX-512 row loops compiled per function and chosen at
run time. Every level this CPU runs against the generic one on the same inputs, the softmax's
exponential against float64 ``exp`` (infinities and NaNs included), rows whose other tokens'
weights underflow to zero, the override, refusals, and the shared object itself: only the
dispatched functions may hold AVX2 or AVX-512 instructions."""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mapo_fast.kernels import paged_attention_cpu as C

from test_paged_attention import dense_reference, make_batch

pytestmark = pytest.mark.skipif(C.extension() is None, reason="the C++ decode kernel is not built")
LEVELS = C.supported_isas() if C.extension() is not None else ()
#: float32: the levels sum scores and values in other orders and widths (and the softmax's
#: exponential is within 2 ulp, not correctly rounded): a few ulp of outputs of size ~1
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [8, 64, 128, 136])
def test_every_level_agrees_with_the_generic_one(isa, dtype, head_dim):
    """Lengths 1, 16, 17, 300 in blocks of 16 and GQA (6 query heads on 2): each level's output
    (poisoned first) equals the generic level's and the dense float64 reference."""
    lens = [1, 16, 17, 300]
    q, kc, vc, tables, L, _, dense = make_batch(lens, [1] * 4, 6, 2, head_dim, 16, dtype, seed=3)
    want = C.decode(q, kc, vc, tables, L, 0.2, isa="generic")
    out = torch.full_like(q, float("nan"))
    got = C.decode(q, kc, vc, tables, L, 0.2, out=out, isa=isa)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got.double(), dense_reference(q, dense, lens, [1] * 4, 0.2),
                               atol=TOL[dtype], rtol=TOL[dtype])


def run_exp(x: torch.Tensor, isa: str) -> torch.Tensor:
    out = torch.full_like(x, 123.0)
    C.extension().exp_f32(x.data_ptr(), out.data_ptr(), x.numel(), C.ISAS.index(isa))
    return out


@pytest.mark.parametrize("isa", LEVELS)
def test_softmax_exponential_keeps_ieee_semantics(isa):
    """e^-inf = 0, e^inf = inf, NaN stays NaN, past the range 0 and inf; over [-110, 90] within
    2 ulp of float64's exp where the result is a normal float, within 2 of the smallest
    subnormal where it is subnormal. 37 values (not a multiple of any vector width): the tail
    lanes are computed too."""
    special = torch.tensor([float("-inf"), float("inf"), float("nan"), -1e30, 1e30, -104.5,
                            -0.0, 0.0])
    got = run_exp(special, isa)
    assert got[:2].tolist() == [0.0, float("inf")] and bool(got[2].isnan())
    assert got[3:].tolist() == [0.0, float("inf"), 0.0, 1.0, 1.0]
    for x in [torch.linspace(-110.0, 90.0, 200_003), torch.linspace(-1.0, 1.0, 37)]:
        want = torch.exp(x.double())
        got = run_exp(x, isa).double()
        normal = (want >= torch.finfo(torch.float32).tiny) & \
            (want <= torch.finfo(torch.float32).max)
        rel = ((got - want).abs() / want)[normal]
        assert float(rel.max()) <= 2 * 2.0 ** -23
        sub = want < torch.finfo(torch.float32).tiny
        assert float(torch.cat([(got - want)[sub].abs(), torch.zeros(1)]).max()) <= \
            2 * 2.0 ** -149
        assert bool(torch.isinf(got[want > torch.finfo(torch.float32).max]).all())


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rows_whose_other_weights_underflow(isa, head_dim):
    """Scores 1e4 apart (every weight but one is e^-1e4 = 0, the masked case of a softmax)
    give exactly the dominant token's value row; equal scores give the mean of the values.
    Nothing is NaN: the running maximum starts at the lowest finite value, never at -inf."""
    S, L, bs = 2, 40, 16
    k = -torch.ones(S, L, 1, head_dim)
    k[0, 25] = 1.0  # sequence 0: token 25 dominates
    k[1] = 0.0      # sequence 1: every score 0
    v = torch.randn(S, L, 1, head_dim, generator=torch.Generator().manual_seed(0))
    nb = (L + bs - 1) // bs
    kc = torch.zeros(S * nb, bs, 1, head_dim)
    vc = torch.zeros_like(kc)
    kc.view(S, nb * bs, 1, head_dim)[:, :L] = k
    vc.view(S, nb * bs, 1, head_dim)[:, :L] = v
    tables = torch.arange(S * nb).view(S, nb)
    q = torch.full((S, 2, head_dim), 1e4 / head_dim)
    out = C.decode(q, kc, vc, tables, torch.tensor([L, L]), 1.0, isa=isa)
    assert not bool(out.isnan().any())
    assert torch.equal(out[0], v[0, 25].expand(2, head_dim))
    torch.testing.assert_close(out[1], v[1].mean(0).expand(2, head_dim), atol=1e-6, rtol=1e-6)


def test_bad_level_is_refused():
    q, kc, vc, tables, L, _, _ = make_batch([5], [1], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"`isa` must be one of .* got 'sse9'"):
        C.decode(q, kc, vc, tables, L, 0.3, isa="sse9")
    with pytest.raises(ValueError, match=r"`isa` 7 is not in \[0, "):
        C.extension().decode(4, q.data_ptr(), kc.data_ptr(), vc.data_ptr(), q.data_ptr(),
                             tables.int().data_ptr(), L.int().data_ptr(), 1, 4, 2, 24, 16, 1,
                             kc.shape[0], 0.3, 1, 7)


@pytest.mark.parametrize("value, expected", [("generic", "generic"), ("", None),
                                             ("sse9", "error")])
def test_environment_override(value, expected):
    """``MAPO_FAST_CPU_ISA`` forces a level (read at the first decode); empty means the CPU's
    best; a level the CPU does not run is refused naming the variable and the value."""
    code = ("from mapo_fast.kernels import paged_attention_cpu as C\n"
            "try:\n    print(C.default_isa())\nexcept ValueError as e:\n    print('error', e)\n")
    env = dict(os.environ, **{C.ISA_ENV: value})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    if expected is None:
        assert out == LEVELS[-1]
    elif expected == "error":
        assert out.startswith(f"error {C.ISA_ENV}='sse9': this CPU runs {LEVELS}")
    else:
        assert out == expected


def functions_by_instruction_class(path: str) -> dict:
    """{function: {"ymm", "zmm", "vex"}} from the shared object's disassembly: ``zmm`` and
    ``ymm`` for 512- and 256-bit registers, ``vex`` for any AVX-encoded instruction (a ``v``
    mnemonic on SIMD registers) or mask register."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path],
                          capture_output=True, text=True, check=True).stdout
    found, fn = {}, None
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in text.splitlines():
        m = head.match(line)
        if m:
            fn = m.group(1)
            continue
        if fn is None or "\t" not in line:
            continue
        ins = line.split("\t", 1)[1].strip()
        kinds = set()
        if "%zmm" in ins:
            kinds.add("zmm")
        if "%ymm" in ins:
            kinds.add("ymm")
        if re.match(r"v\w+\s", ins) and re.search(r"%[xyz]mm|%k[0-7]", ins) or \
                re.search(r"%k[0-7]\b", ins):
            kinds.add("vex")
        if kinds:
            found.setdefault(fn, set()).update(kinds)
    return found


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="x86-64 with binutils' objdump")
def test_only_dispatched_functions_hold_avx_instructions():
    """The shared object runs on any x86-64 CPU: AVX-512 instructions only in the AVX-512
    functions, AVX (VEX) and AVX2 ones only in those and the AVX2 namespace's, everything the
    module runs before choosing a level at the baseline."""
    found = functions_by_instruction_class(C.extension().__file__)
    assert found, "no AVX instruction at all: the dispatched functions are missing"
    avx512 = {f for f in found if "avx512" in f}
    avx2 = {f for f in found if "::avx2::" in f}
    assert any("attend_rows_avx512<64>" in f for f in avx512)
    assert any("avx2::attend_rows<float, 64>" in f for f in avx2)
    for fn, kinds in found.items():
        if "zmm" in kinds:
            assert fn in avx512, fn
        assert fn in avx512 | avx2, (fn, kinds)
