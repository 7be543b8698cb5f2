"""Injected faults: merges killed at random points, a full disk, inputs changed mid-merge, and
two merges into one output. Whatever happens, the output is absent, the previous complete one
or the new complete one, byte for byte, and the next run cleans up what a killed one left.

Merges that are killed or starved run in a child process (`python -m fastmerge` or a short
driver script), so that the test process survives them. FASTMERGE_FAULT_KILLS sets how many
random kills run (default 6; the long run on demand uses more).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fastmerge
from fastmerge.cli import EXIT_BAD_INPUT, app
from fastmerge.output import LOCK_SUFFIX, TEMP_MARKER
from fastmerge.synthetic import ModelShape, write_pair

from .conftest import copy_model

KILLS = int(os.environ.get("FASTMERGE_FAULT_KILLS", "6"))

MEDIUM = ModelShape(
    layers=4, hidden=512, intermediate=1408, heads=8, kv_heads=4, vocab=8192, tied=True
)
"""16M parameters in two shards: a merge long enough (a tenth of a second) to be killed inside."""
SHARD_SIZE = "12MB"


@pytest.fixture(scope="module")
def medium_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("medium"), MEDIUM, shards=2)


def snapshot(directory: Path) -> dict[str, bytes] | None:
    """Every file of an output directory and its bytes; None when there is no directory."""
    if not directory.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(out: Path) -> list[str]:
    return sorted(
        p.name
        for p in out.parent.iterdir()
        if p.name.startswith(f".{out.name}{TEMP_MARKER}") or p.name == f".{out.name}{LOCK_SUFFIX}"
    )


def merge_command(a: Path, b: Path, out: Path, t: float, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "fastmerge", "slerp", str(a), str(b), "-o", str(out),
        "--t", str(t), "--shard-size", SHARD_SIZE, "--quiet", *extra,
    ]  # fmt: skip


def reference(a: Path, b: Path, out: Path, t: float) -> dict[str, bytes]:
    fastmerge.merge(a, b, out, t, shard_size=12_000_000)
    return snapshot(out)


def run_driver(script: str, *args: object, **kwargs) -> subprocess.CompletedProcess:
    """Run a Python snippet in a child; it gets its arguments as sys.argv[1:]."""
    command = [sys.executable, "-c", textwrap.dedent(script), *(str(a) for a in args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


# Kills.


def _wait_for_temporary(out: Path, process: subprocess.Popen) -> bool:
    """Poll until the merge's temporary directory exists (the merge proper has begun)."""
    while process.poll() is None:
        if any(TEMP_MARKER in name for name in leftovers(out)):
            return True
        time.sleep(0.001)
    return False


def test_sigkill_at_random_points_leaves_old_or_new_output(medium_pair, tmp_path, caplog):
    a, b = medium_pair
    previous = reference(a, b, tmp_path / "previous", 0.2)
    new = reference(a, b, tmp_path / "new", 0.6)

    # One uninterrupted child first, to learn how long the merge proper takes here: from its
    # temporary directory appearing to the output appearing.
    out = tmp_path / "out"
    process = subprocess.Popen(merge_command(a, b, out, 0.6))
    assert _wait_for_temporary(out, process)
    started = time.monotonic()
    while not out.exists() and process.poll() is None:
        time.sleep(0.001)
    duration = time.monotonic() - started
    assert process.wait(timeout=120) == 0
    assert snapshot(out) == new and leftovers(out) == []

    seed = random.randrange(2**32)
    chooser = random.Random(seed)
    outcomes = []
    for attempt in range(KILLS):
        out = tmp_path / f"kill-{attempt}"
        replacing = attempt % 2 == 1  # every other run replaces an earlier output (--force)
        if replacing:
            fastmerge.merge(a, b, out, 0.2, shard_size=12_000_000)
        process = subprocess.Popen(merge_command(a, b, out, 0.6, "--force"))
        began = _wait_for_temporary(out, process)
        time.sleep(chooser.uniform(0, duration * 1.2))
        process.send_signal(signal.SIGKILL)
        code = process.wait(timeout=120)

        after = snapshot(out)
        allowed = [new, previous] if replacing else [new, None]
        context = f"seed {seed}, attempt {attempt}, exit {code}, files {leftovers(out)}"
        assert began, context
        assert after in allowed, context
        state = "new" if after == new else "previous" if after == previous else "none"
        outcomes.append(f"{state} ({len(leftovers(out))} left)")

        # The next run into the same output recognises and removes what the killed one left.
        left = [name for name in leftovers(out) if TEMP_MARKER in name]
        with caplog.at_level(logging.WARNING, logger="fastmerge.output"):
            caplog.clear()
            fastmerge.merge(a, b, out, 0.6, force=True, shard_size=12_000_000)
        assert snapshot(out) == new and leftovers(out) == [], context
        for name in left:
            assert any(name in message for message in caplog.messages), (context, name)

    print(f"kills (seed {seed}): {outcomes}")


