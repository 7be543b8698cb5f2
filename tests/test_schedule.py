"""t schedules against mergekit's rules, written here independently of fastmerge.schedule.

mergekit 0.1.x: layer i of a slice of n layers sits at position i/(n-1) (1 when n = 1),
tensors outside the layers at position 0; a list of values is interpolated linearly between
evenly spaced knots on [0, 1]; the first entry whose filter is a substring of the tensor name
gives the value, and an entry without a filter (or with "*") matches every tensor.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fastmerge.errors import PlanError
from fastmerge.plan import build_plan
from fastmerge.reader import open_checkpoint
from fastmerge.schedule import Schedule, ScheduleError, count_layers

from .conftest import TINY_30_LAYERS

NAMES = [name for name, _ in TINY_30_LAYERS.tensor_shapes()]


def mergekit_position(name: str, slices: list[tuple[int, int]]) -> float:
    parts = name.split(".")
    if "layers" not in parts:
        return 0.0
    layer = int(parts[parts.index("layers") + 1])
    start, end = next((s, e) for s, e in slices if s <= layer < e)
    return (layer - start) / (end - start - 1) if end - start > 1 else 1.0


def mergekit_value(value, position: float) -> float:
    if isinstance(value, list):
        return float(np.interp(position, np.linspace(0.0, 1.0, len(value)), value))
    return float(value)


def mergekit_t(setting, name: str, slices=((0, 30),)) -> float:
    """What mergekit gives tensor `name` for the recipe value `setting` of t."""
    position = mergekit_position(name, list(slices))
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for entry in setting:
            if entry.get("filter") in (None, "*") or entry["filter"] in name:
                return mergekit_value(entry["value"], position)
        raise LookupError(name)
    return mergekit_value(setting, position)


def bound(setting, layers: int = 30, slices=None) -> Schedule:
    schedule = Schedule.parse(setting)
    if slices is not None:
        schedule = Schedule(schedule.entries, schedule.parameter, slices=slices)
    return schedule.bind(layers)


GRADIENT = [0.0, 0.5, 0.3, 0.7, 1.0]


def test_the_30_layer_gradient_matches_mergekit():
    schedule = bound(GRADIENT)
    for name in NAMES:
        assert schedule(name) == pytest.approx(mergekit_t(GRADIENT, name), abs=1e-12), name

    # By hand: layer 7 sits at 7/29, 0.9655 of the way from knot 0 (0.0) to knot 1 (0.5);
    # layer 15 at 15/29, 0.069 of the way from knot 2 (0.3) to knot 3 (0.7).
    assert schedule("model.layers.7.mlp.up_proj.weight") == pytest.approx(0.5 * 28 / 29)
    assert schedule("model.layers.15.self_attn.q_proj.weight") == pytest.approx(
        0.3 + 0.4 * (60 / 29 - 2)
    )
    assert schedule("model.layers.0.mlp.up_proj.weight") == 0.0
    assert schedule("model.layers.29.mlp.up_proj.weight") == 1.0
    for outside in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert schedule(outside) == 0.0, outside


def test_a_two_value_gradient_is_linear_in_the_layer():
    schedule = bound([0.2, 0.8])
    for layer in range(30):
        assert schedule(f"model.layers.{layer}.mlp.up_proj.weight") == pytest.approx(
            0.2 + 0.6 * layer / 29, abs=1e-12
        )


FILTERS = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "attn", "value": 0.9},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]


def test_filters_first_match_wins_and_an_entry_without_filter_matches_all():
    schedule = bound(FILTERS)
    for name in NAMES:
        assert schedule(name) == pytest.approx(mergekit_t(FILTERS, name), abs=1e-12), name

    # "self_attn" comes before "attn", so no tensor gets 0.9; swapped, every attention does.
    assert 0.9 not in {schedule(name) for name in NAMES}
    swapped = bound([FILTERS[1], FILTERS[0], *FILTERS[2:]])
    attention = [name for name in NAMES if "self_attn" in name]
    assert {swapped(name) for name in attention} == {0.9}
    assert schedule("model.layers.3.input_layernorm.weight") == 0.5
    assert schedule("model.embed_tokens.weight") == 0.5


def test_a_star_filter_matches_every_tensor():
    schedule = bound([{"filter": "mlp", "value": 0.1}, {"filter": "*", "value": 0.7}])
    assert schedule("model.layers.2.mlp.up_proj.weight") == 0.1
    assert schedule("model.norm.weight") == 0.7


def test_gradients_run_over_each_slice_and_a_one_layer_slice_sits_at_1():
    slices = ((0, 10), (10, 29), (29, 30))
    schedule = bound([0.0, 1.0], slices=slices)
    for name in NAMES:
        expected = mergekit_t([0.0, 1.0], name, slices)
        assert schedule(name) == pytest.approx(expected, abs=1e-12), name
    assert schedule("model.layers.9.mlp.up_proj.weight") == 1.0
    assert schedule("model.layers.10.mlp.up_proj.weight") == 0.0
    assert schedule("model.layers.29.mlp.up_proj.weight") == 1.0


@pytest.mark.parametrize("slices", [((0, 20),), ((0, 10), (11, 30)), ((10, 30), (0, 10))])
def test_slices_must_cover_the_layers_in_order(slices):
    with pytest.raises(PlanError, match="do not cover the model's 30 layers"):
        bound(0.5, slices=slices)


def test_a_tensor_no_filter_matches_is_a_plan_problem(tiny_30_layer_pair):
    a, b = tiny_30_layer_pair
    with (
        open_checkpoint(a) as base,
        open_checkpoint(b) as other,
        pytest.raises(PlanError) as caught,
    ):
        build_plan(base, other, [{"filter": "mlp", "value": 0.3}])
    problems = caught.value.problems
    assert len(problems) == 1, problems
    unmatched = sum(1 for name in NAMES if "mlp" not in name)
    assert problems[0].startswith(f"{unmatched} tensor(s) match no entry of the t schedule")
    assert "'model.embed_tokens.weight'" in problems[0] and "add a last entry" in problems[0]


def test_planned_tensors_carry_their_scheduled_t(tiny_30_layer_pair):
    a, b = tiny_30_layer_pair
    with open_checkpoint(a) as base, open_checkpoint(b) as other:
        plan = build_plan(base, other, FILTERS)
        assert {p.name: p.t for p in plan.tensors} == pytest.approx(
            {name: mergekit_t(FILTERS, name) for name in NAMES}, abs=1e-12
        )
        retimed = plan.with_t(GRADIENT)
        assert [p.t for p in retimed.tensors] == pytest.approx(
            [mergekit_t(GRADIENT, p.name) for p in plan.tensors], abs=1e-12
        )
        assert [p.shard for p in retimed.tensors] == [p.shard for p in plan.tensors]
        with pytest.raises(PlanError, match=r"t = 1.5 is outside \[0, 1\]"):
            plan.with_t([0.0, 1.5])


@pytest.mark.parametrize(
    ("values", "parameter"),
    [
        (["0.6"], 0.6),
        (["0,0.5,0.3,0.7,1"], [0.0, 0.5, 0.3, 0.7, 1.0]),
        (
            ["self_attn=0,0.5,0.3,0.7,1", "mlp=1,0.5,0.7,0.3,0", "0.5"],
            [
                {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                {"value": 0.5},
            ],
        ),
        (["mlp=0.2", "0.5"], [{"filter": "mlp", "value": 0.2}, {"value": 0.5}]),
    ],
)
def test_command_line_syntax_gives_mergekits_form(values, parameter):
    schedule = Schedule.from_cli(values)
    assert schedule.parameter == parameter
    assert Schedule.parse(parameter).entries == schedule.entries


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"value": 0.5}, "a single {filter, value} mapping is not a schedule"),
        ([], "t: a gradient needs at least one value, found []"),
        ("0.5", "t: expected a number, found '0.5'"),
        (True, "t: expected a number, found True"),
        ([0.1, "x"], "t[1]: expected a number, found 'x'"),
        ([{"filter": "mlp"}], "t[0]: the entry has no `value`"),
        ([{"value": 0.5, "weight": 1}], "t[0]: unknown key(s) weight"),
        ([{"filter": 3, "value": 0.5}], "t[0].filter: expected a string"),
        ([{"value": []}], "t[0].value: a gradient needs at least one value"),
        (float("nan"), "t: t = nan is not a finite number"),
    ],
)
def test_malformed_recipe_values_are_refused(value, message):
    with pytest.raises(ScheduleError, match=re.escape(message)):
        Schedule.parse(value)


def test_malformed_command_line_values_are_refused():
    with pytest.raises(ScheduleError, match=re.escape("'x' is not a number; write --t 0.6")):
        Schedule.from_cli(["mlp=0,x"])


def test_layer_count_comes_from_the_config_or_the_names():
    assert count_layers({"num_hidden_layers": 30}, ["model.layers.0.w"]) == 30
    assert count_layers({"text_config": {"num_hidden_layers": 12}}, []) == 12
    assert count_layers(None, ["model.layers.3.w", "model.layers.11.w", "model.norm.w"]) == 12
    assert count_layers({}, ["transformer.h.4.attn.c_attn.weight"]) == 5
