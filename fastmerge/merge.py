"""Merging, end to end: open a pair, plan, stream through the engine into sinks, commit.

inputs ─ hub / reader (headers, mmap views) ─ plan ─ engine ─ sink ─ (OutputTransaction)

A `Pair` opens two checkpoints and plans once from their headers; each merge re-times the plan
(`MergePlan.with_t`) and streams it into a directory (a ShardWriter inside an
OutputTransaction), an existing module's parameters, a state dict or an iterator. A sweep
reads each tensor pair once, computes its statistics once and blends it once per t.
`merge` and `sweep` are the one-shot forms the command line uses.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from . import hub
from .engine import Engine, Job, NonFiniteInput, Sink, select_engine
from .engine.cpu import CpuEngine
from .errors import FastmergeError, MergeError
from .manifest import write_manifest
from .model_card import model_card
from .output import OutputTransaction, copy_companions, write_json
from .plan import (
    DEFAULT_SHARD_SIZE,
    OUTPUT_DTYPES,
    MergePlan,
    Method,
    PlannedTensor,
    build_plan,
)
from .reader import Checkpoint, open_checkpoint
from .result import MergeResult, TensorReport
from .schedule import Schedule
from .sinks import ModuleSink, StateDictSink
from .slerp import PairStatistics, compute_dtype, slerp_blend
from .writer import ShardWriter

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes written so far, total output bytes), from the writer thread."""

T = float | str | list | Schedule | Callable[[str], float]
"""A t: a number, a schedule (mergekit's list forms, --t text, a Schedule) or name -> t."""

