"""The merged model's README.md: front matter for the hub, the method, and the recipe.

The recipe is written in mergekit's YAML so that anyone can redo the merge with either tool.
It asks mergekit for float32 math (`dtype`) and the output dtype (`out_dtype`), which is what
fastmerge computes; a float16 `dtype` would round bfloat16 inputs before merging. A t
schedule is recorded in mergekit's form, next to a table of the t and the angles per layer.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

from .result import MergeResult, TensorReport
from .schedule import Schedule, layer_of


def _yaml_scalar(value: object) -> str:
    # JSON scalars are valid YAML, and quoting every string keeps paths with colons safe.
    return json.dumps(value)


def mergekit_recipe(
    base: str,
    other: str,
    t_parameter: object,
    out_dtype: str,
    slices: tuple[tuple[int, int], ...] | None = None,
) -> str:
    """A mergekit SLERP recipe for this merge (with `slices` when the gradient runs per slice)."""
    if isinstance(t_parameter, list):
        t_lines = ["  t:"]
        for entry in t_parameter:
            if isinstance(entry, dict):
                items = list(entry.items())
                key, value = items[0]
                t_lines.append(f"    - {key}: {_yaml_scalar(value)}")
                t_lines += [f"      {k}: {_yaml_scalar(v)}" for k, v in items[1:]]
            else:
                t_lines.append(f"    - {_yaml_scalar(entry)}")
    else:
        t_lines = [f"  t: {_yaml_scalar(t_parameter)}"]

    if slices and len(slices) > 1:
        inputs = ["slices:"]
        for start, end in slices:
            inputs.append("  - sources:")
            for model in (base, other):
                inputs += [
                    f"      - model: {_yaml_scalar(model)}",
                    f"        layer_range: [{start}, {end}]",
                ]
    else:
        inputs = ["models:", *(f"  - model: {_yaml_scalar(model)}" for model in (base, other))]

    return "\n".join(
        [
            "merge_method: slerp",
            f"base_model: {_yaml_scalar(base)}",
            *inputs,
            "parameters:",
            *t_lines,
            "dtype: float32",
            f"out_dtype: {out_dtype}",
        ]
    )


def layer_table(reports: list[TensorReport]) -> str:
    """A Markdown table: per layer, the t its tensors got and the angles between the inputs."""
    groups: dict[int | None, list[TensorReport]] = {}
    for report in reports:
        groups.setdefault(layer_of(report.name), []).append(report)

    rows = [
        "| layer | t | tensors | mean angle | median angle |",
        "|---|---|---|---|---|",
    ]
    for layer in sorted(groups, key=lambda index: -1 if index is None else index):
        members = groups[layer]
        low, high = min(r.t for r in members), max(r.t for r in members)
        t_text = f"{low:.4f}" if low == high else f"{low:.4f} to {high:.4f}"
        angles = [r.angle_degrees for r in members if r.angle is not None]
        mean, median = (
            (f"{statistics.fmean(angles):.2f}°", f"{statistics.median(angles):.2f}°")
            if angles
            else ("", "")
        )
        label = "outside the layers" if layer is None else str(layer)
        rows.append(f"| {label} | {t_text} | {len(members)} | {mean} | {median} |")
    return "\n".join(rows)


def model_card(
    base: str,
    other: str,
    t: float | Schedule | Callable[[str], float],
    out_dtype: str,
    result: MergeResult,
) -> str:
    """The README.md text of a merged model; `t` is the plan's (a number or a schedule)."""
    t_parameter = getattr(t, "parameter", None) if callable(t) else t
    slices = t.slices if isinstance(t, Schedule) else None
    if t_parameter is None:
        recipe_section = (
            "Each tensor's t came from a Python function, which no recipe can name; the "
            "table below lists the t each layer got."
        )
    else:
        recipe = mergekit_recipe(base, other, t_parameter, out_dtype, slices)
        recipe_section = (
            "The same merge with fastmerge (`fastmerge run recipe.yml -o OUT`) or with\n"
            f"mergekit (`mergekit-yaml recipe.yml OUT`):\n\n```yaml\n{recipe}\n```"
        )
    summary = result.angle_summary()
    angles = (
        "no tensor pair was interpolated"
        if summary is None
        else f"smallest {summary[0]:.2f}°, median {summary[1]:.2f}°, largest {summary[2]:.2f}°"
    )
    t_text = (
        "per tensor, from a Python function"
        if t_parameter is None
        else json.dumps(t_parameter)
        + ("" if isinstance(t_parameter, float) else " (a schedule: see the table per layer)")
    )

    return f"""---
base_model:
  - {_yaml_scalar(base)}
  - {_yaml_scalar(other)}
library_name: transformers
tags:
  - merge
  - slerp
  - fastmerge
---

# Merged model

A SLERP (spherical linear interpolation) merge of {base} (the base) and {other},
made with fastmerge.

## Merge details

- **Method**: SLERP, each tensor treated as one vector; pairs whose cosine exceeds 0.9995 in
  absolute value are interpolated linearly, as mergekit does
- **t**: {t_text} (0 gives {base}, 1 gives {other})
- **Output dtype**: {out_dtype}
- **Tensors**: {len(result.tensors)}: {result.count("slerp")} took the SLERP branch, \
{result.count("lerp")} the linear branch, {result.count("copy")} were copied
- **Angles between the parents' tensors**: {angles}

## Recipe

{recipe_section}

## t and angles per layer

Angles are between the parents' tensors, in degrees; "outside the layers" holds the
embeddings, the final norm and the head.

{layer_table(result.tensors)}
"""
