"""Merging, end to end: open, plan, stream through the engine into the writer, commit.

inputs ─ reader (headers, mmap views) ─ plan ─ engine ─ ShardWriter ─ OutputTransaction
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from .engine import Engine, Job, NonFiniteInput, Sink, select_engine
from .errors import FastmergeError, MergeError
from .manifest import write_manifest
from .model_card import model_card
from .output import OutputTransaction, copy_companions, write_json
from .plan import DEFAULT_SHARD_SIZE, OUTPUT_DTYPES, MergePlan, build_plan
from .reader import Checkpoint, open_checkpoint
from .result import MergeResult, TensorReport
from .slerp import compute_dtype, slerp_blend
from .writer import ShardWriter

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes written so far, total output bytes), from the writer thread."""


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """SLERP of two tensors of the same shape, each treated as one flat vector.

    The result has a's shape and `out_dtype` (default: a's dtype). t = 0 gives a and t = 1
    gives b exactly, up to the cast. CPU tensors run on the chunked torch engine.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"slerp needs tensors of one shape and dtype, got {a.dtype}{tuple(a.shape)} and "
            f"{b.dtype}{tuple(b.shape)}"
        )
    out_dtype = out_dtype or a.dtype
    if a.device.type != "cpu":
        raise NotImplementedError(
            f"fastmerge.slerp on {a.device.type} tensors is not available yet"
        )

    engine = select_engine("cpu")
    math_dtype = compute_dtype(a.dtype, out_dtype)
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    stats = engine.statistics(flat_a, flat_b)
    out = torch.empty(a.shape, dtype=out_dtype)
    engine.blend(flat_a, flat_b, slerp_blend(stats, t), out.view(-1), math_dtype)
    return out


def merge(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    t: float = 0.5,
    *,
    dtype: str | torch.dtype = "float16",
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str = "auto",
    force: bool = False,
    lerp_vectors: bool = False,
    extrapolate: bool = False,
    allow_architecture_mismatch: bool = False,
    on_progress: ProgressCallback | None = None,
) -> MergeResult:
    """SLERP-merge checkpoint `a` (the base) with `b` at `t` into the directory `out`.

    `a` and `b` are model directories, index files or .safetensors files. The output is
    complete or absent: it is built beside `out` and moved into place at the end; an
    existing `out` is replaced only with `force`. Raises FastmergeError (with a message
    meant for people) on bad input.
    """
    out_dtype = _output_dtype(dtype)
    started = time.perf_counter()

    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(a))
        other = stack.enter_context(open_checkpoint(b))
        plan = build_plan(
            base,
            other,
            t,
            out_dtype=out_dtype,
            shard_size=shard_size,
            lerp_vectors=lerp_vectors,
            extrapolate=extrapolate,
            allow_architecture_mismatch=allow_architecture_mismatch,
        )
        engine = select_engine(device)
        logger.info(
            "merging %d tensors (%d bytes) on %s", len(plan.tensors), plan.output_bytes, engine.name
        )

        transaction = OutputTransaction(
            out, [_root(base), _root(other)], force=force, needed_bytes=plan.output_bytes
        )
        with transaction as temporary:
            progress = _progress_counter(plan.output_bytes, on_progress)
            with ShardWriter(temporary, plan, on_bytes=progress) as writer:
                reports = stream(plan, engine, writer)

            result = MergeResult(Path(out), engine.name, reports)
            result.bytes_read = plan.input_bytes
            result.bytes_written = plan.output_bytes
            _write_companions(plan, temporary, str(a), str(b), result)
            write_manifest(temporary, writer)
            base.check_unchanged()  # the output holds what was read only if inputs held still
            other.check_unchanged()
            transaction.commit()

    result.seconds = time.perf_counter() - started
    logger.info("merged into %s in %.2f s", out, result.seconds)
    return result


def stream(plan: MergePlan, engine: Engine, sink: Sink) -> list[TensorReport]:
    """Merge every planned tensor into the sink, in plan order, releasing input pages."""

    def jobs() -> Iterator[Job]:
        for index, planned in enumerate(plan.tensors):
            # Start reading the tensor after this one while this one is computed.
            for following in plan.tensors[index + 1 : index + 2]:
                plan.a.prefetch(following.source_a)
                plan.b.prefetch(following.source_b)
            yield Job(planned, plan.a.view(planned.source_a), plan.b.view(planned.source_b))

    reports = []
    try:
        for merged in engine.run(jobs(), sink):
            planned = merged.job.planned
            plan.a.release(planned.source_a)
            plan.b.release(planned.source_b)
            reports.append(_report(planned, merged.stats, merged.blend))
    except NonFiniteInput as exc:
        planned = exc.planned
        model, name = (plan.a, planned.source_a) if exc.side == "a" else (plan.b, planned.source_b)
        raise MergeError(
            f"tensor {name!r} of {model.source} holds NaN or infinite values; the merge "
            "stopped and no output was written. The checkpoint is damaged: download it "
            "again or repair that tensor"
        ) from None
    return reports


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
    t_parameter = plan.t if not callable(plan.t) else getattr(plan.t, "parameter", None)
    card = model_card(name_a, name_b, t_parameter, dtype_name, result)
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
