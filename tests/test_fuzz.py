"""Fuzzing the reader: random bytes, mutated valid files and hostile index files.

Every input either opens, with views that hold exactly the bytes the safetensors library
reads, or is refused with fastmerge's CheckpointError naming the file; never another
exception, never a hang (the hypothesis deadline), and never an allocation that grows with a
size claimed by the header instead of with the file (tracemalloc's peak stays O(file size)).

Budgets are hypothesis profiles registered in conftest.py: "ci" (the default, bounded) and
"long" (`pytest tests/test_fuzz.py --hypothesis-profile=long`). The cases that found bugs are
pinned as explicit examples or tests below, so that they run on every CI run.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastmerge.errors import CheckpointError
from fastmerge.reader import open_checkpoint
from fastmerge.safetensors_format import DTYPES, MAX_HEADER_BYTES

from .conftest import write_raw

U64_MAX = 2**64 - 1

ALLOCATION_PER_FILE_BYTE = 64
ALLOCATION_BASE = 1 << 20
"""Parsing may allocate Python objects for the JSON (tens of bytes per byte of header), but
nothing proportional to a size the header claims: a 2^40-byte claim would blow this at once."""

LIBRARY_ONLY_REASONS = ("unknown dtype", "duplicate key")
"""Files the safetensors library reads but fastmerge refuses on purpose: dtypes SLERP has no
use for, and headers naming a tensor twice (the library keeps the last one silently)."""

fuzz_settings = settings(suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# Reading a file both ways.


def _library_bytes(path: Path) -> dict[str, bytes] | Exception:
    """Each tensor's bytes as the safetensors library reads them, or its error."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as handle:
            return {
                name: handle.get_tensor(name).reshape(-1).view(torch.uint8).numpy().tobytes()
                for name in handle.keys()  # noqa: SIM118 (safe_open is not a mapping)
            }
    except Exception as exc:  # the library's own errors: anything it refuses counts
        return exc


def _open_traced(path: Path):
    """open_checkpoint's result (a Checkpoint or the CheckpointError) and its peak allocation."""
    tracemalloc.start()
    try:
        try:
            result = open_checkpoint(path)
        except CheckpointError as exc:
            result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def check_file(path: Path) -> None:
    """The property every fuzzed file must satisfy (see the module docstring)."""
    size = path.stat().st_size
    result, peak = _open_traced(path)
    assert peak <= ALLOCATION_PER_FILE_BYTE * size + ALLOCATION_BASE, (
        f"opening a {size}-byte file allocated {peak} bytes"
    )

    library = _library_bytes(path)
    if isinstance(result, CheckpointError):
        assert str(path) in str(result), f"the message does not name the file: {result}"
        if not isinstance(library, Exception):
            assert any(reason in str(result) for reason in LIBRARY_ONLY_REASONS), (
                f"fastmerge refused a file the safetensors library reads: {result}"
            )
        return

    with result as checkpoint:
        assert not isinstance(library, Exception), (
            f"fastmerge opened a file the safetensors library refuses ({library}); "
            f"tensors {list(checkpoint.tensors)}"
        )
        ours = {
            name: checkpoint.view(name).reshape(-1).view(torch.uint8).numpy().tobytes()
            for name in checkpoint.tensors
        }
    assert ours == library


# Valid files, built by hand so that every field can be chosen.

names = st.text(max_size=6)
dtype_names = st.sampled_from(sorted(DTYPES))
shapes = st.lists(st.integers(0, 4), max_size=3)


@st.composite
def valid_files(draw) -> tuple[dict, bytes]:
    """A header (as a dict) and data buffer that the safetensors library accepts."""
    entries = draw(st.dictionaries(names, st.tuples(dtype_names, shapes), max_size=4))
    order = draw(st.permutations(list(entries)))
    header: dict[str, object] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(names, names, max_size=3))

    data = b""
    for name in order:
        dtype, shape = entries[name]
        count = 1
        for d in shape:
            count *= d
        nbytes = count * DTYPES[dtype].itemsize
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + nbytes],
        }
        data += draw(st.binary(min_size=nbytes, max_size=nbytes))
    return header, data


def _encode(header: dict | bytes, padding: int = 0) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * padding
    return struct.pack("<Q", len(raw)) + raw


