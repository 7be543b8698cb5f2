"""The CUDA engine's pipeline (batching, uploads, launches, downloads, statistics read a batch
late), run on CPU tensors with the kernels in Triton's interpreter.

The same code runs on a GPU with streams, pinned buffers and events; benchmarks/gpu_check.sh
checks that on a real device.
"""

from __future__ import annotations

import math
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the CUDA engine needs triton (its interpreter runs on CPU)")

import torch
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge.engine import select_engine
from fastmerge.engine.cpu import CpuEngine
from fastmerge.engine.cuda import CudaEngine
from fastmerge.errors import FastmergeError

from .conftest import copy_model
from .test_merge import assert_matches_reference, load_output


@pytest.fixture
def engine() -> CudaEngine:
    # A small batch budget, so that the tiny model takes several batches and the embedding
    # (40 KiB per input) is a batch of its own.
    return CudaEngine("cpu", batch_bytes=60_000)


def test_pipeline_matches_the_reference_and_the_cpu_engine(tiny_pair, tmp_path, engine):
    a, b = tiny_pair
    triton_result = fastmerge.merge(a, b, tmp_path / "triton", 0.6, device=engine)
    cpu_result = fastmerge.merge(a, b, tmp_path / "cpu", 0.6, device=CpuEngine())

    merged = assert_matches_reference(tmp_path / "triton", a, b, 0.6)
    on_cpu = load_output(tmp_path / "cpu")
    for name, tensor in merged.items():
        assert (tensor.view(torch.int16) - on_cpu[name].view(torch.int16)).abs().max() <= 1, name

    assert triton_result.device == "cpu (triton interpreter)"
    assert [r.name for r in triton_result.tensors] == [r.name for r in cpu_result.tensors]
    for ours, theirs in zip(triton_result.tensors, cpu_result.tensors, strict=True):
        assert ours.method == theirs.method, ours.name
        # fp32 partials leave cos good to ~1e-7, so compare cosines, not tiny angles.
        assert math.cos(ours.angle) == pytest.approx(math.cos(theirs.angle), abs=5e-7), ours.name


def test_sharded_untied_output_and_linear_vectors(tiny_untied_sharded_pair, tmp_path, engine):
    a, b = tiny_untied_sharded_pair
    result = fastmerge.merge(
        a,
        b,
        tmp_path / "out",
        0.3,
        device=engine,
        shard_size=40_000,
        lerp_vectors=True,
        dtype="bfloat16",
    )
    merged = load_output(tmp_path / "out")
    norm_a = load_file(sorted(a.glob("*.safetensors"))[-1])["model.norm.weight"]
    norm_b = load_file(sorted(b.glob("*.safetensors"))[-1])["model.norm.weight"]
    want = (0.7 * norm_a.double() + 0.3 * norm_b.double()).to(torch.bfloat16)
    assert torch.equal(merged["model.norm.weight"], want)
    assert {r.method for r in result.tensors if r.name.endswith("norm.weight")} == {"lerp"}


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_t_zero_and_one_are_the_inputs(tiny_pair, tmp_path, engine, t):
    a, b = tiny_pair
    fastmerge.merge(a, b, tmp_path / "out", t, device=engine, dtype="bfloat16")
    source = load_file((a if t == 0 else b) / "model.safetensors")
    for name, tensor in load_output(tmp_path / "out").items():
        assert torch.equal(tensor, source[name]), name


# numpy, under the interpreter, warns where a GPU silently produces NaN or inf.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_input_is_named(tiny_pair, tmp_path, engine):
    a, b = tiny_pair
    damaged = copy_model(b, tmp_path / "damaged")
    tensors = load_file(damaged / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(tensors, damaged / "model.safetensors")

    with pytest.raises(fastmerge.MergeError, match=r"'model.layers.0.self_attn.q_proj.weight'"):
        fastmerge.merge(a, damaged, tmp_path / "out", 0.6, device=engine)
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflow_is_detected(tmp_path, engine):
    for name, value in (("a", 60000.0), ("b", 90000.0)):
        (tmp_path / name).mkdir()
        save_file(
            {"w": torch.full((8,), value, dtype=torch.bfloat16)},
            tmp_path / name / "model.safetensors",
        )
    with pytest.raises(fastmerge.MergeError, match="overflow float16"):
        fastmerge.merge(tmp_path / "a", tmp_path / "b", tmp_path / "out", 0.6, device=engine)


def test_primitives_for_single_tensors(engine):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5000, generator=generator).to(torch.bfloat16)
    b = torch.randn(5000, generator=generator).to(torch.bfloat16)
    on_device = engine.statistics(a, b)
    exact = CpuEngine().statistics(a, b)
    assert on_device.norm_a_sq == pytest.approx(exact.norm_a_sq, rel=1e-9)
    assert on_device.dot == pytest.approx(exact.dot, rel=1e-9, abs=1e-9)


def test_device_selection_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert isinstance(select_engine("auto"), CpuEngine)
    with pytest.raises(FastmergeError, match="torch sees no CUDA device"):
        select_engine("cuda")
    with pytest.raises(FastmergeError, match="unknown device 'cuda:x'"):
        select_engine("cuda:x")
