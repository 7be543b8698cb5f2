"""`fastmerge inspect`: what is in a checkpoint, and how far apart two checkpoints are.

Nothing is written. Comparing two models reads both once (the statistics pass of a merge)
and reports each pair's angle, the look a user wants before choosing t. `--check` reads every
floating-point tensor of one or both models and reports all that hold NaN or infinity, where
a merge stops at the first one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .engine import NonFiniteInput, select_engine
from .errors import MergeError
from .plan import Method, build_plan
from .reader import Checkpoint, open_checkpoint
from .slerp import slerp_blend


@dataclass
class Rows:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    footer: str = ""


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def describe(path: str | os.PathLike[str]) -> Rows:
    """One row per tensor: name, shape, dtype, size."""
    with open_checkpoint(path) as checkpoint:
        table = Rows(["tensor", "shape", "dtype", "MB"])
        for _, info in checkpoint.tensors.values():
            table.rows.append(
                [info.name, _shape(info.shape), info.dtype_name, f"{info.nbytes / 1e6:.2f}"]
            )
        parameters = sum(info.numel for _, info in checkpoint.tensors.values())
        table.footer = (
            f"{len(checkpoint.tensors)} tensors, {parameters / 1e6:,.1f}M parameters, "
            f"{checkpoint.nbytes / 1e6:,.1f} MB in {len(checkpoint.files)} file(s)"
        )
    return table


def compare(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> Rows:
    """One row per tensor pair: shape, dtype, norms, cosine, angle and the branch SLERP takes."""
    engine = select_engine("cpu")
    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b:
        plan = build_plan(a, b, 0.5)
        table = Rows(["tensor", "shape", "dtype", "‖a‖", "‖b‖", "cos", "angle °", "branch"])
        branches = {"slerp": 0, "lerp": 0, "copy": 0}

        for planned in plan.tensors:
            if planned.method is Method.COPY:
                table.rows.append(
                    [
                        planned.name,
                        _shape(planned.shape),
                        str(planned.in_dtype),
                        "",
                        "",
                        "",
                        "",
                        "copy",
                    ]
                )
                branches["copy"] += 1
                continue

            flat_a = a.view(planned.source_a).reshape(-1)
            flat_b = b.view(planned.source_b).reshape(-1)
            try:
                stats = engine.statistics(flat_a, flat_b)  # float64 sums: exact angles
            except NonFiniteInput as exc:
                model = a if exc.side == "a" else b
                raise MergeError(
                    f"tensor {planned.name!r} of {model.source} holds NaN or infinite values"
                ) from None
            a.release(planned.source_a)
            b.release(planned.source_b)

            branch = "slerp" if slerp_blend(stats, 0.5).spherical else "lerp"
            branches[branch] += 1
            table.rows.append(
                [
                    planned.name,
                    _shape(planned.shape),
                    a.info(planned.source_a).dtype_name,
                    f"{stats.norm_a:.4g}",
                    f"{stats.norm_b:.4g}",
                    f"{stats.cosine:.6f}",
                    f"{math.degrees(math.acos(stats.cosine)):.2f}",
                    branch,
                ]
            )

        table.footer = (
            f"{len(plan.tensors)} tensor pairs: {branches['slerp']} would take the SLERP branch, "
            f"{branches['lerp']} the linear branch (|cos| > 0.9995), {branches['copy']} copied"
        )
    return table


CHECK_CHUNK_ELEMENTS = 1 << 20
"""Elements scanned at a time: the temporaries stay small whatever the tensor's size."""


def find_non_finite(paths: list[str | os.PathLike[str]]) -> Rows:
    """One row per floating-point tensor holding NaN or infinity, in every model given.

    Models are read one after the other, tensor by tensor, in chunks; each tensor's pages are
    released once scanned. An empty table means every value is finite.
    """
    table = Rows(["model", "tensor", "shape", "dtype", "NaN", "+inf", "-inf", "first at"])
    scanned = elements = 0
    for path in paths:
        with open_checkpoint(path) as checkpoint:
            for name, (_, info) in checkpoint.tensors.items():
                if not info.dtype.is_floating_point:
                    continue
                counts = _count_non_finite(checkpoint, name)
                scanned += 1
                elements += info.numel
                if counts is not None:
                    nan, positive, negative, first = counts
                    position = ", ".join(str(i) for i in _unravel(first, info.shape))
                    table.rows.append(
                        [
                            str(checkpoint.source),
                            name,
                            _shape(info.shape),
                            info.dtype_name,
                            str(nan),
                            str(positive),
                            str(negative),
                            f"[{position}]",
                        ]
                    )

    models = " and ".join(str(p) for p in paths)
    bad = len(table.rows)
    table.footer = (
        f"{scanned} floating-point tensors ({elements / 1e6:,.1f}M values) in {models}: "
        + (f"{bad} hold NaN or infinite values" if bad else "all values are finite")
    )
    return table


def _count_non_finite(checkpoint: Checkpoint, name: str) -> tuple[int, int, int, int] | None:
    """(NaN, +inf, -inf, first flat position) of a tensor, or None when all are finite."""
    flat = checkpoint.view(name).reshape(-1)
    nan = positive = negative = 0
    first = None
    for lo in range(0, flat.numel(), CHECK_CHUNK_ELEMENTS):
        part = flat[lo : lo + CHECK_CHUNK_ELEMENTS]
        if part.dtype.itemsize == 1:  # float8: few kernels, so check in float32
            part = part.float()
        finite = torch.isfinite(part)
        if bool(finite.all()):
            continue
        nan += int(torch.isnan(part).sum())
        positive += int(torch.isposinf(part).sum())
        negative += int(torch.isneginf(part).sum())
        if first is None:
            first = lo + int(torch.argmin(finite.to(torch.uint8)))
    checkpoint.release(name)
    return None if first is None else (nan, positive, negative, first)


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    position = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        position.append(rest)
    return position[::-1]
