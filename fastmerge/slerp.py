"""The SLERP math on the host: pair statistics in, blend coefficients out.

A pair's statistics (‖a‖², ‖b‖², a·b) do not depend on t, so they are computed once per
pair and any number of t values can be blended from them. The formulas are DESIGN.md's,
which are mergekit's; `fastmerge.reference.slerp_reference` states the same math in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference import DOT_THRESHOLD, NORM_EPS


@dataclass(frozen=True)
class PairStatistics:
    """Sums over one tensor pair, accumulated in float64."""

    norm_a_sq: float
    norm_b_sq: float
    dot: float

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.norm_a_sq, self.norm_b_sq, self.dot))

    @property
    def norm_a(self) -> float:
        return math.sqrt(self.norm_a_sq)

    @property
    def norm_b(self) -> float:
        return math.sqrt(self.norm_b_sq)

    @property
    def cosine(self) -> float:
        """a·b of the normalised vectors, clamped to [-1, 1]; tiny norms are not divided."""
        norm_a = self.norm_a if self.norm_a > NORM_EPS else 1.0
        norm_b = self.norm_b if self.norm_b > NORM_EPS else 1.0
        return min(1.0, max(-1.0, self.dot / (norm_a * norm_b)))


@dataclass(frozen=True)
class Blend:
    """out = coef_a·a + coef_b·b, and how the coefficients came about."""

    coef_a: float
    coef_b: float
    angle: float
    """θ = acos(cosine) in radians, reported on both branches."""
    spherical: bool
    """False when the pair was nearly parallel (or linear interpolation was asked for)."""

    @property
    def is_copy_of_a(self) -> bool:
        return self.coef_a == 1.0 and self.coef_b == 0.0

    @property
    def is_copy_of_b(self) -> bool:
        return self.coef_a == 0.0 and self.coef_b == 1.0


def slerp_blend(stats: PairStatistics, t: float, *, linear: bool = False) -> Blend:
    """The coefficients of SLERP at t for a pair with these statistics."""
    cosine = stats.cosine
    angle = math.acos(cosine)

    if linear or abs(cosine) > DOT_THRESHOLD:
        return Blend(1.0 - t, t, angle, spherical=False)

    sin_angle = math.sin(angle)
    return Blend(
        math.sin((1.0 - t) * angle) / sin_angle,
        math.sin(t * angle) / sin_angle,
        angle,
        spherical=True,
    )


def compute_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 where float32 cannot be 1-ulp exact.

    float32 math is exact to well under one ulp of float16 and bfloat16. A float32 (or
    float64) output, or a float64 input, gets float64 math, as DESIGN.md asks for float64
    inputs and as a float32 output needs to stay within one ulp of the reference.
    """
    wide = (torch.float32, torch.float64)
    if in_dtype == torch.float64 or out_dtype in wide:
        return torch.float64
    return torch.float32


def max_abs_bound(stats: PairStatistics, blend: Blend) -> float:
    """An upper bound on |out| for every element, since |x_i| <= ‖x‖."""
    return abs(blend.coef_a) * stats.norm_a + abs(blend.coef_b) * stats.norm_b