# Values a hostile header puts where numbers, strings or objects belong. Raw JSON text, so that
# literals Python's json would never write (NaN, 1e400, 5000-digit numbers) are included.

RAW_VALUES = [
    b"-1",
    b"0",
    b"1",
    b"1.0",
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    str(2**63).encode(),
    str(U64_MAX).encode(),
    str(2**64).encode(),
    str(2**200).encode(),
    b"9" * 4000,
    b"9" * 5000,
    b"true",
    b"null",
    b'""',
    b'"F32"',
    b'"\\ud800"',
    b"[]",
    b"{}",
    b"[0, 0, 0]",
    b"[4294967296, 4294967296]",
    b"[18446744073709551615, 2]",
    b"[0, 18446744073709551615, 18446744073709551615]",
    b"[" + b", ".join([b"9" * 4000] * 200) + b"]",
    b"[[[[[[[[]]]]]]]]",
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a": 1}',
]

raw_values = st.one_of(
    st.sampled_from(RAW_VALUES),
    st.integers(-(2**70), 2**70).map(lambda i: str(i).encode()),
    st.lists(st.integers(0, 2**66), max_size=4).map(lambda v: json.dumps(v).encode()),
    names.map(lambda s: json.dumps(s).encode()),
)

PLACEHOLDER = "\u0000fastmerge-fuzz\u0000"


@st.composite
def mutated_headers(draw) -> bytes:
    """A valid file whose header has one field replaced by a hostile raw JSON value."""
    header, data = draw(valid_files())
    tensors = [name for name in header if name != "__metadata__"]
    targets = ["header", "metadata", "metadata-value"]
    if tensors:
        targets += ["entry", "dtype", "shape", "data_offsets", "offset", "dimension", "extra"]
    target = draw(st.sampled_from(targets))
    name = draw(st.sampled_from(tensors)) if tensors else None

    if target == "header":
        header = PLACEHOLDER  # the whole document
    elif target == "metadata":
        header["__metadata__"] = PLACEHOLDER
    elif target == "metadata-value":
        header["__metadata__"] = {"format": PLACEHOLDER}
    elif target == "entry":
        header[name] = PLACEHOLDER
    elif target == "extra":
        header[name]["extra"] = PLACEHOLDER
    elif target == "offset":
        header[name]["data_offsets"][draw(st.integers(0, 1))] = PLACEHOLDER
    elif target == "dimension":
        shape = header[name]["shape"]
        if shape:
            shape[draw(st.integers(0, len(shape) - 1))] = PLACEHOLDER
        else:
            header[name]["shape"] = [PLACEHOLDER]
    else:
        header[name][target] = PLACEHOLDER

    text = json.dumps(header).encode().replace(json.dumps(PLACEHOLDER).encode(), draw(raw_values))
    return _encode(text) + data


@st.composite
def layout_mutations(draw) -> bytes:
    """A valid file whose tensors are moved: offsets overlapping, out of range, gaps, swaps."""
    header, data = draw(valid_files())
    tensors = [name for name in header if name != "__metadata__"]
    if tensors:
        name = draw(st.sampled_from(tensors))
        begin = draw(st.integers(0, len(data) + 16))
        end = draw(st.one_of(st.integers(0, len(data) + 16), st.just(begin)))
        header[name]["data_offsets"] = [begin, end]
        if draw(st.booleans()):
            other = draw(st.sampled_from(tensors))
            header[name]["shape"] = header[other]["shape"]
    data += draw(st.binary(max_size=8)) if draw(st.booleans()) else b""
    return _encode(header) + data


