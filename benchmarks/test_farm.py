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
The figures go to the session's report table (benchmarks/conftest.py) and to the
benchmark's extra_info.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

import fastmerge

from .conftest import best_seconds, write_floor

SWEEP = [0.1, 0.3, 0.5, 0.7, 0.9]


def _best_of(rounds: int, run: Callable[[], object]) -> float:
    return best_seconds(run, rounds)


def _assert_equal(got: dict[str, torch.Tensor], directory: Path) -> None:
    want = load_file(directory / "model.safetensors")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name].view(torch.int16), tensor.view(torch.int16)), name


def _convert_floor(pair: fastmerge.ResidentPair, sink: fastmerge.StateDictSink) -> None:
    """Copy every base tensor into its output, converting the dtype: no math, one input."""
    for planned in pair.plan.tensors:
        sink.state_dict[planned.name].copy_(pair.plan.a.view(planned.source_a))


def test_resident_re_merge_against_a_fresh_merge_from_disk(benchmark, report, pair_135m, tmp_path):
    a, b = pair_135m
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
    benchmark.extra_info.update(
        fresh=fresh, re_merge=re_merge, to_directory=to_directory, load=load_seconds, floor=floor
    )
    label = "farm, resident SmolLM-135M pair (CPU)"
    report.add(
        label,
        "re-merge at a new t into memory",
        f"{re_merge:.3f} s, {moved / re_merge / 1e9:.2f} GB/s moved",
        f"fresh merge from disk {fresh:.3f} s",
        f"{fresh / re_merge:.1f}x faster",
    )
    report.add(
        label,
        "re-merge at a new t into a directory",
        f"{to_directory:.3f} s",
        f"fresh merge from disk {fresh:.3f} s",
        f"{fresh / to_directory:.1f}x faster",
    )
    report.add(
        label,
        "loading: copy both models + statistics",
        f"{load_seconds:.3f} s",
        f"bf16->fp16 copy of the base {floor:.3f} s",
        f"re-merge {re_merge / floor:.2f}x the copy",
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
    floor = min(write_floor(root, output_bytes) for _ in range(3))
    for out in separate_outs + sweep_outs:
        shutil.rmtree(out)
    return {"separate": separate, "sweep": swept, "write floor": floor}


def test_sweep_of_five_against_five_merges(benchmark, report, pair_135m, tmp_path):
    on_disk = _sweep_against_merges(*pair_135m, tmp_path, benchmark)
    label = f"farm, sweep of {len(SWEEP)} t values, SmolLM-135M pair (CPU)"
    report.add(
        label,
        "one sweep, outputs on disk",
        f"{on_disk['sweep']:.2f} s",
        f"{len(SWEEP)} separate merges {on_disk['separate']:.2f} s; write+fsync of "
        f"the same bytes {on_disk['write floor']:.2f} s",
        f"{on_disk['separate'] / on_disk['sweep']:.2f}x faster",
    )
    benchmark.extra_info.update({f"disk {k}": v for k, v in on_disk.items()})

    if Path("/dev/shm").is_dir():
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            in_memory = _sweep_against_merges(*pair_135m, Path(shm))
        report.add(
            label,
            "one sweep, outputs in tmpfs",
            f"{in_memory['sweep']:.2f} s",
            f"{len(SWEEP)} separate merges {in_memory['separate']:.2f} s",
            f"{in_memory['separate'] / in_memory['sweep']:.2f}x faster",
        )
        benchmark.extra_info.update({f"tmpfs {k}": v for k, v in in_memory.items()})
