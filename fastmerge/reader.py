"""Open a checkpoint on disk and give zero-copy views of its tensors from a memory map.

A checkpoint is a model directory (one `model.safetensors`, or shards listed by
`model.safetensors.index.json`), an index file, or a single `.safetensors` file. Opening it
reads and validates only the headers; tensor bytes are touched when a view is used, and the
pages of a finished tensor are released so that resident memory does not grow with the model.

A file truncated while it is mapped kills the process with SIGBUS on the next access to a lost
page, and one rewritten in place changes the bytes under a merge. So each file's identity
(device, inode, size, modification time) is taken when its header is read and compared again
before every view is handed out and by `check_unchanged` before an output is committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .safetensors_format import Header, TensorInfo, header_length, parse_header, parse_json

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_PAGE = mmap.PAGESIZE


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle checkpoint; loading one can run arbitrary code, so fastmerge "
        "only reads safetensors. Convert it once, in an environment you trust, with: "
        'python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{path.parent if path.is_file() else path}')"
        f".save_pretrained('{path.parent if path.is_file() else path}-safetensors')\""
    )


@dataclass(frozen=True)
class FileIdentity:
    """What must not change while a file is read: which file it is, its size and mtime."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    def difference(self, now: FileIdentity) -> str | None:
        """How `now` differs from this identity, in words, or None."""
        if (now.device, now.inode) != (self.device, self.inode):
            return "it was replaced by another file"
        if now.size != self.size:
            return f"its size went from {self.size} to {now.size} bytes"
        if now.mtime_ns != self.mtime_ns:
            return "it was modified"
        return None


