"""mergekit recipes: the seed card's recipe with its Hub names, schedules, and refusals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastmerge.cli import EXIT_BAD_INPUT, app
from fastmerge.recipe import RecipeError, load_recipe, parse_recipe
from fastmerge.reference import describe_mismatch, max_ulp_distance, slerp_reference

from .conftest import write_hub_cache
from .test_schedule import mergekit_t

SEED_RECIPE = """\
slices:
  - sources:
      - model: HuggingFaceTB/SmolLM-135M
        layer_range: [0, 30]
      - model: HuggingFaceTB/SmolLM-135M-Instruct
        layer_range: [0, 30]
merge_method: slerp
base_model: HuggingFaceTB/SmolLM-135M
parameters:
  t:
    - value: 0.6
dtype: float16
"""

# The catch-all is 0.4, not 0.5: at t = 0.5 both coefficients are equal, an element with
# a = -b merges to exactly 0, and the CPU engine's fused multiply-add leaves the rounding error
# of one product there instead (harmless, but many bfloat16 ulps from zero).
GRADIENT_WITH_FILTERS = """\
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {other}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.4
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
"""


def assert_merge_follows_schedule(out: Path, a: Path, b: Path, setting, dtype, slices=((0, 30),)):
    """Every output tensor within 1 ulp of the float64 reference at mergekit's t for it."""
    merged = load_file(out / "model.safetensors")
    inputs_a, inputs_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(merged) == set(inputs_a)
    for name, tensor in merged.items():
        t = mergekit_t(setting, name, slices)
        want = slerp_reference(inputs_a[name], inputs_b[name], t, out_dtype=dtype)
        assert tensor.dtype == dtype, name
        assert max_ulp_distance(tensor, want) <= 1, describe_mismatch(name, tensor, want, 1)


