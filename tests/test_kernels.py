"""The Triton SLERP kernels against the float64 reference, run in Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton decorates the kernels, so it is set here,
before fastmerge.kernels is imported. Sizes stay around 10^4 elements (the interpreter is
slow) with the real block sizes, so the tails, multi-block reductions and spare programs
are the ones a GPU runs.

Tolerance: at most MAX_ULPS ulps of the output dtype from the float64 reference, except
where the blend's arithmetic cannot resolve the result (fastmerge.reference.slerp_mismatches:
where ca·a and cb·b nearly cancel, the math dtype's rounding at their size). The math dtype
is fp32 for fp16 and bf16 outputs and float64 for fp32 outputs (fastmerge.slerp.compute_dtype,
shared with the CPU engine). The coefficients themselves are checked to 1e-12 in the
statistics, and the output casts bit for bit against torch's.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import warnings

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the kernels need triton (its interpreter runs on CPU)")

import hypothesis.strategies as st
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings

from fastmerge import kernels as fk
from fastmerge.reference import (
    DOT_THRESHOLD,
    NORM_EPS,
    describe_mismatch,
    max_ulp_distance,
    slerp_mismatches,
    slerp_reference,
)
from fastmerge.slerp import compute_dtype

# The package re-exports the function slerp, which hides the module of the same name.
slerp_module = importlib.import_module("fastmerge.kernels.slerp")

MAX_ULPS = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 1}
"""The one tolerance table, in ulps of the output dtype."""


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_PAIRS = [(i, o) for i in DTYPES for o in DTYPES]
DTYPE_IDS = [str(d)[6:] for d in DTYPES]
PAIR_IDS = [f"{str(i)[6:]}-to-{str(o)[6:]}" for i, o in DTYPE_PAIRS]

SIZES = (1, 7, 1000, 4099, 10007)
"""1 element, tiny, not a power of two, prime with a 3-element tail, prime over 3 blocks."""

GEOMETRIES = (
    "random",
    "parallel",
    "antiparallel",
    "zero_a",
    "zero_b",
    "below_threshold",
    "above_threshold",
)
T_VALUES = (0.6, -0.25, 1.5)

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def make_pair(
    geometry: str, n: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors of a given geometry, at the scale of model weights, cast to dtype."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen, dtype=torch.float64) * 0.02
    b = torch.randn(n, generator=gen, dtype=torch.float64) * 0.02

    if geometry == "parallel":
        b = 2.0 * a
    elif geometry == "antiparallel":
        b = -3.0 * a
    elif geometry == "zero_a":
        a = torch.zeros_like(a)
    elif geometry == "zero_b":
        b = torch.zeros_like(b)
    elif geometry in ("below_threshold", "above_threshold"):
        # b at a chosen angle to a, 3e-5 from the threshold: rounding to bf16 moves cos by
        # up to ~1e-5, the kernel's fp32 sums by ~1e-7, so the branch stays the intended one.
        target = DOT_THRESHOLD + (-3e-5 if geometry == "below_threshold" else 3e-5)
        unit = a / a.norm()
        side = b - (b @ unit) * unit
        side = side / side.norm()
        b = 0.03 * (target * unit + math.sqrt(1.0 - target * target) * side)
    else:
        assert geometry == "random", geometry

    a, b = a.to(dtype), b.to(dtype)
    if geometry.endswith("_threshold"):
        cos = (a.double() @ b.double()) / (a.double().norm() * b.double().norm())
        assert abs(cos.item() - target) < 2e-5, f"{geometry}: rounding moved cos to {cos.item()}"
    return a, b


def expected_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float]:
    """norm_a, norm_b, clamped cos and angle of a pair, in float64."""
    a64, b64 = a.double(), b.double()
    norm_a, norm_b = a64.norm().item(), b64.norm().item()
    scale_a = norm_a if norm_a > NORM_EPS else 1.0
    scale_b = norm_b if norm_b > NORM_EPS else 1.0
    cos = min(1.0, max(-1.0, (a64 @ b64).item() / (scale_a * scale_b)))
    return norm_a, norm_b, cos, math.acos(cos)


def coefficients(cos: float, theta: float, t: float) -> tuple[float, float]:
    """ca, cb for the statistics check and the fp32 floor; outputs go to slerp_reference."""
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def assert_matches_reference(
    name: str, got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float
) -> None:
    out_dtype = got.dtype
    tol = MAX_ULPS[out_dtype]
    want = slerp_reference(a, b, t, out_dtype=out_dtype).reshape(-1)
    bad = slerp_mismatches(got, a, b, t, math_dtype=compute_dtype(a.dtype, out_dtype), max_ulps=tol)

    # Passing elements are replaced by the reference, so the message shows only the others.
    checked = torch.where(bad, got.reshape(-1), want)
    assert not bad.any(), describe_mismatch(name, checked, want, tol)


def assert_bits_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, so -0.0 against +0.0 counts (ulp_distance does not tell them apart)."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, want {want.dtype}"
    view = _INT_VIEW[got.dtype]
    differ = (got.reshape(-1).view(view) != want.reshape(-1).view(view)).nonzero().reshape(-1)
    first = ", ".join(
        f"[{i}] got {got.reshape(-1)[i].item()!r} want {want.reshape(-1)[i].item()!r}"
        for i in differ[:5].tolist()
    )
    assert differ.numel() == 0, f"{name}: {differ.numel()} of {got.numel()} differ; {first}"


def assert_stats(
    name: str, stats: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float
) -> None:
    norm_a, norm_b, cos, _ = expected_stats(a, b)
    got = dict(zip(fk.STATS_COLUMNS, stats.tolist(), strict=True))

    # The sums within a block are fp32 (DESIGN.md), good to a few 1e-8 relative each.
    assert got["norm_a"] == pytest.approx(norm_a, rel=1e-6, abs=1e-30), f"{name}: {got}"
    assert got["norm_b"] == pytest.approx(norm_b, rel=1e-6, abs=1e-30), f"{name}: {got}"
    assert got["cos"] == pytest.approx(cos, abs=1e-6), f"{name}: {got}"
    assert got["branch"] == (0.0 if abs(cos) > DOT_THRESHOLD else 1.0), f"{name}: {got}"

    # θ is acos of the kernel's own cos to float64 accuracy (acos is built from core ops),
    # and the coefficients follow from that θ and t.
    assert got["theta"] == pytest.approx(math.acos(got["cos"]), rel=1e-12, abs=1e-12), name
    ca, cb = coefficients(got["cos"], got["theta"], t)
    assert got["ca"] == pytest.approx(ca, rel=1e-12, abs=1e-15), f"{name}: {got}"
    assert got["cb"] == pytest.approx(cb, rel=1e-12, abs=1e-15), f"{name}: {got}"


def run_segments(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    ts: list[float],
    out_dtype: torch.dtype,
    t_dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Merge the pairs in one grouped launch; the outputs are cut back per segment."""
    lengths = [a.numel() for a, _ in pairs]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    a_flat = torch.cat([a.reshape(-1) for a, _ in pairs])
    b_flat = torch.cat([b.reshape(-1) for _, b in pairs])
    t = torch.tensor(ts, dtype=t_dtype)

    out, stats = fk.slerp_segments(a_flat, b_flat, offsets, t, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == a_flat.shape
    assert stats.dtype == torch.float64 and stats.shape == (len(pairs), 7)
    return list(out.split(lengths)), stats


# ---- one pair, through slerp() --------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("in_dtype", "out_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_slerp_matches_reference(in_dtype, out_dtype, size):
    a, b = make_pair("random", size, in_dtype, seed=size)
    for t in T_VALUES:
        got = fk.slerp(a, b, t, out_dtype=out_dtype)
        assert got.shape == a.shape and got.dtype == out_dtype
        assert_matches_reference(f"slerp n={size} t={t}", got, a, b, t)


def test_slerp_keeps_shape():
    a, b = make_pair("random", 3 * 5 * 7, torch.bfloat16)
    got = fk.slerp(a.reshape(3, 5, 7), b.reshape(3, 5, 7), 0.6)
    assert got.shape == (3, 5, 7) and got.dtype == torch.float16
    assert_matches_reference("slerp 3x5x7", got.reshape(-1), a, b, 0.6)


# ---- geometries, with statistics ------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(("in_dtype", "out_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_geometry_matches_reference(in_dtype, out_dtype, geometry):
    a, b = make_pair(geometry, 4099, in_dtype, seed=1)
    outs, stats = run_segments([(a, b)] * len(T_VALUES), list(T_VALUES), out_dtype)
    for got, row, t in zip(outs, stats, T_VALUES, strict=True):
        assert_matches_reference(f"{geometry} t={t}", got, a, b, t)
        assert_stats(f"{geometry} t={t}", row, a, b, t)


@pytest.mark.parametrize(("in_dtype", "out_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_t_zero_and_one_are_exact(in_dtype, out_dtype):
    pairs, ts, names = [], [], []
    for geometry in GEOMETRIES:
        a, b = make_pair(geometry, 1000, in_dtype, seed=2)
        # Signed zeros must come through as they are.
        a[::97], b[::89] = -0.0, -0.0
        for t in (0.0, 1.0):
            pairs.append((a, b))
            ts.append(t)
            names.append(f"{geometry} t={t}")

    outs, _ = run_segments(pairs, ts, out_dtype)
    for got, (a, b), t, name in zip(outs, pairs, ts, names, strict=True):
        assert_bits_equal(name, got, (a if t == 0.0 else b).to(out_dtype))


# ---- grouped launches -----------------------------------------------------------------------


@pytest.mark.parametrize(("in_dtype", "out_dtype"), DTYPE_PAIRS, ids=PAIR_IDS)
def test_grouped_segments(in_dtype, out_dtype):
    plan = [
        (0, "random", 0.6),
        (1, "random", 0.3),
        (7, "antiparallel", 1.5),
        (4099, "random", -0.25),
        (0, "random", 0.0),
        (4096, "below_threshold", 0.6),
        (1, "zero_a", 1.0),
        (5003, "above_threshold", 0.9),
        (300, "zero_b", 0.45),
    ]
    pairs = [make_pair(g, n, in_dtype, seed=k) for k, (n, g, _) in enumerate(plan)]
    ts = [t for _, _, t in plan]

    # float32 t: the segment's t is that float32 value, exactly, in the reference too.
    for t_dtype in (torch.float64, torch.float32):
        outs, stats = run_segments(pairs, ts, out_dtype, t_dtype=t_dtype)
        for k, ((a, b), got, row) in enumerate(zip(pairs, outs, stats, strict=True)):
            t = torch.tensor(ts[k], dtype=t_dtype).item()
            name = f"segment {k} ({plan[k][1]}, n={a.numel()}, t={t}, {t_dtype})"
            assert_matches_reference(name, got, a, b, t)
            assert_stats(name, row, a, b, t)


@pytest.mark.parametrize("in_dtype", DTYPES, ids=DTYPE_IDS)
def test_many_blocks_per_segment(in_dtype):
    # Small blocks and a small reduction chunk: 65 blocks in 17 chunks for the long segment,
    # so the coefficients kernel loops, and segments start in the middle of the table.
    lengths = [130, 4099, 0, 64, 65]
    pairs = [make_pair("random", n, in_dtype, seed=n) for n in lengths]
    ts = [0.6, -0.25, 0.5, 1.5, 0.2]
    a = torch.cat([p[0] for p in pairs])
    b = torch.cat([p[1] for p in pairs])
    offsets = torch.tensor([0, 130, 4229, 4229, 4293, 4358])
    out = torch.empty(a.numel(), dtype=torch.float16)

    table = slerp_module._block_table(offsets, a.numel(), block_size=64)
    t = torch.tensor(ts, dtype=torch.float64)
    stats = slerp_module._launch_statistics(a, b, offsets, t, table, acc_f64=False, reduce_chunk=4)
    slerp_module._launch_blend(a, b, offsets, stats, out, table)
    for k, (got, (pa, pb)) in enumerate(zip(out.split(lengths), pairs, strict=True)):
        assert_matches_reference(f"segment {k}", got, pa, pb, ts[k])
        assert_stats(f"segment {k}", stats[k], pa, pb, ts[k])


def test_no_segments_and_empty_segments():
    empty = torch.empty(0, dtype=torch.bfloat16)
    out, stats = fk.slerp_segments(
        empty, empty, torch.zeros(1, dtype=torch.int64), torch.empty(0, dtype=torch.float64)
    )
    assert out.shape == (0,) and stats.shape == (0, 7)

    # Empty segments still get their statistics: zero norms count as 1, so cos = 0.
    out, stats = fk.slerp_segments(
        empty, empty, torch.zeros(3, dtype=torch.int64), torch.tensor([0.6, 0.0])
    )
    assert out.shape == (0,)
    assert stats[:, :3].abs().max().item() == 0.0
    assert stats[:, 3].tolist() == pytest.approx([math.pi / 2] * 2, rel=1e-15)


# Derandomized and without an example database: the same 20 cases on every run, no files.
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    lengths=st.lists(st.integers(0, 600), min_size=1, max_size=6),
    ts=st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=6, max_size=6),
    in_dtype=st.sampled_from(DTYPES),
    out_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_grouped_segments_property(lengths, ts, in_dtype, out_dtype, seed):
    pairs = [make_pair("random", n, in_dtype, seed=seed + k) for k, n in enumerate(lengths)]
    outs, stats = run_segments(pairs, ts[: len(pairs)], out_dtype)
    for k, ((a, b), got) in enumerate(zip(pairs, outs, strict=True)):
        assert_matches_reference(f"segment {k} of {lengths}", got, a, b, ts[k])
        assert_stats(f"segment {k} of {lengths}", stats[k], a, b, ts[k])


def test_non_finite_inputs_show_in_the_stats():
    # The engine stops a merge on non-finite values from the stats, without another pass.
    pairs = [make_pair("random", n, torch.float16, seed=7 + n) for n in (100, 200, 300)]
    pairs[0][0][5] = float("inf")
    pairs[1][1][3] = float("nan")

    # numpy warns about inf/inf where the GPU quietly gives NaN; that NaN is what is tested.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outs, stats = run_segments(pairs, [0.6, 0.6, 0.6], torch.float16)

    assert stats[0, 0].item() == float("inf") and stats[0, 5:].isnan().all()
    assert stats[1, 1].isnan() and stats[1, 5:].isnan().all()
    assert stats[2].isfinite().all()
    assert_matches_reference("clean segment", outs[2], *pairs[2], 0.6)


# ---- rounding to the output dtype -----------------------------------------------------------


@pytest.mark.parametrize("in_dtype", DTYPES, ids=DTYPE_IDS)
def test_output_cast_is_torchs_round_to_nearest_even(in_dtype):
    # The same fp32 results, rounded by the kernel and by torch, must agree bit for bit:
    # this is what catches the interpreter's truncating bf16 conversion.
    a, b = make_pair("random", 10007, in_dtype, seed=3)
    offsets = torch.tensor([0, a.numel()])
    table = slerp_module._block_table(offsets, a.numel(), fk.BLOCK_SIZE)
    for t in (0.6, 1.5):
        # The fp32-math result (an fp32 output would blend in float64 by default).
        t_tensor = torch.tensor([t], dtype=torch.float64)
        stats = slerp_module._launch_statistics(a, b, offsets, t_tensor, table, acc_f64=False)
        wide = torch.empty(a.numel(), dtype=torch.float32)
        slerp_module._launch_blend(a, b, offsets, stats, wide, table, math_f64=False)
        for out_dtype in (torch.float16, torch.bfloat16):
            got = fk.slerp(a, b, t, out_dtype=out_dtype)
            assert_bits_equal(f"{out_dtype} t={t}", got, wide.to(out_dtype))


@triton.jit
def _bf16_bits_probe_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, slerp_module._bf16_bits_rtne(x), mask=mask)


def test_bf16_rounding_of_special_values():
    # Ties both ways, the largest finite values (one rounds to inf), subnormals, infinities,
    # NaNs with payloads in either half, and many random bit patterns.
    special = torch.tensor(
        [
            0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0xBF808000, 0xBF818000,
            0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7FFFFF, 0x00000001, 0x00008000,
            0x00018000, 0x007FFFFF, 0x80000000, 0x00000000, 0x7F800000, 0xFF800000,
            0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FFFFFFF,
        ],
        dtype=torch.int64,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    random_bits = torch.randint(0, 2**32, (4000,), generator=gen, dtype=torch.int64)
    bits = torch.cat([special, random_bits]).to(torch.uint32)
    x = bits.view(torch.float32)

    out = torch.empty(x.numel(), dtype=torch.int16)
    _bf16_bits_probe_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    got = out.view(torch.bfloat16)

    # NaN payloads are not compared: torch's own CPU and CUDA conversions disagree on them.
    nan = x.isnan()
    assert got[nan].isnan().all(), "a NaN did not stay NaN"
    assert_bits_equal("bf16 rounding", got[~nan], x[~nan].to(torch.bfloat16))


# ---- guard buffers --------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
def test_guard_buffers(out_dtype):
    # Inputs sit in the middle of NaN-filled buffers, the output in the middle of a sentinel-
    # filled one, and the segments leave the first 3 and last 7 elements out: an unmasked
    # load shows up as NaN in the output, an unmasked store as a changed sentinel.
    pad, n = 4096 + 5, 10007
    sentinel = -1234.0

    a_buffer = torch.full((n + 2 * pad,), float("nan"), dtype=torch.bfloat16)
    b_buffer = torch.full_like(a_buffer, float("nan"))
    out_buffer = torch.full((n + 2 * pad,), sentinel, dtype=out_dtype)
    a, b, out = a_buffer[pad : pad + n], b_buffer[pad : pad + n], out_buffer[pad : pad + n]
    a_src, b_src = make_pair("random", n, torch.bfloat16, seed=5)
    a.copy_(a_src)
    b.copy_(b_src)

    offsets = torch.tensor([3, 4099, 4099, 4102, 10000])
    ts = [0.6, 0.0, 0.3, 1.5]
    result, stats = fk.slerp_segments(
        a, b, offsets, torch.tensor(ts, dtype=torch.float64), out_dtype=out_dtype, out=out
    )
    assert result is out

    untouched = torch.cat([out_buffer[: pad + 3], out_buffer[pad + 10000 :]])
    assert untouched.numel() == 2 * pad + 10
    assert (untouched == sentinel).all(), "a store landed outside the segments"
    assert not out[3:10000].isnan().any(), "a load read the NaN guard"
    for k, (start, end) in enumerate(itertools.pairwise(offsets.tolist())):
        assert_matches_reference(f"segment {k}", out[start:end], a[start:end], b[start:end], ts[k])
        assert_stats(f"segment {k}", stats[k], a[start:end], b[start:end], ts[k])


def test_slerp_on_views_into_guard_buffers():
    pad, n = 17, 4099
    a_buffer = torch.full((n + 2 * pad,), float("nan"), dtype=torch.float16)
    b_buffer = torch.full_like(a_buffer, float("nan"))
    a_src, b_src = make_pair("random", n, torch.float16, seed=6)
    a_buffer[pad : pad + n] = a_src
    b_buffer[pad : pad + n] = b_src

    got = fk.slerp(a_buffer[pad : pad + n], b_buffer[pad : pad + n], 0.6)
    assert_matches_reference("slerp of views", got, a_src, b_src, 0.6)


# ---- errors ---------------------------------------------------------------------------------


def _flat_inputs(n: int = 10):
    a, b = make_pair("random", n, torch.float16)
    return a, b, torch.tensor([0, n]), torch.tensor([0.5], dtype=torch.float64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, b, o, t: (a, b.to(torch.bfloat16), o, t), r"b: expected dtype torch.float16"),
        (lambda a, b, o, t: (a, b.to("meta"), o, t), r"b: expected a tensor on cpu"),
        (lambda a, b, o, t: (a, b, o, t.to("meta")), r"t: expected a tensor on cpu"),
        (lambda a, b, o, t: (a.int(), b.int(), o, t), r"a: expected dtype in .*float64"),
        (lambda a, b, o, t: (a.reshape(2, 5), b, o, t), r"a: expected a 1-D tensor.*\(2, 5\)"),
        (lambda a, b, o, t: (a, b, o.to(torch.int32), t), r"offsets: expected dtype in"),
        (lambda a, b, o, t: (a, b, o, t.half()), r"t: expected dtype in"),
        (lambda a, b, o, t: (a, b, o[:1], t), r"offsets: expected 2 entries.*found 1"),
        (lambda a, b, o, t: (a, b[:5], o, t), r"one length, found 10 and 5"),
        (
            lambda a, b, o, t: (torch.stack([a, a], 1)[:, 0], b, o, t),
            r"a: expected a contiguous tensor, found stride \(2,\)",
        ),
    ],
    ids=[
        "dtypes differ",
        "devices differ",
        "t device",
        "int32 input",
        "not 1-D",
        "int32 offsets",
        "float16 t",
        "short offsets",
        "lengths differ",
        "not contiguous",
    ],
)
def test_launcher_rejects_bad_inputs(change, message):
    a, b, offsets, t = change(*_flat_inputs())
    with pytest.raises(ValueError, match=message):
        fk.slerp_segments(a, b, offsets, t)


