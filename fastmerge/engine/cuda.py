"""The CUDA engine: the fused Triton kernels, fed by a pipeline that overlaps every stage.

For a stream of tensor pairs, `run` works batch by batch (consecutive tensors up to a byte
budget, or one large tensor):

    host: mmap view ─memcpy→ pinned staging ring ─H2D (copy stream)→ device batch buffers
    device (compute stream): waits for the upload, then statistics, coefficients and blend
                             for the whole batch in three launches; output and statistics
                             go back into pinned buffers (D2H) with an event each
    host: the writer thread waits on each output event and writes; the statistics of batch k
          are read only after batch k+1 has been queued, so the stream never waits on them

Inputs are read from the page cache once into pinned memory (the one host copy a GPU merge
cannot avoid short of registering the file mapping itself), and nothing goes back to the
host but the output and 56 bytes of statistics per tensor.

Run with a CPU device under TRITON_INTERPRET=1, the same code runs the kernels in Triton's
interpreter with synchronous copies: that is how CI tests this pipeline without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..plan import Method
from ..slerp import Blend, PairStatistics, max_abs_bound
from . import Engine, Job, Merged, NonFiniteInput, Sink, overflow_error

logger = logging.getLogger(__name__)

BATCH_BYTES = 1 << 30
"""Input bytes (both models) merged per batch of launches; a larger tensor is its own batch."""

STAGING_BYTES = 64 << 20
"""Bytes per pinned staging buffer between the page cache and the device."""

STAGING_BUFFERS = 4

_STATS = 7  # columns of the kernels' statistics: norm_a, norm_b, cos, theta, branch, ca, cb


@dataclass
class _Batch:
    """One group of launches: its jobs, device buffers, and where each job's segment lies."""

    jobs: list[Job]
    offsets: list[int]
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    out: torch.Tensor | None = None
    stats_host: torch.Tensor | None = None
    stats_ready: object = None


