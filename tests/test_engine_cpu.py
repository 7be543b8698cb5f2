"""The CPU engine against the float64 reference, on hostile shapes and geometry."""

from __future__ import annotations

import math

import pytest
import torch

import fastmerge
from fastmerge.engine.cpu import CpuEngine
from fastmerge.reference import describe_mismatch, slerp_mismatches, slerp_reference
from fastmerge.slerp import PairStatistics, compute_dtype, slerp_blend

ULP_TOLERANCE = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 1}
"""The one tolerance table: ulps of the output dtype away from the float64 reference."""

IN_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OUT_DTYPES = list(ULP_TOLERANCE)
SIZES = [1, 2, 7, 97, 1000, 4099, 65_537]


def _pair(size: int, geometry: str, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(size, generator=generator)
    noise = torch.randn(size, generator=generator)
    b = {
        "random": noise,
        "close": a + 0.1 * noise,
        "parallel": 2 * a,
        # At t = 0.25 the terms cancel exactly: the math dtype's floor applies there.
        "anti-parallel": -3 * a,
        "zero-a": noise,
        "zero-b": torch.zeros(size),
        "near-threshold": a + 0.0316 * noise * a.norm() / noise.norm(),
    }[geometry]
    if geometry == "zero-a":
        a = torch.zeros(size)
    return a.to(dtype), b.to(dtype)


def _engine_slerp(a, b, t, out_dtype, chunk=1000):
    """The CPU engine's two primitives with a small chunk, so that chunks and tails occur."""
    engine = CpuEngine(chunk_elements=chunk)
    math_dtype = compute_dtype(a.dtype, out_dtype)
    stats = engine.statistics(a.reshape(-1), b.reshape(-1), math_dtype)
    out = torch.empty(a.numel(), dtype=out_dtype)
    engine.blend(a.reshape(-1), b.reshape(-1), slerp_blend(stats, t), out, math_dtype)
    return out.view(a.shape)


def _assert_close(name, got, a, b, t):
    """Within ULP_TOLERANCE of the float64 reference, up to the math dtype's floor where
    the terms cancel (fastmerge.reference.slerp_mismatches)."""
    tolerance = ULP_TOLERANCE[got.dtype]
    math_dtype = compute_dtype(a.dtype, got.dtype)
    bad = slerp_mismatches(got, a, b, t, math_dtype=math_dtype, max_ulps=tolerance)
    want = slerp_reference(a, b, t, out_dtype=got.dtype)
    shown = torch.where(bad, got.reshape(-1), want.reshape(-1))
    assert not bad.any(), describe_mismatch(name, shown, want.reshape(-1), tolerance)


@pytest.mark.parametrize("in_dtype", IN_DTYPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "geometry",
    ["random", "close", "parallel", "anti-parallel", "zero-a", "zero-b", "near-threshold"],
)
def test_engine_matches_reference(in_dtype, out_dtype, size, geometry):
    a, b = _pair(size, geometry, in_dtype)
    for t in (0.6, 0.5, 0.25):
        got = _engine_slerp(a, b, t, out_dtype)
        _assert_close(f"{geometry} n={size} t={t}", got, a, b, t)


@pytest.mark.parametrize("in_dtype", IN_DTYPES)
@pytest.mark.parametrize("geometry", ["random", "parallel", "zero-a", "anti-parallel"])
def test_t_zero_and_one_give_the_inputs_bit_for_bit(in_dtype, geometry):
    a, b = _pair(4099, geometry, in_dtype)
    a[0] = -0.0  # the sign of zero must survive too
    for out_dtype in OUT_DTYPES:
        at_zero = _engine_slerp(a, b, 0.0, out_dtype)
        at_one = _engine_slerp(a, b, 1.0, out_dtype)
        assert torch.equal(at_zero.view(torch.uint8), a.to(out_dtype).view(torch.uint8))
        assert torch.equal(at_one.view(torch.uint8), b.to(out_dtype).view(torch.uint8))


@pytest.mark.parametrize("t", [-0.25, 1.5])
def test_extrapolation_matches_reference(t):
    a, b = _pair(4099, "close", torch.bfloat16)
    _assert_close(f"t={t}", _engine_slerp(a, b, t, torch.float16), a, b, t)


def test_multidimensional_tensors_are_one_vector():
    a, b = _pair(6 * 7 * 11, "random", torch.bfloat16)
    a, b = a.view(6, 7, 11), b.view(6, 7, 11)
    got = fastmerge.slerp(a, b, 0.6, out_dtype=torch.float16)
    assert got.shape == (6, 7, 11)
    _assert_close("3-D", got, a, b, 0.6)


def test_public_slerp_defaults_to_the_input_dtype():
    a, b = _pair(97, "random", torch.float32)
    got = fastmerge.slerp(a, b, 0.3)
    assert got.dtype == torch.float32
    _assert_close("fp32", got, a, b, 0.3)


def test_public_slerp_refuses_mismatched_tensors():
    with pytest.raises(ValueError, match=r"one shape and dtype.*\(3,\).*\(4,\)"):
        fastmerge.slerp(torch.ones(3), torch.ones(4), 0.5)


@pytest.mark.parametrize("math_dtype", [torch.float32, torch.float64])
def test_statistics_of_a_large_tensor_are_accurate(math_dtype):
    # Plain fp32 sums of tens of millions of elements drift by ~1e-4 (MKL's fp32 dot by ~1e-5
    # over a 1M chunk); chunked cascade sums added in float64 must not.
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(8_000_000, generator=generator).to(torch.bfloat16)
    b = (a.float() + 0.5 * torch.randn(8_000_000, generator=generator)).to(torch.bfloat16)
    stats = CpuEngine().statistics(a, b, math_dtype)
    a64, b64 = a.double(), b.double()
    assert math.isclose(stats.norm_a_sq, torch.dot(a64, a64).item(), rel_tol=1e-12)
    assert math.isclose(stats.norm_b_sq, torch.dot(b64, b64).item(), rel_tol=1e-12)
    assert math.isclose(stats.dot, torch.dot(a64, b64).item(), rel_tol=1e-12)


@pytest.mark.parametrize("math_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_detected(bad, math_dtype):
    from fastmerge.engine import NonFiniteInput

    a, b = _pair(3000, "random", torch.bfloat16)
    b[2500] = bad
    with pytest.raises(NonFiniteInput, match="b"):
        CpuEngine(chunk_elements=1000).statistics(a, b, math_dtype)


@pytest.mark.parametrize("math_dtype", [torch.float32, torch.float64])
def test_huge_finite_values_are_not_mistaken_for_non_finite(math_dtype):
    # 1e20 squared overflows fp32; the engine redoes such a chunk in float64.
    a = torch.full((10,), 1e20, dtype=torch.bfloat16)
    b = torch.full((10,), -1e20, dtype=torch.bfloat16)
    stats = CpuEngine().statistics(a, b, math_dtype)
    assert stats.finite
    assert stats.cosine == -1.0


def test_slerp_blend_branches():
    orthogonal = PairStatistics(1.0, 1.0, 0.0)
    blend = slerp_blend(orthogonal, 0.5)
    assert blend.spherical
    assert math.isclose(blend.coef_a, math.sin(math.pi / 4))
    assert math.isclose(blend.angle, math.pi / 2)

    parallel = PairStatistics(1.0, 4.0, 2.0)
    assert slerp_blend(parallel, 0.3) == slerp_blend(parallel, 0.3, linear=True)
    assert not slerp_blend(parallel, 0.3).spherical
    assert slerp_blend(parallel, 0.3).coef_b == 0.3


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_half_way_opposite_elements_cancel_exactly(out_dtype):
    # At t = 0.5 both coefficients are equal, and elements with a = -b must give exactly 0
    # (a fused multiply-add would leave the rounding of ca·a, ~1e-10, visible in bfloat16).
    a, b = _pair(4099, "random", torch.bfloat16)
    b[::3] = -a[::3]
    got = _engine_slerp(a, b, 0.5, out_dtype)
    assert (got[::3] == 0).all()
    _assert_close("t=0.5", got, a, b, 0.5)


@pytest.mark.parametrize("math_dtype", [torch.float32, torch.float64])
def test_statistics_do_not_depend_on_the_thread_count(math_dtype):
    # Statistics are cached across merges and computed in different threads: a cached
    # statistic must equal a fresh one bit for bit, whatever torch's thread count was.
    from fastmerge.engine.cpu import _torch_threads

    a, b = _pair(3_000_001, "random", torch.bfloat16)
    results = []
    for threads in (1, 2, 1, 2):
        with _torch_threads(threads):
            results.append(CpuEngine().statistics(a, b, math_dtype))
    assert all(r == results[0] for r in results), results