def test_out_is_checked():
    a, b, offsets, t = _flat_inputs()
    with pytest.raises(
        ValueError, match=r"out: expected dtype torch.float16 \(out_dtype\), found torch.bfloat16"
    ):
        fk.slerp_segments(a, b, offsets, t, out=torch.empty(10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"out: expected a contiguous tensor"):
        fk.slerp_segments(a, b, offsets, t, out=torch.empty(20, dtype=torch.float16)[::2])
    with pytest.raises(ValueError, match=r"out_dtype: expected one of"):
        fk.slerp_segments(a, b, offsets, t, out_dtype=torch.float64)


def test_slerp_rejects_bad_inputs():
    a, b = make_pair("random", 12, torch.float16)
    with pytest.raises(ValueError, match=r"b: expected shape \(3, 4\) like a, found \(4, 3\)"):
        fk.slerp(a.reshape(3, 4), b.reshape(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"a: expected a contiguous tensor"):
        fk.slerp(a.reshape(3, 4).T, b.reshape(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"b: expected dtype torch.float16 like a"):
        fk.slerp(a, b.float(), 0.5)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(slerp_module, "INTERPRETED", False)
    a, b = make_pair("random", 12, torch.float16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fk.slerp(a, b, 0.5)


def test_interpreter_is_on():
    assert fk.INTERPRETED


def test_bytes_moved():
    # Two reads of two bf16 inputs (8 bytes) and one fp16 write (2 bytes) per element.
    assert fk.bytes_moved(1000, torch.bfloat16, torch.float16) == 10_000
    assert fk.bytes_moved(10, torch.float32, torch.bfloat16) == 10 * (16 + 2)
    assert fk.bytes_moved(10, torch.float64, torch.float32) == 10 * (32 + 4)


def test_float64_inputs_sum_and_blend_in_float64():
    a, b = make_pair("random", 4099, torch.float64, seed=11)
    for out_dtype in DTYPES:
        got = fk.slerp(a, b, 0.6, out_dtype=out_dtype)
        want = slerp_reference(a, b, 0.6, out_dtype=out_dtype)
        assert max_ulp_distance(got, want) <= MAX_ULPS[out_dtype], str(out_dtype)


def test_statistics_then_blend_with_overridden_coefficients():
    # The engine's linear-interpolation option: statistics, coefficients replaced, blend.
    pairs = [make_pair("random", n, torch.bfloat16, seed=n) for n in (300, 4099)]
    a = torch.cat([p[0] for p in pairs])
    b = torch.cat([p[1] for p in pairs])
    offsets = torch.tensor([0, 300, 4399])
    stats = fk.segment_statistics(a, b, offsets, torch.tensor([0.6, 0.6], dtype=torch.float64))
    assert_stats("segment 0", stats[0], *pairs[0], 0.6)

    stats[1, 5], stats[1, 6] = 0.4, 0.6
    out = fk.blend_segments(a, b, offsets, stats)
    assert_matches_reference("slerp segment", out[:300], *pairs[0], 0.6)
    want = (0.4 * pairs[1][0].double() + 0.6 * pairs[1][1].double()).half()
    assert max_ulp_distance(out[300:], want) <= 1


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
def test_half_way_opposite_elements_cancel_exactly(out_dtype):
    # At t = 0.5 the coefficients are equal, and elements with a = -b must give exactly 0
    # (the fma alone would leave the rounding error of cb·b, visible in bfloat16).
    a, b = make_pair("random", 4099, torch.bfloat16, seed=5)
    b[::3] = -a[::3]
    got = fk.slerp(a, b, 0.5, out_dtype=out_dtype)
    assert (got[::3] == 0).all()
    assert_matches_reference("t=0.5", got, a, b, 0.5)
