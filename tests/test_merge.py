"""End to end: generated Llama-shaped pairs merged to disk, checked against the reference,
read back by the safetensors library and loaded by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastmerge
from fastmerge.reader import open_checkpoint
from fastmerge.reference import (
    describe_mismatch,
    max_ulp_distance,
    slerp_mismatches,
    slerp_reference,
)
from fastmerge.slerp import compute_dtype
from fastmerge.synthetic import write_pair
from fastmerge.writer import ShardWriter

from .conftest import copy_model


def load_output(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output directory, read by the safetensors library."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(directory / shard))
    assert set(tensors) == set(weight_map)
    return tensors


def assert_matches_reference(out: Path, a: Path, b: Path, t: float, dtype=torch.float16):
    merged = load_output(out)
    with open_checkpoint(a) as base, open_checkpoint(b) as other:
        for name, tensor in merged.items():
            source_a = name if name in base.tensors else "model.embed_tokens.weight"
            source_b = name if name in other.tensors else "model.embed_tokens.weight"
            x, y = base.view(source_a), other.view(source_b)
            assert tensor.dtype == dtype
            bad = slerp_mismatches(tensor, x, y, t, math_dtype=compute_dtype(x.dtype, dtype))
            want = slerp_reference(x, y, t, out_dtype=dtype).reshape(-1)
            shown = torch.where(bad, tensor.reshape(-1), want)
            assert not bad.any(), describe_mismatch(name, shown, want, 1)
    return merged


def assert_loads_in_transformers(out: Path, merged: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name
    if "lm_head.weight" not in merged:
        assert model.config.tie_word_embeddings
        assert torch.equal(state["lm_head.weight"], merged["model.embed_tokens.weight"])


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if "fastmerge-partial" in p.name]


def test_tied_single_file_merge(tiny_pair, tmp_path):
    a, b = tiny_pair
    result = fastmerge.merge(a, b, tmp_path / "out", 0.6)

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "fastmerge-manifest.json",
        "generation_config.json",
        "model.safetensors",
    ]
    merged = assert_matches_reference(tmp_path / "out", a, b, 0.6)
    assert_loads_in_transformers(tmp_path / "out", merged)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["tie_word_embeddings"] is True
    assert result.bytes_written == sum(t.nbytes for t in merged.values())
    assert {r.method for r in result.tensors} == {"slerp", "lerp"}
    assert no_leftovers(tmp_path)


def test_untied_sharded_merge(tiny_untied_sharded_pair, tmp_path):
    a, b = tiny_untied_sharded_pair
    result = fastmerge.merge(a, b, tmp_path / "out", 0.3, shard_size=40_000)

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == result.bytes_written

    merged = assert_matches_reference(tmp_path / "out", a, b, 0.3)
    assert_loads_in_transformers(tmp_path / "out", merged)


def test_tied_base_with_untied_other_writes_an_untied_head(tmp_path, pair_cache):
    tied, _ = write_pair(pair_cache / "tied", "tiny")
    _, untied = write_pair(pair_cache / "untied-sharded", "tiny", tied=False, shards=3)
    fastmerge.merge(tied, untied, tmp_path / "out", 0.6)

    merged = assert_matches_reference(tmp_path / "out", tied, untied, 0.6)
    assert "lm_head.weight" in merged
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    )
    assert_loads_in_transformers(tmp_path / "out", merged)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_output_dtypes(tiny_pair, tmp_path, dtype):
    a, b = tiny_pair
    fastmerge.merge(a, b, tmp_path / "out", 0.6, dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    assert_matches_reference(tmp_path / "out", a, b, 0.6, dtype=torch_dtype)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_t_zero_and_one_reproduce_the_inputs(tiny_pair, tmp_path, t):
    a, b = tiny_pair
    fastmerge.merge(a, b, tmp_path / "out", t, dtype="bfloat16")
    merged = load_output(tmp_path / "out")
    source = load_file((a if t == 0 else b) / "model.safetensors")
    for name, tensor in merged.items():
        assert torch.equal(tensor, source[name]), name


def test_lerp_vectors_interpolates_norms_linearly(tiny_pair, tmp_path):
    a, b = tiny_pair
    result = fastmerge.merge(a, b, tmp_path / "out", 0.6, lerp_vectors=True)
    merged = load_output(tmp_path / "out")
    norm_a = load_file(a / "model.safetensors")["model.norm.weight"]
    norm_b = load_file(b / "model.safetensors")["model.norm.weight"]
    want = ((1 - 0.6) * norm_a.double() + 0.6 * norm_b.double()).half()
    assert max_ulp_distance(merged["model.norm.weight"], want) <= 1
    reports = {r.name: r for r in result.tensors}
    assert reports["model.norm.weight"].method == "lerp"


def test_companions_and_model_card(tiny_pair, tmp_path):
    a, b = tiny_pair
    base = copy_model(a, tmp_path / "base")
    (base / "tokenizer.json").write_text('{"model": {}}')
    (base / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "notes.txt").write_text("not a model file")
    result = fastmerge.merge(base, b, tmp_path / "out", 0.6)

    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert "notes.txt" not in names and "fastmerge-synthetic.json" not in names
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": {}}'

    card = (tmp_path / "out" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert f'  - "{base}"' in front and "library_name: transformers" in front
    assert "  - merge\n  - slerp" in front
    assert "merge_method: slerp" in body and "  t: 0.6" in body and "out_dtype: float16" in body
    slerp_count = sum(1 for r in result.tensors if r.method == "slerp")
    assert f"{slerp_count} took the SLERP branch" in body
    low, median, high = result.angle_summary()
    assert f"smallest {low:.2f}°, median {median:.2f}°, largest {high:.2f}°" in body


def test_an_existing_output_is_refused_and_replaced_only_with_force(tiny_pair, tmp_path):
    a, b = tiny_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale-00001-of-00009.safetensors").write_text("old")

    with pytest.raises(fastmerge.OutputError, match="already exists; pass --force"):
        fastmerge.merge(a, b, out, 0.6)
    assert (out / "stale-00001-of-00009.safetensors").exists()

    fastmerge.merge(a, b, out, 0.6, force=True)
    assert not (out / "stale-00001-of-00009.safetensors").exists()
    assert (out / "model.safetensors").exists()
    assert no_leftovers(tmp_path)


def test_an_output_inside_an_input_is_refused(tiny_pair, tmp_path):
    a, b = tiny_pair
    base = copy_model(a, tmp_path / "base")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for out in (base, base / "merged"):
        with pytest.raises(fastmerge.OutputError, match="inside the input"):
            fastmerge.merge(base, b, out, 0.6, force=True)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before

    with pytest.raises(fastmerge.OutputError, match="lies inside the existing output"):
        fastmerge.merge(base, b, tmp_path, 0.6, force=True)


class _DiskFull(OSError):
    pass


def _fail_after(monkeypatch, writes: int) -> None:
    original = ShardWriter._write_bytes
    calls = {"n": 0}

    def failing(self, fd, view):
        calls["n"] += 1
        if calls["n"] > writes:
            raise _DiskFull(28, "No space left on device")
        original(self, fd, view)

    monkeypatch.setattr(ShardWriter, "_write_bytes", failing)


def test_a_failure_while_writing_leaves_no_output(tiny_untied_sharded_pair, tmp_path, monkeypatch):
    a, b = tiny_untied_sharded_pair
    _fail_after(monkeypatch, writes=5)
    with pytest.raises(_DiskFull):
        fastmerge.merge(a, b, tmp_path / "out", 0.6, shard_size=40_000)
    assert not (tmp_path / "out").exists()
    assert no_leftovers(tmp_path)


def test_a_failure_under_force_keeps_the_earlier_output(tiny_pair, tmp_path, monkeypatch):
    a, b = tiny_pair
    fastmerge.merge(a, b, tmp_path / "out", 0.2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    _fail_after(monkeypatch, writes=3)
    with pytest.raises(_DiskFull):
        fastmerge.merge(a, b, tmp_path / "out", 0.9, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert no_leftovers(tmp_path)


def test_non_finite_input_stops_the_merge_naming_tensor_and_model(tiny_pair, tmp_path):
    from safetensors.torch import save_file

    a, b = tiny_pair
    damaged = copy_model(b, tmp_path / "damaged")
    tensors = load_file(damaged / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, damaged / "model.safetensors")

    with pytest.raises(fastmerge.MergeError) as caught:
        fastmerge.merge(a, damaged, tmp_path / "out", 0.6)
    assert "'model.layers.1.mlp.up_proj.weight'" in str(caught.value)
    assert str(damaged) in str(caught.value) and "NaN or infinite" in str(caught.value)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_float16_overflow_stops_the_merge_and_suggests_bfloat16(tmp_path):
    from safetensors.torch import save_file

    for name, value in (("a", 60000.0), ("b", 90000.0)):
        (tmp_path / name).mkdir()
        save_file(
            {"w": torch.full((4, 4), value, dtype=torch.bfloat16)},
            tmp_path / name / "model.safetensors",
        )
    with pytest.raises(fastmerge.MergeError, match=r"'w'.*overflow float16.*--dtype bfloat16"):
        fastmerge.merge(tmp_path / "a", tmp_path / "b", tmp_path / "out", 0.6)
    assert not (tmp_path / "out").exists()

    fastmerge.merge(tmp_path / "a", tmp_path / "b", tmp_path / "out", 0.6, dtype="bfloat16")
    assert load_file(tmp_path / "out" / "model.safetensors")["w"].isfinite().all()


def test_progress_reports_every_output_byte(tiny_pair, tmp_path):
    calls = []
    result = fastmerge.merge(
        *tiny_pair,
        tmp_path / "out",
        0.6,
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (result.bytes_written, result.bytes_written)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_inputs_are_never_modified(tiny_pair, tmp_path):
    a, b = tiny_pair
    before = {p: p.read_bytes() for model in (a, b) for p in model.iterdir()}
    fastmerge.merge(a, b, tmp_path / "out", 0.6)
    assert {p: p.read_bytes() for model in (a, b) for p in model.iterdir()} == before
