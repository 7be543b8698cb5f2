"""`fastmerge verify OUT`: is a merged model directory, copied or downloaded, still intact?

Checks, each reported by file and tensor rather than stopping at the first:
- every shard's header parses and its tensors tile the data buffer exactly (the reader's own
  validation: no gap, no overlap, nothing past the end or after the last tensor);
- the index (if any) names exactly the tensors each shard holds, and its total_size adds up;
- no stray .safetensors file sits beside the shards;
- every file of `fastmerge-manifest.json` is there with its size, and every checksum
  matches: each shard's header, each tensor's bytes, each other file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError
from .manifest import FORMAT, MANIFEST_FILE, CrcReader, crc_text
from .reader import INDEX_FILE, SINGLE_FILE, SafetensorsFile, read_weight_map
from .safetensors_format import parse_json

logger = logging.getLogger(__name__)


@dataclass
class Verification:
    """What `verify` found: problems (empty when intact) and what was checked."""

    directory: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0
    tensors: int = 0
    tensor_bytes: int = 0
    checksums: int = 0
    ignored: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(directory: str | os.PathLike[str]) -> Verification:
    """Check a merged model directory against its structure and its manifest."""
    root = Path(directory)
    report = Verification(root)
    if not root.is_dir():
        report.problems.append(f"{root}: not a directory")
        return report

    manifest = _read_manifest(root, report)
    shards = _shard_names(root, report)
    headers = {}
    for name in shards:
        if Path(name).name != name:
            report.problems.append(f"{INDEX_FILE}: shard {name!r} is not a file of {root}")
            continue
        try:
            headers[name] = SafetensorsFile.open(root / name)
        except CheckpointError as exc:
            report.problems.append(str(exc))
    if (root / INDEX_FILE).is_file():
        _check_index(root, headers, report)

    for path in sorted(root.glob("*.safetensors")):
        if path.name not in shards:
            report.problems.append(
                f"{path.name}: a .safetensors file that the model does not use (a stale shard "
                "from another merge?); remove it"
            )
    for file in headers.values():
        report.tensors += len(file.header.tensors)
        report.tensor_bytes += sum(info.nbytes for info in file.header.tensors)

    if manifest is not None:
        _check_manifest(root, manifest, headers, report, CrcReader())
    report.files = len([p for p in root.iterdir() if p.is_file()])
    return report


def _read_manifest(root: Path, report: Verification) -> dict | None:
    path = root / MANIFEST_FILE
    if not path.is_file():
        report.problems.append(
            f"{MANIFEST_FILE} is missing: the checksums written at merge time are needed to "
            "tell an intact output from a damaged one (outputs written before fastmerge wrote "
            "manifests have none)"
        )
        return None
    try:
        manifest = parse_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        report.problems.append(f"{MANIFEST_FILE}: not readable ({exc}); it is damaged")
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(files, dict)
        or not all(isinstance(entry, dict) for entry in files.values())
    ):
        report.problems.append(f"{MANIFEST_FILE}: not a fastmerge manifest; it is damaged")
        return None
    return manifest


def _shard_names(root: Path, report: Verification) -> list[str]:
    if (root / INDEX_FILE).is_file():
        try:
            return sorted(set(read_weight_map(root / INDEX_FILE).values()))
        except CheckpointError as exc:
            report.problems.append(str(exc))
            return []
    if (root / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    report.problems.append(f"no {SINGLE_FILE} or {INDEX_FILE}: this is not a model directory")
    return []


def _check_index(root: Path, headers: dict[str, SafetensorsFile], report: Verification) -> None:
    path = root / INDEX_FILE
    try:
        weight_map = read_weight_map(path)
        index = parse_json(path.read_bytes())
    except (CheckpointError, ValueError):
        return  # already reported by _shard_names

    for name, shard in sorted(weight_map.items()):
        file = headers.get(shard)
        if file is not None and all(info.name != name for info in file.header.tensors):
            report.problems.append(
                f"{INDEX_FILE}: lists tensor {name!r} in {shard}, which does not hold it"
            )
    for shard, file in headers.items():
        for info in file.header.tensors:
            if weight_map.get(info.name) != shard:
                report.problems.append(
                    f"{shard}: holds tensor {info.name!r}, which {INDEX_FILE} "
                    f"{'does not list' if info.name not in weight_map else 'puts elsewhere'}"
                )

    total = (index.get("metadata") or {}).get("total_size") if isinstance(index, dict) else None
    found = sum(info.nbytes for file in headers.values() for info in file.header.tensors)
    if total is not None and total != found and len(headers) == len(set(weight_map.values())):
        report.problems.append(
            f"{INDEX_FILE}: metadata.total_size is {total} but the shards hold {found} bytes "
            "of tensors"
        )


def _check_manifest(
    root: Path,
    manifest: dict,
    headers: dict[str, SafetensorsFile],
    report: Verification,
    reader: CrcReader,
) -> None:
    files: dict[str, dict] = manifest["files"]
    for name in sorted(files):
        entry = files[name]
        path = root / name
        if Path(name).name != name or not path.is_file():
            report.problems.append(f"{name}: listed in {MANIFEST_FILE} but missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            report.problems.append(
                f"{name}: {size} bytes, but {MANIFEST_FILE} recorded {entry.get('size')}; the "
                "file is truncated or was replaced: copy or download it again"
            )
            continue

        if "tensors" in entry:
            if name in headers:
                _check_shard(path, entry, headers[name], report, reader)
        else:
            report.checksums += 1
            found = crc_text(reader.crc32c(path))
            if found != entry.get("crc32c"):
                report.problems.append(
                    f"{name}: its checksum is {found}, but {MANIFEST_FILE} recorded "
                    f"{entry.get('crc32c')}; the file was changed or damaged after the merge"
                )

    for path in sorted(root.iterdir()):
        if path.name not in files and path.name != MANIFEST_FILE:
            if path.suffix == ".safetensors" or path.name == INDEX_FILE:
                report.problems.append(f"{path.name}: not part of the merge ({MANIFEST_FILE})")
            else:
                report.ignored.append(path.name)
    for name in report.ignored:
        logger.info("%s: added after the merge (not in %s); not checked", name, MANIFEST_FILE)


def _check_shard(
    path: Path, entry: dict, file: SafetensorsFile, report: Verification, reader: CrcReader
) -> None:
    recorded: dict = entry["tensors"] if isinstance(entry["tensors"], dict) else {}
    present = {info.name for info in file.header.tensors}
    for name in sorted(set(recorded) - present):
        report.problems.append(f"{path.name}: tensor {name!r} is missing from the header")
    for name in sorted(present - set(recorded)):
        report.problems.append(
            f"{path.name}: tensor {name!r} is not in {MANIFEST_FILE}; the header was changed"
        )

    report.checksums += 1
    found = crc_text(reader.crc32c(path, 0, file.header.data_start))
    if found != entry.get("header_crc32c"):
        report.problems.append(
            f"{path.name}: the header's checksum is {found}, but {MANIFEST_FILE} recorded "
            f"{entry.get('header_crc32c')}; the header was damaged: copy or download the file "
            "again"
        )

    for info in file.header.tensors:
        if info.name not in recorded:
            continue
        report.checksums += 1
        found = crc_text(reader.crc32c(path, info.begin, info.end))
        if found != recorded[info.name]:
            report.problems.append(
                f"{path.name}: tensor {info.name!r} (bytes {info.begin}-{info.end}) is damaged: "
                f"its checksum is {found}, but {MANIFEST_FILE} recorded {recorded[info.name]}; "
                "copy or download the file again"
            )
