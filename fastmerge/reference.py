"""The oracle: SLERP in float64, plain torch, and distances in units in the last place.

Every backend (the chunked CPU engine, the Triton kernels) is tested against
`slerp_reference`, and benchmarks check their results with `max_ulp_distance` after timing.
The math is the one in DESIGN.md, which is what mergekit 0.1.5 computes.
"""

from __future__ import annotations

import math

import torch

NORM_EPS = 1e-8
"""A norm at or below this is left undivided (treated as 1)."""

DOT_THRESHOLD = 0.9995
"""Above this |cos θ| the pair is treated as parallel and linearly interpolated."""


def slerp_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """SLERP of two tensors treated as flat vectors, computed in float64, cast once."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")

    a64 = a.detach().to("cpu", torch.float64).reshape(-1)
    b64 = b.detach().to("cpu", torch.float64).reshape(-1)

    norm_a = a64.norm().item()
    norm_b = b64.norm().item()
    unit_a = a64 / norm_a if norm_a > NORM_EPS else a64
    unit_b = b64 / norm_b if norm_b > NORM_EPS else b64
    dot = min(1.0, max(-1.0, torch.dot(unit_a, unit_b).item()))

    if abs(dot) > DOT_THRESHOLD:
        out = (1.0 - t) * a64 + t * b64
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        out = (math.sin((1.0 - t) * theta) / sin_theta) * a64 + (
            math.sin(t * theta) / sin_theta
        ) * b64

    return out.reshape(a.shape).to(out_dtype)


# Bit patterns of IEEE floats, read as sign-magnitude integers, map to a line on which
# adjacent representable values are one apart.
_INT_OF = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    bits = x.contiguous().view(_INT_OF[x.dtype]).to(torch.int64)
    sign_bit = 1 << (torch.finfo(x.dtype).bits - 1)
    magnitude = bits & (sign_bit - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in ulps between two tensors of the same float dtype.

    +0 and -0 are 0 apart; NaN anywhere gives a distance of 2**62 at that element.
    """
    if x.dtype != y.dtype or x.shape != y.shape:
        raise ValueError(f"cannot compare {x.dtype}{tuple(x.shape)} with {y.dtype}{tuple(y.shape)}")

    x = x.detach().cpu()
    y = y.detach().cpu()
    distance = (_ordered_bits(x) - _ordered_bits(y)).abs()
    return torch.where(x.isnan() | y.isnan(), torch.full_like(distance, 2**62), distance)


def max_ulp_distance(x: torch.Tensor, y: torch.Tensor) -> int:
    """The largest ulp distance between two tensors (0 for empty tensors)."""
    if x.numel() == 0:
        return 0
    return int(ulp_distance(x, y).max().item())


def describe_mismatch(name: str, got: torch.Tensor, want: torch.Tensor, max_ulps: int) -> str:
    """A test failure message: which tensor, how many elements differ, the first few."""
    distance = ulp_distance(got, want).reshape(-1)
    bad = (distance > max_ulps).nonzero().reshape(-1)
    got_flat, want_flat = got.reshape(-1), want.reshape(-1)
    first = ", ".join(
        f"[{i}] got {got_flat[i].item()!r} want {want_flat[i].item()!r} ({distance[i].item()} ulp)"
        for i in bad[:5].tolist()
    )
    return (
        f"{name}: {bad.numel()} of {distance.numel()} elements differ by more than "
        f"{max_ulps} ulp of {got.dtype}; first: {first}"
    )
