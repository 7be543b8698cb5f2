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


def slerp_coefficients_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """coef_a, coef_b of SLERP at t for a pair, from float64 norms and dot product."""
    a64 = a.detach().to("cpu", torch.float64).reshape(-1)
    b64 = b.detach().to("cpu", torch.float64).reshape(-1)
    norm_a = a64.norm().item()
    norm_b = b64.norm().item()
    scale_a = norm_a if norm_a > NORM_EPS else 1.0
    scale_b = norm_b if norm_b > NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, torch.dot(a64, b64).item() / (scale_a * scale_b)))

    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


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

    coef_a, coef_b = slerp_coefficients_reference(a, b, t)
    a64 = a.detach().to("cpu", torch.float64)
    b64 = b.detach().to("cpu", torch.float64)
    return (coef_a * a64 + coef_b * b64).to(out_dtype)


def slerp_mismatches(
    got: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    math_dtype: torch.dtype,
    max_ulps: int = 1,
) -> torch.Tensor:
    """A mask of the elements of `got` that are not a faithful SLERP of a and b at t.

    An element passes when it is within `max_ulps` ulps of the output dtype of the float64
    reference, or of the rounding of some value within the math dtype's floor of the exact
    result: math in dtype D rounds ca·a and cb·b at one ulp of D of their size, which is
    many ulps of a result where the two nearly cancel (and where the output dtype, like
    bfloat16, has the range to show it). That floor is what mergekit's float32 math has too.
    """
    out_dtype = got.dtype
    got = got.detach().cpu().reshape(-1)
    coef_a, coef_b = slerp_coefficients_reference(a, b, t)
    a64 = a.detach().to("cpu", torch.float64).reshape(-1)
    b64 = b.detach().to("cpu", torch.float64).reshape(-1)
    exact = coef_a * a64 + coef_b * b64

    floor = torch.finfo(math_dtype).eps * (abs(coef_a) * a64.abs() + abs(coef_b) * b64.abs())
    low, high = (exact - floor).to(out_dtype), (exact + floor).to(out_dtype)
    passes = (
        (ulp_distance(got, exact.to(out_dtype)) <= max_ulps)
        | ((got >= low) & (got <= high))
        | (ulp_distance(got, low) <= max_ulps)
        | (ulp_distance(got, high) <= max_ulps)
    )
    return ~passes


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
