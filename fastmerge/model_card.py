"""The merged model's README.md: front matter for the hub, the method, and the recipe.

The recipe is written in mergekit's YAML so that anyone can redo the merge with either tool.
It asks mergekit for float32 math (`dtype`) and the output dtype (`out_dtype`), which is what
fastmerge computes; a float16 `dtype` would round bfloat16 inputs before merging.
"""

from __future__ import annotations

import json

from .result import MergeResult


def _yaml_scalar(value: object) -> str:
    # JSON scalars are valid YAML, and quoting every string keeps paths with colons safe.
    return json.dumps(value)


def mergekit_recipe(base: str, other: str, t_parameter: object, out_dtype: str) -> str:
    """A mergekit SLERP recipe for this merge."""
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

    return "\n".join(
        [
            "merge_method: slerp",
            f"base_model: {_yaml_scalar(base)}",
            "models:",
            f"  - model: {_yaml_scalar(base)}",
            f"  - model: {_yaml_scalar(other)}",
            "parameters:",
            *t_lines,
            "dtype: float32",
            f"out_dtype: {out_dtype}",
        ]
    )


def model_card(
    base: str, other: str, t_parameter: object, out_dtype: str, result: MergeResult
) -> str:
    """The README.md text of a merged model."""
    recipe = mergekit_recipe(base, other, t_parameter, out_dtype)
    summary = result.angle_summary()
    angles = (
        "no tensor pair was interpolated"
        if summary is None
        else f"smallest {summary[0]:.2f}°, median {summary[1]:.2f}°, largest {summary[2]:.2f}°"
    )
    t_text = json.dumps(t_parameter)

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

The same merge with mergekit (`mergekit-yaml recipe.yml OUT`):

```yaml
{recipe}
```
"""
