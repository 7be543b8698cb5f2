"""`fastmerge inspect`: what is in a checkpoint, and how far apart two checkpoints are.

Nothing is written. Comparing two models reads both once (the statistics pass of a merge)
and reports each pair's angle, the look a user wants before choosing t.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .engine import NonFiniteInput, select_engine
from .errors import MergeError
from .plan import Method, build_plan
from .reader import open_checkpoint
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
                stats = engine.statistics(flat_a, flat_b)
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
