"""`fastmerge verify`: the manifest written at merge time, and each kind of damage named."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import crc32c
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import fastmerge
from fastmerge.cli import EXIT_BAD_INPUT, app
from fastmerge.manifest import MANIFEST_FILE

from .conftest import read_header


@pytest.fixture(scope="module")
def good_output(tiny_untied_sharded_pair, tmp_path_factory) -> Path:
    """A merge in five shards with an index. Tests damage copies of it, never it."""
    out = tmp_path_factory.mktemp("verify") / "merged"
    fastmerge.merge(*tiny_untied_sharded_pair, out, 0.6, shard_size=80_000)
    return out


@pytest.fixture
def output(good_output, tmp_path) -> Path:
    return Path(shutil.copytree(good_output, tmp_path / "merged"))


def _run(runner, *args: object):
    return runner.invoke(app, [str(a) for a in args])


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("model-*.safetensors"))


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_the_manifest_holds_every_file_and_the_crc_of_every_tensor(good_output):
    manifest = json.loads((good_output / MANIFEST_FILE).read_text())
    names = sorted(p.name for p in good_output.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == names
    assert len(_shards(good_output)) == 5

    for name, entry in manifest["files"].items():
        path = good_output / name
        assert entry["size"] == path.stat().st_size, name
        if not name.endswith(".safetensors"):
            assert entry["crc32c"] == f"{crc32c.crc32c(path.read_bytes()):08x}", name
            continue
        # Checksums taken by the writer thread, against the bytes the library reads back.
        with safe_open(path, "pt") as handle:
            assert sorted(entry["tensors"]) == sorted(handle.keys())
            for tensor in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                data = handle.get_tensor(tensor).reshape(-1).view(-1).numpy().tobytes()
                assert entry["tensors"][tensor] == f"{crc32c.crc32c(data):08x}", tensor
        length = struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert entry["header_crc32c"] == f"{crc32c.crc32c(path.read_bytes()[: 8 + length]):08x}"


def test_an_intact_output_verifies(runner, good_output):
    result = _run(runner, "verify", good_output)
    assert result.exit_code == 0, result.output
    # 5 shards, the index, config, generation config, model card and manifest; 21 tensors of
    # 2 bytes per value; checksums: 5 headers, 21 tensors and the 4 other files (the manifest
    # is what they are checked against).
    values = sum(t.numel() for shard in _shards(good_output) for t in load_file(shard).values())
    assert result.stdout == (
        f"ok: {good_output} is intact: 10 files, 21 tensors ({2 * values:,} bytes); 30 "
        "checksums match fastmerge-manifest.json\n"
    )


def _problems(result) -> list[str]:
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and " is damaged (" in lines[0], lines[0]
    problems = [line.removeprefix("  - ") for line in lines[1:]]
    assert lines[0].endswith(f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):")
    return problems


def test_a_flipped_byte_in_a_tensor_names_the_tensor(runner, output):
    shard = _shards(output)[1]
    header = read_header(shard)
    name = sorted(n for n in header if n != "__metadata__")[2]
    begin, end = header[name]["data_offsets"]
    data_start = 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]
    _flip(shard, data_start + (begin + end) // 2)

    problems = _problems(_run(runner, "verify", output))
    assert len(problems) == 1
    assert problems[0].startswith(
        f"{shard.name}: tensor {name!r} (bytes {data_start + begin}-{data_start + end}) is "
        "damaged: its checksum is "
    ), problems
    assert "copy or download the file again" in problems[0]


def test_a_flipped_byte_in_a_header_name_is_found(runner, output):
    shard = _shards(output)[0]
    raw = shard.read_bytes()
    _flip(shard, raw.index(b"model.layers") + 3)  # "model" becomes "mo|el": same length

    problems = _problems(_run(runner, "verify", output))
    joined = "\n".join(problems)
    assert f"{shard.name}: the header's checksum is" in joined
    assert "is not in fastmerge-manifest.json; the header was changed" in joined
    assert "model.safetensors.index.json" in joined  # the index names the old tensor


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", ["{shard}: the header claims", "{shard}: {size} bytes, but"]),
        ("delete", ["{shard}: cannot be read", "{shard}: listed in fastmerge-manifest.json"]),
        ("stale shard", ["model-00009-of-00009.safetensors: a .safetensors file that the"]),
        ("config", ["config.json: its checksum is"]),
        ("manifest", ["fastmerge-manifest.json is missing"]),
        ("index", ["model.safetensors.index.json: lists tensor 'lm_head.weight' in {first}"]),
        (
            "offsets",
            [
                "{shard}: the header's checksum is",
                "{shard}: tensor 'model.layers.0.self_attn.k_proj.weight' (bytes",
                "{shard}: tensor 'model.layers.0.self_attn.v_proj.weight' (bytes",
            ],
        ),
    ],
)
def test_each_kind_of_damage_is_named(runner, output, damage, expected):
    shard = _shards(output)[1 if damage == "offsets" else -1]
    size = shard.stat().st_size
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "delete":
        shard.unlink()
    elif damage == "stale shard":
        shutil.copy(shard, output / "model-00009-of-00009.safetensors")
    elif damage == "config":  # same size, one digit changed
        config = (output / "config.json").read_text()
        (output / "config.json").write_text(
            config.replace('"hidden_size": 64', '"hidden_size": 65')
        )
    elif damage == "manifest":
        (output / MANIFEST_FILE).unlink()
    elif damage == "index":
        index = json.loads((output / "model.safetensors.index.json").read_text())
        index["weight_map"]["lm_head.weight"] = _shards(output)[0].name
        (output / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "offsets":  # two tensors of one shape swap places: a valid, wrong header
        raw = shard.read_bytes()
        length = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + length])
        first, second = (
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
        )
        header[first]["data_offsets"], header[second]["data_offsets"] = (
            header[second]["data_offsets"],
            header[first]["data_offsets"],
        )
        text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
        shard.write_bytes(raw[:8] + text + raw[8 + length :])

    problems = _problems(_run(runner, "verify", output))
    joined = "\n".join(problems)
    for fragment in expected:
        fragment = fragment.format(shard=shard.name, size=100, first=_shards(output)[0].name)
        assert fragment in joined, joined
    if damage == "truncate":
        assert f"fastmerge-manifest.json recorded {size}" in joined


def test_files_added_after_the_merge_are_ignored(runner, output):
    (output / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    result = _run(runner, "verify", output)
    assert result.exit_code == 0, result.output


def test_verify_refuses_what_is_not_an_output(runner, tmp_path):
    problems = _problems(_run(runner, "verify", tmp_path / "nowhere"))
    assert problems == [f"{tmp_path / 'nowhere'}: not a directory"]

    (tmp_path / "empty").mkdir()
    problems = _problems(_run(runner, "verify", tmp_path / "empty"))
    assert "no model.safetensors or model.safetensors.index.json" in "\n".join(problems)