Target = str | os.PathLike | torch.nn.Module | Sink
"""Where a merge goes: a directory, a module's parameters (in place), or any Sink."""


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """SLERP of two tensors of the same shape, each treated as one flat vector.

    The result has a's shape and `out_dtype` (default: a's dtype). t = 0 gives a and t = 1
    gives b exactly, up to the cast. CPU tensors run on the chunked torch engine, CUDA
    tensors on the Triton kernels.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"slerp needs tensors of one shape and dtype, got {a.dtype}{tuple(a.shape)} and "
            f"{b.dtype}{tuple(b.shape)}"
        )
    out_dtype = out_dtype or a.dtype
    if a.device.type == "cuda":
        from . import kernels

        if out_dtype not in kernels.SUPPORTED_DTYPES:
            raise NotImplementedError(
                f"fastmerge.slerp on CUDA tensors writes float16, bfloat16 or float32, not "
                f"{out_dtype}"
            )
        return kernels.slerp(a.contiguous(), b.contiguous(), t, out_dtype=out_dtype)
    if a.device.type != "cpu":
        raise NotImplementedError(f"fastmerge.slerp on {a.device.type} tensors is not supported")

    engine = select_engine("cpu")
    math_dtype = compute_dtype(a.dtype, out_dtype)
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    stats = engine.statistics(flat_a, flat_b, math_dtype)
    out = torch.empty(a.shape, dtype=out_dtype)
    engine.blend(flat_a, flat_b, slerp_blend(stats, t), out.view(-1), math_dtype)
    return out


def merge(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    t: T = 0.5,
    *,
    dtype: str | torch.dtype = "float16",
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | Engine = "auto",
    force: bool = False,
    lerp_vectors: bool = False,
    extrapolate: bool = False,
    allow_architecture_mismatch: bool = False,
    on_progress: ProgressCallback | None = None,
    ray: str | None = None,
) -> MergeResult:
    """SLERP-merge checkpoint `a` (the base) with `b` at `t` into the directory `out`.

    `a` and `b` are model directories, index files, .safetensors files or Hub ids. `t` is a
    number or a schedule (see fastmerge.schedule). The output is complete or absent: it is
    built beside `out` and moved into place at the end; an existing `out` is replaced only
    with `force`. `device` is auto, cpu, cuda or cuda:N, or an Engine. `ray` ("local",
    "auto", HOST:PORT or ray://HOST:10001) runs the merge as parallel units on Ray, one per
    output shard (fastmerge.distributed), with the same output. Raises FastmergeError (with a
    message meant for people) on bad input.
    """
    return sweep(
        a,
        b,
        [t],
        [out],
        dtype=dtype,
        shard_size=shard_size,
        device=device,
        force=force,
        lerp_vectors=lerp_vectors,
        extrapolate=extrapolate,
        allow_architecture_mismatch=allow_architecture_mismatch,
        on_progress=on_progress,
        ray=ray,
    )[0]


def sweep(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    ts: Sequence[T],
    outs: Sequence[str | os.PathLike[str]],
    *,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    ray: str | None = None,
    **options,
) -> list[MergeResult]:
    """Merge `a` and `b` at every t of `ts` into the matching directory of `outs`, reading
    each tensor pair once. The outputs are moved into place together at the end: a failure
    before that leaves none. `options` are merge()'s."""
    if ray is not None:
        from . import distributed

        return distributed.sweep(
            a, b, ts, outs, ray=ray, force=force, on_progress=on_progress, **options
        )

    started = time.perf_counter()
    with Pair(a, b, t=ts[0] if ts else 0.5, **options) as pair:
        results = pair.sweep(ts, outs, force=force, on_progress=on_progress)

    seconds = time.perf_counter() - started
    for result in results:
        result.seconds = seconds
    return results


class Pair:
    """Two checkpoints opened once and planned once from their headers, to merge at any t.

    Each merge costs one read of the inputs (from the page cache, once warm) and one blend
    pass; the per-tensor statistics (‖a‖², ‖b‖², a·b do not depend on t) are computed by the
    first merge and kept. `t` is the t the plan is checked with, along with every other
    problem; merges name their own. Use as a context manager: closing releases the files.
    Nothing runs in the background between calls.
    """

    def __init__(
        self,
        a: str | os.PathLike[str],
        b: str | os.PathLike[str],
        *,
        t: T = 0.5,
        dtype: str | torch.dtype = "float16",
        shard_size: int = DEFAULT_SHARD_SIZE,
        device: str | Engine = "auto",
        lerp_vectors: bool = False,
        extrapolate: bool = False,
        allow_architecture_mismatch: bool = False,
    ) -> None:
        out_dtype = _output_dtype(dtype)
        self.names = (str(a), str(b))
        self.statistics: dict[str, PairStatistics] = {}
        self._files = ExitStack()
        try:
            base = self._files.enter_context(open_checkpoint(hub.resolve(a)))
            other = self._files.enter_context(open_checkpoint(hub.resolve(b)))
            self.plan = build_plan(
                base,
                other,
                t,
                out_dtype=out_dtype,
                shard_size=shard_size,
                lerp_vectors=lerp_vectors,
                extrapolate=extrapolate,
                allow_architecture_mismatch=allow_architecture_mismatch,
            )
            self.engine = select_engine(device)
        except BaseException:
            self._files.close()
            raise
        self._roots = [_root(base), _root(other)]

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def merge(
        self,
        t: T,
        into: Target,
        *,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> MergeResult:
        """Merge at `t` into a directory, a module's parameters (in place) or a Sink."""
        return self.sweep([t], [into], force=force, on_progress=on_progress)[0]

    def sweep(
        self,
        ts: Sequence[T],
        into: Sequence[Target],
        *,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> list[MergeResult]:
        """Merge at every t of `ts` into the matching target, reading each tensor pair once.

        Directories are built beside their destinations and all moved into place at the end
        (a failure before that leaves every destination as it was). The results share one
        read: their bytes_read and seconds are the sweep's.
        """
        if len(ts) != len(into) or not ts:
            raise FastmergeError(
                f"a sweep needs one target per t: {len(ts)} t value(s), {len(into)} target(s)"
            )
        plans = [self.plan.with_t(t) for t in ts]
        transactions = self._transactions(into, force)
        started = time.perf_counter()

        with ExitStack() as outputs:
            temporaries = [outputs.enter_context(tr) if tr else None for tr in transactions]
            directory_bytes = sum(
                p.output_bytes for p, d in zip(plans, temporaries, strict=True) if d
            )
            on_bytes = _progress_counter(directory_bytes, on_progress)

            with ExitStack() as writing:
                pin = self.engine.pins_host_memory
                sinks = [
                    writing.enter_context(
                        ShardWriter(temporary, plan, on_bytes=on_bytes, pin_memory=pin)
                    )
                    if temporary is not None
                    else _sink_for(target, plan)
                    for plan, target, temporary in zip(plans, into, temporaries, strict=True)
                ]
                reports = [[] for _ in plans]
                for _, tensor_reports in self._stream(plans, sinks):
                    for collected, report in zip(reports, tensor_reports, strict=True):
                        collected.append(report)

            results = []
            for index, temporary in enumerate(temporaries):
                output = None if temporary is None else Path(into[index])
                results.append(self._result(plans[index], output, reports[index]))
                if temporary is not None:
                    _write_companions(plans[index], temporary, *self.names, results[-1])
                    write_manifest(temporary, sinks[index])

            # The outputs hold what was read only if the inputs held still meanwhile.
            self.plan.a.check_unchanged()
            self.plan.b.check_unchanged()
            for transaction in filter(None, transactions):
                transaction.commit()

        seconds = time.perf_counter() - started
        for result in results:
            result.seconds = seconds
        logger.info("merged %d output(s) in %.2f s", len(results), seconds)
        return results

    def tensors(self, t: T, *, device: str | torch.device = "cpu") -> MergedTensors:
        """The merge at `t` as an iterator of (name, tensor) on `device`, each tensor yielded
        as soon as it is complete (what vLLM's `load_weights` takes)."""
        return MergedTensors(self, self.plan.with_t(t), StateDictSink(device))

    # Streaming.

    def _stream(
        self, plans: list[MergePlan], sinks: list[Sink], *, sequential: bool = False
    ) -> Iterator[tuple[PlannedTensor, list[TensorReport]]]:
        # The CPU engine's look-ahead thread computes statistics beside the blends, and sets
        # torch to one thread while it runs. Once every statistic is known, torch's own
        # threads serve the blends better; an iterator (`sequential`) must not leave torch
        # single-threaded while the caller's code runs between two tensors.
        engine = self.engine
        known = all(
            p.name in self.statistics for p in plans[0].tensors if p.method is not Method.COPY
        )
        if (known or sequential) and isinstance(engine, CpuEngine):
            engine = CpuEngine(engine.chunk_elements, threads=1)
        return stream_each(plans, engine, sinks, statistics=self.statistics)

    def _result(
        self, plan: MergePlan, output: Path | None, reports: list[TensorReport]
    ) -> MergeResult:
        result = MergeResult(output, self.engine.name, reports)
        result.bytes_read = self._bytes_read()
        result.bytes_written = plan.output_bytes
        return result

    def _bytes_read(self) -> int:
        return self.plan.input_bytes

    def _transactions(self, into: Sequence[Target], force: bool) -> list[OutputTransaction | None]:
        """An output transaction for each directory target, every destination checked before
        anything is written; None for in-memory targets."""
        directories = [
            Path(target) if isinstance(target, str | os.PathLike) else None for target in into
        ]
        resolved = [path.resolve() for path in directories if path is not None]
        if len(set(resolved)) != len(resolved):
            raise FastmergeError(
                "the outputs of a sweep must be different directories; give the output name "
                "a {t} placeholder (-o 'out-{t}')"
            )
        # Every output of a sweep lands on the same disk, so each checks room for them all.
        needed = self.plan.output_bytes * len(resolved)
        return [
            OutputTransaction(path, self._roots, force=force, needed_bytes=needed)
            if path is not None
            else None
            for path in directories
        ]


class MergedTensors:
    """An iterator of (name, tensor) for one merge; `result` is set once it is exhausted.

    Each tensor is allocated once, filled and handed over; the iterator keeps no reference.
    """

    def __init__(self, pair: Pair, plan: MergePlan, sink: StateDictSink) -> None:
        self.result: MergeResult | None = None
        self._pair = pair
        self._plan = plan
        self._sink = sink

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        started = time.perf_counter()
        reports = []
        for planned, (report,) in self._pair._stream([self._plan], [self._sink], sequential=True):
            reports.append(report)
            yield planned.name, self._sink.state_dict.pop(planned.name)

        self.result = self._pair._result(self._plan, None, reports)
        self.result.seconds = time.perf_counter() - started


def stream(plan: MergePlan, engine: Engine, sink: Sink) -> list[TensorReport]:
    """Merge every planned tensor into the sink, in plan order, releasing input pages."""
    return [report for _, (report,) in stream_each([plan], engine, [sink])]


def stream_each(
    plans: list[MergePlan],
    engine: Engine,
    sinks: list[Sink],
    statistics: dict[str, PairStatistics] | None = None,
) -> Iterator[tuple[PlannedTensor, list[TensorReport]]]:
    """Merge the plans (one per t, the same tensors) into their sinks, tensor by tensor.

    Each input pair is read once and its statistics computed once (or taken from, and added
    to, `statistics`), then blended into every sink. Yields each tensor, with one report per
    plan, once every sink holds it.
    """
    first = plans[0]

    def jobs() -> Iterator[Job]:
        # No madvise(WILLNEED) here: on cached files it costs the main thread ~2 ms per 100 MB
        # (measured), and the statistics of the next tensor fault its pages in anyway.
        for planned in first.tensors:
            known = statistics.get(planned.name) if statistics is not None else None
            yield Job(
                planned, first.a.view(planned.source_a), first.b.view(planned.source_b), known
            )

    try:
        for index, merged in enumerate(engine.run(jobs(), sinks[0])):
            job = merged.job
            reports = [_report(job.planned, merged.stats, merged.blend)]
            for plan, sink in zip(plans[1:], sinks[1:], strict=True):
                planned = plan.tensors[index]
                stats, blend = engine.merge_tensor(planned, job.a, job.b, sink, merged.stats)
                reports.append(_report(planned, stats, blend))

            if statistics is not None and merged.stats is not None:
                statistics[job.planned.name] = merged.stats
            first.a.release(job.planned.source_a)
            first.b.release(job.planned.source_b)
            yield job.planned, reports
    except NonFiniteInput as exc:
        raise non_finite_error(first, exc) from None


def non_finite_error(plan: MergePlan, exc: NonFiniteInput) -> MergeError:
    """The message for an input holding NaN or infinity, naming the tensor and the model."""
    planned = exc.planned
    model, name = (plan.a, planned.source_a) if exc.side == "a" else (plan.b, planned.source_b)
    return MergeError(
        f"tensor {name!r} of {model.source} holds NaN or infinite values; the merge "
        "stopped and no output was written. The checkpoint is damaged: download it "
        "again or repair that tensor"
    )


def _sink_for(target: Target, plan: MergePlan) -> Sink:
    if isinstance(target, torch.nn.Module):
        return ModuleSink(target, plan)
    if callable(getattr(target, "take", None)) and callable(getattr(target, "commit", None)):
        return target
    raise TypeError(
        "a merge goes into a directory (str or Path), a torch.nn.Module (in place) or a Sink "
        f"such as fastmerge.StateDictSink; got {type(target).__name__}"
    )


def _report(planned, stats, blend) -> TensorReport:
    if blend is None:
        return TensorReport(planned.name, planned.numel, planned.t, "copy", None)
    return TensorReport(
        planned.name,
        planned.numel,
        planned.t,
        "slerp" if blend.spherical else "lerp",
        blend.angle,
        stats.norm_a,
        stats.norm_b,
    )


def _progress_counter(total: int, on_progress: ProgressCallback | None):
    if on_progress is None:
        return None
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        on_progress(done, total)

    return advance


def _write_companions(
    plan: MergePlan, directory: Path, name_a: str, name_b: str, result: MergeResult
) -> None:
    if plan.config is not None:
        write_json(directory / "config.json", plan.config)
    else:
        logger.warning("%s has no config.json; the output has none either", plan.a.source)
    copy_companions(plan.a.directory, directory)

    dtype_name = str(plan.out_dtype).removeprefix("torch.")
    card = model_card(name_a, name_b, plan.t, dtype_name, result)
    (directory / "README.md").write_text(card, encoding="utf-8")


def _root(checkpoint: Checkpoint) -> Path:
    """The path an output must stay out of: the model directory, or the single file."""
    source = checkpoint.source
    return source if source.is_dir() or source.suffix == ".safetensors" else checkpoint.directory


def _output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in OUTPUT_DTYPES:
        raise FastmergeError(
            f"output dtype {dtype!r} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}"
        )
    return OUTPUT_DTYPES[dtype]
