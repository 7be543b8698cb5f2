"""The GPU path, measured against the same device's copy bandwidths in the same run.

- the kernel on one large tensor, against a device-to-device copy of the same bytes;
- a whole SmolLM-135M-shaped merge with both inputs already resident (one grouped launch of
  all 272 tensors, launch overhead included), and the same tensor by tensor;
- the streaming merge from the page cache, against pinned host-to-device copy bandwidth.

Skipped where torch sees no CUDA device.
"""

from __future__ import annotations

import math
import shutil
import time

import pytest
import torch

import fastmerge
from fastmerge.engine import Job
from fastmerge.plan import build_plan
from fastmerge.reader import open_checkpoint
from fastmerge.reference import max_ulp_distance, slerp_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

T = 0.6


def _cuda_seconds(function, rounds: int = 20) -> float:
    """Median seconds of `function` on the current stream, timed with CUDA events."""
    function()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def test_kernel_against_device_copy(report):
    from fastmerge import kernels

    n = 1 << 28  # 256M elements: 512 MiB per bf16 input
    a = torch.randn(n, device="cuda").to(torch.bfloat16)
    b = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.empty(n, dtype=torch.float16, device="cuda")
    offsets = torch.tensor([0, n], device="cuda")
    t = torch.tensor([T], dtype=torch.float64, device="cuda")

    kernel_s = _cuda_seconds(lambda: kernels.slerp_segments(a, b, offsets, t, out=out))
    moved = kernels.bytes_moved(n, torch.bfloat16, torch.float16)
    source = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    destination = torch.empty_like(source)
    copy_s = _cuda_seconds(lambda: destination.copy_(source))

    kernel_gbs, copy_gbs = moved / kernel_s / 1e9, moved / copy_s / 1e9
    report.add(
        "GPU kernel, 256M-element bf16 pair",
        "fused SLERP (3 launches)",
        f"{kernel_gbs:.0f} GB/s ({kernel_s * 1e3:.2f} ms)",
        f"device copy of the same bytes {copy_gbs:.0f} GB/s",
        f"{kernel_gbs / copy_gbs:.0%} of copy",
    )

    sample = torch.randint(0, n, (4096,), device="cuda")
    stats_a, stats_b = a.double(), b.double()
    cos = (stats_a @ stats_b / (stats_a.norm() * stats_b.norm())).item()
    del stats_a, stats_b
    theta = math.acos(cos)
    ca, cb = math.sin((1 - T) * theta) / math.sin(theta), math.sin(T * theta) / math.sin(theta)
    want = (ca * a[sample].double() + cb * b[sample].double()).half()
    assert max_ulp_distance(out[sample].cpu(), want.cpu()) <= 1


@pytest.fixture(scope="module")
def resident_135m(pair_135m):
    a, b = pair_135m
    base, other = open_checkpoint(a), open_checkpoint(b)
    plan = build_plan(base, other, T)
    names = [p.name for p in plan.tensors]
    a_flat = torch.cat([base.view(n).reshape(-1) for n in names]).cuda()
    b_flat = torch.cat([other.view(n).reshape(-1) for n in names]).cuda()
    lengths = [base.info(n).numel for n in names]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    return plan, names, lengths, a_flat, b_flat, offsets


def test_resident_whole_model_merge(report, resident_135m):
    from fastmerge import kernels

    plan, names, lengths, a_flat, b_flat, offsets = resident_135m
    t = torch.full((len(names),), T, dtype=torch.float64, device="cuda")
    out = torch.empty(a_flat.numel(), dtype=torch.float16, device="cuda")

    grouped_s = _cuda_seconds(lambda: kernels.slerp_segments(a_flat, b_flat, offsets, t, out=out))
    pieces = list(zip(a_flat.split(lengths), b_flat.split(lengths), strict=True))
    per_tensor_s = _cuda_seconds(lambda: [kernels.slerp(x, y, T) for x, y in pieces], rounds=5)
    moved = kernels.bytes_moved(a_flat.numel(), torch.bfloat16, torch.float16)
    report.add(
        "GPU resident SmolLM-135M merge",
        "one grouped launch, 272 tensors",
        f"{grouped_s * 1e3:.3f} ms, {moved / grouped_s / 1e9:.0f} GB/s",
        f"tensor by tensor {per_tensor_s * 1e3:.2f} ms",
        f"grouped {per_tensor_s / grouped_s:.1f}x faster",
    )

    merged = out.cpu().split(lengths)
    for name, got in list(zip(names, merged, strict=True))[::17]:
        want = slerp_reference(plan.a.view(name), plan.b.view(name), T)
        assert max_ulp_distance(got.view(plan.a.info(name).shape), want) <= 1, name


class _NullSink:
    """Takes the output into pinned buffers and drops it: the pipeline's own throughput."""

    def __init__(self, elements: int = 1 << 24) -> None:
        self.buffer = torch.empty(elements * 4, dtype=torch.uint8, pin_memory=True)

    def take(self, planned, remaining):
        count = min(remaining, self.buffer.numel() // planned.out_dtype.itemsize)
        return self.buffer[: count * planned.out_dtype.itemsize].view(planned.out_dtype)

    def commit(self, planned, filled, ready=None):
        if ready is not None:
            ready.synchronize()


@pytest.mark.parametrize("size", ["135m", "1b"])
def test_streaming_against_pinned_upload(report, request, tmp_path, size):
    from fastmerge.engine.cuda import CudaEngine

    a, b = request.getfixturevalue(f"pair_{size}")
    engine = CudaEngine("cuda")
    base, other = open_checkpoint(a), open_checkpoint(b)
    plan = build_plan(base, other, T)

    def jobs():
        return (Job(p, base.view(p.source_a), other.view(p.source_b)) for p in plan.tensors)

    list(engine.run(jobs(), _NullSink()))  # warm the page cache and the kernels
    torch.cuda.synchronize()
    started = time.perf_counter()
    list(engine.run(jobs(), _NullSink()))
    torch.cuda.synchronize()
    stream_s = time.perf_counter() - started

    pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    upload_s = _cuda_seconds(lambda: device.copy_(pinned, non_blocking=True), rounds=5)
    upload_gbs = pinned.numel() / upload_s / 1e9
    stream_gbs = plan.input_bytes / stream_s / 1e9
    label = {"135m": "SmolLM-135M pair", "1b": "1.1B pair"}[size]
    report.add(
        f"GPU streaming, {label}",
        "page cache -> GPU -> pinned output (null sink)",
        f"{stream_gbs:.1f} GB/s of input ({stream_s:.2f} s)",
        f"pinned H2D copy {upload_gbs:.1f} GB/s",
        f"{stream_gbs / upload_gbs:.0%} of H2D",
    )

    out = tmp_path / "gpu"
    result = fastmerge.merge(a, b, out, T, device=engine)
    report.add(
        f"GPU streaming, {label}",
        "whole merge to disk (fastmerge.merge)",
        f"{result.seconds:.2f} s, {result.bytes_written / result.seconds / 1e9:.2f} GB/s written",
    )
    fastmerge.merge(a, b, tmp_path / "cpu", T, device="cpu")
    with open_checkpoint(out) as gpu, open_checkpoint(tmp_path / "cpu") as cpu:
        worst = max(max_ulp_distance(gpu.view(n), cpu.view(n)) for n in gpu.tensors)
    report.add(f"GPU streaming, {label}", "GPU output vs CPU output", f"{worst} ulp (fp16)")
    assert worst <= 1
    shutil.rmtree(out)
