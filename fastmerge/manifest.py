"""The output's checksum manifest, `fastmerge-manifest.json`, written last at merge time.

It lists every file of the output with its size and a CRC-32C: for a shard, one of its
header and one of each tensor's bytes (taken by the writer thread as it writes them, so the
data is not read back); for the other files (config, model card, tokenizer, index), one of
the whole file. `fastmerge verify` (fastmerge.verify) checks a copied or downloaded output
against it and names the damaged tensor. A CRC finds accidental damage (flipped bits,
truncation, a shard from another merge), not tampering: the manifest sits beside what it
describes.

CRC-32C (Castagnoli) rather than zlib's CRC-32: the crc32c package computes it with the
CPU's CRC instruction at ~13 GB/s without holding the GIL, where zlib.crc32 ran at 1-4 GB/s
and took 2 of the 5 seconds of the writer thread's time in a 1.1B-parameter merge here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import crc32c

from .plan import MergePlan

MANIFEST_FILE = "fastmerge-manifest.json"
FORMAT = "fastmerge-manifest"
VERSION = 1
READ_CHUNK = 8 * 1024 * 1024


def checksum(data, value: int = 0) -> int:
    """CRC-32C of a bytes-like object (a numpy array too), continuing from `value`."""
    return crc32c.crc32c(data, value)


def crc_text(value: int) -> str:
    return f"{value:08x}"


class CrcReader:
    """CRC-32C of byte ranges of files, read through one reusable buffer."""

    def __init__(self, chunk: int = READ_CHUNK) -> None:
        self._buffer = memoryview(bytearray(chunk))

    def crc32c(self, path: Path, begin: int = 0, end: int | None = None) -> int:
        crc = 0
        with open(path, "rb") as handle:
            handle.seek(begin)
            remaining = (os.fstat(handle.fileno()).st_size if end is None else end) - begin
            while remaining > 0:
                count = handle.readinto(self._buffer[: min(remaining, len(self._buffer))])
                if not count:
                    break
                crc = checksum(self._buffer[:count], crc)
                remaining -= count
        return crc


class WrittenShards(Protocol):
    """The checksums taken while a plan's shards were written: a ShardWriter, or what the
    driver of a distributed merge gathers from its units (fastmerge.distributed)."""

    plan: MergePlan
    checksums: dict[str, int]
    header_checksums: dict[str, int]


def write_manifest(directory: Path, writer: WrittenShards) -> Path:
    """Describe every file now in `directory` (the last step before the output is committed)."""
    files: dict[str, dict] = {}
    shard_tensors: dict[str, list[str]] = {}
    for planned in writer.plan.tensors:
        shard_tensors.setdefault(writer.plan.shard_names[planned.shard], []).append(planned.name)

    reader = CrcReader(chunk=1024 * 1024)
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST_FILE or not path.is_file():
            continue
        entry: dict[str, object] = {"size": path.stat().st_size}
        if path.name in shard_tensors:
            entry["header_crc32c"] = crc_text(writer.header_checksums[path.name])
            entry["tensors"] = {
                name: crc_text(writer.checksums.get(name, 0)) for name in shard_tensors[path.name]
            }
        else:
            entry["crc32c"] = crc_text(reader.crc32c(path))
        files[path.name] = entry

    manifest = {"format": FORMAT, "version": VERSION, "checksum": "crc32c", "files": files}
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path
