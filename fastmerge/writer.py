"""Stream the merged tensors into safetensors shards, in the layout transformers loads.

Each shard's header is known from the plan before any value is computed, so a shard is
written front to back: header first, then tensor bytes in the plan's order as the engine
produces them. The engine fills staging buffers from a small pool; a writer thread writes
them out while the engine computes the next ones, so computing and writing overlap within a
fixed memory budget. With several shards an index (`model.safetensors.index.json`) lists
which shard holds each tensor.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .manifest import checksum
from .plan import MergePlan, PlannedTensor
from .safetensors_format import encode_header

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
STAGING_BYTES = 8 * 1024 * 1024
"""Bytes per staging buffer: large enough for few system calls, small enough to stay cheap."""
STAGING_BUFFERS = 4


class ShardWriter:
    """A Sink that writes a plan's shards into `directory` (which must exist and be empty).

    Use as a context manager; `close()` flushes, fsyncs and writes the index (unless `index`
    is False: a unit of a distributed merge writes some of the shards, and its driver writes
    the index). Errors from the writer thread (a full disk, say) are raised in the caller's
    thread at the next call.

    The writer thread also takes a CRC-32C of each tensor's bytes as it writes them (without
    the GIL), and of each shard's header: `checksums` and `header_checksums` feed the
    output's manifest (fastmerge.manifest).
    """

    def __init__(
        self,
        directory: Path,
        plan: MergePlan,
        *,
        staging_bytes: int = STAGING_BYTES,
        pin_memory: bool = False,
        on_bytes: Callable[[int], None] | None = None,
        index: bool = True,
    ) -> None:
        self.directory = directory
        self.plan = plan
        self.index = index
        self.on_bytes = on_bytes
        self._shard = -1
        self._fd: int | None = None
        self._open_fds: set[int] = set()
        self._paths: dict[int, Path] = {}
        self.checksums: dict[str, int] = {}
        self.header_checksums: dict[str, int] = {}
        self._taken: torch.Tensor | None = None
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(STAGING_BUFFERS):
            self._free.put(torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=pin_memory))
        self._pending: queue.Queue[_Write | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="fastmerge-writer", daemon=True)
        self._thread.start()

    # The engine's side: take a destination, fill it, commit it.

    def take(self, planned: PlannedTensor, remaining: int) -> torch.Tensor:
        self._raise_if_failed()
        if planned.shard != self._shard:
            self._open_shard(planned.shard)

        self._taken = self._free.get()
        itemsize = planned.out_dtype.itemsize
        count = min(remaining, self._taken.numel() // itemsize)
        return self._taken[: count * itemsize].view(planned.out_dtype)

    def commit(self, planned: PlannedTensor, filled: torch.Tensor, ready=None) -> None:
        """Queue a filled destination for writing; `ready`, if given, is waited for first."""
        assert self._taken is not None and self._fd is not None
        data = filled.view(torch.uint8)
        self._pending.put(_Write(self._fd, data, self._taken, ready, tensor=planned.name))
        self._taken = None

    # Shards.

    def _open_shard(self, shard: int) -> None:
        self._finish_shard()
        self._shard = shard
        path = self.directory / self.plan.shard_names[shard]
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._open_fds.add(self._fd)
        self._paths[self._fd] = path

        entries = [(p.name, p.out_dtype, p.shape) for p in self.plan.shard_tensors(shard)]
        header = encode_header(entries, {"format": "pt"})
        self.header_checksums[self.plan.shard_names[shard]] = checksum(header)
        self._pending.put(_Write(self._fd, header))

    def _finish_shard(self) -> None:
        if self._fd is not None:
            self._pending.put(_Write(self._fd, b"", close=True))
            self._fd = None

    def close(self) -> None:
        """Write everything still queued, fsync and close the shards, write the index."""
        self._finish_shard()
        self._stop_thread()
        self._raise_if_failed()

        if self.index and len(self.plan.shard_names) > 1:
            write_index(self.directory, self.plan)

    def abort(self) -> None:
        """Stop after a failure elsewhere: drop queued writes, close files, keep the error."""
        self._error = self._error or _Aborted()
        self._stop_thread()
        for fd in self._open_fds:
            os.close(fd)
        self._open_fds.clear()

    def _stop_thread(self) -> None:
        self._pending.put(None)
        self._thread.join()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # The writer thread.

    def _drain(self) -> None:
        while (item := self._pending.get()) is not None:
            try:
                if self._error is None:
                    self._perform(item)
            except OSError as exc:  # a full disk, say: name the shard, os.write does not
                path = self._paths.get(item.fd)
                exc.strerror = f"{exc.strerror} while writing {path.name if path else 'a shard'}"
                self._error = exc
            except BaseException as exc:  # handed to the caller's thread, not lost
                self._error = exc
            finally:
                if item.staging is not None:
                    self._free.put(item.staging)

    def _perform(self, item: _Write) -> None:
        if item.close:
            os.fsync(item.fd)
            os.close(item.fd)
            self._open_fds.discard(item.fd)
            return

        if item.ready is not None:
            item.ready.synchronize()
        data = item.data if isinstance(item.data, bytes) else item.data.numpy()
        self._write_bytes(item.fd, memoryview(data).cast("B"))
        if item.tensor is not None:
            self.checksums[item.tensor] = checksum(data, self.checksums.get(item.tensor, 0))
        if self.on_bytes is not None and item.staging is not None:
            self.on_bytes(len(data))

    def _write_bytes(self, fd: int, view: memoryview) -> None:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])

    def _raise_if_failed(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise self._error


def write_index(directory: Path, plan: MergePlan) -> Path:
    """`model.safetensors.index.json` for a plan of several shards: which shard holds what."""
    index = {
        "metadata": {"total_size": plan.output_bytes},
        "weight_map": {p.name: plan.shard_names[p.shard] for p in plan.tensors},
    }
    path = directory / INDEX_FILE
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


class _Aborted(Exception):
    """Marks a writer stopped on purpose; queued writes are dropped, nothing is raised."""


class _Write:
    """One job for the writer thread: bytes to append to a shard, or closing it."""

    __slots__ = ("close", "data", "fd", "ready", "staging", "tensor")

    def __init__(
        self,
        fd: int,
        data: bytes | torch.Tensor,
        staging: torch.Tensor | None = None,
        ready=None,
        *,
        close: bool = False,
        tensor: str | None = None,
    ) -> None:
        self.fd = fd
        self.data = data
        self.staging = staging
        self.ready = ready
        self.close = close
        self.tensor = tensor