def _run(runner, *args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_the_seed_recipe_runs_as_written_with_its_hub_names(
    runner, tiny_30_layer_pair, tmp_path, monkeypatch
):
    base, instruct = tiny_30_layer_pair
    cache = tmp_path / "hf-home" / "hub"
    write_hub_cache(cache, "HuggingFaceTB/SmolLM-135M", base)
    write_hub_cache(cache, "HuggingFaceTB/SmolLM-135M-Instruct", instruct)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "seed.yml").write_text(SEED_RECIPE)

    result = _run(runner, "run", tmp_path / "seed.yml", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "merged 272 tensors" in result.stdout

    # dtype: float16 is the output dtype; the math runs in float32 from the bf16 inputs.
    assert_merge_follows_schedule(tmp_path / "merged", base, instruct, 0.6, torch.float16)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["num_hidden_layers"] == 30

    card = (tmp_path / "merged" / "README.md").read_text()
    assert '  - "HuggingFaceTB/SmolLM-135M-Instruct"' in card
    assert "fastmerge run recipe.yml -o OUT" in card
    recipe_in_card = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe_in_card["parameters"] == {"t": [{"value": 0.6}]}
    assert recipe_in_card["out_dtype"] == "float16"
    assert parse_recipe(recipe_in_card).t.parameter == [{"value": 0.6}]


def test_a_gradient_with_filters_recipe_runs(runner, tiny_30_layer_pair, tmp_path):
    base, instruct = tiny_30_layer_pair
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(GRADIENT_WITH_FILTERS.format(base=base, other=instruct))

    result = _run(runner, "run", recipe, "-o", tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    setting = yaml.safe_load(recipe.read_text())["parameters"]["t"]
    assert_merge_follows_schedule(tmp_path / "merged", base, instruct, setting, torch.bfloat16)

    card = (tmp_path / "merged" / "README.md").read_text()
    recipe_in_card = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe_in_card["parameters"]["t"] == setting
    table = card.split("## t and angles per layer")[1]
    assert "| outside the layers | 0.4000 | 2 |" in table
    # Layer 29 sits at position 1: self_attn gets 1.0, mlp 0.0, the norms 0.4.
    assert "| 29 | 0.0000 to 1.0000 | 9 |" in table


def test_slices_give_each_its_own_gradient(runner, tiny_30_layer_pair, tmp_path):
    base, instruct = tiny_30_layer_pair
    slices = [(0, 12), (12, 30)]
    document = {
        "merge_method": "slerp",
        "base_model": str(base),
        "slices": [
            {"sources": [{"model": str(m), "layer_range": list(r)} for m in (base, instruct)]}
            for r in slices
        ],
        "parameters": {"t": [0.1, 0.9]},
        "dtype": "bfloat16",
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(document))
    result = _run(runner, "run", tmp_path / "r.yml", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert_merge_follows_schedule(
        tmp_path / "out", base, instruct, [0.1, 0.9], torch.bfloat16, slices
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "layer_range: [12, 30]" in card


def test_without_a_dtype_the_output_keeps_the_inputs_dtype(tiny_30_layer_pair, tmp_path):
    base, instruct = tiny_30_layer_pair
    recipe = parse_recipe(
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(instruct)}],
            "parameters": {"t": 0.25},
        }
    )
    recipe.merge(tmp_path / "out")
    assert_merge_follows_schedule(tmp_path / "out", base, instruct, 0.25, torch.bfloat16)


def test_layer_ranges_that_do_not_cover_the_model_are_refused(runner, tiny_30_layer_pair, tmp_path):
    base, instruct = tiny_30_layer_pair
    text = SEED_RECIPE.replace("HuggingFaceTB/SmolLM-135M-Instruct", str(instruct))
    text = text.replace("HuggingFaceTB/SmolLM-135M", str(base)).replace("[0, 30]", "[0, 20]")
    (tmp_path / "r.yml").write_text(text)
    result = _run(runner, "run", tmp_path / "r.yml", "-o", tmp_path / "out")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "layer_range(s) [0, 20] do not cover the model's 30 layers" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def _recipe(**changes) -> dict:
    document = yaml.safe_load(SEED_RECIPE)
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    return document


TWO_MODELS = [{"model": "org/a"}, {"model": "org/b"}]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"merge_method": "ties"}, "merge_method: 'ties' is not supported; fastmerge does SLERP"),
        ({"tokenizer": {"source": "union"}}, "tokenizer: `tokenizer` blocks are not supported"),
        ({"tokenizer_source": "union"}, "tokenizer_source: 'union' is not supported"),
        ({"modules": {}}, "modules: multi-module recipes are not supported"),
        ({"chat_template": "chatml"}, "chat_template: `chat_template` is not supported"),
        ({"name": "x"}, "name: not a key fastmerge knows; a SLERP recipe has merge_method"),
        ({"dtype": "int8"}, "dtype: 'int8' is not supported; choose one of float16, bfloat16"),
        ({"out_dtype": "fp8"}, "out_dtype: 'fp8' is not supported"),
        ({"parameters": {"t": 0.5, "normalize": True}}, "parameters.normalize: not a SLERP"),
        ({"parameters": {"weight": 0.5}}, "parameters: missing `t`"),
        ({"parameters": {"t": {"value": 0.5}}}, "parameters.t: a single {filter, value}"),
        ({"base_model": None}, "base_model: missing; SLERP needs one of the two models"),
        ({"base_model": "org/c"}, "base_model: 'org/c' is not one of the models"),
        ({"base_model": "org/a+lora"}, "base_model: 'org/a+lora' names a LoRA"),
        ({"models": TWO_MODELS}, "give the two models under exactly one of `models` or `slices`"),
        (
            {"slices": None, "models": [*TWO_MODELS, {"model": "org/c"}], "base_model": "org/a"},
            "SLERP merges exactly two models; the recipe names 3",
        ),
        (
            {"slices": None, "models": [{"model": "org/a", "parameters": {"t": 0.2}}]},
            "models[0].parameters: per-model and per-slice parameters are not supported",
        ),
        (
            {"slices": [{"sources": [], "parameters": {"t": 0.2}}]},
            "slices[0].parameters: per-model and per-slice parameters are not supported",
        ),
        (
            {"slices": [{"sources": [{"model": "a", "layer_range": [0, 30]}]}]},
            "slices[0].sources: SLERP merges two models, found 1 source(s)",
        ),
        (
            {
                "slices": [
                    {
                        "sources": [
                            {"model": "org/a", "layer_range": [0, 30]},
                            {"model": "org/b", "layer_range": [2, 32]},
                        ]
                    }
                ],
                "base_model": "org/a",
            },
            "slices[0]: the sources' layer ranges differ ([0, 30] and [2, 32])",
        ),
        (
            {
                "slices": [
                    {
                        "sources": [
                            {"model": "org/a", "layer_range": [0, 30], "weight": 1},
                            {"model": "org/b", "layer_range": [30, 0]},
                        ]
                    }
                ],
                "base_model": "org/a",
            },
            "slices[0].sources[0].weight: not supported here",
        ),
    ],
)
def test_unsupported_recipes_are_refused_naming_the_key(changes, message):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(_recipe(**changes), "r.yml")
    text = str(caught.value)
    assert text.startswith("r.yml: cannot run this recipe:")
    assert message in text, text


def test_every_problem_of_a_recipe_is_reported_at_once():
    document = _recipe(merge_method="ties", dtype="int8", tokenizer_source="union")
    with pytest.raises(RecipeError) as caught:
        parse_recipe(document)
    assert len(caught.value.problems) == 3, caught.value.problems


def test_a_recipe_file_that_is_not_yaml_is_refused(runner, tmp_path):
    (tmp_path / "r.yml").write_text("slices: [unclosed\n")
    result = _run(runner, "run", tmp_path / "r.yml", "-o", tmp_path / "out")
    assert result.exit_code == EXIT_BAD_INPUT and "not valid YAML" in result.stderr
    with pytest.raises(RecipeError, match="expected a mapping of recipe keys, found list"):
        (tmp_path / "list.yml").write_text("- 1\n")
        load_recipe(tmp_path / "list.yml")


def test_the_seed_recipe_parses_to_its_models_schedule_and_dtypes(tmp_path):
    (tmp_path / "seed.yml").write_text(textwrap.dedent(SEED_RECIPE))
    recipe = load_recipe(tmp_path / "seed.yml")
    assert (recipe.base, recipe.other) == (
        "HuggingFaceTB/SmolLM-135M",
        "HuggingFaceTB/SmolLM-135M-Instruct",
    )
    assert recipe.t.slices == ((0, 30),)
    assert recipe.output_dtype == "float16" and recipe.out_dtype is None
