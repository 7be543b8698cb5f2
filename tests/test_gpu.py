"""The kernels and the CUDA engine on a real GPU, without the interpreter.

Skipped where torch sees no CUDA device (as in CI). Run it in its own pytest process
(benchmarks/gpu_check.sh does): the interpreter tests set TRITON_INTERPRET=1 at import,
which would make the kernels interpreted for the whole session.
"""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge.reference import (
    describe_mismatch,
    max_ulp_distance,
    slerp_mismatches,
    slerp_reference,
)
from fastmerge.slerp import compute_dtype

from .test_merge import assert_matches_reference, load_output

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SIZES = (1, 7, 4099, 65_537, (1 << 22) + 3)
GEOMETRIES = ("random", "parallel", "antiparallel", "zero_a", "near_threshold")


@pytest.fixture(scope="module")
def kernels():
    from fastmerge import kernels

    if kernels.INTERPRETED:
        pytest.skip("fastmerge.kernels was imported under TRITON_INTERPRET=1 in this process")
    return kernels


def _pair(geometry: str, n: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a = 0.02 * torch.randn(n, generator=generator, dtype=torch.float64)
    b = 0.02 * torch.randn(n, generator=generator, dtype=torch.float64)
    if geometry == "parallel":
        b = 2 * a
    elif geometry == "antiparallel":
        b = -2 * a
    elif geometry == "zero_a":
        a = torch.zeros_like(a)
    elif geometry == "near_threshold":
        b = a + 0.0318 * b * a.norm() / b.norm()
    return a.to(dtype).cuda(), b.to(dtype).cuda()


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kernel_matches_reference(kernels, in_dtype, out_dtype, size, geometry):
    a, b = _pair(geometry, size, in_dtype, seed=size)
    for t in (0.6, 0.25, 1.5):
        got = kernels.slerp(a, b, t, out_dtype=out_dtype).cpu()
        want = slerp_reference(a.cpu(), b.cpu(), t, out_dtype=out_dtype)
        math_dtype = compute_dtype(in_dtype, out_dtype)
        bad = slerp_mismatches(got, a.cpu(), b.cpu(), t, math_dtype=math_dtype)
        shown = torch.where(bad, got, want)
        assert not bad.any(), describe_mismatch(geometry, shown, want, 1)


@pytest.mark.parametrize("in_dtype", DTYPES)
def test_t_zero_and_one_are_exact(kernels, in_dtype):
    a, b = _pair("random", 65_537, in_dtype)
    for out_dtype in DTYPES:
        assert torch.equal(kernels.slerp(a, b, 0.0, out_dtype=out_dtype), a.to(out_dtype))
        assert torch.equal(kernels.slerp(a, b, 1.0, out_dtype=out_dtype), b.to(out_dtype))


def test_grouped_segments_in_guard_buffers(kernels):
    lengths = [0, 1, 4096, 4097, 70_001, 3]
    ts = [0.5, 0.2, 0.6, -0.25, 0.9, 1.0]
    pairs = [_pair("random", n, torch.bfloat16, seed=i) for i, n in enumerate(lengths)]
    total = sum(lengths)

    guard = 4096
    a = torch.full((total + 2 * guard,), float("nan"), dtype=torch.bfloat16, device="cuda")
    b = a.clone()
    a[guard : guard + total] = torch.cat([p[0] for p in pairs])
    b[guard : guard + total] = torch.cat([p[1] for p in pairs])
    out = torch.full((total + 2 * guard,), 7.0, dtype=torch.float16, device="cuda")
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    t = torch.tensor(ts, dtype=torch.float64, device="cuda")

    kernels.slerp_segments(a[guard:-guard], b[guard:-guard], offsets, t, out=out[guard:-guard])
    assert (out[:guard] == 7.0).all() and (out[-guard:] == 7.0).all()
    merged = out[guard:-guard].cpu().split(lengths)
    for k, ((pa, pb), got) in enumerate(zip(pairs, merged, strict=True)):
        want = slerp_reference(pa.cpu(), pb.cpu(), ts[k])
        assert max_ulp_distance(got, want) <= 1, describe_mismatch(f"segment {k}", got, want, 1)


def test_64_bit_offsets(kernels):
    # More than 2^31 elements: offsets past the int32 range must land where they belong.
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2 + (1 << 30):
        pytest.skip(f"needs {3 * n * 2 / 2**30:.0f} GiB of free GPU memory")
    a = torch.ones(n, dtype=torch.float16, device="cuda")
    b = torch.ones(n, dtype=torch.float16, device="cuda")
    b[-4099:] = -1.0
    out = kernels.slerp(a, b, 0.5)
    # cos = (n - 2·4099)/n, nearly 1: the linear branch; the last 4099 elements are 0.
    assert out[-4099:].eq(0).all() and out[:-4099][-10:].eq(1).all()
    del a, b, out


def test_public_slerp_on_cuda_tensors():
    a, b = _pair("random", 10_000, torch.bfloat16)
    got = fastmerge.slerp(a.view(100, 100), b.view(100, 100), 0.6, out_dtype=torch.float16)
    assert got.device.type == "cuda" and got.shape == (100, 100)
    want = slerp_reference(a.cpu().view(100, 100), b.cpu().view(100, 100), 0.6)
    assert max_ulp_distance(got.cpu(), want) <= 1


def test_streaming_merge_on_the_gpu_matches_the_cpu(tiny_untied_sharded_pair, tmp_path):
    a, b = tiny_untied_sharded_pair
    gpu = fastmerge.merge(a, b, tmp_path / "gpu", 0.6, device="cuda", shard_size=40_000)
    fastmerge.merge(a, b, tmp_path / "cpu", 0.6, device="cpu", shard_size=40_000)
    assert "cuda" in gpu.device

    merged = assert_matches_reference(tmp_path / "gpu", a, b, 0.6)
    on_cpu = load_output(tmp_path / "cpu")
    for name, tensor in merged.items():
        assert max_ulp_distance(tensor, on_cpu[name]) <= 1, name