@dataclass
class SafetensorsFile:
    """One .safetensors file: its validated header and, once used, a read-only memory map."""

    path: Path
    size: int
    header: Header
    identity: FileIdentity
    _map: mmap.mmap | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        try:
            with open(path, "rb") as handle:
                identity = FileIdentity.of(os.fstat(handle.fileno()))
                prefix = handle.read(8)
                length = header_length(prefix, identity.size, str(path))
                prefix += handle.read(length)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
        header = parse_header(prefix, identity.size, str(path))
        return cls(path=path, size=identity.size, header=header, identity=identity)

    def check_unchanged(self) -> None:
        """Raise CheckpointError if the file was truncated, rewritten or replaced since open."""
        try:
            now = FileIdentity.of(os.stat(self.path))
        except OSError as exc:
            raise CheckpointError(
                f"{self.path}: an input file disappeared during the merge ({exc.strerror}); "
                "nothing was written: run again once the file is back"
            ) from None
        self._refuse_change(now)

    def _refuse_change(self, now: FileIdentity) -> None:
        difference = self.identity.difference(now)
        if difference is not None:
            raise CheckpointError(
                f"{self.path}: this input changed during the merge ({difference}); its "
                "bytes can no longer be trusted, so nothing was written. Do not modify or "
                "replace inputs while fastmerge reads them: run again once the file is final"
            )

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            try:
                with open(self.path, "rb") as handle:
                    self._refuse_change(FileIdentity.of(os.fstat(handle.fileno())))
                    self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: cannot be read ({exc.strerror})") from None
            # Tensors are read front to back: ask for aggressive readahead on page faults,
            # which is what a merge from a cold page cache waits on.
            self._map.madvise(mmap.MADV_SEQUENTIAL)
            if self._map.size() != self.size:
                raise CheckpointError(
                    f"{self.path}: the file changed size while open ({self.size} bytes when "
                    f"its header was read, {self._map.size()} now); do not modify inputs "
                    "during a merge"
                )
        return self._map

    def view(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes in the memory map, as a tensor of its dtype and shape.

        The file is checked first: a view into a truncated map would fault (SIGBUS) on use.
        """
        self.check_unchanged()
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)

        # torch warns that the map is read-only; fastmerge never writes through these views.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(
                self._mapped(), dtype=info.dtype, count=info.numel, offset=info.begin
            )
        return flat.view(info.shape)

    def advise(self, info: TensorInfo, advice: int) -> None:
        """madvise the pages that hold a tensor (rounded out to whole pages)."""
        if self._map is None or info.nbytes == 0:
            return
        start = info.begin - info.begin % _PAGE
        self._map.madvise(advice, start, info.end - start)

    def close(self) -> None:
        if self._map is not None:
            # A caller may still hold a view; then the map closes when the last view is freed.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


@dataclass
class Checkpoint:
    """A model: its tensors in file order across shards, its config, and its directory."""

    source: Path
    directory: Path
    files: list[SafetensorsFile]
    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]]
    config: dict | None

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def view(self, name: str) -> torch.Tensor:
        file, info = self.tensors[name]
        return file.view(info)

    def release(self, name: str) -> None:
        """Drop a finished tensor's pages from this process (they stay in the page cache)."""
        file, info = self.tensors[name]
        file.advise(info, mmap.MADV_DONTNEED)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    def check_unchanged(self) -> None:
        """Raise CheckpointError if any file was truncated, rewritten or replaced since open."""
        for file in self.files:
            file.check_unchanged()

    def close(self) -> None:
        for file in self.files:
            file.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a model directory, an index file or a single .safetensors file (headers only)."""
    source = Path(path)
    try:
        exists = source.exists()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long
        raise CheckpointError(f"{source!r}: not a usable path ({exc})") from None
    if not exists:
        raise CheckpointError(f"{source}: no such file or directory")

    if source.is_dir():
        if (source / INDEX_FILE).is_file():
            return _open_index(source / INDEX_FILE, source)
        if (source / SINGLE_FILE).is_file():
            return _open_single(source / SINGLE_FILE, source)
        pickles = sorted(p for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(pickles[0])
        raise CheckpointError(
            f"{source}: no {SINGLE_FILE} or {INDEX_FILE} in this directory; point fastmerge "
            "at a model directory saved by transformers, an index file or a .safetensors file"
        )

    if source.name.endswith(".index.json"):
        return _open_index(source, source)
    if source.suffix == ".safetensors":
        return _open_single(source, source)
    if source.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(source)
    raise CheckpointError(
        f"{source}: not a model directory, an index (.index.json) or a .safetensors file"
    )


def _read_config(directory: Path) -> dict | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    config = _read_json(path, strict=False)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, found {type(config).__name__}")
    return config


def _open_single(file_path: Path, source: Path) -> Checkpoint:
    file = SafetensorsFile.open(file_path)
    tensors = {info.name: (file, info) for info in file.header.tensors}
    directory = file_path.parent
    return Checkpoint(source, directory, [file], tensors, _read_config(directory))


def _open_index(index_path: Path, source: Path) -> Checkpoint:
    directory = index_path.parent
    weight_map = read_weight_map(index_path)

    files: dict[str, SafetensorsFile] = {}
    for file_name in sorted(set(weight_map.values())):
        files[file_name] = SafetensorsFile.open(_shard_path(directory, file_name, index_path))

    listed_in: dict[str, set[str]] = {file_name: set() for file_name in files}
    for name, file_name in weight_map.items():
        listed_in[file_name].add(name)

    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
    for file_name, file in files.items():
        listed = listed_in[file_name]
        present = {info.name for info in file.header.tensors}
        missing = sorted(listed - present)
        if missing:
            raise CheckpointError(
                f"{index_path}: lists {len(missing)} tensor(s) in {file_name} that the file "
                f"does not hold, first {missing[0]!r}; the index and the shards disagree: "
                "download the model again"
            )
        unlisted = present - listed
        if unlisted:
            logger.warning(
                "%s: %d tensor(s) in %s are not in the index and are ignored, as transformers "
                "ignores them (first %r)",
                index_path,
                len(unlisted),
                file_name,
                min(unlisted),
            )
        for info in file.header.tensors:
            if info.name in listed:
                tensors[info.name] = (file, info)

    return Checkpoint(source, directory, list(files.values()), tensors, _read_config(directory))


def _read_json(path: Path, *, strict: bool) -> object:
    """A JSON file; `strict` also refuses duplicate keys, NaN and out-of-range numbers."""
    try:
        raw = path.read_bytes()
        if strict:
            return parse_json(raw)
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(
            f"{path}: not readable as JSON (arrays or objects nested too deeply)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable as JSON ({exc})") from None


def read_weight_map(index_path: Path) -> dict[str, str]:
    # Strict: an index naming a tensor twice would leave its shard to chance.
    document = _read_json(index_path, strict=True)

    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_path}: expected an object with a 'weight_map' of tensor name to file "
            "name; the index is damaged"
        )
    if not weight_map:
        raise CheckpointError(f"{index_path}: the weight_map is empty")
    return weight_map


def _shard_path(directory: Path, file_name: str, index_path: Path) -> Path:
    """Resolve a shard named by an index, refusing names that leave the model directory."""
    candidate = Path(file_name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(
            f"{index_path}: shard {file_name!r} points outside the model directory; an index "
            "may only name files beside it"
        )

    try:
        resolved = (directory / candidate).resolve()
        inside = any(resolved.is_relative_to(root) for root in _trusted_roots(directory))
        is_file = inside and resolved.is_file()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, link loop
        raise CheckpointError(
            f"{index_path}: shard {file_name!r} cannot be opened ({exc}); the index is damaged"
        ) from None
    if not inside:
        raise CheckpointError(
            f"{index_path}: shard {file_name!r} resolves to {resolved}, outside the model "
            "directory (through a symbolic link); an index may only name files beside it"
        )
    if not is_file:
        raise CheckpointError(
            f"{index_path}: shard {file_name!r} is missing; download the model again"
        )
    return resolved


def _trusted_roots(directory: Path) -> list[Path]:
    """Where an index's shards may lie: the model directory, and for a snapshot in a
    huggingface_hub cache (`models--org--name/snapshots/<rev>/`, whose files are links into
    `models--org--name/blobs/`) that repository's blobs."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots
