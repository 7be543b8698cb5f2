"""CPU engine throughput, against a torch copy of the same bytes timed in the same run.

Bytes moved counts what is read and what is written once: a bf16 pair in and fp16 out is
6 bytes per element for the engine (which in fact reads its inputs twice: statistics, then
blend), and the copy of both inputs moves 8 bytes per element (4 read, 4 written).
"""

from __future__ import annotations

import pytest
import torch

from fastmerge import StateDictSink
from fastmerge.engine import Job
from fastmerge.engine.cpu import CpuEngine
from fastmerge.plan import Method, PlannedTensor
from fastmerge.reader import open_checkpoint
from fastmerge.reference import max_ulp_distance, slerp_reference

from .conftest import best_seconds
from .naive_merge import naive_slerp

T = 0.6


def _planned(name: str, tensor: torch.Tensor) -> PlannedTensor:
    return PlannedTensor(
        name, tuple(tensor.shape), tensor.dtype, torch.float16, Method.SLERP, T, name, name, shard=0
    )


@pytest.fixture(scope="module")
def tensors_135m(pair_135m):
    """Both models' tensors copied into memory, so that no page fault is timed."""
    a, b = pair_135m
    with open_checkpoint(a) as base, open_checkpoint(b) as other:
        return (
            {n: base.view(n).clone() for n in base.tensors},
            {n: other.view(n).clone() for n in other.tensors},
        )


def _copy_seconds(rounds: int, *tensors: torch.Tensor) -> float:
    """Best time of a torch copy of every tensor into a preallocated twin."""
    copies = [torch.empty_like(t) for t in tensors]

    def copy_all() -> None:
        for source, copy in zip(tensors, copies, strict=True):
            copy.copy_(source)

    return best_seconds(copy_all, rounds)


def test_engine_on_the_embedding(benchmark, report, tensors_135m):
    name = "model.embed_tokens.weight"
    a, b = tensors_135m[0][name], tensors_135m[1][name]
    engine = CpuEngine()
    sink = StateDictSink("cpu")  # allocates the output once; later rounds reuse it
    planned = _planned(name, a)

    def merge_one():
        list(engine.run([Job(planned, a, b)], sink))

    benchmark.pedantic(merge_one, rounds=5, warmup_rounds=1)
    engine_s = benchmark.stats["min"]
    copy_s = _copy_seconds(5, a, b)
    naive_s = best_seconds(lambda: naive_slerp(a, b, T), 3)

    numel = a.numel()
    engine_gbs, copy_gbs = 6 * numel / engine_s / 1e9, 8 * numel / copy_s / 1e9
    report.add(
        "engine, 49152x576 pair",
        "fastmerge CPU engine",
        f"{engine_gbs:.2f} GB/s",
        f"torch copy {copy_gbs:.2f} GB/s",
        f"{engine_gbs / copy_gbs:.0%} of copy",
    )
    report.add(
        "engine, 49152x576 pair",
        "naive whole-tensor formula",
        f"{6 * numel / naive_s / 1e9:.2f} GB/s",
        f"fastmerge {engine_gbs:.2f} GB/s",
        f"fastmerge {naive_s / engine_s:.1f}x faster",
    )

    assert max_ulp_distance(sink.state_dict[name], slerp_reference(a, b, T)) <= 1


def test_engine_on_the_whole_135m_set(benchmark, report, tensors_135m):
    base, other = tensors_135m
    jobs = [Job(_planned(n, base[n]), base[n], other[n]) for n in base]
    engine = CpuEngine()
    sink = StateDictSink("cpu")  # allocates the outputs once; later rounds reuse them
    outputs = sink.state_dict

    benchmark.pedantic(lambda: list(engine.run(jobs, sink)), rounds=3, warmup_rounds=1)
    engine_s = benchmark.stats["min"]
    copy_s = _copy_seconds(3, *base.values(), *other.values())

    numel = sum(t.numel() for t in base.values())
    engine_gbs, copy_gbs = 6 * numel / engine_s / 1e9, 8 * numel / copy_s / 1e9
    report.add(
        "engine, SmolLM-135M set",
        "fastmerge CPU engine (272 tensors)",
        f"{engine_gbs:.2f} GB/s",
        f"torch copy {copy_gbs:.2f} GB/s",
        f"{engine_gbs / copy_gbs:.0%} of copy",
    )

    for name in base:
        want = slerp_reference(base[name], other[name], T)
        assert max_ulp_distance(outputs[name], want) <= 1, name