@st.composite
def byte_mutations(draw) -> bytes:
    """A valid file with raw byte damage: flips, cuts, insertions, a new header length."""
    header, data = draw(valid_files())
    raw = bytearray(_encode(header, padding=draw(st.integers(0, 7))) + data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif kind == "length" and len(raw) >= 8:
            length = draw(
                st.one_of(
                    st.sampled_from([0, 1, U64_MAX, U64_MAX - 7, 2**63, MAX_HEADER_BYTES + 1]),
                    st.integers(0, len(raw) + 8),
                    st.integers(0, U64_MAX),
                )
            )
            raw[:8] = struct.pack("<Q", length)
    return bytes(raw)


def _write(workdir: Path, raw: bytes) -> Path:
    path = workdir / "fuzzed.safetensors"
    path.write_bytes(raw)
    return path


@fuzz_settings
@given(st.binary(max_size=512))
@example(b"")
@example(struct.pack("<Q", U64_MAX))
def test_random_bytes(workdir, raw):
    check_file(_write(workdir, raw))


@fuzz_settings
@given(st.one_of(st.binary(max_size=256), st.text(max_size=128).map(str.encode)))
@example(b"[" * 100_000)
@example(b'{"a": NaN}')
@example(b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}')
def test_random_headers(workdir, text):
    check_file(_write(workdir, _encode(text) + b"\0" * 16))


@fuzz_settings
@given(valid_files())
def test_valid_files_match_the_library(workdir, file):
    header, data = file
    check_file(_write(workdir, _encode(header) + data))


@fuzz_settings
@given(mutated_headers())
def test_mutated_header_values(workdir, raw):
    check_file(_write(workdir, raw))


@fuzz_settings
@given(layout_mutations())
def test_mutated_layouts(workdir, raw):
    check_file(_write(workdir, raw))


@fuzz_settings
@given(byte_mutations())
def test_byte_level_damage(workdir, raw):
    check_file(_write(workdir, raw))


# Index files: the weight map names the shards, and a hostile one points elsewhere.


@pytest.fixture(scope="module")
def model_dir(workdir: Path) -> Path:
    """A model directory with one good shard, plus things an index must not reach."""
    root = workdir / "indexed"
    model = root / "model"
    (model / "sub").mkdir(parents=True)
    write_raw(root / "outside.safetensors", {"w": _entry("U8", [1], [0, 1])}, b"o")
    write_raw(model / "a.safetensors", {"w": _entry("U8", [1], [0, 1])}, b"a")
    (model / "link.safetensors").symlink_to(root / "outside.safetensors")
    (model / "loop.safetensors").symlink_to(model / "loop.safetensors")
    (model / "dangling.safetensors").symlink_to(root / "nowhere.safetensors")
    (model / "notes.txt").write_text("not a checkpoint")
    return model


def _entry(dtype: str, shape: list[int], offsets: list[int]) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


SHARD_NAMES = [
    "a.safetensors",
    "../outside.safetensors",
    "sub/../../outside.safetensors",
    "sub/../a.safetensors",
    "./a.safetensors",
    "link.safetensors",
    "loop.safetensors",
    "dangling.safetensors",
    "sub",
    "",
    ".",
    "..",
    "a\0.safetensors",
    "x" * 300,
    "/".join(["x" * 200] * 30),
    "model.safetensors.index.json",
    "config.json",
    "notes.txt",
]


@st.composite
def index_documents(draw, outside: str) -> bytes:
    shard_names = st.one_of(st.sampled_from([*SHARD_NAMES, outside]), st.text(max_size=12))
    tensor_names = st.one_of(st.just("w"), names)
    document = draw(
        st.one_of(
            st.fixed_dictionaries(
                {"weight_map": st.dictionaries(tensor_names, shard_names, max_size=3)},
                optional={"metadata": st.just({"total_size": 1})},
            ),
            st.recursive(
                st.none() | st.booleans() | st.integers() | names,
                lambda inner: (
                    st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3)
                ),
                max_leaves=8,
            ),
        )
    )
    raw = json.dumps(document).encode()
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.sampled_from([b"[" * 100_000, b"\xff\xfe", raw[: len(raw) // 2], b"NaN"]))
    return raw


CONFIGS = [b'{"model_type": "llama"}', b"[" * 100_000, b"\xff", b"{", b"[]", b'{"a": NaN}']


@fuzz_settings
@given(st.data())
def test_index_files(model_dir, data):
    outside = str(model_dir.parent / "outside.safetensors")
    index = model_dir / "model.safetensors.index.json"
    index.write_bytes(data.draw(index_documents(outside)))
    config = model_dir / "config.json"
    config.unlink(missing_ok=True)
    if data.draw(st.booleans()):
        config.write_bytes(data.draw(st.sampled_from(CONFIGS)))

    try:
        checkpoint = open_checkpoint(model_dir)
    except CheckpointError as exc:
        assert str(model_dir) in str(exc), exc
        return
    with checkpoint:
        for file in checkpoint.files:
            assert file.path.resolve().parent == model_dir.resolve(), file.path
            assert file.path.resolve() != (model_dir.parent / "outside.safetensors")
        assert set(checkpoint.tensors) <= {"w"}
        assert all(checkpoint.view(name).tolist() == [ord("a")] for name in checkpoint.tensors)


# Bugs the fuzzer found, pinned as plain tests so that each runs on every CI run.


def test_deeply_nested_header_is_a_checkpoint_error(workdir):
    path = _write(workdir, _encode(b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    with pytest.raises(CheckpointError, match="nested too deeply"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "shape",
    [[2**32, 2**32], [U64_MAX, 2], [2**64], [0, 2**64], [10**300] * 20_000],
    ids=["2^64-elements", "u64-max-times-2", "2^64-dimension", "zero-then-2^64", "10^300^20000"],
)
def test_enormous_shapes_are_refused_quickly(workdir, shape):
    header = {"w": _entry("U8", shape, [0, 0])}
    with pytest.raises(CheckpointError, match=r"element count of shape .* overflows 64 bits"):
        open_checkpoint(_write(workdir, _encode(header)))


@pytest.mark.parametrize(
    "shape", [[0, U64_MAX, U64_MAX], [0, 2**63], [0, 2**62, 2**62], [2**62, 0, 2**62, 4]]
)
def test_empty_tensors_with_sizes_torch_cannot_hold_are_refused(workdir, shape):
    # Found by the "long" profile: the element count is 0, but torch's int64 sizes or strides
    # overflow, so a view (and the safetensors library's own get_tensor) would fail.
    header = {"w": _entry("BF16", shape, [0, 0])}
    with pytest.raises(CheckpointError, match=r"has sizes beyond torch's 64-bit limit"):
        open_checkpoint(_write(workdir, _encode(header)))


def test_json_literals_python_accepts_and_the_format_does_not(workdir):
    for literal in (b"NaN", b"Infinity", b"1e400"):
        raw = b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + literal + b"}}"
        with pytest.raises(CheckpointError, match="not valid JSON"):
            open_checkpoint(_write(workdir, _encode(raw) + b"a"))


def test_unhashable_dtype_is_a_checkpoint_error(workdir):
    header = {"w": _entry(["F32"], [1], [0, 4])}  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"unknown dtype \['F32'\]"):
        open_checkpoint(_write(workdir, _encode(header) + b"\0" * 4))


def test_unpaired_surrogate_in_a_name_is_refused(workdir):
    raw = b'{"w\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    with pytest.raises(CheckpointError, match="not valid Unicode"):
        open_checkpoint(_write(workdir, _encode(raw) + b"a"))


@pytest.mark.parametrize("metadata", [[], 0, "", False])
def test_metadata_must_be_an_object_or_null(workdir, metadata):
    with pytest.raises(CheckpointError, match="__metadata__ must map strings"):
        open_checkpoint(_write(workdir, _encode({"__metadata__": metadata})))
    assert open_checkpoint(_write(workdir, _encode({"__metadata__": None}))).tensors == {}


@pytest.mark.parametrize(
    ("offsets", "data", "message"),
    [
        ([1, 2], b"xx", r"bytes 0-1 of the data buffer belong to no tensor"),
        ([0, 1], b"xx", r"bytes 1-2 of the data buffer belong to no tensor"),
    ],
    ids=["gap-before", "bytes-after"],
)
def test_data_not_covered_by_tensors_is_refused(workdir, offsets, data, message):
    path = _write(workdir, _encode({"w": _entry("U8", [1], offsets)}) + data)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "shard", ["a\0.safetensors", "loop.safetensors", "/".join(["x" * 200] * 30)]
)
def test_index_names_that_break_path_handling_are_refused(model_dir, shard):
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": shard}})
    )
    (model_dir / "config.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=str(model_dir)):
        open_checkpoint(model_dir)


def test_deeply_nested_index_and_config_are_checkpoint_errors(model_dir):
    index = model_dir / "model.safetensors.index.json"
    index.write_bytes(b"[" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        open_checkpoint(model_dir)

    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    (model_dir / "config.json").write_bytes(b"[" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        open_checkpoint(model_dir)
    os.unlink(model_dir / "config.json")
