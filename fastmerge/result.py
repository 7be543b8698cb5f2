"""What a merge reports back: per-tensor angles and branches, bytes and timings."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TensorReport:
    """One output tensor: its t, the branch it took and the angle between its inputs."""

    name: str
    numel: int
    t: float
    method: str
    """"slerp" or "lerp" (the branch taken), or "copy" for non-float tensors."""
    angle: float | None
    """Angle between the two inputs in radians (None for copies)."""
    norm_a: float | None = None
    norm_b: float | None = None

    @property
    def angle_degrees(self) -> float | None:
        return None if self.angle is None else math.degrees(self.angle)


@dataclass
class MergeResult:
    """The outcome of one merge."""

    output: Path | None
    device: str
    tensors: list[TensorReport] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def gigabytes_per_second(self) -> float:
        """Output bytes per second, in GB/s."""
        return self.bytes_written / self.seconds / 1e9 if self.seconds else 0.0

    def count(self, method: str) -> int:
        return sum(1 for r in self.tensors if r.method == method)

    def angle_summary(self) -> tuple[float, float, float] | None:
        """Smallest, median and largest angle between the inputs, in degrees."""
        angles = [r.angle_degrees for r in self.tensors if r.angle is not None]
        if not angles:
            return None
        return min(angles), statistics.median(angles), max(angles)
