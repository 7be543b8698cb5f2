"""The 1.1B pair merged by one process and by Ray with two workers on this machine, output
compared byte for byte, beside the same-run write floor.

Both write the same shards (SHARD_SIZE cuts the 2.2 GB output into 4), so Ray's two workers
have two units each. Ray's start is timed apart from the merge. Needs the ray extra.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import pytest

import fastmerge
from fastmerge import distributed

from .conftest import best_seconds, write_floor

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[test,ray]'")

T = 0.6
SHARD_SIZE = 600_000_000
WORKERS = 2


def _digests(directory: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(directory.iterdir()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(16 * 2**20):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return digests


def test_ray_two_workers_against_one_process(
    report, pair_1b, tmp_path_factory, caplog, monkeypatch
):
    a, b = pair_1b
    work = tmp_path_factory.mktemp("ray-1b")
    single, parallel = work / "single", work / "ray"

    def merge_single():
        shutil.rmtree(single, ignore_errors=True)
        return fastmerge.merge(a, b, single, T, shard_size=SHARD_SIZE, device="cpu")

    def merge_ray():
        shutil.rmtree(parallel, ignore_errors=True)
        return distributed.merge(a, b, parallel, T, shard_size=SHARD_SIZE, device="cpu")

    merge_single()  # warms the page cache with both inputs
    single_s = best_seconds(merge_single, rounds=2)

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local instance
    started = time.perf_counter()
    ray.init(
        num_cpus=WORKERS,
        include_dashboard=False,
        object_store_memory=distributed.LOCAL_OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
    )
    start_s = time.perf_counter() - started
    try:
        merge_ray()  # starts the workers (imports) once
        with caplog.at_level(logging.INFO, logger="fastmerge.distributed"):
            ray_s = best_seconds(merge_ray, rounds=2)
    finally:
        ray.shutdown()
    unit_seconds = [
        record.args[-1] for record in caplog.records if record.msg.startswith("unit %d of %d")
    ]

    written = sum(p.stat().st_size for p in single.iterdir() if p.suffix == ".safetensors")
    gb = written / 1e9
    floor_s = write_floor(work, written)
    shards = len(list(single.glob("*.safetensors")))
    label = f"1.1B pair, {shards} output shards"
    report.add(
        label,
        "single process (CpuEngine, 2 threads)",
        f"{single_s:.2f} s, {gb / single_s:.2f} GB/s written",
        f"write+fsync of {gb:.2f} GB: {floor_s:.2f} s",
        f"{single_s / floor_s:.2f}x the write time",
    )
    report.add(
        label,
        f"Ray, {WORKERS} workers of 1 CPU (local instance)",
        f"{ray_s:.2f} s, {gb / ray_s:.2f} GB/s written; Ray start {start_s:.1f} s apart",
        f"single process {single_s:.2f} s",
        f"{single_s / ray_s:.2f}x the single process's speed",
    )

    unit_gb = gb / shards
    report.add(
        label,
        "one unit (1 CPU) of those Ray runs",
        f"{unit_gb:.2f} GB shard in {min(unit_seconds):.2f} to {max(unit_seconds):.2f} s",
        "",
        f"{unit_gb / max(unit_seconds):.2f} to {unit_gb / min(unit_seconds):.2f} GB/s per unit",
    )

    mine, theirs = _digests(parallel), _digests(single)
    assert mine == theirs, sorted(name for name in theirs if mine.get(name) != theirs[name])
    report.add(label, "Ray output against single process", f"{len(mine)} files byte-identical")