KILL_POINTS = {
    # After a few shard writes: the output does not exist yet.
    "mid-write": """
        from fastmerge.writer import ShardWriter
        original, calls = ShardWriter._write_bytes, [0]
        def write(self, fd, view):
            calls[0] += 1
            if calls[0] == 5:
                kill()
            original(self, fd, view)
        ShardWriter._write_bytes = write
    """,
    # Everything written and fsynced, just before the rename.
    "before-commit": """
        from fastmerge.output import OutputTransaction
        OutputTransaction.commit = lambda self: kill()
    """,
    # Between the two renames of a swap without renameat2: the old output is parked aside.
    "between-renames": """
        import ctypes.util, os
        ctypes.util.find_library = lambda name: None
        rename, calls = os.rename, [0]
        def parked(source, target):
            rename(source, target)
            calls[0] += 1
            if calls[0] == 1:
                kill()
        os.rename = parked
    """,
    # After the atomic exchange, while the old output is removed.
    "removing-old": """
        import shutil
        shutil.rmtree = lambda path, *args, **kwargs: kill()
    """,
}

DRIVER = """
import os, signal, sys
import fastmerge.merge
from fastmerge.cli import main
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
{patch}
sys.argv = ["fastmerge", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_each_step_of_the_commit(tiny_pair, tmp_path, point, caplog):
    a, b = tiny_pair
    out = tmp_path / "out"
    fastmerge.merge(a, b, out, 0.2)
    previous = snapshot(out)
    fastmerge.merge(a, b, tmp_path / "new", 0.6)
    new = snapshot(tmp_path / "new")

    driver = DRIVER.format(patch=textwrap.dedent(KILL_POINTS[point]))
    args = merge_command(a, b, out, 0.6, "--force")[3:]
    completed = run_driver(driver, *args)
    assert completed.returncode == -signal.SIGKILL, completed.stderr

    expected = new if point == "removing-old" else previous
    if point == "between-renames":
        assert snapshot(out) is None  # the kill fell where no output is in place
    else:
        assert snapshot(out) == expected
    left = [name for name in leftovers(out) if TEMP_MARKER in name]
    assert left, "a killed merge leaves its temporary directory behind"

    fastmerge.merge(a, b, tmp_path / "unrelated", 0.6)  # other outputs' leftovers are kept
    assert [name for name in leftovers(out) if TEMP_MARKER in name] == left

    with caplog.at_level(logging.WARNING, logger="fastmerge.output"):
        fastmerge.merge(a, b, out, 0.6, force=True)
    assert snapshot(out) == new and leftovers(out) == []
    for name in left:
        assert any(name in m and "killed" in m for m in caplog.messages), (name, caplog.messages)
    if point == "between-renames":
        assert any("restored" in m for m in caplog.messages), caplog.messages


def app_run(args: list[str]):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, args)


def test_an_output_parked_by_a_killed_swap_is_restored_before_anything_else(tiny_pair, tmp_path):
    a, b = tiny_pair
    out = tmp_path / "out"
    fastmerge.merge(a, b, out, 0.2)
    previous = snapshot(out)

    driver = DRIVER.format(patch=textwrap.dedent(KILL_POINTS["between-renames"]))
    completed = run_driver(driver, *merge_command(a, b, out, 0.6, "--force")[3:])
    assert completed.returncode == -signal.SIGKILL, completed.stderr
    assert snapshot(out) is None

    # Without --force the next run puts the earlier output back, then refuses to replace it.
    result = app_run(["slerp", str(a), str(b), "-o", str(out)])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "already exists; pass --force" in " ".join(result.stderr.split())
    assert snapshot(out) == previous and leftovers(out) == []


# A full disk.


def _file_size_limit(limit: int):
    def apply() -> None:
        # write() past the limit then fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("replacing", [False, True], ids=["new-output", "replacing"])
def test_a_full_disk_gives_a_clear_error_and_no_partial_output(tiny_pair, tmp_path, replacing):
    a, b = tiny_pair
    out = tmp_path / "out"
    if replacing:
        fastmerge.merge(a, b, out, 0.2)
    before = snapshot(out)

    completed = subprocess.run(
        [sys.executable, "-m", "fastmerge", "slerp", str(a), str(b), "-o", str(out),
         "--force", "--quiet"],
        capture_output=True, text=True, timeout=120, preexec_fn=_file_size_limit(100_000),
    )  # fmt: skip
    assert completed.returncode == 1, completed.stderr
    message = " ".join(completed.stderr.split())
    assert message.startswith("error: File too large while writing model.safetensors"), message
    assert f"the merge stopped and {out} was left as it was" in message
    assert "free some space (or raise the file size limit)" in message
    assert "Traceback" not in completed.stderr
    assert snapshot(out) == before and leftovers(out) == []


def test_too_little_free_space_is_refused_before_writing(tiny_pair, tmp_path, monkeypatch):
    import shutil

    a, b = tiny_pair
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    result = app_run(["slerp", str(a), str(b), "-o", str(tmp_path / "out")])
    assert result.exit_code == EXIT_BAD_INPUT
    message = " ".join(result.stderr.split())
    monkeypatch.undo()
    needed = fastmerge.merge(a, b, tmp_path / "measure", 0.5).bytes_written
    assert f"the output needs {needed:,} bytes but the file system holding" in message
    assert "has 1,000 free" in message
    assert snapshot(tmp_path / "out") is None and leftovers(tmp_path / "out") == []


# Inputs changed during a merge.

CHANGE_DRIVER = """
import json, os, sys
import fastmerge
a, b, out, mode = sys.argv[1:]
shard = os.path.join(b, "model.safetensors")
size = os.path.getsize(shard)
done = []

