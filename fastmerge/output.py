"""The output directory as a transaction: built beside its destination, moved in when whole.

Everything is written into a hidden temporary sibling of the destination. Only when every
file is complete and fsynced is the temporary directory renamed onto the destination (with
--force, an earlier output is swapped out and removed only after that). A failure or an
interrupt at any point before leaves the destination as it was and removes the temporary
directory. The destination may not be, or lie inside, an input, and an input may not lie
inside a destination that --force would replace.

A process killed outright (SIGKILL, a power cut) cannot clean up, so each transaction holds an
advisory lock (flock) on a lock file beside the destination, `.NAME.fastmerge-lock`, from
before its temporary directory exists until after the rename. The kernel drops the lock when
the process dies. A second merge into the same destination therefore finds the lock taken and
refuses; one that gets the lock knows that any `.NAME.fastmerge-partial-*` directory left
beside the destination belongs to a merge that died, and removes it (restoring an earlier
output first, if a kill fell between the two renames of a swap without renameat2).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

from .errors import OutputError

logger = logging.getLogger(__name__)

TEMP_MARKER = ".fastmerge-partial-"
LOCK_SUFFIX = ".fastmerge-lock"
_PREVIOUS = "old-"
"""Temporary name of an earlier output during a swap without renameat2: `TEMP_MARKER` + this."""

COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied from the base model: tokenizer, chat template and generation defaults."""


def _overlaps(inner: Path, outer: Path) -> bool:
    return inner == outer or inner.is_relative_to(outer)


class OutputTransaction:
    """Context manager giving a temporary directory that becomes `destination` on commit.

    `inputs` are the paths the merge reads: model directories, or single files.
    """

    def __init__(
        self,
        destination: str | os.PathLike[str],
        inputs: list[Path],
        *,
        force: bool = False,
        needed_bytes: int = 0,
    ):
        self.destination = Path(destination)
        self.force = force
        self.inputs = inputs
        self.needed_bytes = needed_bytes
        self.temporary: Path | None = None
        self._lock: DestinationLock | None = None
        self._check_destination()

    def _check_destination(self) -> None:
        target = self.destination.resolve()
        for source in self.inputs:
            resolved = source.resolve()
            if _overlaps(target, resolved):
                raise OutputError(
                    f"output {self.destination} is inside the input {source}; writing there could "
                    "damage the input: choose an output directory outside both models"
                )
            if self.destination.exists() and _overlaps(resolved, target):
                raise OutputError(
                    f"input {source} lies inside the existing output {self.destination}, which "
                    "--force would replace: choose another output directory"
                )

        if self.destination.exists() or self.destination.is_symlink():
            if not self.destination.is_dir() or self.destination.is_symlink():
                raise OutputError(
                    f"output {self.destination} exists and is not a directory; remove it or "
                    "choose another output path"
                )
            if not self.force:
                raise OutputError(
                    f"output {self.destination} already exists; pass --force to replace it "
                    "(it is replaced only once the new merge is complete)"
                )
        if not self.destination.parent.is_dir():
            raise OutputError(
                f"the parent directory of the output, {self.destination.parent}, does not "
                "exist; create it first"
            )

    def __enter__(self) -> Path:
        self._lock = DestinationLock.acquire(self.destination)
        try:
            recover_interrupted(self.destination)
            self._check_destination()  # again: recovery may have put an earlier output back
            _check_free_space(self.destination, self.needed_bytes)
            name = f".{self.destination.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
            self.temporary = self.destination.parent / name
            self.temporary.mkdir()
        except BaseException:
            self._lock.release()
            raise
        return self.temporary

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is not None and self.temporary is not None:
                shutil.rmtree(self.temporary, ignore_errors=True)
                self.temporary = None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

        if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:
            exc.strerror = (
                f"{exc.strerror}; the merge stopped and {self.destination} was left as it "
                "was: free some space (or raise the file size limit) and run again"
            )

    def commit(self) -> None:
        """fsync everything and move the finished directory into place."""
        assert self.temporary is not None
        for path in self.temporary.iterdir():
            _fsync(path)
        _fsync(self.temporary)

        if self.destination.exists():
            if not self.force:
                raise OutputError(
                    f"output {self.destination} appeared while merging; it was left alone, "
                    "pass --force to replace it"
                )
            _swap_into_place(self.temporary, self.destination)
        else:
            os.rename(self.temporary, self.destination)
        _fsync(self.destination.parent)
        self.temporary = None


_OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _check_free_space(destination: Path, needed: int) -> None:
    usage = shutil.disk_usage(destination.parent)
    if usage.total and usage.free < needed:  # pseudo file systems report a total of 0
        raise OutputError(
            f"the output needs {needed:,} bytes but the file system holding "
            f"{destination.parent} has {usage.free:,} free; free some space or choose an "
            "output directory on another disk"
        )


class DestinationLock:
    """An exclusive flock on `.NAME.fastmerge-lock` beside a destination; never waits."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, destination: Path) -> DestinationLock:
        path = destination.parent / f".{destination.name}{LOCK_SUFFIX}"
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot create the lock file {path} beside the output ({exc.strerror}); "
                    "the output's parent directory must be writable"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _read_owner(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputError(f"cannot lock {path} ({exc.strerror})") from None
                raise OutputError(
                    f"another fastmerge{owner} is writing the output {destination}; two merges "
                    "into one directory would overwrite each other: wait for it to finish, or "
                    "choose another output directory"
                ) from None

            # The holder before us may have removed the file after we opened it: then our
            # lock is on a name nobody else sees, and we must lock the file that is there now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(path, fd)
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file while still holding the lock, then let go of it."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _read_owner(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (process {pid})"
    return ""


def recover_interrupted(destination: Path) -> list[Path]:
    """Remove what killed merges into `destination` left beside it; the caller holds the lock.

    An earlier output parked under a temporary name by a swap that did not finish is moved
    back first, so that a kill never costs the user the output they had.
    """
    prefix = f".{destination.name}{TEMP_MARKER}"
    leftovers = sorted(
        p for p in destination.parent.iterdir() if p.name.startswith(prefix) and p.name != prefix
    )
    previous = [p for p in leftovers if p.name.startswith(prefix + _PREVIOUS)]
    if previous and not destination.exists() and not destination.is_symlink():
        os.rename(previous[0], destination)
        logger.warning(
            "restored %s from %s, where a merge killed while replacing it had left it",
            destination,
            previous[0].name,
        )
        leftovers.remove(previous[0])

    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        logger.warning(
            "removed %s, left by a merge into %s that was killed before it finished",
            path,
            destination,
        )
    return leftovers


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def _swap_into_place(new: Path, destination: Path) -> None:
    """Replace `destination` by `new` atomically where the OS allows it, then drop the old."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = (
        getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    )
    at_cwd = -100

    if (
        renameat2 is not None
        and renameat2(at_cwd, os.fsencode(new), at_cwd, os.fsencode(destination), _RENAME_EXCHANGE)
        == 0
    ):
        old = new  # after the exchange the temporary name holds the old output
    else:
        old = destination.parent / (
            f".{destination.name}{TEMP_MARKER}{_PREVIOUS}{secrets.token_hex(4)}"
        )
        os.rename(destination, old)
        os.rename(new, destination)
    shutil.rmtree(old)


def copy_companions(base_directory: Path, into: Path) -> list[str]:
    """Copy the base model's tokenizer, chat template and generation config files."""
    copied = []
    for name in COMPANION_FILES:
        source = base_directory / name
        if source.is_file():
            shutil.copyfile(source, into / name)
            copied.append(name)
    return copied


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
