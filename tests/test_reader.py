"""Opening checkpoints: the accepted layouts, and each damaged or unsafe input refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.errors import CheckpointError
from fastmerge.reader import open_checkpoint
from fastmerge.safetensors_format import encode_header

from .conftest import write_raw


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3)}, path)
    return path


def test_views_match_the_safetensors_library(tiny_untied_sharded_pair):
    from safetensors import safe_open

    base = tiny_untied_sharded_pair[0]
    with open_checkpoint(base) as checkpoint:
        assert len(checkpoint.files) == 3
        for name, (file, _info) in checkpoint.tensors.items():
            with safe_open(file.path, "pt") as reference:
                assert torch.equal(checkpoint.view(name), reference.get_tensor(name)), name


def test_a_directory_an_index_and_a_file_open_the_same_tensors(
    tiny_untied_sharded_pair, small_file
):
    base = tiny_untied_sharded_pair[0]
    from_dir = open_checkpoint(base)
    from_index = open_checkpoint(base / "model.safetensors.index.json")
    assert list(from_dir.tensors) == list(from_index.tensors)
    assert from_dir.config == from_index.config is not None

    single = open_checkpoint(small_file)
    assert set(single.tensors) == {"w", "b"}
    assert torch.equal(single.view("w"), torch.arange(6.0).view(2, 3))


def test_tensors_come_in_file_order_across_shards(tiny_untied_sharded_pair):
    with open_checkpoint(tiny_untied_sharded_pair[0]) as checkpoint:
        positions = [(file.path.name, info.begin) for file, info in checkpoint.tensors.values()]
    assert positions == sorted(positions)


def test_writer_headers_round_trip_through_the_library(tmp_path):
    from safetensors.torch import load_file

    header = encode_header([("x", torch.float16, (3,)), ("y", torch.float16, (2, 2))], {})
    data = (
        torch.arange(3, dtype=torch.float16).numpy().tobytes()
        + torch.ones(4, dtype=torch.float16).numpy().tobytes()
    )
    (tmp_path / "m.safetensors").write_bytes(header + data)
    loaded = load_file(tmp_path / "m.safetensors")
    assert torch.equal(loaded["x"], torch.arange(3, dtype=torch.float16))
    assert loaded["y"].shape == (2, 2)
    assert (len(header)) % 8 == 0


def _damage(small_file: Path, edit) -> Path:
    raw = small_file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    result = edit(header, data)
    if result is not None:
        header, data = result
    write_raw(small_file, header, data)
    return small_file


def _set(entry: str, key: str, value):
    def edit(header, data):
        header[entry][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("w", "dtype", "F7"), r"tensor 'w': unknown dtype 'F7'"),
        (_set("w", "shape", [2, -3]), r"shape must be a list of non-negative integers"),
        (_set("w", "shape", [2, 4]), r"shape \[2, 4\] of F32 needs 32 bytes but .* span 24"),
        (_set("w", "data_offsets", [0, 10**6]), r"reach past the end of the data buffer"),
        (_set("w", "data_offsets", [8, 4]), r"begin <= end"),
        (_set("w", "data_offsets", "0-24"), r"data_offsets must be two non-negative integers"),
        (_set("b", "data_offsets", [12, 24]), r"overlap in the data buffer"),
        (lambda h, d: (h, d[:-4]), r"reach past the end of the data buffer"),
        (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), r"__metadata__ must map strings"),
        (lambda h, d: ([1, 2], d), r"must be a JSON object"),
    ],
)
def test_damaged_headers_are_refused(small_file, edit, message):
    _damage(small_file, edit)
    with pytest.raises(CheckpointError, match=message) as caught:
        open_checkpoint(small_file)
    assert str(small_file) in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", r"too short for a safetensors file"),
        (b"\x01\x02", r"too short"),
        (struct.pack("<Q", 1000) + b"{}", r"claims 1000 bytes but the file holds only 2"),
        (struct.pack("<Q", 2**63) + b"{}", r"more than the 104857600 allowed"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", r"not valid JSON"),
        (struct.pack("<Q", 5) + b"{'a'}", r"not valid JSON"),
        (struct.pack("<Q", 2) + b"{}", None),
    ],
)
def test_truncated_and_garbage_files_are_refused(tmp_path, raw, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    if message is None:
        assert open_checkpoint(path).tensors == {}
        return
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_duplicate_keys_are_refused(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = f'{{"w":{entry},"w":{entry}}}'.encode()
    write_raw(tmp_path / "x.safetensors", raw, b"\0" * 4)
    with pytest.raises(CheckpointError, match="duplicate key 'w'"):
        open_checkpoint(tmp_path / "x.safetensors")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_checkpoints_are_refused_with_a_conversion_hint(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04not really")
    for target in (tmp_path, tmp_path / name):
        with pytest.raises(CheckpointError, match=r"pickle checkpoint.*save_pretrained"):
            open_checkpoint(target)


def test_a_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model.safetensors or .*index.json"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint(tmp_path / "missing")


def _write_index(directory: Path, weight_map: dict) -> None:
    document = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(document))


@pytest.mark.parametrize(
    "shard_name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"]
)
def test_index_entries_outside_the_model_directory_are_refused(tmp_path, shard_name):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    _write_index(model, {"w": shard_name})
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_checkpoint(model)


def test_index_symlinks_leaving_the_model_directory_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    (model / "shard.safetensors").symlink_to(tmp_path / "outside.safetensors")
    _write_index(model, {"w": "shard.safetensors"})
    with pytest.raises(CheckpointError, match="through a symbolic link"):
        open_checkpoint(model)


def test_index_naming_absent_tensors_or_files_is_refused(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    _write_index(tmp_path, {"w": "a.safetensors", "v": "a.safetensors"})
    with pytest.raises(CheckpointError, match=r"does not hold, first 'v'"):
        open_checkpoint(tmp_path)

    _write_index(tmp_path, {"w": "missing.safetensors"})
    with pytest.raises(CheckpointError, match=r"shard 'missing\.safetensors' is missing"):
        open_checkpoint(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(tmp_path)


def test_released_pages_leave_the_views_readable(tiny_pair):
    with open_checkpoint(tiny_pair[0]) as checkpoint:
        name = next(iter(checkpoint.tensors))
        before = checkpoint.view(name).clone()
        checkpoint.release(name)
        assert torch.equal(checkpoint.view(name), before)
