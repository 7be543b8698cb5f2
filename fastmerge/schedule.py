"""t schedules: a t for every tensor, from mergekit's parameter syntax or the command line's.

mergekit (0.1.x) evaluates a SLERP `t` per tensor like this, and fastmerge does the same:

- a number is the t of every tensor;
- a list of numbers is a gradient over the layers: layer i of a slice of n layers sits at
  position p = i/(n-1) (p = 1 when n = 1), and its t is the piecewise-linear interpolation of
  the list at p, the list's values being evenly spaced knots on [0, 1];
- tensors outside the layers (embeddings, final norm, lm_head) sit at position 0;
- a list of `{filter, value}` entries gives each tensor the value of the first entry whose
  filter is a substring of the tensor's name; an entry without a filter (or with filter "*")
  matches every tensor, and a value may itself be a gradient.

On the command line the same schedules read `--t 0.6`, `--t 0,0.5,1` (a gradient) and, for
filters, repeated `--t self_attn=0,0.5,1 --t mlp=1,0.5,0 --t 0.5` (first match wins).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import FastmergeError, PlanError

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
"""`model.layers.12.mlp...` (Llama, Mistral, Qwen), `transformer.h.3...` (GPT-2), ..."""

Value = float | tuple[float, ...]
"""A number, or the knots of a gradient."""


class ScheduleError(FastmergeError):
    """A t schedule that cannot be read (bad syntax, wrong types)."""


class UnmatchedTensor(LookupError):
    """No entry of a schedule matches this tensor (mergekit fails on it too); the plan
    reports every such tensor in one problem."""


@dataclass(frozen=True)
class Entry:
    """One `{filter, value}` entry; a filter of None matches every tensor."""

    filter: str | None
    value: Value

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in name


def layer_of(name: str) -> int | None:
    """The layer index in a tensor's name, or None for tensors outside the layers."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def gradient_value(knots: Sequence[float], position: float) -> float:
    """mergekit's piecewise-linear interpolation of evenly spaced knots at position in [0, 1].

    Written as mergekit writes it, so that every t is the same float mergekit computes.
    """
    scaled = position * (len(knots) - 1)
    low = int(scaled)
    high = min(len(knots) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * knots[low] + fraction * knots[high]


@dataclass(frozen=True)
class Schedule:
    """A t for each tensor name: call it with the name.

    `entries` are tried in order; `slices` are the (start, end) layer ranges over which each
    gradient runs (None: one range over all the layers). A schedule with a gradient needs the
    model's layer count: `bind(num_layers)` gives the schedule ready to call, and
    `build_plan` binds it for the base model.
    """

    entries: tuple[Entry, ...]
    parameter: object
    """The schedule in mergekit's form (a number, a list, or a list of mappings)."""
    slices: tuple[tuple[int, int], ...] | None = None
    num_layers: int | None = None

    # Reading schedules.

    @classmethod
    def parse(cls, value: object, *, where: str = "t") -> Schedule:
        """A schedule from mergekit's YAML value of `t` (already loaded)."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
            entries = tuple(_entry(e, f"{where}[{i}]") for i, e in enumerate(value))
            parameter = [
                {**({"filter": e.filter} if e.filter is not None else {}), "value": _plain(e.value)}
                for e in entries
            ]
            return cls(entries, parameter)
        if isinstance(value, dict):
            raise ScheduleError(
                f"{where}: a single {{filter, value}} mapping is not a schedule; write a list "
                "of them (t: [{filter: self_attn, value: 0.3}, {value: 0.5}]), as mergekit needs"
            )
        number = _value(value, where)
        return cls((Entry(None, number),), _plain(number))

    @classmethod
    def from_cli(cls, values: Sequence[str]) -> Schedule:
        """A schedule from the command line's --t values (each `[FILTER=]v[,v...]`)."""
        if not values:
            raise ScheduleError("--t needs a value: --t 0.6, --t 0,0.5,1 or --t mlp=0,0.5,1")
        entries = []
        for text in values:
            filter_, _, numbers = text.rpartition("=")
            knots = []
            for item in numbers.split(","):
                try:
                    knots.append(float(item))
                except ValueError:
                    raise ScheduleError(
                        f"--t {text!r}: {item.strip()!r} is not a number; write --t 0.6, a "
                        "gradient --t 0,0.5,1, or a filtered value --t self_attn=0,0.5,1"
                    ) from None
            value = knots[0] if len(knots) == 1 else tuple(knots)
            entries.append(Entry(filter_.strip() or None, value))

        if len(entries) == 1 and entries[0].filter is None:
            return cls.parse(_plain(entries[0].value))
        return cls.parse(
            [
                {**({"filter": e.filter} if e.filter else {}), "value": _plain(e.value)}
                for e in entries
            ]
        )

    # Evaluating schedules.

    def bind(self, num_layers: int) -> Schedule:
        """This schedule for a model of `num_layers` layers; raises PlanError if the slices
        do not cover exactly those layers."""
        slices = self.slices or ((0, num_layers),)
        covered = [layer for start, end in slices for layer in range(start, end)]
        if covered != list(range(num_layers)):
            ranges = ", ".join(f"[{start}, {end}]" for start, end in slices)
            raise PlanError(
                [
                    f"the recipe's layer_range(s) {ranges} do not cover the model's "
                    f"{num_layers} layers exactly once, in order; fastmerge merges whole "
                    f"models: write layer_range: [0, {num_layers}] (or use `models:`)"
                ]
            )
        return replace(self, num_layers=num_layers)

    def position(self, name: str) -> float:
        """The tensor's position on the gradient, in [0, 1], as mergekit places it."""
        layer = layer_of(name)
        if layer is None:
            return 0.0
        assert self.num_layers is not None, "bind the schedule to a layer count first"
        for start, end in self.slices or ((0, self.num_layers),):
            if start <= layer < end:
                count = end - start
                return (layer - start) / (count - 1) if count > 1 else 1.0
        raise PlanError(
            [
                f"tensor {name!r} is in layer {layer}, but the model has {self.num_layers} "
                "layers (config.json num_hidden_layers); the checkpoint and its config disagree"
            ]
        )

    def __call__(self, name: str) -> float:
        for entry in self.entries:
            if entry.matches(name):
                if isinstance(entry.value, float):
                    return entry.value
                return gradient_value(entry.value, self.position(name))

        raise UnmatchedTensor(name)


def bind_t(t: object, a) -> object:
    """`t` made ready for planning against base checkpoint `a`.

    Numbers stay numbers and callables stay as they are; a Schedule, a list (a gradient or
    filter entries) or command-line text becomes a Schedule bound to `a`'s layer count.
    """
    if isinstance(t, bool):
        raise ScheduleError(f"t must be a number or a schedule, got {t!r}")
    if isinstance(t, int | float):
        return float(t)
    if isinstance(t, str):
        t = Schedule.from_cli([t])
    elif isinstance(t, list | tuple):
        t = Schedule.parse(list(t))
    if isinstance(t, Schedule):
        return t.bind(count_layers(a.config, a.tensors))
    if callable(t):
        return t
    raise ScheduleError(f"t must be a number, a list, a Schedule or a callable, got {t!r}")


def count_layers(config: dict | None, names) -> int:
    """config.json's num_hidden_layers (also in a nested text_config), else the largest
    layer index in the tensor names plus one."""
    for section in (config or {}, (config or {}).get("text_config") or {}):
        layers = section.get("num_hidden_layers") if isinstance(section, dict) else None
        if isinstance(layers, int) and layers > 0:
            return layers
    indices = [index for index in map(layer_of, names) if index is not None]
    return max(indices) + 1 if indices else 0


def _entry(mapping: dict, where: str) -> Entry:
    unknown = set(mapping) - {"filter", "value"}
    if unknown:
        raise ScheduleError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; an entry has a "
            "`value` and an optional `filter` (a substring of tensor names)"
        )
    if "value" not in mapping:
        raise ScheduleError(f"{where}: the entry has no `value`")
    filter_ = mapping.get("filter")
    if filter_ is not None and not isinstance(filter_, str):
        raise ScheduleError(
            f"{where}.filter: expected a string (a substring of tensor names), found {filter_!r}"
        )
    return Entry(filter_, _value(mapping["value"], f"{where}.value"))


def _value(value: object, where: str) -> Value:
    if isinstance(value, list):
        if not value:
            raise ScheduleError(f"{where}: a gradient needs at least one value, found []")
        return tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(value))
    return _number(value, where)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScheduleError(
            f"{where}: expected a number, found {value!r}; t is a number, a list of numbers "
            "(a gradient over the layers) or a list of {filter, value} entries"
        )
    if not math.isfinite(value):
        raise ScheduleError(f"{where}: t = {value} is not a finite number")
    return float(value)


def _plain(value: Value) -> float | list[float]:
    return list(value) if isinstance(value, tuple) else value
