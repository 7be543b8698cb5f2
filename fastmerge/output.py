"""The output directory as a transaction: built beside its destination, moved in when whole.

Everything is written into a hidden temporary sibling of the destination. Only when every
file is complete and fsynced is the temporary directory renamed onto the destination (with
--force, an earlier output is swapped out and removed only after that). A failure or an
interrupt at any point before leaves the destination as it was and removes the temporary
directory. The destination may not be, or lie inside, an input, and an input may not lie
inside a destination that --force would replace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

from .errors import OutputError

logger = logging.getLogger(__name__)

TEMP_MARKER = ".fastmerge-partial-"

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
        self, destination: str | os.PathLike[str], inputs: list[Path], *, force: bool = False
    ):
        self.destination = Path(destination)
        self.force = force
        self.inputs = inputs
        self.temporary: Path | None = None
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
        name = f".{self.destination.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
        self.temporary = self.destination.parent / name
        self.temporary.mkdir()
        return self.temporary

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None and self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None

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
        old = destination.parent / f".{destination.name}{TEMP_MARKER}old-{secrets.token_hex(4)}"
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
