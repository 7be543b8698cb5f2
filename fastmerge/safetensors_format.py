"""The safetensors file format: dtype table, header parsing with validation, header encoding.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data buffer) plus an optional "__metadata__" map of strings. fastmerge reads
headers itself so that it can refuse a damaged file with a precise message before any output
is written, and so that nothing larger than the file is ever allocated on its behalf: every
size in a header is checked against the file before it is used.

fastmerge accepts a file only if the safetensors library (which transformers loads with)
accepts it too: the same JSON dialect (no NaN or Infinity, no out-of-range numbers, no
unpaired surrogates), element counts that fit 64 bits, and tensors that cover the data buffer
exactly. It refuses two kinds of file the library reads: a tensor named twice (the library
silently keeps one) and dtypes that fastmerge has no use for. tests/test_fuzz.py holds it to
that, on random and damaged files.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys
from dataclasses import dataclass

import torch

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The same bound as the safetensors library: a larger header is refused, not allocated."""

_U64_LIMIT = 2**64
"""Counts and offsets are 64-bit in the format (the library's usize)."""
_I64_LIMIT = 2**63
"""torch's sizes and strides are signed 64-bit."""

HEADER_ALIGNMENT = 8
"""Headers are padded with spaces so that the data buffer starts 8-byte aligned."""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MERGEABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Floating dtypes that SLERP reads; other tensors are copied when both inputs agree."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header, with absolute file offsets."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed, validated header: tensors in file order and the string metadata."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _ranged_int(text: str) -> int:
    value = int(text)
    if abs(value) > sys.float_info.max:  # other parsers read it as a float, out of range
        raise ValueError(f"number {text[:20]}... is out of range")
    return value


def parse_json(raw: bytes) -> object:
    """Strict JSON from bytes: UTF-8, no duplicate keys, only finite numbers, valid Unicode.

    Raises ValueError with the reason. Python's json is more lenient than the format's own
    parser in all of these, and raises RecursionError on deep nesting, made a ValueError here.
    """
    try:
        document = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_ranged_int,
        )
        # An escaped unpaired surrogate ("\ud800") decodes to a str that is not Unicode text.
        if b"\\u" in raw:
            json.dumps(document, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None
    except UnicodeError as exc:
        raise ValueError(f"not valid Unicode text ({exc.reason})") from None
    return document


def _is_nonnegative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header(prefix: bytes, file_size: int, path: str) -> Header:
    """Validate and parse a header from the file's first bytes.

    `prefix` must hold at least the 8 length bytes and, if the header is complete in it,
    the JSON; call `header_length` first to know how much to read.
    """
    length = header_length(prefix, file_size, path)
    raw = prefix[8 : 8 + length]
    if len(raw) != length:
        raise CheckpointError(f"{path}: the header is cut short ({len(raw)} of {length} bytes)")

    try:
        document = parse_json(raw)
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({exc}); the file is damaged "
            "or not a safetensors file: download or convert it again"
        ) from None
    if not isinstance(document, dict):
        raise CheckpointError(
            f"{path}: the safetensors header must be a JSON object, found "
            f"{type(document).__name__}; the file is damaged"
        )

    metadata = document.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{path}: __metadata__ must map strings to strings; the file is damaged"
        )

    data_start = 8 + length
    data_size = file_size - data_start
    tensors = [
        _parse_entry(name, entry, data_start, data_size, path) for name, entry in document.items()
    ]
    tensors.sort(key=lambda info: (info.begin, info.end))
    _check_layout(tensors, data_start, data_size, path)
    return Header(tensors=tuple(tensors), metadata=dict(metadata), data_start=data_start)


def header_length(prefix: bytes, file_size: int, path: str) -> int:
    """The JSON header's length in bytes, checked against the file size and the bound."""
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointError(
            f"{path}: {file_size} bytes is too short for a safetensors file (at least 8 "
            "bytes of header length are needed); the file is truncated or not safetensors"
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: the header claims {length} bytes, more than the {MAX_HEADER_BYTES} "
            "allowed; the file is damaged or not a safetensors file"
        )
    if 8 + length > file_size:
        raise CheckpointError(
            f"{path}: the header claims {length} bytes but the file holds only "
            f"{file_size - 8} after the length; the file is truncated: download it again"
        )
    return length


def _parse_entry(
    name: str, entry: object, data_start: int, data_size: int, path: str
) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: the header entry must be an object, found {entry!r}")

    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CheckpointError(
            f"{where}: unknown dtype {dtype_name!r}; supported are {', '.join(DTYPES)}"
        )
    dtype = DTYPES[dtype_name]

    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_nonnegative_int(d) for d in shape):
        raise CheckpointError(
            f"{where}: the shape must be a list of non-negative integers, found {shape!r}"
        )

    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_nonnegative_int(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets must be two non-negative integers [begin, end] with "
            f"begin <= end, found {offsets!r}"
        )
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} reach past the end of the data buffer "
            f"({data_size} bytes); the file is truncated or damaged"
        )

    count = 1
    for dimension in shape:
        count *= dimension
        if dimension >= _U64_LIMIT or count >= _U64_LIMIT:  # stops a product of huge numbers
            raise CheckpointError(
                f"{where}: the element count of shape {_abbreviated(shape)} overflows 64 bits; "
                "the header is damaged"
            )
    # torch keeps sizes and strides (products of the later dimensions, zeros counted as one)
    # in int64; a tensor of no elements can still name dimensions beyond that.
    stride = 1
    for dimension in reversed(shape):
        if dimension >= _I64_LIMIT or stride >= _I64_LIMIT:
            raise CheckpointError(
                f"{where}: shape {_abbreviated(shape)} has sizes beyond torch's 64-bit limit; "
                "the header is damaged"
            )
        stride *= max(dimension, 1)

    expected = count * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: shape {shape} of {dtype_name} needs {expected} bytes but "
            f"data_offsets {offsets} span {end - begin}; the header is damaged"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _abbreviated(values: list) -> str:
    text = repr(values)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(values)} dimensions)"


def _check_layout(tensors: list[TensorInfo], data_start: int, data_size: int, path: str) -> None:
    """Tensors, sorted by offsets, must tile the data buffer: no overlap, no gap, no tail."""
    for previous, current in itertools.pairwise(tensors):
        if current.begin < previous.end:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {current.name!r} overlap in the data "
                f"buffer (bytes {previous.begin}-{previous.end} and "
                f"{current.begin}-{current.end}); the header is damaged"
            )

    covered = data_start
    for info in tensors:
        if info.begin > covered:
            raise CheckpointError(
                f"{path}: bytes {covered - data_start}-{info.begin - data_start} of the data "
                f"buffer belong to no tensor (the next is {info.name!r}); the header and the "
                "data disagree, the file is damaged"
            )
        covered = info.end
    if covered != data_start + data_size:
        raise CheckpointError(
            f"{path}: bytes {covered - data_start}-{data_size} of the data buffer belong to no "
            "tensor (data after the last tensor); the file is damaged or was appended to"
        )


def encode_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    """Length prefix plus padded JSON for tensors laid out back to back in the given order."""
    document: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        document[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes

    text = json.dumps(document, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text
