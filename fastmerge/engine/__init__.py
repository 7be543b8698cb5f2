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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import FastmergeError, MergeError
from ..plan import Method, PlannedTensor
from ..slerp import Blend, PairStatistics, compute_dtype, max_abs_bound, slerp_blend

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


class NonFiniteInput(MergeError):
    """An input holds NaN or infinity: `side` is "a" or "b"; the caller names the model."""

    def __init__(self, side: str, planned: PlannedTensor | None = None) -> None:
        super().__init__(f"input {side} of {planned.name if planned else 'a tensor'} is not finite")
        self.side = side
        self.planned = planned


@dataclass(frozen=True)
class Job:
    """One planned tensor with views of its inputs (and statistics, if already known)."""

    planned: PlannedTensor
    a: torch.Tensor
    b: torch.Tensor
    stats: PairStatistics | None = None


@dataclass(frozen=True)
class Merged:
    """A finished job: its statistics and coefficients (None for copied tensors)."""

    job: Job
    stats: PairStatistics | None
    blend: Blend | None


class Sink(Protocol):
    """Where merged values go: hands out flat destinations for the next elements in order."""

    def take(self, planned: PlannedTensor, remaining: int) -> torch.Tensor:
        """A 1-D destination of at most `remaining` elements of planned.out_dtype."""
        ...

    def commit(self, planned: PlannedTensor, filled: torch.Tensor, ready=None) -> None:
        """`filled` (the last destination taken) holds its values once `ready` (a CUDA event,
        or None) has completed."""
        ...


class Engine(ABC):
    """Computes SLERP on one device."""

    name: str
    device: torch.device
    pins_host_memory = False
    """Whether sinks should hand out pinned host buffers (for asynchronous device copies)."""

    @abstractmethod
    def statistics(
        self, a: torch.Tensor, b: torch.Tensor, math_dtype: torch.dtype = torch.float64
    ) -> PairStatistics:
        """‖a‖², ‖b‖² and a·b of two flat tensors, summed in float64 across chunks; within a
        chunk at least in `math_dtype` (float64 where `compute_dtype` asks for it). The same
        inputs give the same bits on every call, so statistics can be cached.

        Raises NonFiniteInput("a" or "b") when an input holds NaN or infinity.
        """

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

    def pair_statistics(
        self, planned: PlannedTensor, a: torch.Tensor, b: torch.Tensor
    ) -> PairStatistics:
        """`statistics` of a planned tensor's inputs, naming the tensor if one is not finite."""
        math_dtype = compute_dtype(planned.in_dtype, planned.out_dtype)
        try:
            return self.statistics(a.reshape(-1), b.reshape(-1), math_dtype)
        except NonFiniteInput as exc:
            raise NonFiniteInput(exc.side, planned) from None

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
        a, b = a.reshape(-1), b.reshape(-1)
        if planned.method is Method.COPY:
            self._fill(planned, sink, lambda lo, hi, out: out.copy_(a[lo:hi]))
            return None, None

        math_dtype = compute_dtype(planned.in_dtype, planned.out_dtype)
        if stats is None:
            stats = self.pair_statistics(planned, a, b)
        blend = slerp_blend(stats, planned.t, linear=planned.method is Method.LERP)
        may_overflow = max_abs_bound(stats, blend) > torch.finfo(planned.out_dtype).max

        def fill(lo: int, hi: int, out: torch.Tensor) -> None:
            self.blend(a[lo:hi], b[lo:hi], blend, out, math_dtype)
            if may_overflow and torch.isinf(out).any():
                raise overflow_error(planned)

        self._fill(planned, sink, fill)
        return stats, blend

    def run(self, jobs: Iterable[Job], sink: Sink) -> Iterator[Merged]:
        """Merge jobs into the sink in order, yielding each once its values are committed."""
        for job in jobs:
            stats, blend = self.merge_tensor(job.planned, job.a, job.b, sink, job.stats)
            yield Merged(job, stats, blend)

    @staticmethod
    def _fill(planned: PlannedTensor, sink: Sink, fill) -> None:
        done, total = 0, planned.numel
        while done < total:
            out = sink.take(planned, total - done)
            fill(done, done + out.numel(), out)
            sink.commit(planned, out)
            done += out.numel()


def overflow_error(planned: PlannedTensor) -> MergeError:
    dtype = str(planned.out_dtype).removeprefix("torch.")
    return MergeError(
        f"tensor {planned.name!r}: the merged values overflow {dtype} (largest finite "
        f"{torch.finfo(planned.out_dtype).max:g}); write the output as bfloat16 "
        "(--dtype bfloat16), which has the range of float32"
    )


def select_engine(device: str | Engine = "auto") -> Engine:
    """The engine for --device auto|cpu|cuda|cuda:N (an Engine is returned as it is).

    auto takes the GPU when torch sees one and triton imports, and says so in the log.
    """
    from .cpu import CpuEngine

    if isinstance(device, Engine):
        return device
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise FastmergeError(
            f"unknown device {device!r}; choose one of {', '.join(DEVICES)} or cuda:N"
        )
    if device == "cpu":
        return CpuEngine()

    if not torch.cuda.is_available():
        if device == "auto":
            return CpuEngine()
        raise FastmergeError(
            f"--device {device}: torch sees no CUDA device (torch {torch.__version__}, built "
            f"for CUDA {torch.version.cuda}); use --device cpu, or install a CUDA build of torch"
        )

    try:
        from .cuda import CudaEngine

        return CudaEngine("cuda" if device == "auto" else device)
    except ImportError as exc:
        if device == "auto":
            logger.warning(
                "a GPU is visible but triton does not import (%s); merging on the CPU", exc
            )
            return CpuEngine()
        raise FastmergeError(
            f"--device {device} needs triton, which does not import ({exc}); install triton "
            "or use --device cpu"
        ) from None
