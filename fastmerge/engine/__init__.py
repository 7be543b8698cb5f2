"""Engines turn a tensor pair into merged values in a destination the sink hands out.

An engine has two primitives: `statistics` (one pass over the pair: ‖a‖², ‖b‖², a·b) and
`blend` (out = coef_a·a + coef_b·b, cast once). `merge_tensor` drives them for one planned
tensor, taking destinations from a sink chunk by chunk, so the same engine can stream into
shard files or fill tensors in memory. The CPU engine is a chunked torch loop; the CUDA
engine (fastmerge.engine.cuda) runs the Triton kernels and overrides the whole loop.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Protocol

import torch

from ..errors import FastmergeError, MergeError
from ..plan import Method, PlannedTensor
from ..slerp import Blend, PairStatistics, max_abs_bound, slerp_blend

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


class NonFiniteInput(MergeError):
    """A tensor holds NaN or infinity; the caller adds which model and tensor."""


class Sink(Protocol):
    """Where merged values go: hands out flat destinations for the next elements in order."""

    def take(self, planned: PlannedTensor, remaining: int) -> torch.Tensor:
        """A 1-D destination of at most `remaining` elements of planned.out_dtype."""
        ...

    def commit(self, planned: PlannedTensor, filled: torch.Tensor) -> None:
        """`filled` (the last destination taken) now holds its values."""
        ...


class Engine(ABC):
    """Computes SLERP on one device."""

    name: str
    device: torch.device

    @abstractmethod
    def statistics(
        self, a: torch.Tensor, b: torch.Tensor, math_dtype: torch.dtype
    ) -> PairStatistics:
        """‖a‖², ‖b‖² and a·b of two flat tensors; raises NonFiniteInput on NaN or inf."""

    @abstractmethod
    def blend(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        blend: Blend,
        out: torch.Tensor,
        math_dtype: torch.dtype,
    ) -> None:
        """out = coef_a·a + coef_b·b for flat tensors of equal length, cast once to out's dtype."""

    def merge_tensor(
        self,
        planned: PlannedTensor,
        a: torch.Tensor,
        b: torch.Tensor,
        sink: Sink,
        stats: PairStatistics | None = None,
    ) -> tuple[PairStatistics | None, Blend | None]:
        """Merge one planned tensor into the sink; returns its statistics and coefficients.

        `stats` may come from a cache: they do not depend on t.
        """
        from ..slerp import compute_dtype

        a, b = a.reshape(-1), b.reshape(-1)
        if planned.method is Method.COPY:
            self._fill(planned, sink, lambda lo, hi, out: out.copy_(a[lo:hi]))
            return None, None

        math_dtype = compute_dtype(planned.in_dtype, planned.out_dtype)
        if stats is None:
            stats = self.statistics(a, b, math_dtype)
        blend = slerp_blend(stats, planned.t, linear=planned.method is Method.LERP)
        may_overflow = max_abs_bound(stats, blend) > torch.finfo(planned.out_dtype).max

        def fill(lo: int, hi: int, out: torch.Tensor) -> None:
            self.blend(a[lo:hi], b[lo:hi], blend, out, math_dtype)
            if may_overflow and torch.isinf(out).any():
                raise MergeError(
                    f"tensor {planned.name!r}: the merged values overflow "
                    f"{str(planned.out_dtype).removeprefix('torch.')} (largest finite "
                    f"{torch.finfo(planned.out_dtype).max:g}); write the output as bfloat16 "
                    "(--dtype bfloat16), which has the range of float32"
                )

        self._fill(planned, sink, fill)
        return stats, blend

    @staticmethod
    def _fill(planned: PlannedTensor, sink: Sink, fill) -> None:
        done, total = 0, planned.numel
        while done < total:
            out = sink.take(planned, total - done)
            fill(done, done + out.numel(), out)
            sink.commit(planned, out)
            done += out.numel()


def select_engine(device: str = "auto") -> Engine:
    """The engine for --device auto|cpu|cuda."""
    from .cpu import CpuEngine

    if device not in DEVICES:
        raise FastmergeError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda":
        raise FastmergeError(
            "--device cuda is not available yet: the CUDA streaming engine has not landed; "
            "use --device cpu (or auto)"
        )
    return CpuEngine()