class CudaEngine(Engine):
    """SLERP with the Triton kernels on one device, streamed from host memory."""

    def __init__(
        self,
        device: str | torch.device = "cuda",
        *,
        batch_bytes: int = BATCH_BYTES,
        staging_bytes: int = STAGING_BYTES,
    ) -> None:
        from .. import kernels  # triton is imported only when a GPU merge is asked for

        self.kernels = kernels
        self.device = torch.device(device)
        self.batch_bytes = batch_bytes
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:
            self.device = torch.device(
                "cuda",
                torch.cuda.current_device() if self.device.index is None else self.device.index,
            )
            self.name = f"{self.device} {torch.cuda.get_device_name(self.device)} (triton)"
            self.compute_stream = torch.cuda.Stream(self.device)
            self.copy_stream = torch.cuda.Stream(self.device)
        else:
            self.name = f"{self.device} (triton interpreter)"
            self.compute_stream = self.copy_stream = None
        self._ring = [
            torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=self.on_gpu)
            for _ in range(STAGING_BUFFERS)
        ]
        self._ring_ready: list[object] = [None] * STAGING_BUFFERS
        self._ring_next = 0

    @property
    def pins_host_memory(self) -> bool:
        return self.on_gpu

    # The primitives, for single tensors (fastmerge.slerp, inspect, cached statistics).

    def statistics(
        self, a: torch.Tensor, b: torch.Tensor, math_dtype: torch.dtype = torch.float64
    ) -> PairStatistics:
        a, b = a.to(self.device), b.to(self.device)
        offsets = torch.tensor([0, a.numel()], dtype=torch.int64, device=self.device)
        t = torch.zeros(1, dtype=torch.float64, device=self.device)
        # The kernels sum in float64 for the float32 outputs that need it.
        like = torch.float32 if math_dtype == torch.float64 else torch.float16
        row = self.kernels.segment_statistics(a, b, offsets, t, out_dtype=like)[0]
        norm_a, norm_b, cos = row[:3].tolist()
        stats = PairStatistics(norm_a * norm_a, norm_b * norm_b, _dot(norm_a, norm_b, cos))
        if not stats.finite:
            raise NonFiniteInput("a" if not torch.isfinite(a).all() else "b")
        return stats

    def blend(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        blend: Blend,
        out: torch.Tensor,
        math_dtype: torch.dtype,
    ) -> None:
        a, b = a.to(self.device), b.to(self.device)
        offsets = torch.tensor([0, a.numel()], dtype=torch.int64, device=self.device)
        stats = torch.zeros((1, _STATS), dtype=torch.float64, device=self.device)
        stats[0, 5], stats[0, 6] = blend.coef_a, blend.coef_b
        if out.device == self.device:
            self.kernels.blend_segments(a, b, offsets, stats, out_dtype=out.dtype, out=out)
        else:
            out.copy_(self.kernels.blend_segments(a, b, offsets, stats, out_dtype=out.dtype))

    # The streaming pipeline.

    def run(self, jobs: Iterable[Job], sink: Sink) -> Iterator[Merged]:
        pending: _Batch | None = None
        with self._on(self.compute_stream):
            for batch in self._batches(jobs):
                if batch.jobs[0].planned.method is Method.COPY or batch.jobs[0].stats is not None:
                    # Copies and cached statistics take the primitives; keep the order.
                    if pending is not None:
                        yield from self._finish(pending, sink)
                        pending = None
                    for job in batch.jobs:
                        stats, blend = self.merge_tensor(job.planned, job.a, job.b, sink, job.stats)
                        yield Merged(job, stats, blend)
                    continue

                self._upload(batch)
                self._launch(batch)
                self._download(batch, sink)
                if pending is not None:
                    yield from self._finish(pending, sink)
                pending = batch
            if pending is not None:
                yield from self._finish(pending, sink)

    def _batches(self, jobs: Iterable[Job]) -> Iterator[_Batch]:
        """Consecutive streamable jobs up to the byte budget; other jobs alone."""
        current: list[Job] = []
        size = 0
        for job in jobs:
            streamable = job.planned.method is not Method.COPY and job.stats is None
            nbytes = 2 * job.a.numel() * job.a.element_size()
            same_dtype = not current or (current[0].a.dtype, current[0].planned.out_dtype) == (
                job.a.dtype,
                job.planned.out_dtype,
            )
            if current and (not streamable or size + nbytes > self.batch_bytes or not same_dtype):
                yield _Batch(current, _offsets(current))
                current, size = [], 0
            if not streamable:
                yield _Batch([job], _offsets([job]))
                continue
            current.append(job)
            size += nbytes
        if current:
            yield _Batch(current, _offsets(current))

    def _upload(self, batch: _Batch) -> None:
        """Page cache → pinned ring → device, piece by piece, on the copy stream."""
        total = batch.offsets[-1]
        dtype = batch.jobs[0].a.dtype
        batch.a = torch.empty(total, dtype=dtype, device=self.device)
        batch.b = torch.empty(total, dtype=dtype, device=self.device)

        with self._on(self.copy_stream):
            for job, start in zip(batch.jobs, batch.offsets, strict=False):
                end = start + job.a.numel()
                self._copy_in(job.a.reshape(-1), batch.a[start:end])
                self._copy_in(job.b.reshape(-1), batch.b[start:end])
        if self.on_gpu:
            self.compute_stream.wait_stream(self.copy_stream)
            batch.a.record_stream(self.copy_stream)
            batch.b.record_stream(self.copy_stream)

    def _copy_in(self, source: torch.Tensor, destination: torch.Tensor) -> None:
        if not self.on_gpu:
            destination.copy_(source)
            return
        piece = self._ring[0].numel() // source.element_size()
        for lo in range(0, source.numel(), piece):
            hi = min(lo + piece, source.numel())
            slot = self._ring_next
            self._ring_next = (slot + 1) % len(self._ring)
            if self._ring_ready[slot] is not None:
                self._ring_ready[slot].synchronize()  # its previous upload has left the buffer
            staged = self._ring[slot][: (hi - lo) * source.element_size()].view(source.dtype)
            staged.copy_(source[lo:hi])
            destination[lo:hi].copy_(staged, non_blocking=True)
            self._ring_ready[slot] = self._event()

    def _launch(self, batch: _Batch) -> None:
        """The three kernels for the whole batch; linear-only tensors get (1 - t, t)."""
        device = self.device
        planned = [job.planned for job in batch.jobs]
        offsets = torch.tensor(batch.offsets, dtype=torch.int64).to(device, non_blocking=True)
        t = torch.tensor([p.t for p in planned], dtype=torch.float64).to(device, non_blocking=True)
        out_dtype = planned[0].out_dtype

        kernels = self.kernels
        stats = kernels.segment_statistics(batch.a, batch.b, offsets, t, out_dtype=out_dtype)
        linear = [i for i, p in enumerate(planned) if p.method is Method.LERP]
        if linear:
            rows = torch.tensor(linear, device=device)
            stats[rows, 5] = 1.0 - t[rows]
            stats[rows, 6] = t[rows]
        batch.out = kernels.blend_segments(batch.a, batch.b, offsets, stats, out_dtype=out_dtype)

        batch.stats_host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=self.on_gpu)
        batch.stats_host.copy_(stats, non_blocking=True)
        batch.stats_ready = self._event()

    def _download(self, batch: _Batch, sink: Sink) -> None:
        """Each job's output into the sink's destinations, in order; the writer waits on events."""
        for job, start in zip(batch.jobs, batch.offsets, strict=False):
            total, done = job.planned.numel, 0
            while done < total:
                destination = sink.take(job.planned, total - done)
                count = destination.numel()
                destination.copy_(batch.out[start + done : start + done + count], non_blocking=True)
                sink.commit(job.planned, destination, ready=self._event())
                done += count

    def _finish(self, batch: _Batch, sink: Sink) -> Iterator[Merged]:
        """Read a batch's statistics (queued a batch ago), check them, and report its jobs."""
        if batch.stats_ready is not None:
            batch.stats_ready.synchronize()
        rows = batch.stats_host.tolist()
        for job, start, row in zip(batch.jobs, batch.offsets, rows, strict=False):
            norm_a, norm_b, cos, theta, branch, coef_a, coef_b = row
            stats = PairStatistics(norm_a * norm_a, norm_b * norm_b, _dot(norm_a, norm_b, cos))
            if not stats.finite:
                side = "a" if not torch.isfinite(job.a).all() else "b"
                raise NonFiniteInput(side, job.planned)

            # The coefficients the device used, with the branch it took.
            spherical = branch == 1.0 and job.planned.method is not Method.LERP
            blend = Blend(coef_a, coef_b, theta, spherical)
            if max_abs_bound(stats, blend) > torch.finfo(job.planned.out_dtype).max:
                merged = batch.out[start : start + job.planned.numel]
                if torch.isinf(merged).any():
                    raise overflow_error(job.planned)
            yield Merged(job, stats, blend)

    def _event(self):
        if not self.on_gpu:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _offsets(jobs: list[Job]) -> list[int]:
    offsets = [0]
    for job in jobs:
        offsets.append(offsets[-1] + job.a.numel())
    return offsets


def _dot(norm_a: float, norm_b: float, cos: float) -> float:
    """a·b back from the kernels' cosine (which divided by norms at or below 1e-8 as 1)."""
    from ..reference import NORM_EPS

    return cos * (norm_a if norm_a > NORM_EPS else 1.0) * (norm_b if norm_b > NORM_EPS else 1.0)