def change(written, total):
    # The writer reports its first bytes while the engine is a few tensors in; the change
    # touches only the last tensor's bytes, which nothing has read yet.
    if done:
        return
    done.append(1)
    if mode == "truncate":
        os.truncate(shard, size - 64)
    elif mode == "rewrite":
        with open(shard, "r+b") as handle:
            handle.seek(size - 64)
            handle.write(bytes(64))
    elif mode == "replace":
        with open(shard, "rb") as handle:
            data = handle.read()
        with open(shard + ".new", "wb") as handle:
            handle.write(data)
        os.replace(shard + ".new", shard)

try:
    fastmerge.merge(a, b, out, 0.6, on_progress=change)
    print(json.dumps({"error": None}))
except fastmerge.FastmergeError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""


@pytest.mark.parametrize(
    ("mode", "difference"),
    [
        ("truncate", "its size went from {size} to {cut} bytes"),
        ("rewrite", "it was modified"),
        ("replace", "it was replaced by another file"),
    ],
)
def test_an_input_changed_during_the_merge_is_refused(tiny_pair, tmp_path, mode, difference):
    a, b = tiny_pair
    changed = copy_model(b, tmp_path / "b")
    size = (changed / "model.safetensors").stat().st_size
    difference = difference.format(size=size, cut=size - 64)
    out = tmp_path / "out"
    completed = run_driver(CHANGE_DRIVER, a, changed, out, mode)
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout)
    assert outcome["error"] == "CheckpointError", outcome
    assert outcome["message"].startswith(
        f"{changed / 'model.safetensors'}: this input changed during the merge ({difference})"
    ), outcome["message"]
    assert "nothing was written" in outcome["message"]
    assert snapshot(out) is None and leftovers(out) == []


def test_a_change_after_the_last_read_still_stops_the_commit(tiny_pair, tmp_path, monkeypatch):
    merge_module = importlib.import_module("fastmerge.merge")  # fastmerge.merge is the function
    a, b = tiny_pair
    changed = copy_model(b, tmp_path / "b")
    original = merge_module._write_companions

    def then_touch(*args, **kwargs):
        original(*args, **kwargs)
        os.utime(changed / "model.safetensors", ns=(1, 1))

    monkeypatch.setattr(merge_module, "_write_companions", then_touch)
    with pytest.raises(fastmerge.CheckpointError, match=r"changed during the merge \(it was mod"):
        fastmerge.merge(a, changed, tmp_path / "out", 0.6)
    assert snapshot(tmp_path / "out") is None and leftovers(tmp_path / "out") == []


# Two merges into one output.

PAUSED_DRIVER = """
import os, sys, time
from pathlib import Path
from fastmerge.writer import ShardWriter
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
original = ShardWriter._write_bytes
def write(self, fd, view):
    original(self, fd, view)
    if not ready.exists():
        ready.touch()
        while not go.exists():
            time.sleep(0.01)
ShardWriter._write_bytes = write
from fastmerge.cli import main
sys.argv = ["fastmerge", *sys.argv[3:]]
main()
"""


def test_a_second_merge_into_the_same_output_refuses(tiny_pair, tmp_path):
    a, b = tiny_pair
    out = tmp_path / "out"
    new = reference(a, b, tmp_path / "new", 0.6)
    ready, go = tmp_path / "ready", tmp_path / "go"

    args = merge_command(a, b, out, 0.6)[3:]
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_DRIVER, str(ready), str(go), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.01)

        # The first merge is paused inside its transaction: a second one refuses, by name.
        for force in ([], ["--force"]):
            result = app_run(["slerp", str(a), str(b), "-o", str(out), "--t", "0.6", *force])
            assert result.exit_code == EXIT_BAD_INPUT, result.output
            message = " ".join(result.stderr.split())
            assert f"another fastmerge (process {first.pid}) is writing the output {out}" in (
                message
            )
            assert "wait for it to finish, or choose another output directory" in message

        # Another output in the same directory is not blocked.
        fastmerge.merge(a, b, tmp_path / "elsewhere", 0.6, shard_size=12_000_000)
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert snapshot(out) == new and leftovers(out) == []
