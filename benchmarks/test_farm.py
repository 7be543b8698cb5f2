"""Merge-farm benchmarks on a SmolLM-135M-shaped pair (134.5M parameters, bfloat16).

- a re-merge at a new t on a ResidentPair (both inputs and their statistics in memory, the
  outputs reused in a StateDictSink) against a fresh `fastmerge.merge` from disk into a
  directory, which is what a farm built on one-shot tools pays per candidate; the resident
  re-merge into a directory is reported beside it;
- a 5-value `fastmerge.sweep` (one read, one statistics pass) against five separate merges,
  with the outputs on the test's temporary directory (disk) and, where /dev/shm exists, in
  memory (tmpfs), which separates what the sweep saves from the disk's write speed.

Same-run references: a bfloat16 -> float16 copy of every base tensor (the least work any merge
of these tensors does) and, for the sweep, the time to write and fsync the same bytes.
Results are checked after timing: every output bit-equal to the separate fresh merges.
The figures are printed (run with -s) and kept in the benchmark's extra_info. The pair is
built once into FASTMERGE_BENCHMARK_CACHE (default: a directory under the system temp dir)
and reused. Run: pytest benchmarks/test_farm.py -s
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastmerge
from fastmerge.synthetic import write_pair

CACHE = Path(
    os.environ.get(
        "FASTMERGE_BENCHMARK_CACHE", Path(tempfile.gettempdir()) / "fastmerge-benchmarks"
    )
)
SWEEP = [0.1, 0.3, 0.5, 0.7, 0.9]


@pytest.fixture(scope="module")
def smollm_pair() -> tuple[Path, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    return write_pair(CACHE / "smollm-135m", "smollm-135m", names=("base", "instruct"))


def _best_of(rounds: int, run: Callable[[], object]) -> float:
    """The fastest of `rounds` runs, in seconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def _report(benchmark, capsys, title: str, figures: dict[str, float]) -> None:
    benchmark.extra_info.update(figures)
    with capsys.disabled():
        print(f"\n{title}")
        for key, value in figures.items():
            print(f"  {key:<42} {value:10.3f}")


def _assert_equal(got: dict[str, torch.Tensor], directory: Path) -> None:
    want = load_file(directory / "model.safetensors")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name].view(torch.int16), tensor.view(torch.int16)), name


def _convert_floor(pair: fastmerge.ResidentPair, sink: fastmerge.StateDictSink) -> None:
    """Copy every base tensor into its output, converting the dtype: no math, one input."""
    for planned in pair.plan.tensors:
        sink.state_dict[planned.name].copy_(pair.plan.a.view(planned.source_a))


def _write_floor(directory: Path, nbytes: int) -> None:
    """Write and fsync `nbytes` in 8 MiB blocks, as the shard writer does."""
    block = bytes(8 * 2**20)
    with open(directory / "floor.bin", "wb") as handle:
        for _ in range(0, nbytes, len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    (directory / "floor.bin").unlink()


def test_resident_re_merge_against_a_fresh_merge_from_disk(
    benchmark, smollm_pair, tmp_path, capsys
):
    a, b = smollm_pair
    fresh_out = tmp_path / "fresh"
    fresh = _best_of(3, lambda: fastmerge.merge(a, b, fresh_out, 0.7, force=True))

    with fastmerge.ResidentPair(a, b, device="cpu", memory_budget=2 * 10**9) as pair:
        sink = fastmerge.StateDictSink(device="cpu")
        pair.merge(0.3, sink)  # allocates the outputs; every later merge reuses them

        benchmark.pedantic(pair.merge, args=(0.7, sink), rounds=7, iterations=1, warmup_rounds=1)
        re_merge = benchmark.stats.stats.min
        to_directory = _best_of(3, lambda: pair.merge(0.7, tmp_path / "resident", force=True))
        result = pair.merge(0.7, sink)
        moved = pair.resident_bytes + result.bytes_written
        floor_sink = fastmerge.StateDictSink(device="cpu")
        pair.merge(0.0, floor_sink)
        floor = _best_of(5, lambda: _convert_floor(pair, floor_sink))
        load_seconds = pair.load_seconds

    _assert_equal(sink.state_dict, fresh_out)
    _assert_equal(load_file(tmp_path / "resident" / "model.safetensors"), fresh_out)
    _report(
        benchmark,
        capsys,
        "resident re-merge (SmolLM-135M shape, CPU)",
        {
            "fresh merge from disk, s": fresh,
            "resident re-merge into memory, s": re_merge,
            "resident re-merge into a directory, s": to_directory,
            "resident load (copy + statistics), s": load_seconds,
            "bf16 -> fp16 copy of the base (floor), s": floor,
            "resident re-merge, GB/s moved": moved / re_merge / 1e9,
            "ratio re-merge / copy floor": re_merge / floor,
            "ratio fresh / resident re-merge": fresh / re_merge,
            "ratio fresh / resident into a directory": fresh / to_directory,
        },
    )


def _sweep_against_merges(a: Path, b: Path, root: Path, benchmark=None) -> dict[str, float]:
    separate_outs = [root / f"separate-{t}" for t in SWEEP]
    sweep_outs = [root / f"sweep-{t}" for t in SWEEP]

    def separately() -> None:
        for t, out in zip(SWEEP, separate_outs, strict=True):
            fastmerge.merge(a, b, out, t, force=True)

    def sweep() -> None:
        fastmerge.sweep(a, b, SWEEP, sweep_outs, force=True)

    # Rounds alternate, five merges then one sweep, so that both meet the same disk state.
    separate_times: list[float] = []

    def five_merges_first() -> None:
        separate_times.append(_best_of(1, separately))

    if benchmark is not None:
        benchmark.pedantic(sweep, setup=five_merges_first, rounds=3, iterations=1)
        swept = benchmark.stats.stats.min
    else:
        sweep_times = []
        for _ in range(3):
            five_merges_first()
            sweep_times.append(_best_of(1, sweep))
        swept = min(sweep_times)
    separate = min(separate_times)

    for swept_out, separate_out in zip(sweep_outs, separate_outs, strict=True):
        for name in ("model.safetensors", "config.json"):
            assert (swept_out / name).read_bytes() == (separate_out / name).read_bytes()
    output_bytes = sum((out / "model.safetensors").stat().st_size for out in sweep_outs)
    write_floor = _best_of(3, lambda: _write_floor(root, output_bytes))
    for out in separate_outs + sweep_outs:
        shutil.rmtree(out)
    return {"separate": separate, "sweep": swept, "write floor": write_floor}


def test_sweep_of_five_against_five_merges(benchmark, smollm_pair, tmp_path, capsys):
    on_disk = _sweep_against_merges(*smollm_pair, tmp_path, benchmark)
    figures = {
        f"{len(SWEEP)} separate merges (disk), s": on_disk["separate"],
        f"one sweep of {len(SWEEP)} (disk), s": on_disk["sweep"],
        "write + fsync of the sweep's bytes (disk), s": on_disk["write floor"],
        "ratio separate / sweep (disk)": on_disk["separate"] / on_disk["sweep"],
    }
    if Path("/dev/shm").is_dir():
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            in_memory = _sweep_against_merges(*smollm_pair, Path(shm))
        figures |= {
            f"{len(SWEEP)} separate merges (tmpfs), s": in_memory["separate"],
            f"one sweep of {len(SWEEP)} (tmpfs), s": in_memory["sweep"],
            "ratio separate / sweep (tmpfs)": in_memory["separate"] / in_memory["sweep"],
        }
    _report(benchmark, capsys, f"sweep of {len(SWEEP)} t values (SmolLM-135M shape, CPU)", figures)
