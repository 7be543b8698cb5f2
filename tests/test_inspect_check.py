"""`fastmerge inspect --check`: every non-finite tensor of both models, before any merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge import inspect as inspect_module
from fastmerge.cli import EXIT_BAD_INPUT, app
from fastmerge.inspect import find_non_finite

from .conftest import copy_model

UP = "model.layers.1.mlp.up_proj.weight"
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


def _run(runner, *args: object):
    # Wide enough that Rich does not shorten the paths in the table.
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "500"})


def _damage(model, edits: dict[str, list[tuple[tuple[int, ...], float]]]) -> None:
    tensors = load_file(model / "model.safetensors")
    for name, values in edits.items():
        for position, value in values:
            tensors[name][position] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def test_clean_models_pass(runner, tiny_pair):
    result = _run(runner, "inspect", "--check", *tiny_pair)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"40 floating-point tensors (0.2M values) in {tiny_pair[0]} and {tiny_pair[1]}: all "
        "values are finite\n"
    )


def test_every_non_finite_tensor_of_both_models_is_reported(runner, tiny_pair, tmp_path):
    a = copy_model(tiny_pair[0], tmp_path / "a")
    b = copy_model(tiny_pair[1], tmp_path / "b")
    inf = float("inf")
    _damage(a, {NORM: [((7,), inf)]})
    _damage(b, {UP: [((3, 5), float("nan")), ((100, 2), float("nan")), ((9, 9), -inf)]})
    _damage(b, {EMBED: [((319, 63), inf)]})

    result = _run(runner, "inspect", "--check", a, b)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    rows = [line.split() for line in result.stdout.splitlines()[1:-1]]
    assert rows == [
        [str(a), NORM, "64", "BF16", "0", "1", "0", "[7]"],
        [str(b), EMBED, "320x64", "BF16", "0", "1", "0", "[319,", "63]"],
        [str(b), UP, "176x64", "BF16", "2", "0", "1", "[3,", "5]"],
    ]
    assert result.stdout.splitlines()[-1].endswith("3 hold NaN or infinite values")

    # A merge stops at the first of them; the check found all three.
    merged = _run(runner, "slerp", a, b, "-o", tmp_path / "out")
    assert merged.exit_code == EXIT_BAD_INPUT
    assert merged.stderr.count("NaN or infinite") == 1


def test_chunk_boundaries_and_dtypes(tmp_path, monkeypatch):
    monkeypatch.setattr(inspect_module, "CHECK_CHUNK_ELEMENTS", 7)
    values = torch.arange(60, dtype=torch.float32).view(6, 10)
    values[2, 3] = float("nan")  # flat 23, the third chunk
    values[5, 9] = -float("inf")  # flat 59, the last element of a short last chunk
    eight = torch.zeros(5, dtype=torch.float8_e4m3fn)
    eight[4] = float("nan")
    tensors = {
        "f32": values,
        "f8": eight,
        "ints": torch.arange(4),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "fine": torch.ones(30, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "model.safetensors")

    table = find_non_finite([tmp_path / "model.safetensors"])
    assert [row[1:] for row in table.rows] == [
        ["f32", "6x10", "F32", "1", "0", "1", "[2, 3]"],
        ["f8", "5", "F8_E4M3", "1", "0", "0", "[4]"],
    ]
    assert table.footer.startswith("4 floating-point tensors")


@pytest.mark.parametrize("name", ["[/]", "[bold]x", "a[red]"])
def test_names_that_look_like_markup_are_shown_as_they_are(runner, tmp_path, name):
    # Found while writing --check: Rich read a tensor name such as "[/]" as markup, and the
    # CLI died with a MarkupError traceback instead of printing the name.
    save_file({name: torch.tensor([float("nan")])}, tmp_path / "model.safetensors")
    result = _run(runner, "inspect", "--check", tmp_path)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f" {name} " in result.stdout

    result = _run(runner, "inspect", tmp_path)
    assert result.exit_code == 0 and f"{name} " in result.stdout
