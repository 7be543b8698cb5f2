"""mergekit SLERP recipes (YAML), read and checked key by key, and run as a fastmerge merge.

Supported, with mergekit's meaning:

    merge_method: slerp
    base_model: MODEL                  # one of the two models; it is A (t = 0 gives it)
    models: [{model: MODEL}, {model: MODEL}]
      or slices: [{sources: [{model: MODEL, layer_range: [s, e]}, {...same range}]}, ...]
    parameters: {t: 0.6 | [gradient] | [{filter: ..., value: ...}, ...]}
    dtype: float16 | bfloat16 | float32
    out_dtype: float16 | bfloat16 | float32
    tokenizer_source: base

MODEL is a local directory or a Hub id. Slices must cover the model's layers in order, each
merging layer i of one model with layer i of the other (a gradient runs over each slice, as
in mergekit). fastmerge always does the math in float32 from the inputs as they are stored;
`dtype` only names the output dtype when `out_dtype` is absent. mergekit would first round
the inputs to `dtype`: for bfloat16 inputs and `dtype: float16` that changes only elements
below 2^-17 (7.6e-6) in magnitude, which moves outputs by about one float16 ulp at most, and
it turns elements beyond float16's range into infinities, where fastmerge stops with an
overflow error if the merged value overflows. Without either key the output keeps the
inputs' dtype, as mergekit's does. Everything else (other methods,
per-model or per-slice parameters, `tokenizer` blocks, LoRA references) is refused with a
message naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from . import hub
from .errors import FastmergeError
from .plan import OUTPUT_DTYPES
from .reader import open_checkpoint
from .result import MergeResult
from .safetensors_format import MERGEABLE_DTYPES
from .schedule import Schedule, ScheduleError

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
)

_UNSUPPORTED = {
    "modules": "multi-module recipes are not supported; merge one model with `models` or `slices`",
    "tokenizer": "`tokenizer` blocks are not supported; fastmerge copies the base model's "
    "tokenizer (tokenizer_source: base)",
    "chat_template": "`chat_template` is not supported; fastmerge copies the base model's",
}


class RecipeError(FastmergeError):
    """A recipe fastmerge cannot run. Carries every problem found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = [f"{source}: cannot run this recipe:", *(f"  - {p}" for p in problems)]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Recipe:
    """A checked SLERP recipe: the two models, the t schedule and the dtypes."""

    base: str
    other: str
    t: Schedule
    dtype: str | None = None
    out_dtype: str | None = None

    @property
    def output_dtype(self) -> str | None:
        """The dtype written: out_dtype, else dtype, else None (the inputs' own)."""
        return self.out_dtype or self.dtype

    def merge(self, out: str | os.PathLike[str], **options) -> MergeResult:
        """Run the recipe into the directory `out`; `options` are fastmerge.merge's."""
        from .merge import merge

        dtype = self.output_dtype or _stored_dtype(self.base)
        return merge(self.base, self.other, out, self.t, dtype=dtype, **options)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a mergekit YAML recipe; raises RecipeError listing every problem."""
    import yaml

    source = Path(path)
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FastmergeError(f"{source}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(str(source), [f"not valid YAML: {exc}"]) from None
    return parse_recipe(document, str(source))


def parse_recipe(document: object, source: str = "recipe") -> Recipe:
    """Check a loaded recipe (a mapping), key by key."""
    if not isinstance(document, dict):
        raise RecipeError(
            source, [f"expected a mapping of recipe keys, found {type(document).__name__}"]
        )
    problems: list[str] = []

    for key in document:
        if key in _UNSUPPORTED:
            problems.append(f"{key}: {_UNSUPPORTED[key]}")
        elif key not in TOP_LEVEL_KEYS:
            problems.append(
                f"{key}: not a key fastmerge knows; a SLERP recipe has {', '.join(TOP_LEVEL_KEYS)}"
            )

    method = document.get("merge_method")
    if method != "slerp":
        problems.append(
            f"merge_method: {method!r} is not supported; fastmerge does SLERP only "
            "(merge_method: slerp)"
        )

    base = _model_name(document.get("base_model"), "base_model", problems)
    if "base_model" not in document:
        problems.append("base_model: missing; SLERP needs one of the two models as its base")

    has_models, has_slices = "models" in document, "slices" in document
    if has_models == has_slices:
        problems.append("give the two models under exactly one of `models` or `slices`")
        names, slices = [], None
    elif has_models:
        names, slices = _models(document["models"], problems), None
    else:
        names, slices = _slices(document["slices"], problems)

    other = None
    if base is not None and names:
        distinct = list(dict.fromkeys(names))
        if base not in distinct:
            problems.append(
                f"base_model: {base!r} is not one of the models "
                f"({', '.join(map(repr, distinct))}); SLERP merges two models, one of them the base"
            )
        elif len(distinct) != 2:
            problems.append(
                f"SLERP merges exactly two models; the recipe names {len(distinct)}: "
                f"{', '.join(map(repr, distinct))}"
            )
        else:
            other = next(name for name in distinct if name != base)

    t = _parameters(document.get("parameters"), problems)
    dtype = _dtype(document, "dtype", problems)
    out_dtype = _dtype(document, "out_dtype", problems)

    tokenizer_source = document.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        problems.append(
            f"tokenizer_source: {tokenizer_source!r} is not supported; fastmerge copies the base "
            "model's tokenizer (tokenizer_source: base, or leave it out)"
        )

    if problems:
        raise RecipeError(source, problems)
    assert base is not None and other is not None and t is not None
    if slices is not None:
        t = replace(t, slices=tuple(slices))
    return Recipe(base, other, t, dtype, out_dtype)


def _model_name(value: object, where: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.append(
            f"{where}: expected a model directory or Hub id as a string, found {value!r}"
        )
        return None
    if "+" in value:
        problems.append(
            f"{where}: {value!r} names a LoRA (model+adapter); merge the adapter into its model "
            "first (peft: merge_and_unload) and name the result"
        )
        return None
    return value


def _models(value: object, problems: list[str]) -> list[str]:
    if not isinstance(value, list):
        problems.append("models: expected a list of {model: ...} entries")
        return []
    names = []
    for index, entry in enumerate(value):
        where = f"models[{index}]"
        if not isinstance(entry, dict) or "model" not in entry:
            problems.append(f"{where}: expected a mapping with a `model` key, found {entry!r}")
            continue
        _no_parameters(entry, where, {"model"}, problems)
        name = _model_name(entry["model"], f"{where}.model", problems)
        if name is not None:
            names.append(name)
    return names


def _slices(value: object, problems: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    if not isinstance(value, list) or not value:
        problems.append("slices: expected a list of {sources: [...]} entries")
        return [], []
    names, ranges = [], []
    for index, entry in enumerate(value):
        where = f"slices[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list):
            problems.append(f"{where}: expected a mapping with a `sources` list, found {entry!r}")
            continue
        _no_parameters(entry, where, {"sources"}, problems)
        sources = entry["sources"]
        if len(sources) != 2:
            problems.append(
                f"{where}.sources: SLERP merges two models, found {len(sources)} source(s)"
            )
            continue

        slice_ranges = []
        for position, source in enumerate(sources):
            source_where = f"{where}.sources[{position}]"
            if not isinstance(source, dict) or "model" not in source:
                problems.append(
                    f"{source_where}: expected a mapping with `model` and `layer_range`"
                )
                continue
            _no_parameters(source, source_where, {"model", "layer_range"}, problems)
            name = _model_name(source["model"], f"{source_where}.model", problems)
            if name is not None:
                names.append(name)
            layer_range = _layer_range(source.get("layer_range"), source_where, problems)
            if layer_range is not None:
                slice_ranges.append(layer_range)

        if len(slice_ranges) == 2:
            if slice_ranges[0] != slice_ranges[1]:
                problems.append(
                    f"{where}: the sources' layer ranges differ ({list(slice_ranges[0])} and "
                    f"{list(slice_ranges[1])}); fastmerge merges layer i of one model with "
                    "layer i of the other"
                )
            else:
                ranges.append(slice_ranges[0])
    return names, ranges


def _layer_range(value: object, where: str, problems: list[str]) -> tuple[int, int] | None:
    valid = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] < value[1]
    )
    if not valid:
        problems.append(
            f"{where}.layer_range: expected [start, end] with 0 <= start < end, found {value!r}"
        )
        return None
    return value[0], value[1]


def _no_parameters(entry: dict, where: str, allowed: set[str], problems: list[str]) -> None:
    for key in entry:
        if key == "parameters":
            problems.append(
                f"{where}.parameters: per-model and per-slice parameters are not supported; "
                "t is a recipe-level parameter (top-level `parameters: {t: ...}`)"
            )
        elif key not in allowed:
            problems.append(
                f"{where}.{key}: not supported here; an entry has {', '.join(sorted(allowed))}"
            )


def _parameters(value: object, problems: list[str]) -> Schedule | None:
    if not isinstance(value, dict) or "t" not in value:
        problems.append("parameters: missing `t`; SLERP needs `parameters: {t: ...}`")
        return None
    for key in value:
        if key != "t":
            problems.append(f"parameters.{key}: not a SLERP parameter; SLERP takes only t")
    try:
        return Schedule.parse(value["t"], where="parameters.t")
    except ScheduleError as exc:
        problems.append(str(exc))
        return None


def _dtype(document: dict, key: str, problems: list[str]) -> str | None:
    value = document.get(key)
    if value is None or value in OUTPUT_DTYPES:
        return value
    problems.append(f"{key}: {value!r} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}")
    return None


def _stored_dtype(model: str) -> str:
    """The one float dtype a model's tensors are stored in, for recipes that name none."""
    with open_checkpoint(hub.resolve(model)) as checkpoint:
        dtypes = {info.dtype for _, info in checkpoint.tensors.values()} & set(MERGEABLE_DTYPES)
    names = {name for name, dtype in OUTPUT_DTYPES.items() if dtype in dtypes}
    if len(dtypes) != 1 or not names:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "none"
        raise FastmergeError(
            f"{model}: the recipe names no dtype and the model's float tensors are stored as "
            f"{found}; add `out_dtype: float16` (or bfloat16, float32) to the recipe"
        )
    return names.pop()
