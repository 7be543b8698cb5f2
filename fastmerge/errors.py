"""The errors fastmerge raises at its boundary.

Each one is meant to be shown to a person as it is: it names the file or tensor, says what
was expected and what was found, and suggests a fix. The CLI prints the message and exits
with code 2; it shows a traceback only under --debug.
"""

from __future__ import annotations


class FastmergeError(Exception):
    """Base class: a problem with the user's input or request, not a bug in fastmerge."""


class CheckpointError(FastmergeError):
    """An input checkpoint cannot be read: missing, unsupported, corrupt or unsafe."""


class PlanError(FastmergeError):
    """The two checkpoints cannot be merged as asked. Carries every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        heading = (
            "the models cannot be merged:"
            if count == 1
            else (f"the models cannot be merged ({count} problems):")
        )
        super().__init__("\n".join([heading, *(f"  - {p}" for p in self.problems)]))


class MergeError(FastmergeError):
    """The merge stopped on a value it cannot produce faithfully (non-finite, overflow)."""


class OutputError(FastmergeError):
    """The output location is unsafe or unavailable (exists, overlaps an input, in use)."""
