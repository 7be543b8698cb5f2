"""Planning from headers: pairing, every problem reported at once, tied heads, shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.errors import PlanError
from fastmerge.plan import Method, build_plan
from fastmerge.reader import open_checkpoint


def _model(directory: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    directory.mkdir(parents=True)
    save_file(tensors, directory / "model.safetensors")
    base_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps({**base_config, **config}))
    return directory


def _plan(a: Path, b: Path, t=0.5, **options):
    return build_plan(open_checkpoint(a), open_checkpoint(b), t, **options)


def _llama(vocab=8, hidden=4, tied=True, dtype=torch.bfloat16, extra=None):
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, hidden).to(dtype),
        "model.norm.weight": torch.ones(hidden).to(dtype),
    }
    if not tied:
        tensors["lm_head.weight"] = torch.randn(vocab, hidden).to(dtype)
    return {**tensors, **(extra or {})}


def test_all_problems_are_reported_at_once(tmp_path):
    a = _model(tmp_path / "a", _llama(extra={"only.in.a": torch.ones(2)}))
    b_tensors = _llama(vocab=9, extra={"only.in.b": torch.ones(2)})
    b_tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(6, 4, dtype=torch.float16)
    b = _model(tmp_path / "b", b_tensors, architectures=["MistralForCausalLM"])

    with pytest.raises(PlanError) as caught:
        _plan(a, b)
    problems = caught.value.problems
    text = str(caught.value)

    assert len(problems) == 5, text
    assert "config.json architectures differs" in text and "--allow-architecture-mismatch" in text
    assert "vocabularies differ (8 vs 9 tokens)" in text and "resize_token_embeddings" in text
    assert "dtype BF16 in" in text and "but F16 in" in text
    assert "1 tensor(s) missing from" in text and "'only.in.a'" in text
    assert "in " in text and "'only.in.b'" in text


def test_architecture_check_can_be_waived(tmp_path):
    a = _model(tmp_path / "a", _llama())
    b = _model(tmp_path / "b", _llama(), model_type="mistral")
    with pytest.raises(PlanError, match="model_type differs"):
        _plan(a, b)
    assert len(_plan(a, b, allow_architecture_mismatch=True).tensors) == 3


@pytest.mark.parametrize("t", [-0.1, 1.1, float("nan")])
def test_t_outside_the_unit_interval_needs_extrapolate(tmp_path, t):
    a = _model(tmp_path / "a", _llama())
    b = _model(tmp_path / "b", _llama())
    with pytest.raises(PlanError, match=r"outside \[0, 1\]|not a number"):
        _plan(a, b, t)
    if t == t:
        assert _plan(a, b, t, extrapolate=True).tensors[0].t == t


def test_one_tied_side_contributes_its_embedding_as_the_head(tmp_path):
    a = _model(tmp_path / "a", _llama(tied=True), tie_word_embeddings=True)
    b = _model(tmp_path / "b", _llama(tied=False), tie_word_embeddings=False)
    plan = _plan(a, b)

    head = next(p for p in plan.tensors if p.name == "lm_head.weight")
    assert (head.source_a, head.source_b) == ("model.embed_tokens.weight", "lm_head.weight")
    assert plan.config["tie_word_embeddings"] is False

    reverse = _plan(b, a)
    head = next(p for p in reverse.tensors if p.name == "lm_head.weight")
    assert (head.source_a, head.source_b) == ("lm_head.weight", "model.embed_tokens.weight")
    assert reverse.config["tie_word_embeddings"] is False


def test_both_tied_stays_tied_and_both_untied_stays_untied(tmp_path):
    tied = _plan(_model(tmp_path / "a", _llama()), _model(tmp_path / "b", _llama()))
    assert "lm_head.weight" not in {p.name for p in tied.tensors}
    assert tied.config["tie_word_embeddings"] is True

    untied = _plan(
        _model(tmp_path / "c", _llama(tied=False), tie_word_embeddings=False),
        _model(tmp_path / "d", _llama(tied=False), tie_word_embeddings=False),
    )
    assert "lm_head.weight" in {p.name for p in untied.tensors}
    assert untied.config["tie_word_embeddings"] is False


def test_a_missing_head_with_an_untied_config_is_an_incomplete_checkpoint(tmp_path):
    a = _model(tmp_path / "a", _llama(tied=True), tie_word_embeddings=False)
    b = _model(tmp_path / "b", _llama(tied=False), tie_word_embeddings=False)
    with pytest.raises(PlanError, match=r"has no lm_head\.weight .* incomplete"):
        _plan(a, b)


def test_non_float_tensors_are_copied_when_identical_and_refused_when_not(tmp_path):
    ids = torch.arange(5, dtype=torch.int64)
    a = _model(tmp_path / "a", _llama(extra={"position_ids": ids}))
    b = _model(tmp_path / "b", _llama(extra={"position_ids": ids.clone()}))
    plan = _plan(a, b)
    copied = next(p for p in plan.tensors if p.name == "position_ids")
    assert copied.method is Method.COPY and copied.out_dtype == torch.int64

    c = _model(tmp_path / "c", _llama(extra={"position_ids": ids + 1}))
    with pytest.raises(PlanError, match="I64 tensors cannot be interpolated and differ"):
        _plan(a, c)


def test_lerp_vectors_marks_only_one_dimensional_tensors(tmp_path):
    plan = _plan(
        _model(tmp_path / "a", _llama()), _model(tmp_path / "b", _llama()), lerp_vectors=True
    )
    methods = {p.name: p.method for p in plan.tensors}
    assert methods["model.norm.weight"] is Method.LERP
    assert methods["model.embed_tokens.weight"] is Method.SLERP


def test_shards_are_cut_in_order_with_oversized_tensors_alone(tmp_path):
    tensors = {f"t{i}": torch.zeros(100, dtype=torch.bfloat16) for i in range(5)}
    tensors["big"] = torch.zeros(1000, dtype=torch.bfloat16)
    a = _model(tmp_path / "a", tensors)
    b = _model(tmp_path / "b", tensors)

    plan = _plan(a, b, shard_size=450)  # 200 output bytes (float16) per small tensor
    assert plan.shard_names[0] == "model-00001-of-00004.safetensors"
    assert len(plan.shard_names) == 4
    sizes = [sum(p.out_nbytes for p in plan.shard_tensors(s)) for s in range(4)]
    assert all(size <= 450 or len(plan.shard_tensors(s)) == 1 for s, size in enumerate(sizes))
    assert sorted(p.name for p in plan.tensors) == sorted(tensors)

    assert _plan(a, b).shard_names == ["model.safetensors"]


def test_output_config_sets_every_dtype_field(tmp_path):
    config = {"dtype": "bfloat16", "text_config": {"model_type": "llama", "torch_dtype": "bf16"}}
    a = _model(tmp_path / "a", _llama(), **config)
    plan = _plan(a, _model(tmp_path / "b", _llama(), **config), out_dtype=torch.bfloat16)
    assert plan.config["torch_dtype"] == plan.config["dtype"] == "bfloat16"
    assert plan.config["text_config"]["torch_dtype"] == "bfloat16"

    plan = _plan(a, tmp_path / "b")
    assert plan.config["dtype"] == "float16"
